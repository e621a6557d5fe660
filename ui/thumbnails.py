"""First-frame thumbnails of MP4 clips for the history, made in the background and cached on disk.

Decoding a video frame in the window would mean a media pipeline per clip; instead the ffmpeg that
comes with imageio-ffmpeg writes a small PNG of the first frame, one clip at a time, in a child
process (QProcess: the event loop never waits). Thumbnails live in
`$XDG_CACHE_HOME/parastep-studio/thumbnails`, named after the clip's path, size and time, so an
edited or replaced clip gets a new one.
"""

from __future__ import annotations

import hashlib
import os
from collections import deque
from pathlib import Path

from PySide6.QtCore import QObject, QProcess, Signal
from PySide6.QtGui import QImage

THUMBNAIL_WIDTH = 192


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "parastep-studio" / "thumbnails"


def ffmpeg_executable() -> str | None:
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        return None


class ThumbnailCache(QObject):
    ready = Signal(str)  # the clip whose thumbnail is now cached

    def __init__(self, folder: Path | None = None, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.folder = folder or default_cache_dir()
        self._waiting: deque[Path] = deque()
        self._failed: set[str] = set()
        self._process: QProcess | None = None
        self._current: tuple[Path, Path] | None = None  # (clip, thumbnail being written)

    def path_for(self, clip: Path) -> Path | None:
        try:
            info = clip.stat()
        except OSError:
            return None
        key = f"{clip.resolve()}:{info.st_size}:{info.st_mtime_ns}".encode()
        return self.folder / f"{hashlib.sha1(key).hexdigest()}.png"

    def get(self, clip: Path) -> QImage | None:
        """The cached thumbnail, or None (then one is made, and `ready` says when)."""
        path = self.path_for(clip)
        if path is None:
            return None
        if path.is_file():
            image = QImage(str(path))
            if not image.isNull():
                return image
        if str(clip) not in self._failed and clip not in self._waiting:
            self._waiting.append(clip)
            self._next()
        return None

    def pending(self) -> int:
        return len(self._waiting) + (self._current is not None)

    def _next(self) -> None:
        if self._process is not None or not self._waiting:
            return
        exe = ffmpeg_executable()
        clip = self._waiting.popleft()
        target = self.path_for(clip)
        if exe is None or target is None:
            self._failed.add(str(clip))
            return self._next()
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".part.png")
        self._current = (clip, partial)
        process = QProcess(self)
        process.finished.connect(self._on_finished)
        process.errorOccurred.connect(self._on_error)
        self._process = process
        args = ["-hide_banner", "-nostdin", "-v", "error", "-i", str(clip), "-frames:v", "1"]
        args += ["-vf", f"scale={THUMBNAIL_WIDTH}:-2", "-y", str(partial)]
        process.start(exe, args)

    def _on_finished(self, code: int, status: QProcess.ExitStatus) -> None:
        clip, partial = self._current
        target = self.path_for(clip)
        ok = (
            code == 0
            and status == QProcess.ExitStatus.NormalExit
            and partial.is_file()
            and target is not None
        )
        if ok:
            os.replace(partial, target)  # complete files only, under their final name
        else:
            self._failed.add(str(clip))
            partial.unlink(missing_ok=True)
        self._done()
        if ok:
            self.ready.emit(str(clip))

    def _on_error(self, error: QProcess.ProcessError) -> None:
        if error == QProcess.ProcessError.FailedToStart and self._current is not None:
            self._failed.add(str(self._current[0]))
            self._done()

    def _done(self) -> None:
        if self._process is not None:
            self._process.deleteLater()
        self._process, self._current = None, None
        self._next()

    def stop(self) -> None:
        """Kill a running ffmpeg (the window is closing)."""
        self._waiting.clear()
        if self._process is not None:
            self._process.finished.disconnect(self._on_finished)
            self._process.kill()
            self._process.waitForFinished(2000)
            self._done()
