"""AsyncDiff's split per family: the counted cost of each block, the parts chosen for N devices, and
the measured seconds of each part (what one rank computes per step after warm-up), for the split by
measured block time (balance=1, the default) and by counted operations (balance=0).

    .venv/bin/python -m scripts.asyncdiff_split [--models tiny-cogvideox,tiny-svd,tiny-audioldm2]
        [--parts 2,3,4] [--repeats 7] [--size WxHxF or seconds]
    .venv/bin/python -m scripts.asyncdiff_split --full [--parts 2,3,4]

--full: the published denoisers (resources/configs) built on the meta device, at the published
sizes, costed by counted operations only (no time: nothing is computed), to show their splits.

One thread, in this process. A part's time is the shortest (of --repeats) of a denoiser call that
runs the head (time and patch embeddings), the part's blocks with the outputs of earlier blocks
taken from a previous call, and, on the last part, what follows the blocks: what one rank of the
engine computes per step. Prints a Markdown table; nothing here is asserted by the test suite.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from engine.engine import Engine
from engine.loading import load_pipeline
from engine.protocol import GenerationRequest
from engine.strategies.asyncdiff import _attention_flops, balanced_split, denoiser_blocks
from engine.strategies.base import denoiser_of

PROMPTS = {"cogvideox": "a red circle", "audioldm2": "a dog barking"}


class _Stop(Exception):
    pass


def denoiser_call(plan: Any, pipe: Any) -> tuple[tuple, dict]:
    """The arguments of the loop's first denoiser call."""
    denoiser = denoiser_of(pipe)
    seen: dict[str, Any] = {}

    def grab(module: Any, args: tuple, kwargs: dict) -> None:
        seen["args"], seen["kwargs"] = args, {**kwargs, "return_dict": False}
        raise _Stop()

    handle = denoiser.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.inference_mode():
            pipe(**plan.adapter.pipeline_kwargs(pipe, plan.request, torch.Generator("cpu").manual_seed(0)))
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen["args"], seen["kwargs"]


def costs(denoiser: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[list[int], int]:
    blocks = [b for _, b in denoiser_blocks(denoiser)]
    marks: dict[tuple[str, int], int] = {}
    mapping = {torch.ops.aten.scaled_dot_product_attention: _attention_flops}
    with torch.inference_mode(), FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        handles = []
        for i, b in enumerate(blocks):
            handles.append(
                b.register_forward_pre_hook(
                    lambda m, a, i=i: marks.__setitem__(("in", i), counter.get_total_flops())
                )
            )
            handles.append(
                b.register_forward_hook(
                    lambda m, a, o, i=i: marks.__setitem__(("out", i), counter.get_total_flops())
                )
            )
        denoiser(*args, **kwargs)
        for h in handles:
            h.remove()
        total = counter.get_total_flops()
    per_block = [marks[("out", i)] - marks[("in", i)] for i in range(len(blocks))]
    return per_block, total - marks[("out", len(blocks) - 1)]


def block_nanoseconds(
    denoiser: torch.nn.Module, args: tuple, kwargs: dict, repeats: int
) -> tuple[list[int], int]:
    """Each block's shortest time over `repeats` calls, and that of what follows the last block: the
    costs the engine's balance=1 measures (once, on rank 0)."""
    blocks = [b for _, b in denoiser_blocks(denoiser)]
    best = [None] * (len(blocks) + 1)
    marks: dict[str, int] = {}

    def entered(module: Any, inputs: Any) -> None:
        marks["in"] = time.perf_counter_ns()

    def left(module: Any, inputs: Any, output: Any, i: int) -> None:  # returns None: output kept
        marks["out"] = time.perf_counter_ns()
        best[i] = min(best[i] or 2**62, marks["out"] - marks["in"])

    handles = []
    for i, b in enumerate(blocks):
        handles.append(b.register_forward_pre_hook(entered))
        handles.append(b.register_forward_hook(lambda m, a, o, i=i: left(m, a, o, i)))
    for _ in range(repeats):
        with torch.inference_mode():
            denoiser(*args, **kwargs)
        best[-1] = min(best[-1] or 2**62, time.perf_counter_ns() - marks["out"])
    for h in handles:
        h.remove()
    return best[:-1], best[-1]


def part_seconds(
    denoiser: torch.nn.Module, args: tuple, kwargs: dict, bounds: list[int], repeats: int
) -> list[float]:
    blocks = [b for _, b in denoiser_blocks(denoiser)]
    saved: dict[int, Any] = {}
    handles = [
        b.register_forward_hook(lambda m, a, o, i=i: saved.__setitem__(i, o)) for i, b in enumerate(blocks)
    ]
    with torch.inference_mode():
        denoiser(*args, **kwargs)
    for h in handles:
        h.remove()
    result = []
    for p in range(len(bounds) - 1):
        first, end = bounds[p], bounds[p + 1]
        last_part = p == len(bounds) - 2

        hooks = []
        for i, b in enumerate(blocks):
            if i < first:  # skip the block's work: replace its forward for this call
                hooks.append((b, b.forward))
                b.forward = lambda *a, i=i, **k: saved[i]
            elif i == end - 1 and not last_part:
                hooks.append((b, b.forward))
                original = b.forward

                def stop_after(*a: Any, original: Any = original, **k: Any) -> Any:
                    original(*a, **k)
                    raise _Stop()

                b.forward = stop_after
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            try:
                with torch.inference_mode():
                    denoiser(*args, **kwargs)
            except _Stop:
                pass
            times.append(time.perf_counter() - start)
        for b, forward in hooks:
            b.forward = forward
        result.append(min(times))
    return result


def short(name: str) -> str:
    return name.replace("transformer_blocks.", "t").replace("_blocks.", "").replace("_block", "")


def conditioning_image() -> str:
    import tempfile

    import numpy as np
    from PIL import Image

    path = Path(tempfile.mkdtemp()) / "conditioning.png"
    Image.fromarray((np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)).save(path)
    return str(path)


FULL_SIZE = {  # name: (configs folder, denoiser folder, inputs at the published size, CFG batch 2)
    "CogVideoX-2b 49x480x720": (
        "THUDM--CogVideoX-2b",
        "transformer",
        lambda e, z: (
            (),
            {
                "hidden_states": e(2, 13, 16, 60, 90),
                "encoder_hidden_states": e(2, 226, 4096),
                "timestep": z(2),
            },
        ),
    ),
    "SVD 14x576x1024": (
        "stabilityai--stable-video-diffusion-img2vid",
        "unet",
        lambda e, z: ((e(2, 14, 8, 72, 128), z(), e(2, 1, 1024), e(2, 3)), {}),
    ),
    "AudioLDM2-large 10 s": (
        "cvssp--audioldm2-large",
        "unet",
        lambda e, z: (
            (e(2, 8, 256, 16), z()),
            {
                "encoder_hidden_states": e(2, 8, 768),
                "encoder_hidden_states_1": e(2, 32, 1024),
                "encoder_attention_mask_1": e(2, 32),
            },
        ),
    ),
}


def full_size(parts_list: list[int]) -> None:
    import json

    import diffusers
    from accelerate import init_empty_weights

    configs = Path(__file__).resolve().parents[1] / "resources" / "configs"

    def empty(*shape: int) -> torch.Tensor:
        return torch.ones(shape, device="meta")

    def zeros(*shape: int) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.int64, device="meta")

    print("| model | N | parts (blocks) | counted cost share | slowest / mean |")
    print("| --- | --- | --- | --- | --- |")
    for name, (folder, sub, inputs) in FULL_SIZE.items():
        config = json.loads((configs / folder / sub / "config.json").read_text())
        with init_empty_weights(include_buffers=True):
            denoiser = getattr(diffusers, config["_class_name"]).from_config(config)
        denoiser = denoiser.to("meta")
        call_args, call_kwargs = inputs(empty, zeros)
        block_costs, tail = costs(denoiser, call_args, {**call_kwargs, "return_dict": False})
        names = [short(n) for n, _ in denoiser_blocks(denoiser)]
        for parts in parts_list:
            bounds = balanced_split(block_costs, tail, parts)
            shares = [sum(block_costs[bounds[p] : bounds[p + 1]]) for p in range(parts)]
            shares[-1] += tail
            listing = " / ".join(
                ",".join(names[bounds[p] : bounds[p + 1]])
                if bounds[p + 1] - bounds[p] < 4
                else f"{names[bounds[p]]}..{names[bounds[p + 1] - 1]}"
                for p in range(parts)
            )
            cost = " / ".join(f"{s / sum(shares):.0%}" for s in shares)
            print(f"| {name} | {parts} | {listing} | {cost} | {max(shares) / statistics.mean(shares):.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="tiny-cogvideox,tiny-svd,tiny-audioldm2")
    parser.add_argument("--parts", default="2,3,4")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--size", default="", help="WxHxF for video (e.g. 96x64x9), seconds for audio")
    parser.add_argument("--full", action="store_true", help="the published denoisers, counted on meta")
    args = parser.parse_args()
    if args.full:
        full_size([int(p) for p in args.parts.split(",")])
        return
    torch.set_num_threads(1)
    engine = Engine()
    print(
        "| model | size | N | balance | parts (blocks) | cost share | measured ms per part | slowest / mean |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for model in args.models.split(","):
        entry = engine.catalog.resolve(model)
        family = entry.family
        fields: dict[str, Any] = {
            "model": model,
            "steps": 2,
            "seed": 0,
            "strategy": "sequential",
            "devices": "cpu:1",
        }
        if family in PROMPTS:
            fields["prompt"] = PROMPTS[family]
        if family == "svd":
            fields["image"] = conditioning_image()
        plan = engine.plan(GenerationRequest(**fields))
        if args.size:
            if plan.adapter.modality == "audio":
                plan = dataclasses.replace(
                    plan, request=dataclasses.replace(plan.request, seconds=float(args.size))
                )
            else:
                w, h, f = (int(x) for x in args.size.split("x"))
                plan = dataclasses.replace(
                    plan, request=dataclasses.replace(plan.request, width=w, height=h, frames=f)
                )
        pipe = load_pipeline(entry, "cpu", torch.float32)
        call_args, call_kwargs = denoiser_call(plan, pipe)
        denoiser = denoiser_of(pipe)
        names = [n for n, _ in denoiser_blocks(denoiser)]
        counted = costs(denoiser, call_args, call_kwargs)
        measured = block_nanoseconds(denoiser, call_args, call_kwargs, args.repeats)
        r = plan.request
        size = f"{r.seconds} s" if plan.adapter.modality == "audio" else f"{r.width}x{r.height}x{r.frames}"
        for parts in (int(p) for p in args.parts.split(",")):
            if parts > len(names):
                continue
            for balance, (block_costs, tail) in (("time", measured), ("count", counted)):
                bounds = balanced_split(block_costs, tail, parts)
                shares = [sum(block_costs[bounds[p] : bounds[p + 1]]) for p in range(parts)]
                shares[-1] += tail
                seconds = part_seconds(denoiser, call_args, call_kwargs, bounds, args.repeats)
                listing = " / ".join(
                    ",".join(short(n) for n in names[bounds[p] : bounds[p + 1]]) for p in range(parts)
                )
                total = sum(shares)
                cost = " / ".join(f"{s / total:.0%}" for s in shares)
                ms = " / ".join(f"{s * 1000:.1f}" for s in seconds)
                ratio = max(seconds) / statistics.mean(seconds)
                print(f"| {model} | {size} | {parts} | {balance} | {listing} | {cost} | {ms} | {ratio:.2f} |")
        del pipe


if __name__ == "__main__":
    main()
