"""No lost work: latents kept before the decode, decode fallbacks, `parastep-studio decode`."""

from __future__ import annotations

import pytest

from app.cli import main
from engine.engine import Engine
from engine.errors import UserError
from engine.pending_decode import INJECT_OOM_ENV, pending_dir
from engine.protocol import GenerationRequest, LogEvent

REQUEST = dict(model="tiny-cogvideox", prompt="a red circle", frames=9, height=64, width=96, steps=3)


def test_decode_out_of_memory_is_retried_with_tiling(monkeypatch, _output_dir):
    monkeypatch.setenv(INJECT_OOM_ENV, "1")  # the first decode attempt fails
    events = []
    with Engine() as engine:
        summary = engine.generate(GenerationRequest(**REQUEST), events.append)
    assert any(isinstance(e, LogEvent) and "tiling" in e.message for e in events)
    assert (_output_dir / summary["output"].rsplit("/", 1)[1]).is_file()
    assert not list(pending_dir().glob("*.safetensors"))  # deleted once the clip was saved


def test_failed_decode_keeps_latents_and_decode_command_finishes(monkeypatch, capsys, _output_dir):
    monkeypatch.setenv(INJECT_OOM_ENV, "3")  # as configured, tiled and on the CPU: all fail
    with Engine() as engine, pytest.raises(UserError) as info:
        engine.generate(GenerationRequest(**REQUEST))
    kept = list(pending_dir().glob("*.safetensors"))
    assert len(kept) == 1 and str(kept[0]) in str(info.value) and "parastep-studio decode" in str(info.value)
    assert not _output_dir.exists() or not list(_output_dir.iterdir())  # no partial clip
    monkeypatch.delenv(INJECT_OOM_ENV)
    assert main(["decode", str(kept[0]), "--json"]) == 0
    assert ".mp4" in capsys.readouterr().out and list(_output_dir.glob("*.mp4"))
    assert not kept[0].exists()


def test_unwritable_output_at_save_time_keeps_latents(tmp_path, _output_dir):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    with Engine() as engine:
        result = engine.run(engine.plan(GenerationRequest(**REQUEST)), previews=False)
        with pytest.raises(UserError, match="parastep-studio decode"):
            engine.save(result, blocker / "clip.mp4")
        assert result.pending is not None and result.pending.is_file()
        summary = engine.finish_pending(result.pending, output=str(tmp_path / "good") + "/")
    assert summary["output"].startswith(str(tmp_path / "good")) and not result.pending.exists()
