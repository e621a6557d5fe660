"""Engine status and log: the state of the engine process, a Restart button, and what it printed."""

from __future__ import annotations

import time

from PySide6.QtCore import Signal
from PySide6.QtGui import QFont
from PySide6.QtWidgets import QHBoxLayout, QLabel, QPlainTextEdit, QPushButton, QVBoxLayout, QWidget

STATE_STYLES = {
    "starting": ("Engine starting…", "#a16207"),
    "ready": ("Engine ready", "#15803d"),
    "busy": ("Engine busy", "#2563eb"),
    "stopped": ("Engine stopped", "#b91c1c"),
}
MAX_LOG_LINES = 5000


class EngineStatusLabel(QLabel):
    """A coloured engine state, for the status bar."""

    def set_state(self, state: str, pid: int | None = None) -> None:
        text, colour = STATE_STYLES.get(state, (state, "#374151"))
        if pid and state in ("ready", "busy"):
            text += f" (pid {pid})"
        self.setText(f"● {text}")
        self.setStyleSheet(f"color: {colour}; font-weight: bold;")


class EnginePanel(QWidget):
    restart_requested = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.status = EngineStatusLabel()
        self.status.set_state("stopped")
        self.restart_button = QPushButton("Restart engine")
        self.restart_button.clicked.connect(self.restart_requested)
        self.log = QPlainTextEdit(readOnly=True)
        self.log.setMaximumBlockCount(MAX_LOG_LINES)
        self.log.setFont(QFont("monospace", 9))
        self.clear_button = QPushButton("Clear")
        self.clear_button.clicked.connect(self.log.clear)

        top = QHBoxLayout()
        top.addWidget(self.status, 1)
        top.addWidget(self.restart_button)
        top.addWidget(self.clear_button)
        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(self.log, 1)

    def set_state(self, state: str, pid: int | None = None) -> None:
        self.status.set_state(state, pid)

    def append(self, line: str, source: str = "engine") -> None:
        self.log.appendPlainText(f"{time.strftime('%H:%M:%S')} [{source}] {line}")
