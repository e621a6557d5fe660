"""CFG-parallel: classifier-free guidance's two halves on two devices; exact.

With guidance on, every supported loop calls the denoiser once per step on a batch that holds the
unconditional half, then the conditional half. Rank 0 runs the first half and rank 1 the second:
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

    def after_step(self, latent: torch.Tensor) -> None:
        # Both ranks exchange halves at every step, so they agree on a cancel at every step.
        if self.step < self.ctx.total_steps - 1:
            self.agree_on_cancel()


def expected_traffic(total_steps: int, prediction_bytes: int) -> list[dict[str, int]]:
    """Bytes each of the two ranks sends and receives in one job: half a prediction each way per
    step, and rank 0's one-byte cancel flag after every step but the last."""
    halves = total_steps * (prediction_bytes // 2)
    flags = max(total_steps - 1, 0)
    return [
        {"bytes_sent": halves + flags, "bytes_received": halves},
        {"bytes_sent": halves, "bytes_received": halves + flags},
    ]
