"""Queue, history and comparison panels, fed with messages and files like the engine's (no engine)."""

from __future__ import annotations

import csv
import io
import json
import os

import numpy as np
from PIL import Image

from engine.outputs import build_metadata
from engine.protocol import GenerationRequest
from ui.compare_lab import CompareLab, report_to_csv, row_cells
from ui.history_panel import HistoryPanel
from ui.job_progress import JobProgress
from ui.preview_view import PreviewView
from ui.queue_panel import QueuePanel


def job(job_id: str, status: str, prompt: str = "p") -> dict:
    request = GenerationRequest(model="tiny-cogvideox", prompt=prompt, strategy="parastep", devices="cpu:2")
    return {"job_id": job_id, "status": status, "request": request.to_dict(), "compare": None}


# ------------------------------------------------------------------------------------------- queue


def test_queue_reorder_remove_cancel_requeue(qtbot):
    panel = QueuePanel()
    qtbot.addWidget(panel)
    panel.set_jobs([job("r", "running"), job("a", "queued"), job("b", "queued"), job("f", "failed")])
    asked = []
    panel.reorder_requested.connect(lambda ids: asked.append(("reorder", ids)))
    panel.remove_requested.connect(lambda i: asked.append(("remove", i)))
    panel.cancel_requested.connect(lambda i: asked.append(("cancel", i)))
    panel.requeue_requested.connect(lambda i: asked.append(("requeue", i)))

    panel.select("b")
    assert panel.up_button.isEnabled() and not panel.down_button.isEnabled()
    panel.up_button.click()
    panel.remove_button.click()
    panel.select("r")
    assert not panel.remove_button.isEnabled()
    panel.cancel_button.click()
    assert "cancelling" in panel.list.item(0).text()  # acknowledged at the click
    assert not panel.cancel_button.isEnabled()
    panel.select("f")
    panel.requeue_button.click()
    assert asked == [("reorder", ["b", "a"]), ("remove", "b"), ("cancel", "r"), ("requeue", "f")]

    # The engine's next queue message is the truth: the running job ended, the order changed.
    panel.set_jobs([job("r", "cancelled"), job("b", "queued"), job("a", "queued"), job("f", "queued")])
    assert panel.queued_ids() == ["b", "a", "f"] and not panel.cancelling
    panel.hide_finished.setChecked(True)
    assert panel.list.count() == 3


def test_queue_drag_reorder_reports_the_new_order(qtbot):
    panel = QueuePanel()
    qtbot.addWidget(panel)
    panel.set_jobs([job("a", "queued"), job("b", "queued"), job("c", "queued")])
    orders = []
    panel.reorder_requested.connect(orders.append)
    item = panel.list.takeItem(2)  # what a drop does, then the list tells the panel
    panel.list.insertItem(0, item)
    panel.list.dropped.emit()
    assert orders == [["c", "a", "b"]]


# ----------------------------------------------------------------------------------------- history


def write_clip(folder, name: str, request: GenerationRequest, ext: str = "gif", mtime: float = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    clip = folder / f"{name}.{ext}"
    if ext == "gif":
        Image.new("RGB", (48, 32), (200, 30, 30)).save(clip)
    else:
        clip.write_bytes(b"")
    meta = build_metadata(request, timings={"denoise_s": 1.0}, ranks=[])
    sidecar = folder / f"{name}.json"
    sidecar.write_text(json.dumps(meta))
    if mtime:
        os.utime(sidecar, (mtime, mtime))


def test_history_lists_searches_restores_and_deletes(qtbot, tmp_path):
    folder = tmp_path / "clips"
    cat = GenerationRequest(model="tiny-cogvideox", prompt="a cat on a mat", seed=3, steps=6, frames=9)
    rain = GenerationRequest(model="tiny-audioldm2", prompt="rain on a roof", seed=4, seconds=1.5)
    write_clip(folder, "cat", cat, "gif", mtime=1_000_000)
    write_clip(folder, "rain", rain, "wav", mtime=2_000_000)
    (folder / "notes.json").write_text('{"not": "a sidecar"}')
    panel = HistoryPanel(folder)
    qtbot.addWidget(panel)
    panel.refresh()
    assert [e.request.prompt for e in panel.visible_entries()] == ["rain on a roof", "a cat on a mat"]
    assert not panel.list.item(1).icon().isNull()

    panel.search.setText("CAT mat")
    assert [e.request for e in panel.visible_entries()] == [cat]
    restored = []
    panel.use_settings_requested.connect(restored.append)
    panel.list.setCurrentRow(0)
    panel.use_button.click()
    assert restored == [cat]

    favourites = []
    panel.favourites_changed.connect(favourites.append)
    panel.toggle_favourite()
    panel.search.clear()
    panel.favourites_only.setChecked(True)
    assert [e.request for e in panel.visible_entries()] == [cat]
    assert favourites == [[str(folder / "cat.gif")]]

    panel.list.setCurrentRow(0)
    panel.delete_selected(confirm=False)
    assert not (folder / "cat.gif").exists() and not (folder / "cat.json").exists()
    panel.favourites_only.setChecked(False)
    assert [e.request for e in panel.visible_entries()] == [rain]


def test_history_exports_a_clip_to_another_format_with_its_settings(qtbot, tmp_path):
    from engine.outputs import read_request
    from engine.outputs import write_clip as save_clip

    folder = tmp_path / "clips"
    folder.mkdir()
    request = GenerationRequest(model="tiny-cogvideox", prompt="a red circle", fps=8, frames=5)
    frames = np.zeros((5, 32, 48, 3), np.uint8)
    frames[:, :, :24] = 255
    save_clip(
        folder / "clip.mp4", frames=frames, fps=8, metadata=build_metadata(request, timings={}, ranks=[])
    )
    panel = HistoryPanel(folder)
    qtbot.addWidget(panel)
    panel.refresh()
    panel.list.setCurrentRow(0)
    assert panel.export_button.isEnabled()
    exported = panel.export_selected(str(folder / "clip-small.gif"))
    assert exported.is_file() and read_request(exported) == request
    assert len(panel.visible_entries()) == 2  # the export appears in the history


# ---------------------------------------------------------------------------------- compare, progress

REPORT = {
    "reference": "sequential",
    "rows": [
        {
            "strategy": "sequential",
            "devices": "cpu:1",
            "denoise_s": 2.0,
            "total_s": 3.0,
            "ideal_speedup": 1.0,
            "speedup": 1.0,
            "fidelity": {"psnr_db": "inf", "ssim": 1.0, "identical": True, "latent_rel_l2": 0.0},
            "denoiser_calls": 6,
            "compute_s": 1.9,
            "comm_wait_s": 0.0,
            "bytes_sent": 0,
            "bytes_received": 0,
            "output": "/clips/a.mp4",
        },
        {
            "strategy": "parastep",
            "devices": "cpu:2",
            "denoise_s": 1.25,
            "total_s": 2.0,
            "ideal_speedup": 1.5,
            "speedup": 1.6,
            "fidelity": {"psnr_db": 31.5, "ssim": 0.97, "identical": False, "latent_rel_l2": 0.012},
            "denoiser_calls": 8,
            "compute_s": 2.0,
            "comm_wait_s": 0.2,
            "bytes_sent": 123456,
            "bytes_received": 1000,
            "output": "/clips/b.mp4",
        },
    ],
}


def test_compare_lab_submits_shows_and_exports(qtbot, tmp_path):
    request = GenerationRequest(model="tiny-cogvideox", seed=7, steps=6)
    lab = CompareLab(lambda: request)
    qtbot.addWidget(lab)
    lab.set_strategies(["sequential", "parastep", "batchstep"])
    lab.add_entry("batchstep", "cpu:1")
    with qtbot.waitSignal(lab.submit_requested) as signal:
        lab.run_button.click()
    assert signal.args == [request, [["sequential", "cpu:1"], ["parastep", "cpu:2"], ["batchstep", "cpu:1"]]]

    lab.show_report(REPORT)
    assert lab.table.rowCount() == 2
    assert [lab.table.item(1, c).text() for c in range(8)] == row_cells(REPORT["rows"][1])
    assert row_cells(REPORT["rows"][1])[3:7] == [
        "1.60×",
        "1.50×",
        "PSNR 31.5 dB, SSIM 0.97, latent L2 1.20e-02",
        "123,456",
    ]
    assert lab.table.item(0, 5).text() == "identical"
    assert len(lab.chart.series()) == 1 and lab.chart.series()[0].count() == 2
    assert not lab.chart_view.grab().isNull()

    lab.export(tmp_path / "c.csv", "csv")
    lab.export(tmp_path / "c.json", "json")
    rows = list(csv.DictReader(io.StringIO((tmp_path / "c.csv").read_text())))
    assert [r["strategy"] for r in rows] == ["sequential", "parastep"] and rows[1]["psnr_db"] == "31.5"
    assert json.loads((tmp_path / "c.json").read_text()) == REPORT
    assert report_to_csv(REPORT).splitlines()[0].startswith("strategy,devices,denoise_s")


def test_progress_covers_every_stage():
    progress = JobProgress()
    progress.reset("j")
    fractions = []
    for stage in ("load", "encode", "denoise"):
        progress.on_stage(stage)
        fractions.append(progress.fraction())
    for step in range(4):
        progress.on_step({"rank": 1, "step": step, "total": 4})  # other ranks do not count
        progress.on_step({"rank": 0, "step": step, "total": 4})
        fractions.append(progress.fraction())
    for stage in ("decode", "save"):
        progress.on_stage(stage)
        fractions.append(progress.fraction())
    progress.finish()
    fractions.append(progress.fraction())
    assert fractions == sorted(fractions) and fractions[0] == 0 and fractions[-1] == 1
    assert progress.step == 4 and progress.total == 4
    assert progress.text() == "done"


def test_preview_coalesces_and_flips(qtbot):
    import base64

    from PySide6.QtCore import QBuffer, QByteArray, QIODevice
    from PySide6.QtGui import QColor, QImage

    def png(colour: str) -> str:
        image = QImage(32, 16, QImage.Format.Format_RGB32)
        image.fill(QColor(colour))
        data = QByteArray()
        buffer = QBuffer(data)
        buffer.open(QIODevice.OpenModeFlag.WriteOnly)
        image.save(buffer, "PNG")
        return base64.b64encode(bytes(data.data())).decode()

    view = PreviewView()
    qtbot.addWidget(view)
    for step in range(5):  # a burst: only the newest is decoded
        view.show_preview(
            {"step": step, "total": 5, "images": [png("red"), png("blue")], "frame_indices": [0, 4]}
        )
    qtbot.waitUntil(lambda: view.decoded == 1)
    assert view.step == 5 and view.frame_indices == [0, 4]
    first = view.current
    qtbot.waitUntil(lambda: view.current != first, timeout=2000)  # the flipbook plays
    assert not view.grab().isNull()


def test_mp4_thumbnails_are_made_in_the_background(qtbot, tmp_path):
    import numpy as np

    from engine.outputs import write_clip
    from ui.thumbnails import ThumbnailCache

    folder = tmp_path / "clips"
    folder.mkdir()
    frames = np.zeros((3, 32, 48, 3), np.uint8)
    frames[..., 0] = 220  # red
    request = GenerationRequest(model="tiny-cogvideox", prompt="red")
    clip = write_clip(
        folder / "red.mp4", frames=frames, fps=8, metadata=build_metadata(request, timings={}, ranks=[])
    )
    cache = ThumbnailCache(tmp_path / "thumbs")
    panel = HistoryPanel(folder, cache)
    qtbot.addWidget(panel)
    with qtbot.waitSignal(cache.ready, timeout=30_000) as ready:
        panel.refresh()  # the list shows a badge, and asks for the frame
    assert ready.args == [str(clip)]
    image = cache.get(clip)
    assert image is not None and image.width() == 192
    colour = image.pixelColor(image.width() // 2, image.height() // 2)
    assert colour.red() > 180 and colour.green() < 60 and colour.blue() < 60
    assert cache.pending() == 0
    cache.get(folder / "missing.mp4")  # gone or unreadable clips are skipped quietly
    assert cache.pending() == 0


def test_a_long_preview_is_decoded_a_slice_at_a_time(qtbot, monkeypatch):
    """Tens of frames are decoded over several turns of the event loop; the old frames stay up
    meanwhile, and a preview that arrives during the decode is shown next."""
    import base64

    from PySide6.QtCore import QBuffer, QByteArray, QIODevice
    from PySide6.QtGui import QColor, QImage

    import ui.preview_view as preview_view

    def png(colour: str) -> str:
        image = QImage(32, 16, QImage.Format.Format_RGB32)
        image.fill(QColor(colour))
        data = QByteArray()
        buffer = QBuffer(data)
        buffer.open(QIODevice.OpenModeFlag.WriteOnly)
        image.save(buffer, "PNG")
        return base64.b64encode(bytes(data.data())).decode()

    monkeypatch.setattr(preview_view, "DECODE_SLICE_S", 0.0)  # one frame per turn
    view = PreviewView()
    qtbot.addWidget(view)
    view.show_preview({"step": 0, "total": 9, "images": [png("red")], "frame_indices": [0]})
    view.flush()
    assert view.decoded == 1 and len(view.frames) == 1

    long_preview = {"step": 4, "total": 9, "images": [png("blue")] * 6, "frame_indices": list(range(6))}
    view.show_preview(long_preview)
    view._refresh.stop()
    view._decode_pending()  # what the refresh timer does: the first slice only
    assert view.decoded == 1 and len(view.frames) == 1  # still the red frame
    assert view.frames[0].pixelColor(0, 0) == QColor("red")
    view.show_preview({"step": 6, "total": 9, "images": [png("green")] * 2, "frame_indices": [0, 4]})
    qtbot.waitUntil(lambda: view.decoded == 2, timeout=2000)
    assert len(view.frames) == 6 and view.step == 5  # the long preview, complete
    qtbot.waitUntil(lambda: view.decoded == 3, timeout=2000)
    assert len(view.frames) == 2 and view.step == 7 and view.frames[0].pixelColor(0, 0) == QColor("green")
