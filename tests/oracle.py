"""A single-process reference of ParaStep as published (DESIGN.md section 3), for the strategy tests.

Written independently of engine.strategies and engine.worker: nothing is imported from them.

The stock diffusers pipeline is run once, in this process, to obtain what the family's loop feeds
its denoiser: a forward pre-hook on the denoiser records the first call's arguments (prompt
embeddings, SVD's image latents/embeddings/added_time_ids, AudioLDM2's generated_prompt_embeds,
...), and a signature-preserving wrapper around `scheduler.step` records the initial latent, the
extra step arguments and the scheduler state before step 0. The stock run's own final latent is
kept too, so the reference loop below can be checked against it.

The loop is then rebuilt here per family (CFG doubling, `scale_model_input`, SVD's image-latent
concatenation, guidance as the family combines it, `scheduler.step`), and ParaStep's N ranks are
simulated one after another:

- warm-up steps 0..W-1 are exact (every rank computes the same output; all caches become it);
- a round at step s of n = min(N, T - s) steps: rank 0 evaluates the denoiser at x_s; rank k
  (1 <= k < n) advances k steps from x_s with its own cached prediction, evaluates the denoiser at
  step s + k on that latent, and that output becomes its new cache; rank 0 then applies the n
  predictions in order with the ordinary scheduler step. Every rank keeps its own scheduler, stepped
  at every step with what it applies (a multistep scheduler's history is the rank's own).

Only rank 0's trajectory is returned.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

FAMILIES = ("cogvideox", "svd", "audioldm2", "ltx")  # stable-audio: tests/test_stable_audio.py


@contextlib.contextmanager
def single_thread():
    """One intra-op thread, as the engine's CPU workers use, for deterministic float32 results."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def load_pipeline(path: str | Path) -> Any:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(
        str(path), local_files_only=True, use_safetensors=True, dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to("cpu")


def stock_kwargs(family: str, params: dict[str, Any]) -> dict[str, Any]:
    """The arguments the stock pipeline is called with (latent output, the request's values)."""
    generator = torch.Generator("cpu").manual_seed(params["seed"])
    if family == "cogvideox":
        return {
            "prompt": params["prompt"],
            "negative_prompt": params.get("negative_prompt") or None,
            "num_frames": params["frames"],
            "height": params["height"],
            "width": params["width"],
            "num_inference_steps": params["steps"],
            "guidance_scale": params["guidance_scale"],
            "use_dynamic_cfg": False,
            "generator": generator,
            "output_type": "latent",
        }
    if family == "ltx":
        return {
            "prompt": params["prompt"],
            "negative_prompt": params.get("negative_prompt") or None,
            "num_frames": params["frames"],
            "height": params["height"],
            "width": params["width"],
            "frame_rate": params["fps"],
            "num_inference_steps": params["steps"],
            "guidance_scale": params["guidance_scale"],
            "generator": generator,
            "output_type": "latent",
        }
    if family == "svd":
        from PIL import Image

        with Image.open(params["image"]) as image:
            rgb = image.convert("RGB")
        return {
            "image": rgb,
            "num_frames": params["frames"],
            "height": params["height"],
            "width": params["width"],
            "fps": params["fps"],
            "num_inference_steps": params["steps"],
            "min_guidance_scale": 1.0,
            "max_guidance_scale": params["guidance_scale"],
            "generator": generator,
            "output_type": "latent",
        }
    if family == "audioldm2":
        return {
            "prompt": params["prompt"],
            "negative_prompt": params.get("negative_prompt") or None,
            "audio_length_in_s": params["seconds"],
            "num_inference_steps": params["steps"],
            "guidance_scale": params["guidance_scale"],
            "num_waveforms_per_prompt": 1,
            "generator": generator,
            "output_type": "latent",
        }
    if family == "stable-audio":
        return {
            "prompt": params["prompt"],
            "negative_prompt": params.get("negative_prompt") or None,
            "audio_start_in_s": 0.0,
            "audio_end_in_s": params["seconds"],
            "num_inference_steps": params["steps"],
            "guidance_scale": params["guidance_scale"],
            "num_waveforms_per_prompt": 1,
            "generator": generator,  # also seeds the SDE scheduler's Brownian tree (initial seed)
            "output_type": "latent",
        }
    raise ValueError(f"unknown family {family}")


@dataclass
class Recording:
    """What one stock run of a family's pipeline fed its loop, and what it produced."""

    family: str
    pipe: Any
    denoiser: torch.nn.Module
    scheduler: Any  # state just before step 0 (a private copy)
    x0: torch.Tensor  # the initial latent
    step_kwargs: dict[str, Any]
    call_args: tuple
    call_kwargs: dict[str, Any]
    cfg: bool
    guidance: Any  # scalar or per-frame tensor
    stock_latents: torch.Tensor
    calls: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return len(self.scheduler.timesteps)


def record(family: str, pipe: Any, params: dict[str, Any]) -> Recording:
    """Runs the stock pipeline once and records its loop's inputs and its final latent."""
    denoiser = pipe.transformer if family in ("cogvideox", "stable-audio", "ltx") else pipe.unet
    scheduler = pipe.scheduler
    seen: dict[str, Any] = {}

    def pre_hook(module: Any, args: tuple, kwargs: dict) -> None:
        seen.setdefault("args", args)
        seen.setdefault("kwargs", dict(kwargs))

    original_step = scheduler.step

    @functools.wraps(original_step)  # keeps the signature: the pipeline still passes eta/generator
    def recording_step(*args: Any, **kwargs: Any) -> Any:
        if "x0" not in seen:
            seen["x0"] = (args[2] if len(args) > 2 else kwargs["sample"]).clone()
            seen["step_kwargs"] = {
                k: v for k, v in kwargs.items() if k not in ("sample", "timestep", "return_dict")
            }
            state = copy.deepcopy(scheduler)
            state.__dict__.pop("step", None)  # the copy must use the class's own step
            seen["scheduler"] = state
        return original_step(*args, **kwargs)

    handle = denoiser.register_forward_pre_hook(pre_hook, with_kwargs=True)
    scheduler.step = recording_step
    try:
        with single_thread(), torch.inference_mode():
            output = pipe(**stock_kwargs(family, params))
    finally:
        handle.remove()
        del scheduler.step
    latents = output.frames if family in ("cogvideox", "svd", "ltx") else output.audios
    x0 = seen["x0"]
    first_input = seen["kwargs"]["hidden_states"] if family in ("cogvideox", "ltx") else seen["args"][0]
    cfg = first_input.shape[0] == 2 * x0.shape[0]
    if family == "svd":
        guidance = pipe._guidance_scale  # per-frame scales the call built, [B, F, 1, 1, 1]
        if not torch.is_tensor(guidance):
            raise AssertionError("SVD's pipeline no longer keeps its per-frame guidance tensor")
    else:
        guidance = params["guidance_scale"]
    return Recording(
        family=family,
        pipe=pipe,
        denoiser=denoiser,
        scheduler=seen["scheduler"],
        x0=x0,
        step_kwargs=seen["step_kwargs"],
        call_args=seen["args"],
        call_kwargs=seen["kwargs"],
        cfg=cfg,
        guidance=guidance,
        stock_latents=latents.clone(),
    )


# ---- the family loops, rebuilt ---------------------------------------------------------------------
def denoise(rec: Recording, scheduler: Any, latent: torch.Tensor, index: int) -> torch.Tensor:
    """The raw denoiser output (both CFG halves) at step `index` for `latent`, as the loop computes it."""
    t = scheduler.timesteps[index]
    model_input = torch.cat([latent, latent]) if rec.cfg else latent
    rec.calls += 1
    if rec.family == "ltx":  # packed tokens [B, seq, C]; flow-matching Euler scales nothing
        kwargs = dict(rec.call_kwargs)
        kwargs["hidden_states"] = model_input.to(kwargs["encoder_hidden_states"].dtype)
        kwargs["timestep"] = t.expand(model_input.shape[0])
        kwargs["return_dict"] = False
        return rec.denoiser(*rec.call_args, **kwargs)[0]
    model_input = scheduler.scale_model_input(model_input, t)
    if rec.family == "cogvideox":
        kwargs = dict(rec.call_kwargs)
        kwargs["hidden_states"] = model_input
        kwargs["timestep"] = t.expand(model_input.shape[0])
        kwargs["return_dict"] = False
        return rec.denoiser(*rec.call_args, **kwargs)[0]
    if rec.family == "svd":
        recorded = rec.call_args[0]
        image_latents = recorded[:, :, latent.shape[2] :]
        model_input = torch.cat([model_input, image_latents], dim=2)
        return rec.denoiser(model_input, t, *rec.call_args[2:], **{**rec.call_kwargs, "return_dict": False})[
            0
        ]
    if rec.family == "audioldm2":
        return rec.denoiser(model_input, t, *rec.call_args[2:], **{**rec.call_kwargs, "return_dict": False})[
            0
        ]
    if rec.family == "stable-audio":  # a one-element timestep; embeddings and rotary pair as recorded
        return rec.denoiser(model_input, t.unsqueeze(0), **{**rec.call_kwargs, "return_dict": False})[0]
    raise ValueError(rec.family)


def copy_scheduler(rec: Recording, scheduler: Any) -> Any:
    """A rank's private copy of a scheduler. Stable Audio's SDE solver holds a torchsde Brownian tree
    that breaks once deep-copied after use: the copy starts a fresh tree from the same seed, which
    draws the same noise at every step (test_stable_audio checks that property on its own)."""
    if rec.family != "stable-audio":
        return copy.deepcopy(scheduler)
    tree, scheduler.noise_sampler = scheduler.noise_sampler, None
    try:
        return copy.deepcopy(scheduler)
    finally:
        scheduler.noise_sampler = tree


def guide(rec: Recording, raw: torch.Tensor) -> torch.Tensor:
    """The noise prediction the family's loop hands to scheduler.step."""
    if rec.family in ("cogvideox", "ltx"):
        raw = raw.float()
    if not rec.cfg:
        return raw
    uncond, cond = raw.chunk(2)
    return uncond + rec.guidance * (cond - uncond)


def advance(
    rec: Recording, scheduler: Any, raw: torch.Tensor, index: int, latent: torch.Tensor
) -> torch.Tensor:
    t = scheduler.timesteps[index]
    out = scheduler.step(guide(rec, raw), t, latent, **rec.step_kwargs, return_dict=False)[0]
    return out.to(latent.dtype)


# ---- reference trajectories ------------------------------------------------------------------------
def sequential(rec: Recording) -> torch.Tensor:
    """The plain loop: the final latent, which must equal the stock run's."""
    return parastep(rec, ranks=1, warmup=rec.steps)


def parastep(rec: Recording, ranks: int, warmup: int) -> torch.Tensor:
    """Rank 0's final latent under ParaStep with `ranks` simulated ranks and `warmup` warm-up steps."""
    return simulate_parastep(
        rec.x0,
        rec.scheduler,
        ranks,
        warmup,
        evaluate=lambda scheduler, latent, i: denoise(rec, scheduler, latent, i),
        advance=lambda scheduler, prediction, i, latent: advance(rec, scheduler, prediction, i, latent),
    )


def simulate_parastep(
    x0: torch.Tensor,
    scheduler: Any,
    ranks: int,
    warmup: int,
    evaluate: Any,
    advance: Any,
    sync_solver: bool = False,
) -> torch.Tensor:
    """ParaStep's ranks one after another, for any loop: `evaluate(scheduler, latent, i)` gives step
    i's prediction (whatever the loop's denoiser calls return: one batched output, or a list of a
    step's calls), `advance(scheduler, prediction, i, latent)` guides it and steps.

    Every rank keeps its own scheduler and steps it at every step with the prediction it applies (a
    multistep scheduler's history is its own, as published); at the end of every round but the last
    rank 0's latent replaces every rank's (with `sync_solver`, rank 0's scheduler too).
    """
    total = len(scheduler.timesteps)
    if ranks < 1 or not 0 <= warmup <= total:
        raise ValueError("bad ParaStep parameters")
    if ranks > 1 and warmup == 0 and total > 0:
        raise ValueError("ParaStep needs a warm-up step to fill the ranks' caches")
    with single_thread(), torch.inference_mode():
        schedulers = [copy.deepcopy(scheduler) for _ in range(ranks)]
        latents = [x0.clone() for _ in range(ranks)]
        caches: list[Any] = [None] * ranks
        for i in range(warmup):  # every rank computes this same prediction on the same latent
            prediction = evaluate(schedulers[0], latents[0], i)
            for r in range(ranks):
                caches[r] = prediction
                latents[r] = advance(schedulers[r], prediction, i, latents[r])
        starts = list(range(warmup, total, ranks))
        for s in starts:
            n = min(ranks, total - s)
            predictions = {}
            for k in range(1, ranks):  # rank k: reuse before s + k, predict at s + k, then idle
                for m in range(n):
                    if m == k:
                        caches[k] = predictions[k] = evaluate(schedulers[k], latents[k], s + m)
                    latents[k] = advance(schedulers[k], caches[k], s + m, latents[k])
            for m in range(n):  # rank 0 applies its own prediction, then the received ones
                prediction = evaluate(schedulers[0], latents[0], s) if m == 0 else predictions[m]
                latents[0] = advance(schedulers[0], prediction, s + m, latents[0])
            if s != starts[-1]:  # the broadcast
                latents = [latents[0].clone() for _ in range(ranks)]
                if sync_solver:
                    schedulers = [schedulers[0]] + [copy.deepcopy(schedulers[0]) for _ in range(1, ranks)]
        return latents[0]


def rounds(total: int, warmup: int, ranks: int) -> list[tuple[int, int]]:
    """(first step, size) of each round after warm-up."""
    return [(s, min(ranks, total - s)) for s in range(warmup, total, ranks)]
