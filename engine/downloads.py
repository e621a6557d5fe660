"""Pulling a checkpoint from the Hugging Face hub (or `$HF_ENDPOINT`) with huggingface_hub.

Only the files a diffusers pipeline needs are taken: `model_index.json` and the root JSON files, and in
each component folder the configs, tokenizer files and safetensors weights of one variant. Pickle
weights and code are never downloaded. Files go to a staging folder keyed by the commit
(`models_dir()/.staging/ORG--NAME@COMMIT/`); an interrupted file stays there as `NAME.part` and the next
pull resumes it with a Range request. Every file is checked against the hub's metadata (sha256 of LFS
files, git blob id of the others) before it gets its final name; the folder is moved into
`models_dir()` only when all of them are, so the catalog never sees a half-installed model.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from engine.catalog import WEIGHTLESS_CLASS_WORDS
from engine.checkpoints import (
    MANIFEST,
    STAGING,
    find_checkpoint,
    find_installed,
    folder_for,
    format_size,
    models_dir,
)
from engine.errors import JobCancelled, UserError

# Suffixes a pipeline folder needs; everything else (.bin .pt .ckpt .pkl .msgpack .onnx .py ...) is left.
ALLOWED_SUFFIXES = (".safetensors", ".json", ".txt", ".model")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_SHARD = re.compile(r"-\d+-of-\d+$")
DISK_RESERVE = 64 * 2**20  # left free besides the download
PROGRESS_INTERVAL_S = 0.1
SPEED_WINDOW_S = 3.0


class PullCancelled(JobCancelled):
    """The user cancelled a pull; the partial files stay in staging for the next one."""


@dataclass
class RemoteFile:
    path: str
    size: int
    sha256: str | None  # LFS files
    blob_id: str | None  # git blob sha1 (the check for non-LFS files)


@dataclass
class PullProgress:
    hub_id: str
    stage: str  # plan | download | verify | install | done
    file: str
    done_bytes: int
    total_bytes: int
    speed_bps: float
    eta_s: float | None

    def to_dict(self) -> dict[str, Any]:
        return {"type": "progress", **asdict(self)}


ProgressSink = Callable[[PullProgress], None]


def parse_spec(spec: str) -> tuple[str, str, str | None, str]:
    """NAME or HUB_ID[@REV] -> (hub_id, revision, variant, display name)."""
    target, _, revision = spec.strip().partition("@")
    checkpoint = find_checkpoint(target)
    if checkpoint is not None:
        return checkpoint.hub_id, revision or checkpoint.revision, checkpoint.variant, checkpoint.name
    if target.count("/") != 1 or not all(target.split("/")):
        raise UserError(
            f"'{spec}' is neither a known checkpoint nor a hub id (ORG/NAME[@REVISION]).",
            "See `parastep-studio models --available`, or give a hub id such as THUDM/CogVideoX-2b.",
        )
    return target, revision or "main", None, target


def file_variant(filename: str) -> str:
    """The diffusers/transformers variant tag of a weight file name ('' for the plain files):
    `x.fp16.safetensors`, `x-00001-of-00002.fp16.safetensors`, `model.fp16-00001-of-00002.safetensors`,
    `x.safetensors.index.fp16.json`."""
    tokens = filename.split(".")[1:]
    tags = [_SHARD.sub("", t) for t in tokens if t not in ("safetensors", "index", "json")]
    return ".".join(t for t in tags if t)


def _is_weight(name: str) -> bool:
    return name.endswith(".safetensors") or ".safetensors.index" in name


def select_files(
    files: list[RemoteFile], model_index: dict[str, Any], variant: str | None, hub_id: str
) -> list[RemoteFile]:
    """The files to take: root JSON files, and the allowed files of each component of `model_index`,
    weights of `variant` where the component has them (else the plain ones)."""
    components = {
        name: spec
        for name, spec in model_index.items()
        if not name.startswith("_") and isinstance(spec, list) and len(spec) == 2 and spec[1] is not None
    }
    chosen = [f for f in files if "/" not in f.path and f.path.endswith(".json")]
    for component, spec in components.items():
        inside = [f for f in files if f.path.startswith(component + "/") and f.path.count("/") == 1]
        allowed = [f for f in inside if f.path.endswith(ALLOWED_SUFFIXES)]
        weights = [f for f in allowed if _is_weight(f.path)]
        has_variant = bool(variant) and any(file_variant(f.path.split("/")[1]) == variant for f in weights)
        wanted = variant if has_variant else ""
        chosen += [
            f for f in allowed if not _is_weight(f.path) or file_variant(f.path.split("/")[1]) == wanted
        ]
        weightless = any(word in str(spec[1]) for word in WEIGHTLESS_CLASS_WORDS)
        if not weightless and not any(f.path.endswith(".safetensors") for f in chosen if f in inside):
            pickled = [f.path for f in inside if f.path.endswith(PICKLE_SUFFIXES)]
            problem = (
                f"only pickle weights ({', '.join(pickled)}), which can run code when loaded"
                if pickled
                else "no safetensors weights"
            )
            raise UserError(
                f"Component '{component}' of {hub_id} has {problem}; nothing was downloaded.",
                "Pick a revision or a repository with safetensors weights (e.g. a `refs/pr/N` conversion).",
            )
    return chosen


class _Meter:
    """Byte counter behind the progress events: speed over the last few seconds, ETA, and the cancel
    check, done on every chunk huggingface_hub's http_get reports."""

    def __init__(
        self, hub_id: str, total: int, done: int, sink: ProgressSink | None, cancel: threading.Event | None
    ) -> None:
        self.hub_id, self.total, self.done = hub_id, total, done
        self.sink, self.cancel = sink, cancel
        self.file = ""
        self.samples: deque[tuple[float, int]] = deque([(time.monotonic(), done)])
        self.last_emit = 0.0

    def add(self, count: int) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise PullCancelled()
        self.done += count
        now = time.monotonic()
        self.samples.append((now, self.done))
        while len(self.samples) > 2 and now - self.samples[0][0] > SPEED_WINDOW_S:
            self.samples.popleft()
        if now - self.last_emit >= PROGRESS_INTERVAL_S:
            self.emit("download")

    def speed(self) -> float:
        (t0, d0), (t1, d1) = self.samples[0], self.samples[-1]
        return (d1 - d0) / (t1 - t0) if t1 > t0 else 0.0

    def emit(self, stage: str) -> None:
        self.last_emit = time.monotonic()
        if self.sink is None:
            return
        speed = self.speed()
        eta = (self.total - self.done) / speed if speed > 0 else None
        self.sink(PullProgress(self.hub_id, stage, self.file, self.done, self.total, speed, eta))

    def bar_class(self) -> type:
        """A tqdm stand-in for http_get's `tqdm_class`: it only forwards byte counts here."""
        meter = self

        class Bar:
            def __init__(self, **_: Any) -> None:
                pass

            def __enter__(self) -> Bar:
                return self

            def __exit__(self, *_: Any) -> bool:
                return False

            def update(self, count: int) -> None:
                meter.add(count)

        return Bar


def disk_free(path: Path) -> int:
    """Free bytes on the disk holding `path` (a function of its own so tests can fake a full disk)."""
    return shutil.disk_usage(path).free


def _file_digest(path: Path, algorithm: str, prefix: bytes = b"") -> str:
    digest = hashlib.new(algorithm)
    digest.update(prefix)
    with path.open("rb") as handle:
        while chunk := handle.read(8 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(path: Path, remote: RemoteFile) -> None:
    """Size and hash against the hub's metadata; a mismatching file is removed."""
    size = path.stat().st_size
    problem = None
    if size != remote.size:
        problem = f"has {size} bytes, the hub lists {remote.size}"
    elif remote.sha256:
        actual = _file_digest(path, "sha256")
        if actual != remote.sha256:
            problem = f"has sha256 {actual}, the hub lists {remote.sha256}"
    elif remote.blob_id:
        actual = _file_digest(path, "sha1", f"blob {size}\0".encode())
        if actual != remote.blob_id:
            problem = f"has git blob id {actual}, the hub lists {remote.blob_id}"
    elif _is_weight(remote.path):
        problem = "has no checksum in the hub's metadata"
    if problem:
        path.unlink(missing_ok=True)
        raise UserError(
            f"Downloaded '{remote.path}' {problem}; the file was removed and the model is not installed.",
            "Pull again; if it fails the same way the repository or a proxy in between serves a different "
            "file than the hub lists.",
        )


def _endpoint() -> str:
    from huggingface_hub import constants

    # read at call time: huggingface_hub reads HF_ENDPOINT once, when first imported
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def _hub_errors(hub_id: str, endpoint: str) -> Callable[[Exception], Exception]:
    """Maps huggingface_hub / httpx errors to one-line UserErrors."""

    def convert(exc: Exception) -> Exception:
        from huggingface_hub.errors import (
            HfHubHTTPError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        response = getattr(exc, "response", None)
        status = getattr(response, "status_code", None)
        if status in (401, 403):
            return UserError(
                f"Access to {hub_id} was refused (HTTP {status}): it is gated or private.",
                f"Accept its licence at {endpoint}/{hub_id} while logged in, then set HF_TOKEN (or pass "
                "--token) to a token of that account.",
            )
        if isinstance(exc, RevisionNotFoundError):
            return UserError(f"{hub_id} has no such revision.", "Check the part after '@'.")
        if isinstance(exc, RepositoryNotFoundError):
            return UserError(f"There is no repository {hub_id} on {endpoint}.", "Check the hub id.")
        if isinstance(exc, HfHubHTTPError):
            return UserError(f"The hub refused the download of {hub_id}: {' '.join(str(exc).split())}", "")
        return UserError(
            f"Cannot download {hub_id} from {endpoint}: {' '.join(str(exc).split()) or type(exc).__name__}.",
            "Check the network (and HF_ENDPOINT); run the pull again to resume.",
        )

    return convert


def _lock(path: Path, hub_id: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserError(
            f"{hub_id} is already being downloaded by another process.", "Wait for it or cancel it."
        ) from None
    return fd


def pull(
    spec: str,
    progress: ProgressSink | None = None,
    cancel: threading.Event | None = None,
    token: str | None = None,
) -> Path:
    """Downloads, verifies and installs `spec` (NAME or HUB_ID[@REV]); returns the model folder."""
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    hub_id, revision, variant, name = parse_spec(spec)
    endpoint = _endpoint()
    token = token or os.environ.get("HF_TOKEN") or None
    convert = _hub_errors(hub_id, endpoint)
    root = models_dir()
    (root / STAGING).mkdir(parents=True, exist_ok=True)
    lock_fd = _lock(root / STAGING / f"{hub_id.replace('/', '--')}.lock", hub_id)
    try:
        if progress is not None:
            progress(PullProgress(hub_id, "plan", "", 0, 0, 0.0, None))
        try:
            info = HfApi(endpoint=endpoint, token=token).model_info(
                hub_id, revision=revision, files_metadata=True
            )
        except (HfHubHTTPError, httpx2.HTTPError) as exc:
            raise convert(exc) from None
        commit = info.sha or revision
        files = [
            RemoteFile(
                s.rfilename,
                s.lfs.size if s.lfs else (s.size or 0),
                s.lfs.sha256 if s.lfs else None,
                None if s.lfs else s.blob_id,
            )
            for s in info.siblings or []
        ]
        by_path = {f.path: f for f in files}
        if "model_index.json" not in by_path:
            raise UserError(
                f"{hub_id}@{revision} has no model_index.json: it is not a diffusers pipeline.",
                "Give the diffusers version of the model (often a repository ending in -Diffusers).",
            )
        installed = find_installed(hub_id)
        if installed is not None and (installed[1].get("commit"), installed[1].get("variant")) == (
            commit,
            variant,
        ):
            if progress is not None:  # already there, verified when it was pulled
                progress(PullProgress(hub_id, "done", "", 0, 0, 0.0, None))
            return installed[0]
        staging = root / STAGING / f"{hub_id.replace('/', '--')}@{commit}"
        staging.mkdir(parents=True, exist_ok=True)
        fetch = _Fetcher(hub_id, commit, endpoint, token, staging, convert)
        meter = _Meter(hub_id, by_path["model_index.json"].size, 0, None, cancel)
        fetch(by_path["model_index.json"], meter)
        model_index = json.loads((staging / "model_index.json").read_text())
        chosen = select_files(files, model_index, variant, hub_id)
        _check_disk(chosen, staging, root, hub_id)
        done = sum(_present_bytes(staging, f) for f in chosen)
        meter = _Meter(hub_id, sum(f.size for f in chosen), done, progress, cancel)
        for remote in sorted(chosen, key=lambda f: f.size):
            meter.file = remote.path
            fetch(remote, meter)
        meter.emit("install")
        target = _install(staging, chosen, hub_id, name, revision, commit, variant)
        meter.emit("done")
        return target
    finally:
        os.close(lock_fd)


def _present_bytes(staging: Path, remote: RemoteFile) -> int:
    final = staging / remote.path
    if final.is_file():
        return remote.size
    part = final.with_name(final.name + ".part")
    return min(part.stat().st_size, remote.size) if part.is_file() else 0


def _check_disk(chosen: list[RemoteFile], staging: Path, root: Path, hub_id: str) -> None:
    needed = sum(f.size - _present_bytes(staging, f) for f in chosen)
    free = disk_free(root)
    if free < needed + DISK_RESERVE:
        raise UserError(
            f"Not enough disk space for {hub_id}: it needs {format_size(needed)} more in {root}, "
            f"{format_size(free)} are free; nothing was installed.",
            "Free some space, or set PARASTEP_MODELS_DIR to a folder on a larger disk, then pull again.",
        )


class _Fetcher:
    """Downloads one file into staging with huggingface_hub (HEAD for the location, then http_get
    with resume), checks it, and gives it its final name."""

    def __init__(
        self,
        hub_id: str,
        commit: str,
        endpoint: str,
        token: str | None,
        staging: Path,
        convert: Callable[[Exception], Exception],
    ) -> None:
        self.hub_id, self.commit, self.endpoint, self.token = hub_id, commit, endpoint, token
        self.staging, self.convert = staging, convert

    def __call__(self, remote: RemoteFile, meter: _Meter) -> None:
        import errno

        import httpx2
        from huggingface_hub import get_hf_file_metadata, hf_hub_url
        from huggingface_hub.errors import HfHubHTTPError
        from huggingface_hub.file_download import http_get
        from huggingface_hub.utils import build_hf_headers

        final = self.staging / remote.path
        if final.is_file():  # checked when it got its name
            return
        final.parent.mkdir(parents=True, exist_ok=True)
        part = final.with_name(final.name + ".part")
        resume = part.stat().st_size if part.is_file() else 0
        if resume > remote.size:
            part.unlink()
            resume = 0
        url = hf_hub_url(self.hub_id, remote.path, revision=self.commit, endpoint=self.endpoint)
        try:
            metadata = get_hf_file_metadata(url, token=self.token, endpoint=self.endpoint)
            if remote.sha256 and metadata.etag and metadata.etag != remote.sha256:
                raise UserError(
                    f"The hub's metadata for '{remote.path}' disagree (sha256 {remote.sha256} in the "
                    f"listing, {metadata.etag} on the file); nothing was installed.",
                    "Pull again later.",
                )
            headers = build_hf_headers(token=self.token)
            with part.open("ab") as handle:
                http_get(
                    metadata.location,
                    handle,
                    resume_size=resume,
                    headers=headers,
                    expected_size=remote.size,
                    displayed_filename=remote.path,
                    tqdm_class=meter.bar_class(),
                )
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise UserError(
                    f"The disk filled up while downloading {self.hub_id}; nothing was installed (the part "
                    f"done is kept in {self.staging}).",
                    "Free some space and pull again to resume.",
                ) from None
            if type(exc) is OSError and "Consistency check failed" in str(exc):
                part.unlink(missing_ok=True)  # wrong length: start this file over next time
            raise self.convert(exc) from None
        except (HfHubHTTPError, httpx2.HTTPError) as exc:
            raise self.convert(exc) from None
        meter.emit("verify")
        verify_file(part, remote)
        os.replace(part, final)


def _install(
    staging: Path,
    chosen: list[RemoteFile],
    hub_id: str,
    name: str,
    revision: str,
    commit: str,
    variant: str | None,
) -> Path:
    """Writes the manifest and moves the verified folder into place (replacing an older pull)."""
    wanted = {f.path for f in chosen}
    for path in sorted(staging.rglob("*")):  # model_index.json may be the only file not chosen
        if path.is_file() and str(path.relative_to(staging)) not in wanted:
            path.unlink()
    manifest = {
        "name": name,
        "hub_id": hub_id,
        "revision": revision,
        "commit": commit,
        "variant": variant,
        "pulled_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": [{"path": f.path, "size": f.size, "sha256": f.sha256, "blob_id": f.blob_id} for f in chosen],
    }
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    target = folder_for(hub_id)
    old = None
    if target.exists():
        old = target.parent / STAGING / f"replaced-{uuid.uuid4().hex[:8]}"
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    # parts left by pulls of older commits of this repository will never be resumed
    for stale in staging.parent.glob(f"{hub_id.replace('/', '--')}@*"):
        shutil.rmtree(stale, ignore_errors=True)
    return target
