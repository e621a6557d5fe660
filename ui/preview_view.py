"""The live preview of the denoised estimate x0.

Video previews play as a looping flipbook of the latest frames; audio previews show the
spectrogram image. Previews may arrive faster than they are worth drawing (several ranks, short
steps), so they are coalesced: only the newest one is decoded, at most REFRESH_MS apart. A preview
of a long clip holds tens of PNG frames (about 2-3 ms each to decode), so its frames are decoded a
few at a time, DECODE_SLICE_S per turn of the event loop; the previous frames stay on screen until
the new set is complete (scripts/benchmark_window.py measures the effect on the event loop).
"""

from __future__ import annotations

import base64
import time
from typing import Any

from PySide6.QtCore import QRectF, Qt, QTimer
from PySide6.QtGui import QColor, QImage, QPainter, QPaintEvent
from PySide6.QtWidgets import QSizePolicy, QWidget

REFRESH_MS = 100  # at most ~10 decoded previews per second
FLIPBOOK_FPS = 8
DECODE_SLICE_S = 0.008  # PNG decoding per turn of the event loop


def decode_png(data: str) -> QImage:
    """A base64-encoded PNG as a QImage (null when it cannot be read)."""
    image = QImage()
    try:
        image.loadFromData(base64.b64decode(data, validate=False), "PNG")
    except (ValueError, TypeError):
        return QImage()
    return image


class PreviewView(QWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setMinimumSize(240, 160)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        self.modality = "video"
        self.frames: list[QImage] = []
        self.frame_indices: list[int] = []
        self.current = 0
        self.step = 0
        self.total = 0
        self.decoded = 0  # previews decoded so far (the rest were coalesced away)
        self.message = "No preview yet"
        self._pending: dict[str, Any] | None = None  # the newest preview, not decoded yet
        self._decoding: dict[str, Any] | None = None  # the preview whose frames are being decoded
        self._decoded_part: list[QImage] = []
        self._next_image = 0

        self._refresh = QTimer(self, singleShot=True, interval=REFRESH_MS)
        self._refresh.timeout.connect(self._decode_pending)
        self._slice = QTimer(self, singleShot=True, interval=0)
        self._slice.timeout.connect(self._decode_slice)
        self._flip = QTimer(self, interval=1000 // FLIPBOOK_FPS)
        self._flip.timeout.connect(self._next_frame)

    def set_modality(self, modality: str) -> None:
        self.modality = modality

    def clear(self, message: str = "No preview yet") -> None:
        self._pending = None
        self._refresh.stop()
        self._stop_decoding()
        self._flip.stop()
        self.frames, self.frame_indices = [], []
        self.current = self.step = self.total = 0
        self.message = message
        self.update()

    def set_message(self, message: str) -> None:
        self.message = message
        self.update()

    def show_preview(self, event: dict[str, Any]) -> None:
        """Take a `preview` event; it is drawn at the next refresh unless a newer one replaces it."""
        self._pending = event
        if not self._refresh.isActive() and self._decoding is None:
            self._refresh.start()

    def flush(self) -> None:
        """Decode the newest preview now, all at once (tests, and the last preview of a job)."""
        self._refresh.stop()
        if self._pending is not None:
            self._stop_decoding()
            self._decode_pending(everything=True)
        elif self._decoding is not None:
            self._decode_slice(everything=True)

    def _decode_pending(self, everything: bool = False) -> None:
        event, self._pending = self._pending, None
        if event is None:
            return
        self._decoding, self._decoded_part, self._next_image = event, [], 0
        self._decode_slice(everything)

    def _decode_slice(self, everything: bool = False) -> None:
        """Decode frames of the preview in progress for about DECODE_SLICE_S (or all of them)."""
        event = self._decoding
        if event is None:
            return
        images = event.get("images", [])
        start = time.perf_counter()
        while self._next_image < len(images):
            image = decode_png(images[self._next_image])
            self._next_image += 1
            if not image.isNull():
                self._decoded_part.append(image)
            if not everything and time.perf_counter() - start >= DECODE_SLICE_S:
                break
        if self._next_image < len(images):
            self._slice.start()  # the rest at the next turn of the event loop
            return
        decoded = self._decoded_part
        self._stop_decoding()
        if decoded:
            self._show_frames(event, decoded)
        if self._pending is not None:
            self._refresh.start()  # a newer preview came meanwhile

    def _stop_decoding(self) -> None:
        self._slice.stop()
        self._decoding, self._decoded_part, self._next_image = None, [], 0

    def _show_frames(self, event: dict[str, Any], images: list[QImage]) -> None:
        self.frames = images
        indices = list(event.get("frame_indices") or [])
        self.frame_indices = indices if len(indices) == len(images) else list(range(len(images)))
        self.current %= len(images)
        self.step = int(event.get("step", 0)) + 1
        self.total = int(event.get("total", 0))
        self.decoded += 1
        if len(images) > 1 and not self._flip.isActive():
            self._flip.start()
        elif len(images) == 1:
            self._flip.stop()
        self.update()

    def _next_frame(self) -> None:
        if self.frames:
            self.current = (self.current + 1) % len(self.frames)
            self.update()

    def paintEvent(self, event: QPaintEvent) -> None:
        painter = QPainter(self)
        painter.fillRect(self.rect(), QColor(24, 24, 28))
        if not self.frames:
            painter.setPen(QColor(160, 160, 170))
            flags = Qt.AlignmentFlag.AlignCenter | Qt.TextFlag.TextWordWrap
            painter.drawText(self.rect().adjusted(12, 12, -12, -12), flags, self.message)
            return
        image = self.frames[self.current]
        area = QRectF(self.rect()).adjusted(4, 4, -4, -22)
        if self.modality == "audio":
            target = area  # a spectrogram reads best stretched over the full width
        else:
            scale = min(area.width() / image.width(), area.height() / image.height())
            w, h = image.width() * scale, image.height() * scale
            target = QRectF(area.center().x() - w / 2, area.center().y() - h / 2, w, h)
        painter.setRenderHint(QPainter.RenderHint.SmoothPixmapTransform)
        painter.drawImage(target, image)
        painter.setPen(QColor(200, 200, 210))
        caption = f"x0 preview · step {self.step}/{self.total}"
        if self.modality != "audio" and len(self.frames) > 1:
            caption += f" · frame {self.frame_indices[self.current]} ({len(self.frames)} shown)"
        painter.drawText(
            QRectF(self.rect()).adjusted(6, 0, -6, -4),
            Qt.AlignmentFlag.AlignBottom | Qt.AlignmentFlag.AlignLeft,
            caption,
        )
