"""History: the clips in the output folder, found through their sidecar JSONs.

Each sidecar (`engine.outputs.read_request`) gives the request that made the clip, so the list can
be searched by prompt and any clip's settings restored ("Use these settings"). Favourites are kept
by the window (QSettings). Thumbnails: a GIF's first frame, an MP4's first frame once the
background `ThumbnailCache` has made it (a drawn badge until then), a badge for audio.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from PySide6.QtCore import QSize, Qt, QUrl, Signal
from PySide6.QtGui import QColor, QDesktopServices, QIcon, QImageReader, QPainter, QPixmap
from PySide6.QtWidgets import (
    QCheckBox,
    QFileDialog,
    QHBoxLayout,
    QLineEdit,
    QListView,
    QListWidget,
    QListWidgetItem,
    QMessageBox,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from engine.errors import UserError
from engine.outputs import EXTENSIONS, export_clip, read_request
from engine.protocol import GenerationRequest
from ui.thumbnails import ThumbnailCache

CLIP_EXTENSIONS = EXTENSIONS["video"] + EXTENSIONS["audio"]
THUMB = QSize(96, 64)
MAX_ENTRIES = 1000  # newest first; older ones stay on disk
PATH_ROLE = Qt.ItemDataRole.UserRole


@dataclass
class HistoryEntry:
    sidecar: Path
    clip: Path | None
    request: GenerationRequest
    modified: float

    @property
    def key(self) -> str:
        """What favourites remember: the clip (or sidecar) path."""
        return str(self.clip or self.sidecar)

    def matches(self, text: str) -> bool:
        text = text.strip().lower()
        if not text:
            return True
        haystack = " ".join(
            (self.request.prompt, self.request.negative_prompt, self.request.model, self.request.strategy)
        )
        return all(word in haystack.lower() for word in text.split())


def scan_history(folder: Path) -> list[HistoryEntry]:
    """Every readable sidecar in `folder` (not recursive), newest first."""
    try:
        sidecars = [p for p in folder.glob("*.json") if not p.name.startswith(".")]
    except OSError:
        return []
    sidecars.sort(key=_mtime, reverse=True)
    entries = []
    for sidecar in sidecars[:MAX_ENTRIES]:
        try:
            request = read_request(sidecar)
        except UserError:
            continue  # not a ParaStep sidecar (or a damaged one): not a clip of ours
        clip = next((c for c in (sidecar.with_suffix("." + e) for e in CLIP_EXTENSIONS) if c.is_file()), None)
        entries.append(HistoryEntry(sidecar, clip, request, _mtime(sidecar)))
    return entries


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def thumbnail(entry: HistoryEntry, cache: ThumbnailCache | None = None) -> QIcon:
    """A video's first frame (MP4: when `cache` has it; it is queued otherwise); a badge else."""
    suffix = entry.clip.suffix.lower() if entry.clip is not None else ""
    image = None
    if suffix == ".gif":
        image = QImageReader(str(entry.clip)).read()
    elif suffix == ".mp4" and cache is not None:
        image = cache.get(entry.clip)
    if image is not None and not image.isNull():
        return QIcon(QPixmap.fromImage(image).scaled(THUMB, Qt.AspectRatioMode.KeepAspectRatio))
    audio = entry.clip is not None and entry.clip.suffix.lower().lstrip(".") in EXTENSIONS["audio"]
    pixmap = QPixmap(THUMB)
    pixmap.fill(QColor("#2f3b52") if not audio else QColor("#3b2f52"))
    painter = QPainter(pixmap)
    painter.setPen(QColor("white"))
    label = (
        "missing" if entry.clip is None else ("♪ " if audio else "▶ ") + entry.clip.suffix.lstrip(".").upper()
    )
    painter.drawText(pixmap.rect(), Qt.AlignmentFlag.AlignCenter, label)
    painter.end()
    return QIcon(pixmap)


class HistoryPanel(QWidget):
    use_settings_requested = Signal(object)  # GenerationRequest
    open_requested = Signal(str)  # a clip to show in the result viewer
    favourites_changed = Signal(list)

    def __init__(
        self, folder: Path, thumbnails: ThumbnailCache | None = None, parent: QWidget | None = None
    ) -> None:
        super().__init__(parent)
        self.folder = folder
        self.thumbnails = thumbnails
        if thumbnails is not None:
            thumbnails.ready.connect(self._on_thumbnail)
        self.entries: list[HistoryEntry] = []
        self.favourites: set[str] = set()

        self.search = QLineEdit(placeholderText="Search prompts, models, strategies")
        self.search.setClearButtonEnabled(True)
        self.search.textChanged.connect(self._fill)
        self.favourites_only = QCheckBox("★ only")
        self.favourites_only.toggled.connect(self._fill)
        self.list = QListWidget()
        self.list.setIconSize(THUMB)
        self.list.setAlternatingRowColors(True)
        # Long lines wrap to the panel's width instead of hiding behind a horizontal scroll bar.
        self.list.setWordWrap(True)
        self.list.setResizeMode(QListView.ResizeMode.Adjust)
        self.list.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        self.list.itemDoubleClicked.connect(lambda item: self._open(item))
        self.list.currentItemChanged.connect(self._update_buttons)

        self.use_button = QPushButton("Use these settings")
        self.favourite_button = QPushButton("★")
        self.favourite_button.setToolTip("Favourite / unfavourite")
        self.open_button = QPushButton("Play")
        self.folder_button = QPushButton("Open folder")
        self.delete_button = QPushButton("Delete")
        self.refresh_button = QPushButton("Refresh")
        self.export_button = QPushButton("Export...")
        self.export_button.setToolTip("Save the clip as MP4, GIF, WAV or FLAC, with its settings")
        self.export_button.clicked.connect(self._export)
        self.use_button.clicked.connect(self._use_settings)
        self.favourite_button.clicked.connect(self.toggle_favourite)
        self.open_button.clicked.connect(lambda: self._open(self.list.currentItem()))
        self.folder_button.clicked.connect(self._open_folder)
        self.delete_button.clicked.connect(lambda: self.delete_selected())
        self.refresh_button.clicked.connect(self.refresh)

        top = QHBoxLayout()
        top.addWidget(self.search, 1)
        top.addWidget(self.favourites_only)
        buttons = QHBoxLayout()
        for button in (self.use_button, self.favourite_button, self.open_button, self.delete_button):
            buttons.addWidget(button)
        buttons2 = QHBoxLayout()
        buttons2.addWidget(self.folder_button)
        buttons2.addWidget(self.export_button)
        buttons2.addWidget(self.refresh_button)
        buttons2.addStretch(1)
        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(self.list, 1)
        layout.addLayout(buttons)
        layout.addLayout(buttons2)
        self._update_buttons()

    def set_folder(self, folder: Path) -> None:
        self.folder = folder
        self.refresh()

    def set_favourites(self, keys: list[str]) -> None:
        self.favourites = set(keys)
        self._fill()

    def refresh(self) -> None:
        """Re-read the output folder."""
        self.entries = scan_history(self.folder)
        self._fill()

    def visible_entries(self) -> list[HistoryEntry]:
        entries = (self._entry(self.list.item(row)) for row in range(self.list.count()))
        return [e for e in entries if e is not None]

    def selected_entry(self) -> HistoryEntry | None:
        return self._entry(self.list.currentItem())

    def select_clip(self, path: str) -> None:
        for row in range(self.list.count()):
            if self.list.item(row).data(PATH_ROLE) == path:
                self.list.setCurrentRow(row)

    def _entry(self, item: QListWidgetItem | None) -> HistoryEntry | None:
        key = item.data(PATH_ROLE) if item is not None else None
        return next((e for e in self.entries if e.key == key), None)

    def _fill(self) -> None:
        current = self.list.currentItem()
        selected_key = current.data(PATH_ROLE) if current is not None else None
        self.list.clear()
        text = self.search.text()
        for entry in self.entries:
            favourite = entry.key in self.favourites
            if not entry.matches(text) or (self.favourites_only.isChecked() and not favourite):
                continue
            request = entry.request
            subject = request.prompt or (Path(request.image).name if request.image else "(no prompt)")
            when = datetime.fromtimestamp(entry.modified).strftime("%Y-%m-%d %H:%M")
            title = ("★ " if favourite else "") + subject.replace("\n", " ")[:80]
            details = f"{request.model} · {request.strategy}@{request.devices} · seed {request.seed} · {when}"
            item = QListWidgetItem(thumbnail(entry, self.thumbnails), f"{title}\n{details}")
            item.setData(PATH_ROLE, entry.key)
            item.setToolTip(str(entry.clip or entry.sidecar))
            self.list.addItem(item)
            if entry.key == selected_key:
                self.list.setCurrentItem(item)
        self._update_buttons()

    def _on_thumbnail(self, clip: str) -> None:
        for row in range(self.list.count()):
            item = self.list.item(row)
            entry = self._entry(item)
            if entry is not None and str(entry.clip) == clip:
                item.setIcon(thumbnail(entry, self.thumbnails))

    # ---- actions ------------------------------------------------------------------------------
    def toggle_favourite(self) -> None:
        entry = self.selected_entry()
        if entry is None:
            return
        self.favourites.symmetric_difference_update({entry.key})
        self.favourites_changed.emit(sorted(self.favourites))
        self._fill()

    def _use_settings(self) -> None:
        entry = self.selected_entry()
        if entry is not None:
            self.use_settings_requested.emit(entry.request)

    def _open(self, item: QListWidgetItem | None) -> None:
        entry = self._entry(item)
        if entry is not None and entry.clip is not None:
            self.open_requested.emit(str(entry.clip))

    def export_selected(self, target: str) -> Path:
        """Saves the selected clip in the format `target`'s extension names; raises UserError."""
        entry = self.selected_entry()
        if entry is None or entry.clip is None:
            raise UserError("No clip is selected.", "Select a clip in the history first.")
        exported = export_clip(entry.clip, target)
        self.refresh()
        return exported

    def _export(self) -> None:
        entry = self.selected_entry()
        if entry is None or entry.clip is None:
            return
        audio = entry.clip.suffix.lower() in (".wav", ".flac")
        filters = "FLAC (*.flac);;WAV (*.wav)" if audio else "MP4 video (*.mp4);;GIF (*.gif)"
        target, _ = QFileDialog.getSaveFileName(
            self, "Export clip", str(entry.clip.with_name(entry.clip.stem + "-export")), filters
        )
        if not target:
            return
        try:
            self.export_selected(target)
        except UserError as exc:
            QMessageBox.warning(self, "Export failed", str(exc))

    def _open_folder(self) -> None:
        QDesktopServices.openUrl(QUrl.fromLocalFile(str(self.folder)))

    def delete_selected(self, confirm: bool = True) -> None:
        """Delete the selected clip and its sidecar (after asking, unless `confirm` is False)."""
        entry = self.selected_entry()
        if entry is None:
            return
        if confirm:
            answer = QMessageBox.question(
                self, "Delete clip", f"Delete {entry.clip or entry.sidecar} and its sidecar?"
            )
            if answer != QMessageBox.StandardButton.Yes:
                return
        for path in (entry.clip, entry.sidecar):
            if path is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        if entry.key in self.favourites:
            self.favourites.discard(entry.key)
            self.favourites_changed.emit(sorted(self.favourites))
        self.refresh()

    def _update_buttons(self) -> None:
        entry = self.selected_entry()
        for button in (self.use_button, self.favourite_button, self.delete_button):
            button.setEnabled(entry is not None)
        self.open_button.setEnabled(entry is not None and entry.clip is not None)
        self.export_button.setEnabled(entry is not None and entry.clip is not None)
