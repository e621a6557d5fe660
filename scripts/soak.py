"""Soak: many small jobs through a real engine process, with cancels and failures among them.

    nice -n 5 .venv/bin/python -m scripts.soak [--jobs 200] [--seed 0] [--root DIR] [--series FILE]

Starts `python -m app.engine_main` on a private socket, then submits jobs one after the other over the
socket (`engine.client`): a random mix of the embedded models, of every strategy in the registry
(read at run time) and of device counts cpu:1..cpu:3, in blocks that share a model and devices (a new
block restarts the worker group, as a user switching models would). Among them: cancels mid-denoise,
a SIGKILLed worker mid-denoise, and bad requests (refused at submit or failed at plan time).

After every job it records the resident memory of the engine and of its workers, the engine's open
file descriptors and sockets, its child processes, /dev/shm entries, rendezvous folders and kept
latents. At the end it stops the engine and checks: no process of it left, no socket, shared memory or
rendezvous folder left, every finished clip decodes (imageio / soundfile) and has a sidecar that gives
back the submitted request, memory flat within the bound printed. Prints a Markdown summary; exits 1
if a check failed. Nothing here is part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.client import EngineClient
from engine.wire import HEADER

REPO = Path(__file__).resolve().parents[1]

MODELS = {
    "tiny-cogvideox": {"prompt": "a red circle", "frames": 9, "height": 64, "width": 96},
    "tiny-svd": {"frames": 4, "height": 64, "width": 96},  # + image
    "tiny-audioldm2": {"prompt": "a 440 Hz tone", "seconds": 1.0},
}
DEVICES = ["cpu:1", "cpu:2", "cpu:3"]
JOB_TIMEOUT_S = 240  # one job, including a worker group start on a loaded machine
KILL_FAIL_BOUND_S = 30  # the issue: a killed worker fails the job within 30 s
ENGINE_RSS_BOUND_MIB = 64  # growth of the engine's resident memory allowed after the first 20 jobs
P_CANCEL, P_KILL, P_BAD = 0.08, 0.04, 0.06


@dataclass
class Record:
    index: int
    kind: str  # job | cancel | kill | bad
    model: str = ""
    strategy: str = ""
    devices: str = ""
    outcome: str = ""  # finished | cancelled | failed | refused | hung
    seconds: float = 0.0
    detail: str = ""
    sample: dict[str, Any] = field(default_factory=dict)


# ---- what the engine process holds -----------------------------------------------------------------
def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def fds(pid: int) -> tuple[int, int]:
    """(open file descriptors, of which sockets)."""
    try:
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return 0, 0
    return len(links), sum(link.startswith("socket:") for link in links)


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def workers(engine_pid: int) -> list[int]:
    """The engine's worker processes (spawned by multiprocessing; not its resource tracker or ffmpeg)."""
    return [
        pid
        for pid in children(engine_pid)
        if "spawn_main" in (line := cmdline(pid)) and "resource_tracker" not in line
    ]


def tcp_listeners(pids: list[int]) -> list[str]:
    """Local addresses of the TCP sockets these processes listen on ("ip:port", hex as in /proc)."""
    inodes = set()
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # LISTEN
                found.append(cols[1])
    return found


def is_loopback(address: str) -> bool:
    ip = address.split(":")[0]
    return ip in ("0100007F", "00000000000000000000000001000000")  # 127.0.0.1, ::1


def shm_entries() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except OSError:
        return set()


def shm_mapped(pids: list[int]) -> set[str]:
    """/dev/shm entries these processes have mapped (named semaphores, shared memory); other programs on
    the machine use /dev/shm too, so only these are counted as ours."""
    found = set()
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                if "/dev/shm/" in line and not line.endswith("(deleted)"):
                    found.add(line.split("/dev/shm/", 1)[1].strip())
        except OSError:
            continue
    return found


# ---- the soak ------------------------------------------------------------------------------------------
class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.root = Path(args.root or tempfile.mkdtemp(prefix="parastep-soak-"))
        self.socket = self.root / "sock" / "engine.sock"
        self.clips = self.root / "clips"
        self.state = self.root / "state"
        self.image = self.root / "start.png"
        self.tmp = self.root / "tmp"  # the engine's TMPDIR: its rendezvous folders are counted here
        self.records: list[Record] = []
        self.finished: list[tuple[dict[str, Any], dict[str, Any]]] = []  # (request, result)
        self.worker_pids: set[int] = set()
        self.listeners: list[str] = []
        self.shm_ours: set[str] = set()
        self.problems: list[str] = []

    # ---- set-up ----
    def make_image(self) -> None:
        import numpy as np
        from PIL import Image

        self.tmp.mkdir(parents=True, exist_ok=True)
        pixels = (np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(self.image)

    def start_engine(self) -> None:
        env = {
            **os.environ,
            "PARASTEP_STATE_DIR": str(self.state),
            "PARASTEP_OUTPUT_DIR": str(self.clips),
            "XDG_CACHE_HOME": str(self.root / "cache"),
            "TMPDIR": str(self.tmp),
        }
        self.log = open(self.root / "engine.log", "ab")
        command = [sys.executable, "-m", "app.engine_main", "--socket", str(self.socket)]
        self.engine = subprocess.Popen(command, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.client = EngineClient.connect(self.socket, timeout=120)
        self.client.hello()

    def combos(self) -> dict[tuple[str, str], list[str]]:
        """(model, devices) -> the strategies the engine accepts for it (its own planning rules)."""
        from engine.engine import Engine
        from engine.errors import UserError
        from engine.protocol import GenerationRequest
        from engine.strategies import STRATEGIES

        engine, table = Engine(), {}
        for model in MODELS:
            for devices in DEVICES:
                ok = []
                for name in STRATEGIES:
                    if self.args.strategies and name not in self.args.strategies.split(","):
                        continue
                    try:
                        engine.plan(GenerationRequest(**self.request(model, name, devices, steps=8)))
                        ok.append(name)
                    except UserError:
                        pass
                if ok:
                    table[(model, devices)] = ok
        return table

    def request(self, model: str, strategy: str, devices: str, steps: int) -> dict[str, Any]:
        from engine.strategies import STRATEGIES

        options = {}
        names = {option.name for option in STRATEGIES[strategy].options}
        if "warmup" in names:
            options["warmup"] = self.rng.choice([1, 2])
        if "lookahead" in names:
            options["lookahead"] = 2
        request = {**MODELS[model], "model": model, "strategy": strategy, "devices": devices}
        request.update(steps=steps, seed=self.rng.randrange(1000), strategy_options=options)
        if model == "tiny-svd":
            request["image"] = str(self.image)
        return request

    # ---- one job ----
    def run(self) -> None:
        self.make_image()  # before planning: SVD needs it
        table = self.combos()
        for (model, devices), names in sorted(table.items()):
            print(f"{model} {devices}: {', '.join(names)}")
        if len(table) != len(MODELS) * len(DEVICES):
            raise SystemExit(f"only {len(table)} model/device combinations plan; see above")
        self.start_engine()
        self.shm_before = shm_entries()
        self.started = time.monotonic()
        block: list[tuple[str, str]] = []
        for index in range(self.args.jobs):
            if not block:
                key = self.rng.choice(sorted(table))
                block = [key] * self.rng.randint(5, 10)
            model, devices = block.pop()
            roll = self.rng.random()
            kind = "cancel" if roll < P_CANCEL else "kill" if roll < P_CANCEL + P_KILL else "job"
            if P_CANCEL + P_KILL <= roll < P_CANCEL + P_KILL + P_BAD:
                kind = "bad"
            record = Record(index, kind, model, "", devices)
            if kind == "bad":
                self.bad_request(record)
            else:
                strategy = self.rng.choice(table[(model, devices)])
                steps = 16 if kind in ("cancel", "kill") else self.rng.randint(4, 8)
                record.strategy = strategy
                self.one_job(record, self.request(model, strategy, devices, steps))
            record.sample = self.sample()
            self.records.append(record)
            if index % 20 == 0:
                self.listeners += tcp_listeners([self.engine.pid, *workers(self.engine.pid)])
            done = time.monotonic() - self.started
            print(
                f"[{index + 1:3d}/{self.args.jobs}] {done:6.0f}s {kind:6} {model:15} {record.strategy:10} "
                f"{devices:6} {record.outcome:9} {record.seconds:5.1f}s "
                f"engine {record.sample['engine_rss']:.0f} MiB "
                f"workers {record.sample['workers_rss']:.0f} MiB {record.detail[:60]}",
                flush=True,
            )
            self.client.history.clear()
        self.stop_engine()

    def one_job(self, record: Record, request: dict[str, Any]) -> None:
        start = time.monotonic()
        job_id = self.client.submit(request)
        acted_at = None
        deadline = start + JOB_TIMEOUT_S
        while True:
            try:
                message = self.client.receive(max(0.1, deadline - time.monotonic()))
            except TimeoutError:
                record.outcome, record.detail = "hung", f"no end message in {JOB_TIMEOUT_S} s"
                self.problems.append(f"job {record.index} hung")
                return
            if message.get("job_id") != job_id:
                continue
            kind = message["type"]
            if kind == "step" and acted_at is None and message["step"] >= 2 and record.kind != "job":
                acted_at = time.monotonic()
                if record.kind == "cancel":
                    self.client.send({"type": "cancel", "job_id": job_id})
                else:
                    victims = workers(self.engine.pid)
                    os.kill(self.rng.choice(victims), signal.SIGKILL)
            self.worker_pids.update(workers(self.engine.pid))
            if kind in ("job_finished", "job_failed", "job_cancelled"):
                break
        record.seconds = time.monotonic() - start
        record.outcome = {"job_finished": "finished", "job_failed": "failed", "job_cancelled": "cancelled"}[
            kind
        ]
        if kind == "job_finished":
            self.finished.append((request, message["result"]))
        if kind == "job_failed":
            record.detail = message["error"]
        if record.kind == "kill":
            took = time.monotonic() - acted_at if acted_at else float("nan")
            record.detail = f"failed {took:.1f} s after the kill: {record.detail}"
            if kind != "job_failed" or "died" not in message["error"] or not took < KILL_FAIL_BOUND_S:
                self.problems.append(f"job {record.index}: a killed worker gave {kind} after {took:.1f} s")
        elif record.kind == "cancel" and kind not in ("job_cancelled", "job_finished"):
            self.problems.append(f"job {record.index}: cancel gave {kind}: {record.detail}")
        elif record.kind == "job" and kind != "job_finished":
            self.problems.append(f"job {record.index}: {kind}: {record.detail}")

    def bad_request(self, record: Record) -> None:
        """A request the engine must refuse (at submit) or fail (at plan time), then keep serving."""
        start = time.monotonic()
        good = self.request(record.model, "sequential", "cpu:1", 4)
        choice = self.rng.choice(["steps 0", "unknown model", "output outside", "bad frame", "wrong type"])
        record.strategy = choice
        if choice == "bad frame":
            self.client.send_raw(HEADER.pack(7) + b"{nope!}")
            error = self.client.wait_for("error", 30)["message"]
            record.outcome = "refused"
        elif choice in ("output outside", "wrong type"):
            bad = {**good, "output": "/tmp/"} if choice == "output outside" else {**good, "steps": "four"}
            self.client.send({"type": "submit", "request": bad})
            error = self.client.wait_for("error", 30)["message"]
            record.outcome = "refused"
        else:
            bad = {**good, "steps": 0} if choice == "steps 0" else {**good, "model": "no-such-model"}
            job_id = self.client.submit(bad)
            error = self.client.wait_for("job_failed", JOB_TIMEOUT_S, job_id=job_id)["error"]
            record.outcome = "failed"
        record.seconds, record.detail = time.monotonic() - start, error
        if "Fix:" not in error:
            self.problems.append(f"bad request {choice}: no fix in {error!r}")
        self.client.call({"type": "queue"}, "queue")  # still answering

    def rendezvous_dirs(self) -> list[str]:
        return sorted(p.name for p in self.tmp.glob("parastep-rendezvous-*"))

    def sample(self) -> dict[str, Any]:
        pid = self.engine.pid
        group = workers(pid)
        mapped = shm_mapped([pid, *group])
        self.shm_ours |= mapped
        total_fds, sockets = fds(pid)
        pending = list((self.state / "pending").glob("*")) if (self.state / "pending").exists() else []
        return {
            "t": round(time.monotonic() - self.started, 1),
            "engine_rss": rss_mib(pid),
            "workers_rss": sum(rss_mib(w) for w in group),
            "workers": len(group),
            "fds": total_fds,
            "sockets": sockets,
            "shm": len(mapped),
            "rendezvous": len(self.rendezvous_dirs()),
            "pending": len(pending),
        }

    def stop_engine(self) -> None:
        self.client.send({"type": "shutdown"})
        try:
            self.exit_code = self.engine.wait(60)
        except subprocess.TimeoutExpired:
            self.problems.append("the engine did not exit within 60 s of 'shutdown'")
            self.engine.kill()
            self.exit_code = self.engine.wait(30)
        self.client.close()
        self.log.close()
        time.sleep(1.0)

    # ---- checks ----
    def check(self) -> dict[str, Any]:
        import imageio.v3 as iio
        import soundfile

        from engine.outputs import read_request

        leaked_workers = sorted(pid for pid in self.worker_pids if alive(pid))
        shm_left = sorted(self.shm_ours & shm_entries())
        rendezvous_left = self.rendezvous_dirs()
        pending_left = (
            sorted(p.name for p in (self.state / "pending").glob("*")) if self.state.exists() else []
        )
        bad_clips = []
        for request, result in self.finished:
            clip = Path(result["output"])
            try:
                if clip.suffix in (".wav", ".flac"):
                    info = soundfile.info(str(clip))
                    assert info.samplerate > 0 and info.frames == round(request["seconds"] * info.samplerate)
                else:
                    frames = iio.imread(clip, index=None)
                    assert frames.shape[:3] == (request["frames"], request["height"], request["width"])
                restored = read_request(clip.with_suffix(".json"))
                got = {k: getattr(restored, k) for k in ("model", "seed", "steps", "strategy", "devices")}
                assert got == {k: request[k] for k in got}, got
            except Exception as exc:  # noqa: BLE001 - every bad clip is reported
                bad_clips.append(f"{clip.name}: {type(exc).__name__}: {exc}")
        stray = [p.name for p in self.clips.glob("*") if p.suffix not in (".mp4", ".wav", ".json")]
        expected_files = 2 * len(self.finished)
        files = len(list(self.clips.glob("*"))) if self.clips.exists() else 0

        samples = [r.sample for r in self.records]
        engine_rss = [s["engine_rss"] for s in samples]
        warm = statistics.median(engine_rss[20:40]) if len(engine_rss) >= 40 else engine_rss[0]
        end = statistics.median(engine_rss[-20:])
        peak = max(engine_rss[20:] or engine_rss)
        # Descriptors and sockets depend on how many workers are up: compare like with like, first vs last.
        by_workers: dict[int, list[dict[str, Any]]] = {}
        for s in samples:
            by_workers.setdefault(s["workers"], []).append(s)
        fd_drift = {
            n: {
                "fds_first": v[0]["fds"],
                "fds_last": v[-1]["fds"],
                "fds_max": max(x["fds"] for x in v),
                "sockets_first": v[0]["sockets"],
                "sockets_last": v[-1]["sockets"],
                "samples": len(v),
            }
            for n, v in sorted(by_workers.items())
        }
        per_config: dict[str, list[float]] = {}
        for r in self.records:
            if r.outcome == "finished":
                per_config.setdefault(f"{r.model} {r.devices}", []).append(r.sample["workers_rss"])
        summary = {
            "jobs": len(self.records),
            "outcomes": {
                f"{kind}/{outcome}": sum(1 for r in self.records if r.kind == kind and r.outcome == outcome)
                for kind in ("job", "cancel", "kill", "bad")
                for outcome in ("finished", "cancelled", "failed", "refused", "hung")
                if any(r.kind == kind and r.outcome == outcome for r in self.records)
            },
            "wall_s": round(time.monotonic() - self.started, 1),
            "engine_rss_mib": {
                "after_20_jobs": round(warm, 1),
                "last_20": round(end, 1),
                "peak": round(peak, 1),
            },
            "engine_rss_growth_mib": round(end - warm, 1),
            "workers_rss_mib_by_config": {
                k: {"first": round(v[0], 1), "last": round(v[-1], 1), "max": round(max(v), 1), "n": len(v)}
                for k, v in sorted(per_config.items())
            },
            "engine_fds_by_worker_count": fd_drift,
            "shm_mapped_by_engine_and_workers": {
                "max_at_once": max(s["shm"] for s in samples),
                "distinct": len(self.shm_ours),
            },
            "kill_fail_s": [
                float(r.detail.split()[1])
                for r in self.records
                if r.kind == "kill" and r.detail.startswith("failed")
            ],
            "worker_processes_seen": len(self.worker_pids),
            "leaked_processes": leaked_workers,
            "shm_left": shm_left,
            "rendezvous_left": rendezvous_left,
            "pending_left": pending_left,
            "tcp_listeners": sorted(set(self.listeners)),
            "clips_checked": len(self.finished),
            "bad_clips": bad_clips,
            "files_in_output": {"expected": expected_files, "found": files, "stray": stray},
            "engine_exit_code": self.exit_code,
            "socket_left": self.socket.exists(),
        }
        problems = list(self.problems)
        if leaked_workers:
            problems.append(f"worker processes still alive: {leaked_workers}")
        if shm_left or rendezvous_left:
            problems.append(f"left behind: shm {shm_left}, rendezvous {rendezvous_left}")
        if pending_left:
            problems.append(f"latents left: {pending_left}")
        if bad_clips or stray or files != expected_files:
            problems.append(f"clips: {bad_clips} stray {stray} files {files}/{expected_files}")
        if self.exit_code != 0 or summary["socket_left"]:
            problems.append(f"engine exit {self.exit_code}, socket left {summary['socket_left']}")
        if end - warm > ENGINE_RSS_BOUND_MIB:
            problems.append(f"engine memory grew {end - warm:.0f} MiB (bound {ENGINE_RSS_BOUND_MIB})")
        for n, drift in fd_drift.items():
            if (
                drift["fds_last"] > drift["fds_first"] + 4
                or drift["sockets_last"] > drift["sockets_first"] + 2
            ):
                problems.append(f"engine file descriptors grew with {n} workers up: {drift}")
        if not all(is_loopback(address) for address in self.listeners):
            problems.append(f"a TCP listener off loopback: {sorted(set(self.listeners))}")
        summary["problems"] = problems
        return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--root", help="folder for the engine's socket, state and clips (default: a new temp)"
    )
    parser.add_argument("--series", help="write every job's record and sample here (JSON)")
    parser.add_argument("--strategies", help="only these (comma-separated); default: every registered one")
    args = parser.parse_args()
    soak = Soak(args)
    try:
        soak.run()
    finally:
        if getattr(soak, "engine", None) is not None and soak.engine.poll() is None:
            soak.engine.kill()
            soak.engine.wait(30)
    summary = soak.check()
    if args.series:
        Path(args.series).write_text(json.dumps([r.__dict__ for r in soak.records], indent=1))
    print(f"\n## Soak: {args.jobs} jobs, seed {args.seed}\n")
    print(
        f"- machine: {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; command: nice -n 5 .venv/bin/python -m scripts.soak "
        f"--jobs {args.jobs} --seed {args.seed}"
    )
    for key, value in summary.items():
        print(f"- {key}: {json.dumps(value)}")
    print("\nRESULT:", "PASS" if not summary["problems"] else "FAIL")
    return 0 if not summary["problems"] else 1


if __name__ == "__main__":
    sys.exit(main())
