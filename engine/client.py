"""A small blocking client of the engine process, for scripts and tests (the window has its own).

    with EngineClient.connect(path) as client:
        client.hello()
        queue = client.call({"type": "submit", "request": {...}}, "queue")
        finished = client.wait_for("job_finished", job_id=queue["job_id"], timeout=120)

Standard library only.
"""

from __future__ import annotations

import select
import socket
import time
from pathlib import Path
from typing import Any

from engine.protocol import PROTOCOL_VERSION
from engine.wire import MessageReader, encode_message


class EngineError(Exception):
    """The engine answered a request with an `error` message."""

    def __init__(self, reply: dict[str, Any]) -> None:
        self.reply = reply
        super().__init__(reply.get("message", "error"))


class EngineClient:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader = MessageReader()
        self.history: list[dict[str, Any]] = []  # every message received, in order
        self._last_id = 0

    @classmethod
    def connect(cls, path: str | Path, timeout: float = 10.0) -> EngineClient:
        """Connects, retrying while the engine is still starting (no socket yet, or not listening)."""
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(path))
                return cls(sock)
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> EngineClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- sending and receiving -------------------------------------------------------------------
    def send(self, message: dict[str, Any]) -> None:
        self.sock.sendall(encode_message(message))

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def receive(self, timeout: float = 30.0) -> dict[str, Any]:
        """The next message; TimeoutError if none comes in time, ConnectionError if the engine hung up."""
        deadline = time.monotonic() + timeout
        while True:
            message = self.reader.next_message()
            if message is not None:
                self.history.append(message)
                return message
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.sock], [], [], left)[0]:
                raise TimeoutError(f"no message from the engine in {timeout:g} s")
            data = self.sock.recv(1 << 16)
            if not data:
                raise ConnectionError("the engine closed the connection")
            self.reader.feed(data)

    def wait_for(
        self, kind: str, timeout: float = 30.0, since: int | None = None, **fields: Any
    ) -> dict[str, Any]:
        """The first message of type `kind` whose `fields` match; a new `error` on the way raises
        EngineError.

        Looks at messages not received yet, or, with `since`, first at `history[since:]` (so a test
        can send, then wait for several messages in any order).
        """

        def matches(message: dict[str, Any]) -> bool:
            return message["type"] == kind and all(message.get(k) == v for k, v in fields.items())

        for message in self.history[since:] if since is not None else []:
            if matches(message):
                return message
        deadline = time.monotonic() + timeout
        while True:
            message = self.receive(max(0.0, deadline - time.monotonic()))
            if matches(message):
                return message
            if message["type"] == "error":
                raise EngineError(message)

    def call(self, message: dict[str, Any], reply: str, timeout: float = 30.0) -> dict[str, Any]:
        """Sends `message` with a fresh `id`; returns the engine's `reply`-typed answer to it, or raises
        EngineError if the answer is an `error`. Other messages on the way are kept in `history`."""
        self._last_id += 1
        request_id = self._last_id
        self.send({**message, "id": request_id})
        deadline = time.monotonic() + timeout
        while True:
            answer = self.receive(max(0.0, deadline - time.monotonic()))
            if answer.get("id") == request_id:
                if answer["type"] == "error":
                    raise EngineError(answer)
                if answer["type"] == reply:
                    return answer

    def submit(
        self, request: dict[str, Any], compare: list[list[str]] | None = None, timeout: float = 30.0
    ) -> str:
        """Queues a job; returns its id."""
        message: dict[str, Any] = {"type": "submit", "request": request}
        if compare is not None:
            message["compare"] = compare
        return self.call(message, "queue", timeout)["job_id"]

    def hello(self, timeout: float = 30.0) -> dict[str, Any]:
        return self.call({"type": "hello", "version": PROTOCOL_VERSION}, "welcome", timeout)
