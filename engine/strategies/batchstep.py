"""BatchStep: ParaStep's arithmetic on one device, the P latents of a round in one batched call.

In a round starting at step s (after W warm-up steps) slot 0 is the exact latent x_s and slot k
(1..P-1) is x_s advanced k steps with slot k's cached prediction, on a copy of the scheduler. The
P denoiser inputs go through one call with per-sample timesteps; the loop then applies the P
outputs in order, one per step, without calling the denoiser again. Slot k's cache is its own last
prediction, exactly as rank k's in ParaStep, so P = 2 is ParaStep with N = 2.
It pays off where the model under-uses the device at batch size 1-2.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import Any

import torch

from engine.strategies.base import Strategy, StrategyOption, split_output


class BatchStepStrategy(Strategy):
    name = "batchstep"
    description = "ParaStep on one device: the round's look-ahead latents in one batched call."
    options = (
        StrategyOption("warmup", "Sequential warm-up steps before the batched rounds.", None, 0),
        StrategyOption("lookahead", "Latents per batched call (P); 2 matches ParaStep with N=2.", 2, 1),
    )
    min_devices = 1
    max_devices = 1
    width_from = "lookahead"
    rounds = True

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.warmup = int(ctx.options["warmup"])
        self.width = int(ctx.options.get("lookahead", 2))
        self.slot_cache: list[Any] = []
        self.round_outputs: list[Any] = []

    def denoise(self, forward: Callable, args: tuple, kwargs: dict) -> Any:
        step, p = self.step, self.width
        if p == 1 or step < self.warmup:
            output = self.compute(forward, args, kwargs)
            self.slot_cache = [output] * p
            return output
        start = self.warmup + ((step - self.warmup) // p) * p
        j = step - start
        if j > 0:
            self._action = "batched"
            return self.round_outputs[j]
        size = min(p, self.ctx.total_steps - start)
        self.round_outputs = self._batched_round(forward, args, kwargs, start, size)
        for k in range(1, size):
            self.slot_cache[k] = self.round_outputs[k]
        return self.round_outputs[0]

    def _batched_round(
        self, forward: Callable, args: tuple, kwargs: dict, start: int, size: int
    ) -> list[Any]:
        bound = inspect.signature(forward).bind(*args, **kwargs)
        names = list(bound.arguments)
        sample_name, sample = names[0], bound.arguments[names[0]]
        timesteps = self.ctx.pipe.scheduler.timesteps
        inputs, steps = [sample], [timesteps[start]]
        for k in range(1, size):
            inputs.append(self._look_ahead_input(sample, start, k))
            steps.append(timesteps[start + k])
        batch = sample.shape[0]
        arguments = dict(bound.arguments)
        arguments[sample_name] = torch.cat(inputs)
        arguments["timestep"] = torch.cat(
            [torch.as_tensor(t, device=sample.device).reshape(1).expand(batch) for t in steps]
        )
        for name, value in bound.arguments.items():
            if name not in (sample_name, "timestep") and _is_batched(value, batch):
                arguments[name] = torch.cat([value] * size)
        output = self.compute(forward, (), arguments)
        prediction, rebuild = split_output(output)
        return [rebuild(chunk) for chunk in prediction.chunk(size)]

    def _look_ahead_input(self, sample: torch.Tensor, start: int, k: int) -> torch.Tensor:
        """Slot k's denoiser input: x_s advanced k steps with slot k's cached prediction."""
        adapter, pipe = self.ctx.adapter, self.ctx.pipe
        scheduler = copy.deepcopy(pipe.scheduler)
        del scheduler.step  # the copy must not call back into this strategy
        timesteps = scheduler.timesteps
        latent = self.latent
        cached = split_output(self.slot_cache[k])[0]
        for m in range(k):
            noise = adapter.guide(pipe, self.ctx.params, cached)
            latent = scheduler.step(noise, timesteps[start + m], latent, **self.last_step_kwargs).prev_sample
            latent = latent.to(self.latent.dtype)
        return adapter.denoiser_input(scheduler, latent, timesteps[start + k], sample)


def _is_batched(value: Any, batch: int) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch
