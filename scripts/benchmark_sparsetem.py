"""SparseTem (engine/sparsetem.py) against the dense decode: time, active fraction, PSNR / SSIM.

    nice -n 5 python -m scripts.benchmark_sparsetem [--runs 5] [--threads 1] [--json FILE] [--quick]

(a) `shapes` clips generated with the engine's loader and the CogVideoX adapter's pipeline arguments
    (the worker's calls up to the latents), decoded by the shapes VAE at 32 x 32;
(b) procedural clips from resources/shapes_data.render, encoded and decoded by the shapes VAE at
    larger sizes (mostly static backgrounds, one moving shape);
(c) the tiny families' decoders at reduced resolution on static latents with one moving patch
    (time and active fraction only: their weights are random, so PSNR means nothing there).

Times are medians over `--runs` interleaved dense / sparse decodes in one process; the speed-up is the
ratio of the two medians. Fidelity is sparse against dense (not against the input clip).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.metrics import json_safe, video_psnr, video_ssim
from engine.sparsetem import SparseTemConfig, sparse_decoder
from resources import shapes_data as data

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "resources" / "models"


def to_frames(video: torch.Tensor) -> np.ndarray:
    """Decoder output [1, C, F, H, W] in [-1, 1] as [F, H, W, C] floats in [0, 1]."""
    return ((video[0].permute(1, 2, 3, 0).clamp(-1, 1) + 1) / 2).float().numpy()


def timed_pair(dense: Callable[[], Any], sparse: Callable[[], Any], runs: int) -> tuple[float, float]:
    """Medians (s) of interleaved dense and sparse calls, after one warm-up each."""
    dense(), sparse()
    td, ts = [], []
    for _ in range(runs):
        t0 = time.perf_counter()
        dense()
        td.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        sparse()
        ts.append(time.perf_counter() - t0)
    return statistics.median(td), statistics.median(ts)


def measure(
    vae: Any, z: torch.Tensor, cfg: SparseTemConfig, runs: int, fidelity: bool = True, **decode_kw: Any
) -> dict[str, Any]:
    """One configuration: times, speed-up, active fractions, PSNR / SSIM against dense."""
    decode = lambda: vae.decode(z, **decode_kw).sample  # noqa: E731
    ref = decode()
    st = sparse_decoder(vae, cfg)

    def sparse() -> torch.Tensor:
        st.reset()  # each decode is a clip of its own: references and frozen statistics from scratch
        return decode()

    with st:
        out = sparse()
        summary = st.summary()  # the first decode's fractions (adaptive thresholds move later)
        t_dense, t_sparse = timed_pair(decode, sparse, runs)
    row: dict[str, Any] = {
        "config": {k: v for k, v in vars(cfg).items() if k not in ("band", "step", "min_threshold")},
        "dense_s": t_dense,
        "sparse_s": t_sparse,
        "speedup": t_dense / t_sparse,
        "active_fraction": summary["active_fraction"],
        "layers": {n: round(v["active_fraction"], 3) for n, v in summary["layers"].items()},
        "dense_fallbacks": sum(v["dense_fallbacks"] for v in summary["layers"].values()),
        "max_abs_err": (out - ref).abs().max().item(),
    }
    if fidelity:
        row["psnr"] = video_psnr(to_frames(out), to_frames(ref))
        row["ssim"] = video_ssim(to_frames(out), to_frames(ref))
    return row


def configs(quick: bool, best: bool = False) -> list[SparseTemConfig]:
    if best:  # the best points of the full sweep, for a rerun with more runs
        return [
            SparseTemConfig(threshold=0.0, dense_above=0.0),
            SparseTemConfig(threshold=0.3, reference="session"),
            SparseTemConfig(threshold=1.0, reference="session", tile=4),
        ]
    # dense_above=0: every layer runs its dense fall-back, i.e. the same convs with the time taps folded
    # into channels (conv2d) but no skipping: separates the fold's gain from the sparsity's
    out = [
        SparseTemConfig(threshold=0.0, dense_above=0.0),
        SparseTemConfig(threshold=0.0, reference="session"),
    ]
    thresholds = (0.1, 1.0) if quick else (0.03, 0.1, 0.3, 1.0, 3.0)
    for thr in thresholds:
        for gn in ("dense", "frozen"):
            out.append(SparseTemConfig(threshold=thr, reference="session", groupnorm=gn))
    out.append(SparseTemConfig(threshold=0.1, reference="call"))
    if not quick:
        out += [SparseTemConfig(threshold=1.0, reference="session", tile=t) for t in (4, 16)]
        out += [SparseTemConfig(threshold=1.0, reference="session", dense_above=d) for d in (0.4, 1.0)]
    out.append(SparseTemConfig(threshold=0.1, reference="session", adapt=True, max_threshold=3.0))
    return out


def shapes_vae() -> Any:
    from diffusers import AutoencoderKLCogVideoX

    return AutoencoderKLCogVideoX.from_pretrained(str(MODELS / "shapes" / "vae")).eval()


def engine_latents(prompts: list[str], seed: int) -> list[torch.Tensor]:
    """Latents of `shapes` clips: the engine's loader and the adapter's arguments (what a worker runs)."""
    from engine.catalog import read_entry
    from engine.loading import load_pipeline
    from engine.models import adapter_for
    from engine.protocol import GenerationRequest

    entry = read_entry(MODELS / "shapes")
    pipe = load_pipeline(entry, "cpu", torch.float32)
    adapter = adapter_for(entry)
    out = []
    for prompt in prompts:
        request = GenerationRequest(
            model="shapes",
            prompt=prompt,
            seed=seed,
            steps=20,
            guidance_scale=6.0,
            frames=9,
            height=32,
            width=32,
        )
        kwargs = adapter.pipeline_kwargs(pipe, request, torch.Generator().manual_seed(seed))
        latents = pipe(**kwargs).frames  # [B, F, C, H, W]
        # what pipe.decode_latents feeds the VAE
        out.append(latents.permute(0, 2, 1, 3, 4) / pipe.vae.config.scaling_factor)
    return out


def procedural_latents(vae: Any, size: int, frames: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    spec = data.random_spec(rng)
    clip = data.render(spec, rng, size=size, frames=frames)  # [F, H, W, 3] in [0, 1]
    x = torch.from_numpy(clip).permute(3, 0, 1, 2)[None] * 2 - 1
    return vae.encode(x).latent_dist.mode()


def tiny_cases(size: int) -> list[tuple[str, Any, torch.Tensor, dict[str, Any]]]:
    from diffusers import (
        AutoencoderKLCogVideoX,
        AutoencoderKLLTXVideo,
        AutoencoderKLTemporalDecoder,
        AutoencoderKLWan,
    )

    cases = []
    g = torch.Generator().manual_seed(0)
    for name, cls in (
        ("tiny-cogvideox", AutoencoderKLCogVideoX),
        ("tiny-svd", AutoencoderKLTemporalDecoder),
        ("tiny-wan", AutoencoderKLWan),
        ("tiny-ltx", AutoencoderKLLTXVideo),
    ):
        vae = cls.from_pretrained(str(MODELS / name / "vae")).eval()
        c = vae.config.get("latent_channels") or vae.config.z_dim
        frames, p = 5, max(size // 4, 1)
        if cls is AutoencoderKLTemporalDecoder:
            z = torch.randn(1, c, size, size, generator=g).repeat(frames, 1, 1, 1)
            z[1:, :, :p, :p] += torch.randn(frames - 1, c, p, p, generator=g)
            cases.append((name, vae, z, {"num_frames": frames}))
        else:
            z = torch.randn(1, c, 1, size, size, generator=g).repeat(1, 1, frames, 1, 1)
            z[:, :, 1:, :p, :p] += torch.randn(1, c, frames - 1, p, p, generator=g)
            cases.append((name, vae, z, {}))
    return cases


def fmt(row: dict[str, Any]) -> str:
    c = row["config"]
    label = (
        f"thr={c['threshold']:<5} ref={c['reference']:<7} gn={c['groupnorm']:<6} tile={c['tile']:<2}"
        f" dense>{c['dense_above']}{' adapt' if c['adapt'] else ''}"
    )
    fid = f" psnr={row['psnr']:6.2f} ssim={row['ssim']:.4f}" if "psnr" in row else ""
    return (
        f"  {label:<62} dense={row['dense_s'] * 1e3:8.1f}ms sparse={row['sparse_s'] * 1e3:8.1f}ms"
        f" x{row['speedup']:.2f} active={row['active_fraction']:.3f}{fid}"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--frames", type=int, default=9)
    parser.add_argument("--quick", action="store_true", help="fewer configurations and clips")
    parser.add_argument("--best", action="store_true", help="only the best points of the full sweep")
    parser.add_argument("--only", choices=["shapes", "procedural", "tiny"], nargs="+")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    only = set(args.only or ["shapes", "procedural", "tiny"])
    results: dict[str, Any] = {"threads": args.threads, "runs": args.runs, "torch": torch.__version__}
    torch.manual_seed(0)
    with torch.inference_mode():
        vae = shapes_vae()
        if "shapes" in only:
            prompts = [
                "a red circle moving right on a white background",
                "a blue rectangle growing on a black background",
                "a yellow triangle moving down on a gray background",
            ][: 1 if args.quick else 3]
            results["shapes"] = {}
            for prompt, z in zip(prompts, engine_latents(prompts, seed=0), strict=True):
                print(f"(a) shapes, engine latents {list(z.shape)}: {prompt}")
                rows = [measure(vae, z, cfg, args.runs) for cfg in configs(args.quick, args.best)]
                for row in rows:
                    print(fmt(row))
                results["shapes"][prompt] = rows
        if "procedural" in only:
            results["procedural"] = {}
            for size in args.sizes:
                z = procedural_latents(vae, size, args.frames, seed=size)
                print(f"(b) procedural clip {size}x{size}x{args.frames}, latents {list(z.shape)}")
                rows = [measure(vae, z, cfg, args.runs) for cfg in configs(args.quick, args.best)]
                for row in rows:
                    print(fmt(row))
                results["procedural"][size] = rows
        if "tiny" in only:
            results["tiny"] = {}
            for name, tvae, z, kw in tiny_cases(16):
                print(f"(c) {name} decoder, latents {list(z.shape)} (time only)")
                rows = [
                    measure(
                        tvae, z, SparseTemConfig(threshold=thr, reference="session"), args.runs, False, **kw
                    )
                    for thr in (0.0, 0.1)
                ]
                for row in rows:
                    print(fmt(row))
                results["tiny"][name] = rows
    if args.json:
        args.json.write_text(json.dumps(json_safe(results), indent=1))


if __name__ == "__main__":
    main()
