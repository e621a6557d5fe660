"""HunyuanVideo 1.5 (text to video): HunyuanVideo15Pipeline, latents [B, C, F, H, W].

The loop's shape, which the strategies read from here: guidance runs through the pipeline's
`guider` component (diffusers' ClassifierFreeGuidance). Its `prepare_inputs` gives one batch per
condition, and the loop calls the transformer once per batch, in order: conditional first
("pred_cond": prompt embeddings and masks of both text encoders), then unconditional
("pred_uncond": the negative prompt's). Nothing is batched; the guider combines the two outputs
itself. With a guidance scale of exactly 1 (the guider's own test) it runs the conditional call
only. The two calls differ in four arguments, `encoder_hidden_states`, `encoder_attention_mask`,
`encoder_hidden_states_2` and `encoder_attention_mask_2` (the ByT5 pair is all zeros for both
conditions when the prompt quotes no text, so it may not differ at all).

The pipeline takes no guidance scale: the guider holds it, so each job sets its request's scale on
the guider. The denoiser input is the latent concatenated along channels
with conditioning latents and a mask (both zero for text to video), and the timestep goes in
unscaled (FlowMatch Euler has no `scale_model_input`). The scheduler is FlowMatch Euler: it keeps
no solver state between steps and returns no x0 estimate.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from engine.catalog import ModelEntry, component_config
from engine.models.base import FamilyAdapter, causal_video_preview, check_video_size, to_uint8_frames
from engine.protocol import GenerationRequest


class HunyuanVideo15Adapter(FamilyAdapter):
    family = "hunyuanvideo15"
    modality = "video"
    # HunyuanVideo 1.5 480p T2V as published: 50 steps, guider scale 6.0, 121 frames at 24 fps, and
    # the pipeline's default size (16:9 at target_size 640, i.e. 480 x 848). The ParaStep warm-up
    # follows Wan's share (about a quarter of the steps): both are flow-matching DiTs.
    published_steps = 50
    published_warmup = 12
    defaults = {"steps": 50, "guidance_scale": 6.0, "frames": 121, "height": 480, "width": 848, "fps": 24}
    separate_guidance_calls = True

    def factors(self, entry: ModelEntry) -> tuple[int, int]:
        """(spatial multiple of the size, temporal compression of the VAE)."""
        vae = component_config(entry, "vae")
        transformer = component_config(entry, "transformer")
        spatial = int(vae.get("spatial_compression_ratio", 16)) * int(transformer.get("patch_size", 1))
        return spatial, int(vae.get("temporal_compression_ratio", 4))

    def check(self, request: GenerationRequest, entry: ModelEntry) -> None:
        spatial, temporal = self.factors(entry)
        check_video_size(request, "HunyuanVideo 1.5", temporal, spatial, fps=24)

    def uses_guidance(self, request: GenerationRequest) -> bool:
        # The guider's own test (diffusers-native formulation): only a scale of exactly 1 turns the
        # unconditional call off; a scale below 1 still runs both calls.
        return request.guidance_scale is not None and not math.isclose(request.guidance_scale, 1.0)

    def pipeline_kwargs(self, pipe: Any, request: GenerationRequest, generator: Any) -> dict[str, Any]:
        # The scale lives in the guider, not in the call; every job sets its own on the worker's guider
        # (guider.new() would do too, but logs diffusers' "experimental" warning at every job).
        pipe.guider.guidance_scale = float(request.guidance_scale)
        return {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt or None,
            "num_frames": request.frames,
            "height": request.height,
            "width": request.width,
            "num_inference_steps": request.steps,
            "generator": generator,
            "output_type": "latent",
        }

    def denoiser_input(self, scheduler: Any, latent: Any, timestep: Any, current_input: Any) -> Any:
        """The loop's input: the latent, then the conditioning latents and mask channels (the same at
        every step), taken from the current input."""
        import torch

        extra = current_input[:, latent.shape[1] :]
        return torch.cat([latent.to(current_input.dtype), extra], dim=1)

    def decode(self, pipe: Any, latents: Any, request: GenerationRequest) -> np.ndarray:
        # As HunyuanVideo15Pipeline decodes: divide by the VAE's scaling factor, no shift.
        vae = pipe.vae
        video = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        frames = pipe.video_processor.postprocess_video(video, output_type="pt")[0]
        return to_uint8_frames(frames)

    def preview_part(self, latents: Any) -> Any:
        return latents[:, :, :1]  # [B, C, F, H, W]

    def preview_images(self, x0: Any) -> tuple[Any, list[int]]:
        return causal_video_preview(x0[0].transpose(0, 1), 4)  # [B, C, F, H, W]; its VAE: 4 frames
