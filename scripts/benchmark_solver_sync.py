"""Does ParaStep need the solver's history at each round start? `sync_solver` 1 against 0 (as published).

    nice -n 5 .venv/bin/python -m scripts.benchmark_solver_sync [--prompts 15] [--ranks 2,3] [--steps 20]
        [--schedulers UniPC,DPM-Solver++]

Multistep schedulers (UniPC, DPM-Solver++) carry a history of model outputs from step to step. With
`sync_solver` 0, ranks k >= 1 keep the history of their own reused predictions after rank 0's latent
broadcast (UniPC's corrector even rebuilds the current sample from its own last sample); with 1, the
broadcast also carries rank 0's history. The trained `shapes` model (CogVideoX architecture, v-prediction)
is run with its scheduler swapped for UniPC and for DPM-Solver++ (the same betas and spacing, in a copy of
the folder); every prompt is generated with sequential on cpu:1 (the reference for that scheduler) and
ParaStep on cpu:N with each setting, through the engine. Printed: PSNR and SSIM of the decoded clip and the
final latents' relative L2 against sequential, the share of clips whose every attribute reads the same as
the reference's (`resources.shapes_data`), and rank 0's bytes sent per job. Markdown for docs.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import shutil
import tempfile
from pathlib import Path

import numpy as np

from engine.devices import cpu_cores
from engine.engine import Engine
from engine.metrics import fidelity, relative_l2
from engine.protocol import GenerationRequest
from resources import EMBEDDED_MODELS_DIR, shapes_data

SCHEDULERS = {
    "UniPC": {"_class_name": "UniPCMultistepScheduler", "solver_order": 2},
    "DPM-Solver++": {"_class_name": "DPMSolverMultistepScheduler", "solver_order": 2},
}


def model_with_scheduler(folder: Path, name: str) -> Path:
    """A copy of `shapes` whose scheduler config names another multistep scheduler."""
    target = folder / f"shapes-{name}"
    shutil.copytree(EMBEDDED_MODELS_DIR / "shapes", target)
    config_file = target / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    keep = ("beta_start", "beta_end", "beta_schedule", "num_train_timesteps", "prediction_type")
    config = {k: config[k] for k in keep} | {"timestep_spacing": "trailing", **SCHEDULERS[name]}
    config_file.write_text(json.dumps(config, indent=2))
    index_file = target / "model_index.json"  # the class that loads is the one the index names
    index = json.loads(index_file.read_text())
    index_file.write_text(json.dumps({**index, "scheduler": ["diffusers", SCHEDULERS[name]["_class_name"]]}))
    return target


def prompts(count: int) -> list[str]:
    backgrounds = list(shapes_data.BACKGROUNDS)
    combos = itertools.product(shapes_data.COLOURS, shapes_data.SHAPES, shapes_data.MOTIONS)
    specs = [
        shapes_data.ClipSpec(c, s, m, backgrounds[i % len(backgrounds)]) for i, (c, s, m) in enumerate(combos)
    ]
    step = max(1, len(specs) // count)
    return [spec.prompt for spec in specs[::step][:count]]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=15)
    parser.add_argument("--ranks", default="2,3")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--schedulers", default=",".join(SCHEDULERS), help="any of " + ", ".join(SCHEDULERS))
    args = parser.parse_args(argv)
    ranks = [int(n) for n in args.ranks.split(",")]
    texts = prompts(args.prompts)
    print(f"machine: {platform.processor() or platform.machine()}, {cpu_cores()} cores; {len(texts)} prompts")
    with tempfile.TemporaryDirectory() as scratch, Engine() as engine:
        for name in args.schedulers.split(","):
            model = str(model_with_scheduler(Path(scratch), name))

            def run(strategy: str, devices: str, options: dict, prompt: str, model: str = model):
                request = GenerationRequest(
                    model=model, prompt=prompt, seed=7, steps=args.steps, strategy=strategy,
                    devices=devices, strategy_options=options,
                )  # fmt: skip
                result = engine.run(engine.plan(request), previews=False)
                result.discard_pending()
                return result

            references = {p: run("sequential", "cpu:1", {}, p) for p in texts}
            print(f"\n### shapes with {name} ({args.steps} steps, W={args.warmup})\n")
            print(
                "| N | sync_solver | PSNR dB | SSIM | latent rel L2 | same reading | rank 0 bytes sent/job |"
            )
            print("| --- | --- | --- | --- | --- | --- | --- |")
            for n, sync in itertools.product(ranks, (0, 1)):
                options = {"warmup": args.warmup, "sync_solver": sync}
                psnr, ssim, rel, same, sent = [], [], [], 0, 0
                for prompt in texts:
                    result, ref = run("parastep", f"cpu:{n}", options, prompt), references[prompt]
                    scores = fidelity("video", result.output, ref.output)
                    psnr.append(min(scores["psnr_db"], 100.0))
                    ssim.append(scores["ssim"])
                    rel.append(relative_l2(result.latents, ref.latents))
                    same += shapes_data.read_clip(result.output) == shapes_data.read_clip(ref.output)
                    sent = result.ranks[0]["bytes_sent"]
                print(
                    f"| {n} | {sync} | {np.mean(psnr):.1f} | {np.mean(ssim):.3f} | {np.mean(rel):.2e} | "
                    f"{same}/{len(texts)} | {sent:,} |"
                )


if __name__ == "__main__":
    main()
