"""Tells the user a job has ended: a desktop notification, and a short sound when asked for.

The notification goes through the system tray (`QSystemTrayIcon.showMessage`) where there is one;
elsewhere the window's status bar shows it and the window asks for attention
(`QApplication.alert`). The sound is a short chime written once as a WAV into the cache folder and
played with `QSoundEffect`; `QApplication.beep()` stands in when that cannot play. Both follow the
settings (`StudioSettings.notify_when_done`, `notify_sound`), read at each job's end.
"""

from __future__ import annotations

import math
import struct
import wave
from pathlib import Path

from PySide6.QtCore import QObject, QUrl
from PySide6.QtWidgets import QApplication, QMainWindow, QStyle, QSystemTrayIcon

from ui.settings import StudioSettings
from ui.thumbnails import default_cache_dir

SOUND_NAME = "job-done.wav"
MESSAGE_MS = 8000


def default_sound_dir() -> Path:
    return default_cache_dir().parent / "sounds"


def write_chime(path: Path, sample_rate: int = 22050) -> Path:
    """A 0.25 s two-tone chime (16-bit mono WAV) at `path`, unless one is there already."""
    if path.is_file() and path.stat().st_size > 44:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    frames = bytearray()
    count = int(sample_rate * 0.25)
    for i in range(count):
        t = i / sample_rate
        tone = 880.0 if t < 0.1 else 1320.0
        envelope = min(1.0, i / 200) * (1 - i / count)
        frames += struct.pack("<h", int(0.4 * envelope * 32767 * math.sin(2 * math.pi * tone * t)))
    tmp = path.with_name(path.name + ".tmp")
    with wave.open(str(tmp), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(sample_rate)
        out.writeframes(bytes(frames))
    tmp.replace(path)
    return path


class Notifier(QObject):
    def __init__(self, window: QMainWindow, settings: StudioSettings, sound_dir: Path | None = None) -> None:
        super().__init__(window)
        self.window = window
        self.settings = settings
        self.sound_dir = sound_dir or default_sound_dir()
        self._tray: QSystemTrayIcon | None = None
        self._effect = None  # QSoundEffect, made on first use (it starts the audio backend)

    def job_ended(self, title: str, ok: bool, detail: str = "") -> None:
        """A job has finished (`ok`) or failed; `title` names it, `detail` is the error or clip."""
        if self.settings.notify_when_done():
            heading = "Job done" if ok else "Job failed"
            self.show_message(heading, f"{title}\n{detail}".strip() if detail else title, ok)
        if self.settings.notify_sound():
            self.play_sound()

    def show_message(self, heading: str, text: str, ok: bool = True) -> None:
        if QSystemTrayIcon.isSystemTrayAvailable():
            tray = self._tray_icon()
            icon = QSystemTrayIcon.MessageIcon.Information if ok else QSystemTrayIcon.MessageIcon.Warning
            tray.showMessage(heading, text, icon, MESSAGE_MS)
        else:
            first_line = text.splitlines()[0] if text else ""
            self.window.statusBar().showMessage(f"{heading}: {first_line}", 15000)
            QApplication.alert(self.window)

    def _tray_icon(self) -> QSystemTrayIcon:
        if self._tray is None:
            icon = self.window.windowIcon()
            if icon.isNull():
                icon = self.window.style().standardIcon(QStyle.StandardPixmap.SP_ComputerIcon)
            self._tray = QSystemTrayIcon(icon, self)
            self._tray.setToolTip(self.window.windowTitle())
            self._tray.activated.connect(
                lambda _reason: (self.window.showNormal(), self.window.activateWindow())
            )
        if not self._tray.isVisible():
            self._tray.show()
        return self._tray

    def play_sound(self) -> None:
        try:
            from PySide6.QtMultimedia import QSoundEffect

            if self._effect is None:
                path = write_chime(self.sound_dir / SOUND_NAME)
                self._effect = QSoundEffect(self)
                self._effect.setSource(QUrl.fromLocalFile(str(path)))
                self._effect.setVolume(0.6)
            if self._effect.status() == QSoundEffect.Status.Error:
                QApplication.beep()
                return
            self._effect.play()
        except (ImportError, OSError):
            QApplication.beep()
