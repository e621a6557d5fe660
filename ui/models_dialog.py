"""The Models dialog: the checkpoints `parastep-studio pull` knows, what is installed, download with
progress (speed, ETA) and cancel, delete, show the folder.

A download runs as a child process, `python -m app.pull_command SPEC --json` (`parastep-studio
pull`), whose stdout carries one JSON object per line (progress events, then `done`). So
huggingface_hub and its HTTP stack never load in the window, the engine's job queue and protocol stay
as they are (the engine sees the new model on the next `catalog` request, which reads the models
folder), and cancel is a SIGTERM that the command turns into a clean stop: the partial file is kept
and the next download resumes it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from PySide6.QtCore import QObject, QProcess, QProcessEnvironment, Qt, QTimer, QUrl, Signal
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import (
    QAbstractItemView,
    QDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QMessageBox,
    QProgressBar,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from app.pull_command import progress_line
from engine.checkpoints import available, delete_installed, format_size, installed_models, models_dir
from engine.errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[1]
KILL_AFTER_MS = 5000  # a cancelled pull that has not stopped by then is killed (its part file stays)
COLUMNS = ("Name", "Hub id", "Size", "GPU memory", "Licence", "Installed")
INSTALLED_TITLES = {"downloaded": "downloaded", "hf-cache": "HF cache", None: "—"}


class PullProcess(QObject):
    """One `pull --json` child process; its JSON lines become signals."""

    progress = Signal(dict)  # a progress event (engine.downloads.PullProgress.to_dict())
    finished = Signal(bool, str)  # ok, then the model folder or the error line

    def __init__(self, python: str = sys.executable, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.python = python
        self.process: QProcess | None = None
        self._buffer = b""
        self._result = ""
        self.cancelled = False

    def is_running(self) -> bool:
        return self.process is not None and self.process.state() != QProcess.ProcessState.NotRunning

    def start(self, spec: str) -> None:
        process = QProcess(self)
        process.setWorkingDirectory(str(REPO_ROOT))
        env = QProcessEnvironment.systemEnvironment()
        env.insert("PYTHONUNBUFFERED", "1")
        process.setProcessEnvironment(env)
        process.readyReadStandardOutput.connect(self._on_stdout)
        process.finished.connect(self._on_finished)
        self.process, self._buffer, self._result, self.cancelled = process, b"", "", False
        process.start(self.python, ["-m", "app.pull_command", spec, "--json"])

    def cancel(self) -> None:
        if self.is_running():
            self.cancelled = True
            self.process.terminate()  # SIGTERM: the command stops cleanly at the next chunk
            QTimer.singleShot(KILL_AFTER_MS, self._kill)

    def _kill(self) -> None:
        if self.is_running():
            self.process.kill()

    def _on_stdout(self) -> None:
        self._buffer += bytes(self.process.readAllStandardOutput())
        *lines, self._buffer = self._buffer.split(b"\n")
        for line in lines:
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if message.get("type") == "progress":
                self.progress.emit(message)
            elif message.get("type") == "done":
                self._result = message.get("path", "")

    def _on_finished(self, code: int, _status: QProcess.ExitStatus) -> None:
        self._on_stdout()
        errors = bytes(self.process.readAllStandardError()).decode(errors="replace").strip().splitlines()
        if code == 0 and self._result:
            self.finished.emit(True, self._result)
        elif self.cancelled:
            self.finished.emit(False, "Cancelled. The part downloaded is kept: Download resumes it.")
        else:
            last = next(
                (line for line in reversed(errors) if line.strip()), f"pull exited with status {code}"
            )
            self.finished.emit(False, last.removeprefix("error: "))


class ModelsDialog(QDialog):
    models_changed = Signal()  # a model was installed or deleted: the catalog should be fetched again

    def __init__(self, parent: QWidget | None = None, python: str = sys.executable) -> None:
        super().__init__(parent)
        self.setWindowTitle("Models")
        self.resize(900, 460)
        self.rows: list[dict[str, Any]] = []
        self.pull = PullProcess(python, self)
        self.pull.progress.connect(self._on_progress)
        self.pull.finished.connect(self._on_finished)

        self.table = QTableWidget(0, len(COLUMNS))
        self.table.setHorizontalHeaderLabels(COLUMNS)
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        self.table.itemSelectionChanged.connect(self._update_buttons)
        self.other = QLineEdit(placeholderText="or another hub id: ORG/NAME[@REVISION]")
        self.other.textChanged.connect(self._update_buttons)
        self.download_button = QPushButton("Download")
        self.download_button.clicked.connect(self.download)
        self.cancel_button = QPushButton("Cancel download")
        self.cancel_button.clicked.connect(self.pull.cancel)
        self.delete_button = QPushButton("Delete...")
        self.delete_button.clicked.connect(self.delete_selected)
        self.folder_button = QPushButton("Show folder")
        self.folder_button.clicked.connect(self.show_folder)
        self.progress_bar = QProgressBar()
        self.progress_bar.setRange(0, 1000)
        self.progress_bar.setTextVisible(False)
        self.status = QLabel(wordWrap=True)
        self.status.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        note = QLabel(
            f"Pulled models go to {models_dir()} (PARASTEP_MODELS_DIR changes it). Sizes and GPU memory "
            "are approximate; gated models need their licence accepted on the hub and HF_TOKEN set."
        )
        note.setWordWrap(True)
        note.setStyleSheet("color: palette(mid);")

        buttons = QHBoxLayout()
        buttons.addWidget(self.other, 1)
        for button in (self.download_button, self.cancel_button, self.delete_button, self.folder_button):
            buttons.addWidget(button)
        layout = QVBoxLayout(self)
        layout.addWidget(self.table, 1)
        layout.addLayout(buttons)
        layout.addWidget(self.progress_bar)
        layout.addWidget(self.status)
        layout.addWidget(note)
        self.refresh()

    # ---- the table ---------------------------------------------------------------------------
    def refresh(self) -> None:
        """Reads the checkpoint list and the models folder again (JSON files only)."""
        selected = self.selected()
        known = available()
        listed = {row["hub_id"] for row in known}
        for folder, manifest in installed_models():  # pulled by hub id: not in the list
            if manifest["hub_id"] not in listed:
                size = sum(f.get("size", 0) for f in manifest.get("files", []))
                known.append(
                    {"name": manifest.get("name") or manifest["hub_id"], "hub_id": manifest["hub_id"]}
                    | {"size_bytes": size, "gpu_memory_gb": None, "licence": "", "gated": False}
                    | {"notes": "", "installed": "downloaded", "path": str(folder)}
                )
        self.rows = known
        self.table.setRowCount(len(known))
        for index, row in enumerate(known):
            gpu = f"{row['gpu_memory_gb']:.0f} GB" if row.get("gpu_memory_gb") else ""
            licence = row["licence"] + (", gated" if row.get("gated") else "")
            cells = (row["name"], row["hub_id"], format_size(row["size_bytes"]), gpu, licence)
            for column, text in enumerate((*cells, INSTALLED_TITLES.get(row["installed"], "?"))):
                item = QTableWidgetItem(text)
                item.setToolTip(row.get("notes") or text)
                self.table.setItem(index, column, item)
        self.table.resizeColumnsToContents()
        if selected is not None:
            self.select(selected["hub_id"])
        self._update_buttons()

    def select(self, name_or_hub_id: str) -> None:
        for index, row in enumerate(self.rows):
            if name_or_hub_id in (row["name"], row["hub_id"]):
                self.table.selectRow(index)

    def selected(self) -> dict[str, Any] | None:
        rows = self.table.selectionModel().selectedRows() if self.table.selectionModel() else []
        return self.rows[rows[0].row()] if rows else None

    def _update_buttons(self) -> None:
        row, busy = self.selected(), self.pull.is_running()
        self.download_button.setEnabled(not busy and (bool(self.other.text().strip()) or row is not None))
        self.cancel_button.setEnabled(busy)
        self.delete_button.setEnabled(not busy and row is not None and row["installed"] == "downloaded")
        self.delete_button.setToolTip(
            "Only models pulled here are deleted here (not the Hugging Face cache)."
            if row is not None and row["installed"] == "hf-cache"
            else ""
        )

    # ---- actions -------------------------------------------------------------------------------
    def download(self) -> None:
        row = self.selected()
        spec = self.other.text().strip() or (row["name"] if row else "")
        if not spec or self.pull.is_running():
            return
        self.progress_bar.setValue(0)
        self._set_status(f"Getting {spec}...")
        self.pull.start(spec)
        self._update_buttons()

    def delete_selected(self) -> None:
        row = self.selected()
        if row is None or row["installed"] != "downloaded":
            return
        answer = QMessageBox.question(
            self,
            "Delete model",
            f"Delete {row['name']} ({format_size(row['size_bytes'])}) from {row['path']}?",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
            QMessageBox.StandardButton.No,
        )
        if answer != QMessageBox.StandardButton.Yes:
            return
        try:
            delete_installed(row["hub_id"])
        except (UserError, OSError) as exc:
            self._set_status(str(exc), error=True)
            return
        self._set_status(f"Deleted {row['name']}.")
        self.refresh()
        self.models_changed.emit()

    def show_folder(self) -> None:
        row = self.selected()
        folder = Path(row["path"]) if row and row.get("path") else models_dir()
        if folder == models_dir():
            folder.mkdir(parents=True, exist_ok=True)  # nothing pulled yet: show where pulls will go
        QDesktopServices.openUrl(QUrl.fromLocalFile(str(folder)))

    # ---- the pull's events -----------------------------------------------------------------------
    def _on_progress(self, message: dict[str, Any]) -> None:
        event = SimpleNamespace(**message)
        if event.total_bytes:
            self.progress_bar.setValue(int(1000 * event.done_bytes / event.total_bytes))
        stage = {"plan": "Looking up", "install": "Installing", "done": "Installed"}.get(event.stage)
        self._set_status(f"{stage} {event.hub_id}..." if stage else progress_line(event))

    def _on_finished(self, ok: bool, text: str) -> None:
        if ok:
            self.progress_bar.setValue(1000)
            self._set_status(f"Installed and verified: {text}")
            self.other.clear()
            self.refresh()
            self.models_changed.emit()
        else:
            self._set_status(text, error=not self.pull.cancelled)
        self._update_buttons()

    def _set_status(self, text: str, error: bool = False) -> None:
        self.status.setStyleSheet("color: #c0392b;" if error else "")
        self.status.setText(text)
