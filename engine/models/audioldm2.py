"""AudioLDM2 (text to audio): AudioLDM2Pipeline, latents [B, C, T/4, mel bins/4]."""

from __future__ import annotations

from typing import Any

import numpy as np

from engine.catalog import ModelEntry, component_config, pickle_allowed
from engine.errors import UserError
from engine.models.base import FamilyAdapter, LatentRows, unet_block_count, unet_blocks
from engine.protocol import GenerationRequest

MAX_SECONDS = 60.0


class AudioLDM2Adapter(FamilyAdapter):
    family = "audioldm2"
    denoiser_class = "AudioLDM2UNet2DConditionModel"
    denoiser_component = "unet"
    modality = "audio"
    published_steps = 200
    published_warmup = 5
    defaults = {"steps": 200, "guidance_scale": 3.5, "seconds": 10.0}

    def min_seconds(self, entry: ModelEntry) -> float:
        """One latent frame of audio: the shortest length the pipeline can make."""
        vocoder = component_config(entry, "vocoder")
        vae = component_config(entry, "vae")
        hop = np.prod(vocoder["upsample_rates"]) / vocoder["sampling_rate"]
        return float(hop * 2 ** (len(vae["block_out_channels"]) - 1))

    def component_overrides(self, entry: ModelEntry, dtype: Any) -> dict[str, Any]:
        """cvssp/audioldm2* name `GPT2Model` as the language model; the pipeline generates with it,
        which needs the generation mixin of `GPT2LMHeadModel` (same weights, tied head)."""
        from engine.catalog import read_model_json

        index = read_model_json(entry.path / "model_index.json")
        if index.get("language_model", [None, None])[1] != "GPT2Model":
            return {}
        from transformers import GPT2LMHeadModel

        model = GPT2LMHeadModel.from_pretrained(
            str(entry.path / "language_model"),
            local_files_only=True,
            use_safetensors=None if pickle_allowed(entry) else True,
            dtype=dtype,
        )
        return {"language_model": model}

    def check(self, request: GenerationRequest, entry: ModelEntry) -> None:
        shortest = self.min_seconds(entry)
        if request.seconds is None or not shortest <= request.seconds <= MAX_SECONDS:
            raise UserError(
                f"Audio length {request.seconds} s is out of range for this model "
                f"({shortest:.3f} to {MAX_SECONDS:.0f} s).",
                f"Use --seconds between {shortest:.3f} and {MAX_SECONDS:.0f}.",
                field="seconds",
                value=None
                if request.seconds is None
                else round(min(max(request.seconds, shortest), MAX_SECONDS), 2),
            )

    def pipeline_kwargs(self, pipe: Any, request: GenerationRequest, generator: Any) -> dict[str, Any]:
        return {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt or None,
            "audio_length_in_s": request.seconds,
            "num_inference_steps": request.steps,
            "guidance_scale": request.guidance_scale,
            "num_waveforms_per_prompt": 1,
            "generator": generator,
            "output_type": "latent",
        }

    def output_rate(self, pipe: Any, request: GenerationRequest) -> float:
        return float(pipe.vocoder.config.sampling_rate)

    def decode(self, pipe: Any, latents: Any, request: GenerationRequest) -> np.ndarray:
        mel = pipe.vae.decode(latents.to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample
        audio = pipe.mel_spectrogram_to_waveform(mel)[0]
        length = int(request.seconds * pipe.vocoder.config.sampling_rate)
        return audio[:length].float().cpu().numpy().astype(np.float32)

    def preview_target(self, pipe: Any, x0: Any, request: GenerationRequest) -> Any:
        """The decoded mel spectrogram, laid out as the preview lays out the latent."""
        mel = pipe.vae.decode(x0[:1].to(pipe.vae.dtype) / pipe.vae.config.scaling_factor).sample.float()
        return mel[0].transpose(1, 2).flip(1).unsqueeze(0)  # [1, 1, F, T]

    def preview_images(self, x0: Any) -> tuple[Any, list[int]]:
        # [C, T, F] -> one image [C, F, T]: time runs left to right, low frequencies at the bottom.
        return x0[0].transpose(1, 2).flip(1).unsqueeze(0), [0]

    def denoiser_blocks(self, denoiser: Any) -> list[tuple[str, Any]]:
        return unet_blocks(denoiser)

    def block_count(self, config: dict[str, Any]) -> int:
        return unet_block_count(config, has_mid=config.get("mid_block_type", "") is not None)

    def latent_rows(self, entry: ModelEntry, request: GenerationRequest) -> LatentRows:
        """Bands of the mel spectrogram's time axis, with the pipeline's own arithmetic."""
        import math

        vocoder = component_config(entry, "vocoder")
        scale = 2 ** (len(component_config(entry, "vae")["block_out_channels"]) - 1)
        hop = np.prod(vocoder["upsample_rates"]) / vocoder["sampling_rate"]
        rows = math.ceil(int(request.seconds / hop) / scale)
        downsamplers = len(component_config(entry, "unet")["down_block_types"]) - 1
        return LatentRows(rows, 2**downsamplers, "seconds", float(hop * scale))
