"""The persisted job queue, the message framing and the preview throttle: no engine, no torch."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from engine.errors import UserError
from engine.job_queue import (
    INTERRUPTED_ERROR,
    JobQueue,
    default_queue_path,
)
from engine.server import PreviewThrottle
from engine.wire import HEADER, MessageReader, WireError, encode_message
from tests.conftest import REPO

REQUEST = {"model": "tiny-cogvideox", "prompt": "a red circle"}


# ---- queue ----------------------------------------------------------------------------------------------
def test_state_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("PARASTEP_STATE_DIR", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    assert default_queue_path() == tmp_path / "state" / "parastep-studio" / "queue.json"
    monkeypatch.setenv("PARASTEP_STATE_DIR", str(tmp_path / "mine"))
    assert default_queue_path() == tmp_path / "mine" / "queue.json"


def test_every_change_is_saved_and_a_running_job_comes_back_interrupted(tmp_path):
    path = tmp_path / "queue.json"
    queue = JobQueue(path)
    first = queue.submit(REQUEST)
    second = queue.submit(REQUEST, [["sequential", "cpu:1"], ["parastep", "cpu:2"]])
    assert queue.start_next().job_id == first.job_id
    assert queue.start_next() is None  # one job at a time
    saved = json.loads(path.read_text())
    assert [j["status"] for j in saved["jobs"]] == ["running", "queued"]
    assert saved["jobs"][1]["compare"] == [["sequential", "cpu:1"], ["parastep", "cpu:2"]]
    assert [p.name for p in tmp_path.iterdir()] == ["queue.json"]  # no temporary file left

    again = JobQueue(path)  # as after a crash
    assert [(j.status, j.error) for j in again.jobs()] == [
        ("interrupted", INTERRUPTED_ERROR),
        ("queued", None),
    ]
    assert json.loads(path.read_text())["jobs"][0]["status"] == "interrupted"
    again.requeue(first.job_id)
    assert [j.job_id for j in again.jobs()] == [second.job_id, first.job_id]
    assert again.start_next().job_id == second.job_id
    again.finish(second.job_id, "done", result={"output": "x.mp4"})
    assert JobQueue(path).get(second.job_id).result == {"output": "x.mp4"}


def test_reorder_remove_requeue_refuse_unknown_ids_and_wrong_states(tmp_path):
    queue = JobQueue(tmp_path / "queue.json")
    running, a, b, c = (queue.submit(REQUEST).job_id for _ in range(4))
    queue.start_next()
    queue.reorder([c, a])  # b, not named, follows
    assert [j.job_id for j in queue.jobs()] == [running, c, a, b]
    with pytest.raises(UserError, match="running, not queued"):
        queue.reorder([running, a])
    with pytest.raises(UserError, match="more than once"):
        queue.reorder([a, a])
    with pytest.raises(UserError, match="no job 'zzz'"):
        queue.reorder(["zzz"])
    with pytest.raises(UserError, match="Cancel it first"):
        queue.remove(running)
    with pytest.raises(UserError, match="only interrupted, failed or cancelled.*already queued"):
        queue.requeue(a)
    queue.remove(a)
    queue.finish(running, "failed", error="boom")
    queue.remove(running)  # finished jobs can be removed too
    assert [j.job_id for j in queue.jobs()] == [c, b]
    with pytest.raises(UserError, match="compare"):
        queue.submit(REQUEST, [["parastep"]])


def test_a_damaged_queue_file_is_moved_aside_and_reported(tmp_path):
    path = tmp_path / "queue.json"
    path.write_text("{ not json")
    problems = []
    queue = JobQueue(path, on_problem=problems.append)
    assert queue.jobs() == [] and queue.notices == problems and len(problems) == 1
    aside = list(tmp_path.glob("queue.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_text() == "{ not json"
    assert str(aside[0]) in problems[0] and "damaged" in problems[0]
    queue.submit(REQUEST)
    path.write_text(json.dumps({"format": "parastep-studio/queue", "version": 1, "jobs": [{"job_id": 3}]}))
    JobQueue(path, on_problem=problems.append)
    assert len(list(tmp_path.glob("queue.json.corrupt-*"))) == 2


# ---- framing ---------------------------------------------------------------------------------------------
def test_messages_survive_any_chunking():
    stream = encode_message({"type": "a", "text": "ünïcode"}) + encode_message({"type": "b", "n": 2})
    reader, got = MessageReader(), []
    for i in range(len(stream)):
        reader.feed(stream[i : i + 1])
        got.extend(reader.messages())
    assert got == [{"type": "a", "text": "ünïcode"}, {"type": "b", "n": 2}]


def test_bad_frames_are_skipped_with_a_clear_error():
    reader = MessageReader(max_bytes=20)
    reader.feed(HEADER.pack(30) + b"x" * 5)
    with pytest.raises(WireError, match="30 bytes is over the 20-byte limit"):
        reader.next_message()
    assert reader.next_message() is None
    reader.feed(b"x" * 25 + HEADER.pack(2) + b"{}" + encode_message({"type": "ok"}))
    with pytest.raises(WireError, match="no string 'type'"):
        list(reader.messages())
    assert list(reader.messages()) == [{"type": "ok"}] and reader.buffered == 0
    with pytest.raises(WireError, match="type"):
        encode_message({"no": "type"})
    with pytest.raises(WireError, match="serialisable"):
        encode_message({"type": "x", "value": float("nan")})


def test_previews_are_coalesced_to_the_newest():
    now = [0.0]
    throttle = PreviewThrottle(0.1, clock=lambda: now[0])
    assert throttle.offer("j", {"step": 0}) == {"step": 0}
    assert throttle.offer("j", {"step": 1}) is None
    assert throttle.offer("j", {"step": 2}) is None
    assert throttle.due() == []
    now[0] = 0.1
    assert throttle.due() == [{"step": 2}] and throttle.due() == []
    assert throttle.offer("j", {"step": 3}) is None
    assert throttle.flush("j") == {"step": 3} and throttle.flush("j") is None


def test_the_window_side_modules_do_not_import_torch():
    code = (
        "import sys, engine.wire, engine.protocol, engine.client, engine.socket_path, engine.job_queue; "
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules, sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
