"""Requests and events shared by the engine, the CLI and the window.

Plain dataclasses that serialise to JSON-safe dicts; importing this module never imports torch,
so the UI process can use it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from engine.errors import UserError

PROTOCOL_VERSION = 1


@dataclass
class GenerationRequest:
    """Everything needed to reproduce a clip. `None` means "the model family's default"."""

    model: str
    prompt: str = ""
    negative_prompt: str = ""
    image: str | None = None
    seed: int = 0
    steps: int | None = None
    guidance_scale: float | None = None
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    fps: int | None = None
    seconds: float | None = None
    strategy: str = "sequential"
    strategy_options: dict[str, Any] = field(default_factory=dict)
    devices: str = "auto"
    output: str | None = None
    loras: list[dict[str, Any]] = field(default_factory=list)  # [{"path", "weight"}]: engine/loras.py

    def to_dict(self) -> dict[str, Any]:
        return {"version": PROTOCOL_VERSION, **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationRequest:
        """Rebuild a request (e.g. from a sidecar JSON), checking every field's type."""
        if not isinstance(data, dict):
            raise UserError("The request is not a JSON object.", "Pass the 'request' object of a sidecar.")
        version = data.get("version", PROTOCOL_VERSION)
        if not isinstance(version, int) or version > PROTOCOL_VERSION:
            raise UserError(
                f"The request was written by a newer ParaStep Studio (format {version}, this one reads "
                f"up to {PROTOCOL_VERSION}).",
                "Update ParaStep Studio to open it.",
            )
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields) - {"version"})
        if unknown:
            raise UserError(f"Unknown request field(s): {', '.join(unknown)}.", "Remove them.")
        if "model" not in data:
            raise UserError("The request names no model.", "Add a 'model' field.")
        kwargs = {}
        for name, value in data.items():
            if name == "version":
                continue
            _check_type(name, value, _FIELD_TYPES[name])
            kwargs[name] = value
        return cls(**kwargs)


# JSON types each field accepts (None where the field is optional).
_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,),
    "prompt": (str,),
    "negative_prompt": (str,),
    "image": (str, type(None)),
    "seed": (int,),
    "steps": (int, type(None)),
    "guidance_scale": (int, float, type(None)),
    "frames": (int, type(None)),
    "height": (int, type(None)),
    "width": (int, type(None)),
    "fps": (int, type(None)),
    "seconds": (int, float, type(None)),
    "strategy": (str,),
    "strategy_options": (dict,),
    "devices": (str,),
    "output": (str, type(None)),
    "loras": (list,),
}


def _check_type(name: str, value: Any, types: tuple[type, ...]) -> None:
    if isinstance(value, bool) or not isinstance(value, types):
        wanted = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        raise UserError(f"Request field '{name}' is {value!r}; it must be {wanted}.", f"Correct '{name}'.")


# Stages of a job, in order; the progress bar of the window covers all of them.
STAGES = ("load", "encode", "denoise", "decode", "save")


@dataclass
class RankCounters:
    """What one rank did during a job's denoising loop."""

    rank: int
    denoiser_calls: int = 0
    compute_s: float = 0.0
    comm_wait_s: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class StageEvent:
    job_id: str
    stage: str
    type: str = "stage"


@dataclass
class StepEvent:
    """One denoising step finished on `rank`; `action` is what the rank did: compute, reuse or skip."""

    job_id: str
    rank: int
    step: int
    total: int
    action: str
    compute_s: float
    comm_wait_s: float
    type: str = "step"


@dataclass
class PreviewEvent:
    """A small preview of the denoised estimate x0 on rank 0.

    `images` are PNG-encoded bytes: video frames (with their indices in `frame_indices`) or one
    spectrogram image for audio.
    """

    job_id: str
    step: int
    total: int
    images: list[bytes]
    frame_indices: list[int]
    type: str = "preview"


@dataclass
class LogEvent:
    job_id: str
    message: str
    type: str = "log"
