"""The Help menu: the keyboard shortcuts and an About box (versions, devices, the log folder).

Both open as non-modal notes, so reading one never stops the window or a job's progress.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtGui import QAction
from PySide6.QtWidgets import QMainWindow, QMessageBox, QWidget

SHORTCUTS = (
    "<table>"
    "<tr><td><b>Ctrl+Enter</b></td><td>Generate (queue the request)</td></tr>"
    "<tr><td><b>Ctrl+Q</b></td><td>Quit (asks about unfinished jobs)</td></tr>"
    "<tr><td><b>,</b> and <b>.</b></td><td>Previous / next frame of the result</td></tr>"
    "<tr><td><b>Tab</b></td><td>Next field (also out of the prompt)</td></tr>"
    "</table>"
)


def add_help_menu(
    window: QMainWindow, devices: Callable[[], list[dict[str, Any]]], engine_pid: Callable[[], int | None]
) -> None:
    """`devices`: the engine's inventory (catalog `devices`); `engine_pid`: its process id, if up."""
    menu = window.menuBar().addMenu("&Help")
    shortcuts = QAction("Keyboard shortcuts", window)
    shortcuts.triggered.connect(lambda: show_note(window, "Keyboard shortcuts", SHORTCUTS))
    about = QAction("About ParaStep Studio", window)
    about.triggered.connect(
        lambda: show_note(window, "About ParaStep Studio", about_text(devices(), engine_pid()))
    )
    menu.addAction(shortcuts)
    menu.addAction(about)


def show_note(parent: QWidget, title: str, html: str) -> QMessageBox:
    box = QMessageBox(QMessageBox.Icon.Information, title, html, QMessageBox.StandardButton.Close, parent)
    box.setTextFormat(Qt.TextFormat.RichText)
    box.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
    box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
    box.open()
    return box


def about_text(devices: list[dict[str, Any]], engine_pid: int | None) -> str:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from PySide6 import __version__ as pyside_version
    from PySide6.QtCore import qVersion

    from engine.logfile import log_path

    try:
        studio = version("parastep-studio")
    except PackageNotFoundError:
        studio = "(not installed)"
    listed = (
        ", ".join(f"{d.get('id')}: {d.get('name')}" for d in devices)
        or "not known yet (the engine is starting)"
    )
    return (
        f"<b>ParaStep Studio {studio}</b><br>Python {platform.python_version()}, PySide6 "
        f"{pyside_version} (Qt {qVersion()}); the engine (pid {engine_pid}) runs torch and "
        f"diffusers.<br><br><b>Devices</b>: {listed}<br><br><b>Logs</b>: {log_path().parent} "
        f"(engine.log: library warnings and the engine's messages)"
    )
