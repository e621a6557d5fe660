"""The engine server survives whatever a client sends, and says so when it cannot save its queue.

Each test runs the engine's `EngineServer` in a thread on its own socket and queue file; no test
starts a worker (the jobs that reach the queue name a model that does not exist, so they fail when
planned).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from engine.client import EngineClient
from engine.job_queue import QUEUE_FORMAT
from engine.server import EngineServer
from engine.wire import HEADER

NO_MODEL = {"model": "no-such-model-here", "prompt": "a red circle", "steps": 2}


class Served:
    def __init__(self, root: Path) -> None:
        self.queue_path = root / "state" / "queue.json"
        self.server = EngineServer(root / "sock" / "engine.sock", self.queue_path)
        self.thread = threading.Thread(target=self._serve, name="test-engine", daemon=True)
        self.crash: BaseException | None = None

    def _serve(self) -> None:
        try:
            self.server.serve_forever()
        except BaseException as exc:  # what used to kill the engine process
            self.crash = exc
            raise

    def start(self) -> Served:
        self.server.start()
        self.thread.start()
        return self

    def client(self) -> EngineClient:
        client = EngineClient.connect(self.server.socket_path)
        client.hello()
        return client

    def stop(self) -> None:
        self.server.stop()
        self.thread.join(60)
        assert not self.thread.is_alive()


@pytest.fixture
def served(tmp_path):
    served = Served(tmp_path)
    try:
        yield served
    finally:
        if served.server._started:
            served.stop()
        assert served.crash is None, f"the server loop died: {served.crash!r}"


def _frame(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


def _queue_file(path: Path) -> dict:
    """The saved queue, read as strictly as the wire reads (no NaN, valid UTF-8 text)."""
    data = json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"{name} in {path}"))
    json.dumps(data, allow_nan=False).encode("utf-8")
    return data


def test_nested_brackets_a_nan_and_a_lone_surrogate_cost_one_error_each(served):
    served.start()
    client = served.client()
    frames = {
        b"[" * 2048: "nested more than 32 levels",  # RecursionError killed the loop
        b'{"type": "submit", "request": {"model": "x", "guidance_scale": NaN}}': "NaN",
        b'{"type": "submit", "request": {"model": "x", "prompt": "\\ud800"}}': "surrogate",
        b'{"type": "queue", "id": "\\udfff"}': "surrogate",  # would be copied into the reply
        b'{"type": "submit", "request": {"model": "x", "seconds": -1e400}}': "too large",
    }
    for body, words in frames.items():
        since = len(client.history)
        client.send_raw(_frame(body))
        error = client.wait_for("error", 10, since=since)
        assert words in error["message"] and "Fix:" in error["message"]
        assert client.call({"type": "queue"}, "queue")["jobs"] == []  # same connection, nothing queued
    assert served.thread.is_alive()
    assert served.client().call({"type": "queue"}, "queue")["type"] == "queue"  # new ones too


def test_a_job_that_reaches_the_queue_can_always_be_saved_and_sent(served):
    served.start()
    client = served.client()
    job_id = client.submit({**NO_MODEL, "guidance_scale": 7.5, "prompt": "caf\u00e9 \U0001f600"})
    failed = client.wait_for("job_failed", 120, job_id=job_id)
    assert "no-such-model-here" in failed["error"]
    jobs = _queue_file(served.queue_path)["jobs"]
    assert [job["job_id"] for job in jobs] == [job_id] and jobs[0]["request"]["prompt"].startswith("caf")
    assert client.call({"type": "queue"}, "queue")["jobs"][0]["status"] == "failed"


def test_a_queue_file_from_an_older_engine_with_a_lone_surrogate_is_moved_aside(served):
    # Written by an engine that accepted "\ud800": json.dump escapes it, so the file itself is fine,
    # but every `queue` reply failed to encode after every restart.
    job = {"job_id": "old1", "status": "queued", "request": {**NO_MODEL, "prompt": "\ud800"}}
    served.queue_path.parent.mkdir(parents=True)
    served.queue_path.write_text(json.dumps({"format": QUEUE_FORMAT, "version": 1, "jobs": [job]}))
    served.start()
    client = served.client()
    notice = client.wait_for("log", 10)
    assert "damaged" in notice["message"] and "surrogate" in notice["message"]
    assert client.call({"type": "queue"}, "queue")["jobs"] == []
    assert list(served.queue_path.parent.glob("queue.json.corrupt-*"))


def test_a_queue_file_that_cannot_be_written_raises_an_alarm(served):
    served.start()
    client = served.client()
    served.queue_path.mkdir(parents=True)  # os.replace onto a folder fails, even for root
    since = len(client.history)
    job_id = client.submit(NO_MODEL)
    alarm = client.wait_for("log", 10, since=since)
    assert "could not be saved" in alarm["message"] and str(served.queue_path) in alarm["message"]
    assert "Fix:" in alarm["message"]
    client.wait_for("job_failed", 120, job_id=job_id)
    alarms = [m for m in client.history[since:] if m["type"] == "log"]
    assert len(alarms) == 1  # once, not at every change

    served.queue_path.rmdir()
    since = len(client.history)
    client.call({"type": "remove", "job_id": job_id}, "queue")
    assert "saved to" in client.wait_for("log", 10, since=since)["message"]  # and the all-clear
    assert _queue_file(served.queue_path)["jobs"] == []


def test_a_reply_that_fails_to_encode_costs_that_reply_only(served, monkeypatch):
    served.start()
    client = served.client()
    real = served.server._queue_message
    calls = []

    def broken(**extra):
        calls.append(1)
        if len(calls) == 1:
            return {**real(**extra), "bad": "\ud800"}  # as a bug elsewhere might produce
        return real(**extra)

    monkeypatch.setattr(served.server, "_queue_message", broken)
    client.send({"type": "queue", "id": 7})
    error = client.wait_for("error", 10)
    assert "not JSON-serialisable" in error["message"] and error["id"] == 7
    assert client.call({"type": "queue"}, "queue")["type"] == "queue"
