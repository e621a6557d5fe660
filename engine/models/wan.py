"""Wan 2.1 / 2.2 (text to video): WanPipeline, latents [B, C, F, H, W].

The loop's shape, which the strategies read from here: with guidance on, the transformer is called
twice per step (conditional, then unconditional, inside `cache_context("cond" / "uncond")`) and the
loop combines the two itself. Wan 2.2 A14B has two experts: `transformer` above the boundary
timestep (`boundary_ratio` in model_index.json) and `transformer_2` below it, each with its own
guidance scale. Wan 2.2 TI2V-5B (`expand_timesteps`) gives every latent token its own timestep.
The scheduler is UniPC multistep with flow sigmas (`flow_prediction`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.catalog import ModelEntry, component_config, read_model_json
from engine.models.base import (
    FamilyAdapter,
    causal_video_preview,
    check_video_size,
    load_image,
    to_uint8_frames,
)
from engine.protocol import GenerationRequest


def pipeline_config(entry: ModelEntry) -> dict[str, Any]:
    """model_index.json's pipeline settings (boundary_ratio, expand_timesteps)."""
    return read_model_json(entry.path / "model_index.json")


class WanAdapter(FamilyAdapter):
    family = "wan"
    modality = "video"
    # Wan 2.1's published sampling: 50 steps; the ParaStep warm-up follows CogVideoX's share (about a
    # quarter of the steps), since both are flow/v-prediction DiTs whose early steps set the layout.
    published_steps = 50
    published_warmup = 12
    defaults = {"steps": 50, "guidance_scale": 5.0, "frames": 81, "height": 480, "width": 832, "fps": 16}
    separate_guidance_calls = True
    denoiser_class = "WanTransformer3DModel"

    def factors(self, entry: ModelEntry) -> tuple[int, int]:
        """(spatial multiple of the size, temporal compression of the VAE)."""
        vae = component_config(entry, "vae")
        transformer = component_config(entry, "transformer")
        patch = transformer.get("patch_size", [1, 2, 2])
        spatial = vae.get("scale_factor_spatial", 8) * int(patch[-1])
        return spatial, vae.get("scale_factor_temporal", 4)

    def check(self, request: GenerationRequest, entry: ModelEntry) -> None:
        spatial, temporal = self.factors(entry)
        check_video_size(request, "Wan", temporal, spatial, fps=16)

    def switches_denoiser(self, entry: ModelEntry) -> bool:
        index = pipeline_config(entry)
        return (
            index.get("boundary_ratio") is not None and (index.get("transformer_2") or [None])[0] is not None
        )

    def per_token_timesteps(self, entry: ModelEntry) -> bool:
        return bool(pipeline_config(entry).get("expand_timesteps"))

    def pipeline_kwargs(self, pipe: Any, request: GenerationRequest, generator: Any) -> dict[str, Any]:
        return {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt or None,
            "num_frames": request.frames,
            "height": request.height,
            "width": request.width,
            "num_inference_steps": request.steps,
            "guidance_scale": request.guidance_scale,
            "generator": generator,
            "output_type": "latent",
        }

    def decode(self, pipe: Any, latents: Any, request: GenerationRequest) -> np.ndarray:
        import torch

        vae = pipe.vae
        # As WanPipeline decodes: undo the per-channel normalisation the latents live in.
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean).view(shape).to(latents.device, vae.dtype)
        std = torch.tensor(vae.config.latents_std).view(shape).to(latents.device, vae.dtype)
        video = vae.decode(latents.to(vae.dtype) * std + mean, return_dict=False)[0]
        frames = pipe.video_processor.postprocess_video(video, output_type="pt")[0]
        return to_uint8_frames(frames)

    def preview_part(self, x0: Any) -> Any:
        return x0[:, :, :1]  # the first latent frame of [B, C, F, H, W]

    def preview_images(self, x0: Any) -> tuple[Any, list[int]]:
        return causal_video_preview(x0[0].transpose(0, 1), 4)  # [B, C, F, H, W]; Wan's VAE: 4 frames


class WanImageToVideoAdapter(WanAdapter):
    """Wan 2.1 / 2.2 image to video (WanImageToVideoPipeline): the same loop, with the image's VAE
    latents (and a first-frame mask) concatenated to the latent as extra channels, and, in Wan 2.1
    I2V, CLIP image embeddings passed to both guidance calls."""

    family = "wan-i2v"
    conditioning = "image"

    def check_inputs(self, request: GenerationRequest) -> None:
        load_image(request.image, "Wan image-to-video")

    def pipeline_kwargs(self, pipe: Any, request: GenerationRequest, generator: Any) -> dict[str, Any]:
        return {
            **super().pipeline_kwargs(pipe, request, generator),
            "image": load_image(request.image, "Wan"),
        }
