"""ParaStep variants against published ParaStep and sequential, on CPU workers (docs/parastep-variants.md).

    nice -n 5 .venv/bin/python -m scripts.benchmark_parastep_variants [--models a,b] [--ranks 2,3]
        [--steps 20] [--adaptive 10] [--repeats 2] [--no-sweep]

For each embedded model (the tiny ones, and the trained `shapes`/`tones` when present) and each
rank count N, one `engine.compare.compare` call runs, on the same seed:

- sequential on cpu:1 twice (the first is the fidelity reference; speedups use the faster of the
  two, both on a warm worker), then one untimed ParaStep run that starts the cpu:N workers;
- `repeats` times, interleaved: published ParaStep (the family's default warm-up W), `fresh_reuse`,
  and `adaptive` at each threshold (minimum warm-up W); each is reported with its fastest run;
- published ParaStep at fixed warm-ups 1..T-1 (a sweep, once each), so that every adaptive run can
  be set against the most faithful fixed warm-up with the same number of denoiser calls on rank 0
  (the loop's cost): a schedule rule is only better if it beats that.

Printed per model and N: denoise seconds, speedup over sequential, the ideal (T / rank-0 denoiser
calls: warm-up and sync steps plus rounds), latent relative L2 and PSNR (video) or SNR (audio)
against sequential, and whether every rank's bytes equal the formula (published, fresh_reuse).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import sys
import tempfile
from pathlib import Path

from engine.compare import compare
from engine.devices import cpu_cores
from engine.engine import Engine
from engine.models import adapter_for
from engine.protocol import GenerationRequest
from engine.strategies.parastep import expected_traffic
from resources import EMBEDDED_MODELS_DIR

TINY = ("tiny-cogvideox", "tiny-svd", "tiny-audioldm2")
TRAINED = ("shapes", "tones")
PROMPTS = {"video": "a red circle moving right on a white background", "audio": "a 220 Hz sine tone"}


def conditioning_image(folder: Path) -> str:
    import numpy as np
    from PIL import Image

    pixels = (np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)
    path = folder / "conditioning.png"
    Image.fromarray(pixels).save(path)
    return str(path)


def fixed_calls(steps: int, warmup: int, ranks: int) -> int:
    """Rank 0's denoiser calls with a fixed warm-up: W + ceil((T - W) / N)."""
    return warmup + math.ceil((steps - warmup) / ranks)


def fidelity_cells(row: dict) -> tuple[str, str]:
    fid = row["fidelity"]
    quality = fid.get("psnr_db", fid.get("snr_db"))
    return f"{fid['latent_rel_l2']:.2e}", ("inf" if quality == float("inf") else f"{quality:.1f}")


def traffic_matches(row: dict, steps: int, warmup: int, ranks: int, latent_bytes: int, fresh: bool) -> str:
    expected = expected_traffic(steps, warmup, ranks, 2 * latent_bytes, latent_bytes, fresh)
    measured = [{"bytes_sent": r["bytes_sent"], "bytes_received": r["bytes_received"]} for r in row["ranks"]]
    return "yes" if measured == expected else "NO"


def run_model(engine: Engine, model: str, args: argparse.Namespace, image: str) -> None:
    entry = engine.catalog.resolve(model)
    adapter = adapter_for(entry)
    base = GenerationRequest(
        model=model,
        prompt=PROMPTS[adapter.modality],
        image=image if entry.family == "svd" else None,
        seed=args.seed,
        steps=args.steps,
        devices="cpu:1",
    )
    first = engine.run(engine.plan(base), previews=False)  # starts cpu:1; measures the latent size
    steps = first.plan.request.steps
    if not adapter.uses_guidance(first.plan.request):
        raise SystemExit(f"{model}: guidance is off; the byte formula below assumes CFG batches")
    latent_bytes = first.latents.size * 4  # float32 workers
    warmup = adapter.default_warmup(steps)
    quality = "PSNR dB" if adapter.modality == "video" else "SNR dB"
    print(f"## {model} ({entry.family}), {steps} steps, default warm-up W = {warmup}\n")
    for ranks in args.ranks:
        devices = f"cpu:{ranks}"
        variants = {"published": {"warmup": warmup}, "fresh_reuse": {"warmup": warmup, "fresh_reuse": 1}}
        for threshold in args.adaptive:
            variants[f"adaptive {threshold}%"] = {"warmup": warmup, "adaptive": threshold}
        specs: list[tuple] = [("sequential", "cpu:1"), ("sequential", "cpu:1"), ("parastep", devices, {})]
        labels = ["reference", "sequential", "start workers"]
        for _ in range(args.repeats):
            for label, options in variants.items():
                specs.append(("parastep", devices, options))
                labels.append(label)
        sweep = list(range(1, steps)) if args.sweep else []
        for w in sweep:
            specs.append(("parastep", devices, {"warmup": w}))
            labels.append(f"W={w}")
        if ranks != args.ranks[0]:
            engine.run(engine.plan(base), previews=False)  # a warm cpu:1 worker for the reference
        rows = compare(engine, dataclasses.replace(base, strategy_options={}), specs, save=False)["rows"]
        sequential_s = min(r["denoise_s"] for r in rows if r["strategy"] == "sequential")
        best: dict[str, dict] = {}
        for row, label in zip(rows, labels, strict=True):
            if label in variants and (label not in best or row["denoise_s"] < best[label]["denoise_s"]):
                best[label] = row
        by_calls: dict[int, tuple[str, dict]] = {}  # rank-0 calls -> the most faithful fixed warm-up
        for row, label in zip(rows, labels, strict=True):
            calls = row["ranks"][0]["denoiser_calls"]
            rel = row["fidelity"]["latent_rel_l2"]
            if label.startswith("W=") and (
                calls not in by_calls or rel < by_calls[calls][1]["fidelity"]["latent_rel_l2"]
            ):
                by_calls[calls] = (label, row)

        print(f"### N = {ranks} ({devices}) vs sequential on cpu:1 ({sequential_s:.3f} s)\n")
        print(
            f"| variant | rank-0 calls | denoise s | speedup | ideal | latent rel L2 | {quality} | "
            "bytes = formula |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for label, row in best.items():
            calls = row["ranks"][0]["denoiser_calls"]
            rel, qual = fidelity_cells(row)
            options = variants[label]
            traffic = (
                "n/a (schedule: tests)"
                if "adaptive" in options
                else traffic_matches(
                    row, steps, warmup, ranks, latent_bytes, bool(options.get("fresh_reuse"))
                )
            )
            print(
                f"| {label} | {calls} | {row['denoise_s']:.3f} | {sequential_s / row['denoise_s']:.2f}x | "
                f"{steps / calls:.2f}x | {rel} | {qual} | {traffic} |"
            )
            if "adaptive" in options and calls in by_calls:
                same, other = by_calls[calls]
                rel, qual = fidelity_cells(other)
                print(
                    f"| published {same} (best fixed W, same calls) | {calls} | {other['denoise_s']:.3f} | "
                    f"{sequential_s / other['denoise_s']:.2f}x | {steps / calls:.2f}x | {rel} | {qual} | "
                    f"{traffic_matches(other, steps, int(same[2:]), ranks, latent_bytes, False)} |"
                )
        if not sweep:
            print()
            continue
        print("\nFixed warm-up sweep (published ParaStep), latent rel L2 by rank-0 calls:\n")
        print("| W | " + " | ".join(label[2:] for label in labels if label.startswith("W=")) + " |")
        print("| --- |" + " --- |" * len(sweep))
        calls_cells, rel_cells = [], []
        for row, label in zip(rows, labels, strict=True):
            if label.startswith("W="):
                calls_cells.append(str(row["ranks"][0]["denoiser_calls"]))
                rel_cells.append(f"{row['fidelity']['latent_rel_l2']:.1e}")
        print("| calls | " + " | ".join(calls_cells) + " |")
        print("| rel L2 | " + " | ".join(rel_cells) + " |\n", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", default="", help="comma-separated; default: the tiny models and shapes/tones"
    )
    parser.add_argument("--ranks", default="2,3")
    parser.add_argument("--steps", type=int, default=None, help="default: each model's own")
    parser.add_argument("--adaptive", default="10", help="comma-separated thresholds in percent")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--sweep", action=argparse.BooleanOptionalAction, default=True, help="the fixed warm-up sweep"
    )
    args = parser.parse_args()
    args.ranks = [int(n) for n in args.ranks.split(",")]
    args.adaptive = [int(p) for p in args.adaptive.split(",") if p]
    models = [m for m in args.models.split(",") if m] or [
        m for m in (*TINY, *TRAINED) if (EMBEDDED_MODELS_DIR / m).is_dir()
    ]
    import diffusers
    import torch

    print(
        f"Machine: {platform.processor() or platform.machine()}, {cpu_cores()} cores, {platform.system()}; "
        f"torch {torch.__version__}, diffusers {diffusers.__version__}"
    )
    print(f"Command: {' '.join(sys.argv)}\n")
    with tempfile.TemporaryDirectory() as folder, Engine() as engine:
        image = conditioning_image(Path(folder))
        for model in models:
            run_model(engine, model, args, image)


if __name__ == "__main__":
    main()
