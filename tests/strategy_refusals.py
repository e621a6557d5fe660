"""Which strategies a model family refuses at plan time, and why: shared by the family test modules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from engine.errors import UserError
from engine.strategies import STRATEGIES


def plan_refusals(
    plan: Callable[[str, str, dict[str, Any]], Any], tried: set[str], warmup: int
) -> dict[str, str]:
    """Plans every registered strategy not in `tried` on the devices it needs (with a warm-up where it
    takes one) through `plan(strategy, devices, options)`; returns the refused ones with their errors."""
    refused = {}
    for name, cls in STRATEGIES.items():
        if name in tried:
            continue
        devices = f"cpu:{max(2, cls.min_devices)}" if cls.min_devices > 1 or cls.max_devices != 1 else "cpu:1"
        options = {"warmup": warmup} if any(o.name == "warmup" for o in cls.options) else {}
        try:
            plan(name, devices, options)
        except UserError as error:
            refused[name] = str(error)
    return refused
