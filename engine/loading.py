"""Loading a pipeline replica offline, from safetensors only, with clear errors for broken folders."""

from __future__ import annotations

from typing import Any

from engine.catalog import (
    ALLOW_PICKLE_FILE,
    WEIGHTLESS_CLASS_WORDS,
    ModelEntry,
    pickle_allowed,
    read_model_json,
)
from engine.errors import UserError
from engine.models import adapter_for

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


# A file the user creates in a model folder to allow its pickle weights (which can run code when
# loaded). Only the user makes it: nothing in ParaStep Studio writes it, and it covers that folder only.
def weighted_components(entry: ModelEntry) -> list[str]:
    model_index = read_model_json(entry.path / "model_index.json")
    components = []
    for name, spec in model_index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[1] is None:
            continue
        if not any(word in spec[1] for word in WEIGHTLESS_CLASS_WORDS):
            components.append(name)
    return components


CONFIG_FILES = ("config.json", "scheduler_config.json", "preprocessor_config.json")


def check_configs(entry: ModelEntry) -> None:
    """Reads every component's config file, so a damaged one fails at plan time naming the file
    (instead of inside a worker, as a library traceback, after the other components loaded)."""
    for name, spec in read_model_json(entry.path / "model_index.json").items():
        if name.startswith("_") or not isinstance(spec, list):
            continue
        for file in CONFIG_FILES:
            if (entry.path / name / file).is_file():
                read_model_json(entry.path / name / file)


def check_components(entry: ModelEntry) -> None:
    """Refuses components whose class would come from outside diffusers and transformers (a module
    in the model folder is code that runs on load; `trust_remote_code` is never passed)."""
    import importlib.util

    model_index = read_model_json(entry.path / "model_index.json")
    for name, spec in model_index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
            continue
        library = spec[0]
        known = library in ("diffusers", "transformers") or (
            isinstance(library, str)
            and library.isidentifier()
            and importlib.util.find_spec(f"diffusers.pipelines.{library}") is not None
        )
        if not known:
            raise UserError(
                f"Component '{name}' of model '{entry.name}' comes from '{library}', not from diffusers or "
                "transformers; custom code in a model folder is never run.",
                f"Use a model whose components are stock diffusers/transformers classes "
                f"(fix '{name}' in {entry.path / 'model_index.json'}).",
            )


def check_weights(entry: ModelEntry) -> None:
    """Fails fast, naming the file, when a component is custom code or its weights are missing,
    truncated or pickled (unless allowed)."""
    from safetensors import safe_open

    check_components(entry)
    for component in weighted_components(entry):
        folder = entry.path / component
        if not folder.is_dir():
            raise UserError(
                f"Model '{entry.name}' lists component '{component}' but '{folder}' is missing.",
                "Restore the folder or re-save the pipeline.",
            )
        files = sorted(folder.glob("*.safetensors"))
        if not files:
            pickled = [p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES]
            if pickled and pickle_allowed(entry):
                continue
            if pickled:
                raise UserError(
                    f"'{folder}' holds only pickle weights ({', '.join(pickled)}); they can run arbitrary "
                    "code when loaded and are refused.",
                    "Convert them to safetensors (e.g. save_pretrained(..., safe_serialization=True)); or, "
                    f"if you trust this model, create an empty file '{entry.path / ALLOW_PICKLE_FILE}' to "
                    "allow pickle weights for this folder only.",
                )
            raise UserError(
                f"Component '{component}' of model '{entry.name}' has no weight file in '{folder}'.",
                "Restore its .safetensors file(s) or re-save the pipeline.",
            )
        index_files = sorted(folder.glob("*.safetensors.index.json"))
        for index in index_files:
            weight_map = read_model_json(index).get("weight_map", {})
            if not isinstance(weight_map, dict):
                raise UserError(f"'{index}' has no 'weight_map' object.", "Restore the file.")
            shards = {shard for shard in weight_map.values() if isinstance(shard, str)}
            for shard in sorted(shards):
                if not (folder / shard).is_file():
                    raise UserError(f"Weight shard '{folder / shard}' is missing.", "Restore the file.")
        for file in files:
            try:
                with safe_open(str(file), framework="pt") as handle:
                    handle.keys()
            except Exception as exc:  # safetensors raises its own error types
                raise UserError(
                    f"Weight file '{file}' is corrupt or truncated ({exc}).",
                    "Restore the file from the original download or re-save the pipeline.",
                ) from None


def load_pipeline(entry: ModelEntry, device: str, dtype: Any) -> Any:
    """A stock diffusers pipeline on `device`; nothing is downloaded and no remote code runs."""
    import warnings

    import transformers
    from diffusers import DiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # `torch_dtype` is renamed in newer diffusers
            pipe = DiffusionPipeline.from_pretrained(
                str(entry.path),
                **adapter_for(entry).component_overrides(entry, dtype),
                local_files_only=True,
                # safetensors only, unless the user allowed pickle for this folder (then preferred)
                use_safetensors=None if pickle_allowed(entry) else True,
                torch_dtype=dtype,
                # a pulled model keeps the weight files of the variant it was pulled with (e.g. fp16)
                **({"variant": entry.variant} if entry.variant else {}),
            )
    except (OSError, ValueError) as exc:
        raise UserError(
            f"Could not load model '{entry.name}' from '{entry.path}': {exc}",
            "Check that the folder is a complete diffusers pipeline with safetensors weights.",
        ) from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def resolve_dtype(name: str, device: str) -> Any:
    import torch

    if name == "auto":
        return torch.float32 if device == "cpu" else torch.float16
    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if name not in table:
        raise UserError(f"Unknown dtype '{name}'.", "Use auto, fp32, fp16 or bf16.")
    return table[name]
