"""The queue: jobs in engine order, reorder (drag or up/down), remove, cancel, requeue.

The panel shows what the engine's last `queue` message said and asks the engine for every change;
only "cancelling" is shown before the engine answers, so that Cancel is acknowledged at once.
"""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QHBoxLayout,
    QLabel,
    QListView,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

STATUS_COLOURS = {
    "queued": QColor("#6b7280"),
    "running": QColor("#2563eb"),
    "done": QColor("#15803d"),
    "failed": QColor("#b91c1c"),
    "cancelled": QColor("#a16207"),
    "interrupted": QColor("#c2410c"),
}
FINISHED = ("done", "failed", "cancelled", "interrupted")
REQUEUEABLE = ("failed", "cancelled", "interrupted")
JOB_ROLE = Qt.ItemDataRole.UserRole


def describe_job(job: dict[str, Any], cancelling: bool = False) -> str:
    request = job.get("request") or {}
    status = "cancelling…" if cancelling and job.get("status") == "running" else job.get("status", "?")
    if job.get("compare"):
        how = "compare " + ", ".join(f"{s}@{d}" for s, d in job["compare"])
    else:
        how = f"{request.get('strategy', '?')}@{request.get('devices', '?')}"
    prompt = (request.get("prompt") or request.get("image") or "").strip().replace("\n", " ")
    if len(prompt) > 60:
        prompt = prompt[:57] + "…"
    line = f"[{status}] {request.get('model', '?')} · {how} · seed {request.get('seed', '?')}"
    return f"{line}\n{prompt}" if prompt else line


class QueueList(QListWidget):
    """A list whose drops are reported, so the new order can be sent to the engine."""

    dropped = Signal()

    def dropEvent(self, event: Any) -> None:
        super().dropEvent(event)
        self.dropped.emit()


class QueuePanel(QWidget):
    reorder_requested = Signal(list)  # queued job ids in their new order
    remove_requested = Signal(str)
    cancel_requested = Signal(str)
    requeue_requested = Signal(str)
    use_settings_requested = Signal(dict)  # a job's request
    resume_requested = Signal()  # run a queue kept from the last session

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.jobs: list[dict[str, Any]] = []
        self.cancelling: set[str] = set()

        self.list = QueueList()
        self.list.setDragDropMode(QAbstractItemView.DragDropMode.InternalMove)
        self.list.setDefaultDropAction(Qt.DropAction.MoveAction)
        self.list.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.list.setAlternatingRowColors(True)
        # Long lines wrap to the panel's width instead of hiding behind a horizontal scroll bar.
        self.list.setWordWrap(True)
        self.list.setResizeMode(QListView.ResizeMode.Adjust)
        self.list.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.list.dropped.connect(self._on_dropped)
        self.list.currentItemChanged.connect(self._update_buttons)
        self.list.itemDoubleClicked.connect(self._use_settings)

        self.up_button = QPushButton("Up")
        self.down_button = QPushButton("Down")
        self.remove_button = QPushButton("Remove")
        self.cancel_button = QPushButton("Cancel")
        self.requeue_button = QPushButton("Requeue")
        self.hide_finished = QCheckBox("Hide finished")
        self.up_button.clicked.connect(lambda: self._move(-1))
        self.down_button.clicked.connect(lambda: self._move(+1))
        self.remove_button.clicked.connect(self._remove)
        self.cancel_button.clicked.connect(self._cancel)
        self.requeue_button.clicked.connect(self._requeue)
        self.hide_finished.toggled.connect(lambda: self.set_jobs(self.jobs))
        self.cancel_button.setToolTip("Stop the running job now (its decode is skipped)")

        # A queue kept from the last session waits for the user's say-so.
        self.held_note = QLabel(wordWrap=True)
        self.resume_button = QPushButton("Resume queue")
        self.resume_button.clicked.connect(self.resume_requested)
        self.held_row = QWidget()
        held_layout = QHBoxLayout(self.held_row)
        held_layout.setContentsMargins(0, 0, 0, 0)
        held_layout.addWidget(self.held_note, 1)
        held_layout.addWidget(self.resume_button)
        self.held_row.hide()

        buttons = QHBoxLayout()
        for button in (
            self.up_button,
            self.down_button,
            self.remove_button,
            self.cancel_button,
            self.requeue_button,
        ):
            buttons.addWidget(button)
        layout = QVBoxLayout(self)
        layout.addWidget(self.held_row)
        layout.addWidget(self.list, 1)
        layout.addLayout(buttons)
        layout.addWidget(self.hide_finished)
        self._update_buttons()

    # ---- model --------------------------------------------------------------------------------
    def set_held(self, held: bool, waiting: int) -> None:
        self.held_note.setText(f"Paused: {waiting} job(s) kept from last time wait for you.")
        self.held_row.setVisible(held)

    def set_jobs(self, jobs: list[dict[str, Any]]) -> None:
        """Show the engine's queue, keeping the selection."""
        self.jobs = list(jobs)
        running = {j["job_id"] for j in jobs if j.get("status") == "running"}
        self.cancelling &= running
        selected = self.selected_job()
        self.list.clear()
        for job in jobs:
            if self.hide_finished.isChecked() and job.get("status") in FINISHED:
                continue
            item = QListWidgetItem(describe_job(job, job["job_id"] in self.cancelling))
            item.setData(JOB_ROLE, job["job_id"])
            item.setForeground(STATUS_COLOURS.get(job.get("status", ""), QColor("black")))
            tip = job.get("error") or (job.get("result") or {}).get("output") or ""
            item.setToolTip(str(tip))
            flags = Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable
            if job.get("status") == "queued":
                flags |= Qt.ItemFlag.ItemIsDragEnabled  # only waiting jobs move
            item.setFlags(flags)
            self.list.addItem(item)
            if selected and job["job_id"] == selected.get("job_id"):
                self.list.setCurrentItem(item)
        self._update_buttons()

    def job(self, job_id: str) -> dict[str, Any] | None:
        return next((j for j in self.jobs if j["job_id"] == job_id), None)

    def selected_job(self) -> dict[str, Any] | None:
        item = self.list.currentItem()
        return self.job(item.data(JOB_ROLE)) if item is not None else None

    def select(self, job_id: str) -> None:
        for row in range(self.list.count()):
            if self.list.item(row).data(JOB_ROLE) == job_id:
                self.list.setCurrentRow(row)

    def queued_ids(self) -> list[str]:
        """The queued jobs in the order shown."""
        ids = [self.list.item(row).data(JOB_ROLE) for row in range(self.list.count())]
        return [i for i in ids if (self.job(i) or {}).get("status") == "queued"]

    def mark_cancelling(self, job_id: str) -> None:
        """Show the job as cancelling (at the click, and again when the engine confirms)."""
        self.cancelling.add(job_id)
        self.set_jobs(self.jobs)

    # ---- actions ------------------------------------------------------------------------------
    def _on_dropped(self) -> None:
        self.reorder_requested.emit(self.queued_ids())

    def _move(self, offset: int) -> None:
        job = self.selected_job()
        ids = self.queued_ids()
        if job is None or job["job_id"] not in ids:
            return
        index = ids.index(job["job_id"])
        target = index + offset
        if 0 <= target < len(ids):
            ids[index], ids[target] = ids[target], ids[index]
            self.reorder_requested.emit(ids)

    def _remove(self) -> None:
        job = self.selected_job()
        if job is not None and job.get("status") == "queued":
            self.remove_requested.emit(job["job_id"])

    def _cancel(self) -> None:
        job = self.selected_job()
        if job is None or job.get("status") != "running":
            job = next((j for j in self.jobs if j.get("status") == "running"), None)
        if job is not None:
            self.mark_cancelling(job["job_id"])
            self.cancel_requested.emit(job["job_id"])

    def _requeue(self) -> None:
        job = self.selected_job()
        if job is not None and job.get("status") in REQUEUEABLE:
            self.requeue_requested.emit(job["job_id"])

    def _use_settings(self, item: QListWidgetItem) -> None:
        job = self.job(item.data(JOB_ROLE))
        if job is not None and job.get("request"):
            self.use_settings_requested.emit(job["request"])

    def _update_buttons(self) -> None:
        job = self.selected_job()
        status = job.get("status") if job else None
        queued = self.queued_ids()
        self.up_button.setEnabled(status == "queued" and bool(queued) and queued[0] != job["job_id"])
        self.down_button.setEnabled(status == "queued" and bool(queued) and queued[-1] != job["job_id"])
        self.remove_button.setEnabled(status == "queued")
        running = any(j.get("status") == "running" and j["job_id"] not in self.cancelling for j in self.jobs)
        self.cancel_button.setEnabled(running)
        self.requeue_button.setEnabled(status in REQUEUEABLE)
