"""Stable Audio Open (batched CFG, an SDE multistep scheduler, 44.1 kHz stereo) under every strategy,
on CPU workers, against the stock pipeline and the independent single-process reference of
tests/oracle.py (its "stable-audio" hooks).

The shipped `tiny-stable-audio` (stable-audio-open-1.0 layout, random weights). Runs are grouped by
devices, so that each worker group starts once.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from engine.catalog import read_entry
from engine.errors import UserError
from engine.models import adapter_for
from engine.protocol import GenerationRequest, PreviewEvent
from engine.strategies import cfg_parallel
from engine.strategies.parastep import expected_traffic
from resources import EMBEDDED_MODELS_DIR
from tests import oracle
from tests.strategy_refusals import plan_refusals
from tests.test_strategies import assert_close, assert_distinct

pytestmark = pytest.mark.slow

MODEL = "tiny-stable-audio"
STEPS = 7  # W = 2: rounds (2,2),(4,2),(6,1) for N = 2 and (2,3),(5,2) for N = 3
WARMUP = 2
SEED = 99
EXACT = 1e-6  # ParaStep runs the reference's float32 operations; gloo moves tensors unchanged
# cfg-parallel evaluates each half at batch size 1 instead of 2; batchstep batches 2 slots of 2.
ROUNDING = 1e-5
PARAMS = dict(prompt="a dog barking", seconds=0.5, guidance_scale=7.0)
RATE = 44100

RUNS = {  # in device order: cpu:1, cpu:2, cpu:3
    "sequential": ("sequential", "cpu:1", {}),
    "parastep-1": ("parastep", "cpu:1", {"warmup": WARMUP}),
    "batchstep-2": ("batchstep", "cpu:1", {"warmup": WARMUP, "lookahead": 2}),
    "cache-pab": ("cache-pab", "cpu:1", {}),
    "cache-taylorseer": ("cache-taylorseer", "cpu:1", {}),
    "parastep-2": ("parastep", "cpu:2", {"warmup": WARMUP}),
    "parastep-2-all-warmup": ("parastep", "cpu:2", {"warmup": STEPS}),
    "cfg-parallel": ("cfg-parallel", "cpu:2", {}),
    "cfg-parastep-2": ("cfg-parastep", "cpu:2", {"warmup": WARMUP}),  # one rank per half: no rounds
    "parastep-3": ("parastep", "cpu:3", {"warmup": WARMUP}),
}


def request(strategy: str, devices: str, options: dict, **changes) -> GenerationRequest:
    fields = {**PARAMS, **changes}
    return GenerationRequest(
        model=MODEL,
        **fields,
        seed=SEED,
        steps=STEPS,
        strategy=strategy,
        devices=devices,
        strategy_options=options,
    )


@pytest.fixture(scope="module")
def runs(shared_engine):
    cache: dict[str, object] = {}
    previews: list[PreviewEvent] = []

    def collect(event: object) -> None:
        if isinstance(event, PreviewEvent):
            previews.append(event)

    def get(name: str):
        if not cache:
            for run_name, (strategy, devices, options) in RUNS.items():
                plan = shared_engine.plan(request(strategy, devices, options))
                with_previews = run_name == "sequential"
                cache[run_name] = shared_engine.run(
                    plan, collect if with_previews else None, previews=with_previews
                )
            cache["previews"] = previews
        return cache[name]

    return get


@pytest.fixture(scope="module")
def reference():
    pipe = oracle.load_pipeline(EMBEDDED_MODELS_DIR / MODEL)
    rec = oracle.record("stable-audio", pipe, {**PARAMS, "seed": SEED, "steps": STEPS})
    return {
        "stock": rec.stock_latents.numpy(),
        "sequential": oracle.sequential(rec).numpy(),
        **{f"parastep-{n}": oracle.parastep(rec, n, WARMUP).numpy() for n in (1, 2, 3)},
        "cfg": rec.cfg,
    }


def latent_bytes(result) -> int:
    return math.prod(result.latents.shape) * np.dtype(np.float32).itemsize


# ---- the SDE scheduler's noise ---------------------------------------------------------------------------
def test_the_noise_of_a_step_depends_on_the_seed_and_sigmas_only():
    """What ParaStep's ranks and the oracle rely on: every rank's scheduler (its own Brownian tree,
    queried at every step) and every copy (a fresh tree from the same seed) draw the same noise at a
    step, and the adapter's copy of a used scheduler steps exactly as the original."""
    from diffusers import CosineDPMSolverMultistepScheduler

    pipe_dir = EMBEDDED_MODELS_DIR / MODEL
    adapter = adapter_for(read_entry(pipe_dir))
    scheduler = CosineDPMSolverMultistepScheduler.from_pretrained(pipe_dir / "scheduler")
    scheduler.set_timesteps(STEPS)
    generator = torch.Generator("cpu").manual_seed(SEED)
    shape = (1, 8, 32)
    rng = torch.Generator("cpu").manual_seed(0)
    outputs = [torch.randn(shape, generator=rng) for _ in range(STEPS)]
    latent = torch.randn(shape, generator=rng)
    for i, t in enumerate(scheduler.timesteps):
        if i == WARMUP:  # a copy made mid-run, after the tree has been queried
            twin = adapter.copy_scheduler(scheduler)
            twin_latent = latent.clone()
        if i >= WARMUP:
            twin_latent = twin.step(outputs[i], t, twin_latent, generator=generator).prev_sample
        latent = scheduler.step(outputs[i], t, latent, generator=generator).prev_sample
        if i >= WARMUP:
            assert torch.equal(twin_latent, latent), f"step {i}"
    # The same noise from a tree that was never queried before the last steps.
    sigmas = scheduler.sigmas
    fresh = adapter.copy_scheduler(scheduler)
    fresh.noise_sampler = None
    used = scheduler.noise_sampler
    from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

    fresh_tree = BrownianTreeNoiseSampler(latent, 0.3, 500, seed=SEED)
    for i in reversed(range(STEPS)):
        assert torch.equal(fresh_tree(sigmas[i], sigmas[i + 1]), used(sigmas[i], sigmas[i + 1])), f"step {i}"


# ---- the reference itself ----------------------------------------------------------------------------------
def test_oracle_reproduces_the_stock_pipeline(reference):
    assert reference["cfg"]  # guidance 7: both halves in one batch
    assert np.array_equal(reference["sequential"], reference["stock"])
    assert np.array_equal(reference["parastep-1"], reference["stock"])
    for n in (2, 3):
        assert_distinct(reference[f"parastep-{n}"], reference["stock"], EXACT, f"oracle N={n}")


# ---- the engine --------------------------------------------------------------------------------------------
def test_sequential_engine_matches_the_stock_pipeline(runs, reference):
    assert_close(runs("sequential").latents, reference["stock"], EXACT, "sequential")


def test_parastep_one_rank_and_all_warmup_are_sequential(runs):
    sequential = runs("sequential").latents
    assert np.array_equal(runs("parastep-1").latents, sequential)
    assert np.array_equal(runs("parastep-2-all-warmup").latents, sequential)


@pytest.mark.parametrize("ranks", [2, 3])
def test_parastep_matches_the_reference(ranks, runs, reference):
    latents = runs(f"parastep-{ranks}").latents
    assert_close(latents, reference[f"parastep-{ranks}"], EXACT, f"parastep N={ranks}")
    assert_distinct(latents, runs("sequential").latents, EXACT, f"parastep N={ranks}")


def test_parastep_traffic(runs):
    """One call a step on both halves: a prediction is two latents; the round-end broadcast is the
    latent (each rank keeps its own DPM-Solver history; its Brownian tree is not sent: see the noise
    test)."""
    result = runs("parastep-2")
    size = latent_bytes(result)
    traffic = expected_traffic(STEPS, WARMUP, 2, 2 * size, size)
    for rank, counters in enumerate(result.ranks):
        assert counters["bytes_sent"] == traffic[rank]["bytes_sent"]
        assert counters["bytes_received"] == traffic[rank]["bytes_received"]
    assert result.ranks[0]["denoiser_calls"] == WARMUP + len(oracle.rounds(STEPS, WARMUP, 2))


def test_batchstep_matches_parastep(runs):
    two = runs("batchstep-2").latents
    assert_close(two, runs("parastep-2").latents, ROUNDING, "batchstep P=2 vs parastep N=2")
    assert_distinct(two, runs("sequential").latents, ROUNDING, "batchstep P=2")


def test_cfg_parallel_equals_sequential(runs):
    result = runs("cfg-parallel")
    assert_close(result.latents, runs("sequential").latents, ROUNDING, "cfg-parallel")
    assert [c["denoiser_calls"] for c in result.ranks] == [STEPS] * 2
    traffic = cfg_parallel.expected_traffic(STEPS, 2 * latent_bytes(result))
    assert [{k: c[k] for k in ("bytes_sent", "bytes_received")} for c in result.ranks] == traffic


def test_cfg_parastep_on_two_devices_is_cfg_parallel(runs):
    # One ParaStep rank per guidance half: every step is exact, split as cfg-parallel splits it.
    assert np.array_equal(runs("cfg-parastep-2").latents, runs("cfg-parallel").latents)


@pytest.mark.parametrize("name", ["cache-pab", "cache-taylorseer"])
def test_caches_that_plan_run(name, runs):
    result = runs(name)
    assert np.isfinite(result.latents).all() and result.latents.shape == runs("sequential").latents.shape


def test_every_strategy_runs_or_is_refused_at_plan_time_with_its_reason(shared_engine, runs):
    runs("sequential")  # the runs above cover the strategies that apply
    tried = {strategy for strategy, _, _ in RUNS.values()}
    refused = plan_refusals(
        lambda strategy, devices, options: shared_engine.plan(request(strategy, devices, options)),
        tried,
        WARMUP,
    )
    assert refused.keys() == REFUSED.keys(), refused
    for name, reason in REFUSED.items():
        assert reason in refused[name], (name, refused[name])


REFUSED = {  # strategy -> a phrase of the reason it gives at plan time
    "asyncdiff": "this model's denoiser is StableAudioDiTModel",
    "distrifusion": "declare them, not 'stable-audio'",
    "pcpp": "declare them, not 'stable-audio'",
    "cache-fbc": "FirstBlockCache finds nothing to cache in StableAudioDiTModel",
    "cache-mag": "MagCache finds nothing to cache in StableAudioDiTModel",
    "cache-faster": "model families declare them for CogVideoXTransformer3DModel only",
    "context-parallel": "no context-parallel plan (_cp_plan) for StableAudioDiTModel",
}


# ---- the output: 44.1 kHz stereo ------------------------------------------------------------------------
def test_the_clip_is_stereo_at_44100_hz(shared_engine, runs, tmp_path):
    import soundfile as sf

    result = runs("sequential")
    samples = int(PARAMS["seconds"] * RATE)
    assert result.output.dtype == np.float32 and result.output.shape == (samples, 2)
    assert result.rate == RATE
    assert np.abs(result.output).max() > 0  # the random VAE makes noise, not silence
    saved = shared_engine.save(result, tmp_path / "clip.wav")
    info = sf.info(saved["output"])
    assert (info.channels, info.samplerate, info.frames) == (2, RATE, samples)


def test_previews_show_the_data_prediction(runs):
    previews = runs("previews")
    assert previews and previews[-1].step == STEPS - 1
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(previews[-1].images[0]))
    assert image.mode == "RGB" and image.width >= 32  # one strip over the latent's 32 frames


# ---- the request -------------------------------------------------------------------------------------------
def test_seconds_are_bounded_by_the_latent_span():
    entry = read_entry(EMBEDDED_MODELS_DIR / MODEL)
    adapter = adapter_for(entry)
    longest = 32 * 2048 / RATE  # sample_size latent frames of 2048 samples
    assert adapter.lengths(entry)[1] == pytest.approx(longest)
    resolved = adapter.resolve(GenerationRequest(model=MODEL, prompt="x", seed=0), entry)
    assert (resolved.steps, resolved.seconds, resolved.guidance_scale) == (20, 1.0, 7.0)
    for bad in (0.0, 1.5, -1.0):
        with pytest.raises(UserError, match="out of range") as info:
            adapter.resolve(GenerationRequest(model=MODEL, prompt="x", seed=0, seconds=bad), entry)
        assert "--seconds above 0 and at most 1.48" in info.value.fix
    adapter.resolve(GenerationRequest(model=MODEL, prompt="x", seed=0, seconds=longest), entry)


def test_published_defaults_fit_the_published_config():
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "resources/configs/stabilityai--stable-audio-open-1.0"
    entry = read_entry(folder)
    adapter = adapter_for(entry)
    assert entry.family == "stable-audio" and not adapter.separate_guidance_calls
    assert adapter.lengths(entry)[1] == pytest.approx(1024 * 2048 / RATE)  # 47.55 s
    resolved = adapter.resolve(GenerationRequest(model=str(folder), prompt="x", seed=0), entry)
    assert (resolved.steps, resolved.seconds, resolved.guidance_scale) == (100, 10.0, 7.0)
    assert adapter.default_warmup(resolved.steps) == 10


def test_a_missing_torchsde_is_refused_at_plan_time(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *rest: None if name == "torchsde" else find_spec(name, *rest),
    )
    entry = read_entry(EMBEDDED_MODELS_DIR / MODEL)
    with pytest.raises(UserError, match="needs torchsde") as info:
        adapter_for(entry).resolve(GenerationRequest(model=MODEL, prompt="x", seed=0), entry)
    assert "pip install torchsde" in info.value.fix
