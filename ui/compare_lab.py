"""The comparison lab: one request under several strategy@devices entries, same seed.

The entries go to the engine as one `submit` with `compare`; its result (the `compare --json`
report) fills a table (denoise s, speedup, ideal, fidelity, bytes sent, calls) and a bar chart of
measured against ideal speedup, and can be exported as CSV or JSON.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PySide6.QtCharts import QBarCategoryAxis, QBarSeries, QBarSet, QChart, QChartView, QValueAxis
from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtGui import QPainter
from PySide6.QtWidgets import (
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QPushButton,
    QSizePolicy,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from engine.devices import MAX_CPU_WORKERS_PER_CORE, cpu_cores
from engine.protocol import GenerationRequest
from ui.validation import CheckResult, fix_action, fix_words

CHECK_DELAY_MS = 250
INVALID_STYLE = "border: 2px solid #d04040; border-radius: 3px;"

COLUMNS = ("strategy", "devices", "denoise s", "speedup", "ideal", "fidelity", "bytes sent", "calls")
DEFAULT_ENTRIES = [["sequential", "cpu:1"], ["parastep", "cpu:2"]]


def device_choices(devices: list[dict[str, Any]]) -> list[str]:
    """The device specs to offer, from the engine's inventory: the first 1, 2, ... GPUs, or 1 to the
    most CPU workers the engine takes (the strategy picker's limit)."""
    gpus = [str(d.get("id", "")) for d in devices if d.get("kind") == "cuda"]
    if gpus:
        indices = [gpu.split(":")[-1] for gpu in gpus]
        return [f"cuda:{','.join(indices[:n])}" for n in range(1, len(indices) + 1)]
    return [f"cpu:{n}" for n in range(1, cpu_cores() * MAX_CPU_WORKERS_PER_CORE + 1)]


def _number(value: Any) -> float | None:
    """A report number (inf/nan arrive as strings in strict JSON)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def fidelity_text(fidelity: dict[str, Any] | None) -> str:
    if not fidelity:
        return "reference" if fidelity is None else "-"
    if fidelity.get("identical"):
        return "identical"
    parts = []
    for key, label in (
        ("psnr_db", "PSNR {} dB"),
        ("ssim", "SSIM {}"),
        ("snr_db", "SNR {} dB"),
        ("lsd", "LSD {}"),
    ):
        if key in fidelity:
            number = _number(fidelity[key])
            parts.append(label.format(f"{number:.3g}" if number is not None else fidelity[key]))
    if "latent_rel_l2" in fidelity:
        number = _number(fidelity["latent_rel_l2"])
        parts.append(f"latent L2 {number:.2e}" if number is not None else "")
    return ", ".join(p for p in parts if p)


def row_cells(row: dict[str, Any]) -> list[str]:
    """One table row as text, in COLUMNS order."""
    speedup = _number(row.get("speedup"))
    ideal = _number(row.get("ideal_speedup"))
    denoise = _number(row.get("denoise_s"))
    return [
        str(row.get("strategy", "")),
        str(row.get("devices", "")),
        f"{denoise:.3f}" if denoise is not None else "-",
        f"{speedup:.2f}×" if speedup is not None else "-",
        f"{ideal:.2f}×" if ideal is not None else "-",
        fidelity_text(row.get("fidelity")),
        f"{int(row.get('bytes_sent', 0) or 0):,}",
        str(row.get("denoiser_calls", "")),
    ]


def report_to_csv(report: dict[str, Any]) -> str:
    """The report's rows as CSV: the table's columns plus every fidelity figure and counter."""
    rows = report.get("rows", [])
    fidelity_keys = sorted({k for r in rows for k in (r.get("fidelity") or {})})
    header = [
        "strategy",
        "devices",
        "denoise_s",
        "total_s",
        "speedup",
        "ideal_speedup",
        *fidelity_keys,
        "denoiser_calls",
        "compute_s",
        "comm_wait_s",
        "bytes_sent",
        "bytes_received",
        "output",
    ]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        fidelity = row.get("fidelity") or {}
        values = {**row, **fidelity}
        writer.writerow(["" if values.get(k) is None else values.get(k) for k in header])
    return out.getvalue()


class EntryRow(QWidget):
    """One strategy@devices entry."""

    removed = Signal(object)

    def __init__(self, strategies: list[str], strategy: str, devices: str, choices: list[str]) -> None:
        super().__init__()
        self.strategy = QComboBox()
        self.strategy.addItems(strategies or [strategy])
        index = self.strategy.findText(strategy)
        if index < 0:
            self.strategy.addItem(strategy)
            index = self.strategy.count() - 1
        self.strategy.setCurrentIndex(index)
        # Choices from the engine's inventory, not free text; a restored spec this machine cannot
        # run stays listed so that the engine's check can say why and offer the fix.
        self.devices = QComboBox()
        self.devices.addItems(choices)
        self.set_devices(devices)
        remove = QPushButton("✕")
        remove.setFixedWidth(28)
        remove.clicked.connect(lambda: self.removed.emit(self))
        layout = QHBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.strategy)
        layout.addWidget(QLabel("@"))
        layout.addWidget(self.devices, 1)
        layout.addWidget(remove)

    def set_devices(self, spec: str) -> None:
        index = self.devices.findText(spec)
        if index < 0:
            self.devices.addItem(spec)
            index = self.devices.count() - 1
        self.devices.setCurrentIndex(index)

    def value(self) -> list[str]:
        return [self.strategy.currentText(), self.devices.currentText().strip() or "auto"]


class CompareLab(QWidget):
    submit_requested = Signal(object, list)  # GenerationRequest, [[strategy, devices], ...]
    entries_changed = Signal(list)
    check_wanted = Signal(object, list)  # the request and entries to ask the engine about (debounced)

    def __init__(
        self, current_request: Callable[[], GenerationRequest], parent: QWidget | None = None
    ) -> None:
        super().__init__(parent)
        self.current_request = current_request
        self.strategies: list[str] = ["sequential", "parastep", "batchstep"]
        self.report: dict[str, Any] | None = None
        self.rows: list[EntryRow] = []
        self.device_specs = device_choices([])
        self.check = CheckResult()
        self._connected = False
        self._pending = False  # an edit is waiting for the engine's answer
        self._run_when_checked = False
        self._check_timer = QTimer(self, singleShot=True, interval=CHECK_DELAY_MS)
        self._check_timer.timeout.connect(self.check_now)

        self.entries_layout = QVBoxLayout()
        self.add_button = QPushButton("Add entry")
        self.add_button.clicked.connect(lambda: self.add_entry("parastep", "cpu:2"))
        self.run_button = QPushButton("Run comparison")
        self.run_button.setToolTip("Queue the request panel's request once per entry (same seed)")
        self.run_button.clicked.connect(self.run)
        self.status = QLabel("The first sequential entry is the reference for speedup and fidelity.")
        self.status.setWordWrap(True)
        self.status.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.fix_button = QPushButton()
        self.fix_button.clicked.connect(self.apply_fix)
        self.fix_button.hide()

        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(COLUMNS.index("fidelity"), QHeaderView.ResizeMode.Stretch)
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)

        self.chart = QChart()
        self.chart.setTitle("Speedup of the denoising loop: measured vs ideal")
        self.chart.legend().setAlignment(Qt.AlignmentFlag.AlignBottom)
        self.chart_view = QChartView(self.chart)
        self.chart_view.setRenderHint(QPainter.RenderHint.Antialiasing)
        self.chart_view.setMinimumHeight(200)

        self.export_csv_button = QPushButton("Export CSV...")
        self.export_json_button = QPushButton("Export JSON...")
        self.export_csv_button.clicked.connect(lambda: self._export("csv"))
        self.export_json_button.clicked.connect(lambda: self._export("json"))

        entry_buttons = QHBoxLayout()
        entry_buttons.addWidget(self.add_button)
        entry_buttons.addStretch(1)
        entry_buttons.addWidget(self.run_button)
        export_buttons = QHBoxLayout()
        export_buttons.addStretch(1)
        export_buttons.addWidget(self.export_csv_button)
        export_buttons.addWidget(self.export_json_button)
        results = QSplitter(Qt.Orientation.Vertical)
        results.addWidget(self.table)
        results.addWidget(self.chart_view)
        results.setStretchFactor(1, 2)

        layout = QVBoxLayout(self)
        layout.addLayout(self.entries_layout)
        layout.addLayout(entry_buttons)
        layout.addWidget(self.status)
        layout.addWidget(self.fix_button, alignment=Qt.AlignmentFlag.AlignLeft)
        layout.addWidget(results, 1)
        layout.addLayout(export_buttons)
        self.set_entries(DEFAULT_ENTRIES)
        self._update_export()

    # ---- entries ------------------------------------------------------------------------------
    def set_strategies(self, names: list[str]) -> None:
        entries = self.entries()
        self.strategies = list(names) or self.strategies
        self.set_entries(entries)

    def entries(self) -> list[list[str]]:
        return [row.value() for row in self.rows]

    def set_entries(self, entries: list[list[str]]) -> None:
        for row in self.rows:
            self._drop_row(row)
        self.rows = []
        for strategy, devices in entries or DEFAULT_ENTRIES:
            self.add_entry(strategy, devices, notify=False)

    def set_devices(self, devices: list[dict[str, Any]]) -> None:
        """The engine's device inventory (catalog `devices`): what the entries offer."""
        self.device_specs = device_choices(devices)
        self.set_entries(self.entries())

    def add_entry(self, strategy: str, devices: str, notify: bool = True) -> None:
        row = EntryRow(self.strategies, strategy, devices, self.device_specs)
        row.removed.connect(self._remove_entry)
        row.strategy.currentIndexChanged.connect(self._notify)
        row.devices.currentIndexChanged.connect(self._notify)
        self.rows.append(row)
        self.entries_layout.addWidget(row)
        if notify:
            self._notify()

    def _remove_entry(self, row: EntryRow) -> None:
        if len(self.rows) > 1:
            self.rows.remove(row)
            self._drop_row(row)
            self._notify()

    def _drop_row(self, row: EntryRow) -> None:
        self.entries_layout.removeWidget(row)
        row.hide()  # gone now, not at the next turn of the event loop
        row.deleteLater()

    def _notify(self) -> None:
        self.entries_changed.emit(self.entries())
        self.schedule_check()

    # ---- validation (the engine's `check`) ----------------------------------------------------
    def set_connected(self, connected: bool) -> None:
        self._connected = connected
        if connected:
            self.schedule_check()
        self._update_run()

    def schedule_check(self) -> None:
        if self._connected:
            self._pending = True
            self._check_timer.start()
            self._update_run()

    def check_now(self) -> None:
        self._check_timer.stop()
        request = self.current_request()
        if self._connected and request.model:
            self._pending = True
            self.check_wanted.emit(request, self.entries())
        else:
            self._pending = False

    def set_check_result(self, result: CheckResult) -> None:
        self.check, self._pending = result, False
        for index, row in enumerate(self.rows):
            bad = result.invalid and result.entry == index
            row.devices.setStyleSheet(INVALID_STYLE if bad and result.field == "devices" else "")
            row.strategy.setStyleSheet(INVALID_STYLE if bad and result.field != "devices" else "")
            row.setToolTip(result.problem if bad else "")
        action = fix_action(result.field, result.value) if result.entry is not None else None
        if result.invalid:
            where = f"Entry {result.entry + 1}: " if result.entry is not None else "The request: "
            self.status.setText(
                where + (result.problem if action else f"{result.problem} {fix_words(result.fix)}")
            )
        elif result.ok:
            self.status.setText("The first sequential entry is the reference for speedup and fidelity.")
        self.fix_button.setText(action or "")
        self.fix_button.setVisible(result.invalid and action is not None)
        self._update_run()
        if self._run_when_checked:
            self._run_when_checked = False
            if not result.invalid:
                self.run()

    def apply_fix(self) -> None:
        result = self.check
        if result.entry is None or not 0 <= result.entry < len(self.rows) or result.value is None:
            return
        row = self.rows[result.entry]
        if result.field == "devices":
            row.set_devices(str(result.value))
        elif result.field == "strategy":
            row.strategy.setCurrentText(str(result.value))
        self.check_now()

    def _update_run(self) -> None:
        # A stale "invalid" does not block: the answer about the entries now on screen decides.
        self.run_button.setEnabled(self._connected and not (self.check.invalid and not self._pending))

    # ---- running ------------------------------------------------------------------------------
    def run(self) -> None:
        request = self.current_request()
        if not request.model:
            self.status.setText("Pick a model in the request panel first.")
            return
        if self._pending:  # run once the engine has answered about these entries
            self._run_when_checked = True
            self.check_now()
            return
        self.submit_requested.emit(request, self.entries())
        self.status.setText(f"Queued: {request.model}, seed {request.seed}, {len(self.rows)} runs…")

    def show_report(self, report: dict[str, Any]) -> None:
        """Fill the table and the chart from a `compare` result."""
        self.report = report
        rows = report.get("rows", [])
        self.table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, text in enumerate(row_cells(row)):
                item = QTableWidgetItem(text)
                if c >= 2:
                    item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
                if c == 0 and row.get("output"):
                    item.setToolTip(str(row["output"]))
                elif COLUMNS[c] == "fidelity":
                    item.setToolTip(text)
                self.table.setItem(r, c, item)
        self._fill_chart(rows)
        reference = report.get("reference")
        self.status.setText(
            f"{len(rows)} runs; reference: {reference}."
            if reference
            else f"{len(rows)} runs; no sequential entry, so no speedup or fidelity."
        )
        self._update_export()

    def _fill_chart(self, rows: list[dict[str, Any]]) -> None:
        self.chart.removeAllSeries()
        for axis in self.chart.axes():
            self.chart.removeAxis(axis)
        measured, ideal = QBarSet("measured"), QBarSet("ideal")
        categories = []
        for row in rows:
            categories.append(f"{row.get('strategy')}\n{row.get('devices')}")
            measured.append(_number(row.get("speedup")) or 0.0)
            ideal.append(_number(row.get("ideal_speedup")) or 0.0)
        series = QBarSeries()
        series.append(measured)
        series.append(ideal)
        self.chart.addSeries(series)
        x_axis = QBarCategoryAxis()
        x_axis.append(categories)
        y_axis = QValueAxis()
        top = max([1.0, *(s for s in (*_values(measured), *_values(ideal)))])
        y_axis.setRange(0, top * 1.15)
        y_axis.applyNiceNumbers()
        y_axis.setTitleText("×")
        y_axis.setLabelFormat("%.1f")
        self.chart.addAxis(x_axis, Qt.AlignmentFlag.AlignBottom)
        self.chart.addAxis(y_axis, Qt.AlignmentFlag.AlignLeft)
        series.attachAxis(x_axis)
        series.attachAxis(y_axis)

    def _update_export(self) -> None:
        for button in (self.export_csv_button, self.export_json_button):
            button.setEnabled(self.report is not None)

    def export(self, path: str | Path, fmt: str) -> None:
        """Write the last report as CSV or JSON."""
        assert self.report is not None
        text = report_to_csv(self.report) if fmt == "csv" else json.dumps(self.report, indent=2)
        Path(path).write_text(text, encoding="utf-8")

    def _export(self, fmt: str) -> None:
        if self.report is None:
            return
        name_filter = "CSV (*.csv)" if fmt == "csv" else "JSON (*.json)"
        path, _ = QFileDialog.getSaveFileName(self, "Export comparison", f"comparison.{fmt}", name_filter)
        if path:
            self.export(path, fmt)


def _values(bar_set: QBarSet) -> list[float]:
    return [bar_set.at(i) for i in range(bar_set.count())]
