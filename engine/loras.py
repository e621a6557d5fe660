"""LoRA adapters named by a request: checked when the job is planned, loaded into the worker's warm
pipeline (diffusers' load_lora_weights / set_adapters) just before the pipeline call and unloaded
right after it, so the next job runs on the model as it was loaded.

A request's `loras` is a list of {"path": a .safetensors file, "weight": a number}. Files are read
with safetensors (never pickle) and handed to diffusers as state dicts, so nothing is looked up on a
hub. diffusers needs the `peft` package for adapters.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

from engine.errors import UserError

_MARK = "_parastep_loras"  # adapter names loaded on a pipeline, to unload leftovers of a failed job


def parse_lora_arg(text: str) -> dict[str, Any]:
    """`PATH[:WEIGHT]` (command line) -> {"path", "weight"}; the weight defaults to 1."""
    path, sep, weight = text.rpartition(":")
    if sep and path:
        try:
            return {"path": path, "weight": float(weight)}
        except ValueError:
            pass
    return {"path": text, "weight": 1.0}


def check_loras(loras: list[Any], pipeline_class: str, strategy: Any) -> None:
    """Fails before any work when a LoRA entry is malformed, missing, pickled or unsupported."""
    if not loras:
        return
    fix = 'Give each LoRA as {"path": "FILE.safetensors", "weight": 0.8} (--lora FILE[:WEIGHT]).'
    for lora in loras:
        if (
            not isinstance(lora, dict)
            or set(lora) - {"path", "weight"}
            or not isinstance(lora.get("path"), str)
            or isinstance(lora.get("weight", 1.0), bool)
            or not isinstance(lora.get("weight", 1.0), (int, float))
        ):
            raise UserError(f"LoRA entry {lora!r} is not a path with a weight.", fix)
        path = Path(lora["path"]).expanduser()
        if path.suffix != ".safetensors":
            raise UserError(
                f"LoRA '{path}' is not a .safetensors file; pickle files can run code when loaded and are "
                "refused.",
                "Convert it to safetensors.",
            )
        if not path.is_file():
            raise UserError(f"LoRA file '{path}' does not exist.", "Check the path.")
    if not strategy.keeps_denoiser_whole:  # it patches or splits the layers LoRA wraps
        raise UserError(
            f"Strategy '{strategy.name}' is not checked with LoRA adapters.",
            "Use a strategy that runs the denoiser whole (sequential, parastep, cfg-parallel, ...), "
            "or run without --lora.",
        )
    import diffusers

    pipeline = getattr(diffusers, pipeline_class, None)
    if pipeline is None or not hasattr(pipeline, "load_lora_weights"):
        raise UserError(
            f"{pipeline_class} has no LoRA support in diffusers.", "Run this model without --lora."
        )
    if importlib.util.find_spec("peft") is None:
        raise UserError("LoRA adapters need the 'peft' package.", "Install it: pip install peft")


def apply_loras(pipe: Any, loras: list[dict[str, Any]]) -> list[str]:
    """Loads the job's adapters with their weights; returns their names (for `remove_loras`)."""
    remove_loras(pipe, getattr(pipe, _MARK, []))  # a job that failed before its cleanup
    if not loras:
        return []
    from safetensors.torch import load_file

    names = []
    for index, lora in enumerate(loras):
        name = f"parastep_lora_{index}"
        state = load_file(str(Path(lora["path"]).expanduser()), device="cpu")
        # Wan 2.2 A14B: both experts take the adapter, else the low-noise one runs without it.
        both = {"load_into_transformer_2": True} if getattr(pipe, "transformer_2", None) is not None else {}
        pipe.load_lora_weights(state, adapter_name=name, **both)
        names.append(name)
        setattr(pipe, _MARK, list(names))
    pipe.set_adapters(names, adapter_weights=[float(lora.get("weight", 1.0)) for lora in loras])
    return names


def remove_loras(pipe: Any, names: list[str]) -> None:
    """Takes the LoRA layers out again, leaving the loaded weights exactly as they were."""
    if names:
        pipe.unload_lora_weights()
    if hasattr(pipe, _MARK):
        delattr(pipe, _MARK)
