"""Train the embedded `shapes` text-to-video model (CogVideoX architecture) on procedural clips.

    nice -n 19 .venv/bin/python -m scripts.train_shapes [--out resources/models/shapes] > train.log

Stages (``--stage``; ``all`` runs them in order, each saving into ``--work``):

* ``vae``: the causal 3D VAE (AutoencoderKLCogVideoX, 4x spatial and 4x temporal compression) on clips from
  ``resources.shapes_data``, with its reconstruction measured (PSNR, and whether colour, shape and motion
  can still be read back from it);
* ``decoder``, then ``sharpen``: the decoder alone, the encoder frozen, first with the pixel loss, then with
  an edge loss added (``edge_error``). The latent space stays stage 1's;
* ``robust``: encoder and decoder together, with noise on the latents before decoding, so that what tells
  the shapes apart survives errors of a denoiser's size. It moves the latent space: run it before
  ``transformer``, which encodes with the newest VAE and refuses to save if the encoder changed meanwhile;
* ``transformer``: encodes a fixed set of clips once and trains a small CogVideoXTransformer3DModel (3D
  rotary positions, as CogVideoX-5b) with v-prediction on those latents, conditioned on a frozen random T5
  encoder over a word-level tokenizer built here. The text goes through exactly the pipeline's
  ``encode_prompt`` (padded to the transformer's 16 text tokens, no attention mask, the empty prompt for
  guidance), so training sees what inference sees. The result is saved with
  ``CogVideoXPipeline.save_pretrained`` (safetensors) plus ``studio.json`` and the preview factors.

Loss curves go to ``docs/``. Everything is seeded. The default step counts are those of the shipped model;
docs/models.md gives the commands and times, and where the VAE loops were cut short.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
)
from diffusers.utils import logging as diffusers_logging
from PIL import Image, ImageDraw
from transformers import T5Tokenizer
from transformers.utils import logging as transformers_logging

from engine.previews import write_model_factors
from resources import EMBEDDED_MODELS_DIR
from resources import shapes_data as data
from resources.build_tiny_models import FALLBACK_CHARS, build_t5_encoder, save_model

SEED = 0
ROOT = Path(__file__).resolve().parent.parent
# Every prompt is padded to this many tokens (the transformer's max_text_seq_length, which the engine passes
# as the pipeline's max_sequence_length). The grammar's longest prompt is 10 tokens; CogVideoX-2b's 226 would
# make 80% of the transformer's work padding.
MAX_TEXT_TOKENS = 16
TEXT_DIM = 64
LATENT_CHANNELS = 8
DEFAULTS = {"steps": 20, "frames": data.FRAMES, "height": data.SIZE, "width": data.SIZE, "fps": 8}


class StopFlag:
    """Set by ``--stop-after`` or SIGUSR1: a loop ends early but keeps its full-length LR schedule, so a run
    cut at step K is the same as ``--stop-after K`` with the same step counts."""

    def __init__(self, after: int | None) -> None:
        self.after = after
        self.signalled = False
        signal.signal(signal.SIGUSR1, self._on_signal)

    def _on_signal(self, *_: object) -> None:
        self.signalled = True

    def __call__(self, step: int) -> bool:
        return self.signalled or (self.after is not None and step >= self.after)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- Components ---------------------------------------------------------------------------------------


def build_tokenizer() -> T5Tokenizer:
    """A T5 (unigram) tokenizer with one piece per grammar word, falling back to single characters."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + word, -2.0) for word in dict.fromkeys(data.WORDS)]
    pieces += [("\u2581", -3.0)] + [(char, -5.0) for char in FALLBACK_CHARS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=MAX_TEXT_TOKENS)


def build_vae() -> AutoencoderKLCogVideoX:
    torch.manual_seed(SEED)
    return AutoencoderKLCogVideoX(
        down_block_types=("CogVideoXDownBlock3D",) * 3,  # 3 blocks: 4x spatial compression
        up_block_types=("CogVideoXUpBlock3D",) * 3,
        block_out_channels=(16, 32, 64),
        latent_channels=LATENT_CHANNELS,
        layers_per_block=1,
        norm_num_groups=8,
        temporal_compression_ratio=4,
        sample_height=data.SIZE,
        sample_width=data.SIZE,
    )


def build_transformer(layers: int, patch_size: int) -> CogVideoXTransformer3DModel:
    torch.manual_seed(SEED)
    return CogVideoXTransformer3DModel(
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        time_embed_dim=64,
        text_embed_dim=TEXT_DIM,
        num_layers=layers,
        sample_width=data.SIZE // 4,
        sample_height=data.SIZE // 4,
        sample_frames=data.FRAMES,
        patch_size=patch_size,
        temporal_compression_ratio=4,
        max_text_seq_length=MAX_TEXT_TOKENS,
        # CogVideoX-5b's 3D rotary positions: attention sees relative offsets in time and space, which
        # is what a motion is (with 2b's sin-cos table on this 4 x 4 grid, directions were not learned).
        use_rotary_positional_embeddings=True,
    )


def build_scheduler() -> CogVideoXDDIMScheduler:
    return CogVideoXDDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        rescale_betas_zero_snr=True,
        snr_shift_scale=1.0,  # no shift at this size; the same alphas in training and sampling
    )


# --- Data -------------------------------------------------------------------------------------------


def render_batch(specs: list[data.ClipSpec], rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The clips of ``specs`` as VAE input [B, 3, F, H, W] in [-1, 1] and their foreground [B, F, H, W]
    (1 where a pixel differs from the background)."""
    clips = np.stack([data.render(spec, rng) for spec in specs])  # [B, F, H, W, 3]
    backgrounds = np.array([data.BACKGROUNDS[s.background] for s in specs], np.float32)[:, None, None, None]
    foreground = (np.abs(clips - backgrounds).sum(-1) > 0.02).astype(np.float32)
    video = torch.from_numpy(clips).permute(0, 4, 1, 2, 3) * 2 - 1
    return video.contiguous(), torch.from_numpy(foreground)


def clip_batch(
    rng: np.random.Generator, count: int
) -> tuple[torch.Tensor, torch.Tensor, list[data.ClipSpec]]:
    """``count`` random clips as VAE input [B, 3, F, H, W] in [-1, 1], a foreground weight map, specs."""
    specs = [data.random_spec(rng) for _ in range(count)]
    video, foreground = render_batch(specs, rng)
    return video, foreground[:, None], specs


def to_frames(video: torch.Tensor) -> np.ndarray:
    """VAE output [B, 3, F, H, W] in [-1, 1] -> uint8 [B, F, H, W, 3]."""
    frames = ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(0, 2, 3, 4, 1).numpy()


def lr_at(step: int, steps: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


# --- Stage 1: the VAE -------------------------------------------------------------------------------


def train_vae(
    steps: int, batch: int, checkpoint: Path, stop: StopFlag, kl_weight: float = 1e-3
) -> tuple[AutoencoderKLCogVideoX, list[float]]:
    vae = build_vae()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    rng = np.random.default_rng(SEED)
    losses, started = [], time.time()
    for step in range(steps):
        if stop(step):
            log(f"vae stopped at step {step}/{steps}")
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, 2e-3)
        video, foreground, _ = clip_batch(rng, batch)
        posterior = vae.encode(video).latent_dist
        recon = vae.decode(posterior.sample()).sample
        weight = 1 + 4 * foreground  # the shape is a small part of the frame: weigh its pixels up
        error = recon - video
        loss = (weight * (error.abs() + error**2)).mean() + kl_weight * posterior.kl().mean() / error[
            0
        ].numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps} loss {np.mean(losses[-100:]):.4f} ({time.time() - started:.0f} s)")
            vae.save_pretrained(checkpoint, safe_serialization=True)  # a run cut short keeps its progress
    return vae.eval(), losses


def edge_error(recon: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
    """Mean absolute error of the horizontal and vertical pixel differences: it rises with every blurred
    edge, which is what rounds a reconstructed shape's corners (a square's, when the world had one)."""
    error = recon - video
    return (error.diff(dim=-1).abs().mean() + error.diff(dim=-2).abs().mean()) / 2


def tune_vae(
    vae: AutoencoderKLCogVideoX,
    steps: int,
    batch: int,
    stop: StopFlag,
    lr: float = 1e-3,
    edge_weight: float = 0.0,
    latent_noise: float = 0.0,
    seed: int = SEED + 5,
) -> tuple[AutoencoderKLCogVideoX, list[float]]:
    """Fine-tunes a trained VAE. Without ``latent_noise`` only the decoder learns, the encoder frozen: the
    latent space stays valid while the reconstruction sharpens. With it the encoder learns too, and each
    clip's latents get Gaussian noise of a random level up to ``latent_noise`` times the latents' std before
    decoding: the difference between two shapes must then survive errors of the size a denoiser makes
    (the stage-1 latents carried a square's corners in details that noise of 0.1 std erased). The noise is
    relative to the latents' own spread, so growing the latents does not escape it. ``edge_weight`` adds
    ``edge_error``."""
    vae.requires_grad_(False)
    tuned = vae if latent_noise else vae.decoder
    tuned.requires_grad_(True)
    optimizer = torch.optim.AdamW(tuned.parameters(), lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    losses, started = [], time.time()
    for step in range(steps):
        if stop(step):
            log(f"VAE tuning stopped at step {step}/{steps}")
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=20)
        video, foreground, _ = clip_batch(rng, batch)
        with torch.set_grad_enabled(bool(latent_noise)):
            latents = vae.encode(video).latent_dist.sample()
        if latent_noise:
            level = latent_noise * torch.rand(len(latents), 1, 1, 1, 1, generator=generator)
            latents = latents + level * latents.std().detach() * torch.randn(
                latents.shape, generator=generator
            )
        recon = vae.decode(latents).sample
        error = recon - video
        loss = ((1 + 4 * foreground) * (error.abs() + error**2)).mean()
        if edge_weight:
            loss = loss + edge_weight * edge_error(recon, video)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tuned.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == steps - 1:
            mean = np.mean(losses[-50:])
            log(f"VAE tuning step {step}/{steps} loss {mean:.4f} ({time.time() - started:.0f} s)")
    vae.requires_grad_(True)
    return vae.eval(), losses


@torch.no_grad()
def measure_vae(vae: AutoencoderKLCogVideoX, count: int = 240) -> dict[str, float]:
    """Reconstruction PSNR on held-out clips and how often each attribute survives the round trip."""
    rng = np.random.default_rng(SEED + 1)
    psnrs, passes = [], {"colour": [], "shape": [], "motion": [], "background": []}
    for start in range(0, count, 16):
        video, _, specs = clip_batch(rng, min(16, count - start))
        recon = vae.decode(vae.encode(video).latent_dist.mode()).sample.clamp(-1, 1)
        mse = ((recon - video) / 2).pow(2).mean(dim=(1, 2, 3, 4))
        psnrs += (10 * torch.log10(1 / mse)).tolist()
        for frames, spec in zip(to_frames(recon), specs, strict=True):
            for name, ok in data.check_clip(frames, spec).items():
                passes[name].append(ok)
    result = {"psnr_db": float(np.mean(psnrs))}
    result.update({f"{name}_readback": float(np.mean(ok)) for name, ok in passes.items()})
    return result


def tune_stage(args: argparse.Namespace, source: str, target: str, name: str, title: str, **tuning) -> None:
    """``tune_vae`` on the VAE in work/``source``, saved to work/``target``, measured into
    work/``name``-report.json, its loss curve to docs/shapes-``name``-loss.png."""
    started = time.time()
    vae = AutoencoderKLCogVideoX.from_pretrained(args.work / source)
    vae, losses = tune_vae(vae, batch=args.vae_batch, stop=StopFlag(args.stop_after), **tuning)
    report = {"steps_done": len(losses), "minutes": (time.time() - started) / 60, **measure_vae(vae)}
    log(f"VAE after the {name} stage: {report}")
    vae.save_pretrained(args.work / target, safe_serialization=True)
    draw_curve(losses, title, args.docs / f"shapes-{name}-loss.png")
    (args.work / f"{name}-report.json").write_text(json.dumps(report, indent=1))


def latest_vae(work: Path) -> AutoencoderKLCogVideoX:
    """The last VAE stage's result (robust, else sharpen, decoder, stage 1)."""
    folders = [
        folder for name in ("vae-robust", "vae-sharp", "vae-tuned", "vae") if (folder := work / name).exists()
    ]
    if not folders:
        raise SystemExit(f"no VAE in {work}: run the vae stage first (or copy a trained VAE to {work}/vae)")
    folder = folders[0]
    log(f"VAE from {folder}")
    return AutoencoderKLCogVideoX.from_pretrained(folder).eval()


# --- Stage 2: the transformer -----------------------------------------------------------------------


def latent_foreground(foreground: torch.Tensor, spatial: int = 4, temporal: int = 4) -> torch.Tensor:
    """Pixel foreground [B, F, H, W] -> [B, F', 1, h, w] on the latent grid (transformer layout): a latent
    is foreground when any pixel it encodes is. The causal VAE gives frame 0 a latent frame of its own and
    each later group of ``temporal`` frames one."""
    grouped = torch.cat([foreground[:, :1], foreground[:, 1:].unflatten(1, (-1, temporal)).amax(2)], dim=1)
    return torch.nn.functional.max_pool2d(grouped, spatial).unsqueeze(2)


@torch.no_grad()
def encode_dataset(
    vae: AutoencoderKLCogVideoX, count: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[str]]:
    """Latent means and stds [N, C, F', h, w] of ``count`` clips covering every prompt evenly, their
    latent foreground [N, F', 1, h, w] and their prompts."""
    rng = np.random.default_rng(SEED + 2)
    specs = data.all_specs()
    order = [specs[i % len(specs)] for i in range(count)]
    means, stds, foregrounds = [], [], []
    for start in range(0, count, 32):
        video, foreground = render_batch(order[start : start + 32], rng)
        dist = vae.encode(video).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
        foregrounds.append(latent_foreground(foreground))
    return torch.cat(means), torch.cat(stds), torch.cat(foregrounds), [spec.prompt for spec in order]


def train_transformer(
    pipe: CogVideoXPipeline,
    means: torch.Tensor,
    stds: torch.Tensor,
    foreground: torch.Tensor,
    prompts: list[str],
    steps: int,
    batch: int,
    stop: StopFlag,
    uncond_rate: float = 0.1,
    ema_decay: float = 0.998,
    foreground_weight: float = 4.0,
) -> list[float]:
    """Trains ``pipe.transformer`` in place (ending with its EMA weights); returns the losses. The error on
    latents that encode the shape counts ``1 + foreground_weight`` times: the shape is a small part of the
    frame, and a triangle's apex is a small part of the shape."""
    transformer, scheduler = pipe.transformer, pipe.scheduler
    scaling = pipe.vae.config.scaling_factor
    with torch.no_grad():  # exactly the pipeline's text path: padded to MAX_TEXT_TOKENS, "" for guidance
        unique = sorted(set(prompts))
        embeds, empty = pipe.encode_prompt(
            unique, do_classifier_free_guidance=True, max_sequence_length=MAX_TEXT_TOKENS, device="cpu"
        )
    embed_of = {prompt: embeds[i] for i, prompt in enumerate(unique)}
    text = torch.stack([embed_of[p] for p in prompts])
    frames = means.shape[2]
    rotary = pipe._prepare_rotary_positional_embeddings(data.SIZE, data.SIZE, frames, "cpu")  # as the loop
    transformer.train()
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=1e-3, weight_decay=0.01)
    ema = [p.detach().clone() for p in transformer.parameters()]
    generator = torch.Generator().manual_seed(SEED + 3)
    losses, started = [], time.time()
    for step in range(steps):
        if stop(step):
            log(f"transformer stopped at step {step}/{steps}")
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, 1e-3)
        index = torch.randint(0, len(prompts), (batch,), generator=generator)
        eps = torch.randn(means[index].shape, generator=generator)
        latents = (means[index] + stds[index] * eps) * scaling  # a VAE sample, scaled: [B, C, F, h, w]
        latents = latents.permute(0, 2, 1, 3, 4)  # the transformer's layout: [B, F, C, h, w]
        noise = torch.randn(latents.shape, generator=generator)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=generator)
        noisy = scheduler.add_noise(latents, noise, t)
        target = scheduler.get_velocity(latents, noise, t)
        cond = text[index].clone()
        drop = torch.rand(batch, generator=generator) < uncond_rate
        cond[drop] = empty[0]
        prediction = transformer(
            hidden_states=noisy,
            encoder_hidden_states=cond,
            timestep=t,
            image_rotary_emb=rotary,
            return_dict=False,
        )[0]
        weight = 1 + foreground_weight * foreground[index]
        loss = (weight * (prediction - target).pow(2)).mean() / weight.mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in transformer.parameters()], 1 - decay)
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            mean = np.mean(losses[-100:])
            log(f"transformer step {step}/{steps} loss {mean:.4f} ({time.time() - started:.0f} s)")
    with torch.no_grad():
        for param, averaged in zip(transformer.parameters(), ema, strict=True):
            param.copy_(averaged)
    transformer.eval()
    return losses


@torch.no_grad()
def quick_check(pipe: CogVideoXPipeline, count: int, guidance_scale: float) -> dict[str, float]:
    """Pass rates of ``count`` generations at the default size over a spread of prompts (a smoke check;
    scripts/evaluate_shapes.py runs the full grid through the engine)."""
    specs = data.all_specs()
    rng = np.random.default_rng(SEED + 4)
    chosen = [specs[i] for i in rng.permutation(len(specs))[:count]]
    passes: dict[str, list[bool]] = {}
    for i, spec in enumerate(chosen):
        video = pipe(
            prompt=spec.prompt,
            num_frames=data.FRAMES,
            height=data.SIZE,
            width=data.SIZE,
            num_inference_steps=DEFAULTS["steps"],
            guidance_scale=guidance_scale,
            use_dynamic_cfg=False,
            max_sequence_length=MAX_TEXT_TOKENS,
            generator=torch.Generator("cpu").manual_seed(i),
            output_type="pt",
        ).frames[0]  # [F, 3, H, W] in [0, 1]
        frames = (video.permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
        for name, ok in data.check_clip(frames, spec).items():
            passes.setdefault(name, []).append(ok)
    return {name: float(np.mean(ok)) for name, ok in passes.items()}


# --- Loss curves --------------------------------------------------------------------------------------


def draw_curve(losses: list[float], title: str, path: Path, width: int = 640, height: int = 360) -> None:
    """A log-scale loss curve (raw in grey, 50-step moving average in blue) drawn with PIL."""
    values = np.log10(np.maximum(np.asarray(losses, float), 1e-8))
    smooth = np.convolve(values, np.ones(50) / 50, mode="valid") if len(values) >= 50 else values
    left, right, top, bottom = 60, 20, 30, 40
    low, high = float(values.min()), float(values.max())
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)

    def point(i: float, v: float) -> tuple[float, float]:
        x = left + (width - left - right) * i / max(1, len(values) - 1)
        y = top + (height - top - bottom) * (high - v) / max(1e-9, high - low)
        return x, y

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for decade in range(math.floor(low), math.ceil(high) + 1):
        for mantissa in (1, 2, 5):
            v = decade + math.log10(mantissa)
            if low <= v <= high:
                _, y = point(0, v)
                draw.line([left - 4, y, left, y], fill="black")
                draw.text((4, y - 6), f"{10**v:.3g}", fill="black")
    for i in np.linspace(0, len(values) - 1, 6):
        x, _ = point(i, low)
        draw.text((x - 10, height - bottom + 6), str(int(i)), fill="black")
    draw.line([point(i, v) for i, v in enumerate(values)], fill=(190, 190, 190))
    offset = (len(values) - len(smooth)) / 2
    draw.line([point(i + offset, v) for i, v in enumerate(smooth)], fill=(30, 80, 200), width=2)
    draw.text((left, 8), f"{title} (log scale; x: step)", fill="black")
    image.save(path)


# --- Main -------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=EMBEDDED_MODELS_DIR / "shapes")
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "shapes", help="stage checkpoints")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs")
    parser.add_argument(
        "--stage", choices=["all", "vae", "decoder", "sharpen", "robust", "transformer"], default="all"
    )
    parser.add_argument("--vae-steps", type=int, default=2400)
    parser.add_argument("--vae-batch", type=int, default=8)
    parser.add_argument("--transformer-steps", type=int, default=8000)
    parser.add_argument("--transformer-batch", type=int, default=32)
    parser.add_argument("--decoder-steps", type=int, default=600)
    parser.add_argument("--sharpen-steps", type=int, default=1200)
    parser.add_argument("--robust-steps", type=int, default=600)
    parser.add_argument("--latent-noise", type=float, default=0.2, help="robust stage: most noise, x std")
    parser.add_argument("--edge-weight", type=float, default=4.0, help="of edge_error in the sharpen stage")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--patch-size", type=int, default=2, help="latents per transformer token, each way")
    parser.add_argument("--clips", type=int, default=5400, help="clips encoded for stage 2 (20 per prompt)")
    parser.add_argument("--guidance-scale", type=float, default=6.0)
    parser.add_argument("--check", type=int, default=12, help="generations in the final smoke check")
    # Two threads alone; one per job when two jobs share the 2 cores (e.g. sharpen beside transformer): a
    # two-thread job's OpenMP barriers stall whenever another process holds a core (0.23 s -> 1.3 s a step).
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--stop-after", type=int, default=None, help="end the stage's loop at this step")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    args.work.mkdir(parents=True, exist_ok=True)
    report_path = args.work / "report.json"
    report = json.loads(report_path.read_text()) if report_path.exists() else {}
    started = time.time()

    if args.stage in ("all", "vae"):
        vae, losses = train_vae(
            args.vae_steps, args.vae_batch, args.work / "vae-checkpoint", StopFlag(args.stop_after)
        )
        report["vae_steps_done"] = len(losses)
        report["vae_minutes"] = (time.time() - started) / 60
        report["vae"] = measure_vae(vae)
        log(f"VAE: {report['vae']} after {report['vae_minutes']:.1f} min")
        vae.save_pretrained(args.work / "vae", safe_serialization=True)
        draw_curve(losses, "shapes VAE loss", args.docs / "shapes-vae-loss.png")
        report_path.write_text(json.dumps(report, indent=1))
    if args.stage == "vae":
        return
    if args.stage in ("all", "decoder"):
        tune_stage(
            args, "vae", "vae-tuned", "decoder", "shapes VAE decoder fine-tune loss", steps=args.decoder_steps
        )
    if args.stage == "decoder":
        return
    if args.stage in ("all", "sharpen"):  # the decoder again, now with the edge loss
        tune_stage(
            args,
            "vae-tuned",
            "vae-sharp",
            "sharpen",
            "shapes VAE decoder sharpening loss",
            steps=args.sharpen_steps,
            lr=5e-4,
            edge_weight=args.edge_weight,
            seed=SEED + 6,
        )
    if args.stage == "sharpen":
        return
    if args.stage in ("all", "robust"):  # encoder and decoder, with noise on the latents
        tune_stage(
            args,
            "vae-sharp",
            "vae-robust",
            "robust",
            "shapes VAE noise-robust tuning loss",
            steps=args.robust_steps,
            lr=5e-4,
            edge_weight=args.edge_weight,
            latent_noise=args.latent_noise,
            seed=SEED + 7,
        )
    if args.stage == "robust":
        return

    stage2 = time.time()
    vae = latest_vae(args.work)
    if "vae" not in report:
        report["vae"] = measure_vae(vae)
    means, stds, foreground, prompts = encode_dataset(vae, args.clips)
    samples = means + stds * torch.randn(means.shape, generator=torch.Generator().manual_seed(SEED))
    scaling = float(1 / samples.std())
    vae.register_to_config(scaling_factor=scaling)  # the pipeline reads it at every decode
    log(f"encoded {len(prompts)} clips in {time.time() - stage2:.0f} s; latent std {1 / scaling:.3f}")

    tokenizer = build_tokenizer()
    text_encoder = build_t5_encoder(len(tokenizer), TEXT_DIM).eval()
    pipe = CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=build_transformer(args.layers, args.patch_size),
        scheduler=build_scheduler(),
    )
    losses = train_transformer(
        pipe,
        means,
        stds,
        foreground,
        prompts,
        args.transformer_steps,
        args.transformer_batch,
        StopFlag(args.stop_after),
    )
    report["transformer_steps_done"] = len(losses)
    report["transformer_minutes"] = (time.time() - stage2) / 60
    draw_curve(losses, "shapes transformer v-prediction loss", args.docs / "shapes-transformer-loss.png")
    log(f"transformer trained in {report['transformer_minutes']:.1f} min")
    # Read again: a sharpen stage run beside this one (on the other core) may have finished meanwhile.
    latest = latest_vae(args.work)
    if any(
        not torch.equal(a, b)
        for a, b in zip(latest.encoder.state_dict().values(), vae.encoder.state_dict().values(), strict=True)
    ):
        raise SystemExit("the newest VAE's encoder is not the one the latents came from: rerun this stage")
    pipe.vae = latest
    pipe.vae.register_to_config(scaling_factor=scaling)

    report["quick_check"] = quick_check(pipe, args.check, args.guidance_scale)
    log(f"quick check ({args.check} generations): {report['quick_check']}")
    description = (
        "CogVideoX architecture trained on procedural clips of a coloured circle, rectangle or triangle "
        "moving left/right/up/down, growing or shrinking on a black, gray or white background. Prompt: "
        "'a red circle moving right on a white background' (colours: red, green, blue, yellow, purple)."
    )
    studio = {
        "family": "cogvideox",
        "description": description,
        "defaults": {**DEFAULTS, "guidance_scale": args.guidance_scale},
    }
    save_model(pipe, studio, args.out)
    write_model_factors(args.out)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    report["folder_mb"] = size / 1e6
    report_path.write_text(json.dumps(report, indent=1))
    log(f"saved {args.out} ({size / 1e6:.2f} MB); report {report}")


if __name__ == "__main__":
    main()
