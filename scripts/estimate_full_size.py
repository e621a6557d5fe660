"""Full-size figures without a GPU: FLOPs and message sizes counted on the meta device, step times estimated.

    .venv/bin/python scripts/estimate_full_size.py [--models cogvideox-2b,svd,svd-xt,audioldm2-large]
        [--peak-tflops 989.4] [--efficiency 0.40] [--json FILE]

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
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from build_full_size_models import MODELS as BUILD_SPECS  # noqa: E402
from build_full_size_models import component_config, model_index  # noqa: E402
from gpu_benchmarks import message_sizes, projection_table  # noqa: E402

from engine.projection import PUBLISHED_PARASTEP, StepProfile  # noqa: E402

LAUNCH_S = 6e-6  # per kernel, eager PyTorch on a recent GPU
LOOP_S = 2e-3  # scheduler step, guidance and Python per loop step


def skeleton(name: str, component: str, dtype: Any) -> Any:
    """The full-size component on the meta device."""
    import torch

    spec = BUILD_SPECS[name]
    library, class_name = model_index(spec)[component]
    config = component_config(spec, component, reduced=False)
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

    if name == "cogvideox-2b":  # 49 frames 480x720 -> 13 latent frames 60x90, 16 channels; T5 226 tokens
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
    if name == "cogvideox-2b":
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

    if name == "cogvideox-2b":
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

    dtype = torch.bfloat16 if BUILD_SPECS[name].dtype == "bf16" else torch.float16
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
    for name in args.models.split(","):
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
        paper = PUBLISHED_PARASTEP[row["model"].replace("svd-xt", "svd")]
        lines += [f"### {row['model']}: projection from the estimate", ""]
        lines += projection_table(profile(row, "estimate"), paper["steps"], paper["warmup"])
        lines += ["", f"Published ParaStep end-to-end maximum: {paper['speedup']}x.", ""]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"label": label, "models": rows}, indent=1))


if __name__ == "__main__":
    main()
