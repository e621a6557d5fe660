"""The engine process the window starts: `python -m app.engine_main --socket PATH`.

It serves the job queue on a local socket (docs/protocol.md) until a client sends `shutdown`, it
gets SIGTERM/SIGINT/SIGHUP, or the process that started it dies (so a crashed window leaves no
engine behind; the window starts a new one and the queue, saved on disk, carries over). On the way
out it stops the running job (which becomes `interrupted`), the worker processes, and removes the
socket. No Qt here, and torch is only imported by the engine's runner thread, after the socket is up.
"""

from __future__ import annotations

import argparse
import signal
import sys

from engine.errors import UserError
from engine.logfile import route_warnings
from engine.server import EngineServer
from engine.socket_path import default_socket_path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m app.engine_main", description="ParaStep Studio's background engine process."
    )
    parser.add_argument("--socket", help=f"local socket path (default {default_socket_path()})")
    parser.add_argument("--folder", action="append", default=[], help="also list models in this folder")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    parser.add_argument(
        "--keep-running",
        action="store_true",
        help="do not stop when the process that started the engine exits",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    route_warnings()  # library FutureWarnings to engine.log, not the window's Engine panel
    server = EngineServer(
        args.socket, model_folders=args.folder, dtype=args.dtype, watch_parent=not args.keep_running
    )

    def stop(signum: int, frame: object) -> None:
        server.stop()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, stop)
    try:
        server.start()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"parastep-engine listening on {server.socket_path}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
