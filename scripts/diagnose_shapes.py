"""Where the `shapes` model loses a shape: the VAE, the denoiser at each noise level, or the guidance.

    .venv/bin/python -m scripts.diagnose_shapes [--model shapes] [--shape triangle] [--clips 12]

Prints three measurements (docs/models.md quotes them):

1. round trip: rendered clips of the shape through the VAE alone, read back, also with Gaussian noise on
   the latents (a fraction of their spread: how large an error the decoder forgives);
2. partial denoising: the same clips' latents noised to the timestep of step k of the model's default
   schedule and denoised from there with their own prompt, at guidance 1 and at the model's default. A
   denoiser that knows the shape keeps it from low noise levels; where it is lost even there, no sampler
   setting brings it back;
3. guidance interval: full generations of random prompts of every shape, guided only while the timestep
   is above a cut (guidance 1 below it), read back per shape.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from diffusers import CogVideoXPipeline
from diffusers.utils import logging as diffusers_logging

from engine.catalog import ModelCatalog, read_entry
from resources import shapes_data as data


class Denoiser:
    """The model's own transformer and scheduler in a plain DDIM loop that can start at any step and
    change the guidance with the timestep (the pipeline's loop does neither)."""

    def __init__(self, folder: Path) -> None:
        self.pipe = CogVideoXPipeline.from_pretrained(folder)
        self.studio = read_entry(folder).defaults
        self.scaling = self.pipe.vae.config.scaling_factor
        self.pipe.scheduler.set_timesteps(self.studio["steps"])
        self.timesteps = self.pipe.scheduler.timesteps
        frames = (data.FRAMES - 1) // self.pipe.vae_scale_factor_temporal + 1
        self.rotary = self.pipe._prepare_rotary_positional_embeddings(data.SIZE, data.SIZE, frames, "cpu")

    @torch.no_grad()
    def encode(self, clips: np.ndarray) -> torch.Tensor:
        """float clips [B, F, H, W, 3] in [0, 1] -> scaled latents, transformer layout [B, F', C, h, w]."""
        video = torch.from_numpy(clips).permute(0, 4, 1, 2, 3) * 2 - 1
        return (self.pipe.vae.encode(video).latent_dist.mean * self.scaling).permute(0, 2, 1, 3, 4)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        video = self.pipe.vae.decode(latents.permute(0, 2, 1, 3, 4) / self.scaling).sample
        return ((video.permute(0, 2, 3, 4, 1) + 1) / 2).clamp(0, 1).numpy()

    @torch.no_grad()
    def denoise(
        self,
        latents: torch.Tensor,
        prompts: list[str],
        start: int,
        guidance: Callable[[int], float],
        seed: int = 0,
    ) -> torch.Tensor:
        """From ``latents`` noised to step ``start`` (pure noise of their shape at step 0) to the end;
        ``guidance(t)`` is the scale at timestep t."""
        scheduler, generator = self.pipe.scheduler, torch.Generator().manual_seed(seed)
        noise = torch.randn(latents.shape, generator=generator)
        t0 = self.timesteps[start]
        x = noise if start == 0 else scheduler.add_noise(latents, noise, t0.repeat(len(latents)))
        text, empty = self.pipe.encode_prompt(
            prompts,
            do_classifier_free_guidance=True,
            max_sequence_length=self.pipe.transformer.config.max_text_seq_length,
            device="cpu",
        )
        for t in self.timesteps[start:]:
            v = self.pipe.transformer(
                hidden_states=torch.cat([x, x]),
                encoder_hidden_states=torch.cat([empty, text]),
                timestep=t.repeat(2 * len(x)),
                image_rotary_emb=self.rotary,
                return_dict=False,
            )[0]
            unconditional, conditional = v.chunk(2)
            v = unconditional + guidance(int(t)) * (conditional - unconditional)
            x = scheduler.step(v, t, x, return_dict=False)[0]
        return x


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes", help="an embedded model's name or a model folder")
    parser.add_argument("--shape", default="triangle", choices=data.SHAPES)
    parser.add_argument("--clips", type=int, default=12, help="rendered clips of the shape")
    parser.add_argument("--prompts", type=int, default=48, help="random prompts of the guidance interval")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    diffusers_logging.disable_progress_bar()
    folder = ModelCatalog().resolve(args.model).path
    model = Denoiser(folder)
    default = model.studio["guidance_scale"]

    rng = np.random.default_rng(123)  # not the evaluation's seeds
    specs = [s for s in data.all_specs() if s.shape == args.shape]
    specs = [specs[i] for i in rng.choice(len(specs), args.clips, replace=False)]
    prompts = [s.prompt for s in specs]
    latents = model.encode(np.stack([data.render(s, rng) for s in specs]))

    def kept(clips: np.ndarray) -> str:
        return f"{sum(data.read_shape(c) == args.shape for c in clips)}/{len(clips)}"

    print(
        f"{folder}: {args.clips} rendered {args.shape}s, read back after the VAE alone, noise on the latents:"
    )
    generator = torch.Generator().manual_seed(1)
    for level in (0.0, 0.05, 0.1, 0.2):
        noisy = latents + level * latents.std() * torch.randn(latents.shape, generator=generator)
        print(f"  {level:g} x their spread: {kept(model.decode(noisy))}")
    print(f"partial denoising ({len(model.timesteps)}-step schedule), {args.shape}s kept:")
    for start in (len(model.timesteps) - 1, len(model.timesteps) - 2, 15, 10, 5, 0):
        row = []
        for scale in (1.0, default):
            denoised = model.denoise(latents, prompts, start, lambda t, g=scale: g)
            row.append(f"guidance {scale:g}: {kept(model.decode(denoised))}")
        print(f"  from t = {int(model.timesteps[start]):3d}  " + "   ".join(row), flush=True)

    every = data.all_specs()
    specs = [every[i] for i in rng.choice(len(every), args.prompts, replace=False)]
    noise = torch.zeros(len(specs), *latents.shape[1:])
    print(f"guidance interval: {args.prompts} random prompts, guidance {default:g} above the cut, 1 below")
    for cut in (-1, 200, 400, 600, 1000):
        frames = model.decode(
            model.denoise(
                noise, [s.prompt for s in specs], 0, lambda t, c=cut: default if t > c else 1.0, seed=1000
            )
        )
        checks = [data.check_clip(f, s) for s, f in zip(specs, frames, strict=True)]
        asked = Counter(s.shape for s in specs)
        right = Counter(s.shape for s, check in zip(specs, checks, strict=True) if check["shape"])
        other = {name: sum(check[name] for check in checks) for name in ("colour", "motion", "background")}
        shapes = ", ".join(f"{shape} {right[shape]}/{asked[shape]}" for shape in data.SHAPES)
        print(
            f"  cut {cut:5d}: {shapes}; " + ", ".join(f"{k} {v}/{len(specs)}" for k, v in other.items()),
            flush=True,
        )


if __name__ == "__main__":
    main()
