"""The result viewer: plays a finished clip with play/pause, loop, scrub and mute.

A new video result starts playing muted and looping (a generated clip is short; sound would be a
surprise); audio results load paused and unmuted (Play must be heard), and show their waveform
(`ui.waveform`). A video can be stepped one frame at a time (the buttons, or the , and . keys): the
player pauses and moves by one frame at the clip's rate (from its sidecar, else the player's
metadata, else `DEFAULT_FPS`).
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt, QUrl
from PySide6.QtGui import QKeyEvent
from PySide6.QtMultimedia import QAudioOutput, QMediaMetaData, QMediaPlayer
from PySide6.QtMultimediaWidgets import QVideoWidget
from PySide6.QtWidgets import (
    QCheckBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSlider,
    QStackedLayout,
    QVBoxLayout,
    QWidget,
)

from engine.errors import UserError
from engine.outputs import EXTENSIONS, read_request, sidecar_path
from ui.waveform import WaveformView

DEFAULT_FPS = 8.0  # when neither the sidecar nor the player knows the clip's rate


def _clock(ms: int) -> str:
    seconds = max(0, ms) / 1000
    return f"{int(seconds // 60)}:{seconds % 60:04.1f}"


def frame_step_target(position: int, delta: int, fps: float, duration: int = 0) -> int:
    """The player position (ms) `delta` frames from `position`, at `fps`, within [0, duration].

    The current frame is the one whose start is nearest `position`; the target is the start of
    the frame `delta` away, rounded to the millisecond (QMediaPlayer positions are whole ms).
    """
    fps = fps if fps > 0 else DEFAULT_FPS
    frame = max(0, round(position * fps / 1000) + delta)
    target = round(frame * 1000 / fps)
    if duration > 0:
        # The last frame starts one frame before the end.
        target = min(target, max(0, duration - round(1000 / fps)))
    return max(0, target)


class ResultViewer(QWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.path: str | None = None
        self.fps: float | None = None  # the clip's frame rate, when known
        self.setFocusPolicy(Qt.FocusPolicy.StrongFocus)  # for the , and . keys
        self.player = QMediaPlayer(self)
        self.audio = QAudioOutput(self)
        self.player.setAudioOutput(self.audio)
        self.video = QVideoWidget()
        self.player.setVideoOutput(self.video)
        self.audio_label = QLabel("No clip yet", alignment=Qt.AlignmentFlag.AlignCenter)
        self.audio_label.setStyleSheet("font-size: 16px; color: palette(mid);")
        self.waveform = WaveformView()
        self.waveform.hide()
        audio_page = QWidget()
        audio_layout = QVBoxLayout(audio_page)
        audio_layout.addWidget(self.audio_label, 1)
        audio_layout.addWidget(self.waveform)

        self.play_button = QPushButton("Play")
        self.play_button.clicked.connect(self.toggle_play)
        self.prev_button = QPushButton("◀|")
        self.prev_button.setToolTip("Previous frame (,)")
        self.prev_button.clicked.connect(lambda: self.step_frame(-1))
        self.next_button = QPushButton("|▶")
        self.next_button.setToolTip("Next frame (.)")
        self.next_button.clicked.connect(lambda: self.step_frame(1))
        for button in (self.prev_button, self.next_button):
            button.setFocusPolicy(Qt.FocusPolicy.NoFocus)
        self.loop_box = QCheckBox("Loop")
        self.loop_box.setChecked(True)
        self.loop_box.toggled.connect(self._apply_loop)
        self.mute_box = QCheckBox("Mute")
        self.mute_box.toggled.connect(self.audio.setMuted)
        self.slider = QSlider(Qt.Orientation.Horizontal)
        self.slider.setRange(0, 0)
        self.slider.sliderMoved.connect(self.player.setPosition)
        self.time_label = QLabel("0:00.0 / 0:00.0")
        self.name_label = QLabel()
        self.name_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        self.player.positionChanged.connect(self._on_position)
        self.player.durationChanged.connect(self._on_duration)
        self.player.playbackStateChanged.connect(self._on_state)
        self.player.metaDataChanged.connect(self._on_metadata)
        self.player.errorOccurred.connect(lambda _e, text: self.name_label.setText(f"Cannot play: {text}"))

        self.stack = QStackedLayout()
        self.stack.addWidget(audio_page)
        self.stack.addWidget(self.video)
        controls = QHBoxLayout()
        controls.addWidget(self.play_button)
        controls.addWidget(self.prev_button)
        controls.addWidget(self.next_button)
        controls.addWidget(self.slider, 1)
        controls.addWidget(self.time_label)
        controls.addWidget(self.loop_box)
        controls.addWidget(self.mute_box)
        layout = QVBoxLayout(self)
        layout.addLayout(self.stack, 1)
        layout.addLayout(controls)
        layout.addWidget(self.name_label)
        self._apply_loop(True)

    def show_clip(self, path: str, autoplay: bool = True) -> None:
        self.path = path
        audio = Path(path).suffix.lower().lstrip(".") in EXTENSIONS["audio"]
        self.stack.setCurrentIndex(0 if audio else 1)
        self.audio_label.setText(f"♪ {Path(path).name}" if audio else "")
        self.name_label.setText(path)
        self.fps = None if audio else self._sidecar_fps(path)
        self.prev_button.setEnabled(not audio)
        self.next_button.setEnabled(not audio)
        if audio:
            self.waveform.show()
            self.waveform.load(path)
        else:
            self.waveform.hide()
            self.waveform.clear()
        self.player.stop()
        self._reset_time()  # the previous clip's duration must not show until the new one's is known
        self.player.setSource(QUrl.fromLocalFile(path))
        if audio:
            self.mute_box.setChecked(False)  # a video's muted autoplay must not silence audio
        elif autoplay:
            self.mute_box.setChecked(True)
            self.player.play()

    def _reset_time(self) -> None:
        self.slider.setRange(0, 0)
        self.slider.setValue(0)
        self.time_label.setText(f"{_clock(0)} / {_clock(0)}")

    def clear(self) -> None:
        self.player.stop()
        self.player.setSource(QUrl())
        self._reset_time()
        self.path = None
        self.fps = None
        self.waveform.hide()
        self.waveform.clear()
        self.stack.setCurrentIndex(0)
        self.audio_label.setText("No clip yet")
        self.name_label.clear()

    def toggle_play(self) -> None:
        if self.player.playbackState() == QMediaPlayer.PlaybackState.PlayingState:
            self.player.pause()
        elif self.path:
            self.player.play()

    @staticmethod
    def _sidecar_fps(path: str) -> float | None:
        """The requested rate from the clip's sidecar (only the sidecar: no ffmpeg on this thread)."""
        sidecar = sidecar_path(path)
        if not sidecar.is_file():
            return None
        try:
            fps = read_request(sidecar).fps
        except UserError:
            return None
        return float(fps) if fps else None

    def frame_rate(self) -> float:
        return self.fps or DEFAULT_FPS

    def step_target(self, delta: int) -> int:
        return frame_step_target(self.player.position(), delta, self.frame_rate(), self.player.duration())

    def step_frame(self, delta: int) -> None:
        """Pause, then move `delta` frames (negative: back)."""
        if not self.path or self.stack.currentIndex() != 1:
            return
        if self.player.playbackState() == QMediaPlayer.PlaybackState.PlayingState:
            self.player.pause()
        target = self.step_target(delta)
        self.player.setPosition(target)
        self._on_position(target)

    def keyPressEvent(self, event: QKeyEvent) -> None:
        if event.key() == Qt.Key.Key_Comma:
            self.step_frame(-1)
        elif event.key() == Qt.Key.Key_Period:
            self.step_frame(1)
        else:
            super().keyPressEvent(event)

    def _on_metadata(self) -> None:
        if self.fps:
            return  # the sidecar's rate is the one the clip was written at
        rate = self.player.metaData().value(QMediaMetaData.Key.VideoFrameRate)
        if isinstance(rate, (int, float)) and rate > 0:
            self.fps = float(rate)

    def _apply_loop(self, on: bool) -> None:
        self.player.setLoops(QMediaPlayer.Loops.Infinite if on else QMediaPlayer.Loops.Once)

    def _on_position(self, position: int) -> None:
        if not self.slider.isSliderDown():
            self.slider.setValue(position)
        self.time_label.setText(f"{_clock(position)} / {_clock(self.player.duration())}")
        duration = self.player.duration()
        if self.waveform.isVisible() and duration > 0:
            self.waveform.set_playhead(position / duration)

    def _on_duration(self, duration: int) -> None:
        self.slider.setRange(0, duration)
        self.time_label.setText(f"{_clock(self.player.position())} / {_clock(duration)}")

    def _on_state(self, state: QMediaPlayer.PlaybackState) -> None:
        self.play_button.setText("Pause" if state == QMediaPlayer.PlaybackState.PlayingState else "Play")
