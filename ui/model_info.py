"""What the window needs to know about a catalog entry: its modality, its inputs, its defaults.

The catalog (docs/protocol.md, `catalog` reply) describes models as the engine sees them; this
module turns one entry into answers for the request panel. The engine reports each model's family
facts (modality, conditioning, published steps and warm-up) from the family's adapter; the figures
below only stand in where an entry does not carry them (an older engine).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from math import ceil
from typing import Any

# family -> (modality, conditioning, published steps, published warm-up)
FAMILIES: dict[str, tuple[str, str, int, int]] = {
    "cogvideox": ("video", "text", 50, 13),
    "svd": ("video", "image", 50, 5),
    "audioldm2": ("audio", "text", 200, 5),
    "generic": ("video", "text", 50, 5),
}
VIDEO_FIELDS = ("frames", "height", "width", "fps")
AUDIO_FIELDS = ("seconds",)


@dataclass
class ModelInfo:
    name: str
    family: str = "generic"
    source: str = "local"
    path: str = ""
    description: str = ""
    defaults: dict[str, Any] = field(default_factory=dict)
    modality: str = "video"  # video | audio
    conditioning: str = "text"  # text | image
    published_steps: int = 50
    published_warmup: int = 5
    known: bool = True  # False: a model named by a restored request but absent from the catalog
    random_weights: bool = False  # the catalog says so: untrained, it outputs noise

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> ModelInfo:
        family = str(entry.get("family") or "generic")
        modality, conditioning, steps, warmup = FAMILIES.get(family, FAMILIES["generic"])
        return cls(
            name=str(entry.get("name", "")),
            family=family,
            source=str(entry.get("source", "local")),
            path=str(entry.get("path", "")),
            description=str(entry.get("description", "")),
            defaults=dict(entry.get("defaults") or {}),
            modality=str(entry.get("modality") or modality),
            conditioning=str(entry.get("conditioning") or conditioning),
            published_steps=int(entry.get("published_steps") or steps),
            published_warmup=int(entry.get("published_warmup") or warmup),
            random_weights=entry.get("random_weights") is True,
        )

    @classmethod
    def unknown(cls, name: str) -> ModelInfo:
        """A model the catalog does not list: show every field, let the engine decide."""
        return cls(name=name, known=False)

    def shows(self, field_name: str) -> bool:
        """Whether the request panel shows this field for the model."""
        if not self.known:
            return True
        if field_name == "image":
            return self.conditioning == "image"
        if field_name in ("prompt", "negative_prompt"):
            return self.conditioning == "text"
        if field_name in VIDEO_FIELDS:
            return self.modality == "video"
        if field_name in AUDIO_FIELDS:
            return self.modality == "audio"
        return True

    def default_warmup(self, steps: int) -> int:
        """The published warm-up, scaled down for fewer steps (as the engine does)."""
        if steps >= self.published_steps:
            return self.published_warmup
        return max(1, round(self.published_warmup * steps / self.published_steps))


def ideal_speedup(total_steps: int, warmup: int, width: int) -> float:
    """Loop speedup if only the exact-step calls cost time: T / (W + ceil((T - W) / N))."""
    if total_steps <= 0 or width <= 1:
        return 1.0
    warmup = min(max(warmup, 0), total_steps)
    return total_steps / (warmup + ceil((total_steps - warmup) / width))


# The built-in strategies as the engine describes them, for a window that has no catalog yet.
BUILTIN_STRATEGIES: dict[str, dict[str, Any]] = {
    "sequential": {"max_devices": 1, "ideal": {"width_from": "", "rounds": False}},
    "parastep": {"max_devices": None, "ideal": {"width_from": "ranks", "rounds": True}},
    "batchstep": {
        "max_devices": 1,
        "options": [{"name": "lookahead", "default": 2}],
        "ideal": {"width_from": "lookahead", "rounds": True},
    },
}


def strategy_width(strategy: dict[str, Any], options: dict[str, Any], ranks: int) -> int:
    """The parallel width of a strategy as the engine describes it (its `ideal` entry)."""
    ideal = strategy.get("ideal") or {}
    source = ideal.get("width_from", "")
    if source == "ranks":
        stride = _option_value(strategy, options, ideal["stride_from"]) if ideal.get("stride_from") else 1
        return max(1, (ranks // max(1, int(ideal.get("ranks_per_width", 1))) - stride + 1) * stride)
    if source:
        return _option_value(strategy, options, source)
    return 1


def _option_value(strategy: dict[str, Any], options: dict[str, Any], name: str) -> int:
    """An integer option as chosen, else its default (1 when it has none)."""
    value = options.get(name)
    if not isinstance(value, int):
        value = next((o.get("default") for o in strategy.get("options", []) if o.get("name") == name), 1)
    return int(value or 1)


def strategy_ideal_speedup(
    strategy: dict[str, Any], steps: int, warmup: int, options: dict[str, Any], ranks: int
) -> float:
    """factor * T / (W + ceil((T - W) / width)), as the engine's Strategy.ideal_speedup."""
    ideal = strategy.get("ideal") or {}
    width = strategy_width(strategy, options, ranks)
    has_warmup = any(o.get("name") == "warmup" for o in strategy.get("options", []))
    serial_warmup = warmup if has_warmup and not ideal.get("warmup_parallel") else 0
    return int(ideal.get("factor", 1)) * ideal_speedup(steps, serial_warmup, width)
