"""The checkpoints ParaStep Studio knows how to get (resources/checkpoints.json) and the ones installed.

A pulled model lives in `models_dir()/ORG--NAME/`, a diffusers folder with a manifest
(`.parastep-download.json`) that is written before the folder is moved into place: a folder without
it is never offered. Standard library only (the window imports this module).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from engine.errors import UserError
from resources import RESOURCES_DIR

CHECKPOINTS_FILE = RESOURCES_DIR / "checkpoints.json"
MANIFEST = ".parastep-download.json"
STAGING = ".staging"  # inside models_dir(): downloads in progress, and folders being deleted


@dataclass(frozen=True)
class Checkpoint:
    name: str
    hub_id: str
    revision: str
    family: str
    modality: str
    variant: str | None
    size_bytes: int
    gpu_memory_gb: float
    licence: str
    gated: bool
    notes: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_checkpoints(path: Path = CHECKPOINTS_FILE) -> list[Checkpoint]:
    data = json.loads(path.read_text())
    return [Checkpoint(**item) for item in data["checkpoints"]]


def find_checkpoint(name_or_hub_id: str) -> Checkpoint | None:
    for checkpoint in load_checkpoints():
        if name_or_hub_id in (checkpoint.name, checkpoint.hub_id):
            return checkpoint
    return None


def models_dir() -> Path:
    """`$PARASTEP_MODELS_DIR`, else `$XDG_DATA_HOME/parastep-studio/models` (`~/.local/share`)."""
    if os.environ.get("PARASTEP_MODELS_DIR"):
        return Path(os.environ["PARASTEP_MODELS_DIR"]).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(data_home) / "parastep-studio" / "models"


def folder_for(hub_id: str) -> Path:
    return models_dir() / hub_id.replace("/", "--")


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest of a complete, verified download; None for anything else."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("hub_id") else None


def installed_models() -> list[tuple[Path, dict[str, Any]]]:
    """(folder, manifest) of every complete download, by folder name."""
    root = models_dir()
    if not root.is_dir():
        return []
    found = []
    for folder in sorted(root.iterdir()):
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        manifest = read_manifest(folder)
        if manifest is not None and (folder / "model_index.json").is_file():
            found.append((folder, manifest))
    return found


def find_installed(name_or_hub_id: str) -> tuple[Path, dict[str, Any]] | None:
    for folder, manifest in installed_models():
        if name_or_hub_id in (manifest.get("name"), manifest["hub_id"]):
            return folder, manifest
    return None


def delete_installed(name_or_hub_id: str) -> Path:
    """Removes a pulled model. The folder is first moved out of the catalog's sight (one rename),
    so a delete that fails half-way never leaves a partial model on offer."""
    found = find_installed(name_or_hub_id)
    if found is None:
        raise UserError(
            f"'{name_or_hub_id}' is not a downloaded model.",
            "See `parastep-studio models --available`; embedded models and the Hugging Face cache are "
            "not deleted from here.",
        )
    folder = found[0]
    trash = models_dir() / STAGING / f"deleting-{uuid.uuid4().hex[:8]}"
    trash.parent.mkdir(parents=True, exist_ok=True)
    os.replace(folder, trash)
    shutil.rmtree(trash, ignore_errors=True)
    return folder


def available() -> list[dict[str, Any]]:
    """Every known checkpoint with where it is installed: `installed` is "downloaded", "hf-cache" or
    None, `path` the folder (or None)."""
    from engine.catalog import hf_cache_snapshots

    cached = dict(hf_cache_snapshots())
    rows = []
    for checkpoint in load_checkpoints():
        row = checkpoint.to_dict()
        found = find_installed(checkpoint.hub_id)
        if found is not None:
            row.update(installed="downloaded", path=str(found[0]), commit=found[1].get("commit"))
        elif checkpoint.hub_id in cached:
            row.update(installed="hf-cache", path=str(cached[checkpoint.hub_id]), commit=None)
        else:
            row.update(installed=None, path=None, commit=None)
        rows.append(row)
    return rows


def format_size(size: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if abs(size) < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"
