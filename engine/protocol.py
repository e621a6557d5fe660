"""Requests and events shared by the engine, the CLI and the window.

Plain dataclasses that serialise to JSON-safe dicts; importing this module never imports torch,
so the UI process can use it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from engine.errors import UserError

PROTOCOL_VERSION = 1
MAX_STEPS = 1000
MAX_SIDE = 8192  # height/width cap whatever the family (families set lower ones from their configs)
# Frames cap whatever the family: 8*128+1 and 4*256+1, so the largest valid count of CogVideoX and
# Wan is itself accepted (the window's Frames box stops here too).
MAX_FRAMES = 1025
MAX_TEXT_CHARS = 20_000  # any text field: prompts are cut to a few hundred tokens anyway
MAX_OPTIONS = 32


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
                f"The request was written by a newer ParaStep Studio (format {_short(version)}, this one "
                f"reads up to {PROTOCOL_VERSION}).",
                "Update ParaStep Studio to open it.",
            )
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields) - {"version"})
        if unknown:
            raise UserError(f"Unknown request field(s): {', '.join(map(_shown, unknown))}.", "Remove them.")
        if "model" not in data:
            raise UserError("The request names no model.", "Add a 'model' field.")
        kwargs = {}
        for name, value in data.items():
            if name == "version":
                continue
            _check_type(name, value, _FIELD_TYPES[name])
            kwargs[name] = value
        request = cls(**kwargs)
        check_values(request)
        return request


def check_values(request: GenerationRequest) -> None:
    """What can be checked without the model: text, number ranges, plain strategy options.

    Runs on every request that comes from data (the socket, sidecars, latents files) and again when
    a request is planned, so nothing that cannot be saved as JSON or sent back ever reaches the queue.
    """
    for name in ("model", "prompt", "negative_prompt", "image", "strategy", "devices", "output"):
        _check_text(name, getattr(request, name))
    if request.steps is not None and not 1 <= request.steps <= MAX_STEPS:
        raise UserError(
            f"'steps' is {request.steps}; it must be from 1 to {MAX_STEPS}.",
            "Set --steps in range.",
            "steps",
            min(max(request.steps, 1), MAX_STEPS),
        )
    guidance = request.guidance_scale
    if guidance is not None and not 0 <= guidance <= 100:  # NaN fails this too
        raise UserError(
            f"'guidance_scale' is {guidance}; it must be from 0 to 100.",
            "Set --guidance-scale from 0 to 100.",
            "guidance_scale",
        )
    if not 0 <= request.seed < 2**63:
        raise UserError(
            f"'seed' is {request.seed}; it must be from 0 to 2**63-1.", "Set --seed in range.", "seed"
        )
    if request.seconds is not None and not math.isfinite(request.seconds):
        raise UserError(f"'seconds' is {request.seconds}; it must be a finite number.", "Set --seconds.")
    if request.frames is not None and request.frames > MAX_FRAMES:
        raise UserError(
            f"frames {request.frames} is more than any model here makes (at most {MAX_FRAMES}).",
            f"Use --frames {MAX_FRAMES} or less.",
            field="frames",
            value=MAX_FRAMES,
        )
    for name in ("height", "width"):
        value = getattr(request, name)
        if value is not None and value > MAX_SIDE:
            raise UserError(
                f"{name} {value} is larger than any model here can make (at most {MAX_SIDE}).",
                f"Use a smaller --{name} (the model's default when unsure).",
                field=name,
                value=MAX_SIDE,
            )
    options = request.strategy_options
    if len(options) > MAX_OPTIONS or not all(
        isinstance(key, str) and len(key) <= 100 and _plain_option(value) for key, value in options.items()
    ):
        raise UserError(
            f"'strategy_options' is {_short(options)}; it must map option names to numbers, text or null.",
            'Send the strategy\'s options as named in the catalog, e.g. {"warmup": 2}.',
        )


def _check_text(name: str, text: str | None) -> None:
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        # A lone surrogate: a prompt read from bytes that are not UTF-8 (argv decodes them so), or a
        # JSON "\ud800" escape. It could not be written to a sidecar, the queue file or the socket.
        raise UserError(
            f"Request field '{name}' is not valid UTF-8 text (character {exc.start} is "
            f"{text[exc.start]!r}, an undecodable byte or lone surrogate).",
            f"Type '{name}' again as plain text, or save the file that holds it as UTF-8.",
        ) from None
    if len(text) > MAX_TEXT_CHARS:
        raise UserError(
            f"Request field '{name}' is {len(text)} characters long; at most {MAX_TEXT_CHARS} are accepted.",
            f"Shorten '{name}'.",
            field=name,
        )


def _plain_option(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return len(value) <= 1000
    return value is None or isinstance(value, bool | int)


def _shown(text: str) -> str:
    """`text` for a message: as is when it is short UTF-8 text, else its shortened repr."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _short(text)
    return text if len(text) <= 80 else _short(text)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


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
        raise UserError(
            f"Request field '{name}' is {_short(value)}; it must be {wanted}.", f"Correct '{name}'."
        )
    if isinstance(value, float) and not math.isfinite(value):  # JSON has no NaN; sidecars may
        raise UserError(
            f"Request field '{name}' is {value}; it must be a finite number.", f"Correct '{name}'."
        )


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
