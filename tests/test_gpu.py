"""GPU checks: run with `./dev test -m gpu` on a machine with CUDA GPUs (NCCL between them)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.engine import Engine
from engine.protocol import GenerationRequest

pytestmark = pytest.mark.gpu

REQUEST = dict(model="tiny-cogvideox", prompt="a red circle", frames=9, height=64, width=96, steps=8, seed=1)


def gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.fixture(scope="module")
def engine():
    if gpus() == 0:
        pytest.fail("the gpu marker was selected on a machine without a CUDA GPU")
    with Engine(dtype="fp32") as engine:
        yield engine


def test_parastep_on_one_gpu_equals_sequential(engine):
    seq = engine.run(engine.plan(GenerationRequest(**REQUEST, devices="cuda:0")), previews=False)
    para = engine.run(
        engine.plan(GenerationRequest(**REQUEST, strategy="parastep", devices="cuda:0")), previews=False
    )
    assert np.array_equal(seq.latents, para.latents)


def test_parastep_across_gpus_matches_batchstep(engine):
    if gpus() < 2:
        pytest.skip("needs two GPUs for NCCL")
    options = {"warmup": 2}
    para = engine.run(
        engine.plan(
            GenerationRequest(**REQUEST, strategy="parastep", devices="cuda:0,1", strategy_options=options)
        ),
        previews=False,
    )
    batch = engine.run(
        engine.plan(
            GenerationRequest(**REQUEST, strategy="batchstep", devices="cuda:0", strategy_options=options)
        ),
        previews=False,
    )
    np.testing.assert_allclose(para.latents, batch.latents, rtol=1e-3, atol=1e-4)
    assert para.ranks[1]["bytes_sent"] > 0


# ---- Wan: a loop of separate guidance calls, and a transformer with a context-parallel plan ---------------
WAN = dict(model="tiny-wan", prompt="a red ball", frames=5, height=32, width=48, steps=8, seed=1)


def test_wan_parastep_on_one_gpu_equals_sequential(engine):
    seq = engine.run(engine.plan(GenerationRequest(**WAN, devices="cuda:0")), previews=False)
    para = engine.run(
        engine.plan(GenerationRequest(**WAN, strategy="parastep", devices="cuda:0")), previews=False
    )
    assert np.array_equal(seq.latents, para.latents)


def test_wan_context_parallel_across_gpus_matches_sequential(engine):
    """diffusers' own Ulysses attention over NCCL on the transformer's `_cp_plan` (refused on CPU)."""
    if gpus() < 2:
        pytest.skip("needs two GPUs")
    seq = engine.run(engine.plan(GenerationRequest(**WAN, devices="cuda:0")), previews=False)
    request = GenerationRequest(**WAN, strategy="context-parallel", devices="cuda:0,1")
    cp = engine.run(engine.plan(request), previews=False)
    np.testing.assert_allclose(cp.latents, seq.latents, rtol=1e-3, atol=1e-4)


# ---- the published model shapes (scripts/build_full_size_models.py), loaded as downloads ---------------

FULL_SIZE_CACHE_ENV = "PARASTEP_FULL_SIZE_CACHE"  # a HF cache holding the full-size builds (gpu_checks.sh)
PUBLISHED = {  # hub name -> (builder name, dtype, published request size)
    "THUDM/CogVideoX-2b": (
        "cogvideox-2b",
        "bf16",
        dict(prompt="a red panda", frames=49, height=480, width=720),
    ),
    "stabilityai/stable-video-diffusion-img2vid": ("svd", "fp16", dict(frames=14, height=576, width=1024)),
    "cvssp/audioldm2-large": ("audioldm2-large", "fp16", dict(prompt="a dog barking", seconds=10.0)),
}


@pytest.fixture(scope="module")
def conditioning_image(tmp_path_factory):
    from PIL import Image

    path = tmp_path_factory.mktemp("image") / "image.png"
    Image.new("RGB", (1024, 576), (200, 120, 40)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def reduced_hub(tmp_path_factory):
    """The --reduced builds in a HF cache layout: the full-size code path, small weights, made on the GPU."""
    from scripts import build_full_size_models

    if gpus() == 0:
        pytest.fail("the gpu marker was selected on a machine without a CUDA GPU")

    out = tmp_path_factory.mktemp("hub")
    names = [name for name, _, _ in PUBLISHED.values()]
    build_full_size_models.main(
        [*names, "--reduced", "--layout", "hf-cache", "--out", str(out), "--device", "cuda"]
    )
    return str(out)


def published_request(model: str, image: str, **changes) -> GenerationRequest:
    _, _, size = PUBLISHED[model]
    fields = {**size, "image": image if "svd" in model else None, "seed": 2, **changes}
    return GenerationRequest(model=model, **fields)


@pytest.mark.parametrize("model", list(PUBLISHED))
def test_published_shapes_parastep_equals_sequential_on_one_gpu(
    model, reduced_hub, conditioning_image, monkeypatch
):
    import dataclasses

    monkeypatch.setenv("HF_HUB_CACHE", reduced_hub)
    request = published_request(model, conditioning_image, steps=4, devices="cuda:0")
    with Engine(dtype=PUBLISHED[model][1]) as engine:
        plan = engine.plan(request)
        assert plan.entry.source == "hf-cache"
        seq = engine.run(plan, previews=False)
        para = engine.run(engine.plan(dataclasses.replace(request, strategy="parastep")), previews=False)
    assert np.isfinite(seq.latents).all()
    assert np.array_equal(seq.latents, para.latents)


@pytest.mark.parametrize("model", list(PUBLISHED))
def test_full_size_checkpoint_runs_through_the_catalog_on_gpu(model, conditioning_image, monkeypatch):
    import os

    cache = os.environ.get(FULL_SIZE_CACHE_ENV)
    if not cache:
        pytest.skip(
            f"set {FULL_SIZE_CACHE_ENV} to a HF cache with the full-size builds (scripts/gpu_checks.sh)"
        )
    monkeypatch.setenv("HF_HUB_CACHE", cache)
    with Engine(dtype=PUBLISHED[model][1]) as engine:
        plan = engine.plan(published_request(model, conditioning_image, steps=2, devices="cuda:0"))
        assert plan.entry.source == "hf-cache" and plan.entry.name == model
        result = engine.run(plan, previews=True)
    assert np.isfinite(result.latents).all()
    assert result.output.size > 0
