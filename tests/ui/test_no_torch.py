"""The window process never imports torch (nor diffusers): it must start fast and stay small."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
UI_MODULES = sorted(f"ui.{path.stem}" for path in (REPO / "ui").glob("*.py") if path.stem != "__init__")
HEAVY = ("torch", "diffusers", "transformers", "accelerate", "huggingface_hub")


def test_importing_every_window_module_leaves_torch_unimported():
    modules = [*UI_MODULES, "app.gui", "app.engine_process"]
    assert {"ui.main_window", "ui.engine_client", "ui.request_panel"} <= set(modules)
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert not heavy, f'imported: {heavy}'\n"
    )
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr
