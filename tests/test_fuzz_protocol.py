"""Property-based fuzzing of the wire protocol and of requests (hypothesis), kept to a few seconds.

- `decode_body` and `MessageReader` on arbitrary bytes and arbitrary JSON: a message or a WireError,
  never anything else, and whatever is accepted encodes again (so it can be answered and saved);
- `GenerationRequest.from_dict` on generated requests: a request that encodes, or a UserError;
- a live `EngineServer` (in a thread, no worker ever starts) fed random frames, random JSON and
  mutated valid messages on fresh connections: it answers a probe after every example.

`scripts/fuzz_protocol.py` runs the same kind of traffic for longer against an engine process.
"""

from __future__ import annotations

import json
import socket
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.client import EngineClient
from engine.errors import UserError
from engine.protocol import GenerationRequest
from engine.server import EngineServer
from engine.wire import HEADER, MessageReader, WireError, decode_body, encode_message

FAST = settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
NO_MODEL = {"model": "no-such-model-here", "prompt": "a red circle", "steps": 2}
LONE = st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff", "a\ud83d", "\udcff.png"])
TEXT = st.one_of(st.text(max_size=20), LONE, st.sampled_from(["", "tiny-cogvideox", "cpu:2", "parastep"]))
NUMBERS = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 2**63, 262144, 1e308]),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)
VALUES = st.recursive(
    SCALARS,
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(TEXT, children, max_size=4)),
    max_leaves=12,
)
TYPES = st.sampled_from(
    ["hello", "queue", "submit", "reorder", "remove", "cancel", "requeue", "catalog", "allow_output", "x"]
)
REQUEST_FIELDS = [
    "model", "prompt", "negative_prompt", "image", "seed", "steps", "guidance_scale", "frames", "height",
    "width", "fps", "seconds", "strategy", "strategy_options", "devices", "output", "version",
]  # fmt: skip


def _valid_messages() -> list[dict]:
    return [
        {"type": "hello", "version": 1},
        {"type": "queue", "id": 3},
        {"type": "submit", "request": NO_MODEL},
        {"type": "submit", "request": NO_MODEL, "compare": [["sequential", "cpu:1"], ["parastep", "cpu:2"]]},
        {"type": "reorder", "job_ids": ["a", "b"]},
        {"type": "remove", "job_id": "a"},
        {"type": "cancel", "job_id": "a"},
        {"type": "requeue", "job_id": "a"},
        {"type": "catalog", "folders": ["/nonexistent-fuzz-folder"]},
        {"type": "allow_output", "folder": "/tmp/fuzz-clips"},
    ]


@st.composite
def mutated(draw: st.DrawFn) -> dict:
    """A valid message with one to three fields replaced, removed or added (never `shutdown`)."""
    message = json.loads(json.dumps(draw(st.sampled_from(_valid_messages()))))
    for _ in range(draw(st.integers(1, 3))):
        target = message
        if "request" in message and isinstance(message["request"], dict) and draw(st.booleans()):
            target = message["request"]
        key = draw(st.sampled_from([*target, *REQUEST_FIELDS, "id", "type"]))
        action = draw(st.sampled_from(["set", "drop", "type"]))
        if action == "drop" and key != "type":
            target.pop(key, None)
        elif action == "type" and target is message:
            message["type"] = draw(TYPES)
        else:
            target[key] = draw(VALUES)
    if message.get("type") == "shutdown":
        message["type"] = "queue"
    return message


def _body(value: object) -> bytes:
    """JSON text as a client could send it: NaN and lone surrogates included (escaped or raw)."""
    text = json.dumps(value, allow_nan=True, ensure_ascii=False)
    return text.encode("utf-8", "surrogatepass")


BODIES = st.one_of(
    st.binary(max_size=300),
    VALUES.map(_body),
    st.builds(
        lambda kind, rest: _body({**rest, "type": kind}), TYPES, st.dictionaries(TEXT, VALUES, max_size=4)
    ),
    mutated().map(_body),
    st.integers(1, 5000).map(lambda depth: b'{"type": "queue", "x": ' + b"[" * depth + b"]" * depth + b"}"),
)


# ---- the codec ------------------------------------------------------------------------------------
@FAST
@given(BODIES)
def test_decode_body_gives_a_message_that_encodes_again_or_a_wire_error(body):
    try:
        message = decode_body(body)
    except WireError:
        return
    assert isinstance(message, dict) and isinstance(message["type"], str)
    assert decode_body(encode_message(message)[HEADER.size :]) == message


@FAST
@given(st.lists(BODIES, min_size=1, max_size=4), st.lists(st.integers(1, 64), min_size=1, max_size=8))
def test_message_reader_splits_any_chunking_the_same_way(bodies, cuts):
    stream = b"".join(HEADER.pack(len(body)) + body for body in bodies)
    expected = []
    for body in bodies:
        try:
            expected.append(decode_body(body))
        except WireError as exc:
            expected.append(str(exc))
    reader, got, start, i = MessageReader(), [], 0, 0
    while start < len(stream):
        size = cuts[i % len(cuts)]
        reader.feed(stream[start : start + size])
        start, i = start + size, i + 1
        while True:
            try:
                message = reader.next_message()
            except WireError as exc:
                got.append(str(exc))
                continue
            if message is None:
                break
            got.append(message)
    assert got == expected and reader.buffered == 0


@FAST
@given(st.dictionaries(st.sampled_from(REQUEST_FIELDS), VALUES, max_size=8), st.booleans())
def test_from_dict_gives_a_request_that_encodes_or_a_user_error(fields, with_model):
    data = {**({"model": "tiny-cogvideox"} if with_model else {}), **fields}
    try:
        request = GenerationRequest.from_dict(data)
    except UserError as exc:
        assert "Fix:" in str(exc)
        encode_message({"type": "error", "message": str(exc)})  # the refusal itself can be sent
        return
    encode_message({"type": "queue", "jobs": [{"request": request.to_dict()}]})
    assert GenerationRequest.from_dict(request.to_dict()) == request


# ---- a live server ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def live(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    server = EngineServer(root / "sock" / "engine.sock", root / "state" / "queue.json")
    server.start()
    crash: list[BaseException] = []

    def serve() -> None:
        try:
            server.serve_forever()
        except BaseException as exc:
            crash.append(exc)
            raise

    thread = threading.Thread(target=serve, name="fuzz-engine", daemon=True)
    thread.start()
    probe = EngineClient.connect(server.socket_path)
    probe.hello()
    try:
        yield server, probe
    finally:
        probe.close()
        server.stop()
        thread.join(60)
        assert not crash, f"the server loop died: {crash[0]!r}"


@settings(max_examples=200, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(
    st.lists(BODIES, min_size=1, max_size=4),
    st.booleans(),
    st.binary(max_size=16),  # unframed tail: a cut-off header or body
)
def test_a_live_server_answers_after_any_traffic(live, bodies, greet, tail):
    server, probe = live
    hello = [json.dumps({"type": "hello", "version": 1}).encode()] if greet else []
    data = b"".join(HEADER.pack(len(body)) + body for body in [*hello, *bodies]) + tail
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(str(server.socket_path))
    try:
        sock.sendall(data)
        # Only a closed write side ends the exchange: the reads stop once the engine closes too, or
        # when nothing more comes (a cut-off frame keeps the connection open on purpose).
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(0.2)
        try:
            while sock.recv(1 << 16):
                pass
        except (TimeoutError, OSError):
            pass
    finally:
        sock.close()
    reply = probe.call({"type": "queue"}, "queue", timeout=10)
    for job in reply["jobs"]:
        if job["status"] != "running":
            probe.call({"type": "remove", "job_id": job["job_id"]}, "queue", timeout=10)
