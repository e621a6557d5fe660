"""Issue 18, the window as a person uses it, against the real engine process: a kept queue waits
for Resume, the request is checked as it is typed (the engine's `check`), Compare offers devices
from the inventory, the seed is random and kept, and closing asks about unfinished jobs.

One engine serves the module, in file order; its queue file holds a job from "last time" before it
starts, and the last test closes the window.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from engine.job_queue import QUEUE_FILE, JobQueue
from engine.protocol import MAX_FRAMES, GenerationRequest
from tests.ui.conftest import make_settings, open_studio
from ui.engine_client import EngineState

pytestmark = pytest.mark.slow

REQUEST = GenerationRequest(
    model="tiny-cogvideox",
    prompt="a red circle",
    seed=3,
    steps=2,
    frames=9,
    height=64,
    width=96,
    strategy="sequential",
    devices="cpu:1",
)
START_MS = 120_000
JOB_MS = 120_000
CHECK_MS = 60_000  # the first check imports diffusers in the engine


@pytest.fixture(scope="module")
def studio(qapp, tmp_path_factory):
    root = tmp_path_factory.mktemp("person")
    kept = JobQueue(root / "state" / QUEUE_FILE).submit(REQUEST.to_dict())  # left from "last time"
    with open_studio(root, make_settings(root), root / "clips") as window:
        window.root, window.kept_job = root, kept.job_id
        window.messages = []
        window.client.message_received.connect(window.messages.append)
        yield window


@pytest.fixture
def window(qtbot, studio):
    qtbot.waitUntil(lambda: bool(studio.models), timeout=START_MS)
    yield studio
    qtbot.waitUntil(lambda: studio.thumbnails.pending() == 0, timeout=10_000)  # no ffmpeg left behind


def started(window) -> list[str]:
    return [m["job_id"] for m in window.messages if m.get("type") == "job_started"]


def ended(window, job_id: str) -> dict[str, Any] | None:
    kinds = ("job_finished", "job_failed", "job_cancelled")
    return next((m for m in window.messages if m.get("job_id") == job_id and m.get("type") in kinds), None)


def wait_checked(qtbot, panel) -> None:
    qtbot.waitUntil(
        lambda: not panel._check_timer.isActive() and not panel.validation.pending, timeout=CHECK_MS
    )


def test_a_kept_queue_waits_for_resume(qtbot, window):
    """Finding: on the next start a queued job started at once without asking."""
    qtbot.waitUntil(lambda: window.queue_panel.held_row.isVisibleTo(window.queue_panel), timeout=START_MS)
    assert "1 job" in window.queue_panel.held_note.text()
    time.sleep(2)
    qtbot.wait(200)
    assert started(window) == []
    window.queue_panel.resume_button.click()
    qtbot.waitUntil(lambda: ended(window, window.kept_job) is not None, timeout=JOB_MS)
    assert ended(window, window.kept_job)["type"] == "job_finished"
    assert not window.queue_panel.held_row.isVisibleTo(window.queue_panel)
    # Library warnings go to the engine's log file, not the Engine panel.
    assert "Warning" not in window.engine_panel.log.toPlainText()


def test_frames_are_checked_as_you_type_with_a_one_click_fix(qtbot, window):
    """Findings: 10000 frames silently became 1000 and then failed; only 8k+1 is valid."""
    panel = window.request_panel
    panel.set_request(REQUEST)
    wait_checked(qtbot, panel)
    assert panel.generate_button.isEnabled()
    jobs_before = len(window.client.jobs)
    assert panel.frames.maximum() == MAX_FRAMES >= 1001  # the engine's larger suggestion fits
    panel.frames.setValue(1000)
    wait_checked(qtbot, panel)
    assert panel.problem_label.isVisibleTo(panel) and "8k+1" in panel.problem_label.text()
    assert not panel.generate_button.isEnabled() and "border" in panel.frames.styleSheet()
    assert panel.fix_button.text() == "Set Frames to 993"
    panel.fix_button.click()
    assert panel.frames.value() == 993
    wait_checked(qtbot, panel)
    assert panel.generate_button.isEnabled() and not panel.problem_label.isVisibleTo(panel)
    assert len(window.client.jobs) == jobs_before  # checking queues nothing
    panel.set_request(REQUEST)


def test_cfg_parastep_asks_for_the_workers_it_needs(qtbot, window):
    """Finding: cfg-parastep left Workers at 1, failed, and showed "ideal speedup 2.00x"."""
    panel = window.request_panel
    panel.set_request(REQUEST)
    panel.strategy_picker.choose_strategy("cfg-parastep")
    panel.strategy_picker.cpu_workers.setValue(1)
    wait_checked(qtbot, panel)
    assert not panel.generate_button.isEnabled()
    assert panel.fix_button.text() == "Set Workers to 2"
    assert "--devices" not in panel.problem_label.text()
    assert "none" in panel.strategy_picker.speedup_label.text()
    assert "border" in panel.strategy_picker.cpu_workers.styleSheet()
    panel.fix_button.click()
    wait_checked(qtbot, panel)
    assert panel.strategy_picker.cpu_workers.value() == 2 and panel.generate_button.isEnabled()
    assert "2.00" in panel.strategy_picker.speedup_label.text()
    panel.set_request(REQUEST)


def test_compare_offers_devices_from_the_inventory_and_marks_a_bad_entry(qtbot, window):
    """Finding: Compare's free-text device box accepted cpu:16 and failed the whole comparison."""
    lab = window.compare_lab
    window.request_panel.set_request(REQUEST)
    offered = [lab.rows[0].devices.itemText(i) for i in range(lab.rows[0].devices.count())]
    assert offered[0] == "cpu:1" and all(spec.startswith("cpu:") for spec in offered)
    lab.set_entries([["sequential", "cpu:1"], ["parastep", "cpu:99"]])  # as restored from old settings
    lab.check_now()
    qtbot.waitUntil(lambda: lab.check.invalid, timeout=CHECK_MS)
    assert lab.check.entry == 1 and not lab.run_button.isEnabled()
    assert "border" in lab.rows[1].devices.styleSheet() and lab.rows[0].devices.styleSheet() == ""
    assert lab.fix_button.text() == f"Set Workers to {offered[-1][4:]}"
    lab.fix_button.click()
    qtbot.waitUntil(lambda: lab.check.ok is True, timeout=CHECK_MS)
    assert lab.run_button.isEnabled()
    lab.set_entries([["sequential", "cpu:1"], ["parastep", "cpu:2"]])


def test_generate_uses_a_random_seed_and_the_clip_keeps_it(qtbot, window):
    panel = window.request_panel
    panel.set_request(REQUEST)
    panel.set_seed_mode("random")
    panel.seed.setText("123456")
    before = set(started(window))
    panel.generate_button.click()  # right after an edit: Generate waits for the engine's answer
    qtbot.waitUntil(lambda: bool(set(started(window)) - before), timeout=JOB_MS)
    job_id = (set(started(window)) - before).pop()
    qtbot.waitUntil(lambda: ended(window, job_id) is not None, timeout=JOB_MS)
    result = ended(window, job_id)["result"]
    sidecar = json.loads(Path(result["metadata"]).read_text())
    assert sidecar["request"]["seed"] == 123456 and panel.seed.text() != "123456"


def test_closing_with_unfinished_jobs_asks_and_keeps_them_for_next_time(qtbot, window):
    """Finding: closing the window mid-job asked nothing and lost the job."""
    asked: list[tuple[int, int]] = []
    answers = iter(["cancel", "keep"])

    def ask(running: int, queued: int) -> str:
        asked.append((running, queued))
        return next(answers)

    window.ask_about_jobs = ask
    long_job = window.client.submit(dict(REQUEST.to_dict(), steps=200))
    queued_job = window.client.submit(REQUEST.to_dict())
    assert long_job and queued_job
    qtbot.waitUntil(lambda: window.client.state == EngineState.BUSY, timeout=JOB_MS)
    qtbot.waitUntil(lambda: sum(j["status"] == "queued" for j in window.client.jobs) == 1, timeout=10_000)
    window.close()
    assert asked == [(1, 1)] and window.isVisible()  # "cancel": nothing happens
    window.close()
    assert asked == [(1, 1), (1, 1)] and not window.isVisible()
    statuses = [j["status"] for j in JobQueue(window.root / "state" / QUEUE_FILE).to_list()]
    assert statuses.count("queued") == 1 and "interrupted" in statuses


def test_closing_and_discarding_leaves_nothing_for_next_time(qtbot, qapp, tmp_path):
    with open_studio(tmp_path, make_settings(tmp_path), tmp_path / "clips") as window:
        qtbot.waitUntil(lambda: bool(window.models), timeout=START_MS)
        window.ask_about_jobs = lambda running, queued: "discard"
        steps: list[dict] = []
        window.client.step_received.connect(steps.append)
        assert window.client.submit(dict(REQUEST.to_dict(), steps=1000))
        assert window.client.submit(REQUEST.to_dict())
        qtbot.waitUntil(lambda: bool(steps), timeout=JOB_MS)  # denoising
        window.close()
        assert window.isVisible()  # until the engine has cancelled the running job
        qtbot.waitUntil(lambda: not window.isVisible(), timeout=JOB_MS)
    statuses = [j["status"] for j in JobQueue(tmp_path / "state" / QUEUE_FILE).to_list()]
    assert statuses == ["cancelled"]  # the queued job removed, the running one cancelled, not kept
