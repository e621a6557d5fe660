"""Progress of the running job: stage, step n/N, it/s, ETA, and one bar across all the stages.

`JobProgress` is the model (fed with the engine's `stage` and `step` events, no widgets), and
`ProgressPanel` shows it.
"""

from __future__ import annotations

import time
from typing import Any

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QHBoxLayout, QLabel, QProgressBar, QSizePolicy, QVBoxLayout, QWidget

from engine.protocol import STAGES

# Share of the overall bar per stage: denoising dominates every job; loading is often instant
# (warm workers) but can be long, so it gets a modest slice rather than a guess.
STAGE_WEIGHTS = {"load": 0.10, "encode": 0.05, "denoise": 0.75, "decode": 0.08, "save": 0.02}
# Step events come hundreds a second with several ranks; a new label text relayouts the window
# (the label's size hint changes), so steps refresh the panel at most this often.
STEP_REFRESH_MS = 100


class JobProgress:
    def __init__(self) -> None:
        self.reset()

    def reset(self, job_id: str = "") -> None:
        self.job_id = job_id
        self.stage = ""
        self.step = 0  # steps finished on rank 0
        self.total = 0
        self.denoise_started: float | None = None
        self.finished = False

    def on_stage(self, stage: str) -> None:
        if self.stage in STAGES and stage in STAGES and STAGES.index(stage) < STAGES.index(self.stage):
            self.step, self.total = 0, 0  # the next run of a comparison
        self.stage = stage
        if stage == "denoise":
            self.denoise_started = time.monotonic()

    def on_step(self, event: dict[str, Any]) -> None:
        if event.get("rank", 0) != 0:
            return
        self.total = int(event.get("total", self.total) or 0)
        self.step = max(self.step, int(event.get("step", 0)) + 1)
        if self.stage in ("", "load", "encode"):
            self.on_stage("denoise")  # a step means denoising has begun, whatever arrived first

    def finish(self) -> None:
        self.finished = True

    def rate(self) -> float | None:
        """Denoising steps per second so far (rank 0)."""
        if self.denoise_started is None or self.step == 0:
            return None
        elapsed = time.monotonic() - self.denoise_started
        return self.step / elapsed if elapsed > 0 else None

    def eta_s(self) -> float | None:
        rate = self.rate()
        if rate is None or not self.total:
            return None
        return max(0.0, (self.total - self.step) / rate)

    def fraction(self) -> float:
        """0..1 across load, encode, denoise, decode and save."""
        if self.finished:
            return 1.0
        if self.stage not in STAGES:
            return 0.0
        done = sum(STAGE_WEIGHTS[s] for s in STAGES[: STAGES.index(self.stage)])
        if self.stage == "denoise" and self.total:
            done += STAGE_WEIGHTS["denoise"] * min(1.0, self.step / self.total)
        return min(1.0, done)

    def text(self) -> str:
        if not self.job_id:
            return "idle"
        if self.finished:
            return "done"
        parts = [self.stage or "queued"]
        if self.total:
            parts.append(f"step {self.step}/{self.total}")
        rate = self.rate()
        if rate is not None and self.stage == "denoise":
            parts.append(f"{rate:.2f} it/s")
            eta = self.eta_s()
            if eta is not None:
                parts.append(f"ETA {eta:.1f} s")
        return " · ".join(parts)


class ProgressPanel(QWidget):
    def __init__(self, progress: JobProgress, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.progress = progress
        self.label = QLabel("idle", wordWrap=True)
        # A long error wraps here instead of widening the window past the screen.
        self.label.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)
        self.bar = QProgressBar()
        self.bar.setRange(0, 1000)
        self.bar.setTextVisible(False)
        self.bar.setFixedHeight(10)
        row = QHBoxLayout()
        row.addWidget(self.label, 1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addLayout(row)
        layout.addWidget(self.bar)
        self._soon = QTimer(self, singleShot=True, interval=STEP_REFRESH_MS)
        self._soon.timeout.connect(self.refresh)

    def refresh_soon(self) -> None:
        """Refresh within STEP_REFRESH_MS, once for a burst of calls (step events)."""
        if not self._soon.isActive():
            self._soon.start()

    def set_message(self, text: str) -> None:
        """Show `text` instead of the progress (a job that ended early); a pending refresh is dropped."""
        self._soon.stop()
        self.label.setText(text)

    def refresh(self) -> None:
        self._soon.stop()
        self.label.setText(self.progress.text())
        self.bar.setValue(round(self.progress.fraction() * 1000))
