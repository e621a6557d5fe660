"""The engine's log file: where library warnings go (not the window's Engine panel).

Libraries (diffusers, transformers, torch) warn about deprecations on every load; useful to whoever
debugs, noise to whoever makes clips. The engine process and its workers append them to
`<state folder>/engine.log` (`PARASTEP_LOG_FILE` overrides), named in the window's About box.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

LOG_FILE_ENV = "PARASTEP_LOG_FILE"
LOG_NAME = "engine.log"
MAX_LOG_BYTES = 5 * 2**20  # past this the file starts again (one old copy is kept)


def log_path() -> Path:
    from engine.job_queue import default_state_dir

    override = os.environ.get(LOG_FILE_ENV, "").strip()
    return Path(override).expanduser() if override else default_state_dir() / LOG_NAME


def write_log(line: str) -> None:
    path = log_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if path.exists() and path.stat().st_size > MAX_LOG_BYTES:
            path.replace(path.with_name(path.name + ".1"))
        with open(path, "a", encoding="utf-8", errors="backslashreplace") as log:
            log.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} [{os.getpid()}] {line.rstrip()}\n")
    except OSError:
        pass  # a log that cannot be written must not stop a job


def route_warnings() -> None:
    """Warnings of this process go to the log file; workers inherit the path through the environment."""
    os.environ.setdefault(LOG_FILE_ENV, str(log_path()))

    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        write_log(warnings.formatwarning(message, category, filename, lineno, line).strip())

    warnings.showwarning = show
