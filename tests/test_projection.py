"""The projection cost model against cases computed by hand (engine/projection.py)."""

from __future__ import annotations

import pytest

from engine.projection import (
    Link,
    StepProfile,
    asyncdiff_loop_s,
    cfg_parallel_loop_s,
    distrifusion_loop_s,
    ideal_parastep_speedup,
    parastep_loop_s,
    project,
)

# 10 GB/s and no latency: every transfer below is bytes / 1e10 seconds.
LINK = Link("test", bandwidth_gb_s=10.0, latency_us=0.0)
PROFILE = StepProfile(
    model="hand",
    denoise_s=1.0,
    half_denoise_s=0.6,
    loop_s=0.1,
    encode_s=1.0,
    decode_s=2.0,
    prediction_bytes=1_000_000_000,  # 0.1 s
    latent_bytes=500_000_000,  # 0.05 s
    activation_bytes=200_000_000,  # 0.02 s
    kv_bytes=4_000_000_000,
)


def test_link_costs_latency_plus_bytes():
    link = Link("l", bandwidth_gb_s=25.0, latency_us=10.0)
    assert link.message_s(25e9) == pytest.approx(1.0 + 10e-6)
    # A collective over 8 devices pays three tree hops of latency, the bytes once.
    assert link.collective_s(0, 8) == pytest.approx(30e-6)
    assert link.collective_s(0, 2) == pytest.approx(10e-6)


def test_ideal_bound_matches_design_figures():
    assert ideal_parastep_speedup(50, 5, 2) == pytest.approx(50 / 28)  # 1.79x
    assert ideal_parastep_speedup(50, 5, 4) == pytest.approx(50 / 17)  # 2.94x
    assert ideal_parastep_speedup(50, 5, 8) == pytest.approx(50 / 11)  # 4.55x
    assert ideal_parastep_speedup(200, 5, 8) == pytest.approx(200 / 30)


def test_ideal_bound_agrees_with_the_engine_formula():
    from engine.strategies.base import ideal_speedup

    for steps, warmup, n in [(50, 13, 8), (20, 2, 3), (7, 7, 4), (200, 5, 8)]:
        assert ideal_parastep_speedup(steps, warmup, n) == pytest.approx(ideal_speedup(steps, warmup, n))


def test_parastep_by_hand():
    # T=10, W=2, N=4: warm-up 2 x 1.1 s; rounds at steps 2 and 6 of 4 steps each:
    # 1.0 (one call) + 4 x 0.1 (steps) + 3 x 0.1 (receives) = 1.7 s, plus 0.05 s latent broadcast after
    # the first round; one-byte flags cost 1e-10 s each. Total 5.65 s against 10 x 1.1 = 11 s.
    loop = parastep_loop_s(PROFILE, 10, 2, 4, LINK)
    assert loop == pytest.approx(5.65, abs=1e-8)
    # A short last round: T=11 adds a round of one step (1.0 + 0.1) and a broadcast before it.
    assert parastep_loop_s(PROFILE, 11, 2, 4, LINK) == pytest.approx(5.65 + 0.05 + 1.1, abs=1e-8)


def test_parastep_with_free_communication_reaches_the_ideal():
    free = StepProfile("free", 1.0, 0.5, 0.0, 0.0, 0.0, 10**9, 10**9, 0, 0)
    instant = Link("instant", bandwidth_gb_s=1e12, latency_us=0.0)
    loop = parastep_loop_s(free, 50, 5, 4, instant)
    assert 50 / loop == pytest.approx(ideal_parastep_speedup(50, 5, 4), rel=1e-6)


def test_one_device_is_sequential_for_every_strategy():
    for loop in (
        parastep_loop_s(PROFILE, 10, 2, 1, LINK),
        cfg_parallel_loop_s(PROFILE, 10, 1, LINK),
        asyncdiff_loop_s(PROFILE, 10, 1, LINK),
        distrifusion_loop_s(PROFILE, 10, 1, LINK),
    ):
        assert loop == pytest.approx(11.0)


def test_cfg_parallel_by_hand():
    # Each step: half call 0.6 + step 0.1 + all-gather of one half (0.5e9 B) 0.05 = 0.75 s.
    assert cfg_parallel_loop_s(PROFILE, 10, 2, LINK) == pytest.approx(7.5)
    assert cfg_parallel_loop_s(PROFILE, 10, 4, LINK) is None


def test_asyncdiff_by_hand():
    # N=4, 3 warm-up steps: 1.1 + 3 boundaries x 0.02 = 1.16 s each; then max(1.0/4, 0.02) + 0.1
    # + broadcast of the prediction 0.1 = 0.45 s for each of the 7 other steps.
    assert asyncdiff_loop_s(PROFILE, 10, 4, LINK, warmup=3) == pytest.approx(3 * 1.16 + 7 * 0.45)


def test_distrifusion_by_hand():
    # N=4: a rank gathers 3/4 of 4e9 B = 0.3 s; compute 0.25 s. Warm-up (4 steps) adds them: 0.65 s;
    # afterwards they overlap: max(0.25, 0.3) + 0.1 = 0.4 s for 6 steps.
    assert distrifusion_loop_s(PROFILE, 10, 4, LINK, warmup=4) == pytest.approx(4 * 0.65 + 6 * 0.4)


def test_project_rows_and_end_to_end():
    rows = project(PROFILE, 10, 2, devices=(2, 4), links=(LINK,))
    strategies = sorted({(row.strategy, row.devices) for row in rows})
    assert ("cfg-parallel", 4) not in strategies and ("cfg-parallel", 2) in strategies
    assert len(rows) == 7  # parastep, asyncdiff, distrifusion at N=2 and 4, cfg-parallel at N=2
    row = next(r for r in rows if r.strategy == "parastep" and r.devices == 4)
    assert row.loop_speedup == pytest.approx(11.0 / 5.65, rel=1e-6)
    # End to end, encode (1 s) and decode (2 s) are not parallel: (11 + 3) / (5.65 + 3).
    assert row.end_to_end_speedup == pytest.approx(14.0 / 8.65, rel=1e-6)
    assert row.ideal == pytest.approx(10 / 4)


# A loop with separate guidance calls (Wan): two calls of 0.5 s per step, each output 0.5e9 B (0.05 s);
# UniPC carries three latent-sized tensors; the engine refuses AsyncDiff and DistriFusion for the family.
SEPARATE = StepProfile(
    model="separate",
    denoise_s=1.0,
    half_denoise_s=0.5,
    loop_s=0.1,
    encode_s=1.0,
    decode_s=2.0,
    prediction_bytes=1_000_000_000,
    latent_bytes=500_000_000,  # 0.05 s
    activation_bytes=0,
    kv_bytes=0,
    guidance_calls=2,
    solver_tensors=3,
    refused=("asyncdiff", "distrifusion"),
)


def test_parastep_separate_calls_and_solver_state_by_hand():
    # T=10, W=2, N=4: as test_parastep_by_hand (the step's two outputs are 0.1 s in all); with
    # sync_solver the round-end broadcast carries the latent and UniPC's three tensors: 4 x 0.05 s.
    assert parastep_loop_s(SEPARATE, 10, 2, 4, LINK, sync_solver=True) == pytest.approx(5.65 + 3 * 0.05)
    # By default (as published) the latent alone.
    assert parastep_loop_s(SEPARATE, 10, 2, 4, LINK) == pytest.approx(5.65, abs=1e-8)


def test_parastep_sends_one_message_per_call():
    slow = Link("latency only", bandwidth_gb_s=1e12, latency_us=1000.0)
    batched = StepProfile("b", 1.0, 0.5, 0.1, 0.0, 0.0, 1000, 1000, 0, 0)
    separate = StepProfile("s", 1.0, 0.5, 0.1, 0.0, 0.0, 1000, 1000, 0, 0, guidance_calls=2)
    # T=10, W=2, N=4: two rounds of 4, three receives each: six more 1 ms latencies with two calls.
    extra = parastep_loop_s(separate, 10, 2, 4, slow) - parastep_loop_s(batched, 10, 2, 4, slow)
    assert extra == pytest.approx(6e-3, rel=1e-6)


def test_cfg_parallel_separate_calls_by_hand():
    # Step 0 runs both calls on both ranks: 1.0 + 0.1 s, nothing exchanged. Steps 1-9: one call each
    # (0.5 s) + step 0.1 s + the pair's outputs all-gathered (one call's, 0.5e9 B) 0.05 s = 0.65 s.
    assert cfg_parallel_loop_s(SEPARATE, 10, 2, LINK) == pytest.approx(1.1 + 9 * 0.65)
    assert cfg_parallel_loop_s(SEPARATE, 1, 2, LINK) == pytest.approx(1.1)
    assert cfg_parallel_loop_s(SEPARATE, 10, 4, LINK) is None


def test_project_leaves_out_refused_strategies_and_adds_the_solver_sync_variant():
    rows = project(SEPARATE, 10, 2, devices=(2, 4), links=(LINK,))
    keys = sorted((row.strategy, row.devices) for row in rows)
    assert keys == [
        ("cfg-parallel", 2),
        ("parastep", 2),
        ("parastep", 4),
        ("parastep-sync-solver", 2),
        ("parastep-sync-solver", 4),
    ]
    own = next(r for r in rows if (r.strategy, r.devices) == ("parastep", 4))
    synced = next(r for r in rows if (r.strategy, r.devices) == ("parastep-sync-solver", 4))
    assert synced.loop_s == pytest.approx(5.8, abs=1e-8) and own.loop_s == pytest.approx(5.65, abs=1e-8)
    assert own.ideal == synced.ideal == pytest.approx(10 / 4)
