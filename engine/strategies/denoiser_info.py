"""What a model's denoiser is, from its config file alone: the class, and an empty skeleton of it.

Strategies that rely on what diffusers supports for a denoiser class (caches, context parallelism)
answer `unavailable_reason` from these, before any weights are loaded. The skeleton is built on
PyTorch's meta device: the module tree of the real model, with no memory behind its tensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DENOISER_COMPONENTS = ("transformer", "unet")


def denoiser_folder(path: Path) -> Path | None:
    """The pipeline's transformer folder, else its UNet's: the first with a config.json (None without)."""
    for component in DENOISER_COMPONENTS:
        folder = Path(path) / component
        if (folder / "config.json").is_file():
            return folder
    return None


def denoiser_config(path: Path) -> dict[str, Any]:
    """The config of the pipeline's transformer, else its UNet ({} when neither config can be read)."""
    folder = denoiser_folder(path)
    if folder is None:
        return {}
    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def denoiser_class_name(path: Path) -> str | None:
    """`_class_name` of the pipeline's transformer, else its UNet (None when neither config exists)."""
    return denoiser_config(path).get("_class_name")


def denoiser_class(path: Path) -> type | None:
    """The diffusers class of the denoiser, or None when this diffusers does not know it."""
    import diffusers

    name = denoiser_class_name(path)
    return getattr(diffusers, name, None) if name else None


def denoiser_skeleton(path: Path) -> Any | None:
    """A meta-device instance of the denoiser built from its config (None if it cannot be built)."""
    import torch

    cls = denoiser_class(path)
    config = denoiser_config(path)
    if cls is None or not config:
        return None
    try:
        with torch.device("meta"):
            return cls.from_config(config)
    except Exception:  # a constructor that computes on its tensors cannot run on meta
        return None


def config_mtime(path: Path) -> float:
    """When the denoiser's config file last changed (0 without one): part of cache keys."""
    folder = denoiser_folder(path)
    return (folder / "config.json").stat().st_mtime if folder else 0.0


def weights_stamp(path: Path) -> str:
    """Size and modification time of each of the denoiser's weight files ("" without any): part of the
    keys of what is recorded per model, so that weights retrained in the same folder are not taken for
    the old ones."""
    folder = denoiser_folder(path)
    if folder is None:
        return ""
    files = sorted([*folder.glob("*.safetensors"), *folder.glob("*.bin")])  # .bin: pickle-allowed folders
    return ",".join(_file_stamp(f) for f in files)


def _file_stamp(file: Path) -> str:
    try:
        stat = file.stat()
    except OSError:  # a dangling link (an incomplete cache snapshot): loading will name the problem
        return f"{file.name}:missing"
    return f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}"
