"""ParaStep, "reuse-then-predict" step parallelism, as published, with two measured variants.

T steps, W warm-up steps, N ranks. Warm-up steps run on every rank with no communication. After
that, steps go in rounds of N; at the start of a round at step s every rank holds the same latent
x_s. Rank 0 runs the denoiser at x_s and then applies, step by step, the predictions of ranks
1..N-1 with the ordinary scheduler step. Rank k advances k steps from x_s with its own cached
prediction ("reuse"), runs the denoiser once at step s+k ("predict") and sends the raw output
(both guidance halves) to rank 0. At the end of the round rank 0 broadcasts its latent.
A step's predictions are all of its denoiser calls (Wan's separate conditional and unconditional
calls): every call of a step is computed, reused, sent and received alike.

Only rank 0's trajectory is the output. With N = 1 this is exactly the sequential loop.
Cancellation is agreed at the same points (a one-byte broadcast from rank 0), so that no rank is
left waiting on a peer that stopped.

The loop is a schedule of segments: sync steps (every rank computes the same step, as in the
warm-up) and parallel rounds. Published: W sync steps, then rounds. Variants (options, off by
default; docs/parastep-variants.md has the measurements):

- `fresh_reuse`: after a round followed by another, rank 0 also broadcasts the last prediction it
  applied, and every rank reuses that one instead of its own older one (rank k's own is N-k steps
  older). At N = 2 rank 1's own prediction is already the freshest, so nothing more is sent.
- `adaptive` (percent): rank 0 measures how much each prediction it applies changed from the
  previous one (relative L2 of the guided predictions); after at least W sync steps, the next
  segment is a parallel round when the last change was below the threshold, else a sync step.
  The decision rides on the cancel flag rank 0 broadcasts at every segment end.
- `sync_solver`: a multistep scheduler (UniPC, DPM-Solver) keeps a history of model outputs, and
  rank k's holds its own reused predictions (as published). With this on, the round-end broadcast
  also carries rank 0's history, so every rank starts a round where rank 0 is. Measured on `shapes`
  it is 6-7 dB less faithful with UniPC (its corrector combines a stale reused prediction with the
  fresh history) and about 1 dB more with DPM-Solver++, at 3-4x the broadcast bytes, so it is off.

The ParaStep ranks are `self.peers` (the world by default; `cfg-parastep` runs one ParaStep per
CFG half over a subgroup), and every denoiser evaluation goes through `self.compute`, which a
subclass may replace (`cfg-parastep` computes one CFG half and gathers the other).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from engine.strategies.base import Strategy, StrategyOption, split_output


class Segment(NamedTuple):
    """Steps start .. start + size - 1: one sync step, or a parallel round."""

    start: int
    size: int
    parallel: bool


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
            "sync_solver",
            "1: the round-end broadcast also carries a multistep scheduler's history (UniPC, DPM-Solver), "
            "so every rank starts each round where rank 0 is; measured 6-7 dB less faithful with UniPC, "
            "1 dB more with DPM-Solver++, than each rank keeping its own (0, as published; "
            "docs/parastep-variants.md). Stateless schedulers: no effect.",
            0,
            0,
            1,
        ),
        StrategyOption(
            "adaptive",
            "Percent, 0 = off: after the warm-up, run a step on every rank (as in the warm-up) whenever "
            "the guided prediction changed by this much or more from the previous step (relative L2), "
            "and parallel rounds while it changes less.",
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
        self.warmup = int(options["warmup"])
        self.fresh_reuse = bool(options.get("fresh_reuse", 0))
        self.adaptive_pct = int(options.get("adaptive", 0) or 0)
        self.sync_solver = bool(options.get("sync_solver", 0))
        # This rank's last own predictions, one whole denoiser output per call of the step.
        self.cache: dict[int, Any] = {}
        self._pending_sends: list[Any] = []
        self._freshest: dict[int, torch.Tensor] = {}  # rank 0: the predictions it applied last, per call
        self._guided: torch.Tensor | None = None  # rank 0, adaptive: the last guided prediction
        self._change: float | None = None  # its relative L2 change from the one before
        self.schedule: list[Segment] = []  # begun at the first step, once a subclass has set its peers

    # ---- the schedule -----------------------------------------------------------------------------
    def _segment(self) -> Segment:
        if not self.schedule:
            self._begin(0, self._parallel_next(0))
        return self.schedule[-1]

    def _begin(self, start: int, parallel: bool) -> None:
        size = min(self.peers.size, self.ctx.total_steps - start) if parallel else 1
        self.schedule.append(Segment(start, size, parallel))

    def _parallel_next(self, start: int) -> bool:
        """Whether the segment at `start` is a parallel round (rank 0 decides with `adaptive`)."""
        if self.peers.size == 1 or start < self.warmup:
            return False
        if not self.adaptive_pct:
            return True
        return self._change is not None and self._change * 100 < self.adaptive_pct

    # ---- the two interception points ------------------------------------------------------------
    def denoise(self, forward: Callable, args: tuple, kwargs: dict) -> Any:
        """Call `self.call` of the step: every call of a step is computed, reused, sent or received
        alike, so loops that call the denoiser several times a step (separate guidance passes, two
        experts) run the algorithm on the step's whole set of predictions."""
        rank, step = self.peers.rank, self.step
        start, _, parallel = self._segment()
        j = step - start
        if not parallel or (rank == 0 and j == 0):
            return self._keep(self.compute(forward, args, kwargs))
        if rank == 0:
            prediction, rebuild = split_output(self._cached())
            self._action = "receive"
            received = self.recv(prediction, src=j, tag=self.call)
            self._freshest[self.call] = received
            return rebuild(received)
        if j == rank:
            output = self._keep(self.compute(forward, args, kwargs))
            self._pending_sends.append(self.send(split_output(output)[0], dst=0, tag=self.call))
            return output
        self._action = "reuse" if j < rank else "idle"
        return self._cached()

    def _keep(self, output: Any) -> Any:
        """Caches this call's fresh output (rank 0 also keeps it as the freshest it applied)."""
        self.cache[self.call] = output
        if self.peers.rank == 0:
            self._freshest[self.call] = split_output(output)[0]
        return output

    def _cached(self) -> Any:
        return self.cache[self.call]  # present: step 0 is a sync step and has every call

    def after_step(self, latent: torch.Tensor) -> None:
        step = self.step
        if self.adaptive_pct and self.ctx.rank == 0:
            self._measure_change()
        start, size, parallel = self._segment()
        if step < start + size - 1:
            return  # inside a round: the ranks talk at its end
        self._wait_sends()
        if step == self.ctx.total_steps - 1:
            if self.ctx.world_size == 1:
                super().after_step(latent)
            return
        if self.ctx.world_size == 1:
            super().after_step(latent)
            self._begin(step + 1, False)
            return
        next_parallel = self.agree_on_cancel(self.ctx.rank == 0 and self._parallel_next(step + 1))
        if parallel:
            self.broadcast(latent)
            if self.sync_solver:
                for tensor in solver_state(self.ctx.pipe.scheduler, latent):
                    self.broadcast(tensor)
            if self.fresh_reuse and next_parallel and self.peers.size > 2:
                self._share_freshest()
        self._begin(step + 1, next_parallel)

    def _measure_change(self) -> None:
        """Rank 0, adaptive: how much the guided prediction the loop just applied changed from the
        previous step's (relative L2); it is what the loop handed to scheduler.step."""
        guided = self.noise.float()
        if self._guided is not None:
            self._change = float((guided - self._guided).norm() / self._guided.norm().clamp_min(1e-12))
        self._guided = guided

    def _wait_sends(self) -> None:
        for work in self._pending_sends:
            self.wait(work)
        self._pending_sends = []

    def _share_freshest(self) -> None:
        """Rank 0 broadcasts the round's last applied predictions; every rank reuses them from now on."""
        for call in sorted(self.cache):
            prediction, rebuild = split_output(self.cache[call])
            # Contiguous on every rank: the collective needs it (outputs may be permuted views).
            if self.peers.rank == 0:
                fresh = self._freshest[call].contiguous()
            else:
                fresh = torch.empty_like(prediction, memory_format=torch.contiguous_format)
            self.broadcast(fresh)
            if self.peers.rank != 0:
                self.cache[call] = rebuild(fresh)


def solver_state(scheduler: Any, latent: torch.Tensor) -> list[torch.Tensor]:
    """The tensors a multistep scheduler carries from step to step, in a fixed order: every tensor
    of the latent's shape it holds, alone or in a list (UniPC's and DPM-Solver's `model_outputs`,
    UniPC's `last_sample`). Schedules (sigmas, timesteps) have other shapes; counters are not tensors
    and are the same on every rank, which all step at every step."""
    found = []
    state = vars(scheduler)
    for name in sorted(state):
        # Private copies: a broadcast writes into them, and a scheduler may hold the very tensor the
        # loop passed (DPM-Solver's model output is the prediction itself), which a rank still uses.
        if isinstance(state[name], torch.Tensor) and state[name].shape == latent.shape:
            state[name] = state[name].clone()
            found.append(state[name])
        elif isinstance(state[name], list):
            for index, item in enumerate(state[name]):
                if isinstance(item, torch.Tensor) and item.shape == latent.shape:
                    state[name][index] = item.clone()
                    found.append(state[name][index])
    return found


# ---- traffic, from the algorithm alone ----------------------------------------------------------------
def published_schedule(total_steps: int, warmup: int, width: int) -> list[Segment]:
    """W sync steps, then rounds of `width` (every step a sync step when the width is 1)."""
    if width == 1:
        return [Segment(s, 1, False) for s in range(total_steps)]
    sync = [Segment(s, 1, False) for s in range(min(warmup, total_steps))]
    return sync + [Segment(s, min(width, total_steps - s), True) for s in range(warmup, total_steps, width)]


def evaluations(schedule: list[Segment], rank: int) -> int:
    """Denoiser evaluations of ParaStep rank `rank`: every sync step, and the rounds it takes part in."""
    return sum(1 for seg in map(Segment._make, schedule) if not seg.parallel or seg.size > rank)


def round_traffic(
    schedule: list[Segment], ranks: int, prediction_bytes: int, latent_bytes: int, fresh_reuse: bool = False
) -> list[dict[str, int]]:
    """Bytes each ParaStep rank sends and receives in one job, cancel flags aside.

    In a round of size n, rank k in 1..n-1 sends one prediction (all of a step's calls) to rank 0.
    After every round but a final one, rank 0 broadcasts its latent (with a multistep scheduler's
    state: pass their sum as `latent_bytes`) and, with `fresh_reuse`, N > 2 and another round next,
    the last prediction it applied; a broadcast counts one copy sent per receiver.
    """
    n = ranks
    traffic = [{"bytes_sent": 0, "bytes_received": 0} for _ in range(n)]
    if n == 1:
        return traffic
    schedule = [Segment._make(seg) for seg in schedule]  # plain (start, size, parallel) tuples too
    for index, seg in enumerate(schedule):
        if not seg.parallel:
            continue
        for k in range(1, seg.size):
            traffic[k]["bytes_sent"] += prediction_bytes
            traffic[0]["bytes_received"] += prediction_bytes
        if index == len(schedule) - 1:
            continue
        broadcast = latent_bytes
        if fresh_reuse and n > 2 and schedule[index + 1].parallel:
            broadcast += prediction_bytes
        traffic[0]["bytes_sent"] += broadcast * (n - 1)
        for k in range(1, n):
            traffic[k]["bytes_received"] += broadcast
    return traffic


def expected_traffic(
    total_steps: int,
    warmup: int,
    world_size: int,
    prediction_bytes: int,
    latent_bytes: int,
    fresh_reuse: bool = False,
    schedule: list[Segment] | None = None,
) -> list[dict[str, int]]:
    """Bytes each rank sends and receives in one job, from the algorithm alone.

    `round_traffic`, plus a one-byte cancel flag rank 0 broadcasts at the end of every segment but
    the last (after every warm-up step and every round but the last, as published). `schedule`:
    the segments the job ran (with `adaptive`); by default `published_schedule`.
    """
    schedule = schedule if schedule is not None else published_schedule(total_steps, warmup, world_size)
    traffic = round_traffic(schedule, world_size, prediction_bytes, latent_bytes, fresh_reuse)
    if world_size == 1:
        return traffic
    flags = len(schedule) - 1
    traffic[0]["bytes_sent"] += flags * (world_size - 1)
    for k in range(1, world_size):
        traffic[k]["bytes_received"] += flags
    return traffic
