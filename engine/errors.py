"""Errors a user can act on: each names the problem and the fix."""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    """Bad input or an unusable environment; the message says what is wrong and how to fix it.

    `fix` is worded for the command line (it names flags). `field` names the request field at fault
    (e.g. "frames", "devices", "strategy_options.warmup") and `value` the value that fixes it, when
    there is one: the window words the same fix with its own control names ("Set Frames to 9").
    """

    def __init__(self, problem: str, fix: str = "", field: str | None = None, value: Any = None) -> None:
        self.problem = problem
        self.fix = fix
        self.field = field
        self.value = value
        super().__init__(f"{problem} Fix: {fix}" if fix else problem)

    def to_dict(self) -> dict[str, Any]:
        """The error for the protocol: JSON-safe, with the structured fix."""
        return {"problem": self.problem, "fix": self.fix, "field": self.field, "value": self.value}


class JobCancelled(Exception):
    """Raised inside a worker when the user cancelled the running job."""


class WorkerFailure(Exception):
    """A worker process died or a collective timed out; the worker group must be restarted."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) stopped a job after its final latents were kept; says where, and the fix."""


def out_of_memory(exc: BaseException) -> bool:
    """A failed allocation: torch's OutOfMemoryError (GPUs), or the RuntimeError the CPU allocator
    raises instead ("DefaultCPUAllocator: can't allocate memory"), or Python's MemoryError."""
    return (
        type(exc).__name__ == "OutOfMemoryError"
        or isinstance(exc, MemoryError)
        or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc))
    )
