"""Any other diffusers pipeline whose loop calls one denoiser and `scheduler.step` once per step.

What the pipeline accepts is read from its `__call__` signature; the pipeline decodes on rank 0
itself (the generic adapter cannot know how a family decodes its latents).
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

from engine.catalog import ModelEntry
from engine.errors import UserError
from engine.models.base import FamilyAdapter, to_uint8_frames
from engine.protocol import GenerationRequest


def pipeline_parameters(pipeline_class: str) -> set[str]:
    import diffusers

    cls = getattr(diffusers, pipeline_class, None)
    if cls is None:
        raise UserError(
            f"This diffusers has no pipeline class '{pipeline_class}'.",
            "Update diffusers or use a supported model.",
        )
    return set(inspect.signature(cls.__call__).parameters)


class GenericAdapter(FamilyAdapter):
    family = "generic"
    decodes_in_pipeline = True
    defaults = {"steps": 30, "guidance_scale": 5.0, "frames": 16, "height": 256, "width": 256, "fps": 8}

    def __init__(self, entry: ModelEntry | None = None) -> None:
        self.parameters = pipeline_parameters(entry.pipeline_class) if entry else set()
        if "audio_length_in_s" in self.parameters:
            self.modality = "audio"
            self.defaults = {"steps": 50, "guidance_scale": 3.5, "seconds": 5.0}

    def check(self, request: GenerationRequest, entry: ModelEntry) -> None:
        needed = {"prompt", "num_inference_steps", "generator", "output_type"}
        missing = needed - self.parameters
        if missing:
            raise UserError(
                f"{entry.pipeline_class} does not take {', '.join(sorted(missing))}, so it is not a "
                "text-conditioned loop this app can drive.",
                "Use a CogVideoX, Stable Video Diffusion, AudioLDM2 or similar text-to-video/audio pipeline.",
            )

    def pipeline_kwargs(self, pipe: Any, request: GenerationRequest, generator: Any) -> dict[str, Any]:
        wanted = {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt or None,
            "num_inference_steps": request.steps,
            "guidance_scale": request.guidance_scale,
            "num_frames": request.frames,
            "height": request.height,
            "width": request.width,
            "audio_length_in_s": request.seconds,
            "generator": generator,
            "output_type": "np",
        }
        return {k: v for k, v in wanted.items() if k in self.parameters and v is not None}

    def output_rate(self, pipe: Any, request: GenerationRequest) -> float:
        if self.modality == "audio":
            return float(getattr(getattr(pipe, "vocoder", None), "config", {}).get("sampling_rate", 16000))
        return float(request.fps)

    def decoded_output(self, result: Any) -> np.ndarray:
        """The pipeline's own decoded output as frames or samples."""
        if self.modality == "audio":
            return np.asarray(result.audios[0], dtype=np.float32).reshape(-1)
        frames = getattr(result, "frames", None)
        array = np.asarray(frames[0] if frames is not None else result.images)
        return to_uint8_frames(array)

    def preview_images(self, x0: Any) -> tuple[Any, list[int]]:
        if x0.ndim == 5:  # [B, F, C, H, W]
            return x0[0], list(range(x0.shape[1]))
        return x0[:1], [0]
