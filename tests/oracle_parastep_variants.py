"""Single-process references for CFG-parallel, CFG-ParaStep and the ParaStep variants.

Written from DESIGN.md section 3 and the variants' definitions, independently of engine.strategies:
the family loops come from tests/oracle.py (the stock pipeline's recorded loop inputs, rebuilt),
and the ranks are simulated one after another.

- CFG split: a denoiser wrapper cuts every argument whose first dimension is the CFG batch (2B)
  into the unconditional and conditional halves, evaluates each half on its own, and concatenates
  the two outputs. CFG-parallel is the sequential loop with that denoiser; CFG-ParaStep with 2N
  devices is ParaStep with N ranks with that denoiser.
- `fresh_reuse`: after every round but the last, every rank's cache becomes the prediction rank 0
  applied last (the spec, literally; at N = 2 that is rank 1's own prediction anyway).
- `adaptive` (percent): the loop is a schedule of sync steps (every rank computes the same step)
  and parallel rounds. Each prediction rank 0 applies is compared with the one it applied before
  (relative L2 of the guided predictions); after at least W sync steps, the next segment is a
  round when the last change was below the threshold, else a sync step. The schedule, as
  (first step, size, parallel) segments, is returned with the latent.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any

import torch

from tests import oracle


def cfg_split_denoiser(denoiser: torch.nn.Module) -> Any:
    """A callable like `denoiser` (return_dict=False) that evaluates the two CFG halves separately."""

    def call(*args: Any, **kwargs: Any) -> tuple[torch.Tensor]:
        sample = args[0] if args else kwargs["hidden_states"]
        batch = sample.shape[0]
        assert batch % 2 == 0, "CFG split needs both guidance halves in the batch"

        def half(value: Any, which: int) -> Any:
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
                return value.chunk(2)[which]
            return value

        outputs = [
            denoiser(*(half(a, c) for a in args), **{k: half(v, c) for k, v in kwargs.items()})[0]
            for c in (0, 1)
        ]
        return (torch.cat(outputs),)

    return call


def with_cfg_split(rec: oracle.Recording) -> oracle.Recording:
    """The same recording, its denoiser replaced by the CFG-split one."""
    if not rec.cfg:
        raise ValueError("the recorded loop does not use classifier-free guidance")
    return dataclasses.replace(rec, denoiser=cfg_split_denoiser(rec.denoiser))


def relative_change(new: torch.Tensor, old: torch.Tensor) -> float:
    return float((new - old).norm() / old.norm().clamp_min(1e-12))


def parastep(
    rec: oracle.Recording, ranks: int, warmup: int, fresh_reuse: bool = False, adaptive: int = 0
) -> tuple[torch.Tensor, list[tuple[int, int, bool]]]:
    """Rank 0's final latent under ParaStep with the given variants, and the schedule it ran."""
    total = rec.steps
    if ranks < 1 or not 0 <= warmup <= total:
        raise ValueError("bad ParaStep parameters")
    with oracle.single_thread(), torch.inference_mode():
        scheduler = copy.deepcopy(rec.scheduler)
        x = rec.x0.clone()
        caches: list[torch.Tensor | None] = [None] * ranks
        schedule: list[tuple[int, int, bool]] = []
        applied: list[torch.Tensor] = []  # guided predictions rank 0 applied, in order

        def apply(raw: torch.Tensor, index: int) -> torch.Tensor:
            applied.append(oracle.guide(rec, raw).float())
            return oracle.advance(rec, scheduler, raw, index, x)

        def last_change() -> float | None:
            return relative_change(applied[-1], applied[-2]) if len(applied) > 1 else None

        s = 0
        while s < total:
            parallel = ranks > 1 and s >= warmup
            if parallel and adaptive:
                change = last_change()
                parallel = change is not None and change * 100 < adaptive
            if not parallel:  # a sync step: every rank computes it; all caches become it
                raw = oracle.denoise(rec, scheduler, x, s)
                caches = [raw] * ranks
                x = apply(raw, s)
                schedule.append((s, 1, False))
                s += 1
                continue
            n = min(ranks, total - s)
            at_start = copy.deepcopy(scheduler)
            predictions = [oracle.denoise(rec, scheduler, x, s)]
            for k in range(1, n):
                own = copy.deepcopy(at_start)
                x_k = x
                for m in range(k):
                    x_k = oracle.advance(rec, own, caches[k], s + m, x_k)
                caches[k] = oracle.denoise(rec, own, x_k, s + k)
                predictions.append(caches[k])
            for j, prediction in enumerate(predictions):
                x = apply(prediction, s + j)
            schedule.append((s, n, True))
            s += n
            if fresh_reuse:
                caches = [predictions[-1]] * ranks
        return x, schedule


def guided_changes(rec: oracle.Recording) -> list[float]:
    """Relative L2 change of the guided prediction at steps 1..T-1 of the sequential loop."""
    changes, previous = [], None
    with oracle.single_thread(), torch.inference_mode():
        scheduler = copy.deepcopy(rec.scheduler)
        x = rec.x0.clone()
        for i in range(rec.steps):
            raw = oracle.denoise(rec, scheduler, x, i)
            guided = oracle.guide(rec, raw).float()
            if previous is not None:
                changes.append(relative_change(guided, previous))
            previous = guided
            x = oracle.advance(rec, scheduler, raw, i, x)
    return changes
