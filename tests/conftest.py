"""Shared fixtures: an output folder per test, and a check that no process is left behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.worker_group import WorkerGroup

REPO = Path(__file__).resolve().parents[1]


def child_processes() -> dict[int, str]:
    """pid -> command line of this process's live children (Linux /proc)."""
    me, children = os.getpid(), {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            state = stat.rsplit(")", 1)[1].split()[0]
            if ppid == me and state != "Z":
                children[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError, IndexError):
            continue
    return children


# Children that a fixture keeps across tests on purpose (e.g. an engine process shared by a test
# module); the fixture adds them when it starts them and removes them once it has stopped them.
KEPT_PROCESSES: set[int] = set()


def leaked_processes() -> dict[int, str]:
    """Children that belong to no running worker group or fixture (multiprocessing's resource
    tracker aside)."""
    allowed = WorkerGroup.running_pids() | KEPT_PROCESSES
    return {
        pid: cmd
        for pid, cmd in child_processes().items()
        if pid not in allowed and "resource_tracker" not in cmd
    }


@pytest.fixture(autouse=True)
def _no_process_left_behind():
    yield
    leaked = leaked_processes()
    assert not leaked, f"processes left behind: {leaked}"


@pytest.fixture(autouse=True)
def _output_dir(tmp_path, monkeypatch):
    """Clips go to a fresh folder, never the user's Videos; pulled models likewise."""
    out = tmp_path / "clips"
    monkeypatch.setenv("PARASTEP_OUTPUT_DIR", str(out))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("PARASTEP_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("PARASTEP_MODELS_DIR", str(tmp_path / "models"))  # never the user's pulled models
    return out


def pytest_sessionfinish(session, exitstatus):
    leaked = leaked_processes()
    if leaked:
        print(f"\nprocesses left behind at the end of the session: {leaked}")
        session.exitstatus = 1


@pytest.fixture(scope="session")
def shared_engine():
    """One engine for the whole session; it keeps one warm worker group per (model, devices).

    Tests that use it should group their runs by model and devices: switching either restarts the
    workers (seconds per worker process on a small CPU machine).
    """
    from engine.engine import Engine

    with Engine() as engine:
        yield engine


@pytest.fixture(scope="session")
def conditioning_image(tmp_path_factory):
    """A small RGB PNG for image-conditioned models (SVD)."""
    import numpy as np
    from PIL import Image

    pixels = (np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)
    path = tmp_path_factory.mktemp("images") / "conditioning.png"
    Image.fromarray(pixels).save(path)
    return str(path)
