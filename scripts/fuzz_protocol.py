"""Fuzz a live engine process over its socket, then run one normal small job to completion.

    nice -n 5 .venv/bin/python -m scripts.fuzz_protocol [--frames 100000] [--seed 0] [--max-seconds 3600]

Starts `python -m app.engine_main` on a private Unix socket (its own state, output and TMPDIR folders
under a temporary root) and sends it `--frames` frames in batches, each batch on a new connection
(with or without `hello` first): random bytes, random JSON (NaN, Infinity, huge numbers, lone
surrogates, deep nesting included), mutated valid messages (fields replaced, dropped or added, types
swapped), byte-level mutations of valid frames, and broken framing (a length that lies, a frame over
16 MiB announced, a cut-off header). `shutdown` is never sent. Jobs that reach the queue name a model
that does not exist, so no worker starts during the fuzzing; the queue is emptied every few batches.

After every `--probe-every` batches a separate client asks for the queue; no answer in 30 s counts as
a hang. An engine process that exits counts as a crash (it is restarted, so the run goes on). At the
end it checks the queue file is strict JSON, runs one tiny-cogvideox job (9 frames, 64x96, 2 steps,
cpu:1) to a clip that decodes, and stops the engine with `shutdown` (exit status 0 expected).
Prints frames tried, time, crashes, hangs and contained errors (tracebacks in the engine's log);
exits 1 if anything failed. Every loop is bounded in count and time; traffic goes only to the
engine's Unix socket. Not part of the test suite (tests/test_fuzz_protocol.py is its short form).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from engine.client import EngineClient, EngineError
from engine.wire import HEADER, MAX_MESSAGE_BYTES, loads_strict

REPO = Path(__file__).resolve().parents[1]

NO_MODEL = {"model": "no-such-model-here", "prompt": "a red circle", "steps": 2}
GOOD_JOB = {
    "model": "tiny-cogvideox",
    "prompt": "a red circle",
    "frames": 9,
    "height": 64,
    "width": 96,
    "steps": 2,
    "devices": "cpu:1",
}
TYPES = ["hello", "queue", "submit", "reorder", "remove", "cancel", "requeue", "catalog", "allow_output"]
REQUEST_FIELDS = [
    "model", "prompt", "negative_prompt", "image", "seed", "steps", "guidance_scale", "frames", "height",
    "width", "fps", "seconds", "strategy", "strategy_options", "devices", "output", "version",
]  # fmt: skip
LONE_SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff", "a\ud83d", "\udcff.png"]
SPECIAL_NUMBERS = [0, 1, -1, 2**63, 2**64 + 1, 10**30, 262144, -0.0, 1e308, 5e-324]
PROBE_TIMEOUT_S = 30.0
READ_TIMEOUT_S = 2.0


def valid_messages() -> list[dict[str, Any]]:
    return [
        {"type": "hello", "version": 1},
        {"type": "queue", "id": 3},
        {"type": "submit", "request": dict(NO_MODEL)},
        {
            "type": "submit",
            "request": dict(NO_MODEL),
            "compare": [["sequential", "cpu:1"], ["parastep", "cpu:2"]],
        },
        {"type": "reorder", "job_ids": ["a", "b"]},
        {"type": "remove", "job_id": "a"},
        {"type": "cancel", "job_id": "a"},
        {"type": "requeue", "job_id": "a"},
        {"type": "catalog", "folders": ["/nonexistent-fuzz-folder"]},
        {"type": "allow_output", "folder": "/tmp/fuzz-clips"},
    ]


class Fuzzer:
    """Makes frames from one seeded random generator."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def text(self) -> str:
        rng = self.rng
        pick = rng.random()
        if pick < 0.15:
            return rng.choice(LONE_SURROGATES)
        if pick < 0.3:
            return rng.choice(["", "tiny-cogvideox", "cpu:2", "parastep", "../../etc", "/", "~", "a" * 5000])
        return "".join(
            chr(rng.choice([rng.randint(32, 126), rng.randint(0, 0x10FFFF)]))
            for _ in range(rng.randint(0, 12))
        )

    def number(self) -> Any:
        rng = self.rng
        pick = rng.random()
        if pick < 0.2:
            return rng.choice([float("nan"), float("inf"), float("-inf")])
        if pick < 0.5:
            return rng.choice(SPECIAL_NUMBERS)
        if pick < 0.75:
            return rng.randint(-(2**40), 2**40)
        return rng.uniform(-1e6, 1e6)

    def value(self, depth: int = 0) -> Any:
        rng = self.rng
        pick = rng.random()
        if depth > 4 or pick < 0.55:
            return rng.choice([None, True, False, self.number(), self.text(), self.number(), self.text()])
        if pick < 0.8:
            return [self.value(depth + 1) for _ in range(rng.randint(0, 4))]
        return {self.text(): self.value(depth + 1) for _ in range(rng.randint(0, 4))}

    def dumps(self, value: Any) -> bytes:
        """As a careless client would send it: NaN allowed, surrogates escaped or raw."""
        text = json.dumps(value, allow_nan=True, ensure_ascii=self.rng.random() < 0.5)
        return text.encode("utf-8", "surrogatepass")

    def mutated(self) -> dict[str, Any]:
        rng = self.rng
        message = json.loads(json.dumps(rng.choice(valid_messages())))
        for _ in range(rng.randint(1, 3)):
            target = message
            if isinstance(message.get("request"), dict) and rng.random() < 0.6:
                target = message["request"]
            key = rng.choice([*target, *REQUEST_FIELDS, "id", "type", self.text()])
            action = rng.random()
            if action < 0.2 and key != "type":
                target.pop(key, None)
            elif action < 0.35 and target is message:
                message["type"] = rng.choice(TYPES)
            else:
                target[key] = self.value()
        if message.get("type") == "shutdown":
            message["type"] = "queue"
        return message

    def body(self) -> tuple[str, bytes]:
        """(kind, body) of one frame."""
        rng = self.rng
        pick = rng.random()
        if pick < 0.15:
            return "bytes", rng.randbytes(rng.randint(0, 300))
        if pick < 0.35:
            value = self.value()
            if rng.random() < 0.7:
                value = {
                    "type": rng.choice([*TYPES, self.text()]),
                    **({} if not isinstance(value, dict) else value),
                }
            return "json", self.dumps(value)
        if pick < 0.85:
            return "mutated", self.dumps(self.mutated())
        if pick < 0.95:
            data = bytearray(self.dumps(rng.choice(valid_messages())))
            for _ in range(rng.randint(1, 4)):
                spot = rng.randrange(len(data))
                choice = rng.random()
                if choice < 0.4:
                    data[spot] = rng.randrange(256)
                elif choice < 0.7:
                    del data[spot]
                else:
                    data.insert(spot, rng.choice(b'{}[]",:\\0e-.'))
            return "bytes-mutated", bytes(data)
        depth = rng.choice([33, 100, 1000, 3000, 100000])
        return "nested", b'{"type": "queue", "x": ' + b"[" * depth + b"]" * depth + b"}"

    def batch(self, size: int) -> tuple[collections.Counter, bytes]:
        """`size` frames as one byte string, now and then with broken framing at the end."""
        kinds: collections.Counter = collections.Counter()
        parts = []
        if self.rng.random() < 0.7:
            parts.append(frame(json.dumps({"type": "hello", "version": 1}).encode()))
        for _ in range(size):
            kind, body = self.body()
            kinds[kind] += 1
            parts.append(frame(body))
        pick = self.rng.random()
        if pick < 0.03:  # a length that lies: the rest of the stream is misread
            kinds["framing"] += 1
            body = self.dumps(self.mutated())
            parts.append(HEADER.pack(len(body) + self.rng.randint(1, 64)) + body)
        elif pick < 0.04:  # over the limit: skipped by counting, the connection then closes
            kinds["framing"] += 1
            parts.append(HEADER.pack(MAX_MESSAGE_BYTES + self.rng.randint(1, 2**31)))
        elif pick < 0.06:  # a cut-off header
            kinds["framing"] += 1
            parts.append(self.rng.randbytes(self.rng.randint(1, 3)))
        return kinds, b"".join(parts)


def frame(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


def exchange(path: Path, data: bytes) -> tuple[int, bool]:
    """Sends `data` on a new connection, closes the write side, reads until the engine closes.

    (bytes received, whether the engine closed the connection by itself within READ_TIMEOUT_S).
    """
    received, closed = 0, False
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(READ_TIMEOUT_S)
    try:
        sock.connect(str(path))
        sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + READ_TIMEOUT_S
        while time.monotonic() < deadline:
            chunk = sock.recv(1 << 16)
            if not chunk:
                closed = True
                break
            received += len(chunk)
    except OSError:
        closed = True  # reset by the engine: allowed for garbage
    finally:
        sock.close()
    return received, closed


class Engine:
    """One engine process under `root`, restarted when it dies."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = root / "sock" / "engine.sock"
        self.state, self.clips, self.tmp = root / "state", root / "clips", root / "tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        self.log_path = root / "engine.log"
        self.process: subprocess.Popen | None = None
        self.probe: EngineClient | None = None

    def start(self) -> None:
        env = {
            **os.environ,
            "PARASTEP_STATE_DIR": str(self.state),
            "PARASTEP_OUTPUT_DIR": str(self.clips),
            "XDG_CACHE_HOME": str(self.root / "cache"),
            "TMPDIR": str(self.tmp),
        }
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "app.engine_main", "--socket", str(self.socket)],
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.probe = EngineClient.connect(self.socket, timeout=120)
        self.probe.hello(timeout=120)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def empty_queue(self) -> collections.Counter:
        """Removes every job that is not running (the failed ones pile up otherwise); their statuses."""
        assert self.probe is not None
        removed: collections.Counter = collections.Counter()
        for job in self.probe.call({"type": "queue"}, "queue", PROBE_TIMEOUT_S)["jobs"]:
            if job["status"] != "running":
                try:
                    self.probe.call({"type": "remove", "job_id": job["job_id"]}, "queue", PROBE_TIMEOUT_S)
                except EngineError:  # it started running since the listing
                    continue
                removed[job["status"]] += 1
        self.probe.history.clear()  # broadcasts pile up on the probe otherwise
        return removed

    def stop(self) -> int | None:
        if self.probe is not None:
            try:
                self.probe.send({"type": "shutdown"})
            except OSError:
                pass
            self.probe.close()
            self.probe = None
        if self.process is None:
            return None
        try:
            return self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(30)
            return None


def run_good_job(engine: Engine) -> tuple[bool, str]:
    import imageio.v3 as iio

    assert engine.probe is not None
    engine.empty_queue()
    job_id = engine.probe.submit(GOOD_JOB)
    finished = engine.probe.wait_for("job_finished", 600, job_id=job_id)
    clip = Path(finished["result"]["output"])
    shape = iio.imread(clip, index=None).shape[:3]
    ok = clip.is_file() and clip.parent == engine.clips and shape == (9, 64, 96)
    return ok, f"{clip.name}: {shape[0]} frames {shape[1]}x{shape[2]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=3600.0, help="stop fuzzing after this long")
    parser.add_argument("--batch", type=int, default=20, help="at most this many frames per connection")
    parser.add_argument("--probe-every", type=int, default=25, help="batches between liveness probes")
    parser.add_argument("--root", type=Path, help="folder for the engine's files (default: a temporary one)")
    args = parser.parse_args()

    root = args.root or Path(tempfile.mkdtemp(prefix="parastep-fuzz-"))
    engine = Engine(root)
    fuzzer = Fuzzer(args.seed)
    kinds: collections.Counter = collections.Counter()
    crashes = hangs = batches = closed_by_engine = 0
    received = 0
    jobs: collections.Counter = collections.Counter()
    engine.start()
    start = time.monotonic()
    sent = 0
    try:
        while sent < args.frames and time.monotonic() - start < args.max_seconds:
            size = min(fuzzer.rng.randint(1, args.batch), args.frames - sent)
            batch_kinds, data = fuzzer.batch(size)
            got, closed = exchange(engine.socket, data)
            kinds.update(batch_kinds)
            sent += size
            received += got
            closed_by_engine += closed
            batches += 1
            if batches % args.probe_every and sent < args.frames:
                continue
            if not engine.alive():
                crashes += 1
                print(
                    f"engine exited with {engine.process.returncode} after {sent} frames; restarting",
                    flush=True,
                )
                engine.start()
                continue
            try:
                jobs.update(engine.empty_queue())
            except (TimeoutError, OSError) as exc:
                hangs += 1
                print(f"no answer from the engine after {sent} frames ({exc}); restarting", flush=True)
                engine.stop()
                engine.start()
            if batches % (args.probe_every * 40) == 0:
                print(f"{sent} frames, {time.monotonic() - start:.0f} s", flush=True)
        fuzz_s = time.monotonic() - start
        alive_after = engine.alive()
        queue_file = engine.state / "queue.json"
        try:
            loads_strict(queue_file.read_text(), 64)
            queue_ok = True
        except (OSError, ValueError, RecursionError) as exc:
            queue_ok = False
            print(f"queue file: {exc}")
        job_start = time.monotonic()
        try:
            job_ok, job_detail = run_good_job(engine)
        except Exception as exc:  # report, do not hide: the run fails below
            job_ok, job_detail = False, f"{type(exc).__name__}: {exc}"
        job_s = time.monotonic() - job_start
    finally:
        code = engine.stop()
    log = engine.log_path.read_text(errors="replace")
    tracebacks = log.count("Traceback (most recent call last)")

    failed = crashes or hangs or not alive_after or not queue_ok or not job_ok or code != 0
    print()
    print(
        f"machine: {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print(f"command: python -m scripts.fuzz_protocol --frames {args.frames} --seed {args.seed}")
    print(
        f"frames tried: {sent} in {batches} connections "
        f"({', '.join(f'{kind} {count}' for kind, count in kinds.most_common())})"
    )
    print(
        f"time: {fuzz_s:.0f} s fuzzing ({sent / max(fuzz_s, 1e-9):.0f} frames/s), "
        f"{job_s:.0f} s for the normal job"
    )
    print(f"replies: {received} bytes; connections the engine closed itself: {closed_by_engine}")
    print(f"jobs that reached the queue (removed by the probe): {dict(jobs)}")
    print(f"crashes: {crashes}; hangs: {hangs}; engine alive after fuzzing: {alive_after}")
    print(f"contained errors (tracebacks in the engine log): {tracebacks}")
    print(f"queue file strict JSON: {queue_ok}")
    print(f"normal job: {'finished' if job_ok else 'FAILED'} ({job_detail})")
    print(f"engine exit status after shutdown: {code}")
    print(f"engine log: {engine.log_path}")
    print("RESULT:", "FAIL" if failed else "PASS")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
