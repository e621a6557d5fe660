"""The engine process's server: the job queue behind a local socket (see docs/protocol.md).

Two threads do the work:

- the socket thread (`serve_forever`, the caller's thread) accepts clients, reads and answers their
  messages and is the only one that writes to sockets; it never waits on a job;
- the runner thread takes the next queued job, runs it through `engine.engine.Engine` and posts
  its events to the socket thread, which broadcasts them to every client that said hello.

Previews are coalesced: at most one per `PREVIEW_INTERVAL_S` per job goes out, always the newest.
A slow client's unsent bytes are capped; past the cap it is disconnected, never the engine stalled.
"""

from __future__ import annotations

import base64
import dataclasses
import fcntl
import os
import queue
import selectors
import socket
import stat
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

from engine.errors import JobCancelled, UserError, WorkerFailure
from engine.job_queue import (
    CANCELLED,
    DONE,
    FAILED,
    INTERRUPTED,
    INTERRUPTED_ERROR,
    RUNNING,
    JobQueue,
    check_compare_specs,
    default_queue_path,
)
from engine.output_policy import check_output_inside, expand_user
from engine.protocol import PROTOCOL_VERSION, GenerationRequest
from engine.socket_path import default_socket_path, prepare_socket_folder
from engine.wire import MessageReader, WireError, encode_message

__all__ = ["EngineServer", "PreviewThrottle", "default_socket_path", "event_message"]

PREVIEW_INTERVAL_S = 0.1  # at most ~10 preview messages per second per job
TICK_S = 0.05
PARENT_POLL_S = 0.5
MAX_CLIENT_BACKLOG = 64 * 1024 * 1024  # unsent bytes for one client before it is dropped
MAX_CATALOG_THREADS = 4  # catalog answers being built at once (each may scan folders for seconds)
MAX_OUTPUT_FOLDERS = 64  # folders allowed with allow_output while the engine runs
STOP_GRACE_S = 15.0  # how long a stop waits for the running job to wind down before killing workers
WIRE_FIX = (
    "Send each message as a 4-byte big-endian length, then that many bytes (at most 16 MiB) of UTF-8 "
    "JSON: one object with a string 'type' (docs/protocol.md)."
)
_QUEUE_SNAPSHOT = {"type": "queue"}  # posted by other threads; the snapshot is taken when sent


def _log(message: str) -> None:
    print(f"parastep-engine: {message}", file=sys.stderr, flush=True)


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def event_message(job_id: str, event: Any) -> dict[str, Any]:
    """An engine event (protocol dataclass) as a message for the job `job_id`; PNGs as base64."""
    data = dataclasses.asdict(event) if dataclasses.is_dataclass(event) else dict(event)
    data["job_id"] = job_id  # Engine.run numbers its runs itself; clients know the queue's ids
    if data.get("type") == "preview":
        data["images"] = [base64.b64encode(bytes(image)).decode("ascii") for image in data["images"]]
    return data


class PreviewThrottle:
    """Keeps preview messages of a job at least `interval` seconds apart, dropping all but the newest."""

    def __init__(self, interval: float = PREVIEW_INTERVAL_S, clock: Any = time.monotonic) -> None:
        self.interval, self.clock = interval, clock
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._pending: dict[str, dict[str, Any]] = {}

    def offer(self, job_id: str, message: dict[str, Any]) -> dict[str, Any] | None:
        """The message if it may go out now; otherwise it is kept (replacing an older one) for `due`."""
        with self._lock:
            now, last = self.clock(), self._last.get(job_id)
            if last is None or now - last >= self.interval:
                self._last[job_id] = now
                self._pending.pop(job_id, None)
                return message
            self._pending[job_id] = message
            return None

    def due(self) -> list[dict[str, Any]]:
        """Kept previews whose interval has passed."""
        with self._lock:
            now, ready = self.clock(), []
            for job_id in list(self._pending):
                if now - self._last.get(job_id, 0.0) >= self.interval:
                    ready.append(self._pending.pop(job_id))
                    self._last[job_id] = now
            return ready

    def flush(self, job_id: str) -> dict[str, Any] | None:
        """The job ended: its kept preview, if any, to send before the end event; forgets the job."""
        with self._lock:
            self._last.pop(job_id, None)
            return self._pending.pop(job_id, None)


class _Client:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = MessageReader()
        self.out = bytearray()
        self.greeted = False
        self.closed = False
        self.events = selectors.EVENT_READ


def _acquire_lock(path: Path, busy: str, fix: str) -> int:
    """An exclusive flock on `path` for the life of this process (the kernel drops it if we die)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            finally:
                os.close(fd)
            raise UserError(busy + (f" (pid {holder})." if holder.isdigit() else "."), fix) from None
        try:  # the holder removes the file on exit: the lock counts only if the path is still this file
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode("ascii"), 0)
    return fd


class EngineServer:
    """Serves one job queue over a Unix domain socket; see the module note and docs/protocol.md."""

    def __init__(
        self,
        socket_path: Path | str | None = None,
        queue_path: Path | str | None = None,
        model_folders: list[Path | str] | tuple = (),
        dtype: str = "auto",
        watch_parent: bool = False,
    ) -> None:
        self.socket_path = Path(socket_path) if socket_path else default_socket_path()
        self.queue_path = Path(queue_path) if queue_path else default_queue_path()
        self.model_folders = [Path(folder) for folder in model_folders]
        self.dtype = dtype
        self.queue: JobQueue | None = None
        self._parent_pid = os.getppid() if watch_parent else None
        self._previews = PreviewThrottle()
        self._outbox: queue.SimpleQueue[tuple[_Client | None, dict[str, Any]]] = queue.SimpleQueue()
        self._clients: dict[int, _Client] = {}
        self._selector: selectors.BaseSelector | None = None
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._locks: list[tuple[int, Path]] = []
        self._socket_ino: int | None = None
        self._engine: Any = None  # engine.engine.Engine, made by the runner thread
        self._runner: threading.Thread | None = None
        self._work = threading.Event()  # something may be queued
        self._stopping = threading.Event()  # the runner must wind down
        self._stop_requested = False  # plain flag: set from signal handlers
        self._current_job: str | None = None
        self._request_id: Any = None  # `id` of the client message being handled
        self._cancel_job: str | None = None
        self._user_cancelled: str | None = None  # the job a client cancelled (not one stopped under it)
        self._output_folders: list[Path] = []  # chosen by the user (allow_output), besides the default
        self._catalog_slots = threading.BoundedSemaphore(MAX_CATALOG_THREADS)
        self._started = False
        self._closed = False
        self._handlers = {
            "catalog": self._on_catalog,
            "submit": self._on_submit,
            "reorder": self._on_reorder,
            "remove": self._on_remove,
            "cancel": self._on_cancel,
            "requeue": self._on_requeue,
            "queue": self._on_queue,
            "shutdown": self._on_shutdown,
            "allow_output": self._on_allow_output,
            "check": self._on_check,
            "resume": self._on_resume,
        }
        # A queue kept from the last session waits for a `resume` (the user's say-so) before it runs.
        self._held = False
        # `check` runs Engine.plan (which may import diffusers): on one thread, answered in order.
        self._checks: queue.SimpleQueue[tuple[_Client, dict[str, Any], dict[str, Any]]] = queue.SimpleQueue()
        self._checker: threading.Thread | None = None
        self._check_engines: dict[tuple[str, ...], Any] = {}

    # ---- life cycle ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Takes the socket (refusing if another engine holds it) and the queue, starts the runner."""
        path = self.socket_path
        prepare_socket_folder(path)
        try:
            lock = path.with_name(path.name + ".lock")
            self._locks.append(
                (
                    _acquire_lock(
                        lock,
                        f"Another engine is already running on {path}",
                        "Connect to it, or stop it (send 'shutdown') before starting a new one.",
                    ),
                    lock,
                )
            )
            self.queue_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            lock = self.queue_path.with_name(self.queue_path.name + ".lock")
            self._locks.append(
                (
                    _acquire_lock(
                        lock,
                        f"Another engine is already using the queue {self.queue_path}",
                        "Stop it first, or point PARASTEP_STATE_DIR at another folder.",
                    ),
                    lock,
                )
            )
            self._listener = self._bind(path)
        except BaseException:
            self._release_locks()
            raise
        self.queue = JobQueue(self.queue_path, on_problem=self._queue_problem)
        self._held = any(job["status"] == "queued" for job in self.queue.to_list())
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        for sock in (self._listener, self._wake_r, self._wake_w):
            sock.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ, "listen")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._runner = threading.Thread(target=self._runner_main, name="parastep-runner", daemon=True)
        self._runner.start()
        self._started = True
        _log(f"listening on {path} (pid {os.getpid()}, queue {self.queue_path})")

    def _queue_problem(self, message: str) -> None:
        """From any thread: a queue file that cannot be read or written is an alarm for every client."""
        _log(message)
        if self._selector is not None:  # a problem found while loading waits for each `welcome`
            self._post(None, {"type": "log", "message": one_line(message)})

    def _bind(self, path: Path) -> socket.socket:
        try:
            info = path.lstat()
        except FileNotFoundError:
            info = None
        if info is not None:
            if not stat.S_ISSOCK(info.st_mode):
                raise UserError(f"{path} exists and is not a socket.", "Pick another --socket path.")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            probe.settimeout(1.0)
            try:
                probe.connect(str(path))
            except OSError:  # nobody listens: the socket of an engine that died
                path.unlink()
            else:
                raise UserError(
                    f"Another program is listening on {path}.", "Stop it or pick another --socket path."
                )
            finally:
                probe.close()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o177)  # the socket is born 0600: no window where others may connect
        try:
            listener.bind(str(path))
        except OSError as exc:
            listener.close()
            raise UserError(
                f"Cannot listen on {path} ({exc.strerror}).", "Pick another --socket path."
            ) from None
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)
        self._socket_ino = path.stat().st_ino
        listener.listen(16)
        return listener

    def stop(self) -> None:
        """Asks `serve_forever` to return (safe from signal handlers and other threads)."""
        self._stop_requested = True
        self._wake()

    def serve_forever(self) -> None:
        """Serves until `stop` (or a `shutdown` message, or the parent's death), then closes."""
        if not self._started:
            self.start()
        assert self._selector is not None
        next_parent_check = time.monotonic() + PARENT_POLL_S
        try:
            while not self._stop_requested:
                for key, mask in self._selector.select(TICK_S):
                    if key.data == "listen":
                        self._accept()
                    elif key.data == "wake":
                        self._drain_wake()
                    else:
                        self._serve_client(key.data, mask)
                self._drain_outbox()
                for message in self._previews.due():
                    self._send(None, message)
                if self._parent_pid is not None and time.monotonic() >= next_parent_check:
                    next_parent_check = time.monotonic() + PARENT_POLL_S
                    if os.getppid() != self._parent_pid:
                        _log("the process that started the engine is gone; stopping")
                        self._stop_requested = True
        finally:
            self.close()

    def close(self) -> None:
        """Stops the runner (the running job becomes interrupted), the workers, and removes the socket."""
        if self._closed or not self._started:
            return
        self._closed = True
        self._stopping.set()
        self._work.set()
        self._cancel_job = self._current_job  # its next event re-sends the cancel (e.g. after a load)
        if self._engine is not None:
            self._engine.cancel()
        if self._runner is not None:
            self._runner.join(STOP_GRACE_S)
            if self._runner.is_alive():
                _log("the running job did not stop in time; killing its workers")
                self._kill_workers()
                self._runner.join(STOP_GRACE_S)
        self._drain_outbox()
        for client in list(self._clients.values()):
            self._drop(client)
        assert self._selector is not None
        self._selector.close()
        for sock in (self._listener, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        try:
            if self._socket_ino is not None and self.socket_path.stat().st_ino == self._socket_ino:
                self.socket_path.unlink()
        except OSError:
            pass
        self._release_locks()
        _log("stopped")

    def _release_locks(self) -> None:
        for fd, path in self._locks:
            try:  # removed while still held: a new engine then locks a new file (see _acquire_lock)
                path.unlink()
            except OSError:
                pass
            os.close(fd)
        self._locks = []

    @staticmethod
    def _kill_workers() -> None:
        worker_group = sys.modules.get("engine.worker_group")
        if worker_group is None:
            return
        for group in list(worker_group.WorkerGroup._running):
            for process in list(group.processes):
                try:
                    process.kill()
                except (OSError, ValueError, AttributeError):
                    pass

    # ---- socket thread: connections ---------------------------------------------------------------
    def _wake(self) -> None:
        try:
            if self._wake_w is not None:
                self._wake_w.send(b"\0")
        except OSError:  # full (a wake-up is pending anyway) or closed
            pass

    def _drain_wake(self) -> None:
        try:
            while self._wake_r is not None and self._wake_r.recv(4096):
                pass
        except OSError:
            pass

    def _accept(self) -> None:
        assert self._listener is not None and self._selector is not None
        while True:
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                _log(f"accept failed: {exc}")
                return
            sock.setblocking(False)
            client = _Client(sock)
            self._clients[sock.fileno()] = client
            self._selector.register(sock, client.events, client)

    def _drop(self, client: _Client) -> None:
        if client.closed:
            return
        client.closed = True
        self._clients.pop(client.sock.fileno(), None)
        try:
            assert self._selector is not None
            self._selector.unregister(client.sock)
        except (KeyError, ValueError):
            pass
        client.sock.close()

    def _serve_client(self, client: _Client, mask: int) -> None:
        """Reads and writes one client: anything that goes wrong costs that connection, never the engine."""
        try:
            if mask & selectors.EVENT_READ:
                self._read(client)
            if mask & selectors.EVENT_WRITE and not client.closed:
                self._write(client)
        except Exception:
            traceback.print_exc()
            _log("a client's connection failed in an unexpected way; closing that connection")
            self._drop(client)

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        if not data:
            self._drop(client)
            return
        client.reader.feed(data)
        while not client.closed and not self._stop_requested:
            # Decoding, validation and the reply all happen in here: a frame can only ever cost an
            # `error` reply (RecursionError, UnicodeError, MemoryError... included), never the loop.
            try:
                message = client.reader.next_message()
            except WireError as exc:
                self._reply_error(client, f"{exc} Fix: {WIRE_FIX}")
                continue
            except Exception as exc:  # a reader bug: the stream's framing can no longer be trusted
                traceback.print_exc()
                self._reply_error(client, f"The engine could not read a message ({type(exc).__name__}).")
                self._write(client)
                self._drop(client)
                return
            if message is None:
                break
            self._handle(client, message)

    def _write(self, client: _Client) -> None:
        if client.closed:
            return
        if client.out:
            try:
                sent = client.sock.send(client.out)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self._drop(client)
                return
            del client.out[:sent]
        if len(client.out) > MAX_CLIENT_BACKLOG:
            _log("a client is not reading its messages; disconnecting it")
            self._drop(client)
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.out else 0)
        if events != client.events:
            client.events = events
            assert self._selector is not None
            self._selector.modify(client.sock, events, client)

    def _send(self, target: _Client | None, message: dict[str, Any]) -> None:
        """To one client, or (target None) to every client that said hello."""
        try:
            data = encode_message(message)
        except Exception as exc:  # WireError; anything else is a bug, but must not stop the loop
            _log(f"dropped an outgoing message: {type(exc).__name__}: {exc}")
            if target is not None and message.get("type") != "error":
                self._reply_error(target, str(exc), message.get("type"))
            return
        targets = [target] if target is not None else [c for c in self._clients.values() if c.greeted]
        for client in targets:
            if not client.closed:
                client.out += data
                self._write(client)

    def _reply_error(self, client: _Client, message: str, in_reply_to: str | None = None) -> None:
        # A message quoting the client's own text must still encode: lone surrogates become \udxxx.
        text = one_line(message).encode("utf-8", "backslashreplace").decode("utf-8")
        reply: dict[str, Any] = {"type": "error", "message": text}
        if in_reply_to is not None:
            reply["in_reply_to"] = in_reply_to
        self._send(client, {**reply, **self._reply_fields()})

    def _reply_fields(self) -> dict[str, Any]:
        """`id` of the message being handled, for the reply to it (lets a client pair them up)."""
        return {} if self._request_id is None else {"id": self._request_id}

    def _post(self, target: _Client | None, message: dict[str, Any]) -> None:
        """From any thread: hands a message to the socket thread."""
        self._outbox.put((target, message))
        self._wake()

    def _drain_outbox(self) -> None:
        while True:
            try:
                target, message = self._outbox.get_nowait()
            except queue.Empty:
                return
            if target is not None and target.closed:
                continue
            try:
                self._send(target, self._queue_message() if message is _QUEUE_SNAPSHOT else message)
            except Exception:  # e.g. a client's socket failing mid-write: drop that one, keep going
                traceback.print_exc()
                if target is not None:
                    self._drop(target)

    # ---- socket thread: messages -----------------------------------------------------------------
    def _queue_message(self, **extra: Any) -> dict[str, Any]:
        assert self.queue is not None
        return {"type": "queue", "jobs": self.queue.to_list(), "held": self._held, **extra}

    def _broadcast_queue(self, requester: _Client | None = None, **extra: Any) -> None:
        """The queue to every client; the requester's copy carries `extra` (e.g. the new job's id)."""
        for client in [c for c in self._clients.values() if c.greeted]:
            self._send(client, self._queue_message(**(extra if client is requester else {})))

    def _handle(self, client: _Client, message: dict[str, Any]) -> None:
        kind = message["type"]
        self._request_id = message.get("id")
        try:
            if kind == "hello":
                self._on_hello(client, message)
                return
            if not client.greeted:
                raise UserError(
                    f"'{kind}' came before 'hello'.",
                    f'Send {{"type": "hello", "version": {PROTOCOL_VERSION}}} first.',
                )
            handler = self._handlers.get(kind)
            if handler is None:
                raise UserError(
                    f"Unknown message type '{kind}'.", f"Use one of: hello, {', '.join(self._handlers)}."
                )
            handler(client, message)
        except UserError as exc:
            self._reply_error(client, str(exc), kind)
        except Exception as exc:  # a bug: report it, keep serving
            traceback.print_exc()
            self._reply_error(
                client, f"The engine failed to handle '{kind}': {type(exc).__name__}: {exc}"[:2000], kind
            )
        finally:
            self._request_id = None

    def _on_hello(self, client: _Client, message: dict[str, Any]) -> None:
        version = message.get("version")
        if isinstance(version, bool) or not isinstance(version, int):
            raise UserError(
                f"'hello' has version {version!r}; it must be a whole number.",
                f"Send the protocol version ({PROTOCOL_VERSION}).",
            )
        if version > PROTOCOL_VERSION:
            raise UserError(
                f"The client speaks protocol {version}; this engine speaks up to {PROTOCOL_VERSION}.",
                "Stop this engine and start the one that came with the window (same ParaStep Studio).",
            )
        client.greeted = True
        welcome = {"type": "welcome", "version": PROTOCOL_VERSION, "engine_pid": os.getpid()}
        self._send(client, {**welcome, **self._reply_fields()})
        assert self.queue is not None
        for notice in self.queue.notices:
            self._send(client, {"type": "log", "message": notice})

    def _on_catalog(self, client: _Client, message: dict[str, Any]) -> None:
        folders = message.get("folders") or []
        if not isinstance(folders, list) or not all(isinstance(f, str) for f in folders):
            raise UserError("'folders' must be a list of folder paths.", "Send a list of strings.")
        if len(folders) > 100:
            raise UserError(f"'folders' names {len(folders)} folders.", "Send at most 100.")
        if not self._catalog_slots.acquire(blocking=False):
            raise UserError(
                f"The engine is still answering {MAX_CATALOG_THREADS} earlier 'catalog' messages.",
                "Wait for their answers, then ask again.",
            )
        threading.Thread(  # imports torch on first use: keep the socket thread free
            target=self._catalog_main,
            args=(client, folders, self._reply_fields()),
            name="parastep-catalog",
            daemon=True,
        ).start()

    def _catalog_main(self, client: _Client, folders: list[str], reply_fields: dict[str, Any]) -> None:
        try:
            self._catalog(client, folders, reply_fields)
        finally:
            self._catalog_slots.release()

    def _catalog(self, client: _Client, folders: list[str], reply_fields: dict[str, Any]) -> None:
        try:
            from engine.catalog import ModelCatalog
            from engine.devices import inventory
            from engine.strategies import STRATEGIES

            catalog = ModelCatalog([*self.model_folders, *(Path(f).expanduser() for f in folders)])
            entries = catalog.entries()
            strategies = [
                {
                    **cls.describe(),
                    "unavailable": {
                        entry.name: reason
                        for entry in entries
                        if (reason := cls.unavailable_reason(entry)) is not None
                    },
                }
                for cls in STRATEGIES.values()
            ]
            reply = {
                "type": "catalog",
                "models": [{**entry.to_dict(), **_family_facts(entry)} for entry in entries],
                "strategies": strategies,
                "devices": [device.to_dict() for device in inventory()],
            }
        except Exception as exc:
            if not isinstance(exc, UserError):
                traceback.print_exc()
            reply = {"type": "error", "message": one_line(str(exc)), "in_reply_to": "catalog"}
        self._post(client, {**reply, **reply_fields})

    def _on_submit(self, client: _Client, message: dict[str, Any]) -> None:
        request = message.get("request")
        if not isinstance(request, dict):
            raise UserError(
                "'submit' has no 'request' object.", "Send a GenerationRequest dict as 'request'."
            )
        normalised = GenerationRequest.from_dict(request).to_dict()
        check_output_inside(normalised["output"], self.output_folders(), "the request")
        compare = check_compare_specs(message.get("compare"))
        assert self.queue is not None
        job = self.queue.submit(normalised, compare)
        self._work.set()
        self._broadcast_queue(client, job_id=job.job_id, **self._reply_fields())

    def _on_reorder(self, client: _Client, message: dict[str, Any]) -> None:
        assert self.queue is not None
        self.queue.reorder(message.get("job_ids"))
        self._work.set()
        self._broadcast_queue(client, **self._reply_fields())

    def _on_remove(self, client: _Client, message: dict[str, Any]) -> None:
        assert self.queue is not None
        self.queue.remove(_job_id(message))
        self._broadcast_queue(client, **self._reply_fields())

    def _on_requeue(self, client: _Client, message: dict[str, Any]) -> None:
        assert self.queue is not None
        self.queue.requeue(_job_id(message))
        self._work.set()
        self._broadcast_queue(client, **self._reply_fields())

    def _on_cancel(self, client: _Client, message: dict[str, Any]) -> None:
        job_id = _job_id(message)
        assert self.queue is not None
        job = self.queue.get(job_id)
        if job.status != RUNNING:
            raise UserError(
                f"Job {job_id} is {job.status}, not running; only the running job can be cancelled.",
                "Remove a queued job instead." if job.status == "queued" else "Nothing to cancel.",
            )
        self._cancel_job = self._user_cancelled = job_id
        if self._engine is not None:
            self._engine.cancel()
        for other in [c for c in self._clients.values() if c.greeted]:
            extra = self._reply_fields() if other is client else {}
            self._send(other, {"type": "job_cancelling", "job_id": job_id, **extra})

    def _on_queue(self, client: _Client, message: dict[str, Any]) -> None:
        self._send(client, self._queue_message(**self._reply_fields()))

    def output_folders(self) -> list[Path]:
        """Where requests may send clips: the default output folder and the folders clients allowed."""
        from engine.outputs import default_output_dir

        return [default_output_dir(), *self._output_folders]

    def _on_allow_output(self, client: _Client, message: dict[str, Any]) -> None:
        # Only the user can connect (0600 socket): a client's own message is the user's choice, unlike
        # a request's `output`, which may come from a sidecar (engine.output_policy).
        folder = message.get("folder")
        if not isinstance(folder, str) or not expand_user(folder).is_absolute():
            raise UserError(
                f"'allow_output' has folder {folder!r}; it must be an absolute folder path.",
                "Send the folder the user chose for clips.",
            )
        path = expand_user(folder)
        if path not in self._output_folders:
            if len(self._output_folders) >= MAX_OUTPUT_FOLDERS:  # the oldest choice goes first
                del self._output_folders[0]
            self._output_folders.append(path)
        folders = [str(f) for f in self.output_folders()]
        self._send(client, {"type": "output_folders", "folders": folders, **self._reply_fields()})

    def _on_resume(self, client: _Client, message: dict[str, Any]) -> None:
        self._held = False
        self._work.set()
        self._broadcast_queue(client, **self._reply_fields())

    def _on_check(self, client: _Client, message: dict[str, Any]) -> None:
        folders = message.get("folders") or []
        if (
            not isinstance(folders, list)
            or len(folders) > 100
            or not all(isinstance(f, str) for f in folders)
        ):
            raise UserError(
                "'folders' must be a list of at most 100 folder paths.", "Send a list of strings."
            )
        self._checks.put((client, message, self._reply_fields()))
        if self._checker is None:
            self._checker = threading.Thread(target=self._checker_main, name="parastep-check", daemon=True)
            self._checker.start()

    def _checker_main(self) -> None:
        while not self._stopping.is_set():
            try:
                client, message, reply_fields = self._checks.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                reply = self.check(
                    message.get("request"), message.get("compare"), message.get("folders") or []
                )
            except Exception as exc:  # a bug: say so, keep checking
                traceback.print_exc()
                reply = {"ok": False, "problem": f"The check failed: {type(exc).__name__}: {exc}"[:2000]}
            self._post(client, {"type": "check", **reply, **reply_fields})

    def check(self, request: Any, compare: Any = None, folders: list[str] | tuple = ()) -> dict[str, Any]:
        """What `submit` and the run would say about a request, without queueing it: `ok`, or the
        first problem with its structured fix (`entry`: the index of the comparison entry at fault)."""
        from engine.catalog import ModelCatalog
        from engine.compare import entry_request
        from engine.engine import Engine

        try:
            if not isinstance(request, dict):
                raise UserError("'check' has no 'request' object.", "Send a GenerationRequest dict.")
            parsed = GenerationRequest.from_dict(request)
            check_output_inside(parsed.output, self.output_folders(), "the request")
            entries = check_compare_specs(compare)
            key = tuple(folders)
            engine = self._check_engines.get(key)
            if engine is None:
                catalog = ModelCatalog([*self.model_folders, *(Path(f).expanduser() for f in folders)])
                engine = self._check_engines[key] = Engine(catalog, dtype=self.dtype)
            if not entries:
                plan = engine.plan(parsed)
                return {"ok": True, "devices": plan.request.devices, "ideal_speedup": plan.ideal_speedup}
            for index, (strategy, devices) in enumerate(entries):
                try:
                    engine.plan(entry_request(parsed, strategy, devices))
                except UserError as exc:
                    return {"ok": False, **exc.to_dict(), "entry": index}
            return {"ok": True}
        except UserError as exc:
            return {"ok": False, **exc.to_dict()}

    def _on_shutdown(self, client: _Client, message: dict[str, Any]) -> None:
        _log("shutdown requested by a client")
        self._stop_requested = True

    # ---- runner thread --------------------------------------------------------------------------------
    def _get_engine(self) -> Any:
        if self._engine is None:
            from engine.catalog import ModelCatalog
            from engine.engine import Engine

            self._engine = Engine(ModelCatalog(self.model_folders), dtype=self.dtype)
        return self._engine

    def _runner_main(self) -> None:
        """Runs queued jobs one by one until the engine stops.

        Workers are started (by Engine.run) and stopped only in this thread, which lives as long as
        the engine: they die with the thread that started them (PR_SET_PDEATHSIG in engine.worker_entry).
        """
        assert self.queue is not None
        try:
            try:
                self._get_engine()  # import torch and diffusers now rather than in the first job
            except Exception:
                traceback.print_exc()
            while not self._stopping.is_set():
                self._work.clear()
                job = None if self._held else self.queue.start_next()
                if job is None:
                    self._work.wait(0.5)
                    continue
                self._run_job(job.job_id, job.request, job.compare)
        finally:
            if self._engine is not None:
                self._engine.shutdown()  # in the thread that started the workers

    def _run_job(self, job_id: str, request: dict[str, Any], compare: list[list[str]] | None) -> None:
        assert self.queue is not None
        self._current_job = job_id
        self._post(None, _QUEUE_SNAPSHOT)
        self._post(None, {"type": "job_started", "job_id": job_id})
        status, error, result, details = DONE, None, None, None
        try:
            result = self._execute(job_id, request, compare)
        except JobCancelled:
            status = CANCELLED
        except (UserError, WorkerFailure) as exc:
            status, error = FAILED, one_line(str(exc))
            if isinstance(exc, UserError):  # the structured fix, for the window's wording
                details = {k: one_line(v) if isinstance(v, str) else v for k, v in exc.to_dict().items()}
        except Exception as exc:
            traceback.print_exc()
            status = FAILED
            error = one_line(
                f"The engine hit an unexpected error: {type(exc).__name__}: {exc}. Fix: see the engine's "
                "log; run it again with PARASTEP_DEBUG=1 and report it if it repeats."
            )
        finally:
            self._current_job = None
        if self._stopping.is_set() and status != DONE and self._user_cancelled != job_id:
            # Stopped under it: kept to requeue. A job the user cancelled stays cancelled (the
            # window's "Discard" on close cancels, then stops the engine).
            status, error = INTERRUPTED, INTERRUPTED_ERROR
        preview = self._previews.flush(job_id)
        if preview is not None:
            self._post(None, preview)
        self.queue.finish(job_id, status, error, result)
        if status == DONE:
            self._post(None, {"type": "job_finished", "job_id": job_id, "result": result})
        elif status == FAILED:
            failed = {"type": "job_failed", "job_id": job_id, "error": error}
            self._post(None, {**failed, "details": details} if details else failed)
        elif status == CANCELLED:
            self._post(None, {"type": "job_cancelled", "job_id": job_id})
        self._post(None, _QUEUE_SNAPSHOT)

    def _execute(self, job_id: str, request_dict: dict[str, Any], compare: list[list[str]] | None) -> Any:
        from engine.metrics import json_safe

        engine = self._get_engine()
        request = GenerationRequest.from_dict(request_dict)

        def sink(event: Any) -> None:
            self._on_engine_event(job_id, event)

        if compare:
            from engine.compare import compare as run_comparison

            report = run_comparison(engine, request, [(name, devices) for name, devices in compare], sink)
            return json_safe(report)
        return json_safe(engine.generate(request, sink))

    def _on_engine_event(self, job_id: str, event: Any) -> None:
        if self._cancel_job == job_id and self._engine is not None:
            # Engine.run clears the cancel flag when it hands the job to the workers (and a cancel
            # during a model load has no group to reach yet): repeat it until the job stops.
            self._engine.cancel()
        message = event_message(job_id, event)
        if message.get("type") == "preview":
            message = self._previews.offer(job_id, message)
            if message is None:
                return  # kept; the socket thread sends the newest when its interval has passed
        self._post(None, message)


def _family_facts(entry: Any) -> dict[str, Any]:
    """The family's facts from its adapter (modality, conditioning, published steps and warm-up), so
    the window needs no table of its own; nothing for a folder whose pipeline class is unknown."""
    from engine.models import adapter_for

    try:
        return adapter_for(entry).describe()
    except UserError:
        return {}


def _job_id(message: dict[str, Any]) -> str:
    job_id = message.get("job_id")
    if not isinstance(job_id, str) or not job_id:
        raise UserError(f"'{message['type']}' has no 'job_id'.", "Send the id of a job in the queue.")
    return job_id
