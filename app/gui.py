"""The window's main(): `python -m app.gui` (or `./dev run`, or the `parastep-studio-gui` command).

It starts the engine as a background process, connects to it over the local socket, and starts it
again when it dies. If an engine already answers on the socket (one started with
`--keep-running`), the window uses that one and leaves it running when it closes.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from PySide6.QtCore import QTimer
from PySide6.QtNetwork import QLocalSocket
from PySide6.QtWidgets import QApplication

from engine.errors import UserError
from engine.socket_path import default_socket_path, prepare_socket_folder

PROBE_MS = 300  # how long to look for an engine that is already running


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="parastep-studio-gui", description="ParaStep Studio's window.")
    parser.add_argument("--socket", help=f"the engine's local socket (default {default_socket_path()})")
    parser.add_argument("--output-dir", help="the folder the history lists (default: where clips are saved)")
    return parser


def engine_answers(path: str) -> bool:
    """Whether an engine already listens on `path` (blocks PROBE_MS at most, once at start-up)."""
    probe = QLocalSocket()
    probe.connectToServer(path)
    found = probe.waitForConnected(PROBE_MS)
    probe.abort()
    return found


def display_problem() -> str | None:
    """Why no window can open here (Linux without a display), or None."""
    if not sys.platform.startswith("linux") or os.environ.get("QT_QPA_PLATFORM"):
        return None
    if os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"):
        return None
    return (
        "No display to open the window on (neither DISPLAY nor WAYLAND_DISPLAY is set). Fix: run it "
        "in a desktop session (or over ssh -X), use `./dev generate` for the command line, or set "
        "QT_QPA_PLATFORM=offscreen to run it headless."
    )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    problem = display_problem()
    if problem and QApplication.instance() is None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    app = QApplication.instance() or QApplication([sys.argv[0]])
    app.setApplicationName("ParaStep Studio")
    app.setOrganizationName("parastep-studio")

    # Imported after QApplication exists: the widgets need it.
    from app.engine_process import EngineProcess
    from ui.engine_client import EngineClient
    from ui.main_window import MainWindow

    socket_path = Path(args.socket).expanduser().absolute() if args.socket else default_socket_path()
    try:
        prepare_socket_folder(socket_path)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    launcher = None if engine_answers(str(socket_path)) else EngineProcess(str(socket_path))
    client = EngineClient(str(socket_path), launcher)
    window = MainWindow(client, output_dir=Path(args.output_dir) if args.output_dir else None)
    if launcher is not None:
        launcher.output.connect(window.engine_panel.append)
    else:
        window.engine_panel.append(f"using the engine already running on {socket_path}", "window")
    window.show()
    client.start()
    # Ctrl+C in the terminal closes the window properly (stopping the engine); Python only sees the
    # signal when it runs, so a timer gives it a turn now and then.
    signal.signal(signal.SIGINT, lambda *_: window.close())
    wake = QTimer(interval=250)
    wake.timeout.connect(lambda: None)
    wake.start()
    return app.exec()


if __name__ == "__main__":
    sys.exit(main())
