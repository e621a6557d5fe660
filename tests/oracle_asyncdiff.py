"""A single-process reference of AsyncDiff (DESIGN.md section 3; Chen et al. 2024), for its tests.

Written independently of engine.strategies: nothing is imported from it. The family loops come
from tests/oracle.py (a stock run records what the loop feeds its denoiser).

The N parts are simulated one after another with PyTorch forward hooks on the denoiser's blocks:
to run part p at a step, the whole denoiser is called with every block of parts 0..p-1 replaced by
the output that block gave one step (or one round) earlier; the outputs of part p's blocks are
recorded for the next step, and part N-1's output is the prediction. Blocks of later parts run on
whatever they get, and nothing of theirs is used.

- Warm-up steps 0..W-1 are the plain loop; the last one's block outputs are the first stale ones.
- After warm-up, steps go in rounds of S (stride). In a round at step s of n steps, every part
  runs at the timestep of step s+n-1 on the denoiser input of step s, and part N-1 also runs at the
  timesteps of steps s..s+n-2 (the stride's extra devices) on the same stale outputs; the n outputs
  are applied in order. Only the first kind feeds the next round. With S = 1 this is: part p at
  step t consumes parts 0..p-1 of step t-1.

The split (block costs counted as floating-point operations, the parts chosen by trying every cut)
and the bytes each part must receive (found by poisoning one stale tensor at a time with NaN and
seeing whether part p's outputs change) are worked out here too, for comparison with the engine.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from tests.oracle import Recording, advance, single_thread


def blocks(rec: Recording) -> list[tuple[str, torch.nn.Module]]:
    model = rec.denoiser
    if rec.family == "cogvideox":
        return [(f"transformer_blocks.{i}", b) for i, b in enumerate(model.transformer_blocks)]
    found = [("conv_in", model.conv_in)]
    found += [(f"down_blocks.{i}", b) for i, b in enumerate(model.down_blocks)]
    if model.mid_block is not None:
        found.append(("mid_block", model.mid_block))
    found += [(f"up_blocks.{i}", b) for i, b in enumerate(model.up_blocks)]
    return found


def call(
    rec: Recording,
    scheduler: Any,
    latent: torch.Tensor,
    index: int,
    time_index: int,
    replace: dict[int, Any] | None = None,
    keep: set[int] | None = None,
) -> tuple[torch.Tensor, dict[int, Any]]:
    """The raw denoiser output for `latent` as the loop builds it at step `index`, conditioned on the
    timestep of step `time_index`; blocks in `replace` return the given outputs; the outputs of the
    blocks in `keep` are returned too."""
    replace, keep = replace or {}, keep or set()
    kept: dict[int, Any] = {}
    handles = []
    for b, (_, module) in enumerate(blocks(rec)):

        def hook(module: Any, args: Any, output: Any, b: int = b) -> Any:
            if b in keep:
                kept[b] = output
            return replace.get(b, output)

        handles.append(module.register_forward_hook(hook))
    try:
        model_input = torch.cat([latent, latent]) if rec.cfg else latent
        model_input = scheduler.scale_model_input(model_input, scheduler.timesteps[index])
        t = scheduler.timesteps[time_index]
        if rec.family == "cogvideox":
            kwargs = {**rec.call_kwargs, "hidden_states": model_input, "return_dict": False}
            kwargs["timestep"] = t.expand(model_input.shape[0])
            out = rec.denoiser(*rec.call_args, **kwargs)[0]
        else:
            if rec.family == "svd":
                image_latents = rec.call_args[0][:, :, latent.shape[2] :]
                model_input = torch.cat([model_input, image_latents], dim=2)
            out = rec.denoiser(
                model_input, t, *rec.call_args[2:], **{**rec.call_kwargs, "return_dict": False}
            )[0]
    finally:
        for handle in handles:
            handle.remove()
    return out, kept


# ---- the split ----------------------------------------------------------------------------------
def _attention_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    *lead, s_q, d = query_shape
    s_k, d_v = key_shape[-2], value_shape[-1]
    batch = 1
    for x in lead:
        batch *= x
    return 2 * batch * s_q * s_k * d + 2 * batch * s_q * s_k * d_v


def block_costs(rec: Recording) -> tuple[list[int], int]:
    """Floating-point operations of each block at step 0, and of what follows the last block."""
    named = blocks(rec)
    marks: dict[str, int] = {}
    costs = [0] * len(named)
    mapping = {torch.ops.aten.scaled_dot_product_attention: _attention_flops}
    with (
        single_thread(),
        torch.inference_mode(),
        FlopCounterMode(display=False, custom_mapping=mapping) as counter,
    ):
        handles = []
        for b, (_, module) in enumerate(named):
            handles.append(
                module.register_forward_pre_hook(
                    lambda m, a, b=b: marks.__setitem__(f"in{b}", counter.get_total_flops())
                )
            )
            handles.append(
                module.register_forward_hook(
                    lambda m, a, o, b=b: marks.__setitem__(f"out{b}", counter.get_total_flops())
                )
            )
        try:
            scheduler = copy.deepcopy(rec.scheduler)
            call(rec, scheduler, rec.x0, 0, 0)
        finally:
            for handle in handles:
                handle.remove()
        total = counter.get_total_flops()
    for b in range(len(named)):
        costs[b] = marks[f"out{b}"] - marks[f"in{b}"]
    return costs, total - marks[f"out{len(named) - 1}"]


def split(costs: list[int], tail: int, parts: int) -> list[int]:
    """Every way to cut the blocks into `parts` contiguous parts (the last also pays `tail`); the one
    with the smallest largest part, then the smallest sum of squares, then the smallest cuts."""
    n = len(costs)
    best = None
    for cuts in itertools.combinations(range(1, n), parts - 1):
        bounds = [0, *cuts, n]
        sums = [sum(costs[bounds[k] : bounds[k + 1]]) for k in range(parts)]
        sums[-1] += tail
        key = (max(sums), sum(s * s for s in sums), bounds)
        best = key if best is None or key < best else best
    return best[2]


# ---- the algorithm ------------------------------------------------------------------------------
def asyncdiff(rec: Recording, bounds: list[int], warmup: int, stride: int) -> torch.Tensor:
    """The final latent under AsyncDiff with the parts `bounds`, `warmup` and `stride`."""
    parts, total = len(bounds) - 1, rec.steps
    everything = set(range(bounds[-1]))
    with single_thread(), torch.inference_mode():
        scheduler = copy.deepcopy(rec.scheduler)
        x = rec.x0.clone()
        stale: dict[int, Any] = {}
        for i in range(warmup):
            raw, kept = call(rec, scheduler, x, i, i, keep=everything if i == warmup - 1 else None)
            stale = kept or stale
            x = advance(rec, scheduler, raw, i, x)
        for s in range(warmup, total, stride):
            n = min(stride, total - s)
            predictions: list[torch.Tensor | None] = [None] * n
            fresh: dict[int, Any] = {}
            for p in range(parts):
                earlier = {b: stale[b] for b in range(bounds[p])}
                mine = set(range(bounds[p], bounds[p + 1]))
                raw, kept = call(rec, scheduler, x, s, s + n - 1, replace=earlier, keep=mine)
                fresh.update(kept)
                if p == parts - 1:
                    predictions[n - 1] = raw
                    for e in range(n - 1):  # the extra devices: the last part at the round's other steps
                        predictions[e] = call(rec, scheduler, x, s, s + e, replace=earlier)[0]
            stale = fresh
            for e, raw in enumerate(predictions):
                x = advance(rec, scheduler, raw, s + e, x)
        return x


def _distinct(output: Any) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}

    def walk(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            seen.setdefault(id(obj), obj)
        elif isinstance(obj, tuple | list):
            for item in obj:
                walk(item)

    walk(output)
    return list(seen.values())


def _poisoned(output: Any, target: torch.Tensor) -> Any:
    if output is target:
        return torch.full_like(target, float("nan"))
    if isinstance(output, tuple | list):
        return type(output)(_poisoned(item, target) for item in output)
    return output


def boundary_bytes(rec: Recording, bounds: list[int]) -> list[list[int]]:
    """bytes[q][p]: what part p consumes of part q's outputs (q < p), found by poisoning each of the
    earlier parts' output tensors at the last warm-up step (here step 0) with NaN."""
    parts = len(bounds) - 1
    result = [[0] * parts for _ in range(parts)]
    with single_thread(), torch.inference_mode():
        scheduler = copy.deepcopy(rec.scheduler)
        _, outputs = call(rec, scheduler, rec.x0, 0, 0, keep=set(range(bounds[-1])))
        for p in range(1, parts):
            mine = set(range(bounds[p], bounds[p + 1]))
            for b in range(bounds[p]):
                q = next(k for k in range(parts) if bounds[k] <= b < bounds[k + 1])
                for tensor in _distinct(outputs[b]):
                    earlier = {c: outputs[c] for c in range(bounds[p])}
                    earlier[b] = _poisoned(outputs[b], tensor)
                    _, kept = call(
                        rec, copy.deepcopy(rec.scheduler), rec.x0, 0, 0, replace=earlier, keep=mine
                    )
                    if any(torch.isnan(t).any() for c in mine for t in _distinct(kept[c])):
                        result[q][p] += tensor.numel() * tensor.element_size()
    return result
