"""Screenshots of the real window, driving the real engine: remakes docs/screenshots/*.png.

    .venv/bin/python -m scripts.screenshots [--out docs/screenshots] [--use-display]

Without `--use-display` it starts its own X server (Xvfb; `apt-get install xvfb`) and runs the
window on it through Qt's xcb platform; with it, the window opens on $DISPLAY. The engine, its queue,
the clips and the window's settings all live in a temporary folder, so nothing of the user's is
touched. It makes three clips for the history (parastep on cpu:2), then captures:

- main-window.png: a 60-step parastep job on cpu:2, mid-run (x0 preview, per-rank timeline, queue);
- compare-lab.png: sequential@cpu:1 against parastep@cpu:2, with the table and the chart filled;
- history.png: the History tab with the clips made above, the newest one playing in the Result tab.

Takes about two minutes on a 2-core CPU machine (most of it starting worker processes).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from engine.protocol import GenerationRequest

REPO = Path(__file__).resolve().parents[1]

SCREEN = (1600, 1000)
WINDOW = (1500, 940)
BASE = GenerationRequest(
    model="tiny-cogvideox",
    prompt="a paper boat drifting on a pond at dawn",
    seed=7,
    steps=10,
    frames=9,
    height=128,
    width=192,
    strategy="parastep",
    strategy_options={"warmup": 2},
    devices="cpu:2",
)
HISTORY = [
    ("a paper boat drifting on a pond at dawn", 7),
    ("a red kite over a windy beach", 12),
    ("snow falling on a quiet street at night", 21),
]


def start_xvfb() -> tuple[subprocess.Popen, str]:
    """An X server on a free display number; returns it and its DISPLAY."""
    if shutil.which("Xvfb") is None:
        raise SystemExit(
            "error: Xvfb is not installed. Fix: apt-get install -y xvfb (or pass --use-display)."
        )
    read, write = os.pipe()
    server = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write), "-screen", "0", f"{SCREEN[0]}x{SCREEN[1]}x24", "-nolisten", "tcp"],
        pass_fds=(write,),
        stderr=subprocess.DEVNULL,
    )
    os.close(write)
    with os.fdopen(read) as pipe:
        number = pipe.readline().strip()
    if not number:
        server.kill()
        raise SystemExit("error: Xvfb did not start.")
    return server, f":{number}"


def isolate(work: Path) -> None:
    """Settings, caches, queue and clips of this run in `work`: nothing of the user's is touched."""
    os.environ.update(
        {
            "XDG_CONFIG_HOME": str(work / "config"),
            "XDG_CACHE_HOME": str(work / "cache"),
            "PARASTEP_STATE_DIR": str(work / "state"),
            "PARASTEP_OUTPUT_DIR": str(work / "clips"),
            "QT_LOGGING_RULES": "qt.multimedia.*=false",
        }
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "screenshots"), help="where the PNGs go")
    parser.add_argument("--use-display", action="store_true", help="open the window on $DISPLAY")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    xvfb = None
    if not args.use_display:
        xvfb, display = start_xvfb()
        os.environ["DISPLAY"] = display
        os.environ["QT_QPA_PLATFORM"] = "xcb"
    work = Path(tempfile.mkdtemp(prefix="parastep-screenshots-"))
    isolate(work)
    try:
        return capture(out, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if xvfb is not None:
            xvfb.terminate()
            xvfb.wait(10)


def capture(out: Path, work: Path) -> int:
    from PySide6.QtTest import QTest
    from PySide6.QtWidgets import QApplication

    app = QApplication([sys.argv[0]])
    app.setApplicationName("ParaStep Studio")
    from app.engine_process import EngineProcess
    from ui.engine_client import EngineClient, EngineState
    from ui.main_window import MainWindow

    def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            if time.monotonic() > deadline:
                raise SystemExit(f"error: timed out waiting for {what}")
            QTest.qWait(20)

    def save(name: str) -> None:
        QTest.qWait(300)  # let the last repaints land
        screen = window.screen()
        shot = screen.grabWindow(window.winId()) if app.platformName() == "xcb" else window.grab()
        if shot.isNull() or shot.width() < 100:
            shot = window.grab()
        path = out / name
        shot.save(str(path))
        print(f"saved {path} ({shot.width()}x{shot.height()})", flush=True)

    folder = work / "sock"
    folder.mkdir(mode=0o700)
    socket_path = str(folder / "engine.sock")
    launcher = EngineProcess(socket_path)
    client = EngineClient(socket_path, launcher)
    window = MainWindow(client, output_dir=work / "clips")
    launcher.output.connect(window.engine_panel.append)
    window.resize(*WINDOW)
    window.move(0, 0)
    window.show()
    client.start()
    finished: list[str] = []
    client.job_finished.connect(lambda job_id, result: finished.append(job_id))
    client.job_cancelled.connect(lambda job_id: finished.append(job_id))
    steps: dict[str, int] = {}
    client.step_received.connect(
        lambda e: (
            steps.__setitem__(e["job_id"], max(steps.get(e["job_id"], -1), e["step"]))
            if e.get("rank") == 0
            else None
        )
    )

    def submit(request: GenerationRequest) -> str:
        ids: list[str] = []
        window.request_panel.set_request(request)
        client.submit(request.to_dict(), on_reply=lambda reply: ids.append(reply.get("job_id", "")))
        wait_until(lambda: bool(ids), 10, "the engine to queue the job")
        return ids[0]

    try:
        wait_until(lambda: bool(window.models), 180, "the engine's catalog")
        window.request_panel.set_seed_mode("fixed")

        # A few clips for the history (the first one starts the cpu:2 workers).
        history_jobs = [
            submit(dataclasses.replace(BASE, prompt=prompt, seed=seed)) for prompt, seed in HISTORY
        ]
        wait_until(lambda: set(history_jobs) <= set(finished), 300, "the history clips")

        # Mid-generation: a long parastep job, caught halfway with a preview on screen.
        long_request = dataclasses.replace(
            BASE, prompt="a lighthouse beam sweeping over fog", seed=3, steps=60
        )
        long_job = submit(long_request)
        window.tabs.setCurrentIndex(0)
        window.side_tabs.setCurrentIndex(0)
        wait_until(
            lambda: steps.get(long_job, -1) >= 30 and window.preview.decoded > 0,
            120,
            "the long job to reach half way",
        )
        save("main-window.png")
        wait_until(lambda: long_job in finished, 120, "the long job to finish")

        # The comparison lab: sequential on one CPU worker against parastep on two.
        window.request_panel.set_request(
            dataclasses.replace(BASE, prompt="a spinning top on a table", seed=5, steps=12)
        )
        window.compare_lab.set_entries([["sequential", "cpu:1"], ["parastep", "cpu:2"]])
        count = len(finished)
        window.compare_lab.run_button.click()
        wait_until(lambda: len(finished) > count, 300, "the comparison")
        wait_until(lambda: window.compare_lab.table.rowCount() == 2, 10, "the comparison table")
        window.tabs.setCurrentWidget(window.compare_lab)
        save("compare-lab.png")

        # The history, with thumbnails made, the newest history clip selected and playing.
        window.side_tabs.setCurrentWidget(window.history_panel)
        window.history_panel.refresh()
        wait_until(lambda: window.thumbnails.pending() == 0, 60, "the thumbnails")
        window.history_panel.refresh()
        entries = window.history_panel.entries
        if entries:
            window.history_panel.list.setCurrentRow(0)
            window.show_result(str(entries[0].clip))
        QTest.qWait(1500)  # the player shows a frame
        save("history.png")
        return 0
    finally:
        window.close()  # stops the engine and its workers
        wait_until(lambda: client.state == EngineState.STOPPED, 30, "the engine to stop")
        window.deleteLater()
        QTest.qWait(50)
        app.shutdown()  # let go of the X server before it is stopped


if __name__ == "__main__":
    sys.exit(main())
