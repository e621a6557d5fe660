"""Which strategy the engine plans on which family, and the reason where it refuses: planned, not assumed.

    .venv/bin/python -m scripts.strategy_availability [--models tiny-wan,wan-a14b,wan-ti2v,shapes,...]

Every strategy is planned (`Engine.plan`: no workers start, nothing runs) on each model with the
device count it needs (2 CPU workers for the multi-device ones) and a warm-up of 2 where it takes one.
`wan-a14b` is a two-expert Wan 2.2 A14B layout (`transformer` + `transformer_2`, `boundary_ratio`)
and `wan-ti2v` the shipped tiny-wan with `expand_timesteps` (Wan 2.2 TI2V-5B's per-token timesteps),
both built into a temporary folder from resources/build_tiny_models.py. Prints a markdown table:
"plans" or the first sentence of the refusal. context-parallel is refused on CPU workers everywhere;
its family check (a `_cp_plan` on the transformer class) is printed separately.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
from pathlib import Path

DEFAULT_MODELS = "tiny-wan,wan-a14b,wan-ti2v"


def build_variants(folder: Path) -> dict[str, str]:
    from resources import EMBEDDED_MODELS_DIR
    from resources.build_tiny_models import build_wan, save_model

    pipe, studio = build_wan(experts=2, num_layers=2)
    save_model(pipe, studio, folder / "wan-a14b")
    ti2v = folder / "wan-ti2v"
    shutil.copytree(EMBEDDED_MODELS_DIR / "tiny-wan", ti2v)
    index = json.loads((ti2v / "model_index.json").read_text())
    index["expand_timesteps"] = True
    (ti2v / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return {"wan-a14b": str(folder / "wan-a14b"), "wan-ti2v": str(ti2v)}


def plan_all(model: str) -> dict[str, str]:
    from engine.engine import Engine
    from engine.errors import UserError
    from engine.protocol import GenerationRequest
    from engine.strategies import STRATEGIES

    engine = Engine()
    results = {}
    for name, cls in STRATEGIES.items():
        devices = f"cpu:{max(2, cls.min_devices)}" if cls.min_devices > 1 or cls.max_devices != 1 else "cpu:1"
        options = {"warmup": 2} if any(o.name == "warmup" for o in cls.options) else {}
        request = GenerationRequest(
            model=model,
            prompt="a red ball rolling",
            frames=5,
            height=32,
            width=48,
            fps=16,
            guidance_scale=5.0,
            steps=7,
            seed=0,
            strategy=name,
            devices=devices,
            strategy_options=options,
        )
        try:
            engine.plan(request)
            results[name] = "plans"
        except UserError as error:
            results[name] = str(error)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS)
    args = parser.parse_args()
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    names = args.models.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        paths = build_variants(Path(tmp)) if {"wan-a14b", "wan-ti2v"} & set(names) else {}
        table = {name: plan_all(paths.get(name, name)) for name in names}
    strategies = list(next(iter(table.values())))
    print("| strategy | " + " | ".join(names) + " |")
    print("|" + " --- |" * (len(names) + 1))
    for strategy in strategies:
        cells = []
        for name in names:
            text = table[name][strategy]
            if text != "plans":
                text = "refused: " + re.sub(r"^Strategy '[^']+' cannot run '[^']+': ", "", text)
                text = text.split(" Fix: ")[0].replace("|", "/")
            cells.append(text)
        print(f"| `{strategy}` | " + " | ".join(cells) + " |")
    import diffusers

    print()
    for cls_name in ("WanTransformer3DModel", "LTXVideoTransformer3DModel", "CogVideoXTransformer3DModel"):
        plan = getattr(getattr(diffusers, cls_name), "_cp_plan", None)
        print(f"{cls_name}._cp_plan: {'declared' if plan else 'none'}")


if __name__ == "__main__":
    main()
