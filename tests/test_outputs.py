"""Saving clips: output paths, encoders (read back), sidecars, atomicity and error handling."""

from __future__ import annotations

import errno
import json
import os
import sys
from datetime import datetime
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
import soundfile as sf
from PIL import Image

from engine import outputs
from engine.errors import UserError
from engine.metrics import video_psnr
from engine.outputs import (
    build_metadata,
    default_output_dir,
    parse_ffmetadata,
    plan_output,
    read_request,
    sidecar_path,
    write_clip,
)
from engine.protocol import GenerationRequest

REQUEST = GenerationRequest(
    model="cogvideox-2b",
    prompt='A fox; "quoted" = #1 \\ café ☕\nsecond line',
    seed=42,
    steps=20,
    frames=5,
    strategy="parastep",
    strategy_options={"reuse": 2},
)


def metadata(**extra) -> dict:
    return build_metadata(
        REQUEST,
        timings={"total_s": 1.25, "denoise_s": 1.0},
        ranks=[{"rank": 0, "denoiser_calls": 10}, {"rank": 1, "denoiser_calls": 10}],
        extra=extra or None,
    )


def smooth_frames(count: int, height: int, width: int) -> np.ndarray:
    """Smooth, distinct frames (encode well, so decoded frames are close to these)."""
    f, y, x, c = np.meshgrid(
        np.arange(count), np.arange(height), np.arange(width), np.arange(3), indexing="ij"
    )
    values = 0.5 + 0.4 * np.sin(0.1 * x + 0.07 * y + 0.8 * f + 2.0 * c)
    return np.round(values * 255).astype(np.uint8)


def sine(seconds: float, rate: int, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    mono = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    return mono if channels == 1 else np.stack([mono] * channels, axis=1)


def listing(folder: Path) -> list[str]:
    """Everything in a folder, hidden files included."""
    return sorted(os.listdir(folder))


@pytest.fixture
def out(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "out"
    monkeypatch.setenv("PARASTEP_OUTPUT_DIR", str(folder))
    return folder


# ------------------------------------------------------------------------------- default_output_dir


def test_default_dir_env_override(monkeypatch, tmp_path):
    monkeypatch.setenv("PARASTEP_OUTPUT_DIR", str(tmp_path / "mine"))
    assert default_output_dir() == tmp_path / "mine"


def test_default_dir_from_xdg_user_dirs(monkeypatch, tmp_path):
    monkeypatch.delenv("PARASTEP_OUTPUT_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = tmp_path / "config"
    config.mkdir()
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config))
    (config / "user-dirs.dirs").write_text(
        '# written by xdg-user-dirs-update\nXDG_MUSIC_DIR="$HOME/Musik"\nXDG_VIDEOS_DIR="$HOME/Filme"\n'
    )
    assert default_output_dir() == tmp_path / "home" / "Filme" / "ParaStep Studio"
    (config / "user-dirs.dirs").write_text('XDG_VIDEOS_DIR="/srv/media/videos"\n')
    assert default_output_dir() == Path("/srv/media/videos/ParaStep Studio")


def test_default_dir_xdg_config_home_defaults_to_dot_config(monkeypatch, tmp_path):
    monkeypatch.delenv("PARASTEP_OUTPUT_DIR", raising=False)
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    home = tmp_path / "home"
    monkeypatch.setenv("HOME", str(home))
    assert default_output_dir() == home / "Videos" / "ParaStep Studio"  # no user-dirs.dirs
    (home / ".config").mkdir(parents=True)
    (home / ".config" / "user-dirs.dirs").write_text('XDG_VIDEOS_DIR="$HOME/Clips"\n')
    assert default_output_dir() == home / "Clips" / "ParaStep Studio"


# ------------------------------------------------------------------------------------- plan_output


def test_plan_default_folder_creates_only_the_folder(out):
    assert not out.exists()
    assert plan_output(None, "video", "fox") == out / "fox.mp4"
    assert plan_output(None, "audio", "fox") == out / "fox.wav"
    assert out.is_dir() and listing(out) == []


def test_plan_folder_with_trailing_slash_or_existing(tmp_path):
    new = tmp_path / "new" / "deeper"
    assert plan_output(str(new) + "/", "video", "a") == new / "a.mp4"
    assert new.is_dir() and listing(new) == []
    assert plan_output(str(tmp_path), "audio", "a") == tmp_path / "a.wav"
    assert plan_output(tmp_path, "audio", "a") == tmp_path / "a.wav"  # a Path works too


def test_plan_stem_is_made_safe(out):
    assert plan_output(None, "video", "../a/b\x00c") == out / "_a_b_c.mp4"
    assert plan_output(None, "video", "...") == out / "clip.mp4"


def test_plan_taken_names_get_a_suffix(out):
    out.mkdir()
    (out / "fox.mp4").write_bytes(b"x")
    assert plan_output(None, "video", "fox") == out / "fox-2.mp4"
    (out / "fox-2.json").write_text("{}")  # a taken sidecar name counts too (fox-2.gif's sidecar)
    assert plan_output(None, "video", "fox") == out / "fox-3.mp4"


@pytest.mark.parametrize(
    ("name", "modality"), [("c.mp4", "video"), ("c.GIF", "video"), ("c.wav", "audio"), ("c.flac", "audio")]
)
def test_plan_explicit_file(tmp_path, name, modality):
    target = tmp_path / "sub" / name
    assert plan_output(str(target), modality, "ignored") == target
    assert listing(tmp_path / "sub") == []


@pytest.mark.parametrize(
    ("name", "modality", "allowed"),
    [("c.wav", "video", ".mp4 or .gif"), ("c", "video", ".mp4 or .gif"), ("c.mp4", "audio", ".wav or .flac")],
)
def test_plan_wrong_extension(tmp_path, name, modality, allowed):
    with pytest.raises(UserError) as info:
        plan_output(str(tmp_path / name), modality, "x")
    assert allowed in info.value.problem and allowed in info.value.fix


def test_plan_explicit_existing_file_or_sidecar(tmp_path):
    (tmp_path / "c.mp4").write_bytes(b"old")
    with pytest.raises(UserError, match="exists") as info:
        plan_output(str(tmp_path / "c.mp4"), "video", "x")
    assert "remove it" in info.value.fix
    (tmp_path / "d.json").write_text("{}")
    with pytest.raises(UserError, match=r"d\.json exists"):
        plan_output(str(tmp_path / "d.gif"), "video", "x")
    assert (tmp_path / "c.mp4").read_bytes() == b"old"


def test_plan_folder_under_a_file(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    folder = tmp_path / "file.txt" / "sub"
    with pytest.raises(UserError) as info:
        plan_output(str(folder) + "/", "video", "x")
    assert str(folder) in info.value.problem and info.value.fix
    with pytest.raises(UserError):
        plan_output(str(tmp_path / "file.txt" / "c.mp4"), "video", "x")
    assert listing(tmp_path) == ["file.txt"]


def test_plan_unwritable_folder(tmp_path, monkeypatch):
    # Tests may run as root, for whom permissions do not apply: simulate both checks.
    monkeypatch.setattr(outputs.os, "access", lambda *a, **k: False)
    with pytest.raises(UserError, match="not writable") as info:
        plan_output(str(tmp_path), "video", "x")
    assert str(tmp_path) in info.value.problem and "writable" in info.value.fix
    monkeypatch.undo()

    real_open = os.open

    def refuse(path, flags, *args):
        if ".parastep-write-test-" in str(path):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(outputs.os, "open", refuse)
    with pytest.raises(UserError, match="Cannot write") as info:
        plan_output(str(tmp_path), "audio", "x")
    assert str(tmp_path) in info.value.problem
    assert listing(tmp_path) == []


def test_plan_bad_modality(tmp_path):
    with pytest.raises(ValueError):
        plan_output(str(tmp_path), "image", "x")


# -------------------------------------------------------------------------------------- write_clip


def test_mp4_round_trip_odd_size_and_embedded_metadata(tmp_path):
    frames = smooth_frames(5, 33, 47)
    path = write_clip(tmp_path / "clip.mp4", frames=frames, fps=12, metadata=metadata())
    assert path == tmp_path / "clip.mp4"
    assert listing(tmp_path) == ["clip.json", "clip.mp4"]

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    decoded = [np.frombuffer(buf, np.uint8).reshape(34, 48, 3) for buf in reader]
    assert meta["codec"] == "h264" and meta["pix_fmt"].startswith("yuv420p")
    assert meta["size"] == (48, 34)  # padded to even, not scaled
    assert meta["fps"] == pytest.approx(12)
    assert len(decoded) == 5
    decoded = np.stack(decoded)
    # Same picture at the same place (a shift by one pixel scores below 20 dB), last row and
    # column repeated into the padding.
    assert video_psnr(decoded[:, :33, :47], frames) > 33
    assert video_psnr(decoded[:, 33:, :47], frames[:, 32:]) > 30
    assert video_psnr(decoded[:, :33, 47:], frames[:, :, 46:]) > 30

    sidecar = json.loads((tmp_path / "clip.json").read_text())
    assert sidecar["format"] == "parastep-studio/clip" and sidecar["request"]["seed"] == 42
    embedded = json.loads(outputs._ffmetadata(path)["comment"])
    assert embedded == sidecar
    (tmp_path / "clip.json").unlink()
    assert read_request(path) == REQUEST  # from the MP4 alone


def test_mp4_even_size_is_kept(tmp_path):
    path = write_clip(tmp_path / "c.mp4", frames=smooth_frames(3, 64, 96), fps=24, metadata=metadata())
    meta = next(imageio_ffmpeg.read_frames(str(path)))
    assert meta["size"] == (96, 64)
    assert meta["duration"] == pytest.approx(3 / 24, abs=0.02)


def test_gif_round_trip(tmp_path):
    frames = smooth_frames(6, 20, 30)
    path = write_clip(tmp_path / "clip.gif", frames=frames, fps=8, metadata=metadata())
    with Image.open(path) as im:
        assert im.size == (30, 20)
        assert im.n_frames == 6
        assert im.info["loop"] == 0
        assert json.loads(im.info["comment"])["request"]["prompt"] == REQUEST.prompt
        durations = []
        for i in range(im.n_frames):
            im.seek(i)
            durations.append(im.info["duration"])
    assert sum(durations) == pytest.approx(6 / 8 * 1000, abs=10)
    assert set(durations) <= {120, 130}  # 125 ms per frame in centiseconds
    (tmp_path / "clip.json").unlink()
    assert read_request(path) == REQUEST


def test_gif_durations_track_fps():
    assert outputs._gif_durations_ms(3, 10) == [100, 100, 100]
    assert sum(outputs._gif_durations_ms(24, 24)) == 1000
    assert min(outputs._gif_durations_ms(10, 100)) == 20  # GIF players cannot go faster


@pytest.mark.parametrize("channels", [1, 2])
def test_wav_round_trip(tmp_path, channels):
    audio = sine(0.5, 16000, channels)
    path = write_clip(tmp_path / "a.wav", audio=audio, sample_rate=16000, metadata=metadata())
    info = sf.info(str(path))
    assert (info.samplerate, info.frames, info.channels) == (16000, 8000, channels)
    assert info.duration == pytest.approx(0.5)
    assert info.subtype == "PCM_16"
    data, _ = sf.read(str(path), dtype="float32", always_2d=False)
    assert np.abs(data - audio).max() <= 1 / 32768 + 1e-7
    assert json.loads((tmp_path / "a.json").read_text())["ranks"][1]["rank"] == 1


def test_wav_clips_and_zeroes_nan(tmp_path):
    audio = np.array([2.0, -3.0, np.nan, 0.25], np.float32)
    path = write_clip(tmp_path / "a.wav", audio=audio, sample_rate=8000, metadata=metadata())
    data, _ = sf.read(str(path), dtype="float32")
    assert data[0] == pytest.approx(1.0, abs=1e-4) and data[1] == -1.0 and data[2] == 0.0


def test_flac_round_trip_and_embedded_metadata(tmp_path):
    audio = sine(1.0, 22050)
    big = {"notes": "x" * 5000}  # too long for a WAV comment; FLAC takes it
    path = write_clip(tmp_path / "a.flac", audio=audio, sample_rate=22050, metadata=metadata(**big))
    info = sf.info(str(path))
    assert (info.format, info.subtype, info.samplerate, info.frames) == ("FLAC", "PCM_16", 22050, 22050)
    assert info.duration == pytest.approx(1.0)
    with sf.SoundFile(str(path)) as f:
        assert json.loads(f.comment)["notes"] == big["notes"]
    (tmp_path / "a.json").unlink()
    assert read_request(path) == REQUEST


def test_wav_embeds_only_what_fits(tmp_path):
    path = write_clip(tmp_path / "a.wav", audio=sine(0.1, 8000), sample_rate=8000, metadata=metadata())
    (tmp_path / "a.json").unlink()
    assert read_request(path) == REQUEST  # fits in the ~2 KiB libsndfile keeps
    path = write_clip(
        tmp_path / "b.wav", audio=sine(0.1, 8000), sample_rate=8000, metadata=metadata(notes="x" * 5000)
    )
    (tmp_path / "b.json").unlink()
    assert read_request(path) == REQUEST  # the essentials were embedded instead


def test_sidecar_is_strict_json_with_inf(tmp_path):
    md = metadata(fidelity={"psnr_db": float("inf"), "ssim": 1.0}, weights=np.float32(0.5))
    write_clip(tmp_path / "c.wav", audio=sine(0.1, 8000), sample_rate=8000, metadata=md)
    text = (tmp_path / "c.json").read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert data["fidelity"] == {"psnr_db": "inf", "ssim": 1.0}
    assert data["weights"] == 0.5


def test_never_overwrites(tmp_path, out):
    first = write_clip(
        plan_output(None, "video", "fox"), frames=smooth_frames(2, 16, 16), fps=8, metadata=metadata()
    )
    second = write_clip(
        plan_output(None, "video", "fox"), frames=smooth_frames(2, 16, 16), fps=8, metadata=metadata()
    )
    assert (first.name, second.name) == ("fox.mp4", "fox-2.mp4")
    before = first.read_bytes()
    with pytest.raises(UserError, match="exists"):
        write_clip(first, frames=smooth_frames(2, 16, 16), fps=8, metadata=metadata())
    assert first.read_bytes() == before
    assert listing(out) == ["fox-2.json", "fox-2.mp4", "fox.json", "fox.mp4"]


def test_name_taken_while_writing_is_not_overwritten(tmp_path, monkeypatch):
    real = outputs._write_audio

    def racing_writer(tmp, *args):
        real(tmp, *args)
        (tmp_path / "a.wav").write_bytes(b"someone else's")

    monkeypatch.setattr(outputs, "_write_audio", racing_writer)
    with pytest.raises(UserError, match="not overwritten"):
        write_clip(tmp_path / "a.wav", audio=sine(0.1, 8000), sample_rate=8000, metadata=metadata())
    assert (tmp_path / "a.wav").read_bytes() == b"someone else's"
    assert listing(tmp_path) == ["a.wav"]


def test_disk_full_leaves_no_files(tmp_path, monkeypatch):
    def full(tmp, *args):
        Path(tmp).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs, "_write_audio", full)
    with pytest.raises(UserError) as info:
        write_clip(tmp_path / "a.flac", audio=sine(0.1, 8000), sample_rate=8000, metadata=metadata())
    assert str(tmp_path) in info.value.problem and "full" in info.value.problem
    assert "space" in info.value.fix
    assert listing(tmp_path) == []


def test_ffmpeg_disk_full_message_is_a_user_error(tmp_path, monkeypatch):
    def full(tmp, *args):
        raise OSError("ffmpeg: av_interleaved_write_frame(): No space left on device")

    monkeypatch.setattr(outputs, "_write_mp4", full)
    with pytest.raises(UserError, match="full"):
        write_clip(tmp_path / "c.mp4", frames=smooth_frames(2, 16, 16), fps=8, metadata=metadata())
    assert listing(tmp_path) == []


def test_sidecar_failure_removes_the_clip(tmp_path, monkeypatch):
    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs, "_write_text", full)
    with pytest.raises(UserError, match="full"):
        write_clip(tmp_path / "c.gif", frames=smooth_frames(2, 16, 16), fps=8, metadata=metadata())
    assert listing(tmp_path) == []

    monkeypatch.undo()
    real_publish = outputs._publish

    def fail_sidecar(tmp, final):
        if final.suffix == ".json":
            raise PermissionError(errno.EACCES, "Permission denied")
        real_publish(tmp, final)

    monkeypatch.setattr(outputs, "_publish", fail_sidecar)
    with pytest.raises(UserError, match="Cannot write") as info:
        write_clip(tmp_path / "c.gif", frames=smooth_frames(2, 16, 16), fps=8, metadata=metadata())
    assert str(tmp_path) in info.value.problem
    assert listing(tmp_path) == []


def test_publish_without_hard_links(tmp_path, monkeypatch):
    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(outputs.os, "link", no_links)
    path = write_clip(tmp_path / "a.wav", audio=sine(0.1, 8000), sample_rate=8000, metadata=metadata())
    assert listing(tmp_path) == ["a.json", "a.wav"]
    assert sf.info(str(path)).frames == 800
    with pytest.raises(UserError, match="exists"):
        write_clip(path, audio=sine(0.1, 8000), sample_rate=8000, metadata=metadata())


def test_write_into_unwritable_folder(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserError) as info:
        write_clip(
            tmp_path / "file.txt" / "sub" / "a.wav",
            audio=sine(0.1, 8000),
            sample_rate=8000,
            metadata=metadata(),
        )
    assert "file.txt" in info.value.problem
    assert listing(tmp_path) == ["file.txt"]


def test_bad_arrays_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        write_clip(tmp_path / "c.mp4", frames=np.zeros((2, 8, 8, 3), np.float32), fps=8, metadata={})
    with pytest.raises(ValueError, match="fps"):
        write_clip(tmp_path / "c.mp4", frames=np.zeros((2, 8, 8, 3), np.uint8), fps=0, metadata={})
    with pytest.raises(ValueError):
        write_clip(tmp_path / "c.wav", frames=np.zeros((2, 8, 8, 3), np.uint8), fps=8, metadata={})
    with pytest.raises(ValueError):
        write_clip(tmp_path / "c.ogg", audio=sine(0.1, 8000), sample_rate=8000, metadata={})
    assert listing(tmp_path) == []


# ------------------------------------------------------------------------------- metadata, reading


def test_build_metadata():
    md = metadata(fidelity={"psnr_db": 40.0})
    assert md["format"] == "parastep-studio/clip" and md["format_version"] == 1
    assert md["request"] == REQUEST.to_dict()
    assert md["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert set(md["versions"]) == {"python", "torch", "diffusers", "transformers", "parastep-studio"}
    assert all(isinstance(v, str) and v for v in md["versions"].values())
    assert md["timings"]["total_s"] == 1.25 and md["ranks"][0]["rank"] == 0
    created = datetime.fromisoformat(md["created"])
    assert created.utcoffset().total_seconds() == 0
    assert md["fidelity"] == {"psnr_db": 40.0}
    with pytest.raises(ValueError, match="request"):
        build_metadata(REQUEST, timings={}, ranks=[], extra={"request": {}})


def write_sidecar(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_read_request_from_sidecar(tmp_path):
    path = write_sidecar(tmp_path / "s.json", metadata())
    assert read_request(path) == REQUEST
    assert read_request(str(path)) == REQUEST


def test_read_request_prefers_the_sidecar_next_to_a_clip(tmp_path):
    path = write_clip(tmp_path / "a.flac", audio=sine(0.1, 8000), sample_rate=8000, metadata=metadata())
    other = dict(metadata(), request={**REQUEST.to_dict(), "seed": 7})
    write_sidecar(sidecar_path(path), other)
    assert read_request(path).seed == 7
    write_sidecar(sidecar_path(path), {"unrelated": True})
    assert read_request(path) == REQUEST  # not a ParaStep sidecar: the embedded copy is used


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "not a ParaStep Studio clip sidecar"),
        ('{"format": "something-else"}', "not a ParaStep Studio clip sidecar"),
        ('{"format": "parastep-studio/clip", "format_version": "1"}', "invalid format_version"),
        ('{"format": "parastep-studio/clip", "format_version": 1}', "no request"),
    ],
)
def test_read_request_rejects_bad_sidecars(tmp_path, content, message):
    (tmp_path / "s.json").write_text(content)
    with pytest.raises(UserError, match=message):
        read_request(tmp_path / "s.json")


def test_read_request_binary_file(tmp_path):
    (tmp_path / "s.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(UserError, match="not a JSON file"):
        read_request(tmp_path / "s.json")


def test_read_request_newer_version(tmp_path):
    path = write_sidecar(tmp_path / "s.json", {**metadata(), "format_version": 2})
    with pytest.raises(UserError, match="newer") as info:
        read_request(path)
    assert "Update" in info.value.fix
    newer_request = {**metadata(), "request": {**REQUEST.to_dict(), "version": 99}}
    with pytest.raises(UserError, match="newer"):
        read_request(write_sidecar(tmp_path / "t.json", newer_request))


def test_read_request_invalid_fields(tmp_path):
    bad = {**metadata(), "request": {**REQUEST.to_dict(), "seed": "forty-two"}}
    with pytest.raises(UserError, match="seed") as info:
        read_request(write_sidecar(tmp_path / "s.json", bad))
    assert "s.json" in info.value.problem
    unknown = {**metadata(), "request": {**REQUEST.to_dict(), "colour": "red"}}
    with pytest.raises(UserError, match="colour"):
        read_request(write_sidecar(tmp_path / "t.json", unknown))


def test_read_request_missing_and_foreign_files(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read_request(tmp_path / "nope.mp4")
    with pytest.raises(UserError, match="is a folder"):
        read_request(tmp_path)
    sf.write(str(tmp_path / "plain.wav"), sine(0.1, 8000), 8000)
    with pytest.raises(UserError, match="no ParaStep Studio metadata") as info:
        read_request(tmp_path / "plain.wav")
    assert "plain.json" in info.value.problem
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match="not a clip or sidecar"):
        read_request(tmp_path / "notes.txt")
    (tmp_path / "broken.mp4").write_bytes(b"not a video")
    with pytest.raises(UserError, match="no ParaStep Studio metadata"):
        read_request(tmp_path / "broken.mp4")


def test_parse_ffmetadata_escapes_and_sections():
    text = (
        ";FFMETADATA1\n"
        "major_brand=isom\n"
        "comment=a\\=b\\;c\\#d\\\\e\\\nnext line\n"
        "\n"
        "[STREAM]\n"
        "comment=stream level\n"
    )
    assert parse_ffmetadata(text) == {"major_brand": "isom", "comment": "a=b;c#d\\e\nnext line"}


def test_export_changes_format_and_keeps_the_request(tmp_path):
    import imageio.v3 as iio
    import soundfile

    from engine.outputs import build_metadata, export_clip, read_request, write_clip
    from engine.protocol import GenerationRequest

    video_request = GenerationRequest(model="tiny-cogvideox", prompt="export me", fps=8, frames=5)
    frames = (np.random.default_rng(1).random((5, 32, 48, 3)) * 255).astype(np.uint8)
    mp4 = write_clip(
        tmp_path / "a.mp4", frames=frames, fps=8, metadata=build_metadata(video_request, timings={}, ranks=[])
    )
    gif = export_clip(mp4, tmp_path / "out" / "a.gif")
    assert gif.suffix == ".gif" and iio.imread(gif, index=None).shape[1:3] == (32, 48)
    assert read_request(gif) == video_request
    audio_request = GenerationRequest(model="tiny-audioldm2", prompt="a tone", seconds=0.5)
    tone = np.sin(np.linspace(0, 440 * 2 * np.pi * 0.5, 8000)).astype(np.float32) * 0.5
    wav = write_clip(
        tmp_path / "t.wav",
        audio=tone,
        sample_rate=16000,
        metadata=build_metadata(audio_request, timings={}, ranks=[]),
    )
    flac = export_clip(wav, tmp_path / "t2.flac")  # t.flac would share t.json with t.wav
    assert soundfile.info(str(flac)).frames == 8000 and read_request(flac) == audio_request
    with pytest.raises(UserError):
        export_clip(wav, tmp_path / "t2.flac")  # never over an existing file
