"""CFG-parallel and CFG-ParaStep on CPU workers, against single-process references.

References (tests/oracle.py, tests/oracle_parastep_variants.py): the stock loop rebuilt in this
process, with the whole CFG batch in one denoiser call (what sequential and ParaStep compute) or
with each guidance half evaluated on its own (what the CFG strategies compute). The CFG strategies
must equal the split reference bit for bit (same float32 operations, gloo moves tensors unchanged)
and the unsplit one within a small tolerance: a batch of one may round the last bits differently.

Runs are grouped by (model, devices) so that each worker group starts once: every family on
cpu:2; CFG-ParaStep with two pairs (cpu:4) on tiny-cogvideox only, since the CFG split is the code
each family exercises on cpu:2, and ParaStep's rounds are family-independent and tested per family
in tests/test_strategies.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.errors import JobCancelled, UserError
from engine.protocol import GenerationRequest, StepEvent
from engine.strategies import cfg_parallel, cfg_parastep
from resources import EMBEDDED_MODELS_DIR
from tests import oracle
from tests import oracle_parastep_variants as variants
from tests.test_strategies import REQUESTS, SEED, STEPS, WARMUP, assert_close, assert_distinct

pytestmark = pytest.mark.slow

# tiny-cogvideox last: its cpu:4 group, started last, stays warm for the cancel test.
FAMILIES = ["svd", "audioldm2", "cogvideox"]
EXACT = 1e-6  # observed 0: the same float32 operations as the split reference
# A batch of one against the batch of two, max |diff| / max |reference| after 7 steps, measured with
# the references (sequential; ParaStep N=2): 8.0e-7, 8.2e-7 (cogvideox); 1.7e-6, 1.5e-6 (svd);
# 8.3e-7, 8.0e-7 (audioldm2). The tolerances leave 6-12x headroom.
SPLIT = {"cogvideox": 1e-5, "svd": 1e-5, "audioldm2": 1e-5}
DISTINCT = 1e-6

# name -> (strategy, devices, options), in this order: one worker group per (model, devices).
RUNS = {
    "cfg-parallel": ("cfg-parallel", "cpu:2", {}),
    "cfg-parastep-1": ("cfg-parastep", "cpu:2", {"warmup": WARMUP}),
    "cfg-parastep-2": ("cfg-parastep", "cpu:4", {"warmup": WARMUP}),
    # Warm-up at least 1, ended by world rank 0 at the first measured change below 100%.
    "cfg-parastep-2-adaptive": ("cfg-parastep", "cpu:4", {"warmup": 1, "adaptive": 100}),
}
FOUR_DEVICE_FAMILIES = ("cogvideox",)


def request(
    family: str, strategy: str, devices: str, options: dict, image: str, **extra
) -> GenerationRequest:
    fields = {
        **REQUESTS[family],
        "seed": SEED,
        "steps": STEPS,
        **({"image": image} if family == "svd" else {}),
    }
    fields.update(extra)
    return GenerationRequest(**fields, strategy=strategy, devices=devices, strategy_options=options)


@pytest.fixture(scope="module")
def engine_runs(shared_engine, conditioning_image):
    cache: dict[tuple[str, str], object] = {}

    def get(family: str, name: str):
        if (family, name) not in cache:
            for run_name, (strategy, devices, options) in RUNS.items():
                if devices == "cpu:4" and family not in FOUR_DEVICE_FAMILIES:
                    continue
                plan = shared_engine.plan(request(family, strategy, devices, options, conditioning_image))
                cache[(family, run_name)] = shared_engine.run(plan, previews=False)
        return cache[(family, name)]

    return get


@pytest.fixture(scope="module")
def references(conditioning_image):
    cache: dict[str, dict] = {}

    def get(family: str) -> dict:
        if family not in cache:
            params = {**REQUESTS[family], "seed": SEED, "steps": STEPS, "image": conditioning_image}
            rec = oracle.record(family, oracle.load_pipeline(EMBEDDED_MODELS_DIR / params["model"]), params)
            split = variants.with_cfg_split(rec)
            refs = {
                "sequential": oracle.sequential(rec).numpy(),
                "split-sequential": variants.parastep(split, 1, STEPS)[0].numpy(),
            }
            if family in FOUR_DEVICE_FAMILIES:
                refs["parastep-2"] = oracle.parastep(rec, 2, WARMUP).numpy()
                refs["split-parastep-2"] = variants.parastep(split, 2, WARMUP)[0].numpy()
            cache[family] = refs
        return cache[family]

    return get


def sizes(result) -> tuple[int, int]:
    """(prediction bytes, latent bytes): float32 workers, CFG doubles the denoiser batch."""
    latent_bytes = math.prod(result.latents.shape) * np.dtype(np.float32).itemsize
    return 2 * latent_bytes, latent_bytes


def traffic_of(result) -> list[dict[str, int]]:
    return [{"bytes_sent": r["bytes_sent"], "bytes_received": r["bytes_received"]} for r in result.ranks]


# ---- CFG-parallel -----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_cfg_parallel_equals_sequential(family, engine_runs, references):
    latents = engine_runs(family, "cfg-parallel").latents
    ref = references(family)
    assert_close(latents, ref["split-sequential"], EXACT, f"{family} cfg-parallel vs split reference")
    assert_close(latents, ref["sequential"], SPLIT[family], f"{family} cfg-parallel vs sequential")


@pytest.mark.parametrize("family", FAMILIES)
def test_cfg_parallel_counters(family, engine_runs):
    result = engine_runs(family, "cfg-parallel")
    prediction_bytes, _ = sizes(result)
    assert traffic_of(result) == cfg_parallel.expected_traffic(STEPS, prediction_bytes)
    assert [r["denoiser_calls"] for r in result.ranks] == [STEPS, STEPS]


@pytest.mark.parametrize("family", FAMILIES)
def test_cfg_parastep_on_one_pair_is_cfg_parallel(family, engine_runs):
    one_pair = engine_runs(family, "cfg-parastep-1")
    assert np.array_equal(one_pair.latents, engine_runs(family, "cfg-parallel").latents)
    prediction_bytes, latent_bytes = sizes(one_pair)
    assert traffic_of(one_pair) == cfg_parastep.expected_traffic(
        STEPS, WARMUP, 2, prediction_bytes, latent_bytes
    )


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("strategy", ["cfg-parallel", "cfg-parastep"])
def test_guidance_off_is_refused(family, strategy, shared_engine, conditioning_image):
    devices = "cpu:2"
    with pytest.raises(UserError, match="guidance") as error:
        shared_engine.plan(request(family, strategy, devices, {}, conditioning_image, guidance_scale=1.0))
    assert "--guidance-scale" in error.value.fix


def test_cfg_parastep_needs_pairs_of_devices(shared_engine):
    with pytest.raises(UserError, match="multiple of 2"):
        shared_engine.plan(request("cogvideox", "cfg-parastep", "cpu:3", {}, ""))


# ---- CFG-ParaStep on two pairs ------------------------------------------------------------------
@pytest.mark.parametrize("family", FOUR_DEVICE_FAMILIES)
def test_cfg_parastep_equals_parastep_with_half_the_devices(family, engine_runs, references):
    latents = engine_runs(family, "cfg-parastep-2").latents
    ref = references(family)
    assert_close(latents, ref["split-parastep-2"], EXACT, f"{family} cfg-parastep 4 vs split reference N=2")
    assert_close(latents, ref["parastep-2"], SPLIT[family], f"{family} cfg-parastep 4 vs ParaStep N=2")
    assert_distinct(latents, ref["sequential"], DISTINCT, f"{family} cfg-parastep 4")


@pytest.mark.parametrize("family", FOUR_DEVICE_FAMILIES)
def test_cfg_parastep_counters(family, engine_runs):
    result = engine_runs(family, "cfg-parastep-2")
    prediction_bytes, latent_bytes = sizes(result)
    assert traffic_of(result) == cfg_parastep.expected_traffic(
        STEPS, WARMUP, 4, prediction_bytes, latent_bytes
    )
    rounds = oracle.rounds(STEPS, WARMUP, 2)
    calls = [WARMUP + sum(size > rank // 2 for _, size in rounds) for rank in range(4)]
    assert [r["denoiser_calls"] for r in result.ranks] == calls


@pytest.mark.parametrize("family", FOUR_DEVICE_FAMILIES)
def test_cfg_parastep_adaptive_warmup_is_agreed_by_every_rank(family, engine_runs):
    # Change below 100% from step 1 on: the warm-up ends after step 1, as with warmup=2 (= WARMUP).
    adaptive = engine_runs(family, "cfg-parastep-2-adaptive")
    assert np.array_equal(adaptive.latents, engine_runs(family, "cfg-parastep-2").latents)
    prediction_bytes, latent_bytes = sizes(adaptive)
    assert traffic_of(adaptive) == cfg_parastep.expected_traffic(STEPS, 2, 4, prediction_bytes, latent_bytes)


def test_cfg_parastep_cancel_leaves_the_group_usable(shared_engine, engine_runs):
    engine_runs("cogvideox", "cfg-parastep-2")  # the cpu:4 group is warm
    plan = shared_engine.plan(request("cogvideox", "cfg-parastep", "cpu:4", {"warmup": WARMUP}, "", steps=30))
    seen = []

    def on_event(event):
        if isinstance(event, StepEvent):
            seen.append(event)
            if event.rank == 0 and event.step == 4:
                shared_engine.cancel()

    with pytest.raises(JobCancelled):
        shared_engine.run(plan, on_event, previews=False)
    assert max(e.step for e in seen) <= 4 + 10  # agreed at the next round end, plus event latency
    assert shared_engine.group is not None and shared_engine.group.alive()
    again = shared_engine.run(
        shared_engine.plan(request("cogvideox", "cfg-parastep", "cpu:4", {"warmup": WARMUP}, "")),
        previews=False,
    )
    assert np.array_equal(again.latents, engine_runs("cogvideox", "cfg-parastep-2").latents)
