"""diffusers' single-device caches as strategies (engine/strategies/caches.py), end to end on CPU.

Each cache runs on each family it supports through the engine: it must stay within a loose bound
of sequential (relative L2 of the final latents) while actually reusing something, equal
sequential bit for bit with its "never reuse" setting, count only full computations as denoiser
calls, and leave the warm pipeline clean (a sequential run afterwards equals the first one).
The rest are refused at plan time with the reason. Runs are grouped per family so that each
worker group starts once.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engine.errors import JobCancelled, UserError
from engine.protocol import GenerationRequest, StepEvent
from engine.strategies.base import JobContext
from engine.strategies.caches import CACHE_STRATEGIES, REGISTRY_ATTR, ratios_file_for
from engine.strategies.denoiser_info import denoiser_skeleton
from resources import EMBEDDED_MODELS_DIR

pytestmark = pytest.mark.slow

STEPS = 8
SEED = 99
CANCEL_AT = 0  # the cancelled run asks to stop after this step (the rest is margin)
# Relative L2 distance from sequential allowed for a cache that reuses: loose, the caches are
# approximate by design. Observed on the random-weight tiny models: <= 0.014 (see the report).
BOUND = 0.1

REQUESTS = {
    "cogvideox": dict(model="tiny-cogvideox", prompt="a red circle", frames=9, height=64, width=96, fps=8),
    "svd": dict(model="tiny-svd", frames=4, height=64, width=96, fps=7),
    "audioldm2": dict(model="tiny-audioldm2", prompt="a dog barking", seconds=1.0),
}
GUIDANCE = {"cogvideox": 6.0, "svd": 3.0, "audioldm2": 3.5}
FAMILIES = list(REQUESTS)

# cache -> (options that reuse within STEPS on the tiny models, options that never reuse)
SETTINGS = {
    "cache-fbc": ({"threshold": 300}, {"threshold": 0}),
    "cache-pab": ({}, {"skip": 1, "cross_skip": 1}),
    "cache-faster": ({}, {"skip": 1, "uncond_skip": 1}),
    "cache-taylorseer": ({"interval": 2, "start": 2}, {"interval": 1}),
    "cache-mag": ({}, {"threshold": 0}),
}
SUPPORTED = {
    "cogvideox": list(SETTINGS),
    "svd": ["cache-pab", "cache-taylorseer"],
    "audioldm2": ["cache-pab", "cache-taylorseer"],
}
SUPPORTED_PAIRS = [(f, c) for f in FAMILIES for c in SUPPORTED[f]]
REFUSED_PAIRS = [(f, c) for f in FAMILIES for c in SETTINGS if c not in SUPPORTED[f]]


def request(family: str, strategy: str, options: dict, image: str) -> GenerationRequest:
    extra = {"image": image} if family == "svd" else {}
    return GenerationRequest(
        **REQUESTS[family],
        **extra,
        guidance_scale=GUIDANCE[family],
        seed=SEED,
        steps=STEPS,
        strategy=strategy,
        devices="cpu:1",
        strategy_options=options,
    )


def runs_for(family: str) -> list[tuple[str, str, dict]]:
    """(run name, strategy, options), in the order they run on one warm worker."""
    runs = [("sequential", "sequential", {})]
    for cache in SUPPORTED[family]:
        reuse, never = SETTINGS[cache]
        if cache == "cache-mag":  # refused until calibrated; the calibration run is the stock loop
            runs += [("cache-mag uncalibrated", cache, {}), ("cache-mag calibrate", cache, {"calibrate": 1})]
        runs += [(cache, cache, reuse), (f"{cache} never", cache, never)]
    if family == "cogvideox":  # cancelled mid-run: the hooks must still go
        runs.append(("cache-pab cancelled", "cache-pab", {}))
    return runs + [("sequential after", "sequential", {})]


@pytest.fixture(scope="module")
def cache_runs(shared_engine, conditioning_image):
    done: dict[str, dict] = {}

    def get(family: str, name: str):
        if family not in done:
            done[family] = {}
            for run_name, strategy, options in runs_for(family):
                events: list = []
                cancels = run_name.endswith("cancelled")

                def sink(event, cancels=cancels, events=events):
                    events.append(event)
                    if cancels and isinstance(event, StepEvent) and event.step == CANCEL_AT:
                        shared_engine.cancel()

                try:  # an uncalibrated MagCache is refused at plan time
                    plan = shared_engine.plan(request(family, strategy, options, conditioning_image))
                    result = shared_engine.run(plan, sink, previews=False)
                    steps = [e for e in events if isinstance(e, StepEvent)]
                    done[family][run_name] = SimpleNamespace(result=result, steps=steps)
                except Exception as error:  # kept, raised by the tests that use this run
                    error.steps = [e.step for e in events if isinstance(e, StepEvent)]
                    done[family][run_name] = error
        run = done[family][name]
        if isinstance(run, Exception):
            raise run
        return run

    return get


def relative_l2(actual: np.ndarray, reference: np.ndarray) -> float:
    diff = actual.astype(np.float64) - reference.astype(np.float64)
    return float(np.linalg.norm(diff) / np.linalg.norm(reference.astype(np.float64)))


@pytest.mark.parametrize(("family", "cache"), SUPPORTED_PAIRS)
def test_cache_reuses_and_stays_near_sequential(family, cache, cache_runs):
    run = cache_runs(family, cache)
    sequential = cache_runs(family, "sequential").result.latents
    latents = run.result.latents
    assert np.isfinite(latents).all()
    distance = relative_l2(latents, sequential)
    assert 0 < distance <= BOUND, f"{family} {cache}: relative L2 {distance:.3g}"
    # Counters: only full computations are denoiser calls; the other steps report "reuse".
    calls = run.result.ranks[0]["denoiser_calls"]
    actions = [e.action for e in run.steps]
    assert len(actions) == STEPS
    assert 0 < calls < STEPS
    assert actions.count("compute") == calls and actions.count("reuse") == STEPS - calls


@pytest.mark.parametrize(("family", "cache"), SUPPORTED_PAIRS)
def test_cache_that_never_reuses_is_sequential(family, cache, cache_runs):
    run = cache_runs(family, f"{cache} never")
    assert np.array_equal(run.result.latents, cache_runs(family, "sequential").result.latents)
    assert run.result.ranks[0]["denoiser_calls"] == STEPS
    assert [e.action for e in run.steps] == ["compute"] * STEPS


@pytest.mark.parametrize("family", FAMILIES)
def test_warm_pipeline_is_clean_after_the_caches(family, cache_runs):
    after = cache_runs(family, "sequential after").result.latents
    assert np.array_equal(after, cache_runs(family, "sequential").result.latents)


def test_magcache_refuses_until_calibrated_and_calibration_is_the_stock_loop(cache_runs):
    with pytest.raises(UserError, match="--calibrate 1"):
        cache_runs("cogvideox", "cache-mag uncalibrated")
    calibration = cache_runs("cogvideox", "cache-mag calibrate").result
    assert np.array_equal(calibration.latents, cache_runs("cogvideox", "sequential").result.latents)


def test_a_cancelled_cache_run_stops_at_a_step_and_leaves_the_pipeline_clean(cache_runs):
    with pytest.raises(JobCancelled) as cancelled:
        cache_runs("cogvideox", "cache-pab cancelled")
    assert max(cancelled.value.steps) < STEPS - 1
    after = cache_runs("cogvideox", "sequential after").result.latents
    assert np.array_equal(after, cache_runs("cogvideox", "sequential").result.latents)


@pytest.mark.parametrize(("family", "cache"), REFUSED_PAIRS)
def test_unsupported_caches_are_refused_at_plan_time(family, cache, shared_engine, conditioning_image):
    with pytest.raises(UserError) as refused:
        shared_engine.plan(request(family, cache, {}, conditioning_image))
    message = str(refused.value)
    assert f"'{cache}' cannot run" in message
    assert ("UNet" in message) or ("CogVideoX" in message), message


@pytest.mark.parametrize("cls", CACHE_STRATEGIES, ids=lambda cls: cls.name)
def test_uninstall_removes_exactly_the_hooks_install_added(cls):
    """On an empty (meta) CogVideoX transformer: hooks and registries as before, forwards unwrapped."""
    denoiser = denoiser_skeleton(EMBEDDED_MODELS_DIR / "tiny-cogvideox")

    def snapshot() -> dict[str, tuple[list[str], object]]:
        return {
            name: (list(getattr(m, REGISTRY_ATTR)._hook_order), m.forward)
            for name, m in denoiser.named_modules()
            if hasattr(m, REGISTRY_ATTR)
        }

    before = snapshot()
    scheduler = SimpleNamespace(step=lambda *args, **kwargs: None)
    pipe = SimpleNamespace(transformer=denoiser, scheduler=scheduler)
    options = {o.name: o.default for o in cls.options} | cls.probe_options
    ctx = JobContext(rank=0, world_size=1, device=torch.device("cpu"), total_steps=STEPS, options=options)
    strategy = cls(ctx)
    strategy.install(pipe)
    assert sum(len(hooks) for hooks, _ in snapshot().values()) > 1  # the cache's hooks and the strategy's
    strategy.uninstall()
    after = snapshot()
    assert {name: hooks for name, (hooks, _) in after.items() if hooks} == {}
    assert set(after) <= set(before) | {""}  # the strategy's own (now empty) registry on the denoiser
    for name, module in denoiser.named_modules():  # diffusers leaves the plain bound method behind
        forward = vars(module).get("forward")
        assert forward is None or getattr(forward, "__func__", None) is type(module).forward, name


def test_magcache_calibration_belongs_to_the_weights_not_only_the_folder(tmp_path):
    """Weights retrained in the same folder (as the embedded models are) need a calibration of their own."""
    weights = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.parent.mkdir()
    (weights.parent / "config.json").write_text('{"_class_name": "CogVideoXTransformer3DModel"}')
    weights.write_bytes(b"old weights")
    os.utime(weights, ns=(1_000_000_000, 1_000_000_000))
    before = ratios_file_for(tmp_path, "CogVideoXTransformer3DModel", "CogVideoXDDIMScheduler")
    assert before == ratios_file_for(tmp_path, "CogVideoXTransformer3DModel", "CogVideoXDDIMScheduler")
    weights.write_bytes(b"new weights")  # the same size: only the time tells them apart
    os.utime(weights, ns=(2_000_000_000, 2_000_000_000))
    assert before != ratios_file_for(tmp_path, "CogVideoXTransformer3DModel", "CogVideoXDDIMScheduler")
