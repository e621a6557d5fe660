"""BatchStep: ParaStep's arithmetic on one device, the P latents of a round in one batched call.

In a round starting at step s (after W warm-up steps) slot 0 is the exact latent x_s and slot k
(1..P-1) is x_s advanced k steps with slot k's cached prediction, on a copy of the scheduler. The
P denoiser inputs go through one call with per-sample timesteps; the loop then applies the P
outputs in order, one per step, without calling the denoiser again. Slot k's cache is its own last
prediction, exactly as rank k's in ParaStep, so P = 2 is ParaStep with N = 2. Each slot also keeps
its own scheduler, stepped at every step of every round with the predictions rank k would apply, so a
multistep scheduler's history (UniPC, DPM-Solver) is rank k's too, as in ParaStep's default.
It pays off where the model under-uses the device at batch size 1-2.
"""

from __future__ import annotations

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
    steps_scheduler_itself = True
    rounds = True

    @classmethod
    def unavailable_reason(cls, entry: Any) -> str | None:
        from engine.models import adapter_for

        adapter = adapter_for(entry)
        if adapter.switches_denoiser(entry):
            return (
                "BatchStep evaluates a round's look-ahead steps in one call of one denoiser, but this model "
                "switches denoisers during the run (Wan 2.2's two experts)."
            )
        if adapter.per_token_timesteps(entry):
            return (
                "BatchStep gives each look-ahead latent one timestep, but this model's loop gives every "
                "latent token its own (Wan 2.2 TI2V)."
            )
        return None

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.warmup = int(ctx.options["warmup"])
        self.width = int(ctx.options.get("lookahead", 2))
        # Slot k's cached prediction, as the guided noise the loop applied with it (scheduler.step's
        # input): one tensor whatever the number of denoiser calls per step.
        self.slot_noise: list[torch.Tensor | None] = []
        # Slot k's own scheduler (made at the first round) and its latent during the round.
        self.slot_schedulers: list[Any] = []
        self.slot_latents: list[torch.Tensor] = []
        self.round_outputs: dict[int, list[Any]] = {}  # call -> the round's P outputs

    def _round_start(self, step: int) -> int | None:
        """The step the round holding `step` starts at (None: a sequential step)."""
        if self.width == 1 or step < self.warmup:
            return None
        return self.warmup + ((step - self.warmup) // self.width) * self.width

    def denoise(self, forward: Callable, args: tuple, kwargs: dict) -> Any:
        start = self._round_start(self.step)
        if start is None:
            return self.compute(forward, args, kwargs)
        j = self.step - start
        if j > 0:
            self._action = "batched"
            return self.round_outputs[self.call][j]
        size = min(self.width, self.ctx.total_steps - start)
        if self.call == 0:
            self._look_ahead(start, size)
        self.round_outputs[self.call] = self._batched_call(forward, args, kwargs, start, size)
        return self.round_outputs[self.call][0]

    def after_step(self, latent: torch.Tensor) -> None:
        start = self._round_start(self.step)
        if start is None:
            self.slot_noise = [self.noise] * self.width
        elif self.step > start:
            self.slot_noise[self.step - start] = self.noise  # slot j's output was applied now
            size = min(self.width, self.ctx.total_steps - start)
            if self.step == start + size - 1:
                self._finish_round(start, size)
        super().after_step(latent)

    def _batched_call(self, forward: Callable, args: tuple, kwargs: dict, start: int, size: int) -> list[Any]:
        """This call of the step for every slot of the round, as one batched call."""
        bound = inspect.signature(forward).bind(*args, **kwargs)
        names = list(bound.arguments)
        sample_name, sample = names[0], bound.arguments[names[0]]
        timesteps = self.ctx.pipe.scheduler.timesteps
        inputs, steps = [sample], [timesteps[start]]
        for k in range(1, size):
            scheduler, latent = self.slot_schedulers[k], self.slot_latents[k]
            inputs.append(self.ctx.adapter.denoiser_input(scheduler, latent, timesteps[start + k], sample))
            steps.append(timesteps[start + k])
        batch = sample.shape[0]
        arguments = dict(bound.arguments)
        arguments[sample_name] = torch.cat(inputs)
        given = bound.arguments.get("timestep")
        dtype = given.dtype if isinstance(given, torch.Tensor) else None  # the loop's (bf16 rounds t)
        arguments["timestep"] = torch.cat(
            [torch.as_tensor(t, device=sample.device).reshape(1).expand(batch) for t in steps]
        ).to(dtype)
        for name, value in bound.arguments.items():
            if name not in (sample_name, "timestep") and _is_batched(value, batch):
                arguments[name] = torch.cat([value] * size)
        output = self.compute(forward, (), arguments)
        prediction, rebuild = split_output(output)
        return [rebuild(chunk) for chunk in prediction.chunk(size)]

    def _look_ahead(self, start: int, size: int) -> None:
        """At a round start: slot k advances from x_s with its cached prediction, k steps (up to its
        predict step) or the whole round (a slot beyond a short last round only reuses)."""
        if not self.slot_schedulers:  # after the warm-up every rank's scheduler is rank 0's
            self.slot_schedulers = [None] + [self._private_copy() for _ in range(1, self.width)]
        self.slot_latents = [self.latent] * self.width
        for k in range(1, self.width):
            self._advance(k, self.slot_noise[k], start, range(min(k, size)))

    def _finish_round(self, start: int, size: int) -> None:
        """At a round's end: slot k steps the rest of the round with its new prediction, as rank k
        does after its predict step (only its scheduler's history is kept)."""
        for k in range(1, size):
            self._advance(k, self.slot_noise[k], start, range(k, size))

    def _advance(self, k: int, noise: torch.Tensor, start: int, offsets: range) -> None:
        scheduler, latent = self.slot_schedulers[k], self.slot_latents[k]
        for m in offsets:
            t = scheduler.timesteps[start + m]
            latent = scheduler.step(noise, t, latent, **self.last_step_kwargs).prev_sample.to(
                self.latent.dtype
            )
        self.slot_latents[k] = latent

    def _private_copy(self) -> Any:
        scheduler = self.ctx.adapter.copy_scheduler(self.ctx.pipe.scheduler)
        scheduler.__dict__.pop("step", None)  # the copy must not call back into this strategy
        return scheduler


def _is_batched(value: Any, batch: int) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch
