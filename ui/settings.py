"""What the window remembers between runs (QSettings): the last request, seed mode, model folders,
favourites, notifications (on) and their sound (off), and the window's layout.

On Linux QSettings writes `$XDG_CONFIG_HOME/parastep-studio/parastep-studio.conf`. Structured
values are stored as JSON text, so that they read back the same on every platform's backend.
"""

from __future__ import annotations

import json
from typing import Any

from PySide6.QtCore import QByteArray, QSettings

from engine.errors import UserError
from engine.protocol import GenerationRequest

ORGANIZATION = "parastep-studio"
APPLICATION = "parastep-studio"


class StudioSettings:
    def __init__(self, settings: QSettings | None = None) -> None:
        self.qsettings = settings or QSettings(ORGANIZATION, APPLICATION)

    def _json(self, key: str, default: Any) -> Any:
        text = self.qsettings.value(key, "")
        if not isinstance(text, str) or not text:
            return default
        try:
            return json.loads(text)
        except ValueError:
            return default

    def _set_json(self, key: str, value: Any) -> None:
        self.qsettings.setValue(key, json.dumps(value))

    # ---- the request panel --------------------------------------------------------------------
    def last_request(self) -> GenerationRequest | None:
        data = self._json("request/last", None)
        if data is None:
            return None
        try:
            return GenerationRequest.from_dict(data)
        except UserError:
            return None  # written by another version: start from the defaults

    def set_last_request(self, request: GenerationRequest) -> None:
        self._set_json("request/last", request.to_dict())

    def seed_mode(self) -> str:
        # Random by default: Generate twice should give two clips (the seed is shown and kept).
        return str(self.qsettings.value("request/seed_mode", "random"))

    def set_seed_mode(self, mode: str) -> None:
        self.qsettings.setValue("request/seed_mode", mode)

    def output_folder(self) -> str | None:
        """The folder the user chose for clips; None: the engine's default (XDG videos folder)."""
        value = self.qsettings.value("output/folder", "")
        return str(value) if value else None

    def set_output_folder(self, folder: str) -> None:
        self.qsettings.setValue("output/folder", folder)

    # ---- lists --------------------------------------------------------------------------------
    def model_folders(self) -> list[str]:
        return [str(f) for f in self._json("models/folders", [])]

    def set_model_folders(self, folders: list[str]) -> None:
        self._set_json("models/folders", list(dict.fromkeys(folders)))

    def favourites(self) -> list[str]:
        return [str(f) for f in self._json("history/favourites", [])]

    def set_favourites(self, keys: list[str]) -> None:
        self._set_json("history/favourites", sorted(set(keys)))

    def compare_entries(self) -> list[list[str]]:
        return [list(map(str, e)) for e in self._json("compare/entries", []) if len(e) == 2]

    def set_compare_entries(self, entries: list[list[str]]) -> None:
        self._set_json("compare/entries", entries)

    # ---- notifications ------------------------------------------------------------------------
    def notify_when_done(self) -> bool:
        return bool(self.qsettings.value("notify/enabled", True, type=bool))

    def set_notify_when_done(self, on: bool) -> None:
        self.qsettings.setValue("notify/enabled", bool(on))

    def notify_sound(self) -> bool:
        return bool(self.qsettings.value("notify/sound", False, type=bool))

    def set_notify_sound(self, on: bool) -> None:
        self.qsettings.setValue("notify/sound", bool(on))

    # ---- window -------------------------------------------------------------------------------
    def window_state(self) -> tuple[QByteArray | None, QByteArray | None]:
        geometry = self.qsettings.value("window/geometry")
        state = self.qsettings.value("window/state")
        return (
            geometry if isinstance(geometry, QByteArray) else None,
            state if isinstance(state, QByteArray) else None,
        )

    def set_window_state(self, geometry: QByteArray, state: QByteArray) -> None:
        self.qsettings.setValue("window/geometry", geometry)
        self.qsettings.setValue("window/state", state)

    def sync(self) -> None:
        self.qsettings.sync()
