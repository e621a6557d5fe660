"""The per-device timeline: the picture of ParaStep.

One lane per rank, one mark per denoising step, coloured by what the rank did in that step:
compute (an exact denoiser call), reuse (a scheduler step on a cached prediction, no call),
receive (rank 0 applying a prediction sent by another rank), idle, or batched (several latents
in one call). A darker foot in each mark shows the share of that step spent waiting on
communication. The warm-up steps are shaded and the parallel rounds separated, so the shape of
the strategy (W exact steps, then rounds of N) is visible at a glance; live from `step` events.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PySide6.QtCore import QEvent, QPointF, QRectF, QSize, Qt, QTimer
from PySide6.QtGui import QColor, QFont, QHelpEvent, QPainter, QPaintEvent, QPen
from PySide6.QtWidgets import QSizePolicy, QToolTip, QWidget

ACTION_COLOURS: dict[str, QColor] = {
    "compute": QColor("#3d8bfd"),
    "reuse": QColor("#f0a030"),
    "receive": QColor("#3cb371"),
    "idle": QColor("#9aa0a8"),
    "batched": QColor("#a15dd8"),
}
UNKNOWN_COLOUR = QColor("#e05555")
ACTION_HELP = {
    "compute": "exact denoiser call",
    "reuse": "scheduler step on a cached prediction",
    "receive": "applies a prediction received from another rank",
    "idle": "waits",
    "batched": "several latents in one batched call",
}

GUTTER = 78  # rank labels
SUMMARY = 190  # per-lane totals
HEADER = 32  # phase brackets (warm-up, rounds) above the step numbers
LEGEND = 22
LANE = 28
LANE_GAP = 6
BACKGROUND = QColor(250, 250, 252)
PHASE = QColor(60, 110, 200)
FOOT_MAX = 0.45  # the waiting foot takes at most this share of a mark, so its colour still shows
TEXT = QColor(60, 64, 72)
REPAINT_MS = 40  # step events may come hundreds a second (several ranks): repaint at most ~25 times a second


@dataclass
class StepMark:
    action: str
    compute_s: float = 0.0
    comm_wait_s: float = 0.0

    @property
    def wait_share(self) -> float:
        busy = self.compute_s + self.comm_wait_s
        return self.comm_wait_s / busy if busy > 0 else 0.0


class TimelineView(QWidget):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Preferred)
        self.setMouseTracking(True)
        self._repaint = QTimer(self, singleShot=True, interval=REPAINT_MS)
        self._repaint.timeout.connect(self.update)
        self.reset()

    # ---- data ---------------------------------------------------------------------------------
    def reset(
        self,
        total: int = 0,
        devices: list[str] | None = None,
        warmup: int | None = None,
        round_width: int | None = None,
    ) -> None:
        """Start a new job: `total` steps if known, one label per rank, the warm-up and round size
        if known (they only add shading and separators)."""
        self.total = total
        self.devices = list(devices or [])
        self.warmup = warmup
        self.round_width = round_width
        self.marks: dict[int, dict[int, StepMark]] = {rank: {} for rank in range(len(self.devices))}
        self.latest_step = -1
        self._fit_height()
        self.update()

    def add_step(self, event: dict[str, Any]) -> None:
        """Record one `step` event (docs/protocol.md)."""
        rank, step = int(event.get("rank", 0)), int(event.get("step", 0))
        self.total = max(self.total, int(event.get("total", 0) or 0), step + 1)
        if rank not in self.marks:
            self.marks[rank] = {}
            self._fit_height()
        self.marks[rank][step] = StepMark(
            str(event.get("action", "")),
            float(event.get("compute_s", 0.0) or 0.0),
            float(event.get("comm_wait_s", 0.0) or 0.0),
        )
        self.latest_step = max(self.latest_step, step)
        if not self._repaint.isActive():
            self._repaint.start()  # one repaint for a burst of events

    def ranks(self) -> list[int]:
        return sorted(self.marks) or [0]

    def lane_summary(self, rank: int) -> tuple[int, float, float]:
        """(denoiser calls, compute seconds, communication-wait seconds) of a rank so far."""
        marks = self.marks.get(rank, {}).values()
        calls = sum(1 for m in marks if m.action in ("compute", "batched"))
        return calls, sum(m.compute_s for m in marks), sum(m.comm_wait_s for m in marks)

    # ---- geometry -----------------------------------------------------------------------------
    def sizeHint(self) -> QSize:
        lanes = len(self.ranks())
        return QSize(640, HEADER + lanes * (LANE + LANE_GAP) + LEGEND + 8)

    def _fit_height(self) -> None:
        """Every lane stays visible: the widget asks for the height of all its lanes."""
        self.setMinimumHeight(self.sizeHint().height())
        self.updateGeometry()

    def minimumSizeHint(self) -> QSize:
        return QSize(GUTTER + SUMMARY + 120, HEADER + (LANE + LANE_GAP) + LEGEND + 8)

    def _plot(self) -> QRectF:
        lanes = len(self.ranks())
        return QRectF(GUTTER, HEADER, max(1.0, self.width() - GUTTER - SUMMARY), lanes * (LANE + LANE_GAP))

    def _step_width(self) -> float:
        return self._plot().width() / max(1, self.total)

    def lane_rect(self, rank: int) -> QRectF:
        plot = self._plot()
        index = self.ranks().index(rank) if rank in self.marks else 0
        return QRectF(plot.left(), plot.top() + index * (LANE + LANE_GAP) + LANE_GAP / 2, plot.width(), LANE)

    def mark_rect(self, rank: int, step: int) -> QRectF:
        """Where the mark of (rank, step) is drawn."""
        lane = self.lane_rect(rank)
        width = self._step_width()
        gap = 1.0 if width >= 4 else 0.0  # thin marks touch, or they would vanish
        return QRectF(lane.left() + step * width + gap / 2, lane.top(), max(1.0, width - gap), lane.height())

    def mark_at(self, pos: QPointF) -> tuple[int, int] | None:
        plot = self._plot()
        if not plot.contains(pos):
            return None
        step = int((pos.x() - plot.left()) / self._step_width())
        for rank in self.ranks():
            if self.lane_rect(rank).contains(pos) and step in self.marks.get(rank, {}):
                return rank, step
        return None

    # ---- painting -----------------------------------------------------------------------------
    def paintEvent(self, event: QPaintEvent) -> None:
        painter = QPainter(self)
        painter.fillRect(self.rect(), BACKGROUND)
        painter.setFont(QFont(self.font().family(), 8))
        plot = self._plot()
        for rank in self.ranks():
            self._paint_lane(painter, rank)
        self._paint_rounds(painter, plot)
        self._paint_header(painter, plot)
        if 0 <= self.latest_step < self.total - 1:
            x = plot.left() + (self.latest_step + 1) * self._step_width()
            painter.setPen(QPen(QColor(40, 40, 48, 160), 1, Qt.PenStyle.DashLine))
            painter.drawLine(QPointF(x, plot.top()), QPointF(x, plot.bottom()))
        self._paint_legend(painter, plot)

    def _paint_rounds(self, painter: QPainter, plot: QRectF) -> None:
        """Gaps in the background colour between the warm-up and each parallel round."""
        width = self._step_width()
        if not self.round_width or self.round_width < 2 or width < 3:
            return
        painter.setPen(QPen(BACKGROUND, 3))
        for step in range(self.warmup or 0, self.total, self.round_width):
            x = plot.left() + step * width
            painter.drawLine(QPointF(x, plot.top()), QPointF(x, plot.bottom()))

    def _paint_header(self, painter: QPainter, plot: QRectF) -> None:
        if not self.total:
            painter.setPen(TEXT)
            painter.drawText(plot, Qt.AlignmentFlag.AlignCenter, "Steps appear here while a job denoises")
            return
        width = self._step_width()
        # Phase brackets: the warm-up, then "rounds of N".
        y = 4.0
        warmup = min(self.warmup or 0, self.total)
        label_end = plot.left()
        if warmup:
            painter.setPen(QPen(PHASE, 2))
            painter.drawLine(QPointF(plot.left() + 1, y), QPointF(plot.left() + warmup * width - 2, y))
            label = f"warm-up W={warmup}"
            painter.drawText(QPointF(plot.left() + 2, y + 11), label)
            label_end = plot.left() + 2 + painter.fontMetrics().horizontalAdvance(label) + 8
        if self.round_width and self.round_width > 1 and warmup < self.total:
            start = plot.left() + warmup * width + 2
            painter.setPen(QPen(PHASE.lighter(150), 2))
            painter.drawLine(QPointF(start, y), QPointF(plot.right() - 1, y))
            painter.setPen(PHASE)
            painter.drawText(QPointF(max(start + 2, label_end), y + 11), f"rounds of {self.round_width}")
        # Step numbers, as dense as they stay readable.
        every = next(n for n in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000) if n * width >= 24)
        painter.setPen(TEXT)
        for step in range(0, self.total, every):
            x = plot.left() + step * width
            painter.drawText(QRectF(x, 0, 40, HEADER - 2), Qt.AlignmentFlag.AlignBottom, str(step))

    def _paint_lane(self, painter: QPainter, rank: int) -> None:
        lane = self.lane_rect(rank)
        painter.fillRect(lane, QColor(236, 238, 242))
        painter.setPen(TEXT)
        device = self.devices[rank] if rank < len(self.devices) else ""
        label = QRectF(4, lane.top(), GUTTER - 8, lane.height())
        painter.drawText(
            label, Qt.AlignmentFlag.AlignVCenter | Qt.AlignmentFlag.AlignLeft, f"rank {rank}\n{device}"
        )
        width = self._step_width()
        gap = 1.0 if width >= 4 else 0.0  # as in mark_rect, computed once per lane
        mark_width, left, top, height = (
            max(1.0, width - gap),
            lane.left() + gap / 2,
            lane.top(),
            lane.height(),
        )
        for step, mark in self.marks.get(rank, {}).items():
            rect = QRectF(left + step * width, top, mark_width, height)
            colour = ACTION_COLOURS.get(mark.action, UNKNOWN_COLOUR)
            painter.fillRect(rect, colour)
            if mark.wait_share > 0.01:  # the darker foot: time spent waiting on other ranks
                foot = rect.height() * mark.wait_share * FOOT_MAX
                painter.fillRect(
                    QRectF(rect.left(), rect.bottom() - foot, rect.width(), foot), colour.darker(160)
                )
        calls, compute, wait = self.lane_summary(rank)
        summary = QRectF(lane.right() + 8, lane.top(), SUMMARY - 12, lane.height())
        painter.setPen(TEXT)
        painter.drawText(
            summary,
            Qt.AlignmentFlag.AlignVCenter | Qt.AlignmentFlag.AlignLeft,
            f"{calls} calls · {compute:.2f} s\nwait {wait:.2f} s",
        )

    def _paint_legend(self, painter: QPainter, plot: QRectF) -> None:
        x, y = float(GUTTER), plot.bottom() + 6
        for action, colour in ACTION_COLOURS.items():
            painter.fillRect(QRectF(x, y + 3, 10, 10), colour)
            painter.setPen(TEXT)
            painter.drawText(QPointF(x + 14, y + 12), action)
            x += 24 + painter.fontMetrics().horizontalAdvance(action)
        painter.fillRect(QRectF(x, y + 3, 10, 10), ACTION_COLOURS["compute"].darker(160))
        painter.drawText(QPointF(x + 14, y + 12), "waiting (foot of a mark)")

    # ---- tooltips -----------------------------------------------------------------------------
    def event(self, event: QEvent) -> bool:
        if event.type() == QEvent.Type.ToolTip and isinstance(event, QHelpEvent):
            found = self.mark_at(QPointF(event.pos()))
            if found is None:
                QToolTip.hideText()
            else:
                rank, step = found
                mark = self.marks[rank][step]
                QToolTip.showText(
                    event.globalPos(),
                    f"rank {rank}, step {step + 1}/{self.total}: {mark.action} "
                    f"({ACTION_HELP.get(mark.action, 'unknown')})\n"
                    f"compute {mark.compute_s * 1000:.1f} ms, waiting {mark.comm_wait_s * 1000:.1f} ms",
                    self,
                )
            return True
        return super().event(event)
