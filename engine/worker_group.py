"""A group of worker processes, one per device, joined in one torch.distributed group.

The group stays warm between jobs with the same model and devices. A dead worker or a collective
that timed out breaks the group: the job fails with a clear message and the group is torn down so
that the next job starts a fresh one. No process outlives the group.
"""

from __future__ import annotations

import ctypes
import os
import queue
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

from engine.catalog import ModelEntry
from engine.errors import JobCancelled, UserError, WorkerFailure
from engine.worker import Job, WorkerSpec, worker_main

POLL_S = 0.2
DEFAULT_COLLECTIVE_TIMEOUT_S = float(os.environ.get("PARASTEP_COLLECTIVE_TIMEOUT_S", "30"))
LOAD_TIMEOUT_S = float(os.environ.get("PARASTEP_LOAD_TIMEOUT_S", "900"))
ERROR_GRACE_S = 2.0  # after one rank fails, how long its peers get to report before they are stopped


class CancelFlag:
    """A shared "stop the running job" flag. Lock-free: a worker killed while reading it cannot
    leave a lock held (a multiprocessing Event could, and the next job would hang)."""

    def __init__(self) -> None:
        self._value = mp.get_context("spawn").RawValue(ctypes.c_bool, False)

    def set(self) -> None:
        self._value.value = True

    def clear(self) -> None:
        self._value.value = False

    def is_set(self) -> bool:
        return bool(self._value.value)


class WorkerGroup:
    """Spawns, feeds and tears down the workers of one (model, devices, dtype) combination."""

    _running: set[WorkerGroup] = set()  # every started, not yet shut down group (leak checks)

    @classmethod
    def running_pids(cls) -> set[int]:
        return {p.pid for group in cls._running for p in group.processes}

    def __init__(
        self,
        entry: ModelEntry,
        devices: list[str],
        dtype: str = "auto",
        collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S,
        cancel: CancelFlag | None = None,
    ) -> None:
        self.entry, self.devices, self.dtype = entry, list(devices), dtype
        self.collective_timeout_s = collective_timeout_s
        self.key = (str(entry.path), tuple(devices), dtype)
        self._ctx = mp.get_context("spawn")
        self.cancel = cancel if cancel is not None else CancelFlag()
        self.results = self._ctx.Queue()
        self.commands: list[Any] = []
        self.processes: list[Any] = []
        self.load_s = 0.0
        self._rendezvous: str | None = None

    @property
    def world_size(self) -> int:
        return len(self.devices)

    def alive(self) -> bool:
        return bool(self.processes) and all(p.is_alive() for p in self.processes)

    # ---- life cycle -----------------------------------------------------------------------------
    def start(self, on_event: Callable[[Any], None] | None = None) -> None:
        if sys.platform.startswith("linux"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # peers talk over loopback only
        init = None
        if self.world_size > 1:  # a file store in a private folder: no port to pick, nothing listening
            self._rendezvous = tempfile.mkdtemp(prefix="parastep-rendezvous-")
            init = f"file://{self._rendezvous}/store"
        start = time.perf_counter()
        for rank, device in enumerate(self.devices):
            spec = WorkerSpec(
                rank, self.world_size, device, init, self.collective_timeout_s, self.entry, self.dtype
            )
            commands = self._ctx.Queue()
            process = self._ctx.Process(
                target=worker_main,
                args=(spec, commands, self.results, self.cancel),
                name=f"parastep-worker-{rank}",
                daemon=True,
            )
            process.start()
            self.commands.append(commands)
            self.processes.append(process)
        WorkerGroup._running.add(self)
        loaded: set[int] = set()
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while len(loaded) < self.world_size:
            if self.cancel.is_set():  # a load can take minutes: stop it now rather than after
                self.shutdown(force=True)
                raise JobCancelled()
            message = self._next(min(deadline, time.monotonic() + POLL_S), "loading the model")
            if message is None and time.monotonic() < deadline:
                continue
            if message is None:
                self.shutdown(force=True)
                raise WorkerFailure(
                    f"Loading '{self.entry.name}' took more than {LOAD_TIMEOUT_S:.0f} s; stopped."
                )
            if message[0] == "loaded":
                loaded.add(message[1])
            elif message[0] == "error":
                self.shutdown()
                raise UserError(
                    f"Loading '{self.entry.name}' on {self.devices[message[1]]} failed: {message[2]}"
                )
        self.load_s = time.perf_counter() - start

    def shutdown(self, force: bool = False) -> None:
        """Stops every worker: politely (unless `force`: a broken group), then by force.

        Safe to call more than once.
        """
        for commands, process in zip(self.commands, self.processes, strict=True):
            if process.is_alive() and not force:
                try:
                    commands.put(("stop", None))
                except (OSError, ValueError):
                    pass
        deadline = time.monotonic() + (0.0 if force else 5.0)
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in self.processes:
            if process.is_alive():
                process.kill()
                process.join(5.0)
        for channel in [*self.commands, self.results]:
            channel.close()
            channel.join_thread()
        self.processes, self.commands = [], []
        WorkerGroup._running.discard(self)
        if self._rendezvous:
            shutil.rmtree(self._rendezvous, ignore_errors=True)
            self._rendezvous = None

    # ---- jobs -------------------------------------------------------------------------------------
    def run(self, job: Job, on_event: Callable[[Any], None]) -> dict[str, Any]:
        """Runs one job on every rank; returns rank 0's payload with every rank's counters."""
        if not self.alive():
            raise WorkerFailure("The worker group is not running.")
        for commands in self.commands:
            commands.put(("run", job))
        payloads: dict[int, dict[str, Any]] = {}
        cancelled: set[int] = set()
        errors: dict[int, str] = {}
        deadline = None
        while len(payloads) + len(cancelled) + len(errors) < self.world_size:
            message = self._next(deadline, "running the job")
            if message is None:  # peers of a failed rank are stuck in a collective
                self.shutdown(force=True)
                break
            kind, rank, body = message
            if kind == "event":
                if getattr(body, "job_id", None) == job.job_id:
                    on_event(body)
            elif kind == "done":
                payloads[rank] = body
            elif kind == "cancelled":
                cancelled.add(rank)
            elif kind == "error":
                errors[rank] = body
                deadline = time.monotonic() + ERROR_GRACE_S
        if errors:
            rank = min(errors)
            where = f"The job failed on rank {rank} ({self.devices[rank]}): {errors[rank]}"
            if "Fix:" in errors[rank]:
                raise UserError(where)
            raise UserError(
                where, "Run it again with PARASTEP_DEBUG=1 for the full trace; report it if it repeats."
            )
        if cancelled:
            raise JobCancelled()  # every rank agreed on it, so the group stays usable
        result = payloads[0]
        result["ranks"] = [payloads[r]["counters"] for r in range(self.world_size)]
        result["rank_timings"] = [payloads[r]["timings"] for r in range(self.world_size)]
        return result

    def _next(self, deadline: float | None, doing: str) -> tuple | None:
        """The next message, or None once `deadline` passed; WorkerFailure if a worker died."""
        while True:
            try:
                return self.results.get(timeout=POLL_S)
            except queue.Empty:
                pass
            # A dead worker before the deadline: callers poll with short deadlines (e.g. the load
            # loop, which also watches for a cancel), so a death must not wait for a long one.
            dead = [(r, p) for r, p in enumerate(self.processes) if not p.is_alive()]
            if dead:
                try:  # a last message may still be in flight (e.g. the error that made it exit)
                    return self.results.get(timeout=1.0)
                except queue.Empty:
                    pass
                self.shutdown(force=True)
                rank, process = dead[0]
                raise WorkerFailure(
                    f"Worker {rank} ({self.devices[rank]}) died while {doing} "
                    f"(exit code {process.exitcode}). The worker group was stopped; "
                    "the next job starts a new one."
                )
            if deadline is not None and time.monotonic() > deadline:
                return None
