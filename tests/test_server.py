"""The engine process end to end: a real `python -m app.engine_main` on a socket in a temp folder.

One engine serves most tests of this module (its worker group stays warm between them); the crash
test starts its own. Every engine is stopped and waited for by its fixture, even when a test fails.
"""

from __future__ import annotations

import base64
import io
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from engine.client import EngineClient, EngineError
from engine.protocol import PROTOCOL_VERSION
from engine.strategies import STRATEGIES
from engine.wire import HEADER, MAX_MESSAGE_BYTES
from tests.conftest import KEPT_PROCESSES, REPO

REQUEST = {
    "model": "tiny-cogvideox",
    "prompt": "a red circle",
    "frames": 9,
    "height": 64,
    "width": 96,
    "steps": 6,
}
JOB_TIMEOUT_S = 120  # the first job of an engine loads the model in a fresh worker process


class EngineProcess:
    """One engine subprocess with its socket, queue and clips under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = root / "sock" / "engine.sock"
        self.state = root / "state"
        self.clips = root / "clips"
        self.log_path = root / "engine.log"
        self.process: subprocess.Popen | None = None
        self.clients: list[EngineClient] = []

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PARASTEP_STATE_DIR": str(self.state),
            "PARASTEP_OUTPUT_DIR": str(self.clips),
            "XDG_CACHE_HOME": str(self.root / "cache"),
        }

    def command(self) -> list[str]:
        return [sys.executable, "-m", "app.engine_main", "--socket", str(self.socket)]

    def start(self) -> EngineProcess:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.command(), cwd=REPO, env=self.env(), stdout=log, stderr=subprocess.STDOUT
            )
        KEPT_PROCESSES.add(self.process.pid)
        return self

    def client(self) -> EngineClient:
        assert self.process is not None
        deadline = time.monotonic() + 60
        while True:
            try:
                client = EngineClient.connect(self.socket, timeout=1.0)
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"the engine did not start:\n{self.log()}") from None
        self.clients.append(client)
        return client

    def hello(self) -> EngineClient:
        client = self.client()
        client.hello()
        return client

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def children(self) -> list[int]:
        assert self.process is not None
        found = []
        for entry in Path("/proc").iterdir():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                if entry.name.isdigit() and int(fields[1]) == self.process.pid and fields[0] != "Z":
                    found.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                continue
        return found

    def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait(30)
        KEPT_PROCESSES.discard(self.process.pid)

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time; always waits for it."""
        for client in self.clients:
            client.close()
        self.clients = []
        if self.process is None:
            return None
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(45)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait(30)
        finally:
            KEPT_PROCESSES.discard(self.process.pid)
        return self.process.returncode


@pytest.fixture(scope="module")
def engine_process(tmp_path_factory):
    engine = EngineProcess(tmp_path_factory.mktemp("engine"))
    try:
        yield engine.start()
    finally:
        code = engine.stop()
        assert code == 0, f"the engine exited with {code}:\n{engine.log()}"
        assert not engine.socket.exists(), "the engine left its socket behind"


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _statuses(client: EngineClient) -> dict[str, str]:
    return {job["job_id"]: job["status"] for job in client.call({"type": "queue"}, "queue")["jobs"]}


# ---- tests against one engine ------------------------------------------------------------------------
def test_hello_gets_welcome_and_a_newer_client_is_refused(engine_process):
    client = engine_process.client()
    welcome = client.hello()
    assert welcome == {
        "type": "welcome",
        "version": PROTOCOL_VERSION,
        "engine_pid": engine_process.process.pid,
        "id": 1,  # the answer carries the id of the client's first request
    }

    other = engine_process.client()
    other.send({"type": "queue"})
    assert "before 'hello'" in other.wait_for("error")["message"]
    other.send({"type": "hello", "version": PROTOCOL_VERSION + 1})
    assert f"speaks up to {PROTOCOL_VERSION}" in other.wait_for("error")["message"]


def test_catalog_lists_models_strategies_and_devices(engine_process):
    client = engine_process.hello()
    catalog = client.call({"type": "catalog"}, "catalog", timeout=60)
    models = {model["name"]: model for model in catalog["models"]}
    assert {
        "tiny-cogvideox",
        "tiny-svd",
        "tiny-audioldm2",
        "tiny-wan",
        "tiny-ltx",
        "tiny-stable-audio",
    } <= set(models)
    # Each model carries its family's facts from the adapter: the window keeps no table of them.
    assert models["tiny-stable-audio"]["modality"] == "audio" and models["tiny-wan"]["modality"] == "video"
    assert models["tiny-svd"]["conditioning"] == "image" and models["tiny-ltx"]["conditioning"] == "text"
    assert (models["tiny-wan"]["published_steps"], models["tiny-wan"]["published_warmup"]) == (50, 12)
    strategies = {s["name"]: s for s in catalog["strategies"]}
    assert set(strategies) == set(STRATEGIES)
    assert strategies["parastep"]["max_devices"] is None and strategies["sequential"]["max_devices"] == 1
    warmup = next(o for o in strategies["parastep"]["options"] if o["name"] == "warmup")
    assert set(warmup) == {"name", "help", "default", "minimum", "maximum"}
    assert strategies["parastep"]["ideal"]["width_from"] == "ranks"
    # Per model, what a strategy cannot run, with the reason (the window greys these out).
    assert "tiny-svd" in strategies["cache-fbc"]["unavailable"]
    assert "tiny-cogvideox" not in strategies["cache-fbc"]["unavailable"]
    assert any(device["id"] == "cpu" for device in catalog["devices"])


def test_submit_streams_stages_steps_previews_then_finishes(engine_process):
    client = engine_process.hello()
    since = len(client.history)
    job_id = client.submit(REQUEST)
    finished = client.wait_for("job_finished", JOB_TIMEOUT_S, job_id=job_id)
    events = [m for m in client.history[since:] if m.get("job_id") == job_id and m["type"] != "queue"]
    kinds = [m["type"] for m in events]
    assert kinds[0] == "job_started" and kinds[-1] == "job_finished"
    stages = [m["stage"] for m in events if m["type"] == "stage"]
    assert stages == ["load", "encode", "denoise", "decode", "save"]
    assert sorted(m["step"] for m in events if m["type"] == "step") == list(range(6))
    previews = [m for m in events if m["type"] == "preview"]
    assert previews and previews[-1]["step"] == 5 and previews[-1]["total"] == 6
    image = Image.open(io.BytesIO(base64.b64decode(previews[-1]["images"][0])))
    assert image.format == "PNG" and len(previews[-1]["images"]) == len(previews[-1]["frame_indices"])
    output = Path(finished["result"]["output"])
    assert output.is_file() and output.parent == engine_process.clips
    assert finished["result"]["model"] == "tiny-cogvideox"
    assert _statuses(client)[job_id] == "done"


def test_reordered_and_removed_jobs_run_in_the_new_order(engine_process):
    client = engine_process.hello()
    since = len(client.history)
    blocker = client.submit({**REQUEST, "steps": 30, "seed": 1})
    client.wait_for("job_started", JOB_TIMEOUT_S, since=since, job_id=blocker)
    a, b, c = (client.submit({**REQUEST, "steps": 2, "seed": seed}) for seed in (2, 3, 4))

    queue = client.call({"type": "reorder", "job_ids": [c, a, b]}, "queue")
    assert [j["job_id"] for j in queue["jobs"] if j["status"] == "queued"] == [c, a, b]
    with pytest.raises(EngineError, match="running, not queued"):
        client.call({"type": "reorder", "job_ids": [blocker, a]}, "queue")
    with pytest.raises(EngineError, match="Cancel it first"):
        client.call({"type": "remove", "job_id": blocker}, "queue")
    with pytest.raises(EngineError, match="no job 'nope'"):
        client.call({"type": "remove", "job_id": "nope"}, "queue")
    queue = client.call({"type": "remove", "job_id": a}, "queue")
    assert a not in {j["job_id"] for j in queue["jobs"]}

    client.wait_for("job_finished", JOB_TIMEOUT_S, since=since, job_id=b)
    started = [m["job_id"] for m in client.history[since:] if m["type"] == "job_started"]
    assert started == [blocker, c, b]
    with pytest.raises(EngineError, match="only interrupted, failed or cancelled"):
        client.call({"type": "requeue", "job_id": b}, "queue")


def test_cancel_answers_at_once_stops_the_job_and_the_next_one_runs(engine_process):
    client = engine_process.hello()
    since = len(client.history)
    long_job = client.submit({**REQUEST, "steps": 60})
    next_job = client.submit({**REQUEST, "seed": 5})
    client.wait_for("step", JOB_TIMEOUT_S, since=since, job_id=long_job)

    start = time.monotonic()
    client.send({"type": "cancel", "job_id": long_job})
    client.wait_for("job_cancelling", 5, job_id=long_job)
    assert time.monotonic() - start < 1.0
    client.wait_for("job_cancelled", 30, job_id=long_job)
    client.wait_for("job_finished", JOB_TIMEOUT_S, job_id=next_job)

    steps = {m["step"] for m in client.history[since:] if m["type"] == "step" and m["job_id"] == long_job}
    assert max(steps) < 59  # stopped early
    assert _statuses(client)[long_job] == "cancelled"
    with pytest.raises(EngineError, match="not running"):
        client.call({"type": "cancel", "job_id": next_job}, "job_cancelling")


def test_a_job_that_cannot_run_fails_with_its_message(engine_process):
    client = engine_process.hello()
    since = len(client.history)
    job_id = client.submit({**REQUEST, "model": "no-such-model"})
    failed = client.wait_for("job_failed", JOB_TIMEOUT_S, since=since, job_id=job_id)
    assert "Unknown model 'no-such-model'" in failed["error"] and "\n" not in failed["error"]
    assert _statuses(client)[job_id] == "failed"
    client.call({"type": "requeue", "job_id": job_id}, "queue")  # failed jobs can be queued again
    client.wait_for("job_failed", JOB_TIMEOUT_S, job_id=job_id)
    assert client.call({"type": "remove", "job_id": job_id}, "queue")


def test_bad_messages_get_an_error_and_the_engine_keeps_answering(engine_process):
    client = engine_process.hello()

    def frame(body: bytes) -> bytes:
        return HEADER.pack(len(body)) + body

    client.send_raw(frame(b"{nope"))
    assert "not valid JSON" in client.wait_for("error")["message"]
    client.send_raw(HEADER.pack(MAX_MESSAGE_BYTES + 1) + bytes(MAX_MESSAGE_BYTES + 1))
    assert "over the 16 MiB limit" in client.wait_for("error")["message"]
    client.send_raw(frame(b"[1, 2]"))
    assert "not an object" in client.wait_for("error")["message"]
    client.send_raw(frame(b'{"kind": "queue"}'))
    assert "no string 'type'" in client.wait_for("error")["message"]
    client.send({"type": "frobnicate"})
    error = client.wait_for("error")
    assert "Unknown message type 'frobnicate'" in error["message"] and error["in_reply_to"] == "frobnicate"
    client.send({"type": "submit", "request": {**REQUEST, "steps": "six"}})
    assert "'steps'" in client.wait_for("error")["message"]
    client.send({"type": "submit", "request": REQUEST, "compare": [["parastep"]]})
    assert "'compare'" in client.wait_for("error")["message"]

    assert client.call({"type": "queue"}, "queue")["type"] == "queue"  # same connection still works
    assert engine_process.hello() is not None  # and new ones too


def test_socket_is_private(engine_process):
    assert stat.S_ISSOCK(engine_process.socket.stat().st_mode)
    assert stat.S_IMODE(engine_process.socket.stat().st_mode) == 0o600
    assert stat.S_IMODE(engine_process.socket.parent.stat().st_mode) == 0o700


def test_a_second_engine_on_the_same_socket_is_refused(engine_process):
    second = subprocess.run(
        engine_process.command(),
        cwd=REPO,
        env=engine_process.env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert second.returncode == 2
    assert "Another engine is already running" in second.stderr
    assert engine_process.hello().call({"type": "queue"}, "queue")  # the first one is untouched


# ---- a crash --------------------------------------------------------------------------------------------
def test_killed_engine_leaves_an_interrupted_job_that_requeue_runs(tmp_path):
    first, second = EngineProcess(tmp_path), EngineProcess(tmp_path)
    try:
        client = first.start().hello()
        job_id = client.submit({**REQUEST, "steps": 60})
        client.wait_for("step", JOB_TIMEOUT_S, job_id=job_id)
        workers = first.children()
        assert workers
        first.kill()
        assert first.socket.exists()  # a stale socket for the next engine to replace
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in workers), "workers outlived their engine"

        client = second.start().hello()
        job = next(j for j in client.call({"type": "queue"}, "queue")["jobs"] if j["job_id"] == job_id)
        assert job["status"] == "interrupted" and "requeue" in job["error"]
        since = len(client.history)
        client.send({"type": "requeue", "job_id": job_id})
        finished = client.wait_for("job_finished", JOB_TIMEOUT_S, since=since, job_id=job_id)
        assert Path(finished["result"]["output"]).is_file()

        client.send({"type": "shutdown"})
        assert second.process.wait(45) == 0
        assert not second.socket.exists()
    finally:
        first.stop()
        second.stop()


def test_the_engine_stops_when_the_process_that_started_it_dies(tmp_path):
    engine = EngineProcess(tmp_path)
    starter_code = (
        "import subprocess, sys; log = open(sys.argv[1], 'ab'); "
        "engine = subprocess.Popen(sys.argv[2:], stdout=log, stderr=log); "
        "print(engine.pid, flush=True); sys.stdin.read()"
    )
    starter = subprocess.Popen(
        [sys.executable, "-c", starter_code, str(engine.log_path), *engine.command()],
        cwd=REPO,
        env=engine.env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    pid = None
    try:
        pid = int(starter.stdout.readline())
        EngineClient.connect(engine.socket, timeout=60).close()
        starter.stdin.close()  # the starter exits, as a crashed window would
        starter.wait(30)
        deadline = time.monotonic() + 40
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid), f"the engine outlived its parent:\n{engine.log()}"
        assert not engine.socket.exists()
        assert "the process that started the engine is gone" in engine.log()
    finally:
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGKILL)
        if starter.poll() is None:
            starter.kill()
        starter.wait(30)
        starter.stdout.close()


def test_check_runs_the_plan_checks_with_a_structured_fix_and_queues_nothing(engine_process):
    client = engine_process.hello()
    before = len(client.call({"type": "queue"}, "queue")["jobs"])
    bad = client.call({"type": "check", "request": {**REQUEST, "frames": 1000}}, "check", timeout=60)
    assert bad["ok"] is False and bad["field"] == "frames" and bad["value"] == 993
    assert "--frames" in bad["fix"]  # the command line's wording stays; the window words `value`
    workers = client.call(
        {"type": "check", "request": {**REQUEST, "strategy": "cfg-parastep", "devices": "cpu:1"}}, "check"
    )
    assert (workers["field"], workers["value"]) == ("devices", "cpu:2")
    entry = client.call(
        {"type": "check", "request": REQUEST, "compare": [["sequential", "cpu:1"], ["parastep", "cpu:99"]]},
        "check",
    )
    assert entry["ok"] is False and entry["entry"] == 1 and entry["field"] == "devices"
    # Each entry is planned as `compare` runs it: parastep's warm-up is not given to sequential.
    with_options = {**REQUEST, "strategy": "parastep", "strategy_options": {"warmup": 1}}
    compare = [["sequential", "cpu:1"], ["parastep", "cpu:2"]]
    assert client.call({"type": "check", "request": with_options, "compare": compare}, "check")["ok"] is True
    good = client.call(
        {"type": "check", "request": {**REQUEST, "strategy": "parastep", "devices": "cpu:2"}}, "check"
    )
    assert good["ok"] is True and good["devices"] == "cpu:2" and good["ideal_speedup"] > 1
    assert len(client.call({"type": "queue"}, "queue")["jobs"]) == before


def test_a_queue_kept_from_the_last_session_waits_for_resume(tmp_path):
    from engine.job_queue import QUEUE_FILE, JobQueue

    engine = EngineProcess(tmp_path)
    JobQueue(engine.state / QUEUE_FILE).submit(REQUEST)
    try:
        client = engine.start().hello()
        time.sleep(2)  # time enough for a runner that did not wait to start it
        queue = client.call({"type": "queue"}, "queue")
        assert queue["held"] is True and [job["status"] for job in queue["jobs"]] == ["queued"]
        since = len(client.history)
        assert client.call({"type": "resume"}, "queue")["held"] is False
        client.wait_for("job_started", JOB_TIMEOUT_S, since=since)
    finally:
        engine.stop()
