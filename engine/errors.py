"""Errors a user can act on: each names the problem and the fix."""


class UserError(Exception):
    """Bad input or an unusable environment; the message says what is wrong and how to fix it."""

    def __init__(self, problem: str, fix: str = "") -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} Fix: {fix}" if fix else problem)


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
