"""Result viewer frame stepping, the audio waveform, and the job-ended notification (no engine)."""

from __future__ import annotations

import numpy as np
import pytest
from PySide6.QtCore import Qt
from PySide6.QtMultimedia import QMediaPlayer
from PySide6.QtWidgets import QSystemTrayIcon

from engine.outputs import build_metadata, write_clip
from engine.protocol import GenerationRequest
from ui.engine_client import EngineClient
from ui.main_window import MainWindow
from ui.notifier import Notifier, write_chime
from ui.result_viewer import ResultViewer, frame_step_target
from ui.waveform import WaveformView, waveform_peaks

VIDEO = GenerationRequest(model="tiny-cogvideox", prompt="waves", frames=8, height=64, width=96, fps=8)
AUDIO = GenerationRequest(model="tiny-audioldm", prompt="a tone")


def _video(tmp_path):
    frames = np.zeros((8, 64, 96, 3), np.uint8)
    for i in range(8):
        frames[i, :, : (i + 1) * 12] = 255  # a bar that grows frame by frame
    meta = build_metadata(VIDEO, timings={}, ranks=[])
    return write_clip(tmp_path / "clip.mp4", frames=frames, fps=8, metadata=meta)


def _audio(tmp_path, name: str, amplitude: float):
    t = np.arange(16000) / 16000
    tone = (amplitude * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    meta = build_metadata(AUDIO, timings={}, ranks=[])
    return write_clip(tmp_path / name, audio=tone, sample_rate=16000, metadata=meta)


# ---- frame step -------------------------------------------------------------------------------------
def test_frame_step_target():
    assert frame_step_target(0, 1, 8.0) == 125
    assert frame_step_target(125, 1, 8.0) == 250
    assert frame_step_target(130, -1, 8.0) == 0  # 130 ms is frame 1
    assert frame_step_target(0, -1, 8.0) == 0
    assert frame_step_target(875, 1, 8.0, duration=1000) == 875  # the last frame stays
    assert frame_step_target(0, 1, 24.0) == 42
    assert frame_step_target(0, 1, 0.0) == 125  # unknown rate: DEFAULT_FPS (8)


def test_next_frame_pauses_and_advances_one_frame(qtbot, tmp_path):
    clip = _video(tmp_path)
    viewer = ResultViewer()
    qtbot.addWidget(viewer)
    viewer.show()
    viewer.show_clip(str(clip), autoplay=False)
    assert viewer.fps == 8.0  # from the sidecar
    assert viewer.prev_button.isEnabled() and viewer.next_button.isEnabled()

    try:
        qtbot.waitUntil(lambda: viewer.player.duration() > 0, timeout=3000)
        decoded = True
    except AssertionError:
        decoded = False  # no usable backend here: check the positions the steps ask for
    set_position = viewer.player.setPosition
    asked: list[int] = []
    viewer.player.setPosition = lambda ms: (asked.append(ms), set_position(ms))

    viewer.player.play()
    qtbot.keyClick(viewer, Qt.Key.Key_Period)
    assert viewer.player.playbackState() != QMediaPlayer.PlaybackState.PlayingState  # paused first
    first = asked[-1]
    assert first % 125 == 0  # a frame boundary at 8 fps
    viewer.next_button.click()
    assert asked[-1] == first + 125
    if decoded:
        qtbot.waitUntil(lambda: viewer.player.position() == first + 125, timeout=3000)
        assert viewer.slider.value() == first + 125
    viewer.prev_button.click()
    qtbot.keyClick(viewer, Qt.Key.Key_Comma)
    assert asked[-2:] == [first, max(0, first - 125)]
    viewer.clear()


# ---- waveform ----------------------------------------------------------------------------------------
def test_waveform_peaks_are_bounded(tmp_path):
    peaks = waveform_peaks(_audio(tmp_path, "tone.wav", 0.5), columns=300)
    assert peaks.shape == (2, 300)
    assert peaks[1].max() == pytest.approx(0.5, abs=0.01) and peaks[0].min() == pytest.approx(-0.5, abs=0.01)


def test_waveform_peaks_cover_both_channels_of_a_stereo_clip(tmp_path):
    # Stable Audio's clips are 44.1 kHz stereo: the view draws the envelope of both channels together.
    t = np.arange(44100) / 44100
    tone = np.sin(2 * np.pi * 440 * t)
    stereo = np.stack([0.3 * tone, 0.7 * tone], axis=1).astype(np.float32)
    meta = build_metadata(AUDIO, timings={}, ranks=[])
    clip = write_clip(tmp_path / "stereo.wav", audio=stereo, sample_rate=44100, metadata=meta)
    peaks = waveform_peaks(clip, columns=100)
    assert peaks.shape == (2, 100)
    assert peaks[1].max() == pytest.approx(0.7, abs=0.01) and peaks[0].min() == pytest.approx(-0.7, abs=0.01)


def _drawn_columns(view: WaveformView) -> int:
    image = view.pixmap().toImage()
    background = view.background().rgb()
    return sum(
        any(image.pixel(x, y) & 0xFFFFFF != background & 0xFFFFFF for y in range(image.height()))
        for x in range(image.width())
    )


@pytest.mark.parametrize(
    ("name", "amplitude", "drawn"), [("tone.flac", 0.8, True), ("silence.wav", 0.0, False)]
)
def test_waveform_draws_a_tone_and_not_silence(qtbot, tmp_path, name, amplitude, drawn):
    clip = _audio(tmp_path, name, amplitude)
    viewer = ResultViewer()
    qtbot.addWidget(viewer)
    viewer.resize(400, 300)
    viewer.show()
    with qtbot.waitSignal(viewer.waveform.loaded, timeout=5000):
        viewer.show_clip(str(clip))
    view = viewer.waveform
    assert view.isVisible() and view.width() > 100
    columns = _drawn_columns(view)
    if drawn:
        assert columns >= view.width() - 2  # across its whole width
    else:
        assert columns == 0
    viewer.clear()


# ---- notification -------------------------------------------------------------------------------------
@pytest.fixture
def window(qtbot, tmp_path, settings, catalog):
    client = EngineClient(str(tmp_path / "none.sock"), None, auto_restart=False)
    window = MainWindow(client, settings, output_dir=tmp_path / "clips")
    qtbot.addWidget(window)
    client._dispatch(catalog)
    job = {"job_id": "j1", "status": "running", "request": VIDEO.to_dict(), "compare": None}
    client._dispatch({"type": "queue", "jobs": [job]})
    return window


@pytest.fixture
def calls(window, monkeypatch):
    seen: list[tuple] = []
    monkeypatch.setattr(window.notifier, "show_message", lambda *a: seen.append(("message", *a)))
    monkeypatch.setattr(window.notifier, "play_sound", lambda: seen.append(("sound",)))
    return seen


def test_job_end_notifies_with_the_title(window, calls):
    assert window.notify_action.isChecked() and not window.sound_action.isChecked()  # the defaults
    window.client.job_finished.emit("j1", {"output": "/tmp/x/clip.mp4"})
    assert calls == [("message", "Job done", "tiny-cogvideox: waves\nclip.mp4", True)]
    calls.clear()
    window.client.job_failed.emit("j1", "out of memory")
    assert calls == [("message", "Job failed", "tiny-cogvideox: waves\nout of memory", False)]


def test_notification_follows_the_settings(window, calls, settings):
    window.sound_action.setChecked(True)
    assert settings.notify_sound()
    window.client.job_finished.emit("j1", {})
    assert [c[0] for c in calls] == ["message", "sound"]
    calls.clear()
    window.notify_action.setChecked(False)
    assert not settings.notify_when_done()
    window.client.job_failed.emit("j1", "boom")
    assert calls == [("sound",)]
    calls.clear()
    window.sound_action.setChecked(False)
    window.client.job_finished.emit("j1", {})
    assert calls == []


def test_notifier_falls_back_to_the_status_bar(window, monkeypatch, tmp_path):
    monkeypatch.setattr(QSystemTrayIcon, "isSystemTrayAvailable", staticmethod(lambda: False))
    alerts = []
    monkeypatch.setattr("ui.notifier.QApplication.alert", lambda w, ms=0: alerts.append(w))
    window.notifier.show_message("Job done", "tiny-cogvideox: waves\nclip.mp4")
    assert window.statusBar().currentMessage() == "Job done: tiny-cogvideox: waves"
    assert alerts == [window]


def test_chime_is_written_once(tmp_path):
    path = write_chime(tmp_path / "sounds" / "done.wav")
    stamp = path.stat().st_mtime_ns
    assert path.stat().st_size > 1000
    assert write_chime(path).stat().st_mtime_ns == stamp


def test_sound_uses_a_cached_chime_or_beeps(qtbot, window, tmp_path, monkeypatch):
    beeps = []
    monkeypatch.setattr("ui.notifier.QApplication.beep", lambda: beeps.append(1))
    notifier = Notifier(window, window.settings, sound_dir=tmp_path / "sounds")
    notifier.play_sound()  # plays the chime, or beeps where QSoundEffect cannot load it
    assert (tmp_path / "sounds" / "job-done.wav").is_file()
    assert notifier._effect is not None or beeps
