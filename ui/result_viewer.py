"""The result viewer: plays a finished clip with play/pause, loop, scrub and mute.

A new video result starts playing muted and looping (a generated clip is short; sound would be a
surprise); audio results load paused, since muted audio shows nothing.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt, QUrl
from PySide6.QtMultimedia import QAudioOutput, QMediaPlayer
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

from engine.outputs import EXTENSIONS


def _clock(ms: int) -> str:
    seconds = max(0, ms) / 1000
    return f"{int(seconds // 60)}:{seconds % 60:04.1f}"


class ResultViewer(QWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.path: str | None = None
        self.player = QMediaPlayer(self)
        self.audio = QAudioOutput(self)
        self.player.setAudioOutput(self.audio)
        self.video = QVideoWidget()
        self.player.setVideoOutput(self.video)
        self.audio_label = QLabel("No clip yet", alignment=Qt.AlignmentFlag.AlignCenter)
        self.audio_label.setStyleSheet("font-size: 16px; color: palette(mid);")

        self.play_button = QPushButton("Play")
        self.play_button.clicked.connect(self.toggle_play)
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
        self.player.errorOccurred.connect(lambda _e, text: self.name_label.setText(f"Cannot play: {text}"))

        self.stack = QStackedLayout()
        self.stack.addWidget(self.audio_label)
        self.stack.addWidget(self.video)
        controls = QHBoxLayout()
        controls.addWidget(self.play_button)
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
        self.player.stop()
        self.player.setSource(QUrl.fromLocalFile(path))
        if autoplay and not audio:
            self.mute_box.setChecked(True)
            self.player.play()

    def clear(self) -> None:
        self.player.stop()
        self.player.setSource(QUrl())
        self.path = None
        self.stack.setCurrentIndex(0)
        self.audio_label.setText("No clip yet")
        self.name_label.clear()

    def toggle_play(self) -> None:
        if self.player.playbackState() == QMediaPlayer.PlaybackState.PlayingState:
            self.player.pause()
        elif self.path:
            self.player.play()

    def _apply_loop(self, on: bool) -> None:
        self.player.setLoops(QMediaPlayer.Loops.Infinite if on else QMediaPlayer.Loops.Once)

    def _on_position(self, position: int) -> None:
        if not self.slider.isSliderDown():
            self.slider.setValue(position)
        self.time_label.setText(f"{_clock(position)} / {_clock(self.player.duration())}")

    def _on_duration(self, duration: int) -> None:
        self.slider.setRange(0, duration)

    def _on_state(self, state: QMediaPlayer.PlaybackState) -> None:
        self.play_button.setText("Pause" if state == QMediaPlayer.PlaybackState.PlayingState else "Play")
