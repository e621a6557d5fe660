"""Window tests: Qt runs offscreen, and nothing the window remembers touches the user's config."""

from __future__ import annotations

import os
import tempfile

# Before any QApplication exists (pytest-qt creates it lazily, in the `qapp` fixture).
os.environ["QT_QPA_PLATFORM"] = "offscreen"
# QSettings caches its folder on first use, so one private folder serves the whole session; tests
# that check what is remembered pass their own QSettings file.
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="parastep-ui-config-")
os.environ.setdefault("QT_LOGGING_RULES", "qt.multimedia.*=false")

import pytest  # noqa: E402
from PySide6.QtCore import QSettings  # noqa: E402

from engine.catalog import ModelCatalog  # noqa: E402


@pytest.fixture
def settings(tmp_path):
    from ui.settings import StudioSettings

    return StudioSettings(QSettings(str(tmp_path / "settings.conf"), QSettings.Format.IniFormat))


@pytest.fixture(scope="session")
def catalog() -> dict:
    """A catalog message like the engine's, built without an engine (embedded models, CPU only)."""
    return {
        "type": "catalog",
        "models": [entry.to_dict() for entry in ModelCatalog().entries()],
        "strategies": [
            {
                "name": "sequential",
                "description": "the stock loop",
                "min_devices": 1,
                "max_devices": 1,
                "options": [],
            },
            {
                "name": "parastep",
                "description": "step-parallel",
                "min_devices": 1,
                "max_devices": None,
                "options": [{"name": "warmup", "help": "warm-up steps", "default": None, "minimum": 0}],
            },
            {
                "name": "batchstep",
                "description": "ParaStep on one device",
                "min_devices": 1,
                "max_devices": 1,
                "options": [
                    {"name": "warmup", "help": "warm-up steps", "default": None, "minimum": 0},
                    {"name": "lookahead", "help": "latents per call", "default": 2, "minimum": 1},
                ],
            },
        ],
        "devices": [
            {"id": "cpu", "kind": "cpu", "name": "test CPU", "memory_total": None, "memory_free": None}
        ],
    }


@pytest.fixture
def gpu_catalog(catalog) -> dict:
    gpus = [{"id": f"cuda:{i}", "kind": "cuda", "name": f"Test GPU {i}"} for i in range(4)]
    return {**catalog, "devices": [*gpus, *catalog["devices"]]}
