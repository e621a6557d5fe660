"""ParaStep and BatchStep end to end on CPU workers, against an independent reference (tests/oracle.py).

Every family's engine runs are made once, grouped by devices so that each (model, devices) worker
group starts only once, and kept for the assertions below. The reference runs the stock pipeline in
this process and replays the published algorithm with simulated ranks.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from engine.protocol import GenerationRequest
from engine.strategies.parastep import expected_traffic
from resources import EMBEDDED_MODELS_DIR
from tests import oracle

pytestmark = pytest.mark.slow

STEPS = 7  # with W = 2 the last round is partial for N = 2 (2,2),(4,2),(6,1) and N = 3 (2,3),(5,2)
WARMUP = 2
SEED = 1234

REQUESTS = {
    "cogvideox": dict(
        model="tiny-cogvideox",
        prompt="a red circle",
        frames=9,
        height=64,
        width=96,
        fps=8,
        guidance_scale=6.0,
    ),
    "svd": dict(model="tiny-svd", frames=4, height=64, width=96, fps=7, guidance_scale=3.0),
    "audioldm2": dict(model="tiny-audioldm2", prompt="a dog barking", seconds=1.0, guidance_scale=3.5),
}
FAMILIES = list(REQUESTS)

# name -> (strategy, devices, options); in this order, so that each worker group starts once.
RUNS = {
    "sequential": ("sequential", "cpu:1", {}),
    "parastep-1": ("parastep", "cpu:1", {"warmup": WARMUP}),
    "batchstep-2": ("batchstep", "cpu:1", {"warmup": WARMUP, "lookahead": 2}),
    "batchstep-3": ("batchstep", "cpu:1", {"warmup": WARMUP, "lookahead": 3}),
    "parastep-2": ("parastep", "cpu:2", {"warmup": WARMUP}),
    "parastep-2-all-warmup": ("parastep", "cpu:2", {"warmup": STEPS}),
    "parastep-3": ("parastep", "cpu:3", {"warmup": WARMUP}),
}

# Tolerances: |actual - reference| <= tol * (max |reference| + |reference|), elementwise. Latents are
# O(1) for the video families and O(100) for the tiny AudioLDM2, hence the scale by the largest
# magnitude. ParaStep on CPU workers runs the same
# float32 operations as the single-process reference (gloo moves tensors bit for bit): observed
# difference 0, tolerance 1e-6. BatchStep evaluates the look-ahead latents in one batched call,
# whose float32 sums differ in the last bits: observed max |diff| / max |reference| up to 1.0e-6
# (cogvideox), 2.0e-6 (svd), 2.3e-7 (audioldm2); the tolerances leave 5-10x headroom.
EXACT = 1e-6
BATCHED = {"cogvideox": 1e-5, "svd": 1e-5, "audioldm2": 2e-6}
DISTINCT = 5  # a parallel result must differ from sequential by more than this many tolerances


def request(family: str, strategy: str, devices: str, options: dict, image: str) -> GenerationRequest:
    extra = {"image": image} if family == "svd" else {}
    return GenerationRequest(
        **REQUESTS[family],
        **extra,
        seed=SEED,
        steps=STEPS,
        strategy=strategy,
        devices=devices,
        strategy_options=options,
    )


class Failed:
    """A run that raised: re-raised in every test that needs it."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


@pytest.fixture(scope="module")
def engine_runs(shared_engine, conditioning_image):
    cache: dict[str, dict] = {}

    def get(family: str, name: str):
        if family not in cache:
            cache[family] = {}
            for run_name, (strategy, devices, options) in RUNS.items():
                plan = shared_engine.plan(request(family, strategy, devices, options, conditioning_image))
                try:
                    cache[family][run_name] = shared_engine.run(plan, previews=False)
                except Exception as error:  # kept, and raised by the tests that use this run
                    cache[family][run_name] = Failed(error)
        result = cache[family][name]
        if isinstance(result, Failed):
            raise result.error
        return result

    return get


@pytest.fixture(scope="module")
def references(conditioning_image):
    cache: dict[str, dict] = {}

    def get(family: str) -> dict:
        if family not in cache:
            params = {**REQUESTS[family], "seed": SEED, "steps": STEPS, "image": conditioning_image}
            pipe = oracle.load_pipeline(EMBEDDED_MODELS_DIR / REQUESTS[family]["model"])
            rec = oracle.record(family, pipe, params)
            cache[family] = {
                "stock": rec.stock_latents.numpy(),
                "sequential": oracle.sequential(rec).numpy(),
                "parastep-1": oracle.parastep(rec, ranks=1, warmup=WARMUP).numpy(),
                "parastep-2": oracle.parastep(rec, ranks=2, warmup=WARMUP).numpy(),
                "parastep-3": oracle.parastep(rec, ranks=3, warmup=WARMUP).numpy(),
            }
            del pipe, rec
        return cache[family]

    return get


def allowed(reference: np.ndarray, scale: float) -> np.ndarray:
    """Elementwise |actual - reference| allowed: scale * (max |reference| + |reference|)."""
    magnitude = np.abs(reference.astype(np.float64))
    return scale * (magnitude.max() + magnitude)


def assert_close(actual: np.ndarray, reference: np.ndarray, scale: float, what: str) -> None:
    assert actual.shape == reference.shape, what
    diff = np.abs(actual.astype(np.float64) - reference)
    bound = allowed(reference, scale)
    worst = np.unravel_index(np.argmax(diff / bound), diff.shape)
    assert np.all(diff <= bound), (
        f"{what}: |diff| {diff[worst]:.3g} at {worst} exceeds {bound[worst]:.3g}; max |diff| {diff.max():.3g}"
    )


def assert_distinct(actual: np.ndarray, reference: np.ndarray, scale: float, what: str) -> None:
    """Far outside the tolerance: a strategy that silently ran the sequential loop would fail."""
    excess = float((np.abs(actual.astype(np.float64) - reference) / allowed(reference, scale)).max())
    assert excess > DISTINCT, f"{what}: differs from sequential by at most {excess:.3g} tolerances"


# ---- the reference itself ---------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_oracle_reproduces_the_stock_pipeline(family, references):
    ref = references(family)
    assert np.array_equal(ref["sequential"], ref["stock"])  # same process, same ops: bit for bit
    assert np.array_equal(ref["parastep-1"], ref["stock"])  # one rank: the sequential loop
    for n in (2, 3):
        assert_distinct(ref[f"parastep-{n}"], ref["stock"], EXACT, f"{family} oracle N={n}")


def test_oracle_rounds():
    assert oracle.rounds(STEPS, WARMUP, 2) == [(2, 2), (4, 2), (6, 1)]
    assert oracle.rounds(STEPS, WARMUP, 3) == [(2, 3), (5, 2)]
    assert oracle.rounds(STEPS, STEPS, 2) == []


# ---- the engine against the reference ---------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_sequential_engine_matches_the_stock_loop(family, engine_runs, references):
    sequential = engine_runs(family, "sequential").latents
    assert_close(sequential, references(family)["stock"], EXACT, f"{family} sequential")


@pytest.mark.parametrize("family", FAMILIES)
def test_parastep_one_rank_is_bit_identical_to_sequential(family, engine_runs):
    single = engine_runs(family, "parastep-1").latents
    assert np.array_equal(single, engine_runs(family, "sequential").latents)


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_parastep_matches_the_reference(family, ranks, engine_runs, references):
    latents = engine_runs(family, f"parastep-{ranks}").latents
    ref = references(family)
    assert_close(latents, ref[f"parastep-{ranks}"], EXACT, f"{family} parastep N={ranks}")
    sequential = engine_runs(family, "sequential").latents
    assert_distinct(latents, sequential, EXACT, f"{family} parastep N={ranks}")


@pytest.mark.parametrize("family", FAMILIES)
def test_batchstep_matches_parastep(family, engine_runs, references):
    ref = references(family)
    two = engine_runs(family, "batchstep-2").latents
    assert_close(
        two,
        engine_runs(family, "parastep-2").latents,
        BATCHED[family],
        f"{family} batchstep P=2 vs parastep N=2",
    )
    assert_close(two, ref["parastep-2"], BATCHED[family], f"{family} batchstep P=2 vs reference N=2")
    assert_distinct(
        two, engine_runs(family, "sequential").latents, BATCHED[family], f"{family} batchstep P=2"
    )
    three = engine_runs(family, "batchstep-3").latents
    assert_close(three, ref["parastep-3"], BATCHED[family], f"{family} batchstep P=3 vs reference N=3")


@pytest.mark.parametrize("family", FAMILIES)
def test_parastep_all_warmup_is_sequential(family, engine_runs):
    latents = engine_runs(family, "parastep-2-all-warmup").latents
    assert np.array_equal(latents, engine_runs(family, "sequential").latents)


# ---- counters ----------------------------------------------------------------------------------------
def rounds_in_which_rank_computes(total: int, warmup: int, ranks: int, rank: int) -> int:
    """Rounds of `ranks` steps after warm-up whose size exceeds `rank` (rank 0: every round)."""
    count, start = 0, warmup
    while start < total:
        size = min(ranks, total - start)
        count += size > rank
        start += size
    return count


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("family", FAMILIES)
def test_parastep_counters(family, ranks, engine_runs):
    result = engine_runs(family, f"parastep-{ranks}")
    counters = result.ranks
    assert [c["rank"] for c in counters] == list(range(ranks))
    # Sizes from the latent alone: float32 workers; CFG doubles the denoiser batch (guidance > 1).
    assert REQUESTS[family]["guidance_scale"] > 1.0
    latent_bytes = math.prod(result.latents.shape) * np.dtype(np.float32).itemsize
    prediction_bytes = 2 * latent_bytes
    traffic = expected_traffic(STEPS, WARMUP, ranks, prediction_bytes, latent_bytes)
    for k in range(1, ranks):
        computes = rounds_in_which_rank_computes(STEPS, WARMUP, ranks, k)
        assert counters[k]["bytes_sent"] == traffic[k]["bytes_sent"] == computes * prediction_bytes
        assert counters[k]["bytes_received"] == traffic[k]["bytes_received"]
        assert counters[k]["denoiser_calls"] == WARMUP + computes
    received = sum(rounds_in_which_rank_computes(STEPS, WARMUP, ranks, k) for k in range(1, ranks))
    assert counters[0]["bytes_received"] == traffic[0]["bytes_received"] == received * prediction_bytes
    assert counters[0]["bytes_sent"] == traffic[0]["bytes_sent"]
    # Rank 0 broadcasts its latent after every round but the last, plus a few one-byte flags.
    count = len(oracle.rounds(STEPS, WARMUP, ranks))
    flags = counters[0]["bytes_sent"] - (ranks - 1) * (count - 1) * latent_bytes
    assert 0 <= flags <= (ranks - 1) * (WARMUP + count)
    assert counters[0]["denoiser_calls"] == WARMUP + rounds_in_which_rank_computes(STEPS, WARMUP, ranks, 0)


@pytest.mark.parametrize("family", FAMILIES)
def test_single_device_counters(family, engine_runs):
    assert engine_runs(family, "sequential").ranks[0]["denoiser_calls"] == STEPS
    assert engine_runs(family, "parastep-1").ranks[0]["denoiser_calls"] == STEPS
    for p in (2, 3):
        calls = engine_runs(family, f"batchstep-{p}").ranks[0]["denoiser_calls"]
        assert calls == WARMUP + rounds_in_which_rank_computes(STEPS, WARMUP, p, 0)
    everyone = engine_runs(family, "parastep-2-all-warmup").ranks
    assert [c["denoiser_calls"] for c in everyone] == [STEPS, STEPS]
    assert everyone[1]["bytes_sent"] == 0 and everyone[0]["bytes_received"] == 0
