"""The window against the real engine process: Generate -> previews -> done -> the clip in history."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.protocol import GenerationRequest
from tests.ui.conftest import open_studio
from ui.engine_client import EngineState

pytestmark = pytest.mark.slow

REQUEST = GenerationRequest(
    model="tiny-cogvideox",
    prompt="a red circle moving right",
    seed=11,
    steps=6,
    frames=9,
    height=64,
    width=96,
    strategy="parastep",
    strategy_options={"warmup": 1},
    devices="cpu:2",
)


@pytest.fixture
def studio(qtbot, tmp_path, settings, _output_dir):
    with open_studio(tmp_path, settings, _output_dir) as window:
        yield window


def test_generate_previews_finish_and_history(qtbot, studio, _output_dir):
    window = studio
    qtbot.waitUntil(lambda: bool(window.models), timeout=120_000)  # the engine's catalog arrived
    assert {"tiny-cogvideox", "tiny-svd", "tiny-audioldm2"} <= set(window.models)
    assert window.client.state == EngineState.READY

    window.request_panel.set_request(REQUEST)
    assert window.request_panel.generate_button.isEnabled()
    previews = []
    window.client.preview_received.connect(previews.append)
    with qtbot.waitSignal(window.client.job_finished, timeout=240_000) as finished:
        window.request_panel.generate_button.click()
    job_id, result = finished.args

    # Previews came, and the flipbook shows x0 frames; the timeline has both ranks' steps.
    assert previews and previews[-1]["job_id"] == job_id
    window.preview.flush()
    assert window.preview.frames and not window.preview.frames[0].isNull()
    assert window.timeline.ranks() == [0, 1]
    assert sorted(window.timeline.marks[0]) == list(range(6))
    assert {m.action for m in window.timeline.marks[1].values()} >= {"compute", "reuse"}
    assert window.progress.fraction() == 1.0

    # The clip exists and is listed in the history with its request, ready to restore.
    clip = Path(result["output"])
    assert clip.is_file() and clip.parent == _output_dir
    entries = window.history_panel.entries
    assert [e.clip for e in entries] == [clip]
    restored = entries[0].request
    assert (restored.prompt, restored.seed, restored.steps, restored.devices) == (
        REQUEST.prompt,
        11,
        6,
        "cpu:2",
    )
    assert window.history_panel.selected_entry() is entries[0]
    assert window.result_viewer.path == str(clip)
    qtbot.waitUntil(lambda: any(j["status"] == "done" for j in window.queue_panel.jobs))
    assert window.settings.last_request() == REQUEST
