"""The waveform of an audio result: min/max per column, drawn into a pixmap.

The file is read with soundfile in blocks on a worker thread (`QThreadPool`), so a long file never
stalls the window; at most `MAX_COLUMNS` min/max pairs are kept whatever its length. The widget
scales those to its width when it paints.
"""

from __future__ import annotations

import os

import numpy as np
from PySide6.QtCore import QObject, QRunnable, QThreadPool, Signal
from PySide6.QtGui import QColor, QPainter, QPaintEvent, QPalette, QPen, QPixmap, QResizeEvent
from PySide6.QtWidgets import QSizePolicy, QWidget

MAX_COLUMNS = 2000
BLOCK_FRAMES = 1 << 16
SILENCE = 1e-3  # peaks below this draw nothing


def waveform_peaks(path: str | os.PathLike, columns: int = MAX_COLUMNS) -> np.ndarray:
    """[2, N] float32 (min row, max row) of a sound file, all channels together, N <= `columns`.

    Read block by block: memory stays bounded by `BLOCK_FRAMES` whatever the file's length.
    Raises what soundfile raises for a file it cannot read.
    """
    import soundfile as sf

    with sf.SoundFile(os.fspath(path)) as f:
        total = f.frames
        n = max(1, min(columns, total))
        lows = np.zeros(n, np.float32)
        highs = np.zeros(n, np.float32)
        start = 0
        for block in f.blocks(blocksize=BLOCK_FRAMES, dtype="float32", always_2d=True):
            count = len(block)
            if count == 0:
                break
            cols = (np.arange(start, start + count, dtype=np.int64) * n) // max(total, 1)
            cols = np.minimum(cols, n - 1)
            starts = np.r_[0, np.flatnonzero(np.diff(cols)) + 1]
            where = cols[starts]
            lows[where] = np.minimum(lows[where], np.minimum.reduceat(block.min(axis=1), starts))
            highs[where] = np.maximum(highs[where], np.maximum.reduceat(block.max(axis=1), starts))
            start += count
    return np.stack([lows, highs])


class _Signals(QObject):
    done = Signal(int, object)  # generation, peaks (or None when unreadable)


class _PeaksTask(QRunnable):
    def __init__(self, path: str, generation: int, signals: _Signals) -> None:
        super().__init__()
        self.path, self.generation, self.signals = path, generation, signals

    def run(self) -> None:
        try:
            peaks = waveform_peaks(self.path)
        except Exception:  # noqa: BLE001 - an unreadable file shows no waveform
            peaks = None
        self.signals.done.emit(self.generation, peaks)


class WaveformView(QWidget):
    """Shows the waveform of one sound file, and a playhead."""

    loaded = Signal(str)  # the file whose peaks are now shown

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setMinimumHeight(80)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.path: str | None = None
        self.peaks: np.ndarray | None = None
        self.playhead: float | None = None
        self._generation = 0
        self._pixmap: QPixmap | None = None
        self._signals = _Signals(self)
        self._signals.done.connect(self._on_peaks)

    def sizeHint(self):  # noqa: ANN201 - QSize
        hint = super().sizeHint()
        hint.setHeight(100)
        return hint

    def background(self) -> QColor:
        return self.palette().color(QPalette.ColorRole.Base)

    def load(self, path: str) -> None:
        """Read `path` in the background; the waveform appears when done (`loaded`)."""
        self.clear()
        self.path = path
        QThreadPool.globalInstance().start(_PeaksTask(path, self._generation, self._signals))

    def clear(self) -> None:
        self._generation += 1  # a file still being read is dropped when it is done
        self.path = None
        self.peaks = None
        self.playhead = None
        self._pixmap = None
        self.update()

    def set_peaks(self, peaks: np.ndarray | None) -> None:
        self.peaks = peaks
        self._pixmap = None
        self.update()

    def set_playhead(self, fraction: float | None) -> None:
        self.playhead = fraction
        self.update()

    def _on_peaks(self, generation: int, peaks: object) -> None:
        if generation != self._generation:
            return
        self.set_peaks(peaks if isinstance(peaks, np.ndarray) else None)
        self.loaded.emit(self.path or "")

    def pixmap(self) -> QPixmap:
        """The waveform at the widget's size (no playhead)."""
        if self._pixmap is None or self._pixmap.size() != self.size():
            self._pixmap = self._render()
        return self._pixmap

    def _render(self) -> QPixmap:
        width, height = max(1, self.width()), max(1, self.height())
        pixmap = QPixmap(width, height)
        pixmap.fill(self.background())
        if self.peaks is None or self.peaks.shape[1] == 0:
            return pixmap
        lows, highs = self.peaks
        n = len(highs)
        # Peaks to pixel columns: each column takes the extremes of the peaks it covers.
        edges = (np.arange(width + 1, dtype=np.int64) * n) // width
        middle = (height - 1) / 2
        painter = QPainter(pixmap)
        painter.setPen(QPen(self.palette().color(QPalette.ColorRole.Highlight), 1))
        for x in range(width):
            a, b = int(edges[x]), max(int(edges[x + 1]), int(edges[x]) + 1)
            low, high = float(lows[a:b].min()), float(highs[a:b].max())
            if max(abs(low), abs(high)) < SILENCE:
                continue
            top = round(middle - max(0.0, min(1.0, high)) * middle)
            bottom = round(middle - max(-1.0, min(0.0, low)) * middle)
            painter.drawLine(x, top, x, bottom)
        painter.end()
        return pixmap

    def resizeEvent(self, event: QResizeEvent) -> None:
        self._pixmap = None
        super().resizeEvent(event)

    def paintEvent(self, event: QPaintEvent) -> None:
        painter = QPainter(self)
        painter.drawPixmap(0, 0, self.pixmap())
        if self.playhead is not None and self.peaks is not None:
            x = round(max(0.0, min(1.0, self.playhead)) * (self.width() - 1))
            painter.setPen(QPen(self.palette().color(QPalette.ColorRole.Text), 1))
            painter.drawLine(x, 0, x, self.height())
        painter.end()
