"""ParaStep, "reuse-then-predict" step parallelism, as published, with two measured variants.

T steps, W warm-up steps, N ranks. Warm-up steps run on every rank with no communication. After
that, steps go in rounds of N; at the start of a round at step s every rank holds the same latent
x_s. Rank 0 runs the denoiser at x_s and then applies, step by step, the predictions of ranks
1..N-1 with the ordinary scheduler step. Rank k advances k steps from x_s with its own cached
prediction ("reuse"), runs the denoiser once at step s+k ("predict") and sends the raw output
(both guidance halves) to rank 0. At the end of the round rank 0 broadcasts its latent.

Only rank 0's trajectory is the output. With N = 1 this is exactly the sequential loop.
Cancellation is agreed at the same points (a one-byte broadcast from rank 0), so that no rank is
left waiting on a peer that stopped.

Variants (options, off by default; docs/parastep-variants.md has the measurements):

- `fresh_reuse`: after every round but the last, rank 0 also broadcasts the last prediction it
  applied, and every rank reuses that one instead of its own older one (rank k's own is N-k steps
  older). At N = 2 rank 1's own prediction is already the freshest, so nothing more is sent.
- `adaptive` (percent): the warm-up lasts at least W steps and goes on until the guided prediction
  changed by less than this much (relative L2) from the previous step; rank 0 measures and decides,
  and the decision rides on the cancel flag it broadcasts after every warm-up step.

The ParaStep ranks are `self.peers` (the world by default; `cfg-parastep` runs one ParaStep per
CFG half over a subgroup), and every denoiser evaluation goes through `self.compute`, which a
subclass may replace (`cfg-parastep` computes one CFG half and gathers the other).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from engine.strategies.base import Strategy, StrategyOption, split_output


class ParaStepStrategy(Strategy):
    name = "parastep"
    description = "Step-parallel reuse-then-predict over N devices (ParaStep, as published)."
    options = (
        StrategyOption("warmup", "Sequential warm-up steps before the parallel rounds.", None, 0),
        StrategyOption(
            "fresh_reuse",
            "1: reuse the freshest prediction (rank 0 broadcasts it each round) instead of each rank's "
            "own older one; changes nothing at 2 devices.",
            0,
            0,
            1,
        ),
        StrategyOption(
            "adaptive",
            "Percent, 0 = off: after the warm-up, keep warming up until the guided prediction changes "
            "by less than this from one step to the next (relative L2).",
            0,
            0,
            100,
        ),
    )
    min_devices = 1
    max_devices = None
    width_from = "ranks"
    rounds = True

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        options = ctx.options
        self.min_warmup = int(options["warmup"])
        self.fresh_reuse = bool(options.get("fresh_reuse", 0))
        self.adaptive_pct = int(options.get("adaptive", 0) or 0)
        # Adaptive: warm up until rank 0 says the prediction is stable (then warmup = that step + 1).
        self.warmup = ctx.total_steps if self.adaptive_pct else self.min_warmup
        self.cache: Any = None  # this rank's last own prediction (the whole denoiser output)
        self._pending_send = None
        self._freshest: torch.Tensor | None = None  # rank 0: the last prediction it applied
        self._guided: torch.Tensor | None = None  # rank 0, adaptive: the last guided prediction
        self._change: float | None = None  # its relative L2 change from the one before

    def _position(self, step: int) -> tuple[int, int]:
        """(round start s, position j of `step` in its round)."""
        n = self.peers.size
        start = self.warmup + ((step - self.warmup) // n) * n
        return start, step - start

    def _round_ends(self, step: int) -> bool:
        start, j = self._position(step)
        return j == self.peers.size - 1 or step == self.ctx.total_steps - 1

    def denoise(self, forward: Callable, args: tuple, kwargs: dict) -> Any:
        rank, step = self.peers.rank, self.step
        if self.peers.size == 1 or step < self.warmup:
            self.cache = self.compute(forward, args, kwargs)
            if self.adaptive_pct and self.ctx.rank == 0:
                self._measure_change(self.cache)
            return self.cache
        _, j = self._position(step)
        if rank == 0:
            if j == 0:
                self.cache = self.compute(forward, args, kwargs)
                self._freshest = split_output(self.cache)[0]
                return self.cache
            prediction, rebuild = split_output(self.cache)
            self._action = "receive"
            self._freshest = self.recv(prediction, src=j)
            return rebuild(self._freshest)
        if j == rank:
            self.cache = self.compute(forward, args, kwargs)
            self._pending_send = self.send(split_output(self.cache)[0], dst=0)
            return self.cache
        self._action = "reuse" if j < rank else "idle"
        return self.cache

    def _measure_change(self, output: Any) -> None:
        guided = self.ctx.adapter.guide(self.ctx.pipe, self.ctx.params, split_output(output)[0]).float()
        if self._guided is not None:
            self._change = float((guided - self._guided).norm() / self._guided.norm().clamp_min(1e-12))
        self._guided = guided

    def _warmup_may_end(self, step: int) -> bool:
        """Rank 0, adaptive: the prediction of `step` changed little enough to start the rounds."""
        return (
            self.adaptive_pct > 0
            and step + 1 >= self.min_warmup
            and self._change is not None
            and self._change * 100 < self.adaptive_pct
        )

    def after_step(self, latent: torch.Tensor) -> None:
        step, last = self.step, self.ctx.total_steps - 1
        if self.ctx.world_size == 1:
            super().after_step(latent)
            return
        if step == last:
            self.wait(self._pending_send)
            self._pending_send = None
            return
        if self.peers.size == 1 or step < self.warmup:
            ends = self.agree_on_cancel(self.ctx.rank == 0 and self._warmup_may_end(step))
            if ends and self.peers.size > 1:
                self.warmup = step + 1
        elif self._round_ends(step):
            self.wait(self._pending_send)
            self._pending_send = None
            self.agree_on_cancel()
            self.broadcast(latent)
            if self.fresh_reuse and self.peers.size > 2:
                self._share_freshest()

    def _share_freshest(self) -> None:
        """Rank 0 broadcasts the round's last applied prediction; every rank reuses it from now on."""
        prediction, rebuild = split_output(self.cache)
        fresh = self._freshest if self.peers.rank == 0 else torch.empty_like(prediction)
        self.broadcast(fresh)
        if self.peers.rank != 0:
            self.cache = rebuild(fresh)


def rounds_of(total_steps: int, warmup: int, width: int) -> list[tuple[int, int]]:
    """(first step, size) of each round after the warm-up."""
    return [(s, min(width, total_steps - s)) for s in range(warmup, total_steps, width)]


def flag_count(total_steps: int, warmup: int, width: int) -> int:
    """One-byte cancel flags rank 0 broadcasts in a job: after every warm-up step and every round
    but the last (so after every step but the last when the width is 1)."""
    rounds = rounds_of(total_steps, warmup, width)
    return min(warmup, total_steps - 1) + max(len(rounds) - 1, 0)


def round_traffic(
    total_steps: int,
    warmup: int,
    ranks: int,
    prediction_bytes: int,
    latent_bytes: int,
    fresh_reuse: bool = False,
) -> list[dict[str, int]]:
    """Bytes each ParaStep rank sends and receives in one job, cancel flags aside.

    Per round (s, n): rank k in 1..n-1 sends one prediction to rank 0. After every round but the
    last rank 0 broadcasts its latent and, with `fresh_reuse` and N > 2, the last prediction it
    applied; a broadcast counts one copy sent per receiver.
    """
    n = ranks
    traffic = [{"bytes_sent": 0, "bytes_received": 0} for _ in range(n)]
    if n == 1:
        return traffic
    rounds = rounds_of(total_steps, warmup, n)
    syncs = max(len(rounds) - 1, 0)
    broadcast = syncs * (latent_bytes + (prediction_bytes if fresh_reuse and n > 2 else 0))
    traffic[0]["bytes_sent"] = broadcast * (n - 1)
    traffic[0]["bytes_received"] = sum(size - 1 for _, size in rounds) * prediction_bytes
    for k in range(1, n):
        traffic[k]["bytes_sent"] = sum(1 for _, size in rounds if size > k) * prediction_bytes
        traffic[k]["bytes_received"] = broadcast
    return traffic


def expected_traffic(
    total_steps: int,
    warmup: int,
    world_size: int,
    prediction_bytes: int,
    latent_bytes: int,
    fresh_reuse: bool = False,
) -> list[dict[str, int]]:
    """Bytes each rank sends and receives in one job, from the algorithm alone.

    `round_traffic`, plus a one-byte cancel flag rank 0 broadcasts after every warm-up step and
    every round but the last. With `adaptive`, `warmup` is the warm-up the job took.
    """
    traffic = round_traffic(total_steps, warmup, world_size, prediction_bytes, latent_bytes, fresh_reuse)
    if world_size == 1:
        return traffic
    flags = flag_count(total_steps, warmup, world_size)
    traffic[0]["bytes_sent"] += flags * (world_size - 1)
    for k in range(1, world_size):
        traffic[k]["bytes_received"] += flags
    return traffic
