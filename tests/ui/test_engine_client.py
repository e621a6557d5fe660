"""EngineClient against a fake engine (a QLocalServer speaking docs/protocol.md): no torch, fast."""

from __future__ import annotations

import pytest
from PySide6.QtCore import QObject, QTimer, Signal
from PySide6.QtNetwork import QLocalServer

from engine.wire import MessageReader, encode_message
from ui.engine_client import MAX_AUTO_RESTARTS, EngineClient, EngineState, answers


class FakeEngine(QObject):
    """Answers hello, queue, catalog, submit and cancel like the engine; records what it received."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.server = QLocalServer()
        self.server.newConnection.connect(self._accept)
        self.received: list[dict] = []
        self.connection = None
        self.reader = MessageReader()
        self.jobs: list[dict] = []

    def listen(self) -> None:
        QLocalServer.removeServer(self.path)
        assert self.server.listen(self.path), self.server.errorString()

    def close(self) -> None:
        if self.connection is not None:
            self.connection.abort()
            self.connection = None
        self.server.close()

    def push(self, message: dict) -> None:
        self.connection.write(encode_message(message))
        self.connection.flush()

    def _accept(self) -> None:
        self.connection = self.server.nextPendingConnection()
        self.reader = MessageReader()
        self.connection.readyRead.connect(self._read)

    def _read(self) -> None:
        self.reader.feed(bytes(self.connection.readAll().data()))
        for message in self.reader.messages():
            self.received.append(message)
            kind = message["type"]
            if kind == "hello":
                self.push({"type": "welcome", "version": 1, "engine_pid": 4242})
            elif kind == "queue":
                self.push({"type": "queue", "jobs": self.jobs})
            elif kind == "catalog":
                self.push({"type": "catalog", "models": [], "strategies": [], "devices": []})
            elif kind == "submit":
                job = {"job_id": f"job{len(self.jobs)}", "status": "queued", "request": message["request"]}
                self.jobs.append(job)
                self.push({"type": "queue", "jobs": self.jobs, "job_id": job["job_id"]})
            elif kind == "cancel":
                self.push({"type": "job_cancelling", "job_id": message["job_id"]})
            elif kind == "remove":
                self.push({"type": "error", "message": "Job x is not queued.", "in_reply_to": "remove"})


class FakeLauncher(QObject):
    """Stands in for EngineProcess: 'starting the process' makes the fake engine listen."""

    died = Signal(int, str)

    def __init__(self, engine: FakeEngine, start_delay_ms: int = 0) -> None:
        super().__init__()
        self.engine = engine
        self.start_delay_ms = start_delay_ms
        self.running = False
        self.starts = 0

    def start(self) -> None:
        self.running = True
        self.starts += 1
        QTimer.singleShot(self.start_delay_ms, self.engine.listen)

    def stop(self) -> None:
        self.running = False
        self.engine.close()

    def stop_later(self, then) -> None:
        self.stop()
        QTimer.singleShot(10, then)

    def is_running(self) -> bool:
        return self.running

    def crash(self, code: int = 1) -> None:
        self.running = False
        self.engine.close()
        self.died.emit(code, "Traceback: boom")


@pytest.fixture
def socket_path(tmp_path):
    folder = tmp_path / "sock"
    folder.mkdir(mode=0o700)
    return str(folder / "engine.sock")


@pytest.fixture
def fake(socket_path):
    engine = FakeEngine(socket_path)
    yield engine
    engine.close()


def make_client(qtbot, fake, **kwargs):
    launcher = FakeLauncher(fake, kwargs.pop("start_delay_ms", 0))
    client = EngineClient(fake.path, launcher, connect_timeout_s=10, **kwargs)
    return client, launcher


def test_connects_once_the_engine_listens(qtbot, fake):
    client, launcher = make_client(qtbot, fake, start_delay_ms=400)  # the engine is still starting
    states = []
    client.state_changed.connect(states.append)
    with qtbot.waitSignal(client.welcomed, timeout=5000):
        client.start()
        assert client.state == EngineState.STARTING
    assert client.state == EngineState.READY and client.engine_pid == 4242
    assert states == ["starting", "ready"]
    qtbot.waitUntil(lambda: [m["type"] for m in fake.received] == ["hello", "queue"])
    assert fake.received[0]["version"] == 1
    client.stop()
    assert client.state == EngineState.STOPPED and not launcher.running


def test_replies_reach_their_callbacks(qtbot, fake):
    client, _ = make_client(qtbot, fake)
    with qtbot.waitSignal(client.welcomed):
        client.start()
    replies = {}
    client.fetch_catalog(["/models"], on_reply=lambda m: replies.setdefault("catalog", m))
    client.submit({"model": "tiny-cogvideox"}, on_reply=lambda m: replies.setdefault("submit", m))
    client.remove("x")
    client.refresh_queue()
    fake.push({"type": "queue", "jobs": []})  # pushed (another client's change) before the replies
    client.submit(
        {"model": "tiny-svd"}, [["sequential", "cpu:1"]], on_reply=lambda m: replies.setdefault("2", m)
    )
    client.remove("y")  # no callback: its error must not reach another request's callback
    client.request({"type": "remove", "job_id": "z"}, on_reply=lambda m: replies.setdefault("remove", m))
    qtbot.waitUntil(lambda: len(replies) == 4)
    assert replies["catalog"]["type"] == "catalog"
    assert replies["submit"]["job_id"] == "job0" and replies["2"]["job_id"] == "job1"
    assert replies["remove"] == {"type": "error", "message": "Job x is not queued.", "in_reply_to": "remove"}
    submitted = [m for m in fake.received if m["type"] == "submit"]
    assert submitted[1]["compare"] == [["sequential", "cpu:1"]]
    assert [m for m in fake.received if m["type"] == "catalog"][0]["folders"] == ["/models"]
    assert client.jobs[-1]["job_id"] == "job1"
    client.stop()


def test_answers_pairs_replies_with_requests():
    assert answers("submit", {"type": "queue", "jobs": [], "job_id": "a"})
    assert not answers("submit", {"type": "queue", "jobs": []})
    assert answers("reorder", {"type": "queue", "jobs": []})
    assert not answers("reorder", {"type": "queue", "jobs": [], "job_id": "a"})
    assert answers("cancel", {"type": "job_cancelling", "job_id": "a"})
    assert answers("catalog", {"type": "error", "message": "x", "in_reply_to": "catalog"})
    assert not answers("submit", {"type": "error", "message": "x", "in_reply_to": "catalog"})


def test_events_become_signals_and_state(qtbot, fake):
    client, _ = make_client(qtbot, fake)
    with qtbot.waitSignal(client.welcomed):
        client.start()
    seen = []
    client.job_started.connect(lambda j: seen.append(("started", j)))
    client.stage_changed.connect(lambda j, s: seen.append(("stage", s)))
    client.step_received.connect(lambda m: seen.append(("step", m["step"])))
    client.preview_received.connect(lambda m: seen.append(("preview", m["step"])))
    client.job_cancelling.connect(lambda j: seen.append(("cancelling", j)))
    client.job_finished.connect(lambda j, r: seen.append(("finished", r["output"])))
    client.log_received.connect(lambda line: seen.append(("log", line)))
    qtbot.waitUntil(lambda: [m["type"] for m in fake.received] == ["hello", "queue"])
    fake.jobs = [{"job_id": "a", "status": "running", "request": {}}]
    fake.push({"type": "queue", "jobs": fake.jobs})
    fake.push({"type": "job_started", "job_id": "a"})
    qtbot.waitUntil(lambda: client.state == EngineState.BUSY)
    fake.push({"type": "stage", "job_id": "a", "stage": "denoise"})
    step = {"type": "step", "job_id": "a", "rank": 0, "step": 0, "total": 2, "action": "compute"}
    fake.push({**step, "compute_s": 0.1, "comm_wait_s": 0.0})
    fake.push({"type": "preview", "job_id": "a", "step": 0, "total": 2, "images": [], "frame_indices": []})
    with qtbot.waitSignal(client.job_cancelling):
        client.cancel("a")
    fake.push({"type": "log", "message": "hello"})
    with qtbot.waitSignal(client.job_finished):
        fake.push({"type": "job_finished", "job_id": "a", "result": {"output": "/clips/a.mp4"}})
    assert client.state == EngineState.READY
    assert seen == [
        ("started", "a"),
        ("stage", "denoise"),
        ("step", 0),
        ("preview", 0),
        ("cancelling", "a"),
        ("log", "hello"),
        ("finished", "/clips/a.mp4"),
    ]
    client.stop()


def test_a_dead_engine_is_restarted_until_it_keeps_crashing(qtbot, fake):
    client, launcher = make_client(qtbot, fake)
    with qtbot.waitSignal(client.welcomed):
        client.start()
    for attempt in range(MAX_AUTO_RESTARTS):
        with qtbot.waitSignal(client.engine_died):
            launcher.crash()
        assert client.state == EngineState.STOPPED
        with qtbot.waitSignal(client.welcomed, timeout=5000):
            pass  # restarted on its own
        assert launcher.starts == attempt + 2
    with qtbot.waitSignal(client.engine_died):
        launcher.crash()  # once too often within a minute: it stays stopped
    qtbot.wait(800)
    assert client.state == EngineState.STOPPED and launcher.starts == MAX_AUTO_RESTARTS + 1
    with qtbot.waitSignal(client.welcomed, timeout=5000):
        client.restart()  # the user's Restart still works
    client.stop()


def test_restart_while_running(qtbot, fake):
    client, launcher = make_client(qtbot, fake)
    with qtbot.waitSignal(client.welcomed):
        client.start()
    with qtbot.waitSignal(client.welcomed, timeout=5000):
        client.restart()
    assert launcher.starts == 2 and client.state == EngineState.READY
    client.stop()
