"""Stable Video Diffusion (image to video): StableVideoDiffusionPipeline, latents [B, F, C, H, W]."""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.catalog import ModelEntry, component_config
from engine.errors import UserError
from engine.models.base import (
    FamilyAdapter,
    LatentRows,
    check_multiple,
    load_image,
    to_uint8_frames,
    unet_block_count,
    unet_blocks,
)
from engine.protocol import GenerationRequest

MIN_GUIDANCE = 1.0  # the pipeline's min_guidance_scale: guidance rises per frame from this value


class SVDAdapter(FamilyAdapter):
    family = "svd"
    conditioning = "image"
    denoiser_class = "UNetSpatioTemporalConditionModel"
    denoiser_component = "unet"
    modality = "video"
    published_steps = 50
    published_warmup = 5
    defaults = {"steps": 50, "guidance_scale": 3.0, "frames": 14, "height": 576, "width": 1024, "fps": 7}
    largest_side = 2048  # published at 576x1024

    def size_factor(self, entry: ModelEntry) -> int:
        vae = component_config(entry, "vae")
        unet = component_config(entry, "unet")
        return 2 ** (len(vae["block_out_channels"]) - 1) * 2 ** (len(unet["down_block_types"]) - 1)

    def check_inputs(self, request: GenerationRequest) -> None:
        load_image(request.image, "Stable Video Diffusion")

    def check(self, request: GenerationRequest, entry: ModelEntry) -> None:
        factor = self.size_factor(entry)
        check_multiple("height", request.height, factor, "this Stable Video Diffusion model")
        check_multiple("width", request.width, factor, "this Stable Video Diffusion model")
        if request.frames is None or not 1 <= request.frames <= 64:
            raise UserError(
                f"frames {request.frames} is out of range.", "Use --frames 14 or 25.", "frames", 14
            )
        if not request.fps or request.fps < 1:
            raise UserError(f"fps {request.fps} must be at least 1.", "Use --fps 7.", "fps", 7)
        if request.guidance_scale < MIN_GUIDANCE:
            raise UserError(
                f"SVD's guidance rises per frame from {MIN_GUIDANCE}; {request.guidance_scale} is lower.",
                "Use --guidance-scale 1.0 or more.",
                field="guidance_scale",
                value=MIN_GUIDANCE,
            )

    def pipeline_kwargs(self, pipe: Any, request: GenerationRequest, generator: Any) -> dict[str, Any]:
        return {
            "image": load_image(request.image, "Stable Video Diffusion"),
            "num_frames": request.frames,
            "height": request.height,
            "width": request.width,
            "fps": request.fps,  # the pipeline itself conditions on fps - 1
            "num_inference_steps": request.steps,
            "min_guidance_scale": MIN_GUIDANCE,
            "max_guidance_scale": request.guidance_scale,
            "generator": generator,
            "output_type": "latent",
        }

    def uses_guidance(self, request: GenerationRequest) -> bool:
        return request.guidance_scale > 1.0

    def decode(self, pipe: Any, latents: Any, request: GenerationRequest) -> np.ndarray:
        import torch

        needs_upcast = pipe.vae.dtype == torch.float16 and pipe.vae.config.force_upcast
        if needs_upcast:
            pipe.vae.to(dtype=torch.float32)
            latents = latents.float()
        video = pipe.decode_latents(latents.to(pipe.vae.dtype), latents.shape[1], decode_chunk_size=8)
        if needs_upcast:
            pipe.vae.to(dtype=torch.float16)
        frames = pipe.video_processor.postprocess_video(video=video, output_type="pt")[0]
        return to_uint8_frames(frames)

    def preview_images(self, x0: Any) -> tuple[Any, list[int]]:
        return x0[0], list(range(x0.shape[1]))

    def denoiser_blocks(self, denoiser: Any) -> list[tuple[str, Any]]:
        return unet_blocks(denoiser)

    def block_count(self, config: dict[str, Any]) -> int:
        return unet_block_count(config, has_mid=True)

    def latent_rows(self, entry: ModelEntry, request: GenerationRequest) -> LatentRows:
        """Bands stay whole through the UNet's downsamplings."""
        vae = component_config(entry, "vae")
        scale = 2 ** (len(vae["block_out_channels"]) - 1)
        downsamplers = len(component_config(entry, "unet")["down_block_types"]) - 1
        return LatentRows(request.height // scale, 2**downsamplers, "height", scale)
