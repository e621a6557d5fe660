"""AsyncDiff: the denoiser split into N parts on N devices, each part one step stale (Chen et al. 2024).

The denoiser's blocks (CogVideoX's transformer blocks; conv_in, down blocks, mid block and up blocks
of the SVD and AudioLDM2 UNets) are cut into N contiguous parts of about equal cost. Warm-up steps
0..W-1 run whole on every rank, identically. After that, at step t part k runs on rank k with the
outputs that parts 0..k-1 produced at step t-1 (part 0 takes the fresh latent), so all N parts run
at once; the last part's output is the noise prediction, which rank N-1 broadcasts so that every
rank takes the same scheduler step. Only what a part consumes crosses devices, point to point: the
boundary tensor from the part before it and the UNet skip tensors from any earlier part.

Stride S (the published stride denoising, as in the authors' code: `model_n + stride - 1` devices):
after warm-up, steps go in rounds of S. At a round starting at step s, ranks 0..N-1 run their parts
once, conditioned on the round's last timestep t_{s+S-1} (part 0 on the latent of step s), and S-1
extra ranks N..N+S-2 run the last part at t_s..t_{s+S-2} on the same stale inputs; the S outputs are
the predictions of steps s..s+S-1, so each device computes once per S steps. The authors' code
starts rounds at odd steps; here they start right after warm-up (the same for an odd warm-up).

Every rank holds the whole model. Each block carries a diffusers hook: a rank returns the received
(stale) outputs for blocks of earlier parts, runs its own part, and stops the forward after it
(`_PartDone`); the cheap work between blocks (time and patch embeddings) runs everywhere, and the
last rank also runs what follows the blocks (norm_out/proj_out, conv_out).

The split is decided once per job, at the last warm-up step but one (step 0 with one warm-up step):
rank 0 costs every block and broadcasts the costs, and every rank cuts the same contiguous parts,
minimising the largest. The cost is the block's measured time (`balance` 1, the default: parts of
about equal time, but a split that can differ between runs where two cuts are nearly as good) or its
counted operations (`balance` 0: FLOPs of matrix products, convolutions and attention, which depend
on shapes only, so the same request always gets the same split and the same output; on small
models on a CPU, where normalisation and softmax dominate, they are a poor guide to time). Which
block outputs each part consumes is traced at the last warm-up step, by tensor identity.
"""

from __future__ import annotations

import bisect
import inspect
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from engine.errors import UserError
from engine.models import ADAPTERS, FamilyAdapter, adapter_for_denoiser
from engine.protocol import RankCounters
from engine.strategies.base import Strategy, StrategyOption, denoiser_of, split_output
from engine.strategies.denoiser_info import denoiser_class_name, denoiser_config

BLOCK_HOOK_NAME = "asyncdiff_block"

Key = tuple[int, int]  # (block index, index of the tensor among the block's outputs)


@dataclass
class AsyncDiffCounters(RankCounters):
    """The common counters plus the part this rank ran after warm-up."""

    part_blocks: list[str] = field(default_factory=list)
    part_share: float = 0.0  # the part's share of the whole denoiser's cost, as the split saw it
    part_compute_s: float = 0.0  # seconds computing the part, after warm-up


class _PartDone(Exception):
    """Raised after a rank's last block: the rest of the forward belongs to later parts."""


class _BlockHook(ModelHook):
    def __init__(self, strategy: AsyncDiffStrategy, index: int) -> None:
        super().__init__()
        self.strategy = strategy
        self.index = index

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.strategy._block_forward(self.index, self.fn_ref.original_forward, args, kwargs)


# ---- which modules are blocks: declared by the model family's adapter --------------------------------
def _splittable() -> str:
    declared = [cls for cls in ADAPTERS.values() if cls.denoiser_blocks is not FamilyAdapter.denoiser_blocks]
    return ", ".join(cls.denoiser_class for cls in declared)


def denoiser_blocks(denoiser: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The denoiser's blocks in call order, as its family's adapter declares them."""
    kind = type(denoiser).__name__
    adapter = adapter_for_denoiser(kind)
    blocks = adapter.denoiser_blocks(denoiser) if adapter is not None else None
    if blocks is None:
        raise UserError(
            f"AsyncDiff cannot split a {kind}.", f"It splits {_splittable()}; use another strategy."
        )
    return blocks


def config_block_count(config: dict[str, Any]) -> int | None:
    """How many blocks denoiser_blocks finds, read off the denoiser's config (None: unknown)."""
    adapter = adapter_for_denoiser(config.get("_class_name"))
    return adapter.block_count(config) if adapter is not None else None


# ---- the split ----------------------------------------------------------------------------------
def balanced_split(costs: list[int], tail: int, parts: int) -> list[int]:
    """Boundaries [0, b1, ..., len(costs)] of `parts` contiguous non-empty parts; the last part also
    pays `tail`. Minimises the largest part cost, then the sum of squared part costs, then takes
    the lexicographically smallest boundaries (exact integer arithmetic: the same on every rank)."""
    n = len(costs)
    if not 1 <= parts <= n:
        raise ValueError(f"cannot cut {n} blocks into {parts} parts")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(i: int, j: int) -> int:  # blocks i..j-1 as one part
        return prefix[j] - prefix[i] + (tail if j == n else 0)

    # suffix[k][i]: (largest part, sum of squares) of blocks i..n-1 in k parts, optimised lexicographically
    # on the largest part only first.
    inf = float("inf")
    best_max = [[inf] * (n + 1) for _ in range(parts + 1)]
    best_max[0][n] = 0
    for k in range(1, parts + 1):
        for i in range(n - k, -1, -1):
            best_max[k][i] = min(
                max(cost(i, j), best_max[k - 1][j]) for j in range(i + 1, n - k + 2) if j <= n
            )
    limit = best_max[parts][0]
    squares = [[inf] * (n + 1) for _ in range(parts + 1)]
    squares[0][n] = 0
    for k in range(1, parts + 1):
        for i in range(n - k, -1, -1):
            squares[k][i] = min(
                (cost(i, j) ** 2 + squares[k - 1][j] for j in range(i + 1, n - k + 2) if cost(i, j) <= limit),
                default=inf,
            )
    bounds, i = [0], 0
    for k in range(parts, 0, -1):
        j = next(
            j
            for j in range(i + 1, n - k + 2)
            if cost(i, j) <= limit and cost(i, j) ** 2 + squares[k - 1][j] == squares[k][i]
        )
        bounds.append(j)
        i = j
    return bounds


def _attention_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    """aten.scaled_dot_product_attention as the CPU dispatch shows it (the counter knows only the
    CUDA kernels); leading dimensions folded into the batch."""

    def four(shape: Any) -> tuple[int, ...]:
        shape = tuple(shape)
        lead = 1
        for d in shape[:-3]:
            lead *= d
        return (lead, *shape[-3:]) if len(shape) >= 3 else (1, 1, *shape)

    return sdpa_flop_count(four(query_shape), four(key_shape), four(value_shape))


# ---- nested outputs: tensors inside tuples and lists ----------------------------------------------
def _flatten(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, tuple | list):
        return [t for item in obj for t in _flatten(item)]
    if isinstance(obj, dict):
        return [t for item in obj.values() for t in _flatten(item)]
    return []


def _rebuild(obj: Any, leaves: Iterator[torch.Tensor]) -> Any:
    """`obj` with its tensors replaced, in `_flatten` order, by the next ones from `leaves`."""
    if isinstance(obj, torch.Tensor):
        return next(leaves)
    if isinstance(obj, tuple | list):
        return type(obj)(_rebuild(item, leaves) for item in obj)
    return obj


def _placeholder(t: torch.Tensor) -> torch.Tensor:
    """A tensor of t's shape and dtype that holds no memory, for outputs nobody here reads."""
    return torch.zeros((), dtype=t.dtype, device=t.device).expand(t.shape)


def _timestep_like(old: Any, value: torch.Tensor) -> Any:
    if isinstance(old, torch.Tensor):
        return torch.as_tensor(value, device=old.device).to(old.dtype).reshape(()).expand(old.shape)
    return type(old)(value.item())


# ---- the strategy -------------------------------------------------------------------------------
class AsyncDiffStrategy(Strategy):
    name = "asyncdiff"
    description = (
        "Model parallel: the denoiser cut into N parts, each part one step stale, all parts at once "
        "(AsyncDiff, as published); N = devices - stride + 1."
    )
    options = (
        StrategyOption(
            "warmup", "Steps run whole on every device before the parts run asynchronously.", None, 0
        ),
        StrategyOption(
            "stride",
            "Stride denoising: each part runs once per S steps; needs S - 1 extra devices for the last part.",
            1,
            1,
        ),
        StrategyOption(
            "balance",
            "1: parts of equal measured time (rank 0 times each block in warm-up); 0: of equal counted "
            "operations (the same split every run).",
            1,
            0,
            1,
        ),
    )
    min_devices = 1
    max_devices = None
    keeps_denoiser_whole = False
    one_call_per_step = True  # the parts exchange the one call's boundary tensors
    width_from = "ranks"
    stride_from = "stride"  # N + S - 1 devices: N parts, each once per S steps

    @classmethod
    def unavailable_reason(cls, entry: Any) -> str | None:
        if config_block_count(denoiser_config(entry.path)) is None:
            kind = denoiser_class_name(entry.path)
            return (
                f"AsyncDiff splits {_splittable()} into parts; this model's denoiser is "
                f"{kind or 'of no known class'}."
            )
        return None

    @classmethod
    def check_request(cls, request: Any, adapter: Any, ranks: int) -> None:
        stride = int(request.strategy_options.get("stride", 1))
        if stride > ranks:
            raise UserError(
                f"AsyncDiff with stride {stride} needs at least {stride} devices (N parts take "
                f"N + {stride - 1} devices); {ranks} given.",
                f"Use --stride {ranks} or less, or more devices.",
            )

    @classmethod
    def check_model_request(cls, request: Any, entry: Any, ranks: int) -> None:
        blocks = config_block_count(denoiser_config(entry.path))
        if blocks is not None:
            _check_parts(blocks, ranks, int(request.strategy_options.get("stride", 1)))

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.counters = AsyncDiffCounters(rank=ctx.rank)
        self.warmup = int(ctx.options["warmup"])
        self.stride = int(ctx.options.get("stride", 1))
        self.parts = ctx.world_size - self.stride + 1
        # Ranks 0..N-1 run parts 0..N-1; the stride's extra ranks run the last part.
        self.my_part = min(ctx.rank, self.parts - 1)
        self.names: list[str] = []
        self.blocks: list[torch.nn.Module] = []
        self.bounds: list[int] = []  # part k is blocks bounds[k]..bounds[k+1]-1
        self.balance_by_time = bool(ctx.options.get("balance", 1))
        self.costs: list[int] = []  # per block, then what follows the blocks (ns or operations)
        self.needs: list[list[Key]] = []  # needs[p]: outputs of earlier parts that part p consumes
        self.skeletons: list[Any] = []  # each block's output with placeholder tensors
        # Per block output: the index of its first output that is the same tensor.
        self.aliases: list[list[int]] = []
        self.stale: dict[Key, torch.Tensor] = {}  # what this rank's part consumes, one step old
        self.fresh: dict[Key, torch.Tensor] = {}  # this rank's part outputs that later parts consume
        self.outgoing: set[Key] = set()
        self.prediction_like: torch.Tensor | None = None
        self.rebuild: Callable[[torch.Tensor], Any] | None = None
        self.round_predictions: list[torch.Tensor] = []
        self._pending: list[Any] = []
        # what the block hooks do in the current forward
        self._profiling = False
        self._counter: FlopCounterMode | None = None
        self._tracing = False
        self._running_part = False
        self._producers: dict[int, tuple[weakref.ref, Key]] = {}
        self._consumers: dict[Key, set[int]] = {}
        self._kept: dict[Key, torch.Tensor] = {}
        self._last_exit = 0  # cost mark when the last block returned

    # ---- installation -------------------------------------------------------------------------
    def install(self, pipe: Any) -> None:
        named = denoiser_blocks(denoiser_of(pipe))  # before any hook: it refuses unknown denoisers
        super().install(pipe)
        self.names = [name for name, _ in named]
        self.blocks = [block for _, block in named]
        for index, block in enumerate(self.blocks):
            HookRegistry.check_if_exists_or_initialize(block).register_hook(
                _BlockHook(self, index), BLOCK_HOOK_NAME
            )

    def uninstall(self) -> None:
        for block in self.blocks:
            HookRegistry.check_if_exists_or_initialize(block).remove_hook(BLOCK_HOOK_NAME, recurse=False)
        self.blocks = []
        super().uninstall()

    # ---- the schedule -------------------------------------------------------------------------
    def _round(self, step: int) -> tuple[int, int, int]:
        """(first step s, size n, position j of `step`) of the round holding a post-warm-up step."""
        start = self.warmup + ((step - self.warmup) // self.stride) * self.stride
        return start, min(self.stride, self.ctx.total_steps - start), step - start

    def _source(self, position: int, size: int) -> int:
        """The rank whose last-part output is the prediction at `position` of a round of `size`."""
        return self.parts - 1 if position == size - 1 else self.parts + position

    # ---- the denoiser hook --------------------------------------------------------------------
    def denoise(self, forward: Callable, args: tuple, kwargs: dict) -> Any:
        step = self.step
        if self.ctx.world_size == 1:
            return self.compute(forward, args, kwargs)
        if step < self.warmup:
            return self._whole_step(forward, args, kwargs)
        start, size, position = self._round(step)
        if position > 0:
            self._action = "receive"
            return self.rebuild(self.round_predictions[position])
        if step > self.warmup:
            self._receive_stale()
        prediction = None
        if self.ctx.rank < self.parts:
            target = start + size - 1
            prediction = self._run_part(forward, args, kwargs, target)
        elif self.ctx.rank - self.parts < size - 1:
            prediction = self._run_part(forward, args, kwargs, start + self.ctx.rank - self.parts)
        else:
            self._action = "idle"  # an extra rank in a last round shorter than the stride
        self.round_predictions = []
        for position in range(size):
            source = self._source(position, size)
            if self.ctx.rank == source:
                buffer = split_output(prediction)[0].contiguous()
            else:
                buffer = torch.empty_like(self.prediction_like)
            self.broadcast(buffer, source)
            self.round_predictions.append(buffer)
        return self.rebuild(self.round_predictions[0])

    def _whole_step(self, forward: Callable, args: tuple, kwargs: dict) -> Any:
        """A warm-up step: the whole denoiser. The last warm-up step but one (or step 0) measures the
        blocks' costs and fixes the split; the last one traces what each part consumes."""
        step = self.step
        if step == 0:  # the plan checked the config; this checks the model as loaded
            _check_parts(len(self.blocks), self.ctx.world_size, self.stride)
        parallel = self.warmup < self.ctx.total_steps  # else this is the plain loop: nothing to split
        self._tracing = parallel and step == self.warmup - 1
        if self._tracing:
            self._producers, self._consumers, self._kept = {}, {}, {}
        if parallel and step == max(self.warmup - 2, 0):
            output = self._profiled(forward, args, kwargs)
        else:
            output = self.compute(forward, args, kwargs)
        if self._tracing:
            self._tracing = False
            self._finish_trace()
            prediction, self.rebuild = split_output(output)
            self.prediction_like = torch.empty_like(prediction)
        return output

    def _profiled(self, forward: Callable, args: tuple, kwargs: dict) -> Any:
        """The whole denoiser, costing each block: its measured nanoseconds, or its counted
        operations (`balance` 0). Rank 0's costs are broadcast, so every rank cuts the same parts."""
        self.costs = [0] * (len(self.blocks) + 1)
        self._profiling = True
        try:
            if self.balance_by_time:
                output = self.compute(forward, args, kwargs)
                self.costs[-1] = time.perf_counter_ns() - self._last_exit
            else:
                mapping = {torch.ops.aten.scaled_dot_product_attention: _attention_flops}
                with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
                    self._counter = counter
                    output = self.compute(forward, args, kwargs)
                    self.costs[-1] = counter.get_total_flops() - self._last_exit
        finally:
            self._profiling, self._counter = False, None
        agreed = torch.tensor(self.costs, dtype=torch.int64, device=self.ctx.device)
        self.broadcast(agreed, 0)
        self.costs = [int(c) for c in agreed.tolist()]
        self.bounds = balanced_split(self.costs[:-1], self.costs[-1], self.parts)
        first, end = self.bounds[self.my_part], self.bounds[self.my_part + 1]
        self.counters.part_blocks = self.names[first:end]
        mine = sum(self.costs[first:end]) + (self.costs[-1] if self.my_part == self.parts - 1 else 0)
        self.counters.part_share = mine / max(sum(self.costs), 1)
        return output

    def _run_part(self, forward: Callable, args: tuple, kwargs: dict, time_index: int) -> Any:
        """This rank's part at the latent of this step and the timestep of step `time_index`; the
        denoiser output on the last part, else None."""
        if time_index != self.step:
            args, kwargs = self._at_timestep(forward, args, kwargs, time_index)
        self.fresh = {}

        def until_part_end(*a: Any, **k: Any) -> Any:
            try:
                return forward(*a, **k)
            except _PartDone:
                return None

        self._running_part = True
        before = self.counters.compute_s
        try:
            output = self.compute(until_part_end, args, kwargs)
        finally:
            self._running_part = False
        self.counters.part_compute_s += self.counters.compute_s - before
        return output

    def _at_timestep(self, forward: Callable, args: tuple, kwargs: dict, index: int) -> tuple[tuple, dict]:
        bound = inspect.signature(forward).bind(*args, **kwargs)
        arguments = dict(bound.arguments)
        timestep = self.ctx.pipe.scheduler.timesteps[index]
        arguments["timestep"] = _timestep_like(arguments["timestep"], timestep)
        return (), arguments

    # ---- the block hooks ----------------------------------------------------------------------
    def _block_forward(self, index: int, forward: Callable, args: tuple, kwargs: dict) -> Any:
        if self._running_part:
            return self._part_block(index, forward, args, kwargs)
        if self._tracing:
            self._trace_inputs(index, args, kwargs)
        if not self._profiling:
            output = forward(*args, **kwargs)
        else:
            before = self._cost_mark()
            output = forward(*args, **kwargs)
            self._last_exit = self._cost_mark()
            self.costs[index] = self._last_exit - before
        if self._tracing:
            self._trace_outputs(index, output)
        return output

    def _part_block(self, index: int, forward: Callable, args: tuple, kwargs: dict) -> Any:
        first, end = self.bounds[self.my_part], self.bounds[self.my_part + 1]
        if index < first:  # an earlier part's block: what it produced last step
            skeleton = self.skeletons[index]
            placeholders = _flatten(skeleton)
            leaves = [self.stale.get((index, a), placeholders[i]) for i, a in enumerate(self.aliases[index])]
            return _rebuild(skeleton, iter(leaves))
        if index >= end:
            raise AssertionError("a block after this rank's part ran")  # _PartDone stops before
        output = forward(*args, **kwargs)
        for i, tensor in enumerate(_flatten(output)):
            if (index, i) in self.outgoing:
                self.fresh[(index, i)] = tensor
        if index == end - 1 and self.my_part < self.parts - 1:
            raise _PartDone()
        return output

    def _cost_mark(self) -> int:
        if self._counter is not None:
            return self._counter.get_total_flops()
        self._sync_device()
        return time.perf_counter_ns()

    def _part_of(self, index: int) -> int:
        return bisect.bisect_right(self.bounds, index) - 1

    def _trace_inputs(self, index: int, args: tuple, kwargs: dict) -> None:
        for tensor in _flatten((args, kwargs)):
            entry = self._producers.get(id(tensor))
            if entry is None or entry[0]() is not tensor:
                continue
            key = entry[1]
            self._consumers.setdefault(key, set()).add(index)
            # Before the split is known (warm-up 1: the split and the trace share step 0) keep all.
            if not self.bounds or self._part_of(key[0]) < self.my_part == self._part_of(index):
                self._kept[key] = tensor

    def _trace_outputs(self, index: int, output: Any) -> None:
        """Names each distinct output tensor (a UNet down block returns its hidden state twice: as
        the output and as its last skip) and keeps a skeleton of the output."""
        leaves = _flatten(output)
        first: dict[int, int] = {}
        for i, tensor in enumerate(leaves):
            first.setdefault(id(tensor), i)
            self._producers[id(tensor)] = (weakref.ref(tensor), (index, first[id(tensor)]))
        while len(self.skeletons) <= index:
            self.skeletons.append(None)
            self.aliases.append([])
        self.skeletons[index] = _rebuild(output, iter([_placeholder(t) for t in leaves]))
        self.aliases[index] = [first[id(t)] for t in leaves]

    def _finish_trace(self) -> None:
        self.needs = []
        for part in range(self.parts):
            self.needs.append(
                sorted(
                    key
                    for key, users in self._consumers.items()
                    if self._part_of(key[0]) < part and any(self._part_of(u) == part for u in users)
                )
            )
        self.stale = {key: self._kept[key] for key in self.needs[self.my_part]}
        self.outgoing = (
            {key for part in self.needs for key in part if self._part_of(key[0]) == self.ctx.rank}
            if self.ctx.rank < self.parts
            else set()
        )
        self._producers, self._consumers, self._kept = {}, {}, {}

    # ---- moving the parts' outputs ------------------------------------------------------------
    def _sends(self) -> Iterator[tuple[int, Key]]:
        """(destination rank, key) of what this rank sends after each round, in order."""
        if self.ctx.rank >= self.parts - 1:
            return
        for rank in range(self.ctx.rank + 1, self.ctx.world_size):
            for key in self.needs[min(rank, self.parts - 1)]:
                if self._part_of(key[0]) == self.ctx.rank:
                    yield rank, key

    def _receive_stale(self) -> None:
        for source in range(self.my_part):
            for key in self.needs[self.my_part]:
                if self._part_of(key[0]) == source:
                    self.stale[key] = self.recv(self.stale[key], source)

    def _wait_sends(self) -> None:
        for work in self._pending:
            self.wait(work)
        self._pending = []

    def after_step(self, latent: torch.Tensor) -> None:
        step, last = self.step, self.ctx.total_steps - 1
        if self.ctx.world_size == 1:
            super().after_step(latent)
            return
        if step == last:
            self._wait_sends()
            return
        if step < self.warmup:
            self.agree_on_cancel()
            return
        start, size, position = self._round(step)
        if position == size - 1:  # the round ends: agree, then send what the next round consumes
            self.agree_on_cancel()
            self._wait_sends()
            self._pending = [self.send(self.fresh[key], rank) for rank, key in self._sends()]


def _check_parts(blocks: int, devices: int, stride: int) -> None:
    parts = devices - stride + 1
    if parts > blocks:
        raise UserError(
            f"AsyncDiff cannot cut {blocks} blocks into {parts} parts ({devices} devices, stride {stride}).",
            f"Use at most {blocks + stride - 1} devices with this model and stride.",
        )


def rounds(total_steps: int, warmup: int, stride: int) -> list[tuple[int, int]]:
    """(first step, size) of each round after warm-up."""
    return [(s, min(stride, total_steps - s)) for s in range(warmup, total_steps, stride)]


def expected_traffic(
    total_steps: int,
    warmup: int,
    stride: int,
    world_size: int,
    prediction_bytes: int,
    boundary_bytes: list[list[int]],
    blocks: int,
) -> list[dict[str, int]]:
    """Bytes each rank sends and receives in one job, from the algorithm alone.

    N = world_size - stride + 1 parts; `boundary_bytes[q][p]` is what part q hands to a rank running
    part p after each round (the boundary tensor for q = p - 1, skip tensors for q < p - 1).
    - After every warm-up step and every round but the last, rank 0 broadcasts a one-byte cancel flag.
    - Where there is a step after warm-up, rank 0 broadcasts the costs of the `blocks` blocks and of
      what follows them, as int64, once.
    - Each round of n steps: n prediction broadcasts, step s+e from extra rank N+e (e < n-1) and the
      last one from rank N-1. A broadcast counts one copy sent per receiver.
    - After every round but the last, rank q < N-1 sends boundary_bytes[q][p] to every rank of part p > q
      (the extra ranks run part N-1).
    """
    n, r = world_size - stride + 1, world_size
    traffic = [{"bytes_sent": 0, "bytes_received": 0} for _ in range(r)]
    if r == 1:
        return traffic
    schedule = rounds(total_steps, warmup, stride)
    from_rank_0 = min(warmup, total_steps - 1) + max(len(schedule) - 1, 0)
    if schedule:
        from_rank_0 += 8 * (blocks + 1)
    for rank in range(r):
        if rank == 0:
            traffic[rank]["bytes_sent"] += from_rank_0 * (r - 1)
        else:
            traffic[rank]["bytes_received"] += from_rank_0
    for _, size in schedule:
        for position in range(size):
            source = n - 1 if position == size - 1 else n + position
            for rank in range(r):
                if rank == source:
                    traffic[rank]["bytes_sent"] += prediction_bytes * (r - 1)
                else:
                    traffic[rank]["bytes_received"] += prediction_bytes
    exchanges = max(len(schedule) - 1, 0)
    for rank in range(r):
        part = min(rank, n - 1)
        for source in range(part):
            traffic[source]["bytes_sent"] += exchanges * boundary_bytes[source][part]
            traffic[rank]["bytes_received"] += exchanges * boundary_bytes[source][part]
    return traffic
