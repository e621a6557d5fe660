"""ParaStep's variants (`fresh_reuse`, `adaptive`) on CPU workers, against single-process references
(tests/oracle_parastep_variants.py), and their traffic against the formula.

Each family's runs share one cpu:3 worker group (N = 3: with N = 2 the freshest prediction is rank
1's own, so `fresh_reuse` changes nothing). The adaptive threshold is the median of the family's
step-to-step prediction changes in the sequential loop (whole percent), so that its schedule mixes
sync steps and rounds.
"""

from __future__ import annotations

import math
import statistics

import numpy as np
import pytest

from engine.protocol import GenerationRequest
from engine.strategies.parastep import expected_traffic, published_schedule
from resources import EMBEDDED_MODELS_DIR
from tests import oracle
from tests import oracle_parastep_variants as variants
from tests.test_strategies import REQUESTS, SEED, STEPS, WARMUP, assert_close, assert_distinct

pytestmark = pytest.mark.slow

FAMILIES = list(REQUESTS)
RANKS = 3
EXACT = 1e-6  # observed 0: the same float32 operations as the reference
VARIANT_DIFFERS = 1e-9  # a variant's result must differ from published by 5 such tolerances
MIN_WARMUP = 1  # the adaptive runs' minimum warm-up
BOTH = {"warmup": MIN_WARMUP, "fresh_reuse": 1, "adaptive": 100}  # every change < 100%: rounds follow rounds


def median_threshold(changes: list[float]) -> int:
    return max(1, round(statistics.median(changes) * 100))


@pytest.fixture(scope="module")
def references(conditioning_image):
    cache: dict[str, dict] = {}

    def get(family: str) -> dict:
        if family not in cache:
            params = {**REQUESTS[family], "seed": SEED, "steps": STEPS, "image": conditioning_image}
            rec = oracle.record(family, oracle.load_pipeline(EMBEDDED_MODELS_DIR / params["model"]), params)
            threshold = median_threshold(variants.guided_changes(rec))
            adaptive, schedule = variants.parastep(rec, RANKS, MIN_WARMUP, adaptive=threshold)
            cache[family] = {
                "published": oracle.parastep(rec, RANKS, WARMUP).numpy(),
                "fresh": variants.parastep(rec, RANKS, WARMUP, fresh_reuse=True)[0].numpy(),
                "threshold": threshold,
                "adaptive": adaptive.numpy(),
                "adaptive_schedule": schedule,
            }
            if family == "cogvideox":
                both, both_schedule = variants.parastep(rec, RANKS, MIN_WARMUP, True, BOTH["adaptive"])
                cache[family].update(both=both.numpy(), both_schedule=both_schedule)
        return cache[family]

    return get


@pytest.fixture(scope="module")
def engine_runs(shared_engine, conditioning_image, references):
    cache: dict[str, dict] = {}

    def get(family: str, name: str):
        if family not in cache:
            threshold = references(family)["threshold"]
            runs = {
                "fresh": {"warmup": WARMUP, "fresh_reuse": 1},
                "adaptive": {"warmup": MIN_WARMUP, "adaptive": threshold},
            }
            if family == "cogvideox":
                runs["both"] = BOTH
            extra = {"image": conditioning_image} if family == "svd" else {}
            results = {}
            for run_name, options in runs.items():
                plan = shared_engine.plan(
                    GenerationRequest(
                        **REQUESTS[family],
                        **extra,
                        seed=SEED,
                        steps=STEPS,
                        strategy="parastep",
                        devices=f"cpu:{RANKS}",
                        strategy_options=options,
                    )
                )
                results[run_name] = shared_engine.run(plan, previews=False)
            cache[family] = results  # only once every run succeeded
        return cache[family][name]

    return get


def traffic_of(result) -> list[dict[str, int]]:
    return [{"bytes_sent": r["bytes_sent"], "bytes_received": r["bytes_received"]} for r in result.ranks]


def sizes(result) -> tuple[int, int]:
    latent_bytes = math.prod(result.latents.shape) * np.dtype(np.float32).itemsize
    return 2 * latent_bytes, latent_bytes  # CFG doubles the denoiser batch


def rank0_calls(warmup: int) -> int:
    return warmup + len(oracle.rounds(STEPS, warmup, RANKS))


def sync_after_round(schedule: list[tuple[int, int, bool]]) -> bool:
    return any(a[2] and not b[2] for a, b in zip(schedule, schedule[1:], strict=False))


# ---- the formula ----------------------------------------------------------------------------------
def test_fresh_reuse_traffic_formula():
    # T=11, W=2, N=3: rounds (2,3) (5,3) (8,3); after the first two, one latent and one prediction.
    published = expected_traffic(11, 2, 3, prediction_bytes=100, latent_bytes=40)
    fresh = expected_traffic(11, 2, 3, prediction_bytes=100, latent_bytes=40, fresh_reuse=True)
    assert fresh[0]["bytes_sent"] - published[0]["bytes_sent"] == 2 * 100 * (3 - 1)
    for k in (1, 2):
        assert fresh[k]["bytes_received"] - published[k]["bytes_received"] == 2 * 100
        assert fresh[k]["bytes_sent"] == published[k]["bytes_sent"]
    # At N = 2 rank 1's own prediction is the freshest: nothing more is sent.
    assert expected_traffic(11, 2, 2, 100, 40, fresh_reuse=True) == expected_traffic(11, 2, 2, 100, 40)


def test_published_schedule():
    assert published_schedule(7, 2, 3) == [(0, 1, False), (1, 1, False), (2, 3, True), (5, 2, True)]
    assert published_schedule(3, 1, 1) == [(0, 1, False), (1, 1, False), (2, 1, False)]
    # A round, then a sync step, then a round: only the first round's end broadcasts the latent.
    schedule = [(0, 1, False), (1, 2, True), (3, 1, False), (4, 2, True)]
    traffic = expected_traffic(6, 1, 2, 100, 40, schedule=schedule)
    assert traffic[1] == {"bytes_sent": 2 * 100, "bytes_received": 40 + 3}


# ---- the references themselves ------------------------------------------------------------------
def test_variant_reference_without_variants_is_the_published_reference():
    params = {**REQUESTS["cogvideox"], "seed": SEED, "steps": STEPS}
    rec = oracle.record("cogvideox", oracle.load_pipeline(EMBEDDED_MODELS_DIR / params["model"]), params)
    for n in (2, 3):
        latent, schedule = variants.parastep(rec, n, WARMUP)
        assert schedule == published_schedule(STEPS, WARMUP, n)
        assert np.array_equal(latent.numpy(), oracle.parastep(rec, n, WARMUP).numpy())
    # fresh_reuse at N = 2 reuses what rank 1 reused anyway.
    fresh_two = variants.parastep(rec, 2, WARMUP, fresh_reuse=True)[0]
    assert np.array_equal(fresh_two.numpy(), oracle.parastep(rec, 2, WARMUP).numpy())


def test_adaptive_schedules_mix_sync_steps_and_rounds(references):
    schedules = {family: references(family)["adaptive_schedule"] for family in FAMILIES}
    for family, schedule in schedules.items():
        assert any(seg[2] for seg in schedule), f"{family}: no parallel round in {schedule}"
        assert sum(seg[1] for seg in schedule) == STEPS
    # The tiny CogVideoX's and SVD's predictions change more late in the loop: back to sync steps.
    assert sync_after_round(schedules["cogvideox"]) or sync_after_round(schedules["svd"])


# ---- the engine against the references ------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_reuse_matches_reference(family, engine_runs, references):
    ref = references(family)
    latents = engine_runs(family, "fresh").latents
    assert_close(latents, ref["fresh"], EXACT, f"{family} fresh_reuse N={RANKS}")
    # Only the last round's reuse differs at 7 steps: small (AudioLDM2: 1e-7 of the latent's scale).
    assert_distinct(latents, ref["published"], VARIANT_DIFFERS, f"{family} fresh_reuse vs published")


@pytest.mark.parametrize("family", FAMILIES)
def test_fresh_reuse_counters(family, engine_runs):
    result = engine_runs(family, "fresh")
    prediction_bytes, latent_bytes = sizes(result)
    expected = expected_traffic(STEPS, WARMUP, RANKS, prediction_bytes, latent_bytes, fresh_reuse=True)
    assert traffic_of(result) == expected
    assert result.ranks[0]["denoiser_calls"] == rank0_calls(WARMUP)


@pytest.mark.parametrize("family", FAMILIES)
def test_adaptive_matches_reference(family, engine_runs, references):
    ref = references(family)
    result = engine_runs(family, "adaptive")
    assert_close(result.latents, ref["adaptive"], EXACT, f"{family} adaptive {ref['threshold']}%")
    schedule = ref["adaptive_schedule"]
    prediction_bytes, latent_bytes = sizes(result)
    expected = expected_traffic(STEPS, 0, RANKS, prediction_bytes, latent_bytes, schedule=schedule)
    assert traffic_of(result) == expected
    assert result.ranks[0]["denoiser_calls"] == len(schedule)  # one per sync step or round


def test_both_variants_together(engine_runs, references):
    ref = references("cogvideox")
    result = engine_runs("cogvideox", "both")
    assert_close(result.latents, ref["both"], EXACT, "cogvideox fresh_reuse + adaptive")
    schedule = ref["both_schedule"]
    assert [seg[2] for seg in schedule].count(True) >= 2  # a fresh prediction was shared
    prediction_bytes, latent_bytes = sizes(result)
    expected = expected_traffic(STEPS, 0, RANKS, prediction_bytes, latent_bytes, True, schedule)
    assert traffic_of(result) == expected
