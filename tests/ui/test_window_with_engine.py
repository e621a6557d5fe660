"""The window against the real engine process, beyond one Generate: cancel, queue order, the
comparison lab, and a crashed engine.

One engine (with the embedded tiny-cogvideox at 9 x 64 x 96) serves the whole module, and the tests
run in file order: single runs keep the warm cpu:2 worker group, the comparison switches to cpu:1
and back, and the crash test, last, kills the engine and lets the window start a new one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from engine.protocol import GenerationRequest
from tests.ui.conftest import make_settings, open_studio
from ui.engine_client import EngineState
from ui.queue_panel import JOB_ROLE

pytestmark = pytest.mark.slow

REQUEST = GenerationRequest(
    model="tiny-cogvideox",
    prompt="a blue square drifting left",
    seed=5,
    steps=4,
    frames=9,
    height=64,
    width=96,
    strategy="parastep",
    strategy_options={"warmup": 1},
    devices="cpu:2",
)
ROUND = 2  # steps per ParaStep round on cpu:2
LONG_STEPS = 60
START_TIMEOUT_MS = 120_000  # a fresh engine imports torch; a new worker group loads the model
JOB_TIMEOUT_MS = 120_000


class Recorder:
    """Everything the engine said to the window, in order."""

    def __init__(self, client: Any) -> None:
        self.messages: list[dict[str, Any]] = []
        client.message_received.connect(self.messages.append)

    def of(self, kind: str, job_id: str | None = None) -> list[dict[str, Any]]:
        return [
            m
            for m in self.messages
            if m.get("type") == kind and (job_id is None or m.get("job_id") == job_id)
        ]

    def started(self) -> list[str]:
        return [m["job_id"] for m in self.of("job_started")]

    def last_step(self, job_id: str) -> int:
        """The highest step rank 0 reported for the job (-1: none yet)."""
        return max((m["step"] for m in self.of("step", job_id) if m["rank"] == 0), default=-1)

    def ended(self, job_id: str) -> str | None:
        ends = [m["type"] for m in self.messages if m.get("job_id") == job_id]
        return next((t for t in ends if t in ("job_finished", "job_failed", "job_cancelled")), None)


@pytest.fixture(scope="module")
def studio(qapp, tmp_path_factory):
    root = tmp_path_factory.mktemp("studio")
    with open_studio(root, make_settings(root), root / "clips", auto_restart=True) as window:
        window.recorder = Recorder(window.client)
        window.root = root
        yield window


@pytest.fixture
def window(qtbot, studio):
    """The shared window, ready for a job; it leaves no thumbnail maker running behind it."""
    qtbot.waitUntil(lambda: bool(studio.models), timeout=START_TIMEOUT_MS)
    qtbot.waitUntil(lambda: studio.client.state == EngineState.READY, timeout=JOB_TIMEOUT_MS)
    yield studio
    qtbot.waitUntil(lambda: studio.thumbnails.pending() == 0, timeout=10_000)


def generate(qtbot, window, request: GenerationRequest) -> str:
    """Click Generate with `request` in the request panel; the new job's id."""
    window.request_panel.set_request(request)
    window.request_panel.set_seed_mode("fixed")
    replies: list[str] = []

    def on_message(message: dict[str, Any]) -> None:
        if message.get("type") == "queue" and "job_id" in message:
            replies.append(message["job_id"])

    window.client.message_received.connect(on_message)
    try:
        window.request_panel.generate_button.click()
        qtbot.waitUntil(lambda: bool(replies), timeout=10_000)
    finally:
        window.client.message_received.disconnect(on_message)
    return replies[0]


def queue_status(window, job_id: str) -> str | None:
    return next((j.get("status") for j in window.queue_panel.jobs if j["job_id"] == job_id), None)


def queue_item_text(window, job_id: str) -> str:
    items = (window.queue_panel.list.item(row) for row in range(window.queue_panel.list.count()))
    return next(item.text() for item in items if item.data(JOB_ROLE) == job_id)


def clips(folder: Path) -> set[str]:
    return {p.name for p in folder.glob("*")} if folder.is_dir() else set()


def wait_until_done(qtbot, window, *job_ids: str) -> None:
    qtbot.waitUntil(
        lambda: all(window.recorder.ended(j) for j in job_ids) and window.client.state == EngineState.READY,
        timeout=JOB_TIMEOUT_MS,
    )


def test_cancel_mid_run_stops_within_a_round_and_the_next_job_runs(qtbot, window):
    rec, out = window.recorder, window.root / "clips"
    before = clips(out)
    long_job = generate(qtbot, window, dataclasses.replace(REQUEST, steps=LONG_STEPS, seed=21))
    next_job = generate(qtbot, window, dataclasses.replace(REQUEST, seed=22))
    qtbot.waitUntil(lambda: rec.last_step(long_job) >= 8, timeout=START_TIMEOUT_MS)

    window.queue_panel.cancel_button.click()
    seen_at_click = rec.last_step(long_job)
    assert queue_item_text(window, long_job).startswith("[cancelling"), "the click is acknowledged at once"
    assert not window.queue_panel.cancel_button.isEnabled()

    qtbot.waitUntil(lambda: rec.ended(long_job) is not None, timeout=30_000)
    assert rec.ended(long_job) == "job_cancelled"
    last = rec.last_step(long_job)
    # One round may be under way when the flag is set, and one more may be in flight to the window.
    assert last - seen_at_click <= 2 * ROUND, (seen_at_click, last)
    assert last < LONG_STEPS - 1
    stages = [m["stage"] for m in rec.of("stage", long_job)]
    assert "decode" not in stages and "save" not in stages, stages
    qtbot.waitUntil(lambda: queue_status(window, long_job) == "cancelled")
    assert queue_item_text(window, long_job).startswith("[cancelled]")

    # The next job runs to its clip; the cancelled one left none.
    wait_until_done(qtbot, window, next_job)
    assert rec.ended(next_job) == "job_finished"
    result = rec.of("job_finished", next_job)[0]["result"]
    new = clips(out) - before
    assert Path(result["output"]).name in new
    assert {Path(name).stem for name in new} == {Path(result["output"]).stem}, new  # clip + sidecar only
    assert rec.started()[-2:] == [long_job, next_job]


def test_reordered_queue_runs_in_the_new_order(qtbot, window):
    rec, panel = window.recorder, window.queue_panel
    blocker = generate(qtbot, window, dataclasses.replace(REQUEST, steps=400, seed=30))
    qtbot.waitUntil(lambda: rec.last_step(blocker) >= 0, timeout=START_TIMEOUT_MS)
    a, b, c = (generate(qtbot, window, dataclasses.replace(REQUEST, seed=s)) for s in (31, 32, 33))
    qtbot.waitUntil(lambda: panel.queued_ids() == [a, b, c])

    # C to the top with "Up" twice, then B removed: the queue panel asks the engine each time.
    panel.select(c)
    panel.up_button.click()
    qtbot.waitUntil(lambda: panel.queued_ids() == [a, c, b])
    panel.select(c)
    panel.up_button.click()
    qtbot.waitUntil(lambda: panel.queued_ids() == [c, a, b])
    panel.select(b)
    panel.remove_button.click()
    qtbot.waitUntil(lambda: panel.queued_ids() == [c, a])
    assert queue_status(window, b) is None
    assert [j["job_id"] for j in window.client.jobs if j["status"] == "queued"] == [c, a]
    assert rec.ended(blocker) is None, "the blocker must still hold the queue while it is reordered"

    panel.select(blocker)
    panel.cancel_button.click()
    wait_until_done(qtbot, window, c, a)
    assert rec.started()[-3:] == [blocker, c, a]
    assert b not in rec.started()
    assert (rec.ended(c), rec.ended(a)) == ("job_finished", "job_finished")
    # The history lists the clips newest first: A's, then C's.
    outputs = [Path(rec.of("job_finished", j)[0]["result"]["output"]) for j in (a, c)]
    assert [e.clip for e in window.history_panel.entries[:2]] == outputs
    assert [e.request.seed for e in window.history_panel.entries[:2]] == [31, 33]


def test_comparison_from_the_lab_fills_table_and_chart(qtbot, window):
    rec, lab = window.recorder, window.compare_lab
    window.request_panel.set_request(dataclasses.replace(REQUEST, steps=6, seed=40))
    lab.set_entries([["sequential", "cpu:1"], ["parastep", "cpu:2"]])
    assert lab.run_button.isEnabled()
    assert lab.table.rowCount() == 0
    count = len(rec.of("job_started"))
    lab.run_button.click()
    qtbot.waitUntil(lambda: len(rec.of("job_started")) > count, timeout=10_000)
    job = rec.started()[-1]
    wait_until_done(qtbot, window, job)
    assert rec.ended(job) == "job_finished", rec.of("job_failed", job)
    report = rec.of("job_finished", job)[0]["result"]
    assert [(r["strategy"], r["devices"]) for r in report["rows"]] == [
        ("sequential", "cpu:1"),
        ("parastep", "cpu:2"),
    ]

    assert window.tabs.currentWidget() is lab
    table = lab.table
    assert table.rowCount() == 2
    headers = [table.horizontalHeaderItem(c).text() for c in range(table.columnCount())]
    cell = {
        (r, h): table.item(r, c).text() for r in range(2) for c, h in enumerate(headers) if table.item(r, c)
    }
    assert (cell[0, "strategy"], cell[0, "devices"]) == ("sequential", "cpu:1")
    assert (cell[1, "strategy"], cell[1, "devices"]) == ("parastep", "cpu:2")
    assert cell[0, "speedup"] == "1.00×" and cell[0, "fidelity"] == "identical"  # the reference itself
    assert cell[1, "speedup"].endswith("×") and float(cell[1, "speedup"][:-1]) > 0
    assert "PSNR" in cell[1, "fidelity"] or cell[1, "fidelity"] == "identical", cell[1, "fidelity"]
    assert float(cell[1, "ideal"][:-1]) > 1.0

    series = lab.chart.series()
    assert len(series) == 1
    sets = series[0].barSets()
    assert [s.label() for s in sets] == ["measured", "ideal"]
    assert all(s.count() == 2 for s in sets)
    measured = [sets[0].at(i) for i in range(2)]
    assert measured[0] == pytest.approx(1.0) and measured[1] > 0
    assert sets[1].at(1) == pytest.approx(float(report["rows"][1]["ideal_speedup"]))
    assert lab.export_csv_button.isEnabled()


def test_crashed_engine_is_restarted_and_the_queue_survives(qtbot, window):
    rec, client, panel = window.recorder, window.client, window.queue_panel
    victim = generate(qtbot, window, dataclasses.replace(REQUEST, steps=40, seed=50))
    qtbot.waitUntil(lambda: rec.last_step(victim) >= 2, timeout=START_TIMEOUT_MS)
    before = {j["job_id"]: j["status"] for j in client.jobs}
    old_pid = window.launcher.pid()
    assert old_pid and client.engine_pid == old_pid

    states: list[tuple[str, str, bool]] = []
    client.state_changed.connect(
        lambda s: states.append(
            (s, window.status_label.text(), window.request_panel.generate_button.isEnabled())
        )
    )
    os.kill(old_pid, signal.SIGKILL)

    # Shown as stopped (Generate off), then started again by the window on its own.
    qtbot.waitUntil(lambda: any(s == "stopped" for s, _, _ in states), timeout=10_000)
    first_stop = [s for s, _, _ in states].index("stopped")
    _, label, can_generate = states[first_stop]
    assert "Engine stopped" in label and not can_generate, states
    log = window.engine_panel.log.toPlainText()
    assert "engine exited with code" in log and "restarting it" in log, log
    qtbot.waitUntil(lambda: client.state == EngineState.READY, timeout=START_TIMEOUT_MS)
    new_pid = window.launcher.pid()
    assert new_pid and new_pid != old_pid and client.engine_pid == new_pid
    assert [s for s, _, _ in states][first_stop:] == ["stopped", "starting", "ready"]
    assert "Engine ready" in window.status_label.text()

    # The queue saved on disk came back: every job, the killed one marked interrupted.
    qtbot.waitUntil(lambda: queue_status(window, victim) == "interrupted", timeout=10_000)
    after = {j["job_id"]: j["status"] for j in client.jobs}
    assert set(before) <= set(after)
    assert {k: v for k, v in after.items() if k != victim} == {k: v for k, v in before.items() if k != victim}
    saved = json.loads((window.root / "state" / "queue.json").read_text())
    assert {j["job_id"]: j["status"] for j in saved["jobs"]} == after

    # Generate works on the new engine (it loads the workers again).
    qtbot.waitUntil(lambda: bool(window.models) and window.request_panel.generate_button.isEnabled())
    fresh = generate(qtbot, window, dataclasses.replace(REQUEST, seed=51))
    wait_until_done(qtbot, window, fresh)
    assert rec.ended(fresh) == "job_finished"
    assert Path(rec.of("job_finished", fresh)[0]["result"]["output"]).is_file()

    # The interrupted job goes back in the queue with one click, and runs.
    panel.select(victim)
    assert panel.requeue_button.isEnabled()
    count = rec.started().count(victim)
    panel.requeue_button.click()
    qtbot.waitUntil(lambda: rec.started().count(victim) > count, timeout=10_000)
    qtbot.waitUntil(lambda: queue_status(window, victim) == "done", timeout=JOB_TIMEOUT_MS)
