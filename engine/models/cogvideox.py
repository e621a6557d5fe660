"""CogVideoX (text to video): CogVideoXPipeline, latents [B, F, C, H, W]."""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.catalog import ModelEntry, component_config
from engine.models.base import (
    FamilyAdapter,
    LatentRows,
    causal_video_preview,
    check_video_size,
    to_uint8_frames,
    transformer_blocks,
)
from engine.protocol import GenerationRequest


class CogVideoXAdapter(FamilyAdapter):
    family = "cogvideox"
    modality = "video"
    published_steps = 50
    published_warmup = 13
    defaults = {"steps": 50, "guidance_scale": 6.0, "frames": 49, "height": 480, "width": 720, "fps": 8}
    denoiser_class = "CogVideoXTransformer3DModel"
    faster_cache_layout = "BFCHW"  # the transformer is called with [B, F, C, H, W]
    largest_side = 2048  # published at 480x720; attention over 2048x2048 already needs hundreds of GiB

    def factors(self, entry: ModelEntry) -> tuple[int, int]:
        """(spatial factor the size must be a multiple of, temporal compression)."""
        vae = component_config(entry, "vae")
        transformer = component_config(entry, "transformer")
        spatial = 2 ** (len(vae["block_out_channels"]) - 1) * transformer.get("patch_size", 2)
        return spatial, vae.get("temporal_compression_ratio", 4)

    def check(self, request: GenerationRequest, entry: ModelEntry) -> None:
        spatial, temporal = self.factors(entry)
        check_video_size(request, "CogVideoX", 2 * temporal, spatial, fps=8)  # CogVideoX 1.0: 8k+1 frames

    def pipeline_kwargs(self, pipe: Any, request: GenerationRequest, generator: Any) -> dict[str, Any]:
        return {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt or None,
            "num_frames": request.frames,
            "height": request.height,
            "width": request.width,
            "num_inference_steps": request.steps,
            "guidance_scale": request.guidance_scale,
            "use_dynamic_cfg": False,
            # The transformer adds its positions to exactly this many text tokens (226 on the published
            # models); the pipeline pads the prompt to max_sequence_length, so the two must agree.
            "max_sequence_length": pipe.transformer.config.max_text_seq_length,
            "generator": generator,
            "output_type": "latent",
        }

    def decode(self, pipe: Any, latents: Any, request: GenerationRequest) -> np.ndarray:
        video = pipe.decode_latents(latents.to(pipe.vae.dtype))  # the loop's latents are fp32
        frames = pipe.video_processor.postprocess_video(video=video, output_type="pt")[0]
        return to_uint8_frames(frames)

    def preview_images(self, x0: Any) -> tuple[Any, list[int]]:
        return causal_video_preview(x0[0], 4)  # [B, F, C, H, W]; CogVideoX's VAE: 4 frames a latent

    def denoiser_blocks(self, denoiser: Any) -> list[tuple[str, Any]]:
        return transformer_blocks(denoiser)

    def block_count(self, config: dict[str, Any]) -> int:
        return int(config.get("num_layers", 30))

    def latent_rows(self, entry: ModelEntry, request: GenerationRequest) -> LatentRows:
        """Bands split at patch rows: the video tokens of a band are its patch rows of every frame."""
        vae = component_config(entry, "vae")
        scale = 2 ** (len(vae["block_out_channels"]) - 1)
        unit = component_config(entry, "transformer").get("patch_size", 2)
        return LatentRows(request.height // scale, unit, "height", scale)
