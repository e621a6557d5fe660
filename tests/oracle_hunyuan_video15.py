"""A single-process reference of ParaStep on HunyuanVideo 1.5's loop: two separate transformer calls
per step made by a diffusers guider (conditional, then unconditional), combined by the guider.

Written independently of engine.strategies, engine.worker and engine.models: nothing is imported
from them.

The stock HunyuanVideo15Pipeline runs once in this process, with a forward pre-hook on its
transformer recording every argument of step 0's calls except the latent input and the timestep
(the text embeddings and masks of both encoders, the image embeddings), plus the channels that the
loop appends to the latent (conditioning latents and mask), and a wrapper around `scheduler.step`
recording the initial latent and the scheduler before step 0. The loop is then rebuilt here
(latent input, the calls in order, classifier-free guidance in diffusers' formulation, the
FlowMatch Euler step), and ParaStep's N ranks are simulated as the algorithm runs them on separate
processes: every rank keeps its own scheduler and latent and steps at every step, rank k's cache is
the whole set of its last calls, and at the end of every round but the last rank 0's latent and
scheduler replace every rank's (the broadcast).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any

import torch

from tests.oracle import simulate_parastep, single_thread


@dataclass
class HunyuanRecording:
    transformer: torch.nn.Module
    scheduler: Any  # state just before step 0 (a private copy)
    x0: torch.Tensor
    extra_channels: torch.Tensor  # what the loop concatenates after the latent
    call_kwargs: list[dict[str, Any]]  # per call of a step: conditional, then unconditional
    guidance: float
    stock_latents: torch.Tensor

    @property
    def steps(self) -> int:
        return len(self.scheduler.timesteps)


def stock_kwargs(params: dict[str, Any]) -> dict[str, Any]:
    return {
        "prompt": params["prompt"],
        "negative_prompt": params.get("negative_prompt") or None,
        "num_frames": params["frames"],
        "height": params["height"],
        "width": params["width"],
        "num_inference_steps": params["steps"],
        "generator": torch.Generator("cpu").manual_seed(params["seed"]),
        "output_type": "latent",
    }


def record(pipe: Any, params: dict[str, Any]) -> HunyuanRecording:
    """Runs the stock pipeline once at `params["guidance_scale"]` (set on its guider)."""
    call_kwargs: list[dict[str, Any]] = []
    extra: dict[str, torch.Tensor] = {}
    seen: dict[str, Any] = {}

    def pre_hook(module: Any, args: tuple, kwargs: dict) -> None:
        if "x0" not in seen:  # step 0's calls
            rest = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "timestep")}
            call_kwargs.append(rest)
            channels = pipe.vae.config.latent_channels
            extra["channels"] = kwargs["hidden_states"][:, channels:].clone()

    scheduler = pipe.scheduler
    original_step = scheduler.step

    @functools.wraps(original_step)
    def recording_step(*args: Any, **kwargs: Any) -> Any:
        if "x0" not in seen:
            seen["x0"] = args[2].clone()
            state = copy.deepcopy(scheduler)
            state.__dict__.pop("step", None)
            seen["scheduler"] = state
        return original_step(*args, **kwargs)

    pipe.guider.guidance_scale = float(params["guidance_scale"])
    handle = pipe.transformer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    scheduler.step = recording_step
    try:
        with single_thread(), torch.inference_mode():
            latents = pipe(**stock_kwargs(params)).frames
    finally:
        handle.remove()
        del scheduler.step
    return HunyuanRecording(
        transformer=pipe.transformer,
        scheduler=seen["scheduler"],
        x0=seen["x0"],
        extra_channels=extra["channels"],
        call_kwargs=call_kwargs,
        guidance=float(params["guidance_scale"]),
        stock_latents=latents.clone(),
    )


def calls(rec: HunyuanRecording, latent: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
    """The raw outputs of one step's calls at `latent`, as the loop makes them."""
    hidden = torch.cat([latent, rec.extra_channels], dim=1)
    timestep = t.expand(hidden.shape[0]).to(hidden.dtype)
    return [
        rec.transformer(hidden_states=hidden, timestep=timestep, **kwargs)[0] for kwargs in rec.call_kwargs
    ]


def guide(rec: HunyuanRecording, raws: list[torch.Tensor]) -> torch.Tensor:
    if len(raws) == 1:
        return raws[0]
    cond, uncond = raws  # the guider's order: conditional first
    return uncond + rec.guidance * (cond - uncond)


def advance(
    rec: HunyuanRecording, scheduler: Any, raws: list[torch.Tensor], i: int, latent: torch.Tensor
) -> Any:
    t = scheduler.timesteps[i]
    return scheduler.step(guide(rec, raws), t, latent, return_dict=False)[0]


def sequential(rec: HunyuanRecording) -> torch.Tensor:
    return parastep(rec, ranks=1, warmup=rec.steps)


def parastep(rec: HunyuanRecording, ranks: int, warmup: int, sync_solver: bool = False) -> torch.Tensor:
    """Rank 0's final latent under ParaStep with `ranks` simulated ranks and `warmup` warm-up steps
    (tests.oracle.simulate_parastep on this loop's calls)."""
    return simulate_parastep(
        rec.x0,
        rec.scheduler,
        ranks,
        warmup,
        evaluate=lambda scheduler, latent, i: calls(rec, latent, scheduler.timesteps[i]),
        advance=lambda scheduler, raws, i, latent: advance(rec, scheduler, raws, i, latent),
        sync_solver=sync_solver,
    )
