"""AsyncDiff end to end on CPU workers, against an independent reference (tests/oracle_asyncdiff.py).

The engine runs are made once per family, grouped by devices so that each worker group starts
once; the references run the stock pipeline in this process and simulate the parts with staleness.
The sequential reference is the stock run itself (test_strategies checks that the engine's
sequential strategy equals it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from engine.errors import JobCancelled, UserError
from engine.protocol import GenerationRequest, StepEvent
from engine.strategies.asyncdiff import (
    AsyncDiffStrategy,
    balanced_split,
    config_block_count,
    denoiser_blocks,
    expected_traffic,
    rounds,
)
from engine.strategies.base import JobContext
from resources import EMBEDDED_MODELS_DIR
from tests import oracle, oracle_asyncdiff
from tests.test_strategies import EXACT, REQUESTS, SEED, Failed, assert_close, assert_distinct

pytestmark = pytest.mark.slow

STEPS = 7
WARMUP = 2

# name -> (devices, options, families); grouped by devices so that each worker group starts once.
# N = devices - stride + 1 parts. Balance 0 (counted operations) gives a split the reference works out
# on its own; balance 1 (measured times, the default) one that the reference takes from the engine.
# Warm-up 1 takes the path where the split and the trace share step 0; stride 2 with W = 2, T = 7 has
# rounds (2,2),(4,2),(6,1): the last one is shorter than the stride.
RUNS = {
    "n2": ("cpu:2", {"warmup": WARMUP, "balance": 0}, ("cogvideox", "svd", "audioldm2")),
    "n2-all-warmup": ("cpu:2", {"warmup": STEPS}, ("cogvideox", "svd", "audioldm2")),
    "n3-w1-measured": ("cpu:3", {"warmup": 1}, ("audioldm2",)),
    "n2-s2": ("cpu:3", {"warmup": WARMUP, "stride": 2, "balance": 0}, ("audioldm2",)),
}
CASES = [(family, name) for name, (_, _, families) in RUNS.items() for family in families]
PARALLEL_CASES = [(f, n) for f, n in CASES if n != "n2-all-warmup"]


def parts_and_stride(name: str) -> tuple[int, int, int]:
    devices, options, _ = RUNS[name]
    ranks, stride = int(devices.split(":")[1]), options.get("stride", 1)
    return ranks - stride + 1, stride, options["warmup"]


def request(family: str, name: str, image: str) -> GenerationRequest:
    devices, options, _ = RUNS[name]
    extra = {"image": image} if family == "svd" else {}
    return GenerationRequest(
        **REQUESTS[family],
        **extra,
        seed=SEED,
        steps=STEPS,
        strategy="asyncdiff",
        devices=devices,
        strategy_options=options,
    )


@pytest.fixture(scope="module")
def engine_runs(shared_engine, conditioning_image):
    cache: dict[tuple[str, str], object] = {}

    def get(family: str, name: str):
        if not cache:
            for run_family, run_name in sorted(CASES, key=lambda c: (c[0], RUNS[c[1]][0])):
                plan = shared_engine.plan(request(run_family, run_name, conditioning_image))
                try:
                    cache[(run_family, run_name)] = shared_engine.run(plan, previews=False)
                except Exception as error:  # kept, and raised by the tests that use this run
                    cache[(run_family, run_name)] = Failed(error)
        result = cache[(family, name)]
        if isinstance(result, Failed):
            raise result.error
        return result

    return get


@pytest.fixture(scope="module")
def references(conditioning_image):
    """Per family: the stock run and its recording, the block names and costs; per (run, split):
    the reference latents and the bytes each part consumes (added by reference_run)."""
    cache: dict[str, dict] = {}

    def get(family: str) -> dict:
        if family not in cache:
            params = {**REQUESTS[family], "seed": SEED, "steps": STEPS, "image": conditioning_image}
            pipe = oracle.load_pipeline(EMBEDDED_MODELS_DIR / REQUESTS[family]["model"])
            rec = oracle.record(family, pipe, params)
            cache[family] = {
                "stock": rec.stock_latents.numpy(),
                "rec": rec,
                "names": [name for name, _ in oracle_asyncdiff.blocks(rec)],
                "costs": oracle_asyncdiff.block_costs(rec),
            }
        return cache[family]

    return get


def reference_bounds(ref: dict, name: str, engine_ranks: list[dict]) -> list[int]:
    """The split: worked out here for counted operations, the engine's own for measured times."""
    parts, _, _ = parts_and_stride(name)
    if RUNS[name][1].get("balance", 1) == 0:
        costs, tail = ref["costs"]
        return oracle_asyncdiff.split(costs, tail, parts)
    bounds = [0]
    for counters in engine_ranks[:parts]:
        blocks = counters["part_blocks"]
        assert blocks and ref["names"][bounds[-1] : bounds[-1] + len(blocks)] == blocks  # contiguous
        bounds.append(bounds[-1] + len(blocks))
    assert bounds[-1] == len(ref["names"])
    return bounds


def reference_run(ref: dict, name: str, bounds: list[int]) -> dict:
    key = (name, tuple(bounds))
    if key not in ref:
        _, stride, warmup = parts_and_stride(name)
        ref[key] = {
            "latents": oracle_asyncdiff.asyncdiff(ref["rec"], bounds, warmup, stride).numpy(),
            "boundary_bytes": oracle_asyncdiff.boundary_bytes(ref["rec"], bounds),
        }
    return ref[key]


# ---- the algorithm against the reference ------------------------------------------------------------
@pytest.mark.parametrize("family,name", PARALLEL_CASES)
def test_split_is_the_references(family, name, engine_runs, references):
    ref = references(family)
    ranks = engine_runs(family, name).ranks
    bounds = reference_bounds(ref, name, ranks)
    parts, _, _ = parts_and_stride(name)
    for rank, counters in enumerate(ranks):
        part = min(rank, parts - 1)
        assert counters["part_blocks"] == ref["names"][bounds[part] : bounds[part + 1]], f"rank {rank}"
        assert 0 < counters["part_share"] < 1
    assert math.isclose(sum(c["part_share"] for c in ranks[:parts]), 1.0)


@pytest.mark.parametrize("family,name", PARALLEL_CASES)
def test_asyncdiff_matches_the_reference(family, name, engine_runs, references):
    result, ref = engine_runs(family, name), references(family)
    latents = result.latents
    reference = reference_run(ref, name, reference_bounds(ref, name, result.ranks))
    assert_close(latents, reference["latents"], EXACT, f"{family} asyncdiff {name}")
    assert_distinct(latents, ref["stock"], EXACT, f"{family} asyncdiff {name}")


@pytest.mark.parametrize("family", ["cogvideox", "svd", "audioldm2"])
def test_all_warmup_is_sequential(family, engine_runs, references):
    latents = engine_runs(family, "n2-all-warmup").latents
    assert_close(latents, references(family)["stock"], EXACT, f"{family} asyncdiff warm-up = steps")
    ranks = engine_runs(family, "n2-all-warmup").ranks
    assert [c["denoiser_calls"] for c in ranks] == [STEPS, STEPS]
    assert sum(c["bytes_sent"] for c in ranks) == STEPS - 1  # the one-byte cancel flags only


def test_reference_with_every_step_warm_is_the_stock_loop(references):
    ref = references("audioldm2")
    whole = oracle_asyncdiff.asyncdiff(ref["rec"], [0, 3, len(ref["names"])], warmup=STEPS, stride=1)
    assert np.array_equal(whole.numpy(), ref["stock"])


def test_cancel_leaves_the_group_usable(shared_engine, engine_runs, conditioning_image):
    """Cancelled after warm-up, when parts' outputs are in flight between rounds: every rank stops at
    the same round end, no send is left unmatched, and the next job on the group is unchanged."""
    before = engine_runs("svd", "n2")  # svd runs last: its cpu:2 group is warm
    long = dataclasses.replace(request("svd", "n2", conditioning_image), steps=30)
    seen = []

    def on_event(event):
        if isinstance(event, StepEvent):
            seen.append(event)
            if event.rank == 0 and event.step == 4:
                shared_engine.cancel()

    with pytest.raises(JobCancelled):
        shared_engine.run(shared_engine.plan(long), on_event, previews=False)
    assert max(e.step for e in seen) < 29
    assert shared_engine.group is not None and shared_engine.group.alive()
    again = shared_engine.run(shared_engine.plan(request("svd", "n2", conditioning_image)), previews=False)
    assert np.array_equal(again.latents, before.latents)


# ---- counters ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("family,name", PARALLEL_CASES)
def test_traffic_equals_the_formula(family, name, engine_runs, references):
    result = engine_runs(family, name)
    parts, stride, warmup = parts_and_stride(name)
    ranks = len(result.ranks)
    # The prediction: both guidance halves of the float32 denoiser output, the latent's size each.
    assert REQUESTS[family]["guidance_scale"] > 1.0
    prediction_bytes = 2 * math.prod(result.latents.shape) * np.dtype(np.float32).itemsize
    ref = references(family)
    boundary = reference_run(ref, name, reference_bounds(ref, name, result.ranks))["boundary_bytes"]
    for p in range(1, parts):
        assert boundary[p - 1][p] > 0  # a part always consumes the one before it
    traffic = expected_traffic(STEPS, warmup, stride, ranks, prediction_bytes, boundary, len(ref["names"]))
    for rank, counters in enumerate(result.ranks):
        assert counters["bytes_sent"] == traffic[rank]["bytes_sent"], f"rank {rank} sent"
        assert counters["bytes_received"] == traffic[rank]["bytes_received"], f"rank {rank} received"
    schedule = rounds(STEPS, warmup, stride)
    for rank, counters in enumerate(result.ranks):
        extra = rank - parts  # the stride's extra ranks compute only where the round is long enough
        computing = len(schedule) if extra < 0 else sum(size - 1 > extra for _, size in schedule)
        assert counters["denoiser_calls"] == warmup + computing, f"rank {rank}"


def test_formula_by_hand():
    # T=7, W=2, two parts, no stride: rounds at 2..6 (5), flags after steps 0, 1 and rounds 2..5 (6),
    # the costs of 3 blocks and of what follows them (4 int64), the boundary after rounds 2..5 (4).
    boundary = [[0, 10], [0, 0]]
    traffic = expected_traffic(7, 2, 1, 2, prediction_bytes=100, boundary_bytes=boundary, blocks=3)
    assert traffic[0] == {"bytes_sent": 6 + 32 + 4 * 10, "bytes_received": 5 * 100}
    assert traffic[1] == {"bytes_sent": 5 * 100, "bytes_received": 6 + 32 + 4 * 10}
    # Stride 2 on 3 ranks (2 parts + 1 extra): rounds (2,2),(4,2),(6,1); extra rank 2 sources steps 2, 4.
    traffic = expected_traffic(7, 2, 2, 3, prediction_bytes=100, boundary_bytes=boundary, blocks=3)
    assert traffic[2]["bytes_sent"] == 2 * 2 * 100
    assert traffic[1]["bytes_sent"] == 3 * 2 * 100
    assert traffic[0]["bytes_sent"] == (2 + 2 + 32) * 2 + 2 * 2 * 10  # to two ranks; boundary to ranks 1, 2
    # Every step a warm-up step: the plain loop, cancel flags only.
    traffic = expected_traffic(7, 7, 1, 2, prediction_bytes=100, boundary_bytes=boundary, blocks=3)
    assert traffic[0] == {"bytes_sent": 6, "bytes_received": 0}


# ---- the split ---------------------------------------------------------------------------------------
def test_balanced_split_is_the_best_cut():
    generator = random.Random(7)
    for _ in range(200):
        blocks = generator.randint(1, 8)
        costs = [generator.choice([1, 2, 3, 5, 8, 100]) for _ in range(blocks)]
        tail = generator.choice([0, 1, 7])
        parts = generator.randint(1, blocks)
        assert balanced_split(costs, tail, parts) == oracle_asyncdiff.split(costs, tail, parts), (costs, tail)
    with pytest.raises(ValueError):
        balanced_split([1, 2], 0, 3)


def test_ideal_speedup_counts_the_stride():
    assert AsyncDiffStrategy.parallel_width({"stride": 1}, 4) == 4
    assert AsyncDiffStrategy.parallel_width({"stride": 2}, 3) == 4  # 2 parts, each once per 2 steps


# ---- refusals ----------------------------------------------------------------------------------------
def test_refuses_more_parts_than_blocks(references):
    """Five parts of the tiny SVD UNet (4 blocks) are refused at the first denoiser call, on every
    rank alike and before any communication, so no rank waits on another."""
    rec = references("svd")["rec"]
    assert len(references("svd")["names"]) == 4
    ctx = JobContext(
        rank=0,
        world_size=5,
        device=torch.device("cpu"),
        total_steps=STEPS,
        options={"warmup": 2, "stride": 1, "balance": 1},
        pipe=rec.pipe,
    )
    strategy = AsyncDiffStrategy(ctx)
    strategy.install(rec.pipe)
    try:
        with pytest.raises(UserError, match="cannot cut 4 blocks into 5 parts"):
            with torch.inference_mode():
                rec.denoiser(*rec.call_args, **{**rec.call_kwargs, "return_dict": False})
    finally:
        strategy.uninstall()
    with torch.inference_mode():  # hooks removed: the denoiser runs whole again
        out = rec.denoiser(*rec.call_args, **{**rec.call_kwargs, "return_dict": False})
    assert out[0].shape[0] == rec.call_args[0].shape[0]


@pytest.mark.parametrize("family", ["cogvideox", "svd", "audioldm2"])
def test_plan_counts_the_blocks_from_the_config_and_refuses_too_many_parts(
    family, references, shared_engine, conditioning_image
):
    folder = EMBEDDED_MODELS_DIR / REQUESTS[family]["model"]
    component = "transformer" if family == "cogvideox" else "unet"
    blocks = config_block_count(json.loads((folder / component / "config.json").read_text()))
    assert blocks == len(denoiser_blocks(references(family)["rec"].denoiser))
    good = request(family, "n2", conditioning_image)
    too_many = dataclasses.replace(good, devices=f"cpu:{blocks + 1}")
    with pytest.raises(UserError, match=f"cannot cut {blocks} blocks into {blocks + 1} parts"):
        shared_engine.plan(too_many)  # at plan time: no worker starts
    with_stride = dataclasses.replace(too_many, strategy_options={"warmup": 2, "stride": 2})
    assert len(shared_engine.plan(with_stride).devices) == blocks + 1  # N + 1 devices, N parts: fine


def test_refuses_a_stride_larger_than_the_devices_and_a_bad_balance(shared_engine, conditioning_image):
    good = request("audioldm2", "n2", conditioning_image)
    bad = dataclasses.replace(good, strategy_options={"warmup": 2, "stride": 3})
    with pytest.raises(UserError, match="stride 3 needs at least 3 devices"):
        shared_engine.plan(bad)
    with pytest.raises(UserError, match="'balance'"):
        shared_engine.plan(dataclasses.replace(good, strategy_options={"warmup": 2, "balance": 2}))
    assert shared_engine.plan(good).request.strategy_options == {"warmup": 2, "stride": 1, "balance": 0}


def test_refuses_a_denoiser_it_cannot_split(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    reason = AsyncDiffStrategy.unavailable_reason(SimpleNamespace(path=tmp_path))
    assert reason is not None and "UNet2DConditionModel" in reason
    for family in ("cogvideox", "svd", "audioldm2"):
        entry = SimpleNamespace(path=EMBEDDED_MODELS_DIR / REQUESTS[family]["model"])
        assert AsyncDiffStrategy.unavailable_reason(entry) is None
