"""CFG-parallel: classifier-free guidance's two halves on two devices; exact.

Loops come in two shapes, which the family adapter declares (`separate_guidance_calls`).

Batched (CogVideoX, SVD, AudioLDM2): with guidance on, the loop calls the denoiser once per step on
a batch that holds the unconditional half, then the conditional half. Rank 0 runs the first half and
rank 1 the second:
every batched tensor argument (the latent input, batched timesteps, prompt embeddings, attention
masks, SVD's image embeddings and added time ids, AudioLDM2's second text stream, ...) is cut along
dim 0; unbatched ones (a scalar timestep, CogVideoX's rotary embeddings) go through whole. The two
output halves are all-gathered, so both ranks hold the whole output, run the same guidance and
the same scheduler step on the same tensors, and keep the same latent with no broadcast (same
operations on the same bits: deterministic on CPU and on GPUs of one kind).

The only difference from sequential is that each half is evaluated at batch size 1 instead of 2,
which may change the last bits of float sums (kernels pick their blocking by batch size).
Traffic per step and rank: half a prediction each way, plus a one-byte cancel flag from rank 0
after every step but the last.

Separate calls (Wan, HunyuanVideo 1.5, LTX-2): the loop calls the denoiser once per guidance pass,
one after the other, and combines the outputs itself. Step 0 runs every call on both ranks and
records which arguments tell call c+1 from call c (the negative prompt's embeddings, typically);
from step 1 on, the calls go in pairs: at call c rank 0 evaluates call c as given while rank 1
evaluates call c+1 from the same arguments with those recorded ones swapped in, the two outputs
are all-gathered, and call c+1 returns rank 1's output without computing. At call c+1 both ranks
check that the loop's arguments are the ones rank 1 assumed, and refuse the loop otherwise (both
ranks see the same arguments, so they fail together). An odd last call runs on both ranks. The
loop then guides and steps as it always does, on the same tensors on both ranks.
Traffic per step and rank after step 0: one call's prediction each way per pair of calls.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from engine.errors import UserError
from engine.strategies.base import Peers, Strategy, split_output


class CfgSplitCompute(Strategy):
    """`compute` evaluates this rank's CFG half and gathers the other half from `self.pair`."""

    pair: Peers  # the two ranks sharing one denoiser batch; pair.rank 0 runs the unconditional half

    def compute(self, forward: Callable, args: tuple, kwargs: dict) -> Any:
        sample = args[0] if args else kwargs[next(iter(inspect.signature(forward).parameters))]
        batch = sample.shape[0]
        if batch % 2:
            raise UserError(
                f"The denoiser batch has {batch} entries, not the two guidance halves '{self.name}' splits.",
                "Use guidance above 1 with a pipeline that batches both halves, or another strategy.",
            )
        half = slice(self.pair.rank * batch // 2, (self.pair.rank + 1) * batch // 2)

        def cut(value: Any) -> Any:
            is_batched = isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch
            return value[half] if is_batched else value

        output = super().compute(forward, tuple(cut(v) for v in args), {k: cut(v) for k, v in kwargs.items()})
        mine, rebuild = split_output(output)
        return rebuild(self.all_gather(mine.contiguous()))

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Both halves, in pair order, concatenated along dim 0 on both ranks."""
        parts = [torch.empty_like(tensor) for _ in range(self.pair.size)]
        start = time.perf_counter()
        dist.all_gather(parts, tensor, group=self.pair.group)
        self._waited(start)
        nbytes = tensor.numel() * tensor.element_size()
        self.counters.bytes_sent += nbytes * (self.pair.size - 1)
        self.counters.bytes_received += nbytes * (self.pair.size - 1)
        return torch.cat(parts)


def refuse_without_guidance(strategy: str, request: Any, adapter: Any) -> None:
    if not adapter.uses_guidance(request):
        raise UserError(
            f"'{strategy}' runs the two halves of classifier-free guidance on two devices, but guidance "
            f"scale {request.guidance_scale} (1 or less) turns guidance off: there is only one half.",
            "Set --guidance-scale above 1, or use sequential or parastep.",
            field="guidance_scale",
        )


def _same(a: Any, b: Any) -> bool:
    """Whether two denoiser arguments hold the same value (identity first: the loop passes the same
    tensors to every call of a step)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and torch.equal(a, b)
        )
    try:
        return bool(a == b)
    except Exception:  # values without a plain equality (e.g. nested tensors)
        return False


class CallPairs:
    """Separate guidance calls paired across the two ranks of `pair` (see the module docstring)."""

    def __init__(self, strategy: CfgSplitCompute) -> None:
        self.strategy = strategy
        self.first_step: dict[int, dict[str, Any]] = {}  # step 0: call -> its bound arguments
        self.swapped: dict[int, dict[str, Any]] = {}  # call c+1 -> arguments that differ from call c
        self.previous: dict[str, Any] = {}  # the arguments of the step's previous call
        self.gathered: Any = None  # the partner call's output, from the pair's all-gather

    def denoise(self, forward: Callable, args: tuple, kwargs: dict) -> Any:
        s = self.strategy
        bound = dict(inspect.signature(forward).bind(*args, **kwargs).arguments)
        call, previous, self.previous = s.call, self.previous, bound
        if s.step == 0:
            self.first_step[call] = bound
            if call:
                before = self.first_step[call - 1]
                self.swapped[call] = {k: v for k, v in bound.items() if not _same(v, before.get(k))}
            return Strategy.compute(s, forward, args, kwargs)
        if call % 2:  # the partner of call - 1: computed already, by rank 1
            self._check(call, bound, previous)
            return self.gathered
        if call + 1 not in self.swapped:  # an odd last call: both ranks run it
            return Strategy.compute(s, forward, args, kwargs)
        if s.pair.rank == 1:
            bound = {**bound, **self.swapped[call + 1]}
        output = Strategy.compute(s, forward, (), bound)
        mine, rebuild = split_output(output)
        both = s.all_gather(mine.contiguous()).chunk(2)
        self.gathered = rebuild(both[1])
        return rebuild(both[0])

    def _check(self, call: int, bound: dict[str, Any], previous: dict[str, Any]) -> None:
        expected = {**previous, **self.swapped[call]}
        changed = sorted(
            k for k in bound.keys() | expected.keys() if not _same(bound.get(k), expected.get(k))
        )
        if changed:
            raise UserError(
                f"Denoiser call {call} of step {self.strategy.step} differs from call {call - 1} in "
                f"{', '.join(changed)} otherwise than at step 0, so cfg-parallel cannot compute it ahead.",
                "Use parastep or sequential for this pipeline.",
            )


class CfgParallelStrategy(CfgSplitCompute):
    name = "cfg-parallel"
    description = "Classifier-free guidance's unconditional and conditional halves on two devices; exact."
    min_devices = 2
    max_devices = 2
    speedup_factor = 2

    @classmethod
    def check_request(cls, request: Any, adapter: Any, ranks: int) -> None:
        refuse_without_guidance(cls.name, request, adapter)

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.pair = self.world
        self.call_pairs = CallPairs(self) if ctx.adapter.separate_guidance_calls else None

    def denoise(self, forward: Callable, args: tuple, kwargs: dict) -> Any:
        if self.call_pairs is not None:
            return self.call_pairs.denoise(forward, args, kwargs)
        return self.compute(forward, args, kwargs)

    def after_step(self, latent: torch.Tensor) -> None:
        # Both ranks exchange halves at every step, so they agree on a cancel at every step.
        if self.step < self.ctx.total_steps - 1:
            self.agree_on_cancel()


def expected_traffic(
    total_steps: int, prediction_bytes: int, separate_calls: bool = False
) -> list[dict[str, int]]:
    """Bytes each of the two ranks sends and receives in one job: half a prediction (all of a step's
    calls) each way per step, and rank 0's one-byte cancel flag after every step but the last.
    `separate_calls`: step 0 runs whole on both ranks and exchanges nothing (an even call count)."""
    exchanged = total_steps - 1 if separate_calls else total_steps
    halves = exchanged * (prediction_bytes // 2)
    flags = max(total_steps - 1, 0)
    return [
        {"bytes_sent": halves + flags, "bytes_received": halves},
        {"bytes_sent": halves, "bytes_received": halves + flags},
    ]
