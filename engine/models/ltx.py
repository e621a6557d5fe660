"""LTX-Video 0.9.x (text to video): LTXPipeline, latents packed into tokens [B, F*H*W, C] in the loop.

The loop's shape, which the strategies read from here: one transformer call per step on a batch
holding the unconditional, then the conditional half (`torch.cat([latents] * 2)`, inside
`cache_context("cond_uncond")`), upcast to float32 before guidance, as CogVideoX. No expert switch,
one timestep per sample. The scheduler is flow-matching Euler with a resolution-dependent shift
(`use_dynamic_shifting`); it has no `scale_model_input` and keeps no history between steps.

Inside the loop the latent is not [B, C, F, H, W] but the pipeline's `_pack_latents` of it: patches of
`patch_size_t x patch_size x patch_size` (1 x 1 x 1 in every published 0.9.x transformer) flattened
into tokens, frame-major. Previews and the decode unpack it with the transformer's patch sizes.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.catalog import ModelEntry, component_config
from engine.models.base import FamilyAdapter, causal_video_preview, check_video_size, to_uint8_frames
from engine.protocol import GenerationRequest

# Timestep-conditioned decoders (LTX-Video 0.9.1 and later): the diffusers LTX-Video guide recommends
# decode_timestep 0.05 and a noise scale of 0.025. 0.9.0's decoder takes no timestep (both unused).
DECODE_TIMESTEP = 0.05
DECODE_NOISE_SCALE = 0.025


class LTXAdapter(FamilyAdapter):
    family = "ltx"
    modality = "video"
    # LTXPipeline's own defaults: 50 steps, guidance 3, 161 frames at 512 x 704, frame_rate 25. The
    # ParaStep warm-up follows Wan's share (about a quarter): both are flow-matching DiTs.
    published_steps = 50
    published_warmup = 12
    defaults = {"steps": 50, "guidance_scale": 3.0, "frames": 161, "height": 512, "width": 704, "fps": 25}
    separate_guidance_calls = False  # one call per step on both guidance halves

    def __init__(self) -> None:
        # The latent grid (frames, height, width) and patch sizes of the job, set by pipeline_kwargs on
        # the worker: previews receive packed x0 alone and need it to unpack.
        self._grid: tuple[int, int, int, int, int] | None = None
        self._temporal = 8  # the VAE's temporal compression, likewise

    # ---- engine side ----------------------------------------------------------------------------
    def factors(self, entry: ModelEntry) -> tuple[int, int]:
        """(multiple the height and width must be, temporal compression of the VAE), from the configs."""
        vae = component_config(entry, "vae")
        transformer = component_config(entry, "transformer")
        stages = sum(bool(s) for s in vae.get("spatio_temporal_scaling", (True, True, True, False)))
        spatial = vae.get("spatial_compression_ratio") or vae.get("patch_size", 4) * 2**stages
        temporal = vae.get("temporal_compression_ratio") or vae.get("patch_size_t", 1) * 2**stages
        return spatial * int(transformer.get("patch_size", 1)), temporal

    def check(self, request: GenerationRequest, entry: ModelEntry) -> None:
        spatial, temporal = self.factors(entry)
        # The pipeline keeps (frames - 1) // 8 + 1 latent frames: other counts would be cut silently.
        check_video_size(request, "LTX-Video", temporal, spatial, fps=25)

    # ---- worker side ----------------------------------------------------------------------------
    def pipeline_kwargs(self, pipe: Any, request: GenerationRequest, generator: Any) -> dict[str, Any]:
        self._grid = self.latent_grid(pipe, request)
        self._temporal = pipe.vae_temporal_compression_ratio
        decode_timestep, noise_scale = self.decode_settings(pipe)
        return {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt or None,
            "num_frames": request.frames,
            "height": request.height,
            "width": request.width,
            "frame_rate": request.fps,  # scales the rotary positions in time
            "num_inference_steps": request.steps,
            "guidance_scale": request.guidance_scale,
            "generator": generator,
            "output_type": "latent",
            # Unused with latent output; given so that a stock call decoding itself decodes as `decode`.
            "decode_timestep": decode_timestep,
            "decode_noise_scale": noise_scale,
        }

    @staticmethod
    def latent_grid(pipe: Any, request: GenerationRequest) -> tuple[int, int, int, int, int]:
        """(latent frames, height, width, spatial patch, temporal patch), as the pipeline computes them."""
        frames = (request.frames - 1) // pipe.vae_temporal_compression_ratio + 1
        height = request.height // pipe.vae_spatial_compression_ratio
        width = request.width // pipe.vae_spatial_compression_ratio
        return (
            frames,
            height,
            width,
            pipe.transformer_spatial_patch_size,
            pipe.transformer_temporal_patch_size,
        )

    @staticmethod
    def decode_settings(pipe: Any) -> tuple[float, float]:
        if pipe.vae.config.timestep_conditioning:
            return DECODE_TIMESTEP, DECODE_NOISE_SCALE
        return 0.0, 0.0

    def unpack(self, packed: Any, grid: tuple[int, int, int, int, int]) -> Any:
        """[B, tokens, C * pt * p * p] -> [B, C, F, H, W]. Tokens are frame-major, so a leading part of
        whole latent frames (a preview fit's first frame) unpacks too."""
        frames, height, width, patch, patch_t = grid
        per_frame = (height // patch) * (width // patch)
        if packed.shape[1] % per_frame:
            raise ValueError(f"{packed.shape[1]} tokens are not whole latent frames of {per_frame}")
        post_frames = packed.shape[1] // per_frame
        batch = packed.shape[0]
        # The inverse of LTXPipeline._pack_latents (its own _unpack_latents, written out: it is private).
        x = packed.reshape(batch, post_frames, height // patch, width // patch, -1, patch_t, patch, patch)
        return x.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)

    def denoiser_input(self, scheduler: Any, latent: Any, timestep: Any, current_input: Any) -> Any:
        import torch

        # The loop doubles the latent for CFG and casts it; flow-matching Euler scales nothing.
        doubled = current_input.shape[0] == 2 * latent.shape[0]
        return (torch.cat([latent] * 2) if doubled else latent).to(current_input.dtype)

    def decode(self, pipe: Any, latents: Any, request: GenerationRequest) -> np.ndarray:
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        vae = pipe.vae
        grid = self.latent_grid(pipe, request)
        x = self.unpack(latents, grid)
        # As LTXPipeline decodes: undo the per-channel normalisation, in the prompt embeddings' dtype.
        mean = vae.latents_mean.view(1, -1, 1, 1, 1).to(x.device, x.dtype)
        std = vae.latents_std.view(1, -1, 1, 1, 1).to(x.device, x.dtype)
        x = (x * std / vae.config.scaling_factor + mean).to(pipe.text_encoder.dtype)
        timestep = None
        if vae.config.timestep_conditioning:
            decode_timestep, noise_scale = self.decode_settings(pipe)
            # The pipeline draws the decode noise from the job's generator after the initial latent;
            # the worker's generator is a CPU one seeded with the request's seed, so replay both draws.
            generator = torch.Generator("cpu").manual_seed(request.seed)
            frames, height, width, _, _ = grid
            channels = pipe.transformer.config.in_channels
            randn_tensor(
                (latents.shape[0], channels, frames, height, width),
                generator=generator,
                device=x.device,
                dtype=torch.float32,
            )
            noise = randn_tensor(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            timestep = torch.tensor([decode_timestep] * x.shape[0], device=x.device, dtype=x.dtype)
            scale = torch.tensor([noise_scale] * x.shape[0], device=x.device, dtype=x.dtype)
            scale = scale[:, None, None, None, None]
            x = (1 - scale) * x + scale * noise
        video = vae.decode(x.to(vae.dtype), timestep, return_dict=False)[0]
        frames = pipe.video_processor.postprocess_video(video, output_type="pt")[0]
        return to_uint8_frames(frames)

    def preview_part(self, x0: Any) -> Any:
        """The first latent frame's tokens: the smallest part of the packed x0 that decodes alone."""
        _, height, width, patch, _ = self._require_grid()
        return x0[:, : (height // patch) * (width // patch)]

    def preview_images(self, x0: Any) -> tuple[Any, list[int]]:
        x = self.unpack(x0, self._require_grid())
        return causal_video_preview(x[0].transpose(0, 1), self._temporal)

    def _require_grid(self) -> tuple[int, int, int, int, int]:
        if self._grid is None:
            raise RuntimeError("LTX previews need the job's latent grid: call pipeline_kwargs first")
        return self._grid
