"""Faults injected on purpose: out of memory in the loop, a full disk or a vanished folder at save time,
a state folder that cannot hold the latents, a stalled rank, and a cancel in each stage. Each ends with
a clear message or a clean stop, loses nothing that was computed, and leaves the engine able to run the
next job.

(A SIGKILLed worker and a cancel mid-denoise are in tests/test_engine.py; out of memory in the decode
in tests/test_pending_decode.py; a killed engine in tests/test_server.py; a killed CLI or engine at each
stage, and Ctrl-C during the decode, in tests/test_lifecycle.py.)
"""

from __future__ import annotations

import errno
import os
import shlex
import signal
import threading
import time
from pathlib import Path

import imageio.v3 as iio
import pytest

from app.cli import main
from engine import outputs
from engine.engine import Engine
from engine.errors import JobCancelled, UserError, WorkerFailure
from engine.pending_decode import pending_dir
from engine.protocol import GenerationRequest, LogEvent, StageEvent, StepEvent
from engine.worker import INJECT_LOOP_OOM_ENV, INJECT_LOOP_OOM_KIND_ENV, INJECT_STALL_ENV
from engine.worker_group import WATCHDOG_FACTOR_ENV, WATCHDOG_FLOOR_ENV

REQUEST = dict(model="tiny-cogvideox", prompt="a red circle", frames=9, height=64, width=96, steps=3)
LONG = dict(REQUEST, steps=40, strategy="parastep", devices="cpu:2", strategy_options={"warmup": 1})


@pytest.fixture(scope="module")
def engine():
    with Engine() as engine:
        yield engine


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("state")


@pytest.fixture(autouse=True)
def _one_state_dir(state_dir, monkeypatch):
    """The workers outlive a test and keep the environment they started with: one state folder (where
    latents are kept) for the whole module."""
    monkeypatch.setenv("PARASTEP_STATE_DIR", str(state_dir))


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def _stage_hook(stage: str, action) -> callable:
    def on_event(event) -> None:
        if isinstance(event, StageEvent) and event.stage == stage:
            action()

    return on_event


def _next_job_runs(engine: Engine, **changes) -> None:
    result = engine.run(engine.plan(GenerationRequest(**{**REQUEST, **changes})), previews=False)
    assert result.output.shape == (9, 64, 96, 3)
    result.discard_pending()


@pytest.mark.parametrize("kind", ["cuda", "cpu"])
def test_out_of_memory_in_the_loop_names_the_knobs_and_the_worker_runs_the_next_job(
    engine, monkeypatch, _output_dir, kind
):
    # "cpu": the CPU allocator raises a RuntimeError, not torch.OutOfMemoryError; same message.
    monkeypatch.setenv(INJECT_LOOP_OOM_ENV, "1")  # read by the workers this engine starts next
    monkeypatch.setenv(INJECT_LOOP_OOM_KIND_ENV, kind)
    engine.shutdown()
    with pytest.raises(UserError) as info:
        engine.generate(GenerationRequest(**REQUEST))
    message = str(info.value)
    assert "Out of memory" in message and "denoising loop" in message and "nothing was saved" in message
    fix = message.split("Fix:", 1)[1]
    assert all(
        knob in fix for knob in ("--frames", "--height/--width", "--seconds", "--dtype", "--lookahead")
    )
    assert not _files(_output_dir) and not _files(pending_dir())
    group = engine.group
    assert group is not None and group.alive()  # one rank, which caught it: the same worker goes on
    engine.generate(GenerationRequest(**REQUEST))
    assert engine.group is group and len(_files(_output_dir)) == 2  # clip and sidecar


def test_disk_full_at_save_keeps_the_latents_and_decode_saves_the_clip_later(
    engine, monkeypatch, capsys, _output_dir
):
    real_write = outputs._write_mp4

    def full_disk(path, *args):
        Path(path).write_bytes(b"\0" * 4096)  # part of the clip was written when the disk filled up
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(outputs, "_write_mp4", full_disk)
    before = _files(pending_dir())
    with pytest.raises(UserError) as info:
        engine.generate(GenerationRequest(**REQUEST))
    kept = sorted(set(_files(pending_dir())) - set(before))
    assert len(kept) == 1 and str(kept[0]) in str(info.value)
    assert "is full" in str(info.value) and "parastep-studio decode" in str(info.value)
    assert not _files(_output_dir)  # no clip, no sidecar, no temporary file

    monkeypatch.setattr(outputs, "_write_mp4", real_write)  # space was freed
    assert main(["decode", str(kept[0])]) == 0
    clip = Path(capsys.readouterr().out.split("saved ", 1)[1].strip())
    assert clip.parent == _output_dir and iio.imread(clip, index=None).shape[:3] == (9, 64, 96)
    assert outputs.read_request(clip).seed == 0 and not kept[0].exists()


def test_output_folder_gone_at_save_keeps_the_latents_and_the_suggested_command_saves(
    engine, tmp_path, capsys, _output_dir
):
    target = tmp_path / "usb-drive"
    target.mkdir()

    def unplug() -> None:  # while the clip decodes, the folder is replaced by a file
        target.rmdir()
        target.write_text("not a folder any more")

    request = GenerationRequest(**REQUEST, output=str(target) + "/")
    before = _files(pending_dir())
    with pytest.raises(UserError) as info:
        engine.generate(request, _stage_hook("decode", unplug))
    message = str(info.value)
    assert str(target) in message and "not a folder" in message
    kept = sorted(set(_files(pending_dir())) - set(before))
    assert len(kept) == 1 and not _files(_output_dir) and target.read_text() == "not a folder any more"

    target.unlink()  # the drive is back
    command = message.split("`")[1]  # the fix names the command to run
    assert command.startswith("parastep-studio decode ") and "--output" in command
    assert main(shlex.split(command)[1:]) == 0
    clip = Path(capsys.readouterr().out.split("saved ", 1)[1].strip())
    assert clip.parent == target and clip.with_suffix(".json").is_file() and not kept[0].exists()


def test_cancel_during_decode_saves_nothing_and_keeps_nothing(engine, _output_dir):
    before = _files(pending_dir())
    with pytest.raises(JobCancelled):
        engine.generate(GenerationRequest(**REQUEST), _stage_hook("decode", engine.cancel))
    assert not _files(_output_dir) and _files(pending_dir()) == before
    assert engine.group is not None and engine.group.alive()
    _next_job_runs(engine)


def test_cancel_during_encode_stops_at_the_first_step(engine):
    steps = []

    def on_event(event) -> None:
        if isinstance(event, StageEvent) and event.stage == "encode":
            engine.cancel()
        elif isinstance(event, StepEvent):
            steps.append(event.step)

    plan = engine.plan(GenerationRequest(**{**REQUEST, "steps": 40}))
    with pytest.raises(JobCancelled):
        engine.run(plan, on_event)
    assert max(steps, default=0) < 3  # of 40: checked after every step (parastep: every agreed round)
    assert engine.group is not None and engine.group.alive()
    _next_job_runs(engine)


def test_out_of_memory_on_one_rank_fails_the_job_without_a_hang(engine, monkeypatch):
    monkeypatch.setenv(INJECT_LOOP_OOM_ENV, "2@1")  # rank 1 only: rank 0 is left waiting for it
    engine.shutdown()
    with pytest.raises(UserError, match=r"rank 1 .*Out of memory.*Fix:.*--frames"):
        engine.run(engine.plan(GenerationRequest(**LONG)), previews=False)
    # Rank 0 was stuck in a collective: the group was stopped (no process left, checked by the autouse
    # fixture) and the next job starts a new one, as after a killed worker (tests/test_engine.py).
    assert not engine.group.alive()


def test_cancel_during_load_stops_the_load(engine):
    engine.shutdown()
    stages = []

    def on_event(event) -> None:
        if isinstance(event, StageEvent):
            stages.append(event.stage)
            if event.stage == "load":  # the workers are being spawned and load the model now
                threading.Timer(0.5, engine.cancel).start()

    with pytest.raises(JobCancelled):
        engine.run(engine.plan(GenerationRequest(**REQUEST, devices="cpu:1")), on_event)
    assert stages == ["load"] and engine.group is None  # stopped before the model was loaded
    _next_job_runs(engine)


@pytest.fixture
def state_folder_refuses(state_dir):
    """The state folder cannot hold the latents (a file stands where `pending` goes, as a full or
    read-only disk would refuse the write); what was kept there before is put back afterwards."""
    folder = pending_dir()
    aside = state_dir / "pending-aside"
    if folder.exists():
        folder.rename(aside)
    folder.write_text("in the way")
    yield
    folder.unlink()
    if aside.exists():
        aside.rename(folder)


def test_state_folder_refusing_the_latents_keeps_them_next_to_the_output(
    engine, monkeypatch, capsys, state_folder_refuses, _output_dir
):
    real_write = outputs._write_mp4

    def full_disk(path, *args):  # the save fails too, so the kept latents are what is left
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(outputs, "_write_mp4", full_disk)
    logs = []
    with pytest.raises(UserError) as info:
        engine.generate(
            GenerationRequest(**REQUEST),
            lambda event: logs.append(event.message) if isinstance(event, LogEvent) else None,
        )
    kept = _files(_output_dir)
    assert [p.name.startswith("parastep-latents-") and p.suffix == ".safetensors" for p in kept] == [True]
    assert str(kept[0]) in str(info.value) and "parastep-studio decode" in str(info.value)
    assert any(str(pending_dir()) in line and str(kept[0]) in line for line in logs)

    monkeypatch.setattr(outputs, "_write_mp4", real_write)  # space was freed
    assert main(["decode", str(kept[0])]) == 0
    clip = Path(capsys.readouterr().out.split("saved ", 1)[1].strip())
    assert clip.parent == _output_dir and not kept[0].exists()


def test_latents_that_fit_nowhere_fail_the_job_before_the_decode(engine, tmp_path, state_folder_refuses):
    target = tmp_path / "usb-drive"
    target.mkdir()
    stages = []

    def on_event(event) -> None:
        if isinstance(event, StageEvent):
            stages.append(event.stage)
            if event.stage == "encode":  # the output folder goes too, while the job runs
                target.rmdir()
                target.write_text("not a folder any more")

    with pytest.raises(UserError) as info:
        engine.generate(GenerationRequest(**REQUEST, output=str(target) + "/"), on_event)
    message = str(info.value)
    assert "could not be written" in message and "stopped before the decode" in message
    assert str(pending_dir()) in message and str(target) in message and "Fix:" in message
    assert "decode" not in stages and target.read_text() == "not a folder any more"
    assert engine.group is not None and engine.group.alive()  # a clean failure: the worker goes on


def _stop_rank_at_step(engine: Engine, rank: int, step: int, stopped: list[int]):
    """An event hook that stops (SIGSTOP) a worker once it reported `step`, as a suspended process or a
    hung driver would; a timer kills it after 90 s, so that no version of the engine hangs the test."""

    def on_event(event) -> None:
        if isinstance(event, StepEvent) and event.rank == rank and event.step >= step and not stopped:
            pid = engine.group.processes[rank].pid
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
            timer = threading.Timer(90, lambda: _kill(pid))
            timer.daemon = True
            timer.start()

    return on_event


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def test_a_stopped_single_worker_fails_the_job_naming_it(engine, monkeypatch):
    """No collective waits with one worker: the progress watchdog (floor and factor made small here)."""
    monkeypatch.setenv(WATCHDOG_FLOOR_ENV, "3")
    monkeypatch.setenv(WATCHDOG_FACTOR_ENV, "5")
    stopped: list[int] = []
    start = time.monotonic()
    with pytest.raises(WorkerFailure) as info:
        engine.run(
            engine.plan(GenerationRequest(**{**REQUEST, "steps": 40})),
            _stop_rank_at_step(engine, 0, 2, stopped),
        )
    message = str(info.value)
    assert stopped and message.startswith("Rank 0 (cpu) stopped making progress while denoising")
    assert "Fix:" in message and WATCHDOG_FLOOR_ENV in message and "report it" not in message
    assert time.monotonic() - start < 60 and engine.group is None  # stopped; the next job starts anew


def test_a_stalled_decode_keeps_the_latents_and_names_the_command(engine, monkeypatch, capsys, _output_dir):
    monkeypatch.setenv(WATCHDOG_FLOOR_ENV, "3")
    monkeypatch.setenv(WATCHDOG_FACTOR_ENV, "5")
    monkeypatch.setenv(INJECT_STALL_ENV, "decode")
    before = _files(pending_dir())
    with pytest.raises(WorkerFailure) as info:
        engine.generate(GenerationRequest(**REQUEST))
    message = str(info.value)
    kept = sorted(set(_files(pending_dir())) - set(before))
    assert message.startswith("Rank 0 (cpu) stopped making progress while decoding")
    assert len(kept) == 1 and f"The final latents are kept in {kept[0]}." in message
    assert engine.group is None and not _files(_output_dir)

    monkeypatch.delenv(INJECT_STALL_ENV)
    command = message.split("`")[1]
    assert command == f"parastep-studio decode {kept[0]}"
    assert main(shlex.split(command)[1:]) == 0
    assert "saved" in capsys.readouterr().out and not kept[0].exists()


def test_a_stopped_rank_is_named_when_its_peer_times_out_in_a_collective(engine, monkeypatch):
    """Two workers: rank 0 times out waiting for the stopped rank 1, and rank 1 is the one named."""
    monkeypatch.setattr(engine, "collective_timeout_s", 4.0)
    monkeypatch.setenv(WATCHDOG_FLOOR_ENV, "15")  # a back-stop only: the collective time-out comes first
    engine.shutdown()  # the next group is made with the short time-out
    stopped: list[int] = []
    start = time.monotonic()
    with pytest.raises(WorkerFailure) as info:
        engine.run(engine.plan(GenerationRequest(**LONG)), _stop_rank_at_step(engine, 1, 3, stopped))
    message = str(info.value)
    assert stopped and message.startswith("Rank 1 (cpu) stopped making progress while denoising")
    assert "PARASTEP_COLLECTIVE_TIMEOUT_S" in message and "report it" not in message
    assert engine.group is None and time.monotonic() - start < 120
