"""The engine's job queue, saved on disk after every change so that it survives a crash.

The file is `$XDG_STATE_HOME/parastep-studio/queue.json` (`~/.local/state/...` by default;
`$PARASTEP_STATE_DIR` replaces the folder). It is replaced atomically (temporary file, then
`os.replace`). A job found `running` when the file is loaded was cut off by a crash: it becomes
`interrupted`. A file that cannot be read is moved aside (`queue.json.corrupt-<timestamp>`) and
reported, never silently dropped.

Thread-safe: the engine's socket thread and its runner thread both use one queue. Methods return
copies of the jobs, never the stored objects. Imports neither torch nor Qt.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.errors import UserError
from engine.wire import check_plain, loads_strict

QUEUE_MAX_DEPTH = 64  # a job's result nests a few levels deeper than any message

QUEUE_FORMAT = "parastep-studio/queue"
QUEUE_FORMAT_VERSION = 1
STATE_DIR_ENV = "PARASTEP_STATE_DIR"
QUEUE_FILE = "queue.json"

QUEUED, RUNNING, DONE, FAILED, CANCELLED, INTERRUPTED = (
    "queued",
    "running",
    "done",
    "failed",
    "cancelled",
    "interrupted",
)
STATUSES = (QUEUED, RUNNING, DONE, FAILED, CANCELLED, INTERRUPTED)
REQUEUEABLE = (INTERRUPTED, FAILED, CANCELLED)
INTERRUPTED_ERROR = "The engine stopped while this job ran. Fix: requeue it to run it again."
MAX_JOBS = 1000  # jobs in the queue, finished ones included: each change rewrites the whole file
MAX_COMPARE = 32  # [strategy, devices] pairs in one comparison


def default_state_dir() -> Path:
    """`$PARASTEP_STATE_DIR`, else `$XDG_STATE_HOME/parastep-studio` (default `~/.local/state`)."""
    override = os.environ.get(STATE_DIR_ENV, "").strip()
    if override:
        return Path(override).expanduser().absolute()
    state_home = os.environ.get("XDG_STATE_HOME", "")
    base = Path(state_home) if os.path.isabs(state_home) else Path.home() / ".local" / "state"
    return base / "parastep-studio"


def default_queue_path() -> Path:
    return default_state_dir() / QUEUE_FILE


@dataclass
class Job:
    job_id: str
    status: str
    request: dict[str, Any]  # a GenerationRequest dict
    compare: list[list[str]] | None = None  # [[strategy, devices], ...] for a comparison
    error: str | None = None  # one line: problem and fix
    result: dict[str, Any] | None = None  # the generate --json (or compare --json) object

    def to_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "status": self.status,
            "request": self.request,
            "compare": self.compare,
            "error": self.error,
            "result": self.result,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Job:
        """A job from the queue file; raises ValueError naming what is wrong."""
        if not isinstance(data, dict):
            raise ValueError("a job is not a JSON object")
        check_plain(data, QUEUE_MAX_DEPTH)
        job_id, status = data.get("job_id"), data.get("status")
        if not isinstance(job_id, str) or not job_id:
            raise ValueError("a job has no job_id")
        if status not in STATUSES:
            raise ValueError(f"job {job_id} has unknown status {status!r}")
        if not isinstance(data.get("request"), dict):
            raise ValueError(f"job {job_id} has no request object")
        compare = data.get("compare")
        if compare is not None and not _valid_specs(compare):
            raise ValueError(f"job {job_id} has a bad compare list")
        error, result = data.get("error"), data.get("result")
        if error is not None and not isinstance(error, str):
            raise ValueError(f"job {job_id} has a bad error field")
        if result is not None and not isinstance(result, dict):
            raise ValueError(f"job {job_id} has a bad result field")
        return cls(job_id, status, data["request"], compare, error, result)


def _valid_specs(specs: Any) -> bool:
    return (
        isinstance(specs, list)
        and 0 < len(specs) <= MAX_COMPARE
        and all(
            isinstance(s, list | tuple) and len(s) == 2 and all(isinstance(x, str) for x in s) for s in specs
        )
    )


def check_compare_specs(specs: Any) -> list[list[str]] | None:
    """`compare` of a submit message: None, or a non-empty list of [strategy, devices] pairs."""
    if specs is None:
        return None
    if not _valid_specs(specs):
        raise UserError(
            f"'compare' is {repr(specs)[:200]}; it must be a list of 1 to {MAX_COMPARE} [strategy, devices] "
            "pairs.",
            'Send e.g. [["sequential", "cpu:1"], ["parastep", "cpu:2"]] or leave it out.',
        )
    return [[name, devices] for name, devices in specs]


def _stderr_report(message: str) -> None:
    print(f"parastep-engine: {message}", file=sys.stderr, flush=True)


class JobQueue:
    """Ordered jobs: queued ones run first to last; finished ones stay until removed."""

    def __init__(
        self, path: Path | str | None = None, on_problem: Callable[[str], None] = _stderr_report
    ) -> None:
        self.path = Path(path) if path is not None else default_queue_path()
        self.on_problem = on_problem
        self.notices: list[str] = []  # problems found when loading, for every client that connects
        self._lock = threading.RLock()
        self._jobs: list[Job] = []
        self._save_failing = False  # reported once when saving starts failing, and once when it works again
        self._load()

    # ---- reading -----------------------------------------------------------------------------------
    def jobs(self) -> list[Job]:
        with self._lock:
            return [copy.deepcopy(job) for job in self._jobs]

    def to_list(self) -> list[dict[str, Any]]:
        with self._lock:
            return [copy.deepcopy(job.to_dict()) for job in self._jobs]

    def get(self, job_id: str) -> Job:
        with self._lock:
            return copy.deepcopy(self._find(job_id))

    def running(self) -> Job | None:
        with self._lock:
            return next((copy.deepcopy(j) for j in self._jobs if j.status == RUNNING), None)

    # ---- changes (each one saved) ----------------------------------------------------------------
    def submit(self, request: dict[str, Any], compare: list[list[str]] | None = None) -> Job:
        """Appends a queued job and returns it."""
        job = Job(uuid.uuid4().hex[:12], QUEUED, copy.deepcopy(request), check_compare_specs(compare))
        with self._lock:
            if len(self._jobs) >= MAX_JOBS:
                raise UserError(
                    f"The queue already holds {len(self._jobs)} jobs (at most {MAX_JOBS}).",
                    "Remove finished jobs, or wait for queued ones to run.",
                )
            self._jobs.append(job)
            self._save()
            return copy.deepcopy(job)

    def reorder(self, job_ids: list[str]) -> None:
        """Puts the queued jobs in the order of `job_ids`, in the places queued jobs hold.

        Queued jobs not named (e.g. submitted meanwhile by another window) follow the named ones in
        their current order.
        """
        if not isinstance(job_ids, list) or not all(isinstance(i, str) for i in job_ids):
            raise UserError("'job_ids' must be a list of job ids.", "Send the queued jobs' ids in order.")
        if len(set(job_ids)) != len(job_ids):
            raise UserError("'job_ids' names a job more than once.", "Name each queued job once.")
        with self._lock:
            for job_id in job_ids:
                job = self._find(job_id)
                if job.status != QUEUED:
                    raise UserError(
                        f"Job {job_id} is {job.status}, not queued; only queued jobs can be reordered.",
                        "Leave it out of 'job_ids'.",
                    )
            slots = [i for i, job in enumerate(self._jobs) if job.status == QUEUED]
            named = [self._find(job_id) for job_id in job_ids]
            rest = [self._jobs[i] for i in slots if self._jobs[i].job_id not in set(job_ids)]
            for slot, job in zip(slots, [*named, *rest], strict=True):
                self._jobs[slot] = job
            self._save()

    def remove(self, job_id: str) -> Job:
        """Removes a job that is not running (queued, or finished in any way); returns it."""
        with self._lock:
            job = self._find(job_id)
            if job.status == RUNNING:
                raise UserError(f"Job {job_id} is running.", "Cancel it first, then remove it.")
            self._jobs.remove(job)
            self._save()
            return job

    def requeue(self, job_id: str) -> Job:
        """Queues an interrupted, failed or cancelled job again, at the end."""
        with self._lock:
            job = self._find(job_id)
            if job.status not in REQUEUEABLE:
                raise UserError(
                    f"Job {job_id} is {job.status}; only interrupted, failed or cancelled jobs can be "
                    "requeued.",
                    {
                        DONE: "Submit its request again to run it once more.",
                        QUEUED: "It is already queued.",
                        RUNNING: "It is running now.",
                    }[job.status],
                )
            self._jobs.remove(job)
            job.status, job.error, job.result = QUEUED, None, None
            self._jobs.append(job)
            self._save()
            return copy.deepcopy(job)

    def start_next(self) -> Job | None:
        """Marks the first queued job running and returns it; None if nothing is queued (or one runs)."""
        with self._lock:
            if any(job.status == RUNNING for job in self._jobs):
                return None
            job = next((j for j in self._jobs if j.status == QUEUED), None)
            if job is None:
                return None
            job.status = RUNNING
            self._save()
            return copy.deepcopy(job)

    def finish(
        self, job_id: str, status: str, error: str | None = None, result: dict[str, Any] | None = None
    ) -> None:
        """Ends the running job: done (with its result), failed (with its error), cancelled, interrupted."""
        if status not in (DONE, FAILED, CANCELLED, INTERRUPTED):
            raise ValueError(f"not a final status: {status}")
        with self._lock:
            job = self._find(job_id)
            job.status, job.error, job.result = status, error, copy.deepcopy(result)
            self._save()

    # ---- storage ----------------------------------------------------------------------------------
    def _find(self, job_id: str) -> Job:
        for job in self._jobs:
            if job.job_id == job_id:
                return job
        raise UserError(f"There is no job {job_id!r} in the queue.", "Ask for the queue and use its ids.")

    def _load(self) -> None:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        except OSError as exc:
            self._report(f"The queue file {self.path} could not be read ({exc.strerror}); starting empty.")
            return
        try:
            jobs = self._parse(text)
        except (ValueError, RecursionError) as exc:
            aside = self._move_aside()
            where = f"it was moved to {aside}" if aside else "it could not be moved aside"
            self._report(
                f"The queue file {self.path} is damaged ({exc}); {where} and a new, empty queue was started."
            )
            return
        interrupted = False
        for job in jobs:
            if job.status == RUNNING:
                job.status, job.error = INTERRUPTED, INTERRUPTED_ERROR
                interrupted = True
        self._jobs = jobs
        if interrupted:
            self._save()

    @staticmethod
    def _parse(text: str) -> list[Job]:
        # Strict: a NaN or a lone surrogate written by an older engine would fail every later save
        # and every `queue` reply, so such a file is moved aside like any damaged one.
        data = loads_strict(text, QUEUE_MAX_DEPTH)
        if not isinstance(data, dict) or data.get("format") != QUEUE_FORMAT:
            raise ValueError("not a ParaStep Studio queue file")
        version = data.get("version")
        if not isinstance(version, int) or version > QUEUE_FORMAT_VERSION:
            raise ValueError(f"queue format {version!r} is newer than this engine reads")
        if not isinstance(data.get("jobs"), list):
            raise ValueError("it has no job list")
        jobs = [Job.from_dict(item) for item in data["jobs"]]
        ids = [job.job_id for job in jobs]
        if len(set(ids)) != len(ids):
            raise ValueError("a job id appears twice")
        return jobs

    def _move_aside(self) -> Path | None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        counter = 1
        while aside.exists():
            counter += 1
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{counter}")
        try:
            os.replace(self.path, aside)
        except OSError:
            return None
        return aside

    def _save(self) -> None:
        data = {
            "format": QUEUE_FORMAT,
            "version": QUEUE_FORMAT_VERSION,
            "jobs": [job.to_dict() for job in self._jobs],
        }
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(data, handle, indent=1, allow_nan=False)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
            tmp = None
            if self._save_failing:
                self._save_failing = False
                self.on_problem(f"The queue is saved to {self.path} again.")
        except (OSError, ValueError, RecursionError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            if not self._save_failing:  # an alarm, not a flood: every change would repeat it
                self._save_failing = True
                self.on_problem(
                    f"The queue could not be saved to {self.path} ({reason}); it is kept in memory only "
                    "and lost if the engine stops. Fix: free disk space or make the folder writable."
                )
        finally:
            if tmp is not None:
                try:
                    os.unlink(tmp)
                except OSError:
                    pass

    def _report(self, message: str) -> None:
        self.notices.append(message)
        self.on_problem(message)
