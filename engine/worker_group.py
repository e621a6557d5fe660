"""A group of worker processes, one per device, joined in one torch.distributed group.

The group stays warm between jobs with the same model and devices. A dead worker or a collective
that timed out breaks the group: the job fails with a clear message and the group is torn down so
that the next job starts a fresh one. No process outlives the group, and no worker outlives the
engine (engine.worker_entry). A stalled rank that no collective time-out catches (a single worker,
rank 0's decode) is caught by a progress watchdog.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import queue
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

from engine.catalog import ModelEntry
from engine.errors import Interrupted, JobCancelled, UserError, WorkerFailure
from engine.pending_decode import decode_command
from engine.protocol import StageEvent, StepEvent
from engine.worker import Job, WorkerSpec, worker_main
from engine.worker_entry import WorkerEntry

POLL_S = 0.2
DEFAULT_COLLECTIVE_TIMEOUT_S = float(os.environ.get("PARASTEP_COLLECTIVE_TIMEOUT_S", "30"))
LOAD_TIMEOUT_S = float(os.environ.get("PARASTEP_LOAD_TIMEOUT_S", "900"))
ERROR_GRACE_S = 2.0  # after one rank fails, how long its peers get to report before they are stopped
# While a job runs, no message from any rank for max(floor, factor x the slowest step seen) means a
# stalled rank, unless a CPU worker's CPU time grew meanwhile (slow, not stalled: a full-size model's
# step on a CPU takes minutes). Generous on purpose: a false alarm throws a run away. Read at every job.
WATCHDOG_FACTOR_ENV, DEFAULT_WATCHDOG_FACTOR = "PARASTEP_WATCHDOG_FACTOR", 30.0
WATCHDOG_FLOOR_ENV, DEFAULT_WATCHDOG_FLOOR_S = "PARASTEP_WATCHDOG_FLOOR_S", 300.0
RENDEZVOUS_PREFIX = "parastep-rendezvous-"  # then the engine's PID, so a stale folder can be told apart
BUSY_CPU_SHARE = 0.02  # of the quiet time, spent computing: far above a worker that waits or is stopped
STAGE_DOING = {"encode": "encoding the prompt", "denoise": "denoising", "decode": "decoding"}


def watchdog_settings() -> tuple[float, float]:
    """(factor, floor in seconds) of the progress watchdog."""
    factor = float(os.environ.get(WATCHDOG_FACTOR_ENV) or DEFAULT_WATCHDOG_FACTOR)
    return factor, float(os.environ.get(WATCHDOG_FLOOR_ENV) or DEFAULT_WATCHDOG_FLOOR_S)


def clean_stale_rendezvous(folder: Path | None = None) -> list[Path]:
    """Removes the rendezvous folders of engines that are gone (one killed by SIGKILL cannot)."""
    removed = []
    for path in Path(folder or tempfile.gettempdir()).glob(RENDEZVOUS_PREFIX + "*"):
        owner = path.name[len(RENDEZVOUS_PREFIX) :].split("-", 1)[0]
        try:
            mine = path.is_dir() and path.stat().st_uid == os.getuid()
        except OSError:
            continue
        if mine and owner.isdigit() and not _pid_alive(int(owner)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _cpu_seconds(pid: int | None) -> float:
    """CPU time (user + system) a process used so far; 0 if unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def _process_state(pid: int | None) -> str:
    """The kernel's one-letter state: R running, S sleeping, T stopped, ... ("?" if unknown)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "?"


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
        self.pending: Path | None = None  # the running job's final latents, once rank 0 kept them
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
        clean_stale_rendezvous()
        try:
            self._start()
        except BaseException:  # cancelled, failed or interrupted (Ctrl-C, SIGTERM): leave nothing behind
            self.shutdown(force=True)
            raise

    def _start(self) -> None:
        init = None
        if self.world_size > 1:  # a file store in a private folder: no port to pick, nothing listening
            self._rendezvous = tempfile.mkdtemp(prefix=f"{RENDEZVOUS_PREFIX}{os.getpid()}-")
            init = f"file://{self._rendezvous}/store"
        start = time.perf_counter()
        WorkerGroup._running.add(self)
        for rank, device in enumerate(self.devices):
            spec = WorkerSpec(
                rank, self.world_size, device, init, self.collective_timeout_s, self.entry, self.dtype
            )
            commands = self._ctx.Queue()
            process = self._ctx.Process(
                target=WorkerEntry(os.getpid()),
                args=(worker_main, spec, commands, self.results, self.cancel),
                name=f"parastep-worker-{rank}",
                daemon=True,
            )
            process.start()
            self.commands.append(commands)
            self.processes.append(process)
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
                late = [r for r in range(self.world_size) if r not in loaded]
                rank = self._stalled_rank(late, {r: 0 for r in late}, {r: 0.0 for r in late})
                self.shutdown(force=True)
                raise WorkerFailure(
                    f"Loading '{self.entry.name}' took more than {LOAD_TIMEOUT_S:.0f} s; rank {rank} "
                    f"({self.devices[rank]}) had not finished, and the workers were stopped. Fix: check that "
                    "the process was not paused or starved (a stopped or suspended process, a hung "
                    "driver, heavy swapping); on a machine that is just this slow, raise "
                    "PARASTEP_LOAD_TIMEOUT_S."
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
        self._remove_rendezvous()

    def _remove_rendezvous(self) -> None:
        if self._rendezvous:
            shutil.rmtree(self._rendezvous, ignore_errors=True)
            self._rendezvous = None

    # ---- jobs -------------------------------------------------------------------------------------
    def run(self, job: Job, on_event: Callable[[Any], None]) -> dict[str, Any]:
        """Runs one job on every rank; returns rank 0's payload with every rank's counters."""
        if not self.alive():
            raise WorkerFailure("The worker group is not running.")
        self.pending = None
        for commands in self.commands:
            commands.put(("run", job))
        try:
            return self._collect(job, on_event)
        except KeyboardInterrupt:
            if self.pending is None:
                raise
            raise Interrupted(
                f"The final latents are kept in {self.pending}. Fix: run "
                f"`{decode_command(self.pending, job.request)}` to save the clip."
            ) from None

    def _collect(self, job: Job, on_event: Callable[[Any], None]) -> dict[str, Any]:
        payloads: dict[int, dict[str, Any]] = {}
        cancelled: set[int] = set()
        errors: dict[int, str] = {}
        peer_errors: dict[int, str] = {}  # a collective failed there: most likely a peer's fault
        factor, floor = watchdog_settings()
        heard = dict.fromkeys(range(self.world_size), time.monotonic())  # each rank's last message
        steps = dict.fromkeys(range(self.world_size), 0)
        last_step: dict[int, float] = {}
        slowest_step = 0.0
        cpu = {r: _cpu_seconds(p.pid) for r, p in enumerate(self.processes)}  # at each rank's last sign
        stage = "starting the job"
        deadline = None
        while len(payloads) + len(cancelled) + len(errors) + len(peer_errors) < self.world_size:
            quiet_limit = max(floor, factor * slowest_step)
            stalled_at = max(heard.values()) + quiet_limit
            message = self._next(
                stalled_at if deadline is None else min(deadline, stalled_at), "running the job"
            )
            if message is None and deadline is not None and time.monotonic() >= deadline:
                silent = [
                    r for r in heard if r not in payloads and r not in cancelled and r not in peer_errors
                ]
                if peer_errors and not errors and silent:  # they waited in a collective for a stalled rank
                    waiting = min(peer_errors)
                    raise self._stall(
                        job,
                        silent,
                        steps,
                        heard,
                        stage,
                        f"rank {waiting} waited {self.collective_timeout_s:.0f} s for it in a collective",
                        "raise PARASTEP_COLLECTIVE_TIMEOUT_S",
                    )
                self.shutdown(force=True)  # peers of a failed rank are stuck in a collective
                break
            if message is None:
                silent = [r for r in heard if r not in payloads and r not in cancelled]
                quiet = time.monotonic() - max(heard.values())
                busy = [
                    r
                    for r in silent
                    if self.devices[r] == "cpu"
                    and _cpu_seconds(self.processes[r].pid) - cpu[r] > BUSY_CPU_SHARE * quiet
                ]
                if busy:  # computing: a sign of progress
                    for r in busy:
                        heard[r], cpu[r] = time.monotonic(), _cpu_seconds(self.processes[r].pid)
                    continue
                raise self._stall(
                    job,
                    silent,
                    steps,
                    heard,
                    stage,
                    f"no rank reported anything for {quiet:.0f} s",
                    f"raise {WATCHDOG_FLOOR_ENV} (now {floor:g} s) or {WATCHDOG_FACTOR_ENV} (now {factor:g})",
                )
            kind, rank, body = message
            heard[rank] = now = time.monotonic()
            cpu[rank] = _cpu_seconds(self.processes[rank].pid)
            if kind == "event" and getattr(body, "job_id", None) == job.job_id:  # not a stale job's
                if isinstance(body, StepEvent):
                    if rank in last_step:
                        slowest_step = max(slowest_step, now - last_step[rank])
                    last_step[rank], steps[rank] = now, body.step + 1
                elif isinstance(body, StageEvent):
                    stage = STAGE_DOING.get(body.stage, stage)
                on_event(body)
            elif kind == "pending":
                self.pending = Path(body)
            elif kind == "done":
                payloads[rank] = body
            elif kind == "cancelled":
                cancelled.add(rank)
            elif kind in ("error", "peer_error"):
                (errors if kind == "error" else peer_errors)[rank] = body
                deadline = time.monotonic() + ERROR_GRACE_S
        if peer_errors and not errors:
            rank = min(peer_errors)
            self.shutdown(force=True)
            raise WorkerFailure(
                f"The ranks lost contact with each other while {stage} (rank {rank}, {self.devices[rank]}: "
                f"{peer_errors[rank]}); the worker group was stopped and the next job starts a new one. "
                "Fix: run it again; if it repeats, run it with PARASTEP_DEBUG=1 and report it."
            )
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

    def _stalled_rank(self, candidates: list[int], steps: dict[int, int], heard: dict[int, float]) -> int:
        """The rank to blame among those that went quiet: a stopped process first, then the one that is
        behind (fewest steps), then one that runs (its peers sleep in a collective), then the quietest."""
        states = {
            r: _process_state(self.processes[r].pid if r < len(self.processes) else None) for r in candidates
        }
        return min(candidates, key=lambda r: (states[r] not in "Tt", steps[r], states[r] != "R", heard[r], r))

    def _stall(
        self,
        job: Job,
        candidates: list[int],
        steps: dict[int, int],
        heard: dict[int, float],
        stage: str,
        evidence: str,
        knob: str,
    ) -> WorkerFailure:
        """Stops the group; the error names the stalled rank, the kept latents and the fix."""
        rank = self._stalled_rank(candidates, steps, heard)
        self.shutdown(force=True)
        problem = (
            f"Rank {rank} ({self.devices[rank]}) stopped making progress while {stage} ({evidence}; its "
            f"last step was {steps[rank]} of {job.request.steps}). The worker group was stopped; the next "
            "job starts a new one."
        )
        fix = (
            "Check that the process was not paused or starved (a stopped or suspended process, a hung "
            "driver, heavy swapping)"
        )
        if self.pending is not None:
            problem += f" The final latents are kept in {self.pending}."
            fix += f", then run `{decode_command(self.pending, job.request)}` to save the clip"
        return WorkerFailure(f"{problem} Fix: {fix}; on a machine that is just this slow, {knob}.")

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


@atexit.register
def _remove_rendezvous_at_exit() -> None:
    """An engine that exits without stopping its groups (e.g. SystemExit from a signal) removes their
    rendezvous folders anyway; its workers die with it."""
    for group in list(WorkerGroup._running):
        group._remove_rendezvous()
