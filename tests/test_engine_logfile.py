"""Library warnings go to the engine's log file, not to stderr (which the window shows)."""

from __future__ import annotations

import warnings

from engine.logfile import LOG_FILE_ENV, route_warnings


def test_warnings_are_written_to_the_log_file(tmp_path, monkeypatch, capsys):
    log = tmp_path / "state" / "engine.log"
    monkeypatch.setenv(LOG_FILE_ENV, str(log))
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # restored after the test
    route_warnings()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("`upcast_vae` is deprecated", FutureWarning, stacklevel=1)
    assert "FutureWarning: `upcast_vae` is deprecated" in log.read_text()
    assert "upcast_vae" not in capsys.readouterr().err
