"""No orphan and no stale file, whatever stops the CLI or the engine process, at every stage of a job.

The CLI (`python -m app.cli generate`) or the engine process runs in a subprocess with its own
TMPDIR, state and output folders and a marker in its environment, which its workers inherit: after a
kill, no process with the marker may remain (bounded wait) and no `parastep-*` file may be left in
TMPDIR (after a SIGKILL the dead engine cannot remove its rendezvous folder: the next engine's start
removes it, checked here). Stages: spawning (the worker processes exist, nothing imported yet),
loading (torch is mapped in a worker), denoising, decoding (rank 0 stops itself at the decode:
PARASTEP_INJECT_STALL).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from engine.client import EngineClient
from engine.worker import INJECT_STALL_ENV
from engine.worker_group import clean_stale_rendezvous
from tests.conftest import KEPT_PROCESSES, REPO

MARK_ENV = "PARASTEP_TEST_MARK"
GENERATE = [
    *("generate", "--model", "tiny-cogvideox", "--prompt", "a red circle", "--frames", "9"),
    *("--height", "64", "--width", "96", "--steps", "40", "--strategy", "parastep", "--warmup", "1"),
    *("--devices", "cpu:2", "--no-previews"),
]
START_TIMEOUT_S = 180  # two fresh workers import torch and load the model on a loaded 2-core machine
GONE_TIMEOUT_S = 15


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "gone"


def _marked(mark: str) -> list[int]:
    """Live processes (any parent: orphans included) whose environment carries the marker."""
    needle = f"{MARK_ENV}={mark}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return [pid for pid in found if _state(pid) not in ("Z", "gone")]


def _workers(mark: str) -> list[int]:
    found = []
    for pid in _marked(mark):
        try:
            if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
        except OSError:
            continue
    return found


def _torch_loaded(pid: int) -> bool:
    try:
        return "libtorch_cpu" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def _wait(condition, timeout: float, what: str, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            detail = f":\n{log.read_text(errors='replace')}" if log and log.exists() else ""
            raise AssertionError(f"timed out waiting for {what}{detail}")
        time.sleep(0.05)


def _parastep_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("parastep"))


class Run:
    """One CLI or engine subprocess with a private TMPDIR and a marker its workers inherit."""

    def __init__(self, tmp_path: Path, command: list[str], **env: str) -> None:
        self.mark = uuid.uuid4().hex
        self.tmp = tmp_path / "tmp"
        self.tmp.mkdir(exist_ok=True)
        self.log = tmp_path / f"{self.mark}.log"
        self.env = {**os.environ, "TMPDIR": str(self.tmp), MARK_ENV: self.mark, **env}
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, *command], cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        KEPT_PROCESSES.add(self.process.pid)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_line(self, text: str) -> None:
        _wait(lambda: text in self.text() or self.process.poll() is not None, START_TIMEOUT_S, text, self.log)
        assert text in self.text(), self.text()

    def wait_for_stage(self, stage: str) -> None:
        if stage == "spawning":
            _wait(lambda: _workers(self.mark), START_TIMEOUT_S, "a worker process", self.log)
        elif stage == "loading":
            _wait(
                lambda: any(_torch_loaded(pid) for pid in _workers(self.mark)),
                START_TIMEOUT_S,
                "a worker with torch loaded",
                self.log,
            )
        else:
            self.wait_for_line({"denoising": "[denoise]", "decoding": "[decode]"}[stage])

    def assert_nothing_left(self) -> None:
        """Every process with the marker gone (bounded), the rendezvous folder included."""
        _wait(lambda: not _marked(self.mark), GONE_TIMEOUT_S, f"no process left, still {_marked(self.mark)}")

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(30)
        KEPT_PROCESSES.discard(self.process.pid)
        for pid in _marked(self.mark):  # a failed test leaves nothing running either
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


@pytest.fixture
def runs():
    started: list[Run] = []
    yield started
    for run in started:
        run.close()


@pytest.mark.parametrize("stage", ["spawning", "loading", "denoising", "decoding"])
def test_a_killed_cli_leaves_no_worker_and_its_files_go_at_the_next_start(tmp_path, runs, stage):
    extra = {INJECT_STALL_ENV: "decode@0"} if stage == "decoding" else {}
    run = Run(tmp_path, ["-m", "app.cli", *GENERATE], **extra)
    runs.append(run)
    run.wait_for_stage(stage)
    workers = _workers(run.mark)
    assert workers, run.text()
    run.process.send_signal(signal.SIGKILL)  # nothing of the CLI's own clean-up runs
    run.process.wait(30)
    run.assert_nothing_left()
    assert all(_state(pid) == "gone" or _state(pid) == "Z" for pid in workers)
    # The dead CLI's rendezvous folder is stale; the next engine's start removes it (and no other).
    stale = _parastep_files(run.tmp)
    assert all(name.startswith("parastep-rendezvous-") for name in stale)
    live = run.tmp / f"parastep-rendezvous-{os.getpid()}-live"
    live.mkdir()
    assert sorted(p.name for p in clean_stale_rendezvous(run.tmp)) == stale
    assert _parastep_files(run.tmp) == [live.name]
    kept = sorted((Path(os.environ["PARASTEP_STATE_DIR"]) / "pending").glob("*"))
    if stage == "decoding":  # the work is not lost: the final latents stay for `parastep-studio decode`
        assert [p.suffix for p in kept] == [".safetensors"]
    else:
        assert kept == []


def test_a_terminated_cli_stops_its_workers_and_removes_its_files(tmp_path, runs):
    run = Run(tmp_path, ["-m", "app.cli", *GENERATE])
    runs.append(run)
    run.wait_for_stage("loading")
    run.process.send_signal(signal.SIGTERM)
    assert run.process.wait(60) == 130, run.text()
    assert "interrupted" in run.text()
    run.assert_nothing_left()
    assert _parastep_files(run.tmp) == []


def test_ctrl_c_during_decode_says_where_the_latents_are_and_the_command_saves_them(
    tmp_path, runs, capsys, _output_dir
):
    from app.cli import main
    from engine.outputs import read_request

    run = Run(tmp_path, ["-m", "app.cli", *GENERATE], **{INJECT_STALL_ENV: "decode@0"})
    runs.append(run)
    run.wait_for_stage("decoding")
    run.process.send_signal(signal.SIGINT)
    assert run.process.wait(60) == 130, run.text()
    run.assert_nothing_left()
    assert _parastep_files(run.tmp) == []
    line = next(line for line in run.text().splitlines() if line.startswith("interrupted"))
    kept = sorted((Path(os.environ["PARASTEP_STATE_DIR"]) / "pending").glob("*.safetensors"))
    assert len(kept) == 1 and str(kept[0]) in line and "Fix:" in line
    command = line.split("`")[1]
    assert command == f"parastep-studio decode {kept[0]}"
    assert main(command.split()[1:]) == 0
    clip = Path(capsys.readouterr().out.split("saved ", 1)[1].strip())
    assert clip.parent == _output_dir and read_request(clip).steps == 40 and not kept[0].exists()


# Mid-denoise: tests/test_server.py::test_killed_engine_leaves_an_interrupted_job_that_requeue_runs.
@pytest.mark.parametrize("stage", ["spawning", "loading", "decoding"])
def test_a_killed_engine_leaves_no_worker_and_the_next_one_no_file(tmp_path, runs, stage):
    socket = tmp_path / "sock" / "engine.sock"
    command = ["-m", "app.engine_main", "--socket", str(socket)]
    extra = {INJECT_STALL_ENV: "decode@0"} if stage == "decoding" else {}
    first = Run(tmp_path, command, **extra)
    runs.append(first)
    client = EngineClient.connect(socket, timeout=60)
    client.hello()
    job_id = client.submit(
        {
            "model": "tiny-cogvideox",
            "frames": 9,
            "height": 64,
            "width": 96,
            "steps": 40,
            "strategy": "parastep",
            "strategy_options": {"warmup": 1},
            "devices": "cpu:2",
        }
    )
    if stage == "decoding":
        client.wait_for("stage", START_TIMEOUT_S, job_id=job_id, stage="decode")
    else:
        first.wait_for_stage(stage)
    assert _workers(first.mark)
    first.process.send_signal(signal.SIGKILL)
    first.process.wait(30)
    client.close()
    first.assert_nothing_left()

    # The next engine takes the stale socket and locks over, removes the stale rendezvous folder, and
    # leaves no file behind when it stops.
    second = Run(tmp_path, command)
    runs.append(second)
    client = EngineClient.connect(socket, timeout=60)
    client.hello()
    _wait(lambda: not _parastep_files(second.tmp), 60, "the stale rendezvous folder to go", second.log)
    client.send({"type": "shutdown"})
    assert second.process.wait(60) == 0, second.text()
    client.close()
    second.assert_nothing_left()
    assert sorted(p.name for p in socket.parent.iterdir()) == []
    assert not list(Path(os.environ["PARASTEP_STATE_DIR"]).glob("*.lock"))


def test_a_refused_socket_leaves_no_lock_file(tmp_path, runs):
    folder = tmp_path / "sock"
    folder.mkdir(mode=0o700)
    taken = folder / "notes.txt"
    taken.write_text("not a socket")
    run = Run(tmp_path, ["-m", "app.engine_main", "--socket", str(taken)])
    runs.append(run)
    assert run.process.wait(60) == 2
    assert "is not a socket" in run.text()
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
    assert not list(Path(os.environ["PARASTEP_STATE_DIR"]).glob("*.lock"))
