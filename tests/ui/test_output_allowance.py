"""The window tells the engine the output folder the user chose (the engine writes clips of requests,
whose output may come from a restored sidecar, only there and in the default folder)."""

from __future__ import annotations

from ui.engine_client import EngineClient
from ui.main_window import MainWindow


def test_the_chosen_folder_is_allowed_when_chosen_and_on_every_welcome(
    qtbot, tmp_path, settings, monkeypatch
):
    client = EngineClient(str(tmp_path / "none.sock"), None, auto_restart=False)
    window = MainWindow(client, settings, output_dir=tmp_path / "clips")
    qtbot.addWidget(window)
    sent = []
    monkeypatch.setattr(client, "send", lambda message: sent.append(message) or True)

    client.welcomed.emit({"type": "welcome"})
    assert sent == []  # nothing chosen: the engine's default folder needs no allowance

    folder = tmp_path / "my clips"
    folder.mkdir()
    window.set_output_folder(folder)
    assert sent == [{"type": "allow_output", "folder": str(folder)}]
    client.welcomed.emit({"type": "welcome"})  # e.g. a restarted engine, which knows nothing yet
    assert sent[-1] == {"type": "allow_output", "folder": str(folder)} and len(sent) == 2
