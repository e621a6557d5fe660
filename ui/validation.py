"""Whether the request on screen would run, as the engine says (its `check` answer), and how the
window words an engine error for people.

Qt-free: `Validation` holds the latest answer and tells its observers; the request panel and the
comparison lab draw it. The rules live in the engine (`Engine.plan`); this module only renders
them: the engine names the field at fault and the value that fixes it, the window names its own
control ("Set Workers to 2") where the command line names a flag ("--devices cpu:2").
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Request field -> the label of the window's control for it.
FIELD_LABELS = {
    "model": "Model",
    "prompt": "Prompt",
    "negative_prompt": "Negative",
    "image": "Image",
    "frames": "Frames",
    "height": "Height",
    "width": "Width",
    "fps": "FPS",
    "seconds": "Seconds",
    "steps": "Steps",
    "guidance_scale": "Guidance",
    "seed": "Seed",
    "strategy": "Strategy",
    "devices": "Workers",
}
OPTION_PREFIX = "strategy_options."


def field_label(field: str, gpus: bool = False) -> str:
    if field == "devices" and gpus:
        return "GPUs"
    if field.startswith(OPTION_PREFIX):  # as the strategy picker labels its option rows
        return field[len(OPTION_PREFIX) :].replace("_", " ").capitalize()
    return FIELD_LABELS.get(field, field.replace("_", " ").capitalize())


def value_text(field: str, value: Any) -> str:
    """A value as the control shows it: 'cpu:2' is 2 workers."""
    if field == "devices" and isinstance(value, str) and value.startswith("cpu:"):
        return value[4:]
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


@dataclass(frozen=True)
class CheckResult:
    """The engine's answer to `check` (docs/protocol.md); `ok` None: not asked yet."""

    ok: bool | None = None
    problem: str = ""
    fix: str = ""
    field: str | None = None
    value: Any = None
    entry: int | None = None  # the comparison entry at fault

    @classmethod
    def from_reply(cls, reply: dict[str, Any]) -> CheckResult:
        if reply.get("type") == "error":  # e.g. an engine without `check`: let the run decide
            return cls(ok=None, problem=str(reply.get("message", "")))
        entry = reply.get("entry")
        return cls(
            ok=bool(reply.get("ok")),
            problem=str(reply.get("problem") or ""),
            fix=str(reply.get("fix") or ""),
            field=reply.get("field") if isinstance(reply.get("field"), str) else None,
            value=reply.get("value"),
            entry=entry if isinstance(entry, int) else None,
        )

    @property
    def invalid(self) -> bool:
        return self.ok is False


def fix_action(field: str | None, value: Any, gpus: bool = False) -> str | None:
    """The one-click fix in the window's words ("Set Frames to 993"), or None when there is none."""
    if not field or value is None:
        return None
    return f"Set {field_label(field, gpus)} to {value_text(field, value)}"


def fix_words(fix: str, gpus: bool = False) -> str:
    """A command-line fix with its flags named as the window's controls ('--frames' -> 'Frames')."""

    def control(match: re.Match[str]) -> str:
        name = match.group(1).replace("-", "_")
        field = name if name in FIELD_LABELS else f"{OPTION_PREFIX}{name}"
        return f"'{field_label(field, gpus)}'"

    return re.sub(r"--([a-z][a-z0-9-]*)", control, fix)


def people_message(problem: str, fix: str, field: str | None, value: Any, gpus: bool = False) -> str:
    """One engine error for the window: the problem, then the fix in the window's words."""
    action = fix_action(field, value, gpus)
    wording = f"{action}." if action else fix_words(fix, gpus)
    return f"{problem} Fix: {wording}" if wording else problem


class Validation:
    """The latest answer about the request on screen, and who wants to know when it changes.

    `pending` is True from an edit until the engine's answer to it arrives.
    """

    def __init__(self) -> None:
        self.result = CheckResult()
        self.pending = False
        self._observers: list[Callable[[Validation], None]] = []

    def observe(self, callback: Callable[[Validation], None]) -> None:
        self._observers.append(callback)

    def set_pending(self) -> None:
        self.pending = True
        self._changed()

    def set_result(self, result: CheckResult) -> None:
        self.result, self.pending = result, False
        self._changed()

    @property
    def invalid(self) -> bool:
        return self.result.invalid

    def _changed(self) -> None:
        for callback in list(self._observers):
            callback(self)
