"""Saving clips: where they go, how they are encoded, and the JSON sidecar that can reproduce them.

Every clip `NAME.EXT` gets a sidecar `NAME.json` (see `build_metadata`) holding the request and the
run's versions, timings and per-rank counters; the same JSON is embedded in the clip where the format
allows it (MP4 `comment` tag, FLAC Vorbis comment, GIF comment extension, WAV `ICMT` when short
enough), so `read_request` can also rebuild the request from a clip whose sidecar was lost.

Files are never overwritten and never left half-written: each file is written into a hidden
temporary file in the destination folder and then linked to its final name, which fails if that
name exists. Errors a user can act on (disk full, folder not writable, name taken) are `UserError`s.

Importing this module does not import torch (the window process uses `read_request`).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import platform
import re
import secrets
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from fractions import Fraction
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import UserError
from engine.metrics import json_safe
from engine.output_policy import expand_user
from engine.protocol import GenerationRequest

CLIP_FORMAT = "parastep-studio/clip"
CLIP_FORMAT_VERSION = 1

APP_FOLDER_NAME = "ParaStep Studio"
OUTPUT_DIR_ENV = "PARASTEP_OUTPUT_DIR"

# File extensions per modality; the first one is the default inside a folder.
EXTENSIONS: dict[str, tuple[str, ...]] = {"video": ("mp4", "gif"), "audio": ("wav", "flac")}

# H.264 quality: CRF 18 is visually lossless for generated content at a modest size.
MP4_CRF = 18
# libsndfile silently drops WAV INFO strings longer than about 2 KiB.
_WAV_COMMENT_MAX = 2000
# Bound on the JSON put on ffmpeg's command line (argument length limits, notably on Windows).
_MP4_COMMENT_MAX = 24_000
_FFMPEG_TIMEOUT_S = 600
_RESERVED_KEYS = ("format", "format_version", "request", "versions", "timings", "ranks", "created")


# --------------------------------------------------------------------------------------------- paths


def default_output_dir() -> Path:
    """The folder clips go to when the user names none (not created here).

    `$PARASTEP_OUTPUT_DIR` if set; otherwise `<videos folder>/ParaStep Studio`, where the videos
    folder is XDG_VIDEOS_DIR from `$XDG_CONFIG_HOME/user-dirs.dirs` (default
    `~/.config/user-dirs.dirs`) when that file sets it, else `~/Videos`.
    """
    override = os.environ.get(OUTPUT_DIR_ENV, "").strip()
    if override:
        return Path(override).expanduser().absolute()
    videos = _xdg_videos_dir() or Path.home() / "Videos"
    return videos / APP_FOLDER_NAME


def _xdg_videos_dir() -> Path | None:
    config_home = os.environ.get("XDG_CONFIG_HOME", "")
    # The XDG spec says relative values are invalid and must be ignored.
    config = Path(config_home) if os.path.isabs(config_home) else Path.home() / ".config"
    try:
        text = (config / "user-dirs.dirs").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    found: Path | None = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or key.strip() != "XDG_VIDEOS_DIR":
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        value = value.replace('\\"', '"')
        for home_var in ("${HOME}", "$HOME"):
            if value == home_var or value.startswith(home_var + "/"):
                found = Path.home() / value[len(home_var) :].lstrip("/")
                break
        else:
            if os.path.isabs(value):
                found = Path(value)
        # Like the shell sourcing the file, the last valid assignment wins.
    return found


def plan_output(output: str | os.PathLike[str] | None, modality: str, stem: str) -> Path:
    """Decide where a clip goes, creating only its folder (nothing else).

    - `None` or "": the default folder (`default_output_dir()`).
    - an existing folder, or a path ending in "/": that folder.
    - otherwise a file path whose extension picks the format: .mp4/.gif for video, .wav/.flac for
      audio. It must not exist, and neither may its sidecar (`<name>.json`).

    Inside a folder the clip is `{stem}.mp4` (video) or `{stem}.wav` (audio), or `{stem}-2.…`,
    `{stem}-3.…` when the clip or its sidecar name is taken. `stem` is made safe for a file name
    (path separators and control characters replaced, leading dots removed, at most 100 characters).

    Raises UserError for a wrong or missing extension, an existing file, or a folder that cannot
    be created or written to.
    """
    if modality not in EXTENSIONS:
        raise ValueError(f"modality must be 'video' or 'audio', not {modality!r}")
    allowed = EXTENSIONS[modality]

    if output is not None:
        output = os.fspath(output)
    if output is None or not output.strip():
        return _free_name(_ensure_writable_folder(default_output_dir()), _safe_stem(stem), allowed[0])

    target = expand_user(output).absolute()
    _check_lengths(target)  # before any stat: a name over the limit raises ENAMETOOLONG there
    separators = tuple(s for s in (os.sep, os.altsep) if s)
    if output.endswith(separators) or target.is_dir():
        return _free_name(_ensure_writable_folder(target), _safe_stem(stem), allowed[0])

    ext = target.suffix.lower().lstrip(".")
    if ext not in allowed:
        names = " or ".join("." + e for e in allowed)
        problem = (
            f"The output file {target} has no extension"
            if not ext
            else f"The output file {target} ends in .{ext}, which is not a {modality} format"
        )
        raise UserError(
            f"{problem}; {modality} clips are saved as {names}.",
            f"End the file name in {names}, or give a folder (ending in '/').",
        )
    _check_free(target, sidecar_path(target))
    _ensure_writable_folder(target.parent)
    return target


NAME_MAX = 255  # bytes in one file name on ext4, btrfs, xfs, APFS
PATH_MAX = 4096


def _check_lengths(target: Path) -> None:
    """Refuses a path the file system cannot hold, counting the sidecar's longer `.json` name."""
    longest = max(target.parts[1:], key=lambda name: len(os.fsencode(name)), default="")
    if len(os.fsencode(longest)) <= NAME_MAX:  # the sidecar's name may be the one too long
        longest = sidecar_path(target).name
    if len(os.fsencode(longest)) > NAME_MAX:
        raise UserError(
            f"The output name '{longest[:40]}...' is {len(os.fsencode(longest))} bytes long; file names "
            f"can have at most {NAME_MAX} (the sidecar adds '.json').",
            f"Use a shorter name (at most {NAME_MAX - 6} bytes before the extension).",
        )
    if len(os.fsencode(str(target))) + 1 > PATH_MAX:
        raise UserError(
            f"The output path is {len(os.fsencode(str(target)))} bytes long; paths can have at most "
            f"{PATH_MAX - 1}.",
            "Choose a folder with a shorter path.",
        )


def sidecar_path(clip: str | Path) -> Path:
    """The sidecar of a clip: same folder and name, extension `.json` (clip.mp4 -> clip.json)."""
    return Path(clip).with_suffix(".json")


def _safe_stem(stem: str) -> str:
    cleaned = re.sub(r"[\x00-\x1f\x7f/\\]", "_", stem).strip().lstrip(".").strip()
    return cleaned[:100].rstrip() or "clip"


def _free_name(folder: Path, stem: str, ext: str) -> Path:
    n = 1
    while True:
        name = stem if n == 1 else f"{stem}-{n}"
        clip = folder / f"{name}.{ext}"
        if not os.path.lexists(clip) and not os.path.lexists(sidecar_path(clip)):
            return clip
        n += 1


def _check_free(clip: Path, sidecar: Path) -> None:
    for path in (clip, sidecar):
        if os.path.lexists(path):
            raise UserError(
                f"{path} exists; ParaStep Studio never overwrites files.",
                "Choose another name or remove it.",
            )


def _ensure_writable_folder(folder: Path) -> Path:
    """Create `folder` if needed and prove it is writable (a test file is created and removed)."""
    fix = "Choose another output folder, or make this one writable."
    if os.path.lexists(folder) and not folder.is_dir():
        raise UserError(f"The output folder {folder} exists but is not a folder.", fix)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(
            f"Cannot create the output folder {folder}: {err.strerror or err}.",
            "Choose another output folder, or create this one and make it writable.",
        ) from err
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"The output folder {folder} is not writable.", fix)
    probe = folder / f".parastep-write-test-{secrets.token_hex(6)}"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError as err:
        raise _write_error(err, folder) from err
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    return folder


# ------------------------------------------------------------------------------------------ metadata


def build_metadata(
    request: GenerationRequest,
    *,
    timings: dict,
    ranks: list[dict],
    extra: dict | None = None,
) -> dict:
    """The sidecar content of a clip.

    {"format": "parastep-studio/clip", "format_version": 1, "request": request.to_dict(),
    "versions": {python, torch, diffusers, transformers, parastep-studio}, "timings", "ranks",
    "created": ISO-8601 UTC time} plus the keys of `extra` (which may not replace these).
    Package versions come from installed metadata ("unknown" when absent); nothing heavy is imported.
    """
    extra = extra or {}
    clash = sorted(set(extra) & set(_RESERVED_KEYS))
    if clash:
        raise ValueError(f"extra metadata may not replace {', '.join(clash)}")
    versions = {"python": platform.python_version()}
    for package in ("torch", "diffusers", "transformers", "parastep-studio"):
        try:
            versions[package] = importlib_metadata.version(package)
        except importlib_metadata.PackageNotFoundError:
            versions[package] = "unknown"
    return {
        "format": CLIP_FORMAT,
        "format_version": CLIP_FORMAT_VERSION,
        "request": request.to_dict(),
        "versions": versions,
        "timings": dict(timings),
        "ranks": list(ranks),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        **extra,
    }


def _to_json(data: Any, *, indent: int | None) -> str:
    """Strict JSON: non-finite floats become "inf"/"-inf"/"nan" (see `engine.metrics.json_safe`)."""

    def default(obj: Any) -> Any:
        if isinstance(obj, os.PathLike):
            return os.fspath(obj)
        raise TypeError(f"metadata value {obj!r} ({type(obj).__name__}) is not JSON-serialisable")

    separators = None if indent else (",", ":")
    return json.dumps(
        json_safe(data),
        indent=indent,
        ensure_ascii=False,
        allow_nan=False,
        default=default,
        separators=separators,
    )


def _embedded_comment(metadata: dict, limit: int) -> str | None:
    """The JSON to embed in a clip: everything if short enough, else the essentials, else nothing."""
    text = _to_json(metadata, indent=None)
    if len(text.encode()) <= limit:
        return text
    keys = ("format", "format_version", "request", "versions", "created")
    text = _to_json({k: metadata[k] for k in keys if k in metadata}, indent=None)
    return text if len(text.encode()) <= limit else None


# ------------------------------------------------------------------------------------------- writing


def write_clip(
    path: Path,
    *,
    frames: np.ndarray | None = None,
    fps: float | None = None,
    audio: np.ndarray | None = None,
    sample_rate: int | None = None,
    metadata: dict,
) -> Path:
    """Write a clip and its sidecar atomically, never overwriting; return the clip path.

    The extension of `path` picks the format:
    - .mp4: H.264 (libx264, yuv420p, CRF 18) with `metadata` as JSON in the `comment` tag. Frames
      of odd width or height get their last row/column repeated once (yuv420p needs even sizes);
      they are never scaled.
    - .gif: looping, per-frame delays in centiseconds chosen so the average rate is `fps` (GIF
      cannot show more than 50 frames per second: faster clips play at 50). Consecutive identical
      frames are merged into one longer frame by Pillow. Metadata goes in a comment extension.
    - .wav: 16-bit PCM; the metadata is embedded (INFO ICMT) only when it fits libsndfile's ~2 KiB.
    - .flac: 16-bit FLAC with the metadata as a Vorbis comment.

    `frames` are uint8 [F, H, W, 3] (video); `audio` is float in [-1, 1], [S] or [S, C] (values
    outside are clipped, NaN becomes 0). The sidecar goes to `<path without extension>.json`.
    A missing folder is created.

    Raises UserError when the clip or sidecar name exists or the folder cannot be written to (disk
    full, no permission...); no clip, sidecar or temporary file is left behind then. Wrong array
    shapes or a missing argument raise ValueError.
    """
    path = Path(path).expanduser().absolute()
    ext = path.suffix.lower().lstrip(".")
    writer: Callable[[Path], None]
    if ext in EXTENSIONS["video"]:
        frames, fps = _check_video(frames, fps, audio)
        if ext == "mp4":
            comment = _embedded_comment(metadata, _MP4_COMMENT_MAX)

            def writer(tmp: Path) -> None:
                _write_mp4(tmp, frames, fps, comment)
        else:
            comment = _embedded_comment(metadata, 1 << 20)

            def writer(tmp: Path) -> None:
                _write_gif(tmp, frames, fps, comment)
    elif ext in EXTENSIONS["audio"]:
        audio, sample_rate = _check_audio(audio, sample_rate, frames)
        comment = _embedded_comment(metadata, _WAV_COMMENT_MAX if ext == "wav" else 1 << 20)
        fmt = ext.upper()

        def writer(tmp: Path) -> None:
            _write_audio(tmp, audio, sample_rate, fmt, comment)
    else:
        raise ValueError(f"cannot write a clip with extension {path.suffix!r} ({path})")

    sidecar = sidecar_path(path)
    sidecar_text = _to_json(metadata, indent=2) + "\n"  # serialise before any file exists
    folder = _ensure_writable_folder(path.parent)
    _check_free(path, sidecar)

    temps: list[Path] = []
    published: list[Path] = []
    try:
        tmp_clip = _new_temp(folder, path.name)
        temps.append(tmp_clip)
        writer(tmp_clip)
        _fsync(tmp_clip)
        tmp_sidecar = _new_temp(folder, sidecar.name)
        temps.append(tmp_sidecar)
        _write_text(tmp_sidecar, sidecar_text)
        _fsync(tmp_sidecar)
        _publish(tmp_clip, path)
        published.append(path)
        _publish(tmp_sidecar, sidecar)
        published.append(sidecar)
    except BaseException as err:
        if len(published) < 2:
            for done in published:
                with contextlib.suppress(OSError):
                    os.unlink(done)
        if isinstance(err, FileExistsError):
            taken = sidecar if published else path
            raise UserError(
                f"{taken} appeared while the clip was being saved; it was not overwritten.",
                "Save again (a new name is chosen), or remove that file.",
            ) from err
        if isinstance(err, OSError):
            raise _write_error(err, folder) from err
        raise
    finally:
        for tmp in temps:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return path


def _check_video(frames: Any, fps: Any, audio: Any) -> tuple[np.ndarray, float]:
    if frames is None or fps is None:
        raise ValueError("a video clip needs frames and fps")
    if audio is not None:
        raise ValueError("video clips carry no audio track")
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise ValueError(f"frames must be uint8 [F, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    fps = float(fps)
    if not np.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps}")
    return np.ascontiguousarray(frames), fps


def _check_audio(audio: Any, sample_rate: Any, frames: Any) -> tuple[np.ndarray, int]:
    if audio is None or sample_rate is None:
        raise ValueError("an audio clip needs audio and sample_rate")
    if frames is not None:
        raise ValueError("audio clips carry no frames")
    audio = np.asarray(audio)
    if audio.dtype.kind != "f" or audio.ndim not in (1, 2) or 0 in audio.shape:
        raise ValueError(f"audio must be float [S] or [S, C], got {audio.dtype} {list(audio.shape)}")
    if int(sample_rate) != sample_rate or sample_rate <= 0:
        raise ValueError(f"sample_rate must be a positive integer, got {sample_rate}")
    audio = np.clip(np.nan_to_num(audio.astype(np.float32), nan=0.0), -1.0, 1.0)
    return audio, int(sample_rate)


def _new_temp(folder: Path, final_name: str) -> Path:
    """Create an empty hidden file next to the final one (permissions follow the umask)."""
    while True:
        tmp = folder / f".{final_name}.{secrets.token_hex(4)}.part"
        try:
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            return tmp
        except FileExistsError:
            continue


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, final: Path) -> None:
    """Give `tmp` its final name without ever replacing an existing file (FileExistsError then)."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise
    except OSError as err:
        # File systems without hard links (FAT, exFAT, some network shares): claim the name
        # exclusively, then move the finished file over our own empty placeholder.
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
            raise
        os.close(os.open(final, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        try:
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(final)
            raise
        return
    os.unlink(tmp)


_ERRNO_BY_MESSAGE = (
    ("no space left on device", errno.ENOSPC),
    ("disk quota exceeded", errno.EDQUOT),
    ("permission denied", errno.EACCES),
    ("read-only file system", errno.EROFS),
)


def _write_error(err: OSError, folder: Path) -> UserError:
    code = err.errno
    if code is None:  # e.g. an encoder's error text
        text = str(err).lower()
        code = next((c for message, c in _ERRNO_BY_MESSAGE if message in text), None)
    if code in (errno.ENOSPC, errno.EDQUOT):
        return UserError(
            f"The disk holding {folder} is full; the clip was not saved.",
            "Free some space there, or choose an output folder on another disk.",
        )
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError(
            f"Cannot write to the output folder {folder} (no permission or read-only).",
            "Choose another output folder, or make this one writable.",
        )
    reason = err.strerror or (str(err).strip().splitlines() or [type(err).__name__])[0]
    return UserError(
        f"Could not save the clip in {folder}: {reason}.",
        "Check the folder (free space, permissions), or choose another output folder.",
    )


# ------------------------------------------------------------------------------------------ encoders


def _ffmpeg_exe() -> str:
    import imageio_ffmpeg

    try:
        return imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError as err:
        raise UserError(
            f"No ffmpeg found to write MP4 clips ({err}).",
            "Reinstall imageio-ffmpeg (it bundles ffmpeg), or save as .gif.",
        ) from err


def _write_mp4(path: Path, frames: np.ndarray, fps: float, comment: str | None) -> None:
    exe = _ffmpeg_exe()
    _, height, width, _ = frames.shape
    # yuv420p needs even sizes: repeat the last row/column of odd-sized frames (scaling would
    # distort, and a black border would bleed into the edge pixels' subsampled colour).
    pad = ((0, height % 2), (0, width % 2), (0, 0))
    height, width = height + height % 2, width + width % 2
    rate = Fraction(fps).limit_denominator(10_000)
    cmd = [exe, "-hide_banner", "-nostats", "-v", "error"]
    cmd += ["-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{width}x{height}", "-r", str(rate), "-i", "-"]
    cmd += ["-an", "-vf", "setsar=1"]
    cmd += ["-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", str(MP4_CRF), "-preset", "medium"]
    cmd += ["-movflags", "+faststart"]
    if comment is not None:
        cmd += ["-metadata", f"comment={comment}"]
    cmd += ["-f", "mp4", "-y", os.fspath(path)]

    import tempfile

    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=log)
        try:
            assert proc.stdin is not None
            try:
                for frame in frames:
                    if pad[0][1] or pad[1][1]:
                        frame = np.pad(frame, pad, mode="edge")
                    proc.stdin.write(frame.tobytes())
                proc.stdin.close()
            except BrokenPipeError:
                pass  # ffmpeg stopped early; its log says why
            rc = proc.wait(timeout=_FFMPEG_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if rc != 0:
            log.seek(0)
            text = log.read().decode("utf-8", "replace").strip()
            tail = " ".join(text.splitlines()[-3:]) or f"exit status {rc}"
            lowered = text.lower()
            for message, code in _ERRNO_BY_MESSAGE:
                if message in lowered:
                    raise OSError(code, os.strerror(code), os.fspath(path))
            raise UserError(
                f"ffmpeg ({exe}) could not write the MP4: {tail}",
                "Use the ffmpeg bundled with imageio-ffmpeg (unset IMAGEIO_FFMPEG_EXE), which has "
                "libx264, or save as .gif.",
            )


def _gif_durations_ms(count: int, fps: float) -> list[int]:
    """Per-frame delays (multiples of 10 ms, at least 20 ms) whose running total tracks `fps`."""
    centis = [round((i + 1) * 100 / fps) - round(i * 100 / fps) for i in range(count)]
    return [max(2, c) * 10 for c in centis]


def _write_gif(path: Path, frames: np.ndarray, fps: float, comment: str | None) -> None:
    from PIL import Image

    images = [Image.fromarray(frame, "RGB") for frame in frames]
    options: dict[str, Any] = {
        "format": "GIF",
        "save_all": True,
        "append_images": images[1:],
        "duration": _gif_durations_ms(len(images), fps),
        "loop": 0,
    }
    if comment is not None:
        options["comment"] = comment.encode()
    with open(path, "wb") as fh:
        images[0].save(fh, **options)


def _write_audio(path: Path, audio: np.ndarray, sample_rate: int, fmt: str, comment: str | None) -> None:
    import soundfile as sf

    channels = 1 if audio.ndim == 1 else audio.shape[1]
    try:
        with sf.SoundFile(
            os.fspath(path), "w", samplerate=sample_rate, channels=channels, subtype="PCM_16", format=fmt
        ) as f:
            if comment is not None:
                f.comment = comment
            f.write(audio)
    except sf.LibsndfileError as err:
        raise OSError(None, f"libsndfile: {err}") from err


# ------------------------------------------------------------------------------------------- reading


def read_request(path: str | Path) -> GenerationRequest:
    """The request that produced a clip.

    `path` is a sidecar JSON or a clip; for a clip the sidecar next to it is read, and when it is
    missing (or is not a ParaStep sidecar) the metadata embedded in the clip (MP4, FLAC, GIF, WAV).
    Raises UserError with the reason: missing file, not JSON, not a ParaStep sidecar, written by
    a newer version, or invalid request fields.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise UserError(f"{path} {what}.", "Pass a clip or its sidecar (.json).")
    ext = path.suffix.lower().lstrip(".")
    if ext == "json":
        return _request_from_sidecar(_load_json_file(path), path)
    known = EXTENSIONS["video"] + EXTENSIONS["audio"]
    if ext not in known:
        raise UserError(
            f"{path} is not a clip or sidecar ParaStep Studio reads.",
            f"Pass a .json sidecar or a clip ({', '.join('.' + e for e in known)}).",
        )
    sidecar = sidecar_path(path)
    sidecar_error: UserError | None = None
    if sidecar.is_file():
        try:
            return _request_from_sidecar(_load_json_file(sidecar), sidecar)
        except UserError as err:
            sidecar_error = err
    embedded = _read_embedded(path, ext)
    if embedded is None:
        if sidecar_error is not None:
            raise sidecar_error
        raise UserError(
            f"{path} has no ParaStep Studio metadata and no sidecar {sidecar.name} next to it.",
            "Pass the clip's sidecar JSON, or a clip saved by ParaStep Studio.",
        )
    try:
        data = json.loads(embedded)
    except json.JSONDecodeError as err:
        if sidecar_error is not None:
            raise sidecar_error from err
        raise UserError(
            f"The metadata embedded in {path} is not ParaStep Studio's (not JSON).",
            "Pass the clip's sidecar JSON instead.",
        ) from err
    try:
        return _request_from_sidecar(data, path)
    except UserError:
        if sidecar_error is not None:
            raise sidecar_error from None
        raise


def _load_json_file(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not a JSON file.", "Pass a sidecar (.json) saved with a clip.") from err
    except OSError as err:
        raise UserError(
            f"Cannot read {path}: {err.strerror or err}.", "Check the file's permissions."
        ) from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(
            f"{path} is not valid JSON ({err.msg} at line {err.lineno}).",
            "Pass a sidecar (.json) saved with a clip.",
        ) from err


def _request_from_sidecar(data: Any, source: Path) -> GenerationRequest:
    if not isinstance(data, dict) or data.get("format") != CLIP_FORMAT:
        raise UserError(
            f"{source} is not a ParaStep Studio clip sidecar.",
            "Pass the .json saved next to a clip, or the clip itself.",
        )
    version = data.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise UserError(
            f"{source} has an invalid format_version ({version!r}).",
            "Pass an unmodified sidecar saved with a clip.",
        )
    if version > CLIP_FORMAT_VERSION:
        raise UserError(
            f"{source} was written by a newer ParaStep Studio (clip format {version}; this version reads "
            f"up to {CLIP_FORMAT_VERSION}).",
            "Update ParaStep Studio to open it.",
        )
    if "request" not in data:
        raise UserError(f"{source} holds no request.", "Pass an unmodified sidecar saved with a clip.")
    try:
        return GenerationRequest.from_dict(data["request"])
    except UserError as err:
        raise UserError(f"{source}: {err.problem}", err.fix) from err


def _read_embedded(path: Path, ext: str) -> str | None:
    """The comment embedded in a clip, or None (also when the clip cannot be parsed)."""
    try:
        if ext == "mp4":
            return _ffmetadata(path).get("comment")
        if ext == "gif":
            from PIL import Image

            with Image.open(path) as im:
                comment = im.info.get("comment")
            return comment.decode("utf-8", "replace") if isinstance(comment, bytes) else comment
        import soundfile as sf

        with sf.SoundFile(os.fspath(path)) as f:
            return f.comment or None
    except (OSError, RuntimeError, ValueError, subprocess.SubprocessError, UserError):
        return None


def _ffmetadata(path: Path) -> dict[str, str]:
    """Global metadata of a media file, read with `ffmpeg -i FILE -f ffmetadata -`."""
    result = subprocess.run(
        [
            _ffmpeg_exe(),
            "-hide_banner",
            "-nostdin",
            "-v",
            "error",
            "-i",
            os.fspath(path),
            "-f",
            "ffmetadata",
            "-",
        ],
        capture_output=True,
        timeout=60,
    )
    if result.returncode != 0:
        return {}
    return parse_ffmetadata(result.stdout.decode("utf-8", "replace"))


def parse_ffmetadata(text: str) -> dict[str, str]:
    """Parse ffmpeg's FFMETADATA1 text; only the global section (before any [SECTION]) is returned.

    In keys and values, '=', ';', '#', '\\' and newlines are escaped with a backslash.
    """
    entries: list[tuple[str, str]] = []
    key: list[str] = []
    value: list[str] = []
    in_value = False
    line_start = True
    skip_line = False
    i = 0
    while i < len(text):
        ch = text[i]
        if line_start and not in_value and not key:
            if ch in ";#":  # comment line (";FFMETADATA1" header included)
                skip_line = True
            elif ch == "[":  # a [STREAM]/[CHAPTER] section: global metadata is over
                break
        line_start = False
        if skip_line:
            if ch == "\n":
                skip_line, line_start = False, True
            i += 1
            continue
        if ch == "\\" and i + 1 < len(text):
            (value if in_value else key).append(text[i + 1])
            i += 2
            continue
        if ch == "\n":
            if in_value:
                entries.append(("".join(key), "".join(value)))
            key, value, in_value, line_start = [], [], False, True
        elif ch == "=" and not in_value:
            in_value = True
        else:
            (value if in_value else key).append(ch)
        i += 1
    if in_value:
        entries.append(("".join(key), "".join(value)))
    return dict(entries)


def export_clip(source: str | Path, target: str | Path) -> Path:
    """Saves a clip again in the format `target`'s extension names (MP4/GIF, WAV/FLAC), with its metadata.

    The sidecar of `source` is carried over (with an `exported_from` note); writing follows
    `write_clip`'s rules: atomic, never over an existing file.
    """
    source = Path(source).expanduser()
    request = read_request(source)  # also checks that this is one of our clips
    sidecar = sidecar_path(source)
    metadata = build_metadata(request, timings={}, ranks=[])  # when the sidecar is lost or damaged
    if sidecar.is_file():
        try:
            data = _load_json_file(sidecar)
            if _request_from_sidecar(data, sidecar) == request:  # not a hand-edited copy
                metadata = data
        except UserError:
            pass
    metadata = {**metadata, "exported_from": str(source)}
    modality = "audio" if source.suffix.lower().lstrip(".") in EXTENSIONS["audio"] else "video"
    target = plan_output(str(target), modality, source.stem)
    if modality == "audio":
        import soundfile as sf

        audio, sample_rate = sf.read(str(source), dtype="float32", always_2d=False)
        return write_clip(target, audio=audio, sample_rate=sample_rate, metadata=metadata)
    import imageio.v3 as iio

    frames = np.asarray(iio.imread(source, index=None))[..., :3]
    fps = request.fps or metadata.get("fps") or 8
    return write_clip(target, frames=frames, fps=float(fps), metadata=metadata)
