"""Stable Audio Open (text to audio): StableAudioPipeline, latents [B, C, L], 44.1 kHz stereo.

The loop's shape, which the strategies read from here: with guidance on, the transformer is called
once per step on a batch holding the unconditional half, then the conditional half (batched CFG, as
CogVideoX); the timestep goes in as a one-element tensor and the rotary embedding as a (cos, sin)
pair, neither batched. The latent always spans the model's whole length, `sample_size` latent frames
of `hop_length` (the product of the VAE's downsampling ratios) samples each: the requested length
(`audio_end_in_s`) only conditions the transformer through the duration embedding and trims the
decoded waveform. So the latent's size, and every strategy's traffic, does not depend on `seconds`.

The scheduler is CosineDPMSolverMultistepScheduler: SDE DPM-Solver++ (2nd order) whose every step
adds noise from a Brownian tree (torchsde) seeded with the generator's *initial* seed. The noise of a
step is a function of that seed and the step's two sigmas alone, not of the queries made before, so
every ParaStep rank, every scheduler copy and a fresh tree all draw the same noise at a step. A tree
that has been queried cannot be deep-copied (torchsde's LRU cache breaks), hence `copy_scheduler`.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Any

import numpy as np

from engine.catalog import ModelEntry, component_config
from engine.errors import UserError
from engine.models.base import FamilyAdapter
from engine.protocol import GenerationRequest

# The published schedule runs from sigma_max (in float32, a hair above it) down to 0 while the tree spans
# [sigma_min, sigma_max]; torchsde clamps such queries (the last step's noise is 0) and warns at every
# one of them, in the stock pipeline too. The clamping is the intended behaviour: keep the log readable.
warnings.filterwarnings("ignore", message=r"Should have t[ab]", category=UserWarning, module=r"torchsde\.")

# Preview colours: the energy below LOW_HZ (red), between (green) and above HIGH_HZ (blue) per latent frame.
LOW_HZ, HIGH_HZ = 500.0, 4000.0


class StableAudioAdapter(FamilyAdapter):
    family = "stable-audio"
    modality = "audio"
    # The pipeline's own default is 100 steps (the model card's example uses 100 too); guidance 7.0.
    # No ParaStep warm-up is published for this model: a tenth of the steps, as a second-order
    # solver's history needs a few exact steps before reused predictions enter it.
    published_steps = 100
    published_warmup = 10
    defaults = {"steps": 100, "guidance_scale": 7.0, "seconds": 10.0}
    separate_guidance_calls = False

    # ---- engine side --------------------------------------------------------------------------------
    def lengths(self, entry: ModelEntry) -> tuple[float, float]:
        """(shortest, longest) `seconds`: one output sample, and the whole latent (sample_size
        frames of hop_length samples) or the duration conditioner's maximum if that is lower."""
        transformer = component_config(entry, "transformer")
        vae = component_config(entry, "vae")
        projection = component_config(entry, "projection_model")
        rate = float(vae.get("sampling_rate", 44100))
        hop = math.prod(vae.get("downsampling_ratios", [2, 4, 4, 8, 8]))
        longest = float(transformer.get("sample_size", 1024)) * hop / rate
        longest = min(longest, float(projection.get("max_value", longest)))
        return 1.0 / rate, longest

    def check(self, request: GenerationRequest, entry: ModelEntry) -> None:
        import importlib.util

        if importlib.util.find_spec("torchsde") is None:  # else diffusers loads a dummy scheduler
            raise UserError(
                "Stable Audio's scheduler (CosineDPMSolverMultistepScheduler) needs torchsde, which is not "
                "installed.",
                "Run `pip install torchsde` in the app's environment.",
            )
        shortest, longest = self.lengths(entry)
        if request.seconds is None or not shortest <= request.seconds <= longest:
            shown = math.floor(longest * 100) / 100  # rounded down: the value shown is always allowed
            raise UserError(
                f"Audio length {request.seconds} s is out of range for this model (up to {shown:.2f} s, "
                "the length its latent spans).",
                f"Use --seconds above 0 and at most {shown:.2f}.",
            )

    # ---- worker side --------------------------------------------------------------------------------
    def pipeline_kwargs(self, pipe: Any, request: GenerationRequest, generator: Any) -> dict[str, Any]:
        return {
            "prompt": request.prompt,
            "negative_prompt": request.negative_prompt or None,
            "audio_start_in_s": 0.0,
            "audio_end_in_s": request.seconds,
            "num_inference_steps": request.steps,
            "guidance_scale": request.guidance_scale,
            "num_waveforms_per_prompt": 1,
            # The scheduler seeds its Brownian tree from this generator's initial seed.
            "generator": generator,
            "output_type": "latent",
        }

    def output_rate(self, pipe: Any, request: GenerationRequest) -> float:
        return float(pipe.vae.config.sampling_rate)

    def decode(self, pipe: Any, latents: Any, request: GenerationRequest) -> np.ndarray:
        """As the pipeline decodes: the whole latent, then samples [0, seconds * rate). Stereo
        float32 [S, 2] (mono models: [S])."""
        audio = pipe.vae.decode(latents.to(pipe.vae.dtype)).sample
        end = int(request.seconds * pipe.vae.config.sampling_rate)
        waveform = audio[0, :, :end].float().cpu().numpy().astype(np.float32).T  # [S, channels]
        return waveform[:, 0].copy() if waveform.shape[1] == 1 else np.ascontiguousarray(waveform)

    def copy_scheduler(self, scheduler: Any) -> Any:
        """A copy without the Brownian tree (a used one cannot be deep-copied); the copy builds a
        fresh one from the same seed at its next step, which draws the same noise (see above)."""
        tree = scheduler.__dict__.get("noise_sampler")
        scheduler.noise_sampler = None
        try:
            return copy.deepcopy(scheduler)
        finally:
            scheduler.noise_sampler = tree

    def preview_images(self, x0: Any) -> tuple[Any, list[int]]:
        # [B, C, L] -> one image [1, C, 1, L]: a strip, time left to right.
        return x0[:1].unsqueeze(2), [0]

    def preview_target(self, pipe: Any, x0: Any, request: GenerationRequest) -> Any:
        """What the strip shows per latent frame: log energy of the mono mix in three bands (RGB)."""
        import torch

        audio = pipe.vae.decode(x0[:1].to(pipe.vae.dtype)).sample.float()  # [1, channels, L * hop]
        frames = x0.shape[-1]
        mono = audio[0].mean(0)
        hop = mono.shape[0] // frames
        spectrum = torch.fft.rfft(mono[: hop * frames].reshape(frames, hop)).abs().square()  # [L, bins]
        hz = torch.fft.rfftfreq(hop, 1.0 / pipe.vae.config.sampling_rate)
        bands = [hz < LOW_HZ, (hz >= LOW_HZ) & (hz < HIGH_HZ), hz >= HIGH_HZ]
        energy = torch.stack([spectrum[:, band].sum(1) for band in bands])  # [3, L]
        return torch.log10(energy + 1e-8).reshape(1, 3, 1, frames)
