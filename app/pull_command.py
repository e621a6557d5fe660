"""`parastep-studio pull` and `models --available/--delete`: the command-line face of engine/downloads.py.

With `--json`, `pull` writes one JSON object per line on stdout (`progress` events, then `done`); the
window runs it as a child process and reads those lines. SIGTERM or SIGINT cancel the pull cleanly (the
partial file is kept, so the next pull resumes); a second one stops at once.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from typing import Any

from engine.checkpoints import available, delete_installed, format_size
from engine.errors import JobCancelled, UserError


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "--"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def progress_line(event: Any) -> str:
    """`  1.2 GB / 13.3 GB   9%   45.0 MB/s  ETA 4m28s  transformer/...` (also used by the window)."""
    percent = 100 * event.done_bytes / event.total_bytes if event.total_bytes else 0
    return (
        f"{format_size(event.done_bytes)} / {format_size(event.total_bytes)}  {percent:3.0f}%  "
        f"{format_size(event.speed_bps)}/s  ETA {_duration(event.eta_s)}  {event.file}"
    )


def add_pull_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "spec", metavar="NAME|HUB_ID[@REV]", help="a name from `models --available` or a hub id"
    )
    parser.add_argument(
        "--token", help="hub token for gated models (default: $HF_TOKEN, then the saved login)"
    )
    parser.add_argument("--json", action="store_true", help="progress and the result as JSON lines on stdout")


def main(argv: list[str]) -> int:
    """`pull` without the rest of the command line, whose parser imports torch (seconds) for the
    strategies' options: the window starts this one."""
    parser = argparse.ArgumentParser(prog="parastep-studio pull")
    add_pull_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_pull(args.spec, args.token, args.json)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except JobCancelled:
        print("cancelled (the part downloaded is kept; pull again to resume)", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("\ninterrupted (pull again to resume)", file=sys.stderr)
        return 130


def run_pull(spec: str, token: str | None, as_json: bool) -> int:
    from engine.downloads import pull

    cancel = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        if cancel.is_set():
            raise KeyboardInterrupt
        cancel.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    live = False

    def on_progress(event: Any) -> None:
        nonlocal live
        if as_json:
            print(json.dumps(event.to_dict()), flush=True)
        elif event.stage in ("download", "verify"):
            print(f"\r  {progress_line(event):<110.110}", end="", file=sys.stderr, flush=True)
            live = True

    try:
        folder = pull(spec, on_progress, cancel, token)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if live:
            print(file=sys.stderr)
    if as_json:
        print(json.dumps({"type": "done", "path": str(folder)}), flush=True)
    else:
        print(f"installed {folder} (verified); use it with --model {spec.partition('@')[0]}")
    return 0


def run_models_available(as_json: bool) -> int:
    rows = available()
    if as_json:
        print(json.dumps({"checkpoints": rows}, indent=2))
        return 0
    print(f"{'name':22} {'hub id':58} {'size':>9} {'GPU':>6}  {'installed':10} licence")
    for row in rows:
        gated = ", gated" if row["gated"] else ""
        print(
            f"{row['name']:22} {row['hub_id']:58} {format_size(row['size_bytes']):>9} "
            f"{row['gpu_memory_gb']:4.0f}GB  {row['installed'] or '-':10} {row['licence']}{gated}"
        )
    print(
        "\nSizes and GPU memory are approximate (see `notes` in --json). Get one: parastep-studio pull NAME"
    )
    return 0


def run_models_delete(name: str, as_json: bool) -> int:
    folder = delete_installed(name)
    print(json.dumps({"deleted": str(folder)}) if as_json else f"deleted {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
