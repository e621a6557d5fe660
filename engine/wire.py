"""Framing of the messages between the window (or a script) and the engine process.

Each message is a 4-byte big-endian unsigned length, then that many bytes of UTF-8 JSON holding one
object with a string `"type"` (see docs/protocol.md). This module imports only the standard library,
so the window (which never imports torch) and the engine share it.

The JSON is strict both ways: no NaN or Infinity (nor numbers too large for a float), no lone
surrogates in strings (they cannot be encoded as UTF-8), at most `MAX_DEPTH` nested arrays/objects.
Whatever is decoded can therefore be encoded again and saved in the queue file.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from typing import Any

MAX_MESSAGE_BYTES = 16 * 1024 * 1024
MAX_DEPTH = 32  # nested arrays/objects; the deepest message (a comparison's result in `queue`) needs ~10
HEADER = struct.Struct(">I")


class WireError(ValueError):
    """A frame that is not a valid message. The reader has already skipped it; reading goes on."""


def encode_message(message: dict[str, Any]) -> bytes:
    """The frame for `message` (a dict with a string "type"); raises WireError if it cannot be sent."""
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise WireError("A message must be a JSON object with a string 'type'.")
    try:
        body = json.dumps(message, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        data = body.encode("utf-8")  # a lone surrogate fails here (UnicodeEncodeError)
    except (TypeError, ValueError, RecursionError) as exc:
        raise WireError(f"Message '{message['type']}' is not JSON-serialisable ({exc}).") from None
    if len(data) > MAX_MESSAGE_BYTES:
        raise WireError(
            f"Message '{message['type']}' is {len(data)} bytes, over the {_limit(MAX_MESSAGE_BYTES)} limit."
        )
    return HEADER.pack(len(data)) + data


def decode_body(body: bytes) -> dict[str, Any]:
    """The message in one frame's body; raises WireError naming the problem."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WireError(f"Message is not UTF-8 ({exc.reason} at byte {exc.start}).") from None
    try:
        message = loads_strict(text)
    except RecursionError:  # the C parser recurses per level; deeper than MAX_DEPTH anyway
        raise WireError(f"Message is nested more than {MAX_DEPTH} levels deep.") from None
    except ValueError as exc:
        raise WireError(f"Message is not valid JSON ({exc}).") from None
    if not isinstance(message, dict):
        raise WireError(f"Message is a JSON {type(message).__name__}, not an object.")
    if not isinstance(message.get("type"), str):
        raise WireError("Message has no string 'type' field.")
    return message


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is too large")
    return value


def loads_strict(text: str, max_depth: int = MAX_DEPTH) -> Any:
    """`json.loads` that refuses NaN/Infinity, overflowing floats, lone surrogates and deep nesting.

    Raises ValueError naming the problem (RecursionError for nesting deep enough to hit Python's limit).
    """
    value = json.loads(text, parse_constant=_no_constant, parse_float=_finite_float)
    check_plain(value, max_depth)
    return value


def check_plain(value: Any, max_depth: int = MAX_DEPTH) -> None:
    """Raises ValueError if `value` nests deeper than `max_depth` or holds a string with a lone surrogate.

    Iterative, so a deep value cannot exhaust the stack here.
    """
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _check_text(item)
        elif isinstance(item, dict | list):
            if depth > max_depth:
                raise ValueError(f"nested more than {max_depth} levels deep")
            if isinstance(item, dict):
                stack.extend((key, depth) for key in item)
                stack.extend((child, depth + 1) for child in item.values())
            else:
                stack.extend((child, depth + 1) for child in item)


def _check_text(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"a string holds a lone surrogate ({text[exc.start]!r} at character {exc.start}), not UTF-8 text"
        ) from None


class MessageReader:
    """Turns a byte stream, fed in chunks of any size, back into messages.

    >>> reader = MessageReader()
    >>> reader.feed(encode_message({"type": "queue"}))
    >>> list(reader.messages())
    [{'type': 'queue'}]

    A bad frame (too long, not UTF-8 JSON, not an object with a "type") raises WireError from
    `next_message`/`messages` once it has been skipped, so calling again carries on with the next
    frame. A frame longer than `max_bytes` is skipped by discarding the bytes its header announced,
    as they arrive, without buffering them.
    """

    def __init__(self, max_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._buffer = bytearray()
        self._skip = 0  # bytes of an oversize frame still to discard

    def feed(self, data: bytes) -> None:
        self._buffer += data

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a message."""
        return len(self._buffer)

    def next_message(self) -> dict[str, Any] | None:
        """The next complete message, or None until more bytes arrive."""
        if self._skip:
            dropped = min(self._skip, len(self._buffer))
            del self._buffer[:dropped]
            self._skip -= dropped
            if self._skip:
                return None
        if len(self._buffer) < HEADER.size:
            return None
        (length,) = HEADER.unpack_from(self._buffer)
        if length > self.max_bytes:
            del self._buffer[: HEADER.size]
            self._skip = length
            raise WireError(
                f"Message of {length} bytes is over the {_limit(self.max_bytes)} limit; it was skipped."
            )
        end = HEADER.size + length
        if len(self._buffer) < end:
            return None
        body = bytes(self._buffer[HEADER.size : end])
        del self._buffer[:end]
        return decode_body(body)

    def messages(self) -> Iterator[dict[str, Any]]:
        """Every complete message buffered so far (see the class note on WireError)."""
        while (message := self.next_message()) is not None:
            yield message


def _limit(size: int) -> str:
    return f"{size / 2**20:g} MiB" if size >= 2**20 else f"{size}-byte"
