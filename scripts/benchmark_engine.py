"""Engine benchmarks: ParaStep speedup vs the ideal bound, traffic vs the formula, engine overhead.

    .venv/bin/python -m scripts.benchmark_engine [--model tiny-cogvideox] [--steps 50] [--warmup 5]

Prints a Markdown report (paste it into docs/benchmarks.md). Ratios are measured in one run, on one
machine; nothing here is asserted by the test suite.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time

from engine.compare import compare
from engine.devices import cpu_cores
from engine.engine import Engine
from engine.protocol import GenerationRequest
from engine.strategies.parastep import expected_traffic


def stock_denoise_seconds(plan, repeats: int) -> list[float]:
    """The stock pipeline called directly in this process (one thread): its denoising loop only."""
    import torch

    from engine.loading import load_pipeline
    from engine.strategies.base import denoiser_of

    torch.set_num_threads(1)
    pipe = load_pipeline(plan.entry, "cpu", torch.float32)
    marks: dict[str, float] = {}

    def first_call(module, args, kwargs):
        marks.setdefault("start", time.perf_counter())

    def step_end(pipeline, step, timestep, tensors):
        marks["end"] = time.perf_counter()
        return tensors

    denoiser_of(pipe).register_forward_pre_hook(first_call, with_kwargs=True)
    times = []
    for _ in range(repeats):
        marks.clear()
        kwargs = plan.adapter.pipeline_kwargs(
            pipe, plan.request, torch.Generator("cpu").manual_seed(plan.request.seed)
        )
        with torch.inference_mode():
            pipe(**kwargs, callback_on_step_end=step_end)
        times.append(marks["end"] - marks["start"])
    return times


def denoiser_call_ms(plan, calls: int = 20) -> float:
    """Median time of one denoiser call (with CFG, at the request's size) on one CPU thread."""
    import torch

    from engine.loading import load_pipeline
    from engine.strategies.base import denoiser_of

    torch.set_num_threads(1)
    pipe = load_pipeline(plan.entry, "cpu", torch.float32)
    denoiser = denoiser_of(pipe)
    recorded = {}

    def record(module, args, kwargs):
        recorded.setdefault("call", (args, kwargs))

    handle = denoiser.register_forward_pre_hook(record, with_kwargs=True)
    request = dataclasses.replace(plan.request, steps=1)
    with torch.inference_mode():
        pipe(**plan.adapter.pipeline_kwargs(pipe, request, torch.Generator("cpu").manual_seed(0)))
        handle.remove()
        args, kwargs = recorded["call"]
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            denoiser(*args, **kwargs)
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-cogvideox")
    parser.add_argument("--prompt", default="a red circle moving right on a blue background")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    base = GenerationRequest(
        model=args.model, prompt=args.prompt, steps=args.steps, strategy_options={"warmup": args.warmup}
    )
    print(f"Machine: {platform.processor() or platform.machine()}, {cpu_cores()} cores, {platform.system()}")
    print(f"Model: {args.model}, {args.steps} steps, warm-up {args.warmup}\n")
    with Engine() as engine:
        default_plan = engine.plan(dataclasses.replace(base, strategy_options={}))
        size = (
            f"{default_plan.request.frames} frames {default_plan.request.height}x{default_plan.request.width}"
        )
        print(f"Denoiser call at the default size ({size}, CFG batch 2), one CPU thread: ", end="")
        print(f"{denoiser_call_ms(default_plan):.1f} ms (median of 20)\n")
        # 1. ParaStep on two CPU workers vs sequential on one, same seed.
        best = None
        for _ in range(args.repeats):
            report = compare(engine, base, [("sequential", "cpu:1"), ("parastep", "cpu:2")], save=False)
            row = report["rows"][1]
            if best is None or row["speedup"] > best["rows"][1]["speedup"]:
                best = report
        sequential, parastep = best["rows"]
        print("## ParaStep, 2 CPU workers vs sequential on 1\n")
        print(
            "| strategy | devices | denoise s | speedup | ideal | speedup / ideal | latent rel L2 | PSNR dB |"
        )
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
        for row in best["rows"]:
            fid = row["fidelity"]
            print(
                f"| {row['strategy']} | {row['devices']} | {row['denoise_s']:.3f} | {row['speedup']:.2f}x | "
                f"{row['ideal_speedup']:.2f}x | {row['speedup'] / row['ideal_speedup']:.3f} | "
                f"{fid['latent_rel_l2']:.2e} | {fid['psnr_db']} |"
            )
        print(f"\n(best of {args.repeats} compare runs by ParaStep speedup)")

        # 2. Bytes per rank vs the formula.
        plan = engine.plan(GenerationRequest(**{**base.__dict__, "strategy": "parastep", "devices": "cpu:2"}))
        result = engine.run(plan, previews=False)
        latent_bytes = result.latents.size * 4  # float32 latents
        prediction_bytes = latent_bytes * (2 if plan.adapter.uses_guidance(plan.request) else 1)
        formula = expected_traffic(args.steps, args.warmup, 2, prediction_bytes, latent_bytes)
        print("\n## Bytes per rank, measured vs formula\n")
        print(f"prediction {prediction_bytes} B, latent {latent_bytes} B\n")
        print("| rank | sent | formula | received | formula | equal |")
        print("| --- | --- | --- | --- | --- | --- |")
        for rank, expected in zip(result.ranks, formula, strict=True):
            equal = (
                rank["bytes_sent"] == expected["bytes_sent"]
                and rank["bytes_received"] == expected["bytes_received"]
            )
            print(
                f"| {rank['rank']} | {rank['bytes_sent']} | {expected['bytes_sent']} | "
                f"{rank['bytes_received']} | {expected['bytes_received']} | {'yes' if equal else 'NO'} |"
            )

        # 3. Engine overhead: sequential through the engine vs the stock pipeline in one process.
        seq_plan = engine.plan(
            GenerationRequest(**{**base.__dict__, "strategy_options": {}, "devices": "cpu:1"})
        )
        engine.run(seq_plan, previews=False)  # warm
        with_previews = [engine.run(seq_plan).timings["denoise_s"] for _ in range(args.repeats)]
        without = [engine.run(seq_plan, previews=False).timings["denoise_s"] for _ in range(args.repeats)]
    stock = stock_denoise_seconds(seq_plan, args.repeats + 1)[1:]
    print("\n## Engine overhead, sequential, warm model, denoising loop (median of runs)\n")
    print("| run | denoise s | overhead vs stock |")
    print("| --- | --- | --- |")
    reference = statistics.median(stock)
    print(f"| stock pipeline, one process | {reference:.3f} | - |")
    for label, values in (("engine, previews off", without), ("engine, previews on", with_previews)):
        value = statistics.median(values)
        print(f"| {label} | {value:.3f} | {100 * (value / reference - 1):+.1f}% |")


if __name__ == "__main__":
    main()
