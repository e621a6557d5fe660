"""A single-process reference of ParaStep on a loop that calls its denoiser several times per step:
Wan's (a conditional and an unconditional call, combined by the loop; two experts in Wan 2.2; image to
video appends the image's latents to the latent and passes CLIP image embeddings).

Written independently of engine.strategies and engine.worker: nothing is imported from them.

The stock WanPipeline runs once in this process, with forward pre-hooks on its transformer(s)
recording the text embeddings of each call and a wrapper around `scheduler.step` recording the
initial latent and the scheduler before step 0. The loop is then rebuilt here (expert chosen by the
boundary timestep, the two calls, the loop's own guidance formula, `scheduler.step`), and ParaStep's
N ranks are simulated as the algorithm runs them on separate processes: every rank keeps its own
scheduler and latent and steps at every step (UniPC keeps a history of model outputs, so rank k's
history holds its own reused predictions), rank k's cache is the whole set of its last calls, and at
the end of every round but the last rank 0's latent replaces every rank's (with `sync_solver`, rank
0's scheduler too).
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any

import torch

from tests.oracle import simulate_parastep, single_thread


@dataclass
class WanRecording:
    experts: list[torch.nn.Module]
    boundary: float | None  # timestep at which transformer_2 takes over (None: one expert)
    scheduler: Any  # state just before step 0 (a private copy)
    x0: torch.Tensor
    # Per call of a step (conditional, then unconditional): its text embeddings and, image to video,
    # the CLIP image embeddings.
    call_kwargs: list[dict[str, Any]]
    condition: torch.Tensor | None  # image to video: the channels the loop appends to the latent
    guidance: tuple[float, float]  # (transformer's, transformer_2's)
    stock_latents: torch.Tensor

    @property
    def steps(self) -> int:
        return len(self.scheduler.timesteps)


def stock_kwargs(params: dict[str, Any]) -> dict[str, Any]:
    image = {}
    if params.get("image"):
        from PIL import Image

        with Image.open(params["image"]) as opened:
            image = {"image": opened.convert("RGB")}
    return {
        **image,
        "prompt": params["prompt"],
        "negative_prompt": params.get("negative_prompt") or None,
        "num_frames": params["frames"],
        "height": params["height"],
        "width": params["width"],
        "num_inference_steps": params["steps"],
        "guidance_scale": params["guidance_scale"],
        "generator": torch.Generator("cpu").manual_seed(params["seed"]),
        "output_type": "latent",
    }


def record(pipe: Any, params: dict[str, Any]) -> WanRecording:
    experts = [m for m in (pipe.transformer, getattr(pipe, "transformer_2", None)) if m is not None]
    recorded: list[dict[str, Any]] = []
    seen: dict[str, Any] = {}

    def pre_hook(module: Any, args: tuple, kwargs: dict) -> None:
        if "x0" not in seen:  # step 0's calls
            recorded.append(dict(kwargs))

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

    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in experts]
    scheduler.step = recording_step
    try:
        with single_thread(), torch.inference_mode():
            latents = pipe(**stock_kwargs(params)).frames
    finally:
        for handle in handles:
            handle.remove()
        del scheduler.step
    ratio = pipe.config.boundary_ratio
    boundary = None if ratio is None else ratio * pipe.scheduler.config.num_train_timesteps
    scale = params["guidance_scale"]
    channels = seen["x0"].shape[1]
    hidden = recorded[0]["hidden_states"]
    keep = ("encoder_hidden_states", "encoder_hidden_states_image")
    return WanRecording(
        experts=experts,
        boundary=boundary,
        scheduler=seen["scheduler"],
        x0=seen["x0"],
        call_kwargs=[{k: call[k] for k in keep if call.get(k) is not None} for call in recorded],
        condition=hidden[:, channels:] if hidden.shape[1] > channels else None,
        guidance=(scale, scale),  # the pipeline's guidance_scale_2 defaults to guidance_scale
        stock_latents=latents.clone(),
    )


def high_noise(rec: WanRecording, t: torch.Tensor) -> bool:
    return rec.boundary is None or t >= rec.boundary


def calls(rec: WanRecording, latent: torch.Tensor, t: torch.Tensor) -> list[torch.Tensor]:
    """The raw outputs of one step's calls at `latent`, as the loop makes them."""
    model = rec.experts[0] if high_noise(rec, t) else rec.experts[1]
    hidden = latent if rec.condition is None else torch.cat([latent, rec.condition], dim=1)
    hidden = hidden.to(model.dtype)
    timestep = t.expand(latent.shape[0])
    return [
        model(hidden_states=hidden, timestep=timestep, **kwargs, return_dict=False)[0]
        for kwargs in rec.call_kwargs
    ]


def guide(rec: WanRecording, raws: list[torch.Tensor], t: torch.Tensor) -> torch.Tensor:
    if len(raws) == 1:
        return raws[0]
    cond, uncond = raws
    scale = rec.guidance[0] if high_noise(rec, t) else rec.guidance[1]
    return uncond + scale * (cond - uncond)


def advance(rec: WanRecording, scheduler: Any, raws: list[torch.Tensor], i: int, latent: torch.Tensor) -> Any:
    t = scheduler.timesteps[i]
    return scheduler.step(guide(rec, raws, t), t, latent, return_dict=False)[0]


def sequential(rec: WanRecording) -> torch.Tensor:
    return parastep(rec, ranks=1, warmup=rec.steps)


def parastep(rec: WanRecording, ranks: int, warmup: int, sync_solver: bool = False) -> torch.Tensor:
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
