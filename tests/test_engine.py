"""The engine in-process: events, previews, cancel, the warm worker group."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from engine.engine import Engine
from engine.errors import JobCancelled
from engine.protocol import GenerationRequest, PreviewEvent, StageEvent, StepEvent

REQUEST = dict(model="tiny-cogvideox", prompt="a red circle", frames=9, height=64, width=96, steps=8)


@pytest.fixture(scope="module")
def engine():
    with Engine() as engine:
        yield engine


def test_events_stages_steps_and_previews(engine):
    events = []
    plan = engine.plan(GenerationRequest(**REQUEST, strategy="parastep", devices="cpu:2"))
    result = engine.run(plan, events.append)
    stages = [e.stage for e in events if isinstance(e, StageEvent)]
    assert stages == ["load", "encode", "denoise", "decode"]
    steps = [(e.rank, e.step) for e in events if isinstance(e, StepEvent)]
    assert sorted(steps) == [(r, s) for r in (0, 1) for s in range(8)]
    actions = {(e.rank, e.step): e.action for e in events if isinstance(e, StepEvent)}
    warmup = plan.request.strategy_options["warmup"]
    assert actions[(1, warmup)] == "reuse" and actions[(1, warmup + 1)] == "compute"
    assert actions[(0, warmup + 1)] == "receive"
    previews = [e for e in events if isinstance(e, PreviewEvent)]
    assert previews and previews[-1].step == 7  # the last step always previews
    first = Image.open(io.BytesIO(previews[-1].images[0]))
    assert first.mode == "RGB" and max(first.size) <= 512
    assert previews[-1].frame_indices == [0, 4, 8]  # 3 latent frames of a 9-frame clip
    assert result.output.shape == (9, 64, 96, 3)


def test_group_stays_warm_between_jobs(engine):
    plan = engine.plan(GenerationRequest(**REQUEST, devices="cpu:1"))
    engine.run(plan, previews=False)
    group = engine.group
    again = engine.run(plan, previews=False)
    assert engine.group is group and again.timings["load_s"] < 0.5


def test_cancel_stops_within_a_round_and_leaves_the_group_usable(engine):
    plan = engine.plan(GenerationRequest(**{**REQUEST, "steps": 40}, strategy="parastep", devices="cpu:2"))
    seen = []

    def on_event(event):
        if isinstance(event, StepEvent):
            seen.append(event)
            if event.rank == 0 and event.step == 6:
                engine.cancel()

    with pytest.raises(JobCancelled):
        engine.run(plan, on_event)
    last = max(e.step for e in seen if e.rank == 0)
    assert last <= 6 + 6  # agreed at the next round boundary (rounds of 2), plus event latency
    assert engine.group is not None and engine.group.alive()
    result = engine.run(engine.plan(GenerationRequest(**REQUEST, strategy="parastep", devices="cpu:2")))
    assert result.output.shape[0] == 9


def test_killed_worker_fails_the_job_quickly_and_the_next_job_runs(engine):
    import os
    import signal
    import time

    from engine.errors import WorkerFailure

    plan = engine.plan(GenerationRequest(**{**REQUEST, "steps": 60}, strategy="parastep", devices="cpu:2"))
    warm = engine.plan(GenerationRequest(**REQUEST, strategy="parastep", devices="cpu:2"))
    engine.run(warm, previews=False)
    victim = engine.group.processes[1].pid
    started = {}

    def on_event(event):
        if isinstance(event, StepEvent) and event.step == 5 and "t" not in started:
            started["t"] = time.monotonic()
            os.kill(victim, signal.SIGKILL)

    with pytest.raises(WorkerFailure, match="died"):
        engine.run(plan, on_event, previews=False)
    assert time.monotonic() - started["t"] < 30
    assert engine.group is None  # torn down; no process left (checked by the autouse fixture)
    result = engine.run(engine.plan(GenerationRequest(**REQUEST, strategy="parastep", devices="cpu:2")))
    assert result.output.shape[0] == 9


def test_compare_uses_the_sequential_entry_as_reference_wherever_it_stands(engine):
    from engine.compare import compare

    request = GenerationRequest(**REQUEST, strategy_options={"warmup": 2})
    report = compare(engine, request, [("parastep", "cpu:2"), ("sequential", "cpu:1")], save=False)
    parastep, sequential = report["rows"]
    assert sequential["fidelity"]["identical"] is True and sequential["speedup"] == pytest.approx(1.0)
    assert parastep["fidelity"]["identical"] is False and parastep["fidelity"]["psnr_db"] > 20
    assert parastep["speedup"] > 0 and parastep["ideal_speedup"] == pytest.approx(8 / (2 + 3))
    assert parastep["bytes_sent"] > 0 and sequential["bytes_sent"] == 0
