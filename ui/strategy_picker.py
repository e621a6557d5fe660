"""Strategy, its options, the devices it runs on, and the ideal speedup of that choice.

Fed by the catalog's `strategies` (name, description, options, max_devices) and `devices`
(one entry per GPU, plus the CPU). With GPUs there is one checkbox per GPU; without, a number of
CPU worker processes.
"""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QSizePolicy,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from engine.devices import MAX_CPU_WORKERS_PER_CORE, cpu_cores
from ui.model_info import BUILTIN_STRATEGIES, ModelInfo, strategy_ideal_speedup, strategy_width

AUTO = "auto"
DEFAULT_CPU_WORKERS = 2


def parse_device_spec(spec: str) -> tuple[str, list[int]] | None:
    """'cpu:3' -> ('cpu', [3]); 'cuda:0,2' -> ('cuda', [0, 2]); None for 'auto' or anything else."""
    spec = spec.strip().lower()
    try:
        if spec == "cpu":
            return "cpu", [1]
        if spec.startswith("cpu:"):
            return "cpu", [int(spec[4:])]
        if spec.startswith("cuda"):
            rest = spec[4:].lstrip(":")
            return "cuda", [int(part) for part in rest.split(",")] if rest else [0]
    except ValueError:
        return None
    return None


class OnOffBox(QCheckBox):
    """A 0/1 strategy option as a check box, with the spin box's value interface."""

    valueChanged = Signal(int)

    def __init__(self) -> None:
        super().__init__()
        self.toggled.connect(lambda on: self.valueChanged.emit(int(on)))

    def value(self) -> int:
        return int(self.isChecked())

    def setValue(self, value: int) -> None:  # noqa: N802 (Qt naming, as QSpinBox)
        self.setChecked(bool(value))

    def specialValueText(self) -> str:  # noqa: N802
        return ""

    def minimum(self) -> int:
        return 0


class StrategyPicker(QWidget):
    changed = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._strategies: dict[str, dict[str, Any]] = {}
        self._gpus: list[dict[str, Any]] = []
        self._option_boxes: dict[str, QSpinBox | OnOffBox] = {}
        self._device_override: str | None = None  # a restored spec this machine cannot show
        self._devices_chosen = False  # set by a restored request or the user; else "auto" applies
        self._steps: int | None = None
        self._model: ModelInfo | None = None
        self._runnable = True  # False while the engine says the request cannot run
        self._workers_before_pin = DEFAULT_CPU_WORKERS  # restored when leaving a one-device strategy

        self.strategy_box = QComboBox()
        self.strategy_box.currentIndexChanged.connect(self._on_strategy_changed)
        self.options_form = QFormLayout()
        self.options_form.setContentsMargins(0, 0, 0, 0)

        self.gpu_row = QHBoxLayout()
        self.gpu_checks: list[QCheckBox] = []
        self.cpu_workers = QSpinBox()
        self.cpu_workers.setRange(1, max(1, cpu_cores() * MAX_CPU_WORKERS_PER_CORE))
        self.cpu_workers.setValue(min(DEFAULT_CPU_WORKERS, self.cpu_workers.maximum()))
        self.cpu_workers.setSuffix(" CPU workers")
        self.devices_box = QWidget()  # the devices row, for marking it as the field at fault
        self.cpu_workers.valueChanged.connect(self._on_devices_touched)
        self.device_note = QLabel()
        self.device_note.setWordWrap(True)
        self.device_note.hide()
        self.speedup_label = QLabel(wordWrap=True)
        # Wraps rather than widening the request panel past its dock.
        self.speedup_label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.speedup_label.setToolTip(
            "Ideal speedup of the denoising loop: T / (W + ceil((T - W) / N)) for T steps, "
            "W warm-up steps and N devices (P look-ahead latents for batchstep), times 2 where the "
            "guidance halves run on two devices."
        )

        devices_row = QHBoxLayout(self.devices_box)
        devices_row.setContentsMargins(0, 0, 0, 0)
        # Named as the engine's fixes are worded in the window ("Set Workers to 2": ui.validation).
        self.devices_label = QLabel("Workers")
        devices_row.addWidget(self.devices_label)
        devices_row.addLayout(self.gpu_row)
        devices_row.addWidget(self.cpu_workers)
        devices_row.addStretch(1)

        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.strategy_box)
        layout.addLayout(self.options_form)
        layout.addWidget(self.devices_box)
        layout.addWidget(self.device_note)
        layout.addWidget(self.speedup_label)
        self._update_speedup()

    # ---- catalog ------------------------------------------------------------------------------
    def set_catalog(self, strategies: list[dict[str, Any]], devices: list[dict[str, Any]]) -> None:
        strategy, options, chosen = self.value()
        current = (strategy, options, chosen if self._devices_chosen else AUTO)
        self._strategies = {s["name"]: s for s in strategies if s.get("name")}
        self._gpus = [d for d in devices if d.get("kind") == "cuda"]
        self._build_device_controls()
        self.strategy_box.blockSignals(True)
        self.strategy_box.clear()
        for name, info in self._strategies.items():
            self.strategy_box.addItem(name, name)
            last = self.strategy_box.count() - 1
            self.strategy_box.setItemData(last, info.get("description", ""), Qt.ItemDataRole.ToolTipRole)
        self.strategy_box.blockSignals(False)
        self.set_value(*current)
        self._mark_unavailable()

    def _build_device_controls(self) -> None:
        for box in self.gpu_checks:
            self.gpu_row.removeWidget(box)
            box.hide()
            box.deleteLater()
        self.gpu_checks = []
        for gpu in self._gpus:
            index = int(str(gpu.get("id", "cuda:0")).split(":")[-1])
            box = QCheckBox(f"GPU {index}")
            box.setProperty("gpu_index", index)
            box.setToolTip(str(gpu.get("name", "")))
            box.setChecked(True)
            box.toggled.connect(self._on_gpu_toggled)
            self.gpu_row.addWidget(box)
            self.gpu_checks.append(box)
        self.cpu_workers.setVisible(not self._gpus)
        self.devices_label.setText("GPUs" if self._gpus else "Workers")

    # ---- values -------------------------------------------------------------------------------
    def strategy(self) -> str:
        return self.strategy_box.currentData() or "sequential"

    def options(self) -> dict[str, int]:
        """Options the user set; those left on "auto" or at their default are omitted (the engine
        fills them in), so a restored request comes back as it was."""
        described = {o["name"]: o for o in self._strategies.get(self.strategy(), {}).get("options", [])}
        return {
            name: box.value()
            for name, box in self._option_boxes.items()
            if not (box.specialValueText() and box.value() == box.minimum())
            and box.value() != described.get(name, {}).get("default")
        }

    def devices(self) -> str:
        if self._device_override is not None:
            return self._device_override
        if self._gpus:
            checked = [b.property("gpu_index") for b in self.gpu_checks if b.isChecked()]
            return "cuda:" + ",".join(str(i) for i in checked) if checked else "cuda:0"
        return f"cpu:{self.cpu_workers.value()}"

    def device_count(self) -> int:
        parsed = parse_device_spec(self.devices())
        if parsed is None:
            return 1
        kind, values = parsed
        return values[0] if kind == "cpu" else len(values)

    def has_gpus(self) -> bool:
        return bool(self._gpus)

    def devices_widget(self) -> QWidget:
        return self.cpu_workers if not self._gpus else self.devices_box

    def option_boxes(self) -> dict[str, QSpinBox | OnOffBox]:
        return dict(self._option_boxes)

    def choose_devices(self, spec: str) -> None:
        """Devices as if the user had picked them (a one-click fix)."""
        self._set_devices(spec)
        self._on_devices_touched()

    def choose_strategy(self, name: str) -> None:
        index = self.strategy_box.findData(name)
        if index >= 0:
            self.strategy_box.setCurrentIndex(index)

    def set_runnable(self, runnable: bool) -> None:
        """An ideal speedup is only shown for a request the engine would run."""
        self._runnable = runnable
        self._update_speedup()

    def value(self) -> tuple[str, dict[str, int], str]:
        return self.strategy(), self.options(), self.devices()

    def set_value(self, strategy: str, options: dict[str, Any], devices: str) -> None:
        index = self.strategy_box.findData(strategy)
        if index < 0:  # not in the catalog (yet): keep it, with the options it names
            # Until the catalog says otherwise: the built-in description, or no device limit.
            self._strategies.setdefault(
                strategy,
                {
                    **BUILTIN_STRATEGIES.get(strategy, {"max_devices": None}),
                    "name": strategy,
                    "options": [{"name": k, "default": None, "minimum": 0} for k in options],
                },
            )
            self.strategy_box.addItem(strategy, strategy)
            index = self.strategy_box.count() - 1
        self.strategy_box.setCurrentIndex(index)
        self._rebuild_options()
        for name, value in options.items():
            box = self._option_boxes.get(name)
            if box is not None and isinstance(value, int):
                box.setValue(value)
        self._set_devices(devices)
        self._devices_chosen = devices.strip().lower() != AUTO
        self._apply_device_limit()
        self._update_speedup()

    def _set_devices(self, spec: str) -> None:
        self._device_override = None
        self.device_note.hide()
        parsed = parse_device_spec(spec)
        if spec.strip().lower() == AUTO:
            for box in self.gpu_checks:
                box.setChecked(True)
            return
        if parsed is not None and parsed[0] == "cpu" and not self._gpus:
            self.cpu_workers.setValue(parsed[1][0])
            if self.cpu_workers.value() == parsed[1][0]:
                return
        if parsed is not None and parsed[0] == "cuda" and self._gpus:
            indices = {b.property("gpu_index") for b in self.gpu_checks}
            if set(parsed[1]) <= indices:
                for box in self.gpu_checks:
                    box.blockSignals(True)
                    box.setChecked(box.property("gpu_index") in parsed[1])
                    box.blockSignals(False)
                return
        # e.g. cuda:0,1 restored on a CPU-only machine: keep it as written, and say so.
        self._device_override = spec
        self.device_note.setText(f"Devices {spec} (as restored; not available here: change to pick).")
        self.device_note.show()

    # ---- reactions ----------------------------------------------------------------------------
    def set_context(self, steps: int | None, model: ModelInfo | None) -> None:
        """The step count and model of the request, for the ideal speedup and the strategies that
        model can run."""
        self._steps, self._model = steps, model
        self._mark_unavailable()
        self._update_speedup()

    def unavailable_reason(self, strategy: str) -> str | None:
        """Why the engine says `strategy` cannot run the current model (None: it can)."""
        if self._model is None:
            return None
        return (self._strategies.get(strategy, {}).get("unavailable") or {}).get(self._model.name)

    def _mark_unavailable(self) -> None:
        """Greys out the strategies the current model cannot run, with the engine's reason."""
        items = self.strategy_box.model()
        for index in range(self.strategy_box.count()):
            name = self.strategy_box.itemData(index)
            reason = self.unavailable_reason(name)
            item = items.item(index) if hasattr(items, "item") else None
            if item is not None:
                item.setEnabled(reason is None)
            tip = self._strategies.get(name, {}).get("description", "")
            self.strategy_box.setItemData(
                index, f"Unavailable for this model: {reason}" if reason else tip, Qt.ItemDataRole.ToolTipRole
            )
        if self.unavailable_reason(self.strategy()) is not None:
            self.strategy_box.setCurrentIndex(max(0, self.strategy_box.findData("sequential")))

    def _on_strategy_changed(self) -> None:
        self._rebuild_options()
        self._apply_device_limit()
        self._update_speedup()
        self.changed.emit()

    def _rebuild_options(self) -> None:
        while self.options_form.rowCount():
            self.options_form.removeRow(0)
        self._option_boxes = {}
        info = self._strategies.get(self.strategy(), {})
        self.strategy_box.setToolTip(info.get("description", ""))
        for option in info.get("options", []):
            minimum = int(option.get("minimum", 0))
            maximum = option.get("maximum")
            maximum = 1000 if maximum is None else int(maximum)
            default = option.get("default")
            if (minimum, maximum) == (0, 1) and default is not None:
                box: QSpinBox | OnOffBox = OnOffBox()
                box.setValue(int(default))
            else:
                box = QSpinBox()
                if default is None:
                    box.setRange(minimum - 1, maximum)
                    box.setSpecialValueText(AUTO)  # shown at minimum - 1: the engine picks per model
                    box.setValue(minimum - 1)
                else:
                    box.setRange(minimum, maximum)
                    box.setValue(int(default))
            box.setToolTip(option.get("help", ""))
            box.valueChanged.connect(self._on_option_changed)
            self.options_form.addRow(option["name"].replace("_", " ").capitalize(), box)
            self._option_boxes[option["name"]] = box

    def _on_option_changed(self) -> None:
        self._update_speedup()
        self.changed.emit()

    def _max_devices(self) -> int | None:
        info = self._strategies.get(self.strategy(), {})
        return info.get("max_devices", 1)

    def _apply_device_limit(self) -> None:
        """One-device strategies: CPU workers pinned to 1, GPU checkboxes exclusive."""
        single = self._max_devices() == 1
        if not self._gpus:
            pinned = not self.cpu_workers.isEnabled()
            self.cpu_workers.setEnabled(not single)
            if single and not pinned:
                self._workers_before_pin = self.cpu_workers.value()
                self.cpu_workers.setValue(1)
            elif not single and pinned and self._workers_before_pin > 1:
                # Back from a one-device strategy: the count the user had, not the pinned 1.
                self.cpu_workers.setValue(self._workers_before_pin)
        elif single:
            checked = [b for b in self.gpu_checks if b.isChecked()]
            for box in self.gpu_checks:
                box.blockSignals(True)
                box.setChecked(box is (checked[0] if checked else self.gpu_checks[0]))
                box.blockSignals(False)

    def _on_gpu_toggled(self, on: bool) -> None:
        sender = self.sender()
        if on and self._max_devices() == 1:
            for box in self.gpu_checks:
                if box is not sender:
                    box.blockSignals(True)
                    box.setChecked(False)
                    box.blockSignals(False)
        if not any(b.isChecked() for b in self.gpu_checks):  # keep at least one
            sender.blockSignals(True)
            sender.setChecked(True)
            sender.blockSignals(False)
        self._on_devices_touched()

    def _on_devices_touched(self) -> None:
        self._devices_chosen = True
        self._device_override = None
        self.device_note.hide()
        self._update_speedup()
        self.changed.emit()

    def ideal_terms(self) -> tuple[int, int, int] | None:
        """(T, W, width) of the current choice (width: N ranks, or P for batchstep); None when T is
        not known."""
        info = self._strategies.get(self.strategy(), {})
        width = strategy_width(info, self.options(), self.device_count())
        steps = self._steps
        if steps is None and self._model is not None:
            steps = self._model.defaults.get("steps")
        if not steps:
            return None
        warmup = self.options().get("warmup")
        if warmup is None:
            warmup = (self._model or ModelInfo.unknown("")).default_warmup(steps)
        return steps, warmup, width

    def ideal(self) -> float | None:
        """Ideal speedup of the current choice; None when the step count is not known."""
        info = self._strategies.get(self.strategy(), {})
        terms = self.ideal_terms()
        if terms is None:
            return None if (info.get("ideal") or {}).get("width_from") else 1.0
        steps, warmup, _ = terms
        return strategy_ideal_speedup(info, steps, warmup, self.options(), self.device_count())

    def _update_speedup(self) -> None:
        ideal = self.ideal()
        terms = self.ideal_terms()
        if not self._runnable:
            text = "ideal speedup: none (fix the request first)"
        elif ideal is None:
            text = "ideal speedup ? (step count unknown)"
        elif terms is not None and terms[2] > 1:
            steps, warmup, width = terms
            source = (self._strategies.get(self.strategy(), {}).get("ideal") or {}).get("width_from")
            n = "N" if source == "ranks" else "P"
            text = f"ideal speedup {ideal:.2f}×  (T={steps}, W={warmup}, {n}={width})"
        else:
            text = f"ideal speedup {ideal:.2f}×"
        self.speedup_label.setText(text)
