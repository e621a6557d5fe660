"""The device timeline accumulates `step` events and paints one mark per (rank, step) by action."""

from __future__ import annotations

import pytest

from ui.timeline_view import ACTION_COLOURS, TimelineView

T, W = 10, 2


def parastep_events(ranks: int = 2) -> list[dict]:
    """What ParaStep's ranks report: exact warm-up steps, then rounds of `ranks` steps."""
    events = []
    for step in range(T):
        for rank in range(ranks):
            if step < W:
                action = "compute"
            elif rank == 0:
                action = "compute" if (step - W) % ranks == 0 else "receive"
            else:
                action = "compute" if (step - W) % ranks == rank else "reuse"
            compute = 0.02 if action == "compute" else 0.0005
            events.append(
                {
                    "type": "step",
                    "job_id": "j",
                    "rank": rank,
                    "step": step,
                    "total": T,
                    "action": action,
                    "compute_s": compute,
                    "comm_wait_s": 0.004 if step >= W else 0.0,
                }
            )
    return events


@pytest.fixture
def timeline(qtbot):
    view = TimelineView()
    qtbot.addWidget(view)
    view.resize(800, 160)
    return view


def test_accumulates_step_events(timeline):
    timeline.reset(T, ["cpu", "cpu"], W, 2)
    for event in parastep_events():
        timeline.add_step(event)
    assert timeline.ranks() == [0, 1]
    assert [timeline.marks[0][s].action for s in range(T)] == ["compute"] * 2 + ["compute", "receive"] * 4
    assert [timeline.marks[1][s].action for s in range(T)] == ["compute"] * 2 + ["reuse", "compute"] * 4
    calls, compute, wait = timeline.lane_summary(1)
    assert calls == 6 and compute == pytest.approx(6 * 0.02 + 4 * 0.0005) and wait == pytest.approx(8 * 0.004)
    assert timeline.latest_step == T - 1


def test_paints_each_action_in_its_colour(timeline):
    # Without reset: lanes, and the step count, come from the events themselves.
    events = parastep_events(ranks=3)
    events.append({"rank": 1, "step": 0, "total": T, "action": "batched", "compute_s": 0.1, "comm_wait_s": 0})
    events.append({"rank": 2, "step": 0, "total": T, "action": "idle", "compute_s": 0, "comm_wait_s": 0})
    for event in events:
        timeline.add_step(event)
    image = timeline.grab().toImage()
    seen = {}
    for rank, marks in timeline.marks.items():
        for step, mark in marks.items():
            centre = timeline.mark_rect(rank, step).center().toPoint()
            seen.setdefault(mark.action, set()).add(image.pixelColor(centre).name())
    assert set(seen) == set(ACTION_COLOURS)
    for action, colours in seen.items():
        assert colours == {ACTION_COLOURS[action].name()}, action
    assert len({ACTION_COLOURS[a].name() for a in seen}) == len(seen)  # all different


def test_empty_and_long_timelines_paint(timeline):
    assert not timeline.grab().isNull()  # nothing yet: a hint instead of lanes
    timeline.reset(1000, ["cuda:0", "cuda:1", "cuda:2", "cuda:3"], 5, 4)
    for step in range(1000):
        timeline.add_step({"rank": step % 4, "step": step, "total": 1000, "action": "compute"})
    image = timeline.grab().toImage()
    first = timeline.mark_rect(0, 0)  # under a pixel wide: marks touch
    assert first.width() == 1.0
    assert image.pixelColor(int(first.left()), int(first.center().y())) == ACTION_COLOURS["compute"]
    assert timeline.mark_at(timeline.mark_rect(2, 998).center()) == (2, 998)
