"""Does a parallel strategy keep the meaning? Fidelity and semantic pass rates per strategy, trained models.

    nice -n 19 .venv/bin/python -m scripts.evaluate_fidelity [--models shapes,tones] [--seeds 1]
        [--strategies sequential@cpu:1,parastep@cpu:2,parastep@cpu:3,parastep@cpu:4,batchstep@cpu:1]
        [--stride 1] [--option warmup=3] [--json FILE]

For each model every prompt of its grammar (``shapes``: every colour x shape x motion, the background
rotating with the prompt; ``tones``: all 32 prompts) is generated with each seed under each strategy,
through ``Engine.plan`` / ``Engine.run`` (worker processes, the stock pipeline). The first entry is the
reference: every other clip is compared with the reference clip of the same prompt and seed (video: PSNR
and SSIM; audio: SNR and log-spectral distance; both: the final latents' relative L2), and every clip is
read back with the model's own semantic checks (``resources.shapes_data`` / ``resources.tones_data``).
"Same reading" counts clips whose every attribute reads the same as the reference clip's.

Strategies run one after the other over all prompts (not prompt by prompt) so each worker group loads
once. CPU workers are one-thread processes: N > cores workers share cores, which changes speed, not
results. Prints Markdown for docs/fidelity.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np

from engine.compare import parse_strategy_specs
from engine.engine import Engine
from engine.metrics import fidelity, json_safe, relative_l2
from engine.protocol import GenerationRequest
from resources import shapes_data, tones_data

DEFAULT_STRATEGIES = "sequential@cpu:1,parastep@cpu:2,parastep@cpu:3,parastep@cpu:4,batchstep@cpu:1"


def shapes_prompts() -> list[tuple[str, Any]]:
    """(prompt, spec) for every colour x shape x motion; the background rotates so all three appear."""
    backgrounds = list(shapes_data.BACKGROUNDS)
    combos = itertools.product(shapes_data.COLOURS, shapes_data.SHAPES, shapes_data.MOTIONS)
    specs = [
        shapes_data.ClipSpec(colour, shape, motion, backgrounds[i % len(backgrounds)])
        for i, (colour, shape, motion) in enumerate(combos)
    ]
    return [(spec.prompt, spec) for spec in specs]


def shapes_read(output: np.ndarray, rate: float | None) -> dict[str, Any]:
    return shapes_data.read_clip(output)


def shapes_check(spec: Any, output: np.ndarray, rate: float | None) -> dict[str, bool]:
    return shapes_data.check_clip(output, spec)


def tones_prompts() -> list[tuple[str, Any]]:
    return [(sound.prompt, sound) for sound in tones_data.grammar()]


def tones_read(output: np.ndarray, rate: float | None) -> dict[str, Any]:
    """What the checks look at, rounded so that "the same reading" means the same to a listener: the peak
    to the nearest semitone, the sweep's direction, the onset count, noise or not."""
    rate = int(rate or tones_data.SAMPLE_RATE)
    peak = tones_data.spectral_peak_hz(output, rate)
    slope = tones_data.sweep_slope(output, rate)
    return {
        "peak_semitone": round(12 * math.log2(peak / 440.0)) if peak > 0 else None,
        "direction": "rising" if slope > 0.5 else "falling" if slope < -0.5 else "flat",
        "onsets": tones_data.onset_count(output, rate),
        "noise": tones_data.spectral_flatness(output, rate) > 0.1,
    }


def tones_check(sound: Any, output: np.ndarray, rate: float | None) -> dict[str, bool]:
    return tones_data.check(sound, output, int(rate or tones_data.SAMPLE_RATE))


READERS = {
    "cogvideox": (shapes_prompts, shapes_read, shapes_check),
    "audioldm2": (tones_prompts, tones_read, tones_check),
}


def evaluate_model(
    engine: Engine,
    model: str,
    specs: list[tuple[str, str]],
    seeds: int,
    stride: int,
    options: dict[str, int] | None = None,
) -> list[dict[str, Any]]:
    """One row per strategy entry: mean fidelity against the first entry, pass rates, timings."""
    family = engine.catalog.resolve(model).family
    if family not in READERS:
        raise SystemExit(f"{model}: no semantic checks for the {family} family (shapes and tones have them).")
    prompts_of, read, check = READERS[family]
    cases = [(p, s, seed) for p, s in prompts_of()[::stride] for seed in range(seeds)]
    reference: dict[tuple[str, int], Any] = {}
    rows = []
    for strategy, devices in specs:
        started = time.time()
        own = own_options(strategy, options or {})
        row: dict[str, Any] = {
            "strategy": strategy,
            "devices": devices,
            "options": own,
            "fidelity": [],
            "latent_rel_l2": [],
        }
        passes: dict[str, list[bool]] = {}
        same, denoise = [], []
        for prompt, spec, seed in cases:
            request = GenerationRequest(
                model=model,
                prompt=prompt,
                seed=seed,
                strategy=strategy,
                devices=devices,
                strategy_options=own,
            )
            plan = engine.plan(request)
            row["ideal_speedup"], row["modality"] = plan.ideal_speedup, plan.adapter.modality
            result = engine.run(plan, previews=False)
            result.discard_pending()
            denoise.append(result.timings["denoise_s"])
            reading = read(result.output, result.rate)
            for name, ok in check(spec, result.output, result.rate).items():
                passes.setdefault(name, []).append(bool(ok))
            key = (prompt, seed)
            if key not in reference:
                reference[key] = (result.output, result.latents, reading)
                continue
            ref_output, ref_latents, ref_reading = reference[key]
            row["fidelity"].append(fidelity(plan.adapter.modality, result.output, ref_output))
            if result.latents is not None and ref_latents is not None:
                row["latent_rel_l2"].append(relative_l2(result.latents, ref_latents))
            same.append(reading == ref_reading)
        row["clips"] = len(cases)
        row["pass_rate"] = {name: sum(ok) / len(ok) for name, ok in passes.items()}
        row["pass_count"] = {name: f"{sum(ok)}/{len(ok)}" for name, ok in passes.items()}
        row["same_reading"] = sum(same) / len(same) if same else None
        row["denoise_s_mean"] = float(np.mean(denoise))
        row["seconds"] = time.time() - started
        rows.append(row)
        print(f"  {model} {strategy}@{devices}: {summary_line(row)} ({row['seconds']:.0f} s)", flush=True)
    return rows


def own_options(strategy: str, options: dict[str, int]) -> dict[str, int]:
    """The --option values that `strategy` takes (the reference takes none)."""
    from engine.strategies import strategy_class

    names = {o.name for o in strategy_class(strategy).options}
    return {k: v for k, v in options.items() if k in names}


def mean_metric(row: dict[str, Any], name: str) -> float | None:
    values = [f[name] for f in row["fidelity"] if name in f]
    if not values:
        return None
    finite = [v for v in values if math.isfinite(v)]
    return float(np.mean(finite)) if len(finite) == len(values) else float("inf")


def summary_line(row: dict[str, Any]) -> str:
    rates = ", ".join(f"{k} {v:.0%}" for k, v in row["pass_rate"].items())
    same = "-" if row["same_reading"] is None else f"{row['same_reading']:.0%}"
    return f"{rates}; same reading {same}"


def markdown(model: str, rows: list[dict[str, Any]]) -> str:
    modality = rows[0]["modality"]
    metrics = ("psnr_db", "ssim") if modality == "video" else ("snr_db", "lsd")
    labels = ("PSNR dB", "SSIM") if modality == "video" else ("SNR dB", "LSD dB")
    attributes = list(rows[0]["pass_rate"])
    head = ["strategy", "ideal", *labels, "latent rel. L2", *attributes, "same reading", "denoise s"]
    lines = [f"| {' | '.join(head)} |", "|" + " --- |" * len(head)]
    for row in rows:
        own = "".join(f" {k}={v}" for k, v in row["options"].items())
        cells = [f"`{row['strategy']}@{row['devices']}`{own}", f"{row['ideal_speedup']:.2f}x"]
        for metric in metrics:
            value = mean_metric(row, metric)
            cells.append(
                "reference" if value is None else "identical" if math.isinf(value) else f"{value:.4g}"
            )
        l2 = row["latent_rel_l2"]
        cells.append(f"{np.mean(l2):.4f}" if l2 else "-")
        cells += [f"{row['pass_rate'][a]:.0%} ({row['pass_count'][a]})" for a in attributes]
        cells.append("-" if row["same_reading"] is None else f"{row['same_reading']:.0%}")
        cells.append(f"{row['denoise_s_mean']:.2f}")
        lines.append(f"| {' | '.join(cells)} |")
    return f"### {model}\n\n" + "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="shapes,tones")
    parser.add_argument("--strategies", default=DEFAULT_STRATEGIES)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--stride", type=int, default=1, help="every Nth prompt only (a quicker run)")
    parser.add_argument(
        "--option", action="append", default=[], help="NAME=INT for every entry that takes it, e.g. warmup=3"
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    specs = parse_strategy_specs(args.strategies, "cpu:1")
    options = {name: int(value) for name, _, value in (o.partition("=") for o in args.option)}
    if specs[0][0] != "sequential":
        raise SystemExit("--strategies must start with the reference, e.g. sequential@cpu:1.")
    started = time.time()
    report: dict[str, Any] = {"machine": f"{platform.processor() or platform.machine()}", "models": {}}
    sections = []
    with Engine() as engine:
        for model in (m.strip() for m in args.models.split(",") if m.strip()):
            rows = evaluate_model(engine, model, specs, args.seeds, args.stride, options)
            report["models"][model] = rows
            sections.append(markdown(model, rows))
    report["minutes"] = (time.time() - started) / 60
    if args.json:
        args.json.write_text(json.dumps(json_safe(report), indent=1) + "\n")
    print(f"\n{len(sections)} model(s) in {report['minutes']:.1f} min\n")
    print("\n".join(sections))


if __name__ == "__main__":
    main()
