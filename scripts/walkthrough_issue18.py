"""A walk-through of issue 18's findings in the real window and engine, under Xvfb: saves
docs/screenshots/issue18-*.png to look at.

    .venv/bin/python -m scripts.walkthrough_issue18 [--out docs/screenshots]

A queue job is left from "last time" (the window opens with it paused), then the request is made
invalid in the ways the walk-through found (1000 frames, cfg-parastep on one worker, Compare on
cpu:99) and each state is captured, with the About box last. Nothing of the user's is touched.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from engine.protocol import GenerationRequest
from scripts import screenshots

REPO = Path(__file__).resolve().parents[1]

REQUEST = GenerationRequest(
    model="tiny-cogvideox",
    prompt="a paper boat drifting on a pond at dawn",
    seed=7,
    steps=4,
    frames=9,
    height=64,
    width=96,
    strategy="sequential",
    devices="cpu:1",
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "screenshots"))
    out = Path(parser.parse_args().out)
    out.mkdir(parents=True, exist_ok=True)
    xvfb, display = screenshots.start_xvfb()
    os.environ.update({"DISPLAY": display, "QT_QPA_PLATFORM": "xcb"})
    work = Path(tempfile.mkdtemp(prefix="parastep-walkthrough-"))
    screenshots.isolate(work)
    try:
        return walk(out, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        xvfb.terminate()
        xvfb.wait(10)


def walk(out: Path, work: Path) -> int:
    from PySide6.QtTest import QTest
    from PySide6.QtWidgets import QApplication

    from app.engine_process import EngineProcess
    from engine.job_queue import QUEUE_FILE, JobQueue
    from ui.engine_client import EngineClient
    from ui.main_window import MainWindow

    app = QApplication([sys.argv[0]])
    app.setApplicationName("ParaStep Studio")
    JobQueue(work / "state" / QUEUE_FILE).submit(REQUEST.to_dict())  # a job kept from last time

    def wait_until(predicate, timeout_s: float, what: str) -> None:  # noqa: ANN001
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise SystemExit(f"error: timed out waiting for {what}")
            QTest.qWait(20)

    def save(name: str, whole_screen: bool = False) -> None:
        QTest.qWait(400)
        screen = window.screen()
        shot = screen.grabWindow(0) if whole_screen else screen.grabWindow(window.winId())
        if shot.isNull() or shot.width() < 100:
            shot = window.grab()
        shot.save(str(out / name))
        print(f"saved {out / name} ({shot.width()}x{shot.height()})", flush=True)

    folder = work / "sock"
    folder.mkdir(mode=0o700)
    socket_path = str(folder / "engine.sock")
    launcher = EngineProcess(socket_path)
    client = EngineClient(socket_path, launcher)
    window = MainWindow(client, output_dir=work / "clips")
    window.ask_about_jobs = lambda running, queued: "discard"
    launcher.output.connect(window.engine_panel.append)
    window.resize(*screenshots.WINDOW)
    window.move(0, 0)
    window.show()
    client.start()
    panel, lab = window.request_panel, window.compare_lab

    def checked() -> bool:
        return not panel._check_timer.isActive() and not panel.validation.pending

    try:
        wait_until(lambda: bool(window.models), 180, "the engine's catalog")
        wait_until(lambda: window.queue_panel.held_row.isVisible(), 30, "the kept queue")
        panel.set_request(REQUEST)
        wait_until(checked, 60, "the first check")
        save("issue18-kept-queue.png")

        panel.frames.setValue(1000)
        wait_until(lambda: checked() and panel.validation.invalid, 60, "the frames check")
        save("issue18-frames-check.png")

        panel.fix_button.click()
        wait_until(lambda: checked() and not panel.validation.invalid, 60, "the fixed frames")
        panel.strategy_picker.choose_strategy("cfg-parastep")
        panel.strategy_picker.cpu_workers.setValue(1)
        wait_until(lambda: checked() and panel.validation.invalid, 60, "the workers check")
        save("issue18-workers-fix.png")
        panel.fix_button.click()
        wait_until(lambda: checked() and not panel.validation.invalid, 60, "the fixed workers")

        panel.set_request(REQUEST)
        window.tabs.setCurrentWidget(lab)
        lab.set_entries([["sequential", "cpu:1"], ["parastep", "cpu:99"]])
        lab.check_now()
        wait_until(lambda: lab.check.invalid, 60, "the comparison check")
        lab.rows[1].devices.showPopup()
        save("issue18-compare-devices.png", whole_screen=True)
        lab.rows[1].devices.hidePopup()

        # A new family (issue 15): an audio model's request shows its length, not frames; a LoRA row.
        window.tabs.setCurrentIndex(0)
        panel.set_request(GenerationRequest(model="tiny-stable-audio", prompt="rain on a tin roof", steps=8))
        panel.lora_list.add("/loras/style.safetensors", 0.8)
        wait_until(checked, 60, "the audio model's check")
        save("issue15-stable-audio-request.png")

        help_menu = next(a.menu() for a in window.menuBar().actions() if a.text() == "&Help")
        next(a for a in help_menu.actions() if a.text().startswith("About")).trigger()
        save("issue18-about.png", whole_screen=True)
    finally:
        window.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
