"""Every registered strategy on every family: speedup vs ideal, bytes vs formula, fidelity.

    .venv/bin/python -m scripts.benchmark_strategies [--models shapes,tiny-svd,tones] [--steps 20]
        [--ranks 2,3,4] [--strategies all] [--repeat 1] [--json FILE]

For each model it runs `sequential@cpu:1` first (the reference), then each strategy on one CPU
worker (single-device strategies) or on N workers for each N in --ranks its device rules allow.
Strategies a model cannot run are listed with the engine's reason. Prints Markdown (paste it into
docs/strategies.md). CPU workers are one-thread processes: on a machine with C cores, N > C
workers share cores, so their speedups say nothing about N devices; ideal, bytes and fidelity do.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from engine.catalog import ModelCatalog
from engine.compare import compare
from engine.devices import cpu_cores
from engine.engine import Engine
from engine.errors import UserError
from engine.protocol import GenerationRequest
from engine.strategies import STRATEGIES

PROMPTS = {
    "cogvideox": "a red circle moving right on a blue background",
    "audioldm2": "a 440 Hz sine tone",
    "svd": "",
}


def pick_models(names: str | None) -> list[str]:
    """The trained embedded models where they exist, else the tiny random ones."""
    available = {entry.name for entry in ModelCatalog().entries()}
    if names:
        return [n.strip() for n in names.split(",") if n.strip()]
    chosen = []
    for trained, tiny in (
        ("shapes", "tiny-cogvideox"),
        ("tiny-svd", "tiny-svd"),
        ("tones", "tiny-audioldm2"),
    ):
        chosen.append(trained if trained in available else tiny)
    return chosen


def specs_for(cls: Any, ranks: list[int]) -> list[str]:
    if cls.max_devices == 1:
        return ["cpu:1"]
    counts = [n for n in ranks if n >= cls.min_devices and n % cls.device_multiple == 0]
    counts = [n for n in counts if cls.max_devices is None or n <= cls.max_devices]
    return [f"cpu:{n}" for n in counts]


def conditioning_image(folder: Path) -> str:
    from PIL import Image

    path = folder / "conditioning.png"
    if not path.exists():
        Image.linear_gradient("L").convert("RGB").resize((96, 64)).save(path)
    return str(path)


def bench_model(engine: Engine, model: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    entry = engine.catalog.resolve(model)
    request = GenerationRequest(
        model=model,
        prompt=PROMPTS.get(entry.family, "a test"),
        image=conditioning_image(folder) if entry.family == "svd" else None,
        seed=args.seed,
        steps=args.steps,
        seconds=args.seconds if entry.family == "audioldm2" else None,
    )
    names = list(STRATEGIES) if args.strategies == "all" else args.strategies.split(",")
    if "cache-mag" in names:  # it needs recorded ratios, else the plan refuses it: one full-cost run
        calibrate = dataclasses.replace(request, strategy="cache-mag", strategy_options={"calibrate": 1})
        try:
            engine.run(engine.plan(calibrate), previews=False).discard_pending()
        except UserError:
            pass  # a model MagCache cannot run: the refusal below says why
    specs, refused = [("sequential", "cpu:1")], []
    for name in names:
        if name == "sequential":
            continue
        for devices in specs_for(STRATEGIES[name], args.ranks):
            try:
                engine.plan(dataclasses.replace(request, strategy=name, devices=devices))
                specs.append((name, devices))
            except UserError as exc:
                refused.append({"strategy": name, "devices": devices, "reason": str(exc)})
    reports = [compare(engine, request, specs, save=False) for _ in range(args.repeat)]
    rows = reports[0]["rows"]
    if args.repeat > 1:  # the median time of each entry; everything else is the same in every repeat
        for i, row in enumerate(rows):
            row["denoise_runs_s"] = [report["rows"][i]["denoise_s"] for report in reports]
            row["denoise_s"] = statistics.median(row["denoise_runs_s"])
        for row in rows:
            row["speedup"] = rows[0]["denoise_s"] / row["denoise_s"]
    return {"model": model, "family": entry.family, "rows": rows, "refused": refused}


def markdown(result: dict[str, Any], steps: int) -> str:
    lines = [
        f"### {result['model']} ({result['family']}, {steps} steps)",
        "",
        "| strategy | devices | options | denoise s | speedup | ideal | speedup/ideal | calls | "
        "bytes sent/step | fidelity vs sequential | latent rel L2 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in result["rows"]:
        fid = row.get("fidelity") or {}
        if "psnr_db" in fid:
            quality = f"PSNR {fid['psnr_db']:.1f} dB, SSIM {fid['ssim']:.3f}"
        elif "snr_db" in fid:
            quality = f"SNR {fid['snr_db']:.1f} dB, LSD {fid['lsd']:.3f}"
        else:
            quality = "-"
        if fid.get("identical"):
            quality = "identical"
        speedup = row.get("speedup") or 0.0
        ideal = row.get("ideal_speedup") or 1.0
        options = ", ".join(f"{k}={v}" for k, v in (row.get("strategy_options") or {}).items()) or "-"
        rel = fid.get("latent_rel_l2")
        lines.append(
            f"| {row['strategy']} | {row['devices']} | {options} | {row['denoise_s']:.2f} | "
            f"{speedup:.2f}x | {ideal:.2f}x | {speedup / ideal:.2f} | {row['denoiser_calls']} | "
            f"{row['bytes_sent'] / steps:,.0f} | {quality} | {'-' if rel is None else f'{rel:.2e}'} |"
        )
    if result["refused"]:
        lines += ["", "Refused (the engine's reason):", ""]
        lines += [f"- `{r['strategy']}@{r['devices']}`: {r['reason']}" for r in result["refused"]]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", help="comma-separated model names (default: one per family)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ranks", default="2,3,4", help="CPU worker counts for multi-device strategies")
    parser.add_argument("--strategies", default="all")
    parser.add_argument("--seconds", type=float, default=None, help="audio length (default: the model's)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each entry; the median time counts")
    parser.add_argument("--json", help="also write the raw rows here")
    args = parser.parse_args()
    args.ranks = [int(n) for n in args.ranks.split(",")]
    folder = Path(os.environ.get("TMPDIR", "/tmp")) / "parastep-benchmark-strategies"
    folder.mkdir(parents=True, exist_ok=True)
    print(
        f"Machine: {platform.processor() or platform.machine()}, {cpu_cores()} cores, {platform.platform()}"
    )
    print(f"Command: {' '.join(sys.argv)}\n")
    results = []
    start = time.perf_counter()
    with Engine() as engine:
        for model in pick_models(args.models):
            result = bench_model(engine, model, args, folder)
            results.append(result)
            print(markdown(result, args.steps), "\n", flush=True)
    print(f"Wall time {time.perf_counter() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
