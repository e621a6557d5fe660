"""Where the engine's local socket lives, and the private folder around it.

Standard library only: the window imports this to find the engine it starts.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from engine.errors import UserError

SOCKET_ENV = "PARASTEP_ENGINE_SOCKET"
# sockaddr_un.sun_path holds 108 bytes on Linux, including the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107


def _uid() -> int:
    return os.getuid() if hasattr(os, "getuid") else 0


def default_socket_path() -> Path:
    """`$PARASTEP_ENGINE_SOCKET` if set; else `$XDG_RUNTIME_DIR/parastep-studio/engine-<uid>.sock`;
    else `<temp dir>/parastep-studio-<uid>/engine.sock`."""
    override = os.environ.get(SOCKET_ENV, "").strip()
    if override:
        return Path(override).expanduser().absolute()
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if os.path.isabs(runtime) and os.path.isdir(runtime):
        return Path(runtime) / "parastep-studio" / f"engine-{_uid()}.sock"
    return Path(tempfile.gettempdir()) / f"parastep-studio-{_uid()}" / "engine.sock"


def prepare_socket_folder(path: Path) -> None:
    """Creates the socket's folder with mode 0700, or checks that an existing one is ours and private
    (it is never chmod-ed: the user may have named a shared folder)."""
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
        raise UserError(
            f"The socket path {path} is longer than the {MAX_SOCKET_PATH_BYTES} bytes a local socket allows.",
            "Pick a shorter --socket path.",
        )
    folder = path.parent
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = folder.lstat()
    except OSError as exc:
        raise UserError(
            f"The socket folder {folder} cannot be created ({exc.strerror}).",
            "Pick a --socket path in a writable folder.",
        ) from None
    if not stat.S_ISDIR(info.st_mode):
        raise UserError(f"{folder} is not a folder.", "Pick another --socket path.")
    if info.st_uid != _uid():
        raise UserError(
            f"The socket folder {folder} belongs to another user.",
            "Pick a --socket path in a folder of your own.",
        )
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise UserError(
            f"The socket folder {folder} can be opened by other users (mode "
            f"{stat.S_IMODE(info.st_mode):03o}); the engine only listens in a private folder.",
            f"Run `chmod 700 {folder}` or pick a --socket path in a new folder.",
        )
