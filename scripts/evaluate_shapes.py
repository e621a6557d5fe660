"""Semantic pass rates of the `shapes` model over the full prompt grid, through the engine.

    nice -n 19 .venv/bin/python -m scripts.evaluate_shapes [--model shapes] [--seeds 3] [--json FILE]

Every colour x shape x motion combination is generated with each seed (0 .. seeds-1); the background
rotates with the seed, so three seeds cover all 270 prompts once. Each clip goes through the real code
path (``Engine.plan`` and ``Engine.run``: a worker process, the stock CogVideoXPipeline, the adapter's
decode) and is read back with ``resources.shapes_data``: colour of the median foreground pixel, shape from
the bounding-box fill ratio, motion from the centroid shift or area change, background from the border.
Prints pass rates per attribute, per word and the most frequent confusions.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from collections import Counter
from pathlib import Path

from engine.engine import Engine
from engine.protocol import GenerationRequest
from resources import shapes_data as data

ATTRIBUTES = ("colour", "shape", "motion", "background")


def grid(seeds: int) -> list[tuple[data.ClipSpec, int]]:
    """(spec, seed) for every colour x shape x motion and seed; the background rotates with the seed."""
    backgrounds = list(data.BACKGROUNDS)
    combos = list(itertools.product(data.COLOURS, data.SHAPES, data.MOTIONS))
    return [
        (data.ClipSpec(colour, shape, motion, backgrounds[(i + seed) % len(backgrounds)]), seed)
        for seed in range(seeds)
        for i, (colour, shape, motion) in enumerate(combos)
    ]


def evaluate(
    model: str,
    seeds: int,
    strategy: str = "sequential",
    devices: str = "cpu:1",
    limit: int | None = None,
    **overrides: object,
) -> dict[str, object]:
    rows = []
    started = time.time()
    with Engine() as engine:
        for n, (spec, seed) in enumerate(grid(seeds)[:limit]):
            request = GenerationRequest(
                model=model, prompt=spec.prompt, seed=seed, strategy=strategy, devices=devices, **overrides
            )
            result = engine.run(engine.plan(request), previews=False)
            result.discard_pending()
            read = data.read_clip(result.output)
            rows.append({"prompt": spec.prompt, "seed": seed, "read": read})
            if n % 30 == 0:
                print(f"{n} clips, {time.time() - started:.0f} s", flush=True)
    passes = {
        a: [row["read"][a] == getattr(data.parse_prompt(row["prompt"]), a) for row in rows]
        for a in ATTRIBUTES
    }
    summary = {
        "model": model,
        "clips": len(rows),
        "seconds": time.time() - started,
        "pass_rate": {a: sum(ok) / len(ok) for a, ok in passes.items()},
        "all_pass_rate": sum(all(oks) for oks in zip(*passes.values(), strict=True)) / len(rows),
        "by_word": {},
        "confusions": {},
        "rows": rows,
    }
    for attribute in ATTRIBUTES:
        asked = [getattr(data.parse_prompt(row["prompt"]), attribute) for row in rows]
        for word in dict.fromkeys(asked):
            hits = [ok for ok, a in zip(passes[attribute], asked, strict=True) if a == word]
            summary["by_word"][f"{attribute}:{word}"] = sum(hits) / len(hits)
        wrong = Counter(
            f"{a} -> {row['read'][attribute]}"
            for row, a, ok in zip(rows, asked, passes[attribute], strict=True)
            if not ok
        )
        summary["confusions"][attribute] = dict(wrong.most_common(6))
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--strategy", default="sequential")
    parser.add_argument("--devices", default="cpu:1")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--limit", type=int, default=None, help="only the first N clips (a smoke run)")
    parser.add_argument("--json", type=Path, default=None, help="write the summary and every reading here")
    args = parser.parse_args(argv)
    overrides = {"steps": args.steps, "guidance_scale": args.guidance_scale}
    summary = evaluate(
        args.model,
        args.seeds,
        args.strategy,
        args.devices,
        args.limit,
        **{k: v for k, v in overrides.items() if v},
    )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    where = f"{args.model}, {args.strategy}@{args.devices}"
    print(f"{summary['clips']} clips in {summary['seconds']:.0f} s ({where})")
    for attribute, rate in summary["pass_rate"].items():
        print(f"  {attribute:<10} {rate:6.1%}   confusions: {summary['confusions'][attribute]}")
    print(f"  all four   {summary['all_pass_rate']:6.1%}")
    print("  by word: " + ", ".join(f"{k} {v:.0%}" for k, v in summary["by_word"].items()))


if __name__ == "__main__":
    main()
