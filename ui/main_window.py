"""The main window: wires the panels to the engine client.

Layout: the request panel on the left; in the middle the live view (progress, x0 preview, device
timeline), the result player and the comparison lab as tabs; the queue and the history on the
right; the engine's status and log at the bottom. The window only talks to the engine through
`EngineClient`; it never imports torch.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import Qt, QTimer, QUrl
from PySide6.QtGui import QAction, QCloseEvent, QDesktopServices, QKeySequence
from PySide6.QtWidgets import (
    QApplication,
    QDockWidget,
    QFileDialog,
    QMainWindow,
    QMessageBox,
    QScrollArea,
    QSplitter,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from engine.catalog import read_entry
from engine.errors import UserError
from engine.outputs import default_output_dir, read_request
from engine.protocol import GenerationRequest
from ui.compare_lab import CompareLab
from ui.engine_client import EngineClient, EngineState
from ui.engine_panel import EnginePanel, EngineStatusLabel
from ui.help_menu import add_help_menu
from ui.history_panel import HistoryPanel
from ui.job_progress import JobProgress, ProgressPanel
from ui.model_info import BUILTIN_STRATEGIES, ModelInfo, strategy_width
from ui.notifier import Notifier
from ui.preview_view import PreviewView
from ui.queue_panel import QueuePanel
from ui.request_panel import RequestPanel
from ui.settings import StudioSettings
from ui.strategy_picker import parse_device_spec
from ui.thumbnails import ThumbnailCache
from ui.timeline_view import TimelineView
from ui.validation import CheckResult, people_message

if TYPE_CHECKING:
    from ui.models_dialog import ModelsDialog
    from ui.result_viewer import ResultViewer

TICK_MS = 500  # the ETA keeps counting between steps


def rank_devices(devices: str) -> list[str]:
    """The device label of each rank: 'cpu:3' -> ['cpu'] * 3, 'cuda:0,2' -> ['cuda:0', 'cuda:2']."""
    parsed = parse_device_spec(devices)
    if parsed is None:
        return []
    kind, values = parsed
    return ["cpu"] * values[0] if kind == "cpu" else [f"cuda:{i}" for i in values]


def job_title(job: dict[str, Any]) -> str:
    """A job in one short line for a notification: model and the start of the prompt."""
    request = job.get("request") or {}
    model = request.get("model") or job.get("job_id") or "job"
    prompt = " ".join(str(request.get("prompt") or "").split())
    if len(prompt) > 50:
        prompt = prompt[:49] + "…"
    what = "comparison" if job.get("compare") else model
    return f"{what}: {prompt}" if prompt else str(what)


class MainWindow(QMainWindow):
    def __init__(
        self,
        client: EngineClient,
        settings: StudioSettings | None = None,
        output_dir: Path | None = None,
    ) -> None:
        super().__init__()
        self.setWindowTitle("ParaStep Studio")
        self.resize(1400, 900)
        self.client = client
        self.settings = settings or StudioSettings()
        self.models: dict[str, ModelInfo] = {}
        self._devices: list[dict[str, Any]] = []  # the engine's inventory, for the About box
        self.strategies: dict[str, dict[str, Any]] = {}  # name -> the catalog's description
        self.current_job: dict[str, Any] | None = None
        self.runs_started = 0  # runs begun in the current job (a comparison has several)
        self._catalog_requested = False
        self._select_after_catalog: str | None = None  # a model folder just added
        self.models_dialog: ModelsDialog | None = None
        self._checks_sent = {"request": 0, "compare": 0}  # only the answer to the newest check counts
        self._close_after_queue = False  # "Finish first": close once the queue has run

        chosen = self.settings.output_folder()
        self._build_panels(output_dir or (Path(chosen) if chosen else default_output_dir()))
        self._build_layout()
        self._build_menus()
        self._connect_client()
        self._connect_panels()
        self._restore_settings()
        self._tick = QTimer(self, interval=TICK_MS)
        self._tick.timeout.connect(self.progress_panel.refresh)
        self._on_state(str(client.state))

    # ---- construction -------------------------------------------------------------------------
    def _build_panels(self, output_dir: Path) -> None:
        self.request_panel = RequestPanel()
        self.progress = JobProgress()
        self.progress_panel = ProgressPanel(self.progress)
        self.preview = PreviewView()
        self.timeline = TimelineView()
        self.queue_panel = QueuePanel()
        self.thumbnails = ThumbnailCache(parent=self)
        self.history_panel = HistoryPanel(output_dir, self.thumbnails)
        self.engine_panel = EnginePanel()
        self.compare_lab = CompareLab(self.request_panel.request)
        self.status_label = EngineStatusLabel()
        self.notifier = Notifier(self, self.settings)
        # The player (QtMultimedia) is created on first use: it starts a media backend.
        self._result_viewer: ResultViewer | None = None

    def _build_layout(self) -> None:
        live = QWidget()
        live_layout = QVBoxLayout(live)
        live_layout.addWidget(self.progress_panel)
        split = QSplitter(Qt.Orientation.Vertical)
        split.addWidget(self.preview)
        split.addWidget(self.timeline)
        split.setStretchFactor(0, 3)
        split.setStretchFactor(1, 1)
        live_layout.addWidget(split, 1)

        self.tabs = QTabWidget()
        self.tabs.addTab(live, "Live")
        self.result_tab = QWidget()
        self.result_tab.setLayout(QVBoxLayout())
        self.tabs.addTab(self.result_tab, "Result")
        self.tabs.addTab(self.compare_lab, "Compare")
        self.setCentralWidget(self.tabs)

        scroll = QScrollArea()
        scroll.setWidget(self.request_panel)
        scroll.setWidgetResizable(True)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        scroll.setMinimumWidth(380)
        self._dock("Request", scroll, Qt.DockWidgetArea.LeftDockWidgetArea)
        side = QTabWidget()
        side.addTab(self.queue_panel, "Queue")
        side.addTab(self.history_panel, "History")
        self.side_tabs = side
        self._dock("Queue and history", side, Qt.DockWidgetArea.RightDockWidgetArea)
        engine_dock = self._dock("Engine", self.engine_panel, Qt.DockWidgetArea.BottomDockWidgetArea)
        self.resizeDocks([engine_dock], [150], Qt.Orientation.Vertical)  # the log is secondary
        self.statusBar().addPermanentWidget(self.status_label)

    def _dock(self, title: str, widget: QWidget, area: Qt.DockWidgetArea) -> QDockWidget:
        dock = QDockWidget(title, self)
        dock.setObjectName(title.replace(" ", "_"))  # saveState needs names
        dock.setWidget(widget)
        self.addDockWidget(area, dock)
        return dock

    def _build_menus(self) -> None:
        file_menu = self.menuBar().addMenu("&File")
        add_folder = QAction("Add model folder...", self)
        add_folder.triggered.connect(self.request_panel.pick_model_folder)
        get_models = QAction("Get models...", self)
        get_models.triggered.connect(lambda: self.open_models_dialog())
        choose_output = QAction("Choose output folder...", self)
        choose_output.triggered.connect(self._choose_output_folder)
        open_output = QAction("Open output folder", self)
        open_output.triggered.connect(
            lambda: QDesktopServices.openUrl(QUrl.fromLocalFile(str(self.history_panel.folder)))
        )
        open_settings = QAction("Open clip settings...", self)
        open_settings.triggered.connect(self._open_clip_settings)
        quit_action = QAction("Quit", self)
        quit_action.setShortcut(QKeySequence(QKeySequence.StandardKey.Quit))
        quit_action.triggered.connect(self.close)
        for action in (get_models, add_folder, open_settings, choose_output, open_output, quit_action):
            file_menu.addAction(action)
        engine_menu = self.menuBar().addMenu("&Engine")
        restart = QAction("Restart engine", self)
        restart.triggered.connect(self.client.restart)
        engine_menu.addAction(restart)
        view_menu = self.menuBar().addMenu("&View")
        for dock in self.findChildren(QDockWidget):
            view_menu.addAction(dock.toggleViewAction())
        view_menu.addSeparator()
        self.notify_action = QAction("Notify when a job ends", self, checkable=True)
        self.notify_action.setChecked(self.settings.notify_when_done())
        self.notify_action.toggled.connect(self.settings.set_notify_when_done)
        self.sound_action = QAction("Play a sound when a job ends", self, checkable=True)
        self.sound_action.setChecked(self.settings.notify_sound())
        self.sound_action.toggled.connect(self.settings.set_notify_sound)
        view_menu.addAction(self.notify_action)
        view_menu.addAction(self.sound_action)
        add_help_menu(self, lambda: self._devices, lambda: self.client.engine_pid)

    def _connect_client(self) -> None:
        c = self.client
        c.state_changed.connect(self._on_state)
        c.welcomed.connect(lambda _welcome: self._allow_output_folder())
        c.catalog_received.connect(self._on_catalog)
        c.queue_changed.connect(self.queue_panel.set_jobs)
        c.job_started.connect(self._on_job_started)
        c.stage_changed.connect(self._on_stage)
        c.step_received.connect(self._on_step)
        c.preview_received.connect(self._on_preview)
        c.job_finished.connect(self._on_job_finished)
        c.job_failed.connect(self._on_job_failed)
        c.job_cancelling.connect(self.queue_panel.mark_cancelling)
        c.job_cancelled.connect(self._on_job_cancelled)
        c.log_received.connect(lambda line: self.engine_panel.append(line))
        c.error_received.connect(self._on_engine_error)
        c.engine_died.connect(self._on_engine_died)

    def _connect_panels(self) -> None:
        self.request_panel.generate_requested.connect(self.submit)
        self.request_panel.model_folder_added.connect(self._add_model_folder)
        self.request_panel.get_models_requested.connect(self.open_models_dialog)
        self.request_panel.seed_mode.currentIndexChanged.connect(
            lambda: self.settings.set_seed_mode(self.request_panel.seed_mode_value())
        )
        q = self.queue_panel
        q.reorder_requested.connect(self.client.reorder)
        q.remove_requested.connect(self.client.remove)
        q.cancel_requested.connect(self.client.cancel)
        q.requeue_requested.connect(self.client.requeue)
        q.use_settings_requested.connect(self._use_request_dict)
        h = self.history_panel
        h.use_settings_requested.connect(self.use_settings)
        h.open_requested.connect(self.show_result)
        h.favourites_changed.connect(self.settings.set_favourites)
        self.engine_panel.restart_requested.connect(self.client.restart)
        self.compare_lab.submit_requested.connect(self.submit_comparison)
        self.request_panel.check_wanted.connect(lambda request: self._check("request", request))
        self.compare_lab.check_wanted.connect(
            lambda request, entries: self._check("compare", request, entries)
        )
        q.resume_requested.connect(self.client.resume)
        self.request_panel.changed.connect(self.compare_lab.schedule_check)  # same request, other entries
        self.client.queue_changed.connect(self._on_queue)
        self.compare_lab.entries_changed.connect(self.settings.set_compare_entries)

    def _restore_settings(self) -> None:
        geometry, state = self.settings.window_state()
        if geometry is not None:
            self.restoreGeometry(geometry)
        if state is not None:
            self.restoreState(state)
        last = self.settings.last_request()
        if last is not None:
            self.request_panel.set_request(last)
        self.request_panel.set_seed_mode(self.settings.seed_mode())
        self.history_panel.set_favourites(self.settings.favourites())
        entries = self.settings.compare_entries()
        if entries:
            self.compare_lab.set_entries(entries)
        self.history_panel.refresh()

    # ---- results player -----------------------------------------------------------------------
    @property
    def result_viewer(self) -> ResultViewer:
        if self._result_viewer is None:
            from ui.result_viewer import ResultViewer

            self._result_viewer = ResultViewer()
            self.result_tab.layout().addWidget(self._result_viewer)
        return self._result_viewer

    def show_result(self, path: str) -> None:
        self.result_viewer.show_clip(path)
        self.tabs.setCurrentWidget(self.result_tab)

    # ---- output folder --------------------------------------------------------------------------
    def _choose_output_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(
            self, "Folder for new clips", str(self.history_panel.folder)
        )
        if folder:
            self.set_output_folder(Path(folder))

    def set_output_folder(self, folder: Path) -> None:
        """New clips go to `folder` (remembered), and the history shows it."""
        self.settings.set_output_folder(str(folder))
        self.history_panel.set_folder(folder)
        self.history_panel.refresh()
        self._allow_output_folder()

    def _allow_output_folder(self) -> None:
        """Tells the engine the folder the user chose: it writes clips of requests (whose output may
        come from a restored sidecar) only there and in the default folder (engine.output_policy)."""
        chosen = self.settings.output_folder()
        if chosen:
            self.client.send({"type": "allow_output", "folder": chosen})

    def _with_output(self, request: GenerationRequest) -> GenerationRequest:
        chosen = self.settings.output_folder()
        if request.output is None and chosen:
            return dataclasses.replace(request, output=chosen.rstrip("/") + "/")
        return request

    # ---- requests -----------------------------------------------------------------------------
    def submit(self, request: GenerationRequest) -> None:
        self.settings.set_last_request(request)
        request = self._with_output(request)
        if not self.client.submit(request.to_dict(), on_reply=self._on_submitted):
            self.statusBar().showMessage("The engine is not running: start it with Engine > Restart.", 8000)

    def submit_comparison(self, request: GenerationRequest, entries: list[list[str]]) -> None:
        self.settings.set_last_request(request)
        request = self._with_output(request)
        if not self.client.submit(request.to_dict(), compare=entries, on_reply=self._on_submitted):
            self.statusBar().showMessage("The engine is not running: start it with Engine > Restart.", 8000)

    def _check(self, what: str, request: GenerationRequest, entries: list[list[str]] | None = None) -> None:
        """Ask the engine whether the request (or comparison) would run; the newest answer is shown."""
        self._checks_sent[what] += 1
        number = self._checks_sent[what]
        target = self.request_panel if what == "request" else self.compare_lab

        def answered(reply: dict[str, Any]) -> None:
            if number == self._checks_sent[what]:
                target.set_check_result(CheckResult.from_reply(reply))

        folders = self.settings.model_folders()
        request_dict = self._with_output(request).to_dict()
        if not self.client.check(request_dict, entries, folders, on_reply=answered):
            target.set_check_result(CheckResult())

    def _on_queue(self, jobs: list[dict[str, Any]]) -> None:
        waiting = sum(job.get("status") == "queued" for job in jobs)
        self.queue_panel.set_held(self.client.held, waiting)
        if self._close_after_queue and not any(j.get("status") in ("queued", "running") for j in jobs):
            self._close_after_queue = False
            self.close()

    def _on_submitted(self, reply: dict[str, Any]) -> None:
        if reply.get("type") == "error":
            self.statusBar().showMessage(f"Not queued: {reply.get('message')}", 15000)
            self.engine_panel.append(f"submit refused: {reply.get('message')}", "window")
        else:
            self.queue_panel.select(reply.get("job_id", ""))
            self.statusBar().showMessage("Queued.", 3000)

    def use_settings(self, request: GenerationRequest) -> None:
        self.request_panel.set_request(request)
        self.statusBar().showMessage(f"Settings of {request.model}, seed {request.seed} restored.", 5000)

    def _use_request_dict(self, data: dict[str, Any]) -> None:
        try:
            self.use_settings(GenerationRequest.from_dict(data))
        except UserError as err:
            self.statusBar().showMessage(str(err), 10000)

    def _open_clip_settings(self) -> None:
        path, _ = QFileDialog.getOpenFileName(
            self,
            "Open a clip or its sidecar",
            str(self.history_panel.folder),
            "Clips (*.json *.mp4 *.gif *.wav *.flac)",
        )
        if path:
            try:
                self.use_settings(read_request(path))
            except UserError as err:
                self.statusBar().showMessage(str(err), 10000)

    def open_models_dialog(self, name: str = "") -> None:
        """The Models dialog (download, delete); built on first use, kept so a download goes on
        while it is closed. The catalog is fetched again when it installs or deletes a model."""
        if self.models_dialog is None:
            from ui.models_dialog import ModelsDialog

            self.models_dialog = ModelsDialog(self)
            self.models_dialog.models_changed.connect(
                lambda: self.client.fetch_catalog(self.settings.model_folders())
            )
        self.models_dialog.refresh()
        if name:
            self.models_dialog.select(name)
        self.models_dialog.show()
        self.models_dialog.raise_()

    def _add_model_folder(self, folder: str) -> None:
        """Check the folder here (JSON files only), remember it, and pick its model once listed."""
        try:
            entry = read_entry(Path(folder), source="local")
        except UserError as err:
            self.statusBar().showMessage(str(err), 15000)
            self.engine_panel.append(f"model folder not added: {err}", "window")
            return
        self.settings.set_model_folders([*self.settings.model_folders(), folder])
        self._select_after_catalog = entry.name
        self.client.fetch_catalog(self.settings.model_folders())

    # ---- engine events ------------------------------------------------------------------------
    def _on_state(self, state: str) -> None:
        self.status_label.set_state(state, self.client.engine_pid)
        self.engine_panel.set_state(state, self.client.engine_pid)
        connected = state in (EngineState.READY, EngineState.BUSY)
        self.request_panel.set_connected(connected)
        self.compare_lab.set_connected(connected)
        if connected and not self._catalog_requested:
            self._catalog_requested = True
            self.client.fetch_catalog(self.settings.model_folders())
        if state == EngineState.STOPPED:
            self._catalog_requested = False  # a new engine gets asked again
            self._tick.stop()

    def _on_catalog(self, catalog: dict[str, Any]) -> None:
        self.models = {m.get("name", ""): ModelInfo.from_entry(m) for m in catalog.get("models", [])}
        self.request_panel.set_catalog(catalog)
        if self._select_after_catalog in self.models:
            self.request_panel.select_model(self._select_after_catalog)
        self._select_after_catalog = None
        self.strategies = {s["name"]: s for s in catalog.get("strategies", []) if s.get("name")}
        self.compare_lab.set_strategies(list(self.strategies))
        self._devices = list(catalog.get("devices", []))
        self.compare_lab.set_devices(self._devices)
        gpus = [d for d in catalog.get("devices", []) if d.get("kind") == "cuda"]
        self.engine_panel.append(
            f"catalog: {len(self.models)} models, {len(gpus)} GPU(s)"
            + (": " + ", ".join(str(g.get("name")) for g in gpus) if gpus else ", CPU workers"),
            "window",
        )

    def _job(self, job_id: str) -> dict[str, Any]:
        return next((j for j in self.client.jobs if j.get("job_id") == job_id), {"job_id": job_id})

    def _on_job_started(self, job_id: str) -> None:
        self.current_job = self._job(job_id)
        self.runs_started = 0
        self.progress.reset(job_id)
        request = self.current_job.get("request") or {}
        info = self.models.get(request.get("model", ""))
        self.preview.set_modality(info.modality if info else "video")
        self.preview.clear("Waiting for the first preview…")
        self._configure_timeline(request)
        self.tabs.setCurrentIndex(0)
        self.progress_panel.refresh()
        self._tick.start()

    def _configure_timeline(self, request: dict[str, Any], strategy: str = "", devices: str = "") -> None:
        strategy = strategy or request.get("strategy", "sequential")
        devices = devices or request.get("devices", "")
        info = self.models.get(request.get("model", "")) or ModelInfo.unknown(request.get("model", ""))
        steps = request.get("steps") or info.defaults.get("steps") or 0
        options = request.get("strategy_options") or {}
        described = self.strategies.get(strategy) or BUILTIN_STRATEGIES.get(strategy, {})
        ranks = rank_devices(devices)
        if described.get("max_devices", 1) == 1:
            ranks = ranks[:1]
        warmup = round_width = None
        if (described.get("ideal") or {}).get("rounds") and steps:
            warmup = options.get("warmup")
            warmup = info.default_warmup(steps) if warmup is None else warmup
            round_width = strategy_width(described, options, len(ranks))
        self.timeline.reset(steps, ranks, warmup, round_width)

    def _on_stage(self, job_id: str, stage: str) -> None:
        self.progress.on_stage(stage)
        if stage == "load" and self.current_job and self.current_job.get("compare"):
            # A comparison runs its entries one after another: one timeline per run.
            entries = self.current_job["compare"]
            if self.runs_started < len(entries):
                strategy, devices = entries[self.runs_started]
                self._configure_timeline(self.current_job.get("request") or {}, strategy, devices)
            self.runs_started += 1
        self.progress_panel.refresh()

    def _on_step(self, event: dict[str, Any]) -> None:
        self.timeline.add_step(event)
        self.progress.on_step(event)
        self.progress_panel.refresh_soon()

    def _on_preview(self, event: dict[str, Any]) -> None:
        self.preview.show_preview(event)

    def _on_job_finished(self, job_id: str, result: dict[str, Any]) -> None:
        self._end_job(f"Done: {result.get('output') or 'comparison finished'}")
        self.preview.flush()
        job = self._job(job_id)
        self.notifier.job_ended(job_title(job), True, Path(result.get("output") or "").name)
        self.history_panel.refresh()
        if job.get("compare") or "rows" in result:
            self.compare_lab.show_report(result)
            self.tabs.setCurrentWidget(self.compare_lab)
        elif result.get("output"):
            self.history_panel.select_clip(result["output"])
            self.show_result(result["output"])

    def _on_job_failed(self, job_id: str, error: str) -> None:
        details = self.client.failures.pop(job_id, None)
        if details:  # the engine's fix in the window's words ("Set Workers to 2", not "--devices")
            error = people_message(
                str(details.get("problem", "")),
                str(details.get("fix") or ""),
                details.get("field"),
                details.get("value"),
                self.request_panel.strategy_picker.has_gpus(),
            )
        self._end_job(f"Failed: {error}", finished=False)
        self.preview.set_message(f"Failed: {error}")
        self.engine_panel.append(f"job {job_id} failed: {error}", "window")
        self.notifier.job_ended(job_title(self._job(job_id)), False, error)

    def _on_job_cancelled(self, job_id: str) -> None:
        self._end_job("Cancelled.", finished=False)
        self.queue_panel.cancelling.discard(job_id)

    def _end_job(self, message: str, finished: bool = True) -> None:
        if finished:
            self.progress.finish()
        self._tick.stop()
        self.progress_panel.refresh()
        if not finished:
            self.progress_panel.set_message(message)
        self.statusBar().showMessage(message, 15000)
        QApplication.alert(self)  # taskbar attention when the window is in the background

    def _on_engine_error(self, message: str) -> None:
        self.engine_panel.append(message, "error")
        self.statusBar().showMessage(message, 10000)

    def _on_engine_died(self, code: int, output: str) -> None:
        self.engine_panel.append(f"engine exited with code {code}", "window")
        if self.current_job is not None and not self.progress.finished:
            self.progress_panel.set_message("Engine stopped; the job is marked interrupted (requeue it).")
        self._tick.stop()

    # ---- closing ------------------------------------------------------------------------------
    def save_settings(self) -> None:
        self.settings.set_last_request(self.request_panel.request())
        self.settings.set_seed_mode(self.request_panel.seed_mode_value())
        self.settings.set_window_state(self.saveGeometry(), self.saveState())
        self.settings.sync()

    def ask_about_jobs(self, running: int, queued: int) -> str:
        """What to do with unfinished jobs on close: "finish", "keep", "discard" or "cancel"."""
        box = QMessageBox(self)
        box.setIcon(QMessageBox.Icon.Question)
        box.setWindowTitle("Jobs not finished")
        parts = [f"{running} running" if running else "", f"{queued} queued" if queued else ""]
        box.setText(f"{' and '.join(p for p in parts if p)} job(s) have not finished.")
        box.setInformativeText(
            "Finish them first (the window closes when the queue is done), keep them for next time "
            "(they wait until you resume; a running job is stopped and can be requeued), or discard them."
        )
        buttons = {
            box.addButton("Finish first", QMessageBox.ButtonRole.AcceptRole): "finish",
            box.addButton("Keep for next time", QMessageBox.ButtonRole.DestructiveRole): "keep",
            box.addButton("Discard", QMessageBox.ButtonRole.DestructiveRole): "discard",
            box.addButton(QMessageBox.StandardButton.Cancel): "cancel",
        }
        box.exec()
        return buttons.get(box.clickedButton(), "cancel")

    def closeEvent(self, event: QCloseEvent) -> None:
        # Only a shown window with an engine to act on asks (not one closed at exit or in a test).
        jobs = self.client.jobs if self.client.connected and self.isVisible() else []
        running = [j["job_id"] for j in jobs if j.get("status") == "running"]
        queued = [j["job_id"] for j in jobs if j.get("status") == "queued"]
        if running or queued:
            choice = self.ask_about_jobs(len(running), len(queued))
            if choice in ("cancel", "finish"):
                self._close_after_queue = choice == "finish"
                if choice == "finish":
                    self.statusBar().showMessage("The window closes once the queue has run.", 0)
                event.ignore()
                return
            if choice == "discard":
                # Closes once the engine says the job is cancelled (a stop now would only mark it
                # interrupted, kept for next time).
                for job_id in queued:
                    self.client.remove(job_id)
                for job_id in running:
                    self.client.cancel(job_id)
                if running:
                    self._close_after_queue = True
                    self.statusBar().showMessage("Discarding the jobs; the window closes when they stop.", 0)
                    event.ignore()
                    return
        self.save_settings()
        if self._result_viewer is not None:
            self._result_viewer.clear()
        self.hide()  # the engine takes a few seconds to stop its workers: do not show a frozen window
        self.thumbnails.stop()
        if self.models_dialog is not None:
            self.models_dialog.pull.cancel()  # the part downloaded is kept for the next pull
        self.client.stop()
        super().closeEvent(event)
