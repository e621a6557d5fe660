"""Runs the engine as a background process (`python -m app.engine_main --socket PATH`) with QProcess.

The window never imports torch: everything that runs models lives in that process. Its output
goes to the window's log; when it exits without being asked to, `died` says so (the client then
decides whether to start it again).
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable
from pathlib import Path

from PySide6.QtCore import QObject, QProcess, QProcessEnvironment, QTimer, Signal

REPO_ROOT = Path(__file__).resolve().parents[1]
# After the `shutdown` message: time to stop the running job and the workers and exit (the engine
# itself waits up to 15 s for a running job), before SIGTERM; then SIGKILL, which may orphan workers.
SHUTDOWN_GRACE_MS = 20_000
TERMINATE_GRACE_MS = 5_000
OUTPUT_LINES_KEPT = 40


class EngineProcess(QObject):
    """Starts, watches and stops the engine process."""

    started = Signal()
    died = Signal(int, str)  # exit code (-1: could not start), last lines of its output
    output = Signal(str)  # one line the engine printed

    def __init__(
        self,
        socket_path: str,
        python: str = sys.executable,
        extra_env: dict[str, str] | None = None,
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self.socket_path = socket_path
        self.python = python
        self.extra_env = dict(extra_env or {})
        self._process: QProcess | None = None
        self._tail: deque[str] = deque(maxlen=OUTPUT_LINES_KEPT)
        self._partial = ""

    def is_running(self) -> bool:
        return self._process is not None and self._process.state() != QProcess.ProcessState.NotRunning

    def pid(self) -> int | None:
        return int(self._process.processId()) if self.is_running() else None

    def start(self) -> None:
        if self.is_running():
            return
        process = QProcess(self)
        process.setProcessChannelMode(QProcess.ProcessChannelMode.MergedChannels)
        process.setWorkingDirectory(str(REPO_ROOT))
        env = QProcessEnvironment.systemEnvironment()
        env.insert("PYTHONUNBUFFERED", "1")  # log lines as they happen
        for key, value in self.extra_env.items():
            env.insert(key, value)
        process.setProcessEnvironment(env)
        process.readyReadStandardOutput.connect(self._on_output)
        process.finished.connect(self._on_finished)
        process.errorOccurred.connect(self._on_error)
        process.started.connect(self.started)
        self._tail.clear()
        self._partial = ""
        self._process = process
        process.start(self.python, ["-m", "app.engine_main", "--socket", self.socket_path])

    def stop(self) -> None:
        """Wait for the engine to exit after `shutdown` (sent by the client), escalating to SIGTERM
        and SIGKILL. Blocks for a few seconds at most; used when the window closes."""
        process = self._detach()
        if process is None:
            return
        if not process.waitForFinished(SHUTDOWN_GRACE_MS):
            self.output.emit("the engine did not stop in time; terminating it")
            process.terminate()
            if not process.waitForFinished(TERMINATE_GRACE_MS):
                self.output.emit("the engine did not terminate; killing it")
                process.kill()
                process.waitForFinished(-1)
        self._read_output(process)  # its last words
        process.deleteLater()

    def stop_later(self, then: Callable[[], None]) -> None:
        """Like `stop`, but on timers: the event loop keeps running; `then()` runs once it has exited."""
        process = self._detach()
        if process is None:
            then()
            return

        def finished() -> None:
            terminate.stop()
            kill.stop()
            process.deleteLater()
            then()

        terminate = QTimer(process, singleShot=True, interval=SHUTDOWN_GRACE_MS)
        terminate.timeout.connect(process.terminate)
        kill = QTimer(process, singleShot=True, interval=SHUTDOWN_GRACE_MS + TERMINATE_GRACE_MS)
        kill.timeout.connect(process.kill)
        process.finished.connect(finished)
        terminate.start()
        kill.start()

    def _detach(self) -> QProcess | None:
        """Take the running process out of our watch, so that its exit is not reported as a death."""
        process, self._process = self._process, None
        if process is None:
            return None
        process.finished.disconnect(self._on_finished)
        process.errorOccurred.disconnect(self._on_error)
        if process.state() == QProcess.ProcessState.NotRunning:
            process.deleteLater()
            return None
        return process

    def last_output(self) -> str:
        return "\n".join(self._tail)

    def _on_output(self) -> None:
        sender = self.sender()
        self._read_output(sender if isinstance(sender, QProcess) else self._process)

    def _read_output(self, process: QProcess | None) -> None:
        if process is None:
            return
        text = self._partial + bytes(process.readAllStandardOutput().data()).decode("utf-8", "replace")
        *lines, self._partial = text.replace("\r", "\n").split("\n")
        for line in lines:
            if line.strip():
                self._tail.append(line)
                self.output.emit(line)

    def _on_finished(self, code: int, status: QProcess.ExitStatus) -> None:
        self._read_output(self._process)
        if self._partial.strip():
            self._tail.append(self._partial)
            self.output.emit(self._partial)
            self._partial = ""
        if status == QProcess.ExitStatus.CrashExit and code == 0:
            code = -1
        self.died.emit(code, self.last_output())

    def _on_error(self, error: QProcess.ProcessError) -> None:
        if error == QProcess.ProcessError.FailedToStart:
            self._tail.append(f"could not start {self.python}: {self._process.errorString()}")
            self.died.emit(-1, self.last_output())
