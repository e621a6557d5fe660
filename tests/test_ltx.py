"""LTX-Video (LTXPipeline: one call per step on both CFG halves, latents packed into tokens) under
every strategy, on CPU workers, against the stock pipeline and the independent single-process
reference of tests/oracle.py (its "ltx" hooks).

The shipped `tiny-ltx` (LTX-Video 0.9.0 layout). Runs are grouped by devices so that each worker group
starts once. The decode is checked against the stock pipeline's own decode for the 0.9.0 decoder and
for 0.9.1's timestep-conditioned one (a VAE built here).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.catalog import read_entry
from engine.errors import UserError
from engine.models import adapter_for
from engine.models.base import to_uint8_frames
from engine.protocol import GenerationRequest
from engine.strategies import cfg_parallel
from engine.strategies.parastep import expected_traffic
from resources import EMBEDDED_MODELS_DIR
from tests import oracle
from tests.strategy_refusals import plan_refusals
from tests.test_strategies import assert_close, assert_distinct

pytestmark = pytest.mark.slow

MODEL = "tiny-ltx"
FOLDER = EMBEDDED_MODELS_DIR / MODEL
STEPS = 7  # W = 2: rounds (2,2),(4,2),(6,1) for N = 2 and (2,3),(5,2) for N = 3
WARMUP = 2
SEED = 7
EXACT = 1e-6  # ParaStep runs the reference's float32 operations; gloo moves tensors unchanged
# cfg-parallel and batchstep evaluate at another batch size (1 per half; 2 x 2 look-ahead entries):
# float32 sums may round differently in the last bits (one call of tiny-ltx at batch 2 vs its halves at
# batch 1: max difference 2.4e-7 on outputs up to 1.2).
BATCHED = 1e-5
PARAMS = dict(prompt="a red ball rolling", frames=9, height=64, width=96, fps=25, guidance_scale=3.0)

# name -> (strategy, devices, options); in this order, so that each worker group starts once.
RUNS = {
    "sequential": ("sequential", "cpu:1", {}),
    "parastep-1": ("parastep", "cpu:1", {"warmup": WARMUP}),
    "batchstep-2": ("batchstep", "cpu:1", {"warmup": WARMUP, "lookahead": 2}),
    "previews": ("sequential", "cpu:1", {}),  # with previews on: the events are kept
    "cache-fbc": ("cache-fbc", "cpu:1", {}),
    "cache-pab": ("cache-pab", "cpu:1", {}),
    "cache-taylorseer": ("cache-taylorseer", "cpu:1", {}),
    "parastep-2": ("parastep", "cpu:2", {"warmup": WARMUP}),
    "parastep-2-all-warmup": ("parastep", "cpu:2", {"warmup": STEPS}),
    "cfg-parallel": ("cfg-parallel", "cpu:2", {}),
    "cfg-parastep-2": ("cfg-parastep", "cpu:2", {"warmup": WARMUP}),
    "parastep-3": ("parastep", "cpu:3", {"warmup": WARMUP}),
}


def request(strategy: str, devices: str, options: dict, **overrides) -> GenerationRequest:
    return GenerationRequest(
        model=MODEL,
        **{**PARAMS, "steps": STEPS, **overrides},
        seed=SEED,
        strategy=strategy,
        devices=devices,
        strategy_options=options,
    )


@pytest.fixture(scope="module")
def runs(shared_engine):
    cache: dict = {}

    def get(name: str):
        if not cache:
            for run_name, (strategy, devices, options) in RUNS.items():
                plan = shared_engine.plan(request(strategy, devices, options))
                if run_name == "previews":
                    events: list = []
                    shared_engine.run(plan, events.append).discard_pending()
                    cache[run_name] = events
                    continue
                cache[run_name] = shared_engine.run(plan, previews=False)
        return cache[name]

    return get


@pytest.fixture(scope="module")
def pipe():
    return oracle.load_pipeline(FOLDER)


@pytest.fixture(scope="module")
def reference(pipe):
    rec = oracle.record("ltx", pipe, {**PARAMS, "seed": SEED, "steps": STEPS})
    return {
        "cfg": rec.cfg,
        "stock": rec.stock_latents.numpy(),
        "sequential": oracle.sequential(rec).numpy(),
        **{f"parastep-{n}": oracle.parastep(rec, n, WARMUP).numpy() for n in (1, 2, 3)},
    }


# ---- the adapter ---------------------------------------------------------------------------------------
def test_the_adapter_declares_the_loop_shape_and_checks_sizes():
    entry = read_entry(FOLDER, source="embedded")
    adapter = adapter_for(entry)
    assert entry.family == "ltx" and adapter.separate_guidance_calls is False
    assert not adapter.switches_denoiser(entry) and not adapter.per_token_timesteps(entry)
    assert adapter.factors(entry) == (32, 8)
    resolved = adapter.resolve(GenerationRequest(model=MODEL), entry)  # studio.json's defaults
    assert (resolved.frames, resolved.height, resolved.width, resolved.fps) == (9, 64, 96, 25)
    bad = {
        "frames": (10, r"8k\+1 .* not 10.*--frames 9 or 17"),
        "height": (48, "height 48 is not a positive multiple of 32.*height such as 32"),
        "width": (100, "width 100 is not a positive multiple of 32.*width such as 96"),
        "fps": (0, "fps 0 must be at least 1"),
    }
    for field, (value, message) in bad.items():
        with pytest.raises(UserError, match=message):
            adapter.resolve(GenerationRequest(model=MODEL, **{field: value}), entry)


def test_the_published_layout_resolves_to_the_pipelines_defaults():
    """Lightricks/LTX-Video's transcribed configs: 32x spatial, 8x temporal; 161 frames at 512 x 704."""
    from tests.conftest import REPO

    entry = read_entry(REPO / "resources" / "configs" / "Lightricks--LTX-Video")
    adapter = adapter_for(entry)
    assert entry.family == "ltx" and adapter.factors(entry) == (32, 8)
    resolved = adapter.resolve(GenerationRequest(model="x"), entry)
    assert (resolved.steps, resolved.guidance_scale) == (50, 3.0)
    assert (resolved.frames, resolved.height, resolved.width, resolved.fps) == (161, 512, 704, 25)
    assert adapter.default_warmup(50) == 12


def test_unpack_inverts_the_pipelines_packing():
    """Patch sizes other than the published 1 x 1 x 1 too: previews and decode unpack any of them."""
    from diffusers import LTXPipeline

    adapter = adapter_for(read_entry(FOLDER, source="embedded"))
    latents = torch.randn(1, 3, 4, 6, 8)
    for patch, patch_t in ((1, 1), (2, 1), (2, 2)):
        packed = LTXPipeline._pack_latents(latents, patch, patch_t)
        grid = (4 // patch_t, 6, 8, patch, patch_t)
        assert torch.equal(adapter.unpack(packed, grid), latents)
    adapter._grid, adapter._temporal = (4, 6, 8, 1, 1), 8
    packed = LTXPipeline._pack_latents(latents, 1, 1)
    images, frames = adapter.preview_images(packed)
    assert torch.equal(images, latents[0].transpose(0, 1)) and frames == [0, 8, 16, 24]
    assert torch.equal(adapter.unpack(adapter.preview_part(packed), adapter._grid), latents[:, :, :1])


@pytest.mark.parametrize("timestep_conditioning", [False, True])
def test_decode_is_the_pipelines_decode(pipe, timestep_conditioning):
    """0.9.0's decoder, and 0.9.1's timestep-conditioned one (decode noise from the job's generator)."""
    from resources.build_tiny_models import build_ltx_vae

    entry = read_entry(FOLDER, source="embedded")
    adapter = adapter_for(entry)
    original = pipe.vae
    if timestep_conditioning:
        pipe.vae = build_ltx_vae(original.config.latent_channels, timestep_conditioning=True)
    try:
        req = adapter.resolve(request("sequential", "cpu:1", {}, steps=3), entry)
        with oracle.single_thread(), torch.inference_mode():
            kwargs = adapter.pipeline_kwargs(pipe, req, torch.Generator("cpu").manual_seed(req.seed))
            latents = pipe(**kwargs).frames
            kwargs = adapter.pipeline_kwargs(pipe, req, torch.Generator("cpu").manual_seed(req.seed))
            stock = pipe(**{**kwargs, "output_type": "pt"}).frames[0]
            ours = adapter.decode(pipe, latents, req)
    finally:
        pipe.vae = original
    assert kwargs["decode_timestep"] == (0.05 if timestep_conditioning else 0.0)
    assert ours.shape == (9, 64, 96, 3)
    assert np.array_equal(ours, to_uint8_frames(stock))


def test_previews_come_from_the_x0_estimate(runs):
    """Flow-matching Euler reports no x0; the strategies' flow-matching estimate gives previews, one
    image per latent frame (the packed tokens unpacked), with the shipped preview map."""
    from engine.protocol import PreviewEvent

    previews = [e for e in runs("previews") if isinstance(e, PreviewEvent)]
    assert previews and previews[-1].step == STEPS - 1
    assert previews[-1].frame_indices == [0, 8] and len(previews[-1].images) == 2


# ---- the reference itself -----------------------------------------------------------------------------
def test_oracle_reproduces_the_stock_pipeline(reference):
    assert reference["cfg"]  # guidance 3: one call on both halves
    assert np.array_equal(reference["sequential"], reference["stock"])
    assert np.array_equal(reference["parastep-1"], reference["stock"])
    for n in (2, 3):
        assert_distinct(reference[f"parastep-{n}"], reference["stock"], EXACT, f"oracle N={n}")


# ---- the engine ---------------------------------------------------------------------------------------
def test_sequential_engine_matches_the_stock_pipeline(runs, reference):
    assert_close(runs("sequential").latents, reference["stock"], EXACT, "sequential")
    assert runs("sequential").ranks[0]["denoiser_calls"] == STEPS


def test_parastep_one_rank_and_all_warmup_are_sequential(runs):
    sequential = runs("sequential").latents
    assert np.array_equal(runs("parastep-1").latents, sequential)
    assert np.array_equal(runs("parastep-2-all-warmup").latents, sequential)


@pytest.mark.parametrize("ranks", [2, 3])
def test_parastep_matches_the_reference(ranks, runs, reference):
    latents = runs(f"parastep-{ranks}").latents
    assert_close(latents, reference[f"parastep-{ranks}"], EXACT, f"parastep N={ranks}")
    assert_distinct(latents, runs("sequential").latents, EXACT, f"parastep N={ranks}")


@pytest.mark.parametrize("ranks", [2, 3])
def test_parastep_traffic(ranks, runs):
    """One call a step on both halves: a prediction is twice the packed latent; the scheduler keeps
    no history, so the round-end broadcast is the latent alone."""
    result = runs(f"parastep-{ranks}")
    latent_bytes = math.prod(result.latents.shape) * np.dtype(np.float32).itemsize
    traffic = expected_traffic(STEPS, WARMUP, ranks, 2 * latent_bytes, latent_bytes)
    for rank, counters in enumerate(result.ranks):
        assert counters["bytes_sent"] == traffic[rank]["bytes_sent"]
        assert counters["bytes_received"] == traffic[rank]["bytes_received"]
    assert result.ranks[0]["denoiser_calls"] == WARMUP + len(oracle.rounds(STEPS, WARMUP, ranks))


def test_batchstep_matches_parastep(runs, reference):
    two = runs("batchstep-2").latents
    assert_close(two, runs("parastep-2").latents, BATCHED, "batchstep P=2 vs parastep N=2")
    assert_close(two, reference["parastep-2"], BATCHED, "batchstep P=2 vs reference N=2")
    assert_distinct(two, runs("sequential").latents, BATCHED, "batchstep P=2")


def test_cfg_parallel_splits_the_batch_and_equals_sequential(runs):
    result = runs("cfg-parallel")
    assert_close(result.latents, runs("sequential").latents, BATCHED, "cfg-parallel")
    assert [c["denoiser_calls"] for c in result.ranks] == [STEPS] * 2
    latent_bytes = math.prod(result.latents.shape) * np.dtype(np.float32).itemsize
    traffic = cfg_parallel.expected_traffic(STEPS, 2 * latent_bytes)
    assert [{k: c[k] for k in ("bytes_sent", "bytes_received")} for c in result.ranks] == traffic


def test_cfg_parastep_on_one_pair_is_cfg_parallel(runs):
    # One ParaStep rank per guidance half: the same half-batch calls as cfg-parallel, every step.
    assert np.array_equal(runs("cfg-parastep-2").latents, runs("cfg-parallel").latents)


@pytest.mark.parametrize("cache", ["cache-fbc", "cache-pab", "cache-taylorseer"])
def test_caches_run_on_the_batched_loop(cache, runs):
    result = runs(cache)
    assert result.latents.shape == runs("sequential").latents.shape and np.isfinite(result.latents).all()


def test_every_strategy_runs_or_is_refused_at_plan_time_with_its_reason(shared_engine, runs):
    runs("sequential")  # the runs above cover the strategies they name
    tried = {strategy for strategy, _, _ in RUNS.values()}
    refused = plan_refusals(
        lambda strategy, devices, options: shared_engine.plan(request(strategy, devices, options)),
        tried,
        WARMUP,
    )
    assert set(refused) == {
        "asyncdiff",
        "distrifusion",
        "pcpp",
        "cache-faster",
        "cache-mag",
        "context-parallel",
    }
    assert "this model's denoiser is LTXVideoTransformer3DModel" in refused["asyncdiff"]
    for name in ("distrifusion", "pcpp"):
        assert "which layers of the denoiser mix rows" in refused[name] and "not 'ltx'" in refused[name]
    assert "latent layout of LTXVideoTransformer3DModel" in refused["cache-faster"]
    assert "--calibrate 1" in refused["cache-mag"]
    assert "CPU workers cannot run it" in refused["context-parallel"]
