"""The window's one connection to the engine process (docs/protocol.md), over a QLocalSocket.

Everything is asynchronous: bytes are read when Qt says they are ready, replies arrive as signals
or callbacks, and reconnect attempts run on timers, so the event loop never waits on the engine.

The client optionally owns a launcher (see `app.engine_process.EngineProcess`): `start()` launches
the engine and connects to it, and when the engine dies the client says "stopped" and, while it
has not crashed too often, launches it again.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from enum import StrEnum
from typing import Any, Protocol

from PySide6.QtCore import QObject, QTimer, Signal
from PySide6.QtNetwork import QLocalSocket

from engine.protocol import PROTOCOL_VERSION
from engine.wire import MessageReader, WireError, encode_message

# Which reply answers which request; pushed messages of the same type also satisfy a waiting reply.
REPLY_TYPES = {
    "hello": "welcome",
    "catalog": "catalog",
    "submit": "queue",
    "reorder": "queue",
    "remove": "queue",
    "requeue": "queue",
    "queue": "queue",
    "cancel": "job_cancelling",
    "check": "check",
    "resume": "queue",
}

RETRY_INTERVAL_MS = 200
# Crash-loop guard: at most this many automatic restarts within RESTART_WINDOW_S.
MAX_AUTO_RESTARTS = 3
RESTART_WINDOW_S = 60.0


def answers(request_type: str, message: dict[str, Any]) -> bool:
    """Whether `message` is the engine's answer to a request of `request_type`."""
    kind = message.get("type")
    if kind == "error":
        return message.get("in_reply_to") == request_type
    if kind == "queue":
        # The requester's copy of the reply to `submit` names the new job. A reply to reorder,
        # remove, requeue or queue looks like a pushed update, so such a request takes the next
        # plain `queue` message; no harm, since every `queue` message holds the whole queue.
        is_submit_reply = "job_id" in message
        return (request_type == "submit") == is_submit_reply and REPLY_TYPES.get(request_type) == "queue"
    return REPLY_TYPES.get(request_type) == kind


class EngineState(StrEnum):
    STARTING = "starting"  # launching, connecting or waiting for `welcome`
    READY = "ready"  # connected, no job running
    BUSY = "busy"  # connected, a job is running
    STOPPED = "stopped"  # no engine (it died, or was stopped)


class Launcher(Protocol):
    """What the client needs from the thing that runs the engine process."""

    died: Any  # Signal(int, str): exit code and the last lines it printed

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def stop_later(self, then: Callable[[], None]) -> None: ...
    def is_running(self) -> bool: ...


class EngineClient(QObject):
    state_changed = Signal(str)
    welcomed = Signal(dict)
    catalog_received = Signal(dict)
    queue_changed = Signal(list)
    job_started = Signal(str)
    stage_changed = Signal(str, str)  # job_id, stage
    step_received = Signal(dict)
    preview_received = Signal(dict)
    job_finished = Signal(str, dict)  # job_id, result
    job_failed = Signal(str, str)  # job_id, error
    job_cancelling = Signal(str)
    job_cancelled = Signal(str)
    log_received = Signal(str)
    error_received = Signal(str)
    message_received = Signal(dict)  # every message, for logs and tests
    engine_died = Signal(int, str)  # exit code, last output

    def __init__(
        self,
        socket_path: str,
        launcher: Launcher | None = None,
        *,
        auto_restart: bool = True,
        connect_timeout_s: float = 180.0,
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self.socket_path = socket_path
        self.launcher = launcher
        self.auto_restart = auto_restart
        self.connect_timeout_s = connect_timeout_s
        self.engine_pid: int | None = None
        self.jobs: list[dict[str, Any]] = []
        self.held = False  # the engine holds a queue kept from the last session until `resume`
        self.failures: dict[str, dict[str, Any]] = {}  # job_id -> the structured error of its failure
        self._state = EngineState.STOPPED
        self._reader = MessageReader()
        self._pending: list[tuple[str, Callable[[dict[str, Any]], None] | None]] = []
        self._deadline = 0.0
        self._stopping = False
        self._restarts: deque[float] = deque()

        self._socket = QLocalSocket(self)
        self._socket.connected.connect(self._on_connected)
        self._socket.disconnected.connect(self._on_disconnected)
        self._socket.readyRead.connect(self._on_ready_read)
        self._socket.errorOccurred.connect(self._on_socket_error)
        self._retry = QTimer(self, singleShot=True, interval=RETRY_INTERVAL_MS)
        self._retry.timeout.connect(self._try_connect)
        if launcher is not None:
            launcher.died.connect(self._on_engine_died)

    # ---- state --------------------------------------------------------------------------------
    @property
    def state(self) -> EngineState:
        return self._state

    def _set_state(self, state: EngineState) -> None:
        if state != self._state:
            self._state = state
            self.state_changed.emit(str(state))

    @property
    def connected(self) -> bool:
        return self._state in (EngineState.READY, EngineState.BUSY)

    # ---- lifecycle ----------------------------------------------------------------------------
    def start(self) -> None:
        """Launch the engine (when the client has a launcher) and connect; returns at once."""
        self._stopping = False
        self._set_state(EngineState.STARTING)
        if self.launcher is not None and not self.launcher.is_running():
            self.launcher.start()
        self._deadline = time.monotonic() + self.connect_timeout_s
        self._try_connect()

    def restart(self) -> None:
        """The user's "Restart engine": stop whatever runs, then start again (without waiting here)."""
        self._restarts.clear()  # a deliberate restart resets the crash-loop guard
        if self.launcher is not None and self.launcher.is_running():
            self._disconnect()
            self._set_state(EngineState.STARTING)
            self.launcher.stop_later(self.start)
        else:
            self.stop()
            self.start()

    def stop(self) -> None:
        """Ask the engine to shut down, then stop its process (waits a few seconds at most: quit only)."""
        self._disconnect()
        if self.launcher is not None:
            self.launcher.stop()
        self._set_state(EngineState.STOPPED)

    def _disconnect(self) -> None:
        self._stopping = True
        self._retry.stop()
        # Only an engine we started is ours to shut down; one found running is left running.
        if self.launcher is not None and self._socket.state() == QLocalSocket.LocalSocketState.ConnectedState:
            self.send({"type": "shutdown"})
            self._socket.flush()
        self._socket.abort()
        self._reader = MessageReader()
        self._fail_pending()

    def _try_connect(self) -> None:
        if self._stopping or self._socket.state() != QLocalSocket.LocalSocketState.UnconnectedState:
            return
        self._socket.connectToServer(self.socket_path)

    def _on_socket_error(self, error: QLocalSocket.LocalSocketError) -> None:
        if self._stopping:
            return
        if self._state == EngineState.STARTING:
            # The engine is still importing torch, or has not bound its socket yet: try again soon.
            if time.monotonic() < self._deadline:
                self._retry.start()
            else:
                self.error_received.emit(
                    f"The engine did not answer on {self.socket_path} within {self.connect_timeout_s:.0f} s."
                )
                self.stop()
        elif error != QLocalSocket.LocalSocketError.PeerClosedError:
            self.error_received.emit(f"Engine connection error: {self._socket.errorString()}")

    def _on_connected(self) -> None:
        self._reader = MessageReader()
        self.request({"type": "hello", "version": PROTOCOL_VERSION}, self._on_welcome)

    def _on_welcome(self, message: dict[str, Any]) -> None:
        self.engine_pid = message.get("engine_pid")
        self._set_state(EngineState.READY)
        self.welcomed.emit(message)
        self.refresh_queue()

    def _on_disconnected(self) -> None:
        if self._stopping:
            return
        self._reader = MessageReader()
        self._fail_pending()
        if self.launcher is not None and self.launcher.is_running():
            # The socket went first; `died` follows when the process exits.
            self._set_state(EngineState.STARTING)
            self._deadline = time.monotonic() + self.connect_timeout_s
            self._retry.start()
        else:
            self._set_state(EngineState.STOPPED)

    def _on_engine_died(self, code: int, output: str) -> None:
        if self._stopping:
            return
        self._socket.abort()
        self._fail_pending()
        self._set_state(EngineState.STOPPED)
        self.engine_died.emit(code, output)
        now = time.monotonic()
        while self._restarts and now - self._restarts[0] > RESTART_WINDOW_S:
            self._restarts.popleft()
        if self.auto_restart and len(self._restarts) < MAX_AUTO_RESTARTS:
            self._restarts.append(now)
            self.log_received.emit(f"engine stopped (exit code {code}); restarting it")
            QTimer.singleShot(500, self._auto_start)
        else:
            self.log_received.emit(f"engine stopped (exit code {code}); use Restart to start it again")

    def _auto_start(self) -> None:
        if self._state == EngineState.STOPPED and not self._stopping:
            self.start()

    # ---- sending ------------------------------------------------------------------------------
    def send(self, message: dict[str, Any]) -> bool:
        """Queue one message on the socket; False when there is no connection."""
        if self._socket.state() != QLocalSocket.LocalSocketState.ConnectedState:
            return False
        self._socket.write(encode_message(message))
        return True

    def request(
        self, message: dict[str, Any], on_reply: Callable[[dict[str, Any]], None] | None = None
    ) -> bool:
        """Send `message`; `on_reply` gets its reply (see REPLY_TYPES), or the `error` answering it."""
        sent = self.send(message)
        if sent and message["type"] in REPLY_TYPES:
            # Every request is remembered, with or without a callback, so replies pair up in order.
            self._pending.append((message["type"], on_reply))
        return sent

    def _take_pending(self, message: dict[str, Any]) -> Callable[[dict[str, Any]], None] | None:
        """The callback waiting for `message`, removed from the waiting list (None if nobody waits)."""
        for index, (request_type, callback) in enumerate(self._pending):
            if answers(request_type, message):
                del self._pending[index]
                return callback
        return None

    def _fail_pending(self) -> None:
        self._pending.clear()  # their replies will never come

    def fetch_catalog(self, folders: list[str] | None = None, on_reply: Callable | None = None) -> bool:
        return self.request({"type": "catalog", "folders": list(folders or [])}, on_reply)

    def submit(
        self,
        request: dict[str, Any],
        compare: list[list[str]] | None = None,
        on_reply: Callable | None = None,
    ) -> bool:
        message: dict[str, Any] = {"type": "submit", "request": request}
        if compare:
            message["compare"] = [list(entry) for entry in compare]
        return self.request(message, on_reply)

    def reorder(self, job_ids: list[str]) -> bool:
        return self.request({"type": "reorder", "job_ids": list(job_ids)})

    def remove(self, job_id: str) -> bool:
        return self.request({"type": "remove", "job_id": job_id})

    def cancel(self, job_id: str) -> bool:
        return self.request({"type": "cancel", "job_id": job_id})

    def requeue(self, job_id: str) -> bool:
        return self.request({"type": "requeue", "job_id": job_id})

    def check(
        self,
        request: dict[str, Any],
        compare: list[list[str]] | None = None,
        folders: list[str] | None = None,
        on_reply: Callable | None = None,
    ) -> bool:
        """Ask the engine whether `request` (and each comparison entry) would run; queues nothing."""
        message: dict[str, Any] = {"type": "check", "request": request, "folders": list(folders or [])}
        if compare:
            message["compare"] = [list(entry) for entry in compare]
        return self.request(message, on_reply)

    def resume(self) -> bool:
        return self.request({"type": "resume"})

    def refresh_queue(self) -> bool:
        return self.request({"type": "queue"})

    # ---- receiving ----------------------------------------------------------------------------
    def _on_ready_read(self) -> None:
        self._reader.feed(bytes(self._socket.readAll().data()))
        while True:
            try:
                message = self._reader.next_message()
            except WireError as err:  # the reader skipped the bad frame; carry on with the next
                self.error_received.emit(f"Bad message from the engine: {err}")
                continue
            if message is None:
                return
            self._dispatch(message)

    def _dispatch(self, message: dict[str, Any]) -> None:
        kind = message.get("type")
        self.message_received.emit(message)
        callback = self._take_pending(message)
        if callback is not None:
            callback(message)
        if kind == "catalog":
            self.catalog_received.emit(message)
        elif kind == "queue":
            self.jobs = list(message.get("jobs", []))
            self.held = bool(message.get("held", False))
            self._update_busy()
            self.queue_changed.emit(self.jobs)
        elif kind == "job_started":
            self._set_state(EngineState.BUSY)
            self.job_started.emit(message["job_id"])
        elif kind == "stage":
            self.stage_changed.emit(message.get("job_id", ""), message.get("stage", ""))
        elif kind == "step":
            self.step_received.emit(message)
        elif kind == "preview":
            self.preview_received.emit(message)
        elif kind == "job_finished":
            self._set_state(EngineState.READY)
            self.job_finished.emit(message["job_id"], message.get("result") or {})
        elif kind == "job_failed":
            self._set_state(EngineState.READY)
            if isinstance(message.get("details"), dict):
                self.failures[message["job_id"]] = message["details"]
            self.job_failed.emit(message["job_id"], message.get("error", ""))
        elif kind == "job_cancelling":
            self.job_cancelling.emit(message["job_id"])
        elif kind == "job_cancelled":
            self._set_state(EngineState.READY)
            self.job_cancelled.emit(message["job_id"])
        elif kind == "log":
            self.log_received.emit(str(message.get("message", "")))
        elif kind == "error":
            self.error_received.emit(str(message.get("message", "")))
            if self._state == EngineState.STARTING:  # e.g. our protocol version is too new
                self.stop()

    def _update_busy(self) -> None:
        if not self.connected:
            return
        running = any(job.get("status") == "running" for job in self.jobs)
        self._set_state(EngineState.BUSY if running else EngineState.READY)
