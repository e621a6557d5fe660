"""The worker group notices a worker that dies or stalls while the model loads, instead of waiting it out."""

from __future__ import annotations

import os
import signal
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


def rank_1_stops_while_loading(spec, commands, results, cancel) -> None:
    """Rank 0 loads at once; rank 1 is stopped (SIGSTOP) before it reports, as a hung driver would."""
    if spec.rank == 1:
        os.kill(os.getpid(), signal.SIGSTOP)
    results.put(("loaded", spec.rank, {"load_s": 0.0}))
    commands.get()


def test_a_load_that_stalls_names_the_rank_that_did_not_finish(monkeypatch):
    monkeypatch.setattr(worker_group, "worker_main", rank_1_stops_while_loading)
    # Long enough for rank 1 to import torch and reach its SIGSTOP on a loaded machine.
    monkeypatch.setattr(worker_group, "LOAD_TIMEOUT_S", 30.0)
    entry = ModelCatalog().resolve("tiny-cogvideox")
    group = worker_group.WorkerGroup(entry, ["cpu", "cpu"], "auto", 30.0, worker_group.CancelFlag())
    with pytest.raises(WorkerFailure) as info:
        group.start()
    message = str(info.value)
    assert "took more than 30 s; rank 1 (cpu) had not finished" in message
    assert "Fix:" in message and "PARASTEP_LOAD_TIMEOUT_S" in message
    assert not group.alive() and not group.processes
