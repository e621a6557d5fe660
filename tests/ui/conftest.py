"""Window tests: Qt runs offscreen, and nothing the window remembers touches the user's config."""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Before any QApplication exists (pytest-qt creates it lazily, in the `qapp` fixture).
os.environ["QT_QPA_PLATFORM"] = "offscreen"
# QSettings caches its folder on first use, so one private folder serves the whole session; tests
# that check what is remembered pass their own QSettings file.
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="parastep-ui-config-")
os.environ.setdefault("QT_LOGGING_RULES", "qt.multimedia.*=false")

import pytest  # noqa: E402
from PySide6.QtCore import QSettings  # noqa: E402
from PySide6.QtTest import QTest  # noqa: E402

from engine.catalog import ModelCatalog
from engine.strategies import STRATEGIES  # noqa: E402
from tests.conftest import KEPT_PROCESSES  # noqa: E402


def make_settings(folder: Path):
    """Window settings in a private file (never the user's)."""
    from ui.settings import StudioSettings

    return StudioSettings(QSettings(str(folder / "settings.conf"), QSettings.Format.IniFormat))


@pytest.fixture
def settings(tmp_path):
    return make_settings(tmp_path)


@contextmanager
def open_studio(root: Path, settings, output_dir: Path, *, auto_restart: bool = False) -> Iterator:
    """The main window over a real engine process, everything under `root`.

    The engine's socket, queue (`root/state`) and clips (`output_dir`) are private to the caller;
    the engine is started at once (the window gets its catalog when it is up). Each engine process
    the launcher starts (again after a crash, with `auto_restart`) is listed in KEPT_PROCESSES
    until it is stopped here, so that a fixture may keep it across tests. On exit the window
    closes, which shuts the engine and its workers down; it must be gone afterwards.
    """
    from app.engine_process import EngineProcess
    from ui.engine_client import EngineClient
    from ui.main_window import MainWindow

    folder = root / "sock"
    folder.mkdir(mode=0o700, parents=True)
    socket_path = str(folder / "engine.sock")
    launcher = EngineProcess(
        socket_path,
        extra_env={
            "PARASTEP_STATE_DIR": str(root / "state"),
            "PARASTEP_OUTPUT_DIR": str(output_dir),
            "XDG_CACHE_HOME": str(root / "cache"),
        },
    )
    started: set[int] = set()

    def keep() -> None:
        pid = launcher.pid()
        if pid:
            started.add(pid)
            KEPT_PROCESSES.add(pid)

    launcher.started.connect(keep)
    client = EngineClient(socket_path, launcher, auto_restart=auto_restart)
    window = MainWindow(client, settings, output_dir=output_dir)
    # Closing with unfinished jobs asks; a test that ends with some discards them.
    window.ask_about_jobs = lambda running, queued: "discard"
    log: list[str] = []
    launcher.output.connect(log.append)
    launcher.output.connect(window.engine_panel.append)  # as app.gui does
    window.engine_log = log
    window.launcher = launcher
    window.show()
    client.start()
    try:
        yield window
    finally:
        try:
            window.close()  # saves settings, stops thumbnails, shuts the engine down and waits
            # With a job running, "discard" first waits for the engine to cancel it.
            deadline = time.monotonic() + 60
            while window.isVisible() and time.monotonic() < deadline:
                QTest.qWait(50)
            assert not launcher.is_running(), "the engine is still running after the window closed"
        finally:
            KEPT_PROCESSES.difference_update(started)
            window.deleteLater()


@pytest.fixture(scope="session")
def catalog() -> dict:
    """A catalog message like the engine's, built without an engine (embedded models, CPU only)."""
    return {
        "type": "catalog",
        "models": [entry.to_dict() for entry in ModelCatalog().entries()],
        "strategies": [{**cls.describe(), "unavailable": {}} for cls in STRATEGIES.values()],
        "devices": [
            {"id": "cpu", "kind": "cpu", "name": "test CPU", "memory_total": None, "memory_free": None}
        ],
    }


@pytest.fixture
def gpu_catalog(catalog) -> dict:
    gpus = [{"id": f"cuda:{i}", "kind": "cuda", "name": f"Test GPU {i}"} for i in range(4)]
    return {**catalog, "devices": [*gpus, *catalog["devices"]]}
