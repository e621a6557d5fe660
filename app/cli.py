"""The headless command line: generate, compare, decode, models, pull, devices. Drives the same engine as
the window."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from typing import Any

from engine.errors import JobCancelled, UserError, WorkerFailure
from engine.protocol import GenerationRequest, StageEvent, StepEvent


def _add_request_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="embedded model name, model folder or HF cache name")
    parser.add_argument("--prompt", default="")
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--image", help="conditioning image (Stable Video Diffusion)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--guidance-scale", type=float)
    parser.add_argument("--frames", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--fps", type=int)
    parser.add_argument("--seconds", type=float, help="audio length")
    for name, (help_text, owners) in strategy_options().items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=int, dest=name, help=f"{help_text} ({', '.join(owners)})")
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:WEIGHT]",
        help="a LoRA adapter (.safetensors) applied for this job, weight 1 unless given; repeatable",
    )
    parser.add_argument("--devices", default="auto", help="auto, cpu:N or cuda:0,1,...")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    parser.add_argument("--output", help="clip file (.mp4 .gif .wav .flac) or folder")
    parser.add_argument("--no-previews", action="store_true", help="do not render x0 previews")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def strategy_options() -> dict[str, tuple[str, list[str]]]:
    """Every strategy option: name -> (help, the strategies that take it); one flag each."""
    from engine.strategies import STRATEGIES

    options: dict[str, tuple[str, list[str]]] = {}
    for cls in STRATEGIES.values():
        for option in cls.options:
            options.setdefault(option.name, (option.help, []))[1].append(cls.name)
    return options


def build_parser() -> argparse.ArgumentParser:
    from app.pull_command import add_pull_arguments
    from engine.strategies import STRATEGIES

    parser = argparse.ArgumentParser(
        prog="parastep-studio",
        description="Generate video and audio clips with diffusion models, step-parallel over devices.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="make one clip")
    _add_request_options(generate)
    generate.add_argument("--strategy", default="sequential", choices=sorted(STRATEGIES))
    compare = commands.add_parser("compare", help="one request under several strategies, same seed")
    _add_request_options(compare)
    compare.add_argument("--strategies", required=True, help="NAME[@DEVICES][,NAME[@DEVICES]...]")
    decode = commands.add_parser("decode", help="save the clip of a run whose decode or save failed")
    decode.add_argument("latents", help="a latents file named in the error message")
    decode.add_argument("--output", help="clip file or folder (default: the run's own choice)")
    decode.add_argument("--device", default="cpu", help="where to decode (cpu, cuda:0, ...)")
    decode.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    decode.add_argument("--json", action="store_true")
    models = commands.add_parser("models", help="list the models found")
    models.add_argument("--json", action="store_true")
    models.add_argument("--folder", action="append", default=[], help="also look in this model folder")
    models.add_argument(
        "--available", action="store_true", help="list the checkpoints `pull` knows, with what is installed"
    )
    models.add_argument("--delete", metavar="NAME", help="delete a pulled model (NAME or hub id)")
    pull = commands.add_parser("pull", help="download, verify and install a checkpoint from the hub")
    add_pull_arguments(pull)
    devices = commands.add_parser("devices", help="list GPUs and CPU")
    devices.add_argument("--json", action="store_true")
    return parser


def request_from_args(args: argparse.Namespace, strategy: str = "sequential") -> GenerationRequest:
    from engine.loras import parse_lora_arg

    options = {
        name: getattr(args, name) for name in strategy_options() if getattr(args, name, None) is not None
    }
    return GenerationRequest(
        model=args.model,
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        image=args.image,
        seed=args.seed,
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        frames=args.frames,
        height=args.height,
        width=args.width,
        fps=args.fps,
        seconds=args.seconds,
        strategy=strategy,
        strategy_options=options,
        devices=args.devices,
        output=args.output,
        loras=[parse_lora_arg(text) for text in args.lora],
    )


class ProgressPrinter:
    """Stage lines and one live step line (step n/N, it/s, ETA) on stderr while a job runs."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.started: float | None = None
        self.live_line = False  # a \r-updated line is open

    def __call__(self, event: Any) -> None:
        if self.quiet:
            return
        if isinstance(event, StageEvent):
            self.end_line()
            self.started = time.perf_counter() if event.stage == "denoise" else None
            print(f"[{event.stage}]", file=sys.stderr, flush=True)
        elif isinstance(event, StepEvent) and event.rank == 0 and self.started is not None:
            elapsed = time.perf_counter() - self.started
            rate = (event.step + 1) / elapsed if elapsed > 0 else 0.0
            eta = (event.total - event.step - 1) / rate if rate else 0.0
            line = f"\r  step {event.step + 1}/{event.total}  {rate:5.1f} it/s  ETA {eta:4.1f} s"
            print(line, end="", file=sys.stderr, flush=True)
            self.live_line = True

    def end_line(self) -> None:
        if self.live_line:
            print(file=sys.stderr)
            self.live_line = False


def print_json(data: Any) -> None:
    from engine.metrics import json_safe  # JSON has no infinity: an identical clip's PSNR is "inf"

    print(json.dumps(json_safe(data), indent=2))


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["pull"]:  # needs no torch: skip the parser, which imports the strategies
        from app import pull_command

        return pull_command.main(argv[1:])
    args = build_parser().parse_args(argv)
    previous = {}
    if args.command in ("generate", "compare") and threading.current_thread() is threading.main_thread():
        # A closed terminal or a `kill` stops the workers and removes their files, as Ctrl-C does.
        previous = {signum: signal.signal(signum, _interrupt) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        return _run(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except WorkerFailure as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except JobCancelled:
        print("cancelled", file=sys.stderr)
        return 130
    except KeyboardInterrupt as exc:
        print("\ninterrupted" + (f": {exc}" if str(exc) else ""), file=sys.stderr)
        return 130
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _run(args: argparse.Namespace) -> int:
    if args.command == "devices":
        from engine.devices import inventory

        devices = [d.to_dict() for d in inventory()]
        if args.json:
            print_json({"devices": devices})
        else:
            for d in devices:
                memory = (
                    f"  {d['memory_free'] / 2**30:.1f}/{d['memory_total'] / 2**30:.1f} GiB free"
                    if d["memory_total"]
                    else ""
                )
                print(f"{d['id']:8} {d['name']}{memory}")
        return 0
    if args.command == "models" and (args.available or args.delete):
        from app.pull_command import run_models_available, run_models_delete

        return run_models_delete(args.delete, args.json) if args.delete else run_models_available(args.json)
    if args.command == "models":
        from pathlib import Path

        from engine.catalog import ModelCatalog

        entries = [e.to_dict() for e in ModelCatalog([Path(f) for f in args.folder]).entries()]
        if args.json:
            print_json({"models": entries})
        else:
            for e in entries:
                print(f"{e['name']:24} {e['family']:12} {e['source']:9} {e['path']}")
        return 0

    from engine.engine import Engine

    if args.command == "decode":
        summary = Engine(dtype=args.dtype).finish_pending(args.latents, args.output, args.device)
        if args.json:
            print_json(summary)
        else:
            print(f"saved {summary['output']}")
        return 0
    with Engine(dtype=args.dtype) as engine:
        progress = ProgressPrinter(quiet=args.json)
        try:
            return _run_jobs(args, engine, progress)
        finally:
            progress.end_line()  # an error or "interrupted" starts on a line of its own


def _run_jobs(args: argparse.Namespace, engine: Any, progress: ProgressPrinter) -> int:
    if args.command == "generate":
        request = request_from_args(args, args.strategy)
        summary = engine.generate(request, progress, previews=not args.no_previews)
        if args.json:
            print_json(summary)
        else:
            print(f"\nsaved {summary['output']} (denoise {summary['timings']['denoise_s']:.2f} s)")
        return 0
    from engine.compare import compare, parse_strategy_specs

    request = request_from_args(args)
    if request.output and not (request.output.endswith("/") or os.path.isdir(request.output)):
        raise UserError(
            f"compare writes one clip per strategy; --output '{request.output}' is not a folder.",
            "Give a folder (ending in /) or leave --output out.",
        )
    specs = parse_strategy_specs(args.strategies, args.devices)
    report = compare(engine, request, specs, progress, previews=not args.no_previews)
    if args.json:
        print_json(report)
    else:
        _print_table(report["rows"])
    return 0


def _print_table(rows: list[dict[str, Any]]) -> None:
    print()
    header = f"{'strategy':12} {'devices':9} {'denoise s':>9} {'speedup':>8} {'ideal':>6}  fidelity"
    print(header)
    for row in rows:
        speedup = f"{row['speedup']:.2f}x" if row["speedup"] else "-"
        fid = row["fidelity"] or {}
        text = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in fid.items())
        print(
            f"{row['strategy']:12} {row['devices']:9} {row['denoise_s']:9.3f} {speedup:>8} "
            f"{row['ideal_speedup']:5.2f}x  {text}"
        )


if __name__ == "__main__":
    sys.exit(main())
