"""Full-size figures without a GPU: FLOPs and message sizes counted on the meta device, step times estimated.

    .venv/bin/python -m scripts.estimate_full_size [--models cogvideox-2b,svd,svd-xt,audioldm2-large]
        [--peak-tflops 989.4] [--efficiency 0.40] [--json FILE]
    .venv/bin/python -m scripts.estimate_full_size --models wan2.1-t2v-1.3b,wan2.1-t2v-14b,wan2.2-t2v-a14b,...

Wan (separate guidance calls, `WAN_RUNS`): one denoiser call is one guidance pass at batch 1, a step
makes two; the latent is float32, the prediction a step sends is both calls' outputs in the transformer
dtype, and ParaStep's round-end broadcast carries UniPC's latent-sized state too (counted by running
the published scheduler on a small latent); AsyncDiff and DistriFusion are refused for the family
(scripts/strategy_availability.py), so their sizes are not read. The VAE runs in float32 as the
published example loads it: its FLOPs are charged at half the rate (TF32 tensor cores, which cuDNN
uses for float32 convolutions by default, peak at half the bf16 rate).

Each full-size component is built from resources/configs on PyTorch's meta device (the real module tree,
no memory), and run once on meta tensors of the published shapes under `FlopCounterMode`: the FLOPs and the
kernel count of one denoiser call (CFG batch 2), of the VAE decode and of the encoders are exact for this
code; the sizes of the prediction, the latent, the AsyncDiff boundary and the DistriFusion keys/values are
read with the same hooks as scripts/gpu_benchmarks.py.

Times are ESTIMATES: FLOPs / (peak x efficiency), but at least kernels x launch cost (small models are
launch-bound). Defaults: H100 SXM dense bf16/fp16 peak 989.4 TFLOP/s, 40% efficiency (CogVideoX-2b's
published ~90 s for 50 steps on one A100 is 43% of the A100's 312 TFLOP/s by this FLOP count), 6 us per
kernel, 2 ms of scheduler/guidance per step. The projections (engine/projection.py) built on them are
labelled as such; scripts/gpu_benchmarks.py measures the real figures on a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from engine.projection import PUBLISHED_PARASTEP, StepProfile
from scripts.build_full_size_models import MODELS as BUILD_SPECS
from scripts.build_full_size_models import ModelSpec, component_config, model_index
from scripts.gpu_benchmarks import message_sizes, projection_table

LAUNCH_S = 6e-6  # per kernel, eager PyTorch on a recent GPU
LOOP_S = 2e-3  # scheduler step, guidance and Python per loop step


# Checkpoints of which only the transformer and the VAE are transcribed (resources/configs/SOURCES.md):
# estimated, never built. CogVideoX-5b's text encoder is CogVideoX-2b's T5-XXL (v1.1) encoder.
ESTIMATE_ONLY = {"cogvideox-5b": ModelSpec("THUDM/CogVideoX-5b", "bf16", {})}
BORROWED = {("cogvideox-5b", "text_encoder"): "cogvideox-2b"}


def spec_for(name: str) -> ModelSpec:
    return BUILD_SPECS[name] if name in BUILD_SPECS else ESTIMATE_ONLY[name]


def skeleton(name: str, component: str, dtype: Any) -> Any:
    """The full-size component on the meta device."""
    import torch

    spec = spec_for(BORROWED.get((name, component), name))
    config = component_config(spec, component, reduced=False)
    if (spec.configs / "model_index.json").is_file():
        library, class_name = model_index(spec)[component]
    else:  # transformer / VAE without a model_index: the class the config names
        library, class_name = "diffusers", config["_class_name"]
    with torch.device("meta"):
        if library == "transformers":
            import transformers

            cls = getattr(transformers, class_name)
            settings = {k: v for k, v in config.items() if k not in ("architectures", "torch_dtype")}
            model = cls(cls.config_class(**settings))
        else:
            import diffusers

            model = getattr(diffusers, class_name).from_config(config)
    # Legacy constructors (torch.Tensor([x]), e.g. SVD's AlphaBlender) ignore the default device: move them.
    return model.to(device="meta", dtype=dtype).eval()


def count(fn: Any) -> tuple[float, int, Any]:
    """(FLOPs, kernels, output) of fn() on meta tensors."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode

    class Kernels(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not func.is_view and "detach" not in str(func) and "empty" not in str(func):
                Kernels.count += 1
            return func(*args, **(kwargs or {}))

    import torch

    with torch.no_grad(), FlopCounterMode(display=False) as flops, Kernels():
        output = fn()
    return float(flops.get_total_flops()), Kernels.count, output


def meta(*shape: int, dtype: Any) -> Any:
    import torch

    return torch.empty(*shape, device="meta", dtype=dtype)


def denoiser_inputs(name: str, dtype: Any) -> tuple[dict[str, Any], int]:
    """The published CFG-batched denoiser call, and the loop latent's element count."""
    import torch

    if name.startswith(
        "cogvideox"
    ):  # 49 frames 480x720 -> 13 latent frames 60x90, 16 channels; T5 226 tokens
        return {
            "hidden_states": meta(2, 13, 16, 60, 90, dtype=dtype),
            "encoder_hidden_states": meta(2, 226, 4096, dtype=dtype),
            "timestep": torch.zeros(2, dtype=torch.long, device="meta"),
            "return_dict": False,
        }, 13 * 16 * 60 * 90
    if name in ("svd", "svd-xt"):  # 576x1024 -> 72x128; latents + image latents = 8 channels
        frames = 14 if name == "svd" else 25
        return {
            "sample": meta(2, frames, 8, 72, 128, dtype=dtype),
            "timestep": meta(2, dtype=dtype),
            "encoder_hidden_states": meta(2, 1, 1024, dtype=dtype),
            "added_time_ids": meta(2, 3, dtype=dtype),
            "return_dict": False,
        }, frames * 4 * 72 * 128
    if (
        name == "audioldm2-large"
    ):  # 10 s -> 1000 mel frames -> 250 x 16 latent; 8 GPT-2 vectors, ~16 T5 tokens
        return {
            "sample": meta(2, 8, 250, 16, dtype=dtype),
            "timestep": meta(2, dtype=dtype),
            "encoder_hidden_states": meta(2, 8, 768, dtype=dtype),
            "encoder_hidden_states_1": meta(2, 16, 1024, dtype=dtype),
            "encoder_attention_mask_1": torch.ones(2, 16, dtype=torch.long, device="meta"),
            "return_dict": False,
        }, 8 * 250 * 16
    raise KeyError(name)


def decode_call(name: str, dtype: Any) -> Any:
    """A function running the published decode on meta tensors."""
    if name.startswith("cogvideox"):
        vae = skeleton(name, "vae", dtype)
        return lambda: vae.decode(meta(1, 16, 13, 60, 90, dtype=dtype)).sample
    if name in ("svd", "svd-xt"):
        vae = skeleton(name, "vae", dtype)
        frames = 14 if name == "svd" else 25
        # decode_chunk_size 8, as the adapter decodes: chunks of 8 frames.
        chunks = [min(8, frames - s) for s in range(0, frames, 8)]
        return lambda: [vae.decode(meta(c, 4, 72, 128, dtype=dtype), num_frames=c).sample for c in chunks]
    if name == "audioldm2-large":
        vae = skeleton(name, "vae", dtype)
        vocoder = skeleton(name, "vocoder", dtype)
        return lambda: vocoder(vae.decode(meta(1, 8, 250, 16, dtype=dtype)).sample.squeeze(1))
    raise KeyError(name)


def encode_calls(name: str, dtype: Any) -> list[Any]:
    """The prompt/image encoders of one call (CFG: the prompt and the negative prompt where encoded)."""
    import torch

    def ids(batch: int, length: int) -> Any:
        return torch.zeros(batch, length, dtype=torch.long, device="meta")

    if name.startswith("cogvideox"):
        t5 = skeleton(name, "text_encoder", dtype)
        return [lambda: t5(input_ids=ids(2, 226))]
    if name in ("svd", "svd-xt"):
        clip = skeleton(name, "image_encoder", dtype)
        vae = skeleton(name, "vae", dtype)
        return [
            lambda: clip(meta(1, 3, 224, 224, dtype=dtype)),
            lambda: vae.encode(meta(1, 3, 576, 1024, dtype=dtype)),
        ]
    if name == "audioldm2-large":
        # transformers' text models read their masks with .item(), which meta tensors cannot answer:
        # counted as 2 x parameters x tokens instead (see encode_seconds).
        return []
    raise KeyError(name)


def analytic_encode(name: str, dtype: Any) -> list[tuple[float, int]]:
    """(FLOPs, kernels) of AudioLDM2's encoders as 2 x parameters x tokens: CLAP on 512 padded tokens and
    Flan-T5 on ~16, both for the prompt and the negative prompt, then GPT-2 generating 8 vectors after ~16
    (no KV cache: each of the 8 forwards sees the whole sequence). Kernels: ~15 per layer and forward."""
    parts = []
    for component, tokens, forwards, layers in (
        ("text_encoder", 512, 1, 12),
        ("text_encoder_2", 16, 1, 24),
        ("language_model", 20, 8, 12),
    ):
        model = skeleton(name, component, dtype)
        model = getattr(model, "text_model", model)  # CLAP: the text branch only
        parameters = sum(p.numel() for p in model.parameters())
        parts.append((2.0 * parameters * tokens * 2 * forwards, 15 * layers * forwards))
    return parts


def estimate(name: str, peak_tflops: float, efficiency: float) -> dict[str, Any]:
    import torch

    from engine.strategies.base import split_output

    dtype = torch.bfloat16 if spec_for(name).dtype == "bf16" else torch.float16
    rate = peak_tflops * 1e12 * efficiency

    def seconds(flops: float, kernels: int) -> float:
        return max(flops / rate, kernels * LAUNCH_S)

    denoiser = skeleton(name, "transformer" if name.startswith("cogvideox") else "unet", dtype)
    inputs, latent_numel = denoiser_inputs(name, dtype)
    flops, kernels, output = count(lambda: denoiser(**inputs))
    prediction = split_output(output)[0]
    sizes = message_sizes(denoiser, lambda: denoiser(**inputs))
    half = {
        k: (v[:1] if hasattr(v, "shape") and v.ndim and v.shape[0] == 2 else v) for k, v in inputs.items()
    }
    half_flops, half_kernels, _ = count(lambda: denoiser(**half))
    decode_flops, decode_kernels, _ = count(decode_call(name, dtype))
    encode = [count(call)[:2] for call in encode_calls(name, dtype)] or analytic_encode(name, dtype)
    parameters = sum(p.numel() for p in denoiser.parameters())
    return {
        "model": name,
        "dtype": str(dtype).replace("torch.", ""),
        "denoiser_parameters": parameters,
        "denoiser_tflop": flops / 1e12,
        "denoiser_kernels": kernels,
        "denoise_s": seconds(flops, kernels),
        "half_denoise_s": seconds(half_flops, half_kernels),
        "decode_tflop": decode_flops / 1e12,
        "decode_s": seconds(decode_flops, decode_kernels),
        "encode_s": sum(seconds(f, k) for f, k in encode),
        "prediction_bytes": prediction.numel() * prediction.element_size(),
        "latent_bytes": latent_numel * torch.finfo(dtype).bits // 8,
        **sizes,
    }


def profile(row: dict[str, Any], label: str) -> StepProfile:
    return StepProfile(
        model=row["model"],
        denoise_s=row["denoise_s"],
        half_denoise_s=row["half_denoise_s"],
        loop_s=LOOP_S,
        encode_s=row["encode_s"],
        decode_s=row["decode_s"],
        prediction_bytes=row["prediction_bytes"],
        latent_bytes=row["latent_bytes"],
        activation_bytes=row["activation_bytes"],
        kv_bytes=row["kv_bytes"],
        source=label,
    )


# --- Wan: separate guidance calls --------------------------------------------------------------------

# The published sampling of each checkpoint: size, frames and steps (guidance on: two calls per step).
WAN_RUNS = {
    # WanPipeline.__call__ defaults (diffusers 0.42.1): 81 frames, 480x832, 50 steps, guidance 5.0.
    "wan2.1-t2v-1.3b": {"frames": 81, "height": 480, "width": 832, "steps": 50},
    "wan2.1-t2v-14b": {"frames": 81, "height": 480, "width": 832, "steps": 50},
    # Wan2.2 wan/configs/wan_t2v_A14B.py: sample_steps 40, 720p (1280x720) as the WanPipeline docstring
    # example; 81 frames.
    "wan2.2-t2v-a14b": {"frames": 81, "height": 720, "width": 1280, "steps": 40},
    # Wan2.2 wan/configs/wan_ti2v_5B.py: 121 frames at 1280x704, 50 steps.
    "wan2.2-ti2v-5b": {"frames": 121, "height": 704, "width": 1280, "steps": 50},
}
WAN_REFUSED = ("asyncdiff", "distrifusion")  # no blocks/rows declared for the family (plan-time refusal)
TEXT_TOKENS = 512  # WanPipeline's max_sequence_length: prompts are padded to 512 tokens


def wan_latent_shape(name: str) -> tuple[int, ...]:
    spec = BUILD_SPECS[name]
    vae = component_config(spec, "vae", reduced=False)
    run = WAN_RUNS[name]
    spatial = vae.get("scale_factor_spatial", 8)
    temporal = vae.get("scale_factor_temporal", 4)
    frames = (run["frames"] - 1) // temporal + 1
    return (1, vae["z_dim"], frames, run["height"] // spatial, run["width"] // spatial)


def wan_solver_tensors(name: str) -> int:
    """Latent-sized tensors the published scheduler holds after two steps (what sync_solver broadcasts)."""
    import diffusers
    import torch

    from engine.strategies.parastep import solver_state

    spec = BUILD_SPECS[name]
    config = read_json(spec.configs / "scheduler" / "scheduler_config.json")
    scheduler = getattr(diffusers, config["_class_name"]).from_config(config)
    scheduler.set_timesteps(10)
    latent = torch.zeros(1, 4, 2, 4, 4)
    for t in scheduler.timesteps[:3]:
        latent = scheduler.step(torch.ones_like(latent), t, latent).prev_sample
    return len(solver_state(scheduler, latent))


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def wan_estimate(name: str, peak_tflops: float, efficiency: float) -> dict[str, Any]:
    import torch

    from engine.models.wan import WanAdapter
    from engine.strategies.base import split_output

    dtype = torch.bfloat16
    rate = peak_tflops * 1e12 * efficiency

    def seconds(flops: float, kernels: int, fp32: bool = False) -> float:
        return max(flops / (rate / 2 if fp32 else rate), kernels * LAUNCH_S)

    spec = BUILD_SPECS[name]
    index = model_index(spec)
    latent = wan_latent_shape(name)
    transformer = skeleton(name, "transformer", dtype)
    _, _, frames, height, width = latent
    patch = transformer.config.patch_size
    tokens = frames // patch[0] * (height // patch[1]) * (width // patch[2])
    if index.get("expand_timesteps"):  # TI2V: a timestep per latent token
        timestep = torch.zeros(1, tokens, device="meta")
    else:
        timestep = torch.zeros(1, device="meta")
    inputs = {
        "hidden_states": meta(*latent, dtype=dtype),
        "timestep": timestep,
        "encoder_hidden_states": meta(1, TEXT_TOKENS, transformer.config.text_dim, dtype=dtype),
        "return_dict": False,
    }
    flops, kernels, output = count(lambda: transformer(**inputs))
    call_bytes = split_output(output)[0].numel() * dtype.itemsize
    parameters = sum(p.numel() for p in transformer.parameters())
    experts = 2 if (index.get("transformer_2") or [None])[0] else 1

    vae = skeleton(name, "vae", torch.float32)
    decode_flops, decode_kernels, _ = count(lambda: vae.decode(meta(*latent, dtype=torch.float32)).sample)
    encoder = skeleton(name, "text_encoder", dtype)
    encoder_parameters = sum(p.numel() for p in encoder.parameters())
    try:  # the prompt and the negative prompt, each padded to 512 tokens
        ids = torch.zeros(1, TEXT_TOKENS, dtype=torch.long, device="meta")
        mask = torch.ones(1, TEXT_TOKENS, dtype=torch.long, device="meta")
        encode_flops, encode_kernels, _ = count(lambda: encoder(input_ids=ids, attention_mask=mask))
        encode_flops, encode_kernels, encode_how = 2 * encode_flops, 2 * encode_kernels, "counted"
    except Exception:  # a text model that reads its mask with .item(): 2 x parameters x tokens
        encode_flops = 2 * 2.0 * encoder_parameters * TEXT_TOKENS
        encode_kernels, encode_how = 2 * 15 * encoder.config.num_layers, "2 x parameters x tokens"
    run = WAN_RUNS[name]
    return {
        "model": name,
        "dtype": "bfloat16",
        "run": run,
        "latent_shape": list(latent),
        "tokens": tokens,
        "experts": experts,
        "denoiser_parameters": parameters,
        "call_tflop": flops / 1e12,
        "call_kernels": kernels,
        "call_s": seconds(flops, kernels),
        "denoise_s": 2 * seconds(flops, kernels),
        "half_denoise_s": seconds(flops, kernels),
        "decode_tflop": decode_flops / 1e12,
        "decode_s": seconds(decode_flops, decode_kernels, fp32=True),
        "encode_tflop": encode_flops / 1e12,
        "encode_how": encode_how,
        "encode_s": seconds(encode_flops, encode_kernels),
        "call_output_bytes": call_bytes,
        "prediction_bytes": 2 * call_bytes,
        "latent_bytes": math.prod(latent) * 4,
        "solver_tensors": wan_solver_tensors(name),
        "activation_bytes": 0,
        "kv_bytes": 0,
        "steps": run["steps"],
        "warmup": WanAdapter().default_warmup(run["steps"]),
    }


def wan_profile(row: dict[str, Any], label: str) -> StepProfile:
    return StepProfile(
        model=row["model"],
        denoise_s=row["denoise_s"],
        half_denoise_s=row["half_denoise_s"],
        loop_s=LOOP_S,
        encode_s=row["encode_s"],
        decode_s=row["decode_s"],
        prediction_bytes=row["prediction_bytes"],
        latent_bytes=row["latent_bytes"],
        activation_bytes=0,
        kv_bytes=0,
        source=label,
        guidance_calls=2,
        solver_tensors=row["solver_tensors"],
        refused=WAN_REFUSED,
    )


def mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:.1f} MiB"


def wan_bytes_per_step(row: dict[str, Any]) -> list[tuple[str, float]]:
    """All ranks' bytes sent per step, from the strategies' expected_traffic formulas (what the tests
    check the rank counters against), at the published steps and warm-up."""
    from engine.strategies import cfg_parallel, parastep

    steps, warmup = row["steps"], row["warmup"]
    synced = row["latent_bytes"] * (1 + row["solver_tensors"])
    out = []
    for n in (2, 4, 8):
        for label, broadcast in (("sync_solver 1", synced), ("sync_solver 0", row["latent_bytes"])):
            traffic = parastep.expected_traffic(steps, warmup, n, row["prediction_bytes"], broadcast)
            out.append((f"parastep N={n}, {label}", sum(r["bytes_sent"] for r in traffic) / steps))
    traffic = cfg_parallel.expected_traffic(steps, row["prediction_bytes"], separate_calls=True)
    out.append(("cfg-parallel N=2", sum(r["bytes_sent"] for r in traffic) / steps))
    return out


def wan_report(
    names: list[str], peak_tflops: float, efficiency: float, label: str
) -> tuple[list[dict[str, Any]], list[str]]:
    from engine.projection import LINKS, ideal_parastep_speedup, project

    rows = []
    lines = ["## Wan: separate guidance calls (estimates, no GPU)", "", label + ".", ""]
    lines += [
        "| model | run (frames, HxW, steps) | latent | tokens | params per expert | TFLOP per call "
        "| kernels | est. call | est. step (2 calls) | decode TFLOP (fp32) | est. decode | encode TFLOP "
        "| est. encode |",
        "|" + " --- |" * 13,
    ]
    for name in names:
        row = wan_estimate(name, peak_tflops, efficiency)
        rows.append(row)
        run = row["run"]
        lines.append(
            f"| {name}{' (2 experts)' if row['experts'] == 2 else ''} | {run['frames']}, "
            f"{run['height']}x{run['width']}, {run['steps']} | {'x'.join(map(str, row['latent_shape'][1:]))} "
            f"| {row['tokens']:,} | {row['denoiser_parameters'] / 1e9:.2f} B | {row['call_tflop']:.1f} "
            f"| {row['call_kernels']:,} | {row['call_s'] * 1e3:.0f} ms | {row['denoise_s'] * 1e3:.0f} ms "
            f"| {row['decode_tflop']:.1f} | {row['decode_s'] * 1e3:.0f} ms | {row['encode_tflop']:.1f} "
            f"({row['encode_how']}) | {row['encode_s'] * 1e3:.0f} ms |"
        )
    lines += ["", "### Message sizes", ""]
    lines += [
        "| model | one call's output | prediction (2 calls) | latent (fp32) | solver state | "
        "ParaStep broadcast, sync_solver 1 / 0 |",
        "|" + " --- |" * 6,
    ]
    for row in rows:
        synced = row["latent_bytes"] * (1 + row["solver_tensors"])
        lines.append(
            f"| {row['model']} | {mib(row['call_output_bytes'])} | {mib(row['prediction_bytes'])} | "
            f"{mib(row['latent_bytes'])} | {row['solver_tensors']} x {mib(row['latent_bytes'])} | "
            f"{mib(synced)} / {mib(row['latent_bytes'])} |"
        )
    lines += ["", "### Bytes per step, all ranks (expected_traffic formulas, published T and W)", ""]
    per_step = {row["model"]: wan_bytes_per_step(row) for row in rows}
    first = next(iter(per_step.values()))
    lines += ["| strategy | " + " | ".join(per_step) + " |", "|" + " --- |" * (len(per_step) + 1)]
    for index, (strategy, _) in enumerate(first):
        cells = [mib(values[index][1]) for values in per_step.values()]
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    for row in rows:
        steps, warmup = row["steps"], row["warmup"]
        ideals = ", ".join(f"N={n}: {ideal_parastep_speedup(steps, warmup, n):.2f}x" for n in (2, 4, 8))
        lines += ["", f"### {row['model']}: projection from the estimate (T={steps}, W={warmup})", ""]
        lines += [f"ParaStep call-count ideal: {ideals}.", ""]
        lines += projection_table(wan_profile(row, "estimate"), steps, warmup)
        assert {r.strategy for r in project(wan_profile(row, ""), steps, warmup, links=LINKS)}.isdisjoint(
            WAN_REFUSED
        )
    return rows, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cogvideox-2b,svd,svd-xt,audioldm2-large")
    parser.add_argument("--peak-tflops", type=float, default=989.4, help="dense bf16/fp16 peak (H100 SXM)")
    parser.add_argument("--efficiency", type=float, default=0.40, help="share of the peak reached")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()
    label = (
        f"ESTIMATE from FLOPs counted on the meta device: {args.efficiency:.0%} of "
        f"{args.peak_tflops} TFLOP/s, "
        f"at least {LAUNCH_S * 1e6:.0f} us per kernel"
    )
    rows, lines = [], ["## Full-size estimates (no GPU)", "", label + ".", ""]
    lines += [
        "| model | denoiser params | TFLOP per call (CFG 2) | kernels | est. call | est. half | "
        "decode TFLOP | "
        "est. decode | est. encode | prediction | latent | AsyncDiff cut | DistriFusion K+V |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    names = args.models.split(",")
    wan_names = [name for name in names if name in WAN_RUNS]
    names = [name for name in names if name not in WAN_RUNS]
    if not names:
        lines = []
    for name in names:
        try:
            row = estimate(name, args.peak_tflops, args.efficiency)
        except Exception as exc:  # one model that cannot run on meta tensors does not hide the others
            lines.append(f"| {name} | failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]} |")
            continue
        rows.append(row)
        sizes = [
            f"{row[key] / 2**20:.1f} MiB"
            for key in ("prediction_bytes", "latent_bytes", "activation_bytes", "kv_bytes")
        ]
        lines.append(
            f"| {name} | {row['denoiser_parameters'] / 1e9:.2f} B | {row['denoiser_tflop']:.1f} | "
            f"{row['denoiser_kernels']} | {row['denoise_s'] * 1e3:.1f} ms | "
            f"{row['half_denoise_s'] * 1e3:.1f} ms | {row['decode_tflop']:.1f} | "
            f"{row['decode_s'] * 1e3:.0f} ms | {row['encode_s'] * 1e3:.0f} ms | " + " | ".join(sizes) + " |"
        )
    lines.append("")
    for row in rows:
        paper = PUBLISHED_PARASTEP.get(row["model"].replace("svd-xt", "svd"))
        note = f"Published ParaStep end-to-end maximum: {paper['speedup']}x." if paper else ""
        if paper is None:  # CogVideoX-5b: no published ParaStep figure; CogVideoX-2b's T and W
            paper = PUBLISHED_PARASTEP["cogvideox-2b"]
            note = "No published ParaStep figure; T and W of CogVideoX-2b's."
        lines += [f"### {row['model']}: projection from the estimate", ""]
        lines += projection_table(profile(row, "estimate"), paper["steps"], paper["warmup"])
        lines += ["", note, ""]
    if wan_names:
        wan_rows, wan_lines = wan_report(wan_names, args.peak_tflops, args.efficiency, label)
        rows += wan_rows
        lines += wan_lines
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"label": label, "models": rows}, indent=1))


if __name__ == "__main__":
    main()
