"""The request's LoRA adapters: one row per adapter (its file, a weight slider, remove) and an add button.

The window only edits the list; the engine checks the files (safetensors, present, a pipeline with
LoRA support, a strategy that keeps the denoiser whole) and the workers load them for the job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QFileDialog,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSlider,
    QVBoxLayout,
    QWidget,
)

SLIDER_SCALE = 100  # the slider moves in hundredths of the weight
MAX_WEIGHT = 2.0


class LoraRow(QWidget):
    """One adapter: its file name (the path in the tooltip), a weight slider from 0 to 2, remove."""

    changed = Signal()
    removed = Signal(object)

    def __init__(self, path: str, weight: float) -> None:
        super().__init__()
        self.path = path
        name = QLabel(Path(path).name)
        name.setToolTip(path)
        self.slider = QSlider(Qt.Orientation.Horizontal, minimum=0, maximum=int(MAX_WEIGHT * SLIDER_SCALE))
        self.slider.setValue(round(min(max(weight, 0.0), MAX_WEIGHT) * SLIDER_SCALE))
        self.slider.setToolTip("The adapter's weight (1 = as trained)")
        self.value_label = QLabel()
        self.remove_button = QPushButton("Remove")
        self.slider.valueChanged.connect(self._on_slider)
        self.remove_button.clicked.connect(lambda: self.removed.emit(self))
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(name, 1)
        layout.addWidget(self.slider, 1)
        layout.addWidget(self.value_label)
        layout.addWidget(self.remove_button)
        self._on_slider(self.slider.value(), notify=False)

    @property
    def weight(self) -> float:
        return self.slider.value() / SLIDER_SCALE

    def _on_slider(self, value: int, notify: bool = True) -> None:
        self.value_label.setText(f"{value / SLIDER_SCALE:.2f}")
        if notify:
            self.changed.emit()


class LoraList(QWidget):
    """The editable list; `value()` is the request's `loras`."""

    changed = Signal()

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[LoraRow] = []
        self.rows_layout = QVBoxLayout()
        self.rows_layout.setContentsMargins(0, 0, 0, 0)
        self.add_button = QPushButton("Add LoRA...")
        self.add_button.setToolTip("A LoRA adapter file (.safetensors) for this model's pipeline")
        self.add_button.clicked.connect(self._choose)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(self.rows_layout)
        layout.addWidget(self.add_button, alignment=Qt.AlignmentFlag.AlignLeft)

    def value(self) -> list[dict[str, Any]]:
        return [{"path": row.path, "weight": row.weight} for row in self.rows]

    def set_value(self, loras: list[dict[str, Any]]) -> None:
        for row in list(self.rows):
            self._remove(row, notify=False)
        for lora in loras:
            self.add(str(lora.get("path", "")), float(lora.get("weight", 1.0)), notify=False)

    def add(self, path: str, weight: float = 1.0, notify: bool = True) -> None:
        row = LoraRow(path, weight)
        row.changed.connect(self.changed)
        row.removed.connect(self._remove)
        self.rows.append(row)
        self.rows_layout.addWidget(row)
        if notify:
            self.changed.emit()

    def _remove(self, row: LoraRow, notify: bool = True) -> None:
        self.rows.remove(row)
        row.setParent(None)
        row.deleteLater()
        if notify:
            self.changed.emit()

    def _choose(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Add a LoRA adapter", "", "LoRA adapters (*.safetensors)")
        if path:
            self.add(path)
