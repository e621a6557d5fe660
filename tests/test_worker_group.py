"""The worker group notices a worker that dies while the model loads, instead of waiting it out."""

from __future__ import annotations

import os
import time

import pytest

import engine.worker_group as worker_group
from engine.catalog import ModelCatalog
from engine.errors import WorkerFailure


def exit_at_once(spec, commands, results, cancel) -> None:
    """A worker that dies before it reports (as a crash in a CUDA driver or an import would)."""
    os._exit(3)


def test_a_worker_dying_during_loading_fails_the_start_promptly(monkeypatch):
    monkeypatch.setattr(worker_group, "worker_main", exit_at_once)
    entry = ModelCatalog().resolve("tiny-cogvideox")
    group = worker_group.WorkerGroup(entry, ["cpu", "cpu"], "auto", 30.0, worker_group.CancelFlag())
    start = time.monotonic()
    with pytest.raises(WorkerFailure, match=r"died while loading the model \(exit code 3\)"):
        group.start()
    assert time.monotonic() - start < worker_group.LOAD_TIMEOUT_S / 4
    assert not group.alive()
