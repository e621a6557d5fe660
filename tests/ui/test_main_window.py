"""The main window's wiring and what it remembers, driven by engine messages (no engine process)."""

from __future__ import annotations

import base64
import dataclasses
import json

import pytest
from PySide6.QtCore import QBuffer, QByteArray, QIODevice
from PySide6.QtGui import QColor, QImage

from engine.outputs import build_metadata
from engine.protocol import GenerationRequest
from ui.engine_client import EngineClient
from ui.main_window import MainWindow, rank_devices

REQUEST = GenerationRequest(
    model="tiny-cogvideox",
    prompt="waves",
    seed=3,
    steps=4,
    frames=9,
    height=64,
    width=96,
    strategy="parastep",
    strategy_options={"warmup": 1},
    devices="cpu:2",
)


def png() -> str:
    image = QImage(24, 16, QImage.Format.Format_RGB32)
    image.fill(QColor("teal"))
    data = QByteArray()
    buffer = QBuffer(data)
    buffer.open(QIODevice.OpenModeFlag.WriteOnly)
    image.save(buffer, "PNG")
    return base64.b64encode(bytes(data.data())).decode()


@pytest.fixture
def make_window(qtbot, tmp_path, settings, catalog):
    def make() -> MainWindow:
        # No engine: a client that is not connected; the test plays the engine's messages.
        client = EngineClient(str(tmp_path / "none.sock"), None, auto_restart=False)
        window = MainWindow(client, settings, output_dir=tmp_path / "clips")
        qtbot.addWidget(window)
        client._dispatch(catalog)
        return window

    return make


def test_rank_devices():
    assert rank_devices("cpu:3") == ["cpu"] * 3
    assert rank_devices("cuda:0,2") == ["cuda:0", "cuda:2"]
    assert rank_devices("auto") == []


def test_a_job_flows_through_the_panels(qtbot, make_window, tmp_path):
    window = make_window()
    dispatch = window.client._dispatch
    job = {"job_id": "j1", "status": "running", "request": REQUEST.to_dict(), "compare": None}
    dispatch({"type": "queue", "jobs": [job]})
    dispatch({"type": "job_started", "job_id": "j1"})
    assert window.timeline.ranks() == [0, 1] and window.timeline.warmup == 1
    assert window.timeline.round_width == 2
    for stage in ("load", "encode", "denoise"):
        dispatch({"type": "stage", "job_id": "j1", "stage": stage})
    for step in range(4):
        for rank in range(2):
            action = (
                "compute" if step == 0 or (step - 1) % 2 == rank else ("receive" if rank == 0 else "reuse")
            )
            step_event = {"type": "step", "job_id": "j1", "rank": rank, "step": step, "total": 4}
            dispatch({**step_event, "action": action, "compute_s": 0.01, "comm_wait_s": 0.0})
    dispatch(
        {"type": "preview", "job_id": "j1", "step": 3, "total": 4, "images": [png()], "frame_indices": [0]}
    )
    assert window.progress.step == 4
    qtbot.waitUntil(lambda: "step 4/4" in window.progress_panel.label.text(), timeout=1000)

    # The engine saves the clip, then says so: the history lists it.
    clips = tmp_path / "clips"
    clips.mkdir()
    (clips / "c.gif").write_bytes(b"GIF89a")
    meta = build_metadata(REQUEST, timings={}, ranks=[])
    (clips / "c.json").write_text(json.dumps(meta))
    dispatch({"type": "stage", "job_id": "j1", "stage": "save"})
    dispatch({"type": "job_finished", "job_id": "j1", "result": {"output": str(clips / "c.gif")}})
    assert window.progress.fraction() == 1.0
    assert window.preview.frames and window.preview.step == 4
    assert [e.request for e in window.history_panel.entries] == [REQUEST]
    assert window.history_panel.selected_entry().clip == clips / "c.gif"
    assert window.tabs.currentWidget() is window.result_tab

    # "Use these settings" from the history restores the request panel.
    window.request_panel.set_request(GenerationRequest(model="tiny-svd"))
    window.history_panel.use_button.click()
    assert window.request_panel.request() == REQUEST


def test_comparison_results_reach_the_lab(make_window):
    window = make_window()
    dispatch = window.client._dispatch
    job = {
        "job_id": "c1",
        "status": "running",
        "request": REQUEST.to_dict(),
        "compare": [["sequential", "cpu:1"]],
    }
    dispatch({"type": "queue", "jobs": [job]})
    dispatch({"type": "job_started", "job_id": "c1"})
    dispatch({"type": "stage", "job_id": "c1", "stage": "load"})
    assert window.timeline.ranks() == [0]  # the first entry runs sequentially on one device
    row = {
        "strategy": "sequential",
        "devices": "cpu:1",
        "denoise_s": 1.0,
        "ideal_speedup": 1.0,
        "speedup": 1.0,
    }
    dispatch({"type": "job_finished", "job_id": "c1", "result": {"rows": [row], "reference": "sequential"}})
    assert window.compare_lab.table.rowCount() == 1
    assert window.tabs.currentWidget() is window.compare_lab


def test_settings_are_remembered(make_window):
    window = make_window()
    window.request_panel.set_request(REQUEST)
    window.request_panel.set_seed_mode("increment")
    window.compare_lab.add_entry("batchstep", "cpu:1")
    window.close()
    again = make_window()
    assert again.request_panel.request() == REQUEST
    assert again.request_panel.seed_mode_value() == "increment"
    assert again.compare_lab.entries()[-1] == ["batchstep", "cpu:1"]


def test_generate_needs_an_engine(make_window):
    window = make_window()
    assert window.client.state == "stopped"
    assert not window.request_panel.generate_button.isEnabled()
    assert "stopped" in window.status_label.text()


def test_add_model_folder(make_window, tmp_path, catalog):
    window = make_window()
    window._add_model_folder(str(tmp_path))  # not a pipeline folder: refused, not remembered
    assert window.settings.model_folders() == []
    assert "model_index.json" in window.statusBar().currentMessage()

    folder = tmp_path / "my-cogvideox"
    folder.mkdir()
    (folder / "model_index.json").write_text('{"_class_name": "CogVideoXPipeline"}')
    window._add_model_folder(str(folder))
    assert window.settings.model_folders() == [str(folder)]
    entry = {
        "name": "my-cogvideox",
        "path": str(folder),
        "source": "local",
        "family": "cogvideox",
        "defaults": {},
    }
    window.client._dispatch({**catalog, "models": [*catalog["models"], entry]})  # the engine's answer
    assert window.request_panel.request().model == "my-cogvideox"


def test_a_job_that_ends_early_keeps_its_message(qtbot, make_window):
    """Steps refresh the progress a little later; the end of a job must not be overwritten by that."""
    window = make_window()
    dispatch = window.client._dispatch
    label = window.progress_panel.label

    def run_steps(job_id: str) -> None:
        job = {"job_id": job_id, "status": "running", "request": REQUEST.to_dict(), "compare": None}
        dispatch({"type": "queue", "jobs": [job]})
        dispatch({"type": "job_started", "job_id": job_id})
        dispatch({"type": "stage", "job_id": job_id, "stage": "denoise"})
        for step in range(3):
            step_event = {"type": "step", "job_id": job_id, "rank": 0, "step": step, "total": 4}
            dispatch({**step_event, "action": "compute", "compute_s": 0.01, "comm_wait_s": 0.0})

    run_steps("j1")
    dispatch({"type": "job_cancelled", "job_id": "j1"})
    assert label.text() == "Cancelled."
    qtbot.wait(250)  # longer than the step refresh delay
    assert label.text() == "Cancelled."

    run_steps("j2")
    window.client.engine_died.emit(-1, "killed")
    assert label.text().startswith("Engine stopped")
    qtbot.wait(250)
    assert label.text().startswith("Engine stopped")


def test_chosen_output_folder_is_used_remembered_and_shown(make_window, tmp_path, monkeypatch):
    window = make_window()
    sent = []
    monkeypatch.setattr(window.client, "submit", lambda request, **kwargs: sent.append(request) or True)
    folder = tmp_path / "my clips"
    folder.mkdir()
    window.set_output_folder(folder)
    window.submit(REQUEST)
    assert sent[-1]["output"] == str(folder) + "/"
    assert window.history_panel.folder == folder and window.settings.output_folder() == str(folder)
    explicit = dataclasses.replace(REQUEST, output="/elsewhere/clip.mp4")
    window.submit(explicit)
    assert sent[-1]["output"] == "/elsewhere/clip.mp4"  # a request's own choice wins
