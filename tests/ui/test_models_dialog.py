"""The Models dialog against the local hub: list, download with progress, cancel, resume, delete."""

from __future__ import annotations

from PySide6.QtWidgets import QMessageBox

from engine.checkpoints import folder_for
from tests.test_downloads import HUB_ID, hub, served  # noqa: F401 (fixtures)
from tests.ui.test_main_window import make_window  # noqa: F401 (fixture)
from ui.models_dialog import ModelsDialog

TIMEOUT_MS = 30_000


def test_download_cancel_resume_and_delete(qtbot, hub, monkeypatch):  # noqa: F811
    dialog = ModelsDialog()
    qtbot.addWidget(dialog)
    names = [dialog.table.item(row, 0).text() for row in range(dialog.table.rowCount())]
    assert {"cogvideox-2b", "svd", "wan2.1-t2v-1.3b", "stable-audio-open-1.0"} <= set(names)
    assert {dialog.table.item(row, 5).text() for row in range(dialog.table.rowCount())} == {"—"}
    changed = []
    dialog.models_changed.connect(lambda: changed.append(True))

    # cancel in the middle: the transfer is slowed down so the click lands during it
    hub.faults.chunk_delay_s = 0.05
    dialog.other.setText(HUB_ID)
    progress = []
    dialog.pull.progress.connect(progress.append)
    dialog.download_button.click()
    assert dialog.cancel_button.isEnabled() and not dialog.download_button.isEnabled()
    qtbot.waitUntil(lambda: any(m["stage"] == "download" for m in progress), timeout=TIMEOUT_MS)
    with qtbot.waitSignal(dialog.pull.finished, timeout=TIMEOUT_MS) as cancelled:
        dialog.cancel_button.click()
    assert cancelled.args[0] is False and "resumes" in dialog.status.text()
    assert not folder_for(HUB_ID).exists() and not changed

    # download again: resumes, shows bytes, speed and ETA, ends installed
    hub.faults.chunk_delay_s = 0.0
    with qtbot.waitSignal(dialog.pull.finished, timeout=TIMEOUT_MS) as done:
        dialog.download_button.click()
    assert done.args[0] is True, done.args[1]
    assert any("/s  ETA" in line for line in _status_lines(progress))
    assert dialog.progress_bar.value() == 1000 and changed == [True]
    dialog.select(HUB_ID)
    row = dialog.table.currentRow()
    assert dialog.table.item(row, 5).text() == "downloaded" and dialog.delete_button.isEnabled()

    # delete, after the confirmation
    asked = []
    monkeypatch.setattr(
        QMessageBox, "question", lambda *args, **kw: asked.append(args) or QMessageBox.StandardButton.Yes
    )
    dialog.delete_button.click()
    assert asked and not folder_for(HUB_ID).exists() and changed == [True, True]
    assert HUB_ID not in [dialog.table.item(r, 1).text() for r in range(dialog.table.rowCount())]


def _status_lines(progress: list[dict]) -> list[str]:
    from types import SimpleNamespace

    from app.pull_command import progress_line

    return [progress_line(SimpleNamespace(**m)) for m in progress if m["stage"] == "download"]


def test_the_window_opens_it_and_lists_downloaded_models(make_window, catalog, monkeypatch, tmp_path):  # noqa: F811
    monkeypatch.setenv("PARASTEP_MODELS_DIR", str(tmp_path / "models"))
    window = make_window()
    fetched = []
    monkeypatch.setattr(window.client, "fetch_catalog", lambda folders=None: fetched.append(folders))
    window.request_panel.get_models_button.click()
    assert window.models_dialog is not None and window.models_dialog.isVisible()
    window.models_dialog.models_changed.emit()  # a model was installed or deleted
    assert len(fetched) == 1
    pulled = {"name": HUB_ID, "path": "/x", "source": "downloaded", "family": "cogvideox", "defaults": {}}
    window.client._dispatch({**catalog, "models": [*catalog["models"], pulled]})
    box = window.request_panel.model_box
    assert "Downloaded" in [box.itemText(i) for i in range(box.count())]
    assert box.findData(HUB_ID) >= 0

    # checkpoints not installed are listed; picking one offers the download, the model stays
    before = window.request_panel.request().model
    window.models_dialog.hide()
    box.setCurrentIndex(box.findData("get:svd-xt"))
    assert window.request_panel.request().model == before
    assert window.models_dialog.isVisible() and window.models_dialog.selected()["name"] == "svd-xt"
