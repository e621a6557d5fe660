"""GPU figures for the full-size models (issue 7): step time, memory, engine and preview cost, BatchStep,
cache baselines, memory options, message sizes and projected multi-GPU speedups.

    .venv/bin/python -m scripts.gpu_benchmarks [--models cogvideox-2b,svd,audioldm2-large]
        [--models-dir DIR | HF_HUB_CACHE=DIR] [--device cuda] [--steps N] [--json FILE] [--markdown FILE]
    .venv/bin/python -m scripts.gpu_benchmarks --device cpu --reduced --models-dir DIR   # CPU check

The models are the random-weight full-size pipelines of scripts/build_full_size_models.py, found through
the catalog: by default by their hub names (THUDM/CogVideoX-2b, ...) in the Hugging Face cache, exactly as
downloaded checkpoints; with --models-dir as local folders DIR/<name>. Settings are the published ones:

| model | size | dtype | steps |
| --- | --- | --- | --- |
| cogvideox-2b | 49 frames 480x720 | bf16 | 50 |
| svd | 14 frames 576x1024 | fp16 | 25 |
| svd-xt | 25 frames 576x1024 | fp16 | 25 |
| audioldm2-large | 10 s | fp16 | 200 |

Per model, on one device:

1. the stock pipeline called in this process: per-step latency (median of the loop's steps), denoise loop
   time, encode time, peak memory (`torch.cuda.max_memory_allocated`) of the loop and of the whole call;
   one denoiser call with its CFG batch and with one CFG half; the sizes of what each multi-GPU strategy
   would send (prediction, latent, AsyncDiff boundary, DistriFusion keys/values) read by hooks;
2. preview cost: one x0 preview rendered (linear latent map, PNG), times the previews a run makes at the
   engine's 10-per-second throttle, as a share of the loop;
3. memory options: VAE decode plain, sliced, tiled (time, peak); the whole call with
   `enable_model_cpu_offload` (text encoders and VAE leave the GPU while the denoiser runs; CUDA only);
4. through the engine (a worker process, as the app runs it): sequential with previews off and on (engine
   overhead vs 1.), BatchStep (lookahead 2 and 4) vs sequential, ParaStep at N=1 (must equal sequential),
   and every single-device cache strategy registered (cache-*), with speedup and latent error;
5. projections (engine/projection.py) for N = 2, 4, 8 over PCIe 4.0 x16 and NVLink 4 from the measured
   step times and message sizes, at the published ParaStep settings, next to the published speedups.

--reduced: small request sizes (and whatever the model folder holds: use scripts/build_full_size_models.py
--reduced) so that every section runs on a CPU in minutes. Figures from such a run check the script, they
say nothing about GPUs. Prints Markdown; --json keeps everything.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import math
import platform
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from engine.projection import (
    LINKS,
    PUBLISHED_PARASTEP,
    StepProfile,
    ideal_parastep_speedup,
    project,
)

# name -> (hub name, published request, dtype); "reduced" overrides the size for a CPU check.
MODELS: dict[str, dict[str, Any]] = {
    "cogvideox-2b": {
        "hub": "THUDM/CogVideoX-2b",
        "dtype": "bf16",
        "request": {
            "prompt": "a red panda eating bamboo in a forest",
            "frames": 49,
            "height": 480,
            "width": 720,
            "steps": 50,
        },
        "reduced": {"frames": 9, "height": 64, "width": 96, "steps": 6},
    },
    "svd": {
        "hub": "stabilityai/stable-video-diffusion-img2vid",
        "dtype": "fp16",
        "request": {"frames": 14, "height": 576, "width": 1024, "steps": 25},
        "reduced": {"frames": 4, "height": 64, "width": 128, "steps": 6},
    },
    "svd-xt": {
        "hub": "stabilityai/stable-video-diffusion-img2vid-xt",
        "dtype": "fp16",
        "request": {"frames": 25, "height": 576, "width": 1024, "steps": 25},
        "reduced": {"frames": 4, "height": 64, "width": 128, "steps": 6},
    },
    "audioldm2-large": {
        "hub": "cvssp/audioldm2-large",
        "dtype": "fp16",
        "request": {"prompt": "a dog barking in the rain", "seconds": 10.0, "steps": 200},
        "reduced": {"seconds": 1.0, "steps": 6},
    },
}
DEFAULT_MODELS = ("cogvideox-2b", "svd", "audioldm2-large")
PREVIEW_INTERVAL_S = 0.1  # engine.previews.MIN_INTERVAL_S


# --- small helpers --------------------------------------------------------------------------------


class Timer:
    """Wall time with the device drained at both ends."""

    def __init__(self, device: str) -> None:
        import torch

        self.cuda = device.startswith("cuda")
        self.device = torch.device(device)

    def sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize(self.device)

    def now(self) -> float:
        self.sync()
        return time.perf_counter()

    def reset_peak(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_bytes(self) -> int | None:
        if not self.cuda:
            return None
        import torch

        return int(torch.cuda.max_memory_allocated(self.device))


def tensor_bytes(value: Any) -> int:
    """Bytes of every tensor in a (nested) argument."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, list | tuple):
        return sum(tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    return 0


def gb(nbytes: int | None) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**30:.2f} GiB"


def size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextlib.contextmanager
def section(results: dict[str, Any], name: str) -> Iterator[None]:
    """Runs one part; a failure is recorded and the next part still runs."""
    start = time.perf_counter()
    try:
        yield
    except Exception as exc:  # a benchmark reports what failed and goes on
        results.setdefault("errors", {})[name] = "".join(
            traceback.format_exception_only(type(exc), exc)
        ).strip()
        print(f"  [{name}] failed: {results['errors'][name].splitlines()[-1]}", file=sys.stderr)
    finally:
        print(f"  [{name}] {time.perf_counter() - start:.1f} s", file=sys.stderr)


# --- what a denoiser call sends: sizes read by hooks ----------------------------------------------


def message_sizes(denoiser: Any, call: Callable[[], Any]) -> dict[str, int]:
    """Runs `call` (one denoiser call) with hooks that read the sizes each multi-GPU strategy moves.

    - activation_bytes (AsyncDiff): what crosses the heaviest cut between two parts per step. DiT: the
      inputs of the middle transformer block (hidden and text states). UNet: the mid block's input plus
      every skip tensor of the down path, which all cross a cut at the bottom of the U.
    - kv_bytes (DistriFusion): keys and values of every spatial self-attention layer (`attn1` outside
      temporal blocks), joint text tokens included.
    Works on meta tensors too (sizes come from shapes).
    """
    import torch

    sizes = {"activation_bytes": 0, "kv_bytes": 0}
    handles = []

    def add(key: str, nbytes: int) -> None:
        sizes[key] += int(nbytes)

    blocks = getattr(denoiser, "transformer_blocks", None)
    if isinstance(blocks, torch.nn.ModuleList) and len(blocks):
        middle = blocks[len(blocks) // 2]
        handles.append(
            middle.register_forward_pre_hook(
                lambda m, a, k: add("activation_bytes", tensor_bytes(a) + tensor_bytes(k)), with_kwargs=True
            )
        )
    elif hasattr(denoiser, "down_blocks") and hasattr(denoiser, "mid_block"):
        handles.append(
            denoiser.conv_in.register_forward_hook(
                lambda m, a, out: add("activation_bytes", tensor_bytes(out))
            )
        )
        for block in denoiser.down_blocks:
            handles.append(
                block.register_forward_hook(
                    lambda m, a, out: add(
                        "activation_bytes", tensor_bytes(out[1]) if isinstance(out, tuple) else 0
                    )
                )
            )
        handles.append(
            denoiser.mid_block.register_forward_pre_hook(
                lambda m, a, k: add("activation_bytes", tensor_bytes(a[0] if a else k.get("hidden_states"))),
                with_kwargs=True,
            )
        )

    def kv_hook(module: Any, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        encoder = kwargs.get("encoder_hidden_states")
        if hidden is None or not hasattr(module, "to_k"):
            return
        tokens = hidden.shape[1] if hidden.ndim == 3 else math.prod(hidden.shape[2:])
        if encoder is not None and encoder.ndim == 3:
            tokens += encoder.shape[1]  # joint attention over text + video tokens (CogVideoX)
        width = module.to_k.out_features
        add("kv_bytes", 2 * hidden.shape[0] * tokens * width * hidden.element_size())

    for name, module in denoiser.named_modules():
        if name.endswith("attn1") and "temporal" not in name and hasattr(module, "to_k"):
            handles.append(module.register_forward_pre_hook(kv_hook, with_kwargs=True))
    try:
        call()
    finally:
        for handle in handles:
            handle.remove()
    return sizes


def half_batch(args: tuple, kwargs: dict, batch: int) -> tuple[tuple, dict]:
    """The same denoiser call on the first half of the CFG batch (one guidance half)."""
    import torch

    def cut(value: Any) -> Any:
        if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] == batch:
            return value[: batch // 2]
        return value

    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


def batch_of(args: tuple, kwargs: dict) -> int:
    sample = args[0] if args else next(iter(kwargs.values()))
    return int(sample.shape[0])


# --- 1-3: the stock pipeline in this process ------------------------------------------------------


def stock_call(pipe: Any, plan: Any, timer: Timer, steps: int | None = None) -> dict[str, Any]:
    """One pipeline call (latents out), timed per step; records the first denoiser call's arguments."""
    import torch

    from engine.strategies.base import denoiser_of

    request = plan.request if steps is None else dataclasses.replace(plan.request, steps=steps)
    denoiser = denoiser_of(pipe)
    marks: dict[str, Any] = {"steps": []}

    def first_call(module: Any, args: tuple, kwargs: dict) -> None:
        if "first" not in marks:
            marks["first"] = timer.now()
            marks["call"] = (args, kwargs)
            marks["peak_before_loop"] = timer.peak_bytes()
            timer.reset_peak()  # from here: the loop's peak

    scheduler = pipe.scheduler
    original_step = scheduler.step

    @functools.wraps(original_step)  # pipelines inspect step's signature
    def timed_step(*args: Any, **kwargs: Any) -> Any:
        output = original_step(*args, **kwargs)
        marks["steps"].append(timer.now())
        sample = output[0] if isinstance(output, tuple) else output.prev_sample
        marks["latent_bytes"] = sample.numel() * sample.element_size()
        return output

    handle = denoiser.register_forward_pre_hook(first_call, with_kwargs=True)
    scheduler.step = timed_step
    kwargs = plan.adapter.pipeline_kwargs(pipe, request, torch.Generator("cpu").manual_seed(request.seed))
    try:
        timer.reset_peak()
        start = timer.now()
        with torch.inference_mode():
            result = pipe(**kwargs)
        end = timer.now()
    finally:
        handle.remove()
        del scheduler.step
    latents = result.frames if hasattr(result, "frames") else result.audios
    times = [marks["first"], *marks["steps"]]
    per_step = [b - a for a, b in zip(times, times[1:], strict=False)]
    return {
        "steps": request.steps,
        "encode_s": marks["first"] - start,
        "denoise_s": marks["steps"][-1] - marks["first"],
        "call_s": end - start,
        "step_median_s": statistics.median(per_step),
        "step_min_s": min(per_step),
        "step_max_s": max(per_step),
        "peak_encode_bytes": marks["peak_before_loop"],
        "peak_loop_bytes": timer.peak_bytes(),
        "latent_bytes": marks["latent_bytes"],
        "latents": latents,
        "call": marks["call"],
    }


def time_calls(fn: Callable[[], Any], timer: Timer, repeats: int) -> float:
    import torch

    with torch.inference_mode():
        fn()  # warm
        times = []
        for _ in range(repeats):
            start = timer.now()
            fn()
            times.append(timer.now() - start)
    return statistics.median(times)


def component_bytes(pipe: Any) -> dict[str, int]:
    import torch

    sizes = {}
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            sizes[name] = sum(p.numel() * p.element_size() for p in component.parameters())
    return sizes


def decode_variants(pipe: Any, plan: Any, latents: Any, timer: Timer) -> list[dict[str, Any]]:
    """VAE decode plain, sliced, tiled, both: time and peak memory."""
    import torch

    vae = pipe.vae
    options = [("plain", ())]
    if hasattr(vae, "enable_slicing"):
        options.append(("slicing", ("slicing",)))
    if hasattr(vae, "enable_tiling"):
        options += [("tiling", ("tiling",)), ("slicing + tiling", ("slicing", "tiling"))]
    rows = []
    for label, enabled in options:
        try:
            for option in enabled:
                getattr(vae, f"enable_{option}")()
        except NotImplementedError:  # AutoencoderKLTemporalDecoder has the methods but no slicing or tiling
            rows.append({"option": label, "unsupported": type(vae).__name__})
            continue
        try:
            timer.reset_peak()
            start = timer.now()
            with torch.inference_mode():
                plan.adapter.decode(pipe, latents, plan.request)
            rows.append({"option": label, "seconds": timer.now() - start, "peak_bytes": timer.peak_bytes()})
        finally:
            for option in enabled:
                with contextlib.suppress(NotImplementedError):
                    getattr(vae, f"disable_{option}")()
            free_memory()
    return rows


def preview_cost(pipe: Any, plan: Any, latents: Any, timer: Timer, denoise_s: float) -> dict[str, Any]:
    """One x0 preview (fitting the map first if the model has none), then the share of the loop."""
    from engine.previews import PreviewRenderer

    renderer = PreviewRenderer(plan.adapter, pipe, plan.request, plan.entry.path)
    renderer.render(latents)  # fits and caches the map on first use
    render_s = time_calls(lambda: renderer.render(latents), timer, repeats=5)
    steps = plan.request.steps
    count = min(steps, 1 + math.floor(denoise_s / PREVIEW_INTERVAL_S))  # throttle: ~10/s, plus the last
    return {"render_s": render_s, "previews": count, "share": render_s * count / denoise_s}


def offload_call(plan: Any, device: str, dtype: Any, timer: Timer) -> dict[str, Any]:
    """The whole call with enable_model_cpu_offload: components move to the GPU only while they run."""
    from engine.loading import load_pipeline

    pipe = load_pipeline(plan.entry, "cpu", dtype)
    pipe.enable_model_cpu_offload(device=device)
    try:
        run = stock_call(pipe, plan, timer)
        return {
            "denoise_s": run["denoise_s"],
            "call_s": run["call_s"],
            "peak_encode_bytes": run["peak_encode_bytes"],
            "peak_loop_bytes": run["peak_loop_bytes"],
        }
    finally:
        pipe.remove_all_hooks()
        del pipe
        free_memory()


def in_process(plan: Any, device: str, dtype: Any, results: dict[str, Any], repeats: int) -> None:
    import torch

    from engine.loading import load_pipeline
    from engine.strategies.base import denoiser_of, split_output

    timer = Timer(device)
    start = timer.now()
    pipe = load_pipeline(plan.entry, device, dtype)
    results["load_s"] = timer.now() - start
    results["component_bytes"] = component_bytes(pipe)
    results["resident_bytes"] = timer.peak_bytes()
    try:
        with section(results, "stock"):
            stock_call(pipe, plan, timer, steps=2)  # warm: kernels, allocator, autotuning
            run = stock_call(pipe, plan, timer)
            latents = run.pop("latents")
            args, kwargs = run.pop("call")
            results["stock"] = run
            denoiser = denoiser_of(pipe)
            batch = batch_of(args, kwargs)
            results["denoiser_call_s"] = time_calls(lambda: denoiser(*args, **kwargs), timer, repeats)
            results["cfg_batch"] = batch
            if batch % 2 == 0 and plan.adapter.uses_guidance(plan.request):
                half_args, half_kwargs = half_batch(args, kwargs, batch)
                results["half_call_s"] = time_calls(
                    lambda: denoiser(*half_args, **half_kwargs), timer, repeats
                )
            with torch.inference_mode():
                output = denoiser(*args, **kwargs)
                prediction = split_output(output)[0]
                sizes = message_sizes(denoiser, lambda: denoiser(*args, **kwargs))
            results["messages"] = {
                "prediction_bytes": prediction.numel() * prediction.element_size(),
                "latent_bytes": run["latent_bytes"],
                **sizes,
            }
            del output, prediction
        if "stock" not in results:
            return
        with section(results, "preview"):
            results["preview"] = preview_cost(pipe, plan, latents, timer, results["stock"]["denoise_s"])
        with section(results, "decode"):
            results["decode"] = decode_variants(pipe, plan, latents, timer)
    finally:
        del pipe
        free_memory()
    if timer.cuda:
        with section(results, "offload"):
            results["offload"] = offload_call(plan, device, dtype, timer)


# --- 4: through the engine ------------------------------------------------------------------------


def rel_l2(a: Any, b: Any) -> float:
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def through_engine(request: Any, dtype: str, devices: str, results: dict[str, Any], repeats: int) -> None:
    import numpy as np

    from engine.engine import Engine
    from engine.errors import UserError
    from engine.strategies import STRATEGIES

    def request_for(strategy: str, **options: Any) -> Any:
        return dataclasses.replace(request, strategy=strategy, devices=devices, strategy_options=options)

    rows: dict[str, Any] = {}
    results["engine"] = rows
    with Engine(dtype=dtype) as engine:
        sequential = engine.plan(request_for("sequential"))
        with section(results, "engine-sequential"):
            first = engine.run(sequential, previews=False)  # loads the model, warms the device
            rows["load_s"] = first.timings["load_s"]
            off = [engine.run(sequential, previews=False) for _ in range(repeats)]
            on = [engine.run(sequential, previews=True) for _ in range(repeats)]
            reference = off[0].latents
            rows["sequential"] = {
                "previews_off_denoise_s": statistics.median(r.timings["denoise_s"] for r in off),
                "previews_on_denoise_s": statistics.median(r.timings["denoise_s"] for r in on),
                "encode_s": off[0].timings["encode_s"],
                "decode_s": off[0].timings["decode_s"],
            }
        if "sequential" not in rows:
            return
        base = rows["sequential"]["previews_off_denoise_s"]
        candidates = [("parastep", {}), ("batchstep", {"lookahead": 2}), ("batchstep", {"lookahead": 4})]
        for name in sorted(STRATEGIES):
            if name.startswith("cache-"):
                if (
                    name == "cache-mag"
                ):  # MagCache needs its per-model ratios: a full-cost calibration run first
                    candidates.append((name, {"calibrate": 1}))
                candidates.append((name, {}))
        for name, options in candidates:
            label = name + "".join(f" {k}={v}" for k, v in options.items())
            if name == "parastep":
                label = "parastep N=1 (must equal sequential)"
            with section(results, f"engine-{label}"):
                try:
                    plan = engine.plan(request_for(name, **options))
                except UserError as exc:
                    rows[label] = {"unavailable": str(exc)}
                    continue
                try:
                    run = engine.run(plan, previews=False)
                except UserError as exc:
                    rows[label] = {"unavailable": str(exc)}
                    continue
                rows[label] = {
                    "denoise_s": run.timings["denoise_s"],
                    "speedup": base / run.timings["denoise_s"],
                    "ideal": plan.ideal_speedup,
                    "denoiser_calls": run.ranks[0].get("denoiser_calls"),
                    "latent_rel_l2": rel_l2(run.latents, reference),
                    "equal_to_sequential": bool(np.array_equal(run.latents, reference)),
                }


# --- 5: projections -------------------------------------------------------------------------------


def profile_from(name: str, results: dict[str, Any], label: str) -> StepProfile:
    stock, messages = results["stock"], results["messages"]
    denoise = results["denoiser_call_s"]
    decode = next((row["seconds"] for row in results.get("decode", []) if row["option"] == "plain"), 0.0)
    return StepProfile(
        model=name,
        denoise_s=denoise,
        half_denoise_s=results.get("half_call_s", denoise),
        loop_s=max(0.0, stock["step_median_s"] - denoise),
        encode_s=stock["encode_s"],
        decode_s=decode,
        prediction_bytes=messages["prediction_bytes"],
        latent_bytes=messages["latent_bytes"],
        activation_bytes=messages["activation_bytes"],
        kv_bytes=messages["kv_bytes"],
        source=label,
    )


def projection_table(profile: StepProfile, steps: int, warmup: int) -> list[str]:
    """Markdown: one row per strategy and N, loop and end-to-end speedup over each link."""
    rows = project(profile, steps, warmup)
    links = list(dict.fromkeys(row.link for row in rows))
    header = "| strategy | N | " + " | ".join(f"{link}: loop / end-to-end" for link in links)
    lines = [f"T={steps}, W={warmup}; {profile.source}", "", header + " | ParaStep ideal |"]
    lines.append("|" + " --- |" * (len(links) + 3))
    keys = list(dict.fromkeys((row.strategy, row.devices) for row in rows))
    for strategy, n in sorted(keys, key=lambda key: (key[1], key[0])):
        cells = []
        for link in links:
            row = next(r for r in rows if (r.strategy, r.devices, r.link) == (strategy, n, link))
            cells.append(f"{row.loop_speedup:.2f}x / {row.end_to_end_speedup:.2f}x")
        ideal = f"{ideal_parastep_speedup(steps, warmup, n):.2f}x" if strategy.startswith("parastep") else "-"
        lines.append(f"| {strategy} | {n} | " + " | ".join(cells) + f" | {ideal} |")
    return lines


# --- report ---------------------------------------------------------------------------------------


def markdown(name: str, results: dict[str, Any], label: str) -> list[str]:
    out = [f"### {name} ({results['request']})", ""]
    stock = results.get("stock")
    if stock:
        half = results.get("half_call_s")
        out += [
            "| measure | value |",
            "| --- | --- |",
            f"| per-step latency, median (min-max) | {stock['step_median_s'] * 1e3:.1f} ms "
            f"({stock['step_min_s'] * 1e3:.1f}-{stock['step_max_s'] * 1e3:.1f}) |",
            f"| denoiser call, CFG batch {results['cfg_batch']} / one half | "
            f"{results['denoiser_call_s'] * 1e3:.1f} ms / " + (f"{half * 1e3:.1f} ms |" if half else "- |"),
            f"| denoise loop ({stock['steps']} steps) | {stock['denoise_s']:.2f} s |",
            f"| encode / load | {stock['encode_s']:.2f} s / {results['load_s']:.1f} s |",
            f"| peak memory: resident weights / encode / loop | {gb(results.get('resident_bytes'))} / "
            f"{gb(stock['peak_encode_bytes'])} / {gb(stock['peak_loop_bytes'])} |",
        ]
        messages = results.get("messages", {})
        out.append(
            "| messages: prediction / latent / AsyncDiff cut / DistriFusion K+V per step | "
            + " / ".join(
                size(messages.get(k, 0))
                for k in ("prediction_bytes", "latent_bytes", "activation_bytes", "kv_bytes")
            )
            + " |"
        )
        preview = results.get("preview")
        if preview:
            out.append(
                f"| preview: one render / previews per run / share of the loop (goal <= 2%) | "
                f"{preview['render_s'] * 1e3:.1f} ms / {preview['previews']} / "
                f"**{preview['share'] * 100:.2f}%** |"
            )
        for row in results.get("decode", []):
            if "unsupported" in row:
                out.append(f"| decode, VAE {row['option']} | not supported by {row['unsupported']} |")
                continue
            out.append(
                f"| decode, VAE {row['option']} | {row['seconds']:.2f} s, peak {gb(row['peak_bytes'])} |"
            )
        offload = results.get("offload")
        if offload:
            out.append(
                f"| enable_model_cpu_offload: loop / call, peak loop | {offload['denoise_s']:.2f} s / "
                f"{offload['call_s']:.2f} s, {gb(offload['peak_loop_bytes'])} |"
            )
        out.append("")
    engine = results.get("engine", {})
    if "sequential" in engine and stock:
        seq = engine["sequential"]
        overhead = seq["previews_off_denoise_s"] / stock["denoise_s"] - 1
        with_previews = seq["previews_on_denoise_s"] / stock["denoise_s"] - 1
        out += [
            "| through the engine | denoise s | vs stock / sequential | ideal | latent rel L2 |",
            "| --- | --- | --- | --- | --- |",
            f"| stock pipeline, this process | {stock['denoise_s']:.3f} | - | - | - |",
            f"| sequential, previews off | {seq['previews_off_denoise_s']:.3f} | **{overhead * 100:+.1f}%** "
            "(goal <= 3%) | - | - |",
            f"| sequential, previews on | {seq['previews_on_denoise_s']:.3f} | {with_previews * 100:+.1f}% "
            "| - | - |",
        ]
        for strategy, row in engine.items():
            if strategy in ("sequential", "load_s"):
                continue
            if "unavailable" in row:
                out.append(f"| {strategy} | unavailable: {row['unavailable'].splitlines()[0][:100]} | | | |")
                continue
            ideal = f"{row['ideal']:.2f}x" if row.get("ideal", 1.0) > 1.0 else "-"
            error = "equal" if row["equal_to_sequential"] else f"{row['latent_rel_l2']:.2e}"
            out.append(f"| {strategy} | {row['denoise_s']:.3f} | {row['speedup']:.2f}x | {ideal} | {error} |")
        out.append("")
    if stock and "messages" in results:
        profile = profile_from(name, results, label)
        paper = PUBLISHED_PARASTEP.get(name.replace("svd-xt", "svd"))
        settings = [(stock["steps"], results["warmup"])]
        if paper and (paper["steps"], paper["warmup"]) not in settings:
            settings.insert(0, (paper["steps"], paper["warmup"]))
        for steps, warmup in settings:
            out += [
                "Projection (a cost model, not a measurement): " + ", ".join(link.name for link in LINKS),
                "",
            ]
            out += projection_table(profile, steps, warmup) + [""]
        if paper:
            out += [
                f"Published ParaStep end-to-end maximum for {name}: {paper['speedup']}x "
                f"(T={paper['steps']}, W={paper['warmup']}).",
                "",
            ]
    for part, error in results.get("errors", {}).items():
        out.append(f"- {part} failed: `{error.splitlines()[-1]}`")
    return out


def environment(device: str) -> dict[str, Any]:
    import diffusers
    import torch
    import transformers

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "machine": f"{platform.processor() or platform.machine()}, {platform.system()}",
    }
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        info["gpu"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"
    return info


def run_model(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from engine.engine import Engine
    from engine.loading import resolve_dtype
    from engine.protocol import GenerationRequest

    spec = MODELS[name]
    reference = str(args.models_dir / name) if args.models_dir else spec["hub"]
    fields = dict(spec["request"])
    if args.reduced:
        fields.update(spec["reduced"])
    if args.steps:
        fields["steps"] = args.steps
    if name.startswith("svd"):
        fields["image"] = str(conditioning_image(args.work))
    dtype_name = "fp32" if args.device == "cpu" else spec["dtype"]
    device = "cuda:0" if args.device == "cuda" else args.device
    request = GenerationRequest(model=reference, seed=0, **fields)
    plan = Engine().plan(dataclasses.replace(request, devices="cpu:1" if device == "cpu" else device))
    warmup = plan.adapter.default_warmup(plan.request.steps)
    results: dict[str, Any] = {
        "model": name,
        "reference": reference,
        "dtype": dtype_name,
        "warmup": warmup,
        "request": ", ".join(
            f"{k} {v}" for k, v in fields.items() if k in ("frames", "height", "width", "seconds", "steps")
        )
        + f", {dtype_name}",
    }
    if device == "cpu":
        torch.set_num_threads(1)  # as a CPU worker runs
    print(f"{name}: {reference} on {device}", file=sys.stderr)
    in_process(plan, device, resolve_dtype(dtype_name, device), results, args.repeats)
    if not args.skip_engine:
        through_engine(
            plan.request, dtype_name, "cpu:1" if device == "cpu" else device, results, args.engine_repeats
        )
    return results


def conditioning_image(work: Path) -> Path:
    from PIL import Image

    work.mkdir(parents=True, exist_ok=True)
    path = work / "conditioning.png"
    if not path.exists():
        Image.new("RGB", (1024, 576), (180, 90, 40)).save(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help=f"any of {', '.join(MODELS)}")
    parser.add_argument("--models-dir", type=Path, help="folders DIR/<name> (default: hub names, HF cache)")
    parser.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    parser.add_argument("--reduced", action="store_true", help="small sizes for a CPU check of the script")
    parser.add_argument("--steps", type=int, help="override the published step count (shorter runs)")
    parser.add_argument("--repeats", type=int, default=5, help="denoiser calls timed per figure")
    parser.add_argument("--engine-repeats", type=int, default=1, help="engine runs per sequential figure")
    parser.add_argument("--skip-engine", action="store_true", help="in-process figures only")
    parser.add_argument("--work", type=Path, default=Path("build/gpu_benchmarks"), help="scratch folder")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--markdown", type=Path, help="write the report here too")
    args = parser.parse_args()
    names = [n for n in args.models.split(",") if n]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s): {', '.join(unknown)}")

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()

    label = (
        "CPU-reduced run: checks the script, says nothing about GPU speed"
        if args.reduced or args.device == "cpu"
        else f"measured on {args.device}"
    )
    report = {"environment": environment(args.device), "label": label, "models": {}}
    lines = [
        "## GPU benchmarks",
        "",
        f"{label}.",
        "",
        "```",
        json.dumps(report["environment"], indent=1),
        "```",
        "",
    ]
    for name in names:
        results = run_model(name, args)
        report["models"][name] = results
        lines += markdown(name, results, label)
        if args.json:  # after every model: a later failure keeps what was measured
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=1, default=str))
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
