"""Where an output path that did not come from the user's own command line may point.

A clip path typed on the CLI (`--output`) is the user's choice and is used as given. A path that
arrives in data instead - a request on the engine socket (the window fills it from a sidecar it
restored), a sidecar or a latents file - must resolve, with `..` and symlinks followed, inside an
output folder: the default one (`engine.outputs.default_output_dir()`) or a folder the user chose
(the window registers its chosen folder with the engine). So a hand-edited or downloaded sidecar
cannot make the engine write anywhere else.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from engine.errors import UserError


def expand_user(path: str | os.PathLike[str]) -> Path:
    """`Path(path).expanduser()`, with a UserError for `~name` of a user this system does not know
    (pathlib raises RuntimeError there)."""
    try:
        return Path(path).expanduser()
    except RuntimeError:
        raise UserError(
            f"The path '{path}' starts with the home folder of a user this system does not know.",
            "Give the folder as an absolute path.",
        ) from None


def resolved(path: str | os.PathLike[str]) -> Path:
    """`path` made absolute with `~`, `..` and every symlink of its existing part resolved."""
    return Path(os.path.realpath(expand_user(path)))


def is_inside(path: str | os.PathLike[str], folder: str | os.PathLike[str]) -> bool:
    target, root = resolved(path), resolved(folder)
    return target == root or target.is_relative_to(root)


def check_output_inside(output: str | None, folders: Iterable[str | os.PathLike[str]], source: str) -> None:
    """Raises UserError unless `output` (None: the default folder) lies inside one of `folders`.

    `source` says where the path came from, for the message (e.g. "the request", "the latents file").
    """
    if output is None or not output.strip():
        return
    allowed = [Path(folder) for folder in folders]
    names = ", ".join(str(folder) for folder in allowed) or "none"
    if not expand_user(output).is_absolute():
        raise UserError(
            f"The 'output' of {source} is '{output}', a relative path; paths that come from a request "
            f"or a sidecar must be absolute and inside an output folder ({names}).",
            "Leave 'output' empty so the clip goes to the output folder, or give a folder inside it.",
        )
    target = resolved(output)
    if any(is_inside(target, folder) for folder in allowed):
        return
    raise UserError(
        f"The 'output' of {source} is '{output}', which resolves to {target}, outside the output "
        f"folder(s) {names}; clips from requests and sidecars are only written there.",
        "Leave 'output' empty, pick a folder inside the output folder, or choose that folder as the "
        "output folder (window: File > Choose output folder; command line: --output).",
    )
