"""Where models come from: embedded ones, local folders in diffusers layout, the Hugging Face cache.

Everything here is offline and cheap (JSON files only); weights are checked and loaded elsewhere.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.checkpoints import find_installed, installed_models
from engine.errors import UserError
from resources import EMBEDDED_MODELS_DIR

# diffusers pipeline class -> family adapter name.
FAMILIES = {
    "CogVideoXPipeline": "cogvideox",
    "StableVideoDiffusionPipeline": "svd",
    "AudioLDM2Pipeline": "audioldm2",
    "WanPipeline": "wan",
    "WanImageToVideoPipeline": "wan-i2v",
    "StableAudioPipeline": "stable-audio",
    "LTXPipeline": "ltx",
    "HunyuanVideo15Pipeline": "hunyuanvideo15",
}
STUDIO_FILE = "studio.json"  # optional: family claim and defaults of an embedded model
DEFAULT_MODEL = "shapes"  # the trained embedded model: listed first, so the window starts on it


@dataclass
class ModelEntry:
    name: str
    path: Path
    source: str  # embedded | local | downloaded | hf-cache
    pipeline_class: str
    family: str
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    variant: str | None = None  # diffusers weight variant (e.g. fp16) of a pulled model
    random_weights: bool = False  # untrained (tests, benchmarks): outputs noise

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "path": str(self.path),
            "source": self.source,
            "pipeline_class": self.pipeline_class,
            "family": self.family,
            "defaults": self.defaults,
            "description": self.description,
            "variant": self.variant,
            "random_weights": self.random_weights,
        }


def hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(home) / "hub"


def read_model_json(file: Path) -> dict[str, Any]:
    """A JSON object from a model folder (model_index.json, a component's config.json, studio.json).

    Raises UserError naming the file when it cannot be read, is not JSON or is not an object.
    """
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(
            f"'{file}' cannot be read ({exc.strerror or exc}).", "Restore the model folder."
        ) from None
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise UserError(
            f"'{file}' is not a valid JSON file ({one_line(exc)}).",
            "Restore the file from the model's source, or re-save the pipeline with diffusers.",
        ) from None
    if not isinstance(data, dict):
        raise UserError(
            f"'{file}' holds a JSON {type(data).__name__}, not an object.",
            "Restore the file from the model's source, or re-save the pipeline with diffusers.",
        )
    return data


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= 200 else text[:197] + "..."


def read_entry(path: Path, name: str | None = None, source: str = "local") -> ModelEntry:
    """Describes the pipeline folder at `path`, or says why it is not one."""
    if not path.exists():
        raise UserError(f"Model folder '{path}' does not exist.", "Check the path.")
    if not path.is_dir():
        raise UserError(
            f"'{path}' is a file, not a model folder.", "Give the folder that holds model_index.json."
        )
    index = path / "model_index.json"
    if not index.is_file():
        raise UserError(
            f"'{path}' is not a diffusers pipeline folder: it has no model_index.json.",
            "Give a folder saved with DiffusionPipeline.save_pretrained (diffusers layout).",
        )
    model_index = read_model_json(index)
    try:
        pipeline_class = model_index["_class_name"]
        if not isinstance(pipeline_class, str):  # community pipelines name [module, class]
            raise ValueError(f"_class_name is {pipeline_class!r}, a custom pipeline that needs remote code")
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(
            f"'{index}' is not a valid model_index.json ({one_line(exc)}).",
            "Re-save the pipeline with diffusers.",
        ) from None
    family = FAMILIES.get(pipeline_class, "generic")
    studio: dict[str, Any] = {}
    if (path / STUDIO_FILE).is_file():
        studio = _read_studio(path / STUDIO_FILE)
        claimed = studio.get("family")
        if claimed and claimed != family:
            raise UserError(
                f"'{path}' claims family '{claimed}' but its pipeline is {pipeline_class} ({family}).",
                f"Correct 'family' in {STUDIO_FILE} or use the right folder.",
            )
    return ModelEntry(
        name=name or path.name,
        path=path,
        source=source,
        pipeline_class=pipeline_class,
        family=family,
        defaults=dict(studio.get("defaults", {})),
        description=studio.get("description", ""),
        random_weights=studio.get("random_weights", False),
    )


def _read_studio(file: Path) -> dict[str, Any]:
    """studio.json: {"family": str, "description": str, "defaults": {field: number}, "random_weights":
    bool}, all optional."""
    try:
        studio = read_model_json(file)
    except UserError as exc:
        raise UserError(exc.problem, "Fix or delete it.") from None
    wrong = [
        key
        for key, kinds in (
            ("family", str),
            ("description", str),
            ("defaults", dict),
            ("random_weights", bool),
        )
        if key in studio and not isinstance(studio[key], kinds)
    ]
    defaults = studio.get("defaults", {})
    if isinstance(defaults, dict):
        wrong += [
            f"defaults.{key}"
            for key, value in defaults.items()
            if isinstance(value, bool) or not isinstance(value, int | float)
        ]
    if wrong:
        raise UserError(
            f"'{file}' has {', '.join(wrong)} of the wrong type.",
            "Fix or delete it: 'family' and 'description' are text, 'defaults' maps fields to numbers, "
            "'random_weights' is true or false.",
        )
    return studio


class ModelCatalog:
    """Lists and resolves models by name or path."""

    def __init__(self, extra_folders: list[Path] | None = None) -> None:
        self.extra_folders = [Path(p) for p in extra_folders or []]

    def entries(self) -> list[ModelEntry]:
        found: list[ModelEntry] = []
        embedded = sorted(EMBEDDED_MODELS_DIR.glob("*/model_index.json"))
        for folder in sorted(embedded, key=lambda index: index.parent.name != DEFAULT_MODEL):
            found.append(read_entry(folder.parent, source="embedded"))
        for folder in self.extra_folders:
            try:
                found.append(read_entry(folder, source="local"))
            except UserError:
                continue
        found.extend(_downloaded_entries())
        for name, snapshot in hf_cache_snapshots():
            try:
                found.append(read_entry(snapshot, name=name, source="hf-cache"))
            except UserError:
                continue
        return found

    def resolve(self, name_or_path: str) -> ModelEntry:
        if not name_or_path:
            raise UserError(
                "No model given.", "Pass --model with a name from `parastep-studio models` or a folder."
            )
        embedded = EMBEDDED_MODELS_DIR / name_or_path
        if os.sep not in name_or_path and (embedded / "model_index.json").is_file():
            return read_entry(embedded, source="embedded")
        path = Path(name_or_path).expanduser()
        if path.exists():
            return read_entry(path.resolve())
        downloaded = find_installed(name_or_path)
        if downloaded is not None:
            return _downloaded_entry(*downloaded)
        for name, snapshot in hf_cache_snapshots():
            if name == name_or_path:
                return read_entry(snapshot, name=name, source="hf-cache")
        known = ", ".join(entry.name for entry in self.entries()) or "none"
        raise UserError(
            f"Unknown model '{name_or_path}' (known: {known}).",
            "Use a name from `parastep-studio models`, a folder in diffusers layout, "
            "a model already in the Hugging Face cache, or get one with `parastep-studio pull NAME` "
            "(see `parastep-studio models --available`).",
        )


def _downloaded_entry(folder: Path, manifest: dict[str, Any]) -> ModelEntry:
    entry = read_entry(folder, name=manifest.get("name") or manifest["hub_id"], source="downloaded")
    entry.variant = manifest.get("variant")
    return entry


def _downloaded_entries() -> list[ModelEntry]:
    """Models pulled with `parastep-studio pull`: only complete, verified folders (with a manifest)."""
    found = []
    for folder, manifest in installed_models():
        try:
            found.append(_downloaded_entry(folder, manifest))
        except UserError:
            continue
    return found


def hf_cache_snapshots() -> list[tuple[str, Path]]:
    """(org/name, snapshot folder) for every cached pipeline repo, newest ref first."""
    cache = hf_cache_dir()
    found = []
    for repo in sorted(cache.glob("models--*")):
        name = repo.name[len("models--") :].replace("--", "/")
        ref = repo / "refs" / "main"
        snapshot = None
        if ref.is_file():
            candidate = repo / "snapshots" / ref.read_text().strip()
            if candidate.is_dir():
                snapshot = candidate
        if snapshot is None:
            snapshots = sorted((repo / "snapshots").glob("*"), key=lambda p: p.stat().st_mtime)
            snapshot = snapshots[-1] if snapshots else None
        if snapshot is not None and (snapshot / "model_index.json").is_file():
            found.append((name, snapshot))
    return found


# Component classes that carry no weights ("Guidance": diffusers guiders such as ClassifierFreeGuidance,
# which hold a scale and no tensors: HunyuanVideo 1.5, LTX-2).
WEIGHTLESS_CLASS_WORDS = ("Scheduler", "Tokenizer", "FeatureExtractor", "Processor", "Guidance")

ALLOW_PICKLE_FILE = ".parastep-allow-pickle"  # an empty file the user puts in a folder they trust


def pickle_allowed(entry: ModelEntry) -> bool:
    return (entry.path / ALLOW_PICKLE_FILE).is_file()


def component_config(entry: ModelEntry | Path, component: str) -> dict[str, Any]:
    """A component's config.json (the VAE's, the transformer's, ...)."""
    path = entry.path if isinstance(entry, ModelEntry) else entry
    config = path / component / "config.json"
    if not config.is_file():
        raise UserError(f"'{config}' is missing.", "Restore the pipeline folder.")
    return read_model_json(config)
