"""ParaStep, "reuse-then-predict" step parallelism, as published.

T steps, W warm-up steps, N ranks. Warm-up steps run on every rank with no communication. After
that, steps go in rounds of N; at the start of a round at step s every rank holds the same latent
x_s. Rank 0 runs the denoiser at x_s and then applies, step by step, the predictions of ranks
1..N-1 with the ordinary scheduler step. Rank k advances k steps from x_s with its own cached
prediction ("reuse"), runs the denoiser once at step s+k ("predict") and sends the raw output
(both guidance halves) to rank 0. At the end of the round rank 0 broadcasts its latent.

Only rank 0's trajectory is the output. With N = 1 this is exactly the sequential loop.
Cancellation is agreed at the same points (a one-byte broadcast from rank 0), so that no rank is
left waiting on a peer that stopped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from engine.strategies.base import Strategy, StrategyOption, split_output


class ParaStepStrategy(Strategy):
    name = "parastep"
    description = "Step-parallel reuse-then-predict over N devices (ParaStep, as published)."
    options = (StrategyOption("warmup", "Sequential warm-up steps before the parallel rounds.", None, 0),)
    min_devices = 1
    max_devices = None
    width_from = "ranks"
    rounds = True

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.warmup = int(ctx.options["warmup"])
        self.cache: Any = None  # this rank's last own prediction (the whole denoiser output)
        self._pending_send = None

    def _position(self, step: int) -> tuple[int, int]:
        """(round start s, position j of `step` in its round)."""
        n = self.ctx.world_size
        start = self.warmup + ((step - self.warmup) // n) * n
        return start, step - start

    def _round_ends(self, step: int) -> bool:
        start, j = self._position(step)
        return j == self.ctx.world_size - 1 or step == self.ctx.total_steps - 1

    def denoise(self, forward: Callable, args: tuple, kwargs: dict) -> Any:
        rank, step = self.ctx.rank, self.step
        if self.ctx.world_size == 1 or step < self.warmup:
            self.cache = self.compute(forward, args, kwargs)
            return self.cache
        _, j = self._position(step)
        if rank == 0:
            if j == 0:
                self.cache = self.compute(forward, args, kwargs)
                return self.cache
            prediction, rebuild = split_output(self.cache)
            self._action = "receive"
            return rebuild(self.recv(prediction, src=j))
        if j == rank:
            self.cache = self.compute(forward, args, kwargs)
            self._pending_send = self.send(split_output(self.cache)[0], dst=0)
            return self.cache
        self._action = "reuse" if j < rank else "idle"
        return self.cache

    def after_step(self, latent: torch.Tensor) -> None:
        step, last = self.step, self.ctx.total_steps - 1
        if self.ctx.world_size == 1:
            super().after_step(latent)
            return
        if step == last:
            self.wait(self._pending_send)
            self._pending_send = None
            return
        if step < self.warmup:
            self.agree_on_cancel()
        elif self._round_ends(step):
            self.wait(self._pending_send)
            self._pending_send = None
            self.agree_on_cancel()
            self.broadcast(latent)


def expected_traffic(
    total_steps: int, warmup: int, world_size: int, prediction_bytes: int, latent_bytes: int
) -> list[dict[str, int]]:
    """Bytes each rank sends and receives in one job, from the algorithm alone.

    Per round (s, n): rank k in 1..n-1 sends one prediction to rank 0. After every warm-up step
    and every round but the last, rank 0 broadcasts a one-byte cancel flag, and after every round
    but the last also its latent; a broadcast counts one copy sent per receiver.
    """
    n, t, w = world_size, total_steps, warmup
    traffic = [{"bytes_sent": 0, "bytes_received": 0} for _ in range(n)]
    if n == 1:
        return traffic
    rounds = [(s, min(n, t - s)) for s in range(w, t, n)]
    flag_syncs = min(w, t - 1) + max(len(rounds) - 1, 0)
    latent_syncs = max(len(rounds) - 1, 0)
    broadcast = flag_syncs * 1 + latent_syncs * latent_bytes
    traffic[0]["bytes_sent"] = broadcast * (n - 1)
    traffic[0]["bytes_received"] = sum(size - 1 for _, size in rounds) * prediction_bytes
    for k in range(1, n):
        traffic[k]["bytes_sent"] = sum(1 for _, size in rounds if size > k) * prediction_bytes
        traffic[k]["bytes_received"] = broadcast
    return traffic
