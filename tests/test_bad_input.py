"""Bad input, catalogued: every case is refused with one clear error that names the field or file and
the fix, writes nothing, and leaves the engine serving.

Four ways in, as a user meets them:
- cli: `parastep-studio generate ...` (in-process `app.cli.main`): exit 2, one `error: ... Fix: ...` line;
- request: a request dict (as the window or a script builds it) through `GenerationRequest.from_dict`
  and `Engine.generate` on one engine, which must still plan a good request afterwards;
- socket: messages to an engine server (the same `EngineServer` the engine process runs, here in a
  thread): an `error` reply or a `job_failed`, then the same connection answers the next request;
- file: sidecars and latents files read by "use these settings", export and `parastep-studio decode`.

Every case fails before a worker starts; the last test runs one good job through the same server.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import struct
import threading
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from app.cli import main
from engine.catalog import ALLOW_PICKLE_FILE
from engine.client import EngineClient
from engine.engine import Engine
from engine.errors import UserError
from engine.outputs import build_metadata, export_clip, read_request, write_clip
from engine.protocol import PROTOCOL_VERSION, GenerationRequest
from engine.server import EngineServer
from engine.wire import HEADER, MAX_MESSAGE_BYTES
from tests.conftest import REPO

MODELS = REPO / "resources" / "models"
COG = ["--model", "tiny-cogvideox", "--frames", "9", "--height", "64", "--width", "96", "--steps", "4"]
GOOD = {
    "model": "tiny-cogvideox",
    "prompt": "a red circle",
    "frames": 9,
    "height": 64,
    "width": 96,
    "steps": 2,
}


@dataclass
class Ctx:
    """What a case builds its input from; everything lives in the test's own tmp folder."""

    tmp: Path
    out: Path  # the default output folder (PARASTEP_OUTPUT_DIR)

    def model(self, name: str = "tiny-cogvideox", folder: str = "model") -> Path:
        target = self.tmp / folder
        shutil.copytree(MODELS / name, target)
        return target

    def image(self) -> Path:
        path = self.tmp / "start.png"
        pixels = (np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)
        Image.fromarray(pixels).save(path)
        return path

    def sidecar(self, edit: Callable[[dict], None] = lambda data: None) -> Path:
        """A real clip with its sidecar in tmp/saved/, the sidecar then edited by hand."""
        request = GenerationRequest(**GOOD, fps=8)
        clip = write_clip(
            self.tmp / "saved" / "clip.gif",
            frames=np.zeros((2, 16, 16, 3), np.uint8),
            fps=8,
            metadata=build_metadata(request, timings={}, ranks=[]),
        )
        sidecar = clip.with_suffix(".json")
        data = json.loads(sidecar.read_text())
        edit(data)
        sidecar.write_text(json.dumps(data))
        return sidecar

    def latents(self, **request_changes: Any) -> Path:
        import torch

        from engine.pending_decode import save_pending

        request = GenerationRequest(**{**GOOD, "fps": 8, **request_changes})
        return save_pending(torch.zeros(1, 3, 16, 2, 2), request, MODELS / "tiny-cogvideox", "job1")


@dataclass
class Case:
    name: str
    channel: str  # cli | request | socket | file
    build: Callable[[Ctx], tuple[Any, list[str]]]  # -> (input, words the error must contain)


def _write(path: Path, data: bytes | str) -> Path:
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    return path


def cli_error(*argv: str) -> str:
    """The one `error:` line of `parastep-studio ARGV`, which must exit with status 2."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(list(argv))
    lines = [line for line in err.getvalue().strip().splitlines() if not line.startswith("[")]  # stages
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), (code, err.getvalue())
    return lines[0]


def user_error(action: Callable[[], Any]) -> str:
    with pytest.raises(UserError) as info:
        action()
    return str(info.value)


def _truncate(file: Path) -> Path:
    """`file` cut to its first kilobyte; returns the model folder it is in."""
    file.write_bytes(file.read_bytes()[:1000])
    return file.parents[1]


def _remove(model: Path, pattern: str) -> Path:
    for path in model.glob(pattern):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return model


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def edit(data: dict) -> None:
        *parents, last = path.split(".")
        for key in parents:
            data = data[key]
        data[last] = value

    return edit


def _pickled(ctx: Ctx) -> tuple[list[str], list[str]]:
    import torch
    from safetensors.torch import load_file

    model = ctx.model()
    weights = next((model / "vae").glob("*.safetensors"))
    torch.save(load_file(weights), model / "vae" / "diffusion_pytorch_model.bin")
    weights.unlink()
    return ["--model", str(model), "--steps", "2"], [str(model / "vae"), ALLOW_PICKLE_FILE]


def _index_with_missing_shard(ctx: Ctx) -> tuple[list[str], list[str]]:
    model = ctx.model()
    index = {"metadata": {}, "weight_map": {"a.weight": "diffusion_pytorch_model-00002-of-00002.safetensors"}}
    (model / "vae" / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    return ["--model", str(model), "--steps", "2"], ["diffusion_pytorch_model-00002-of-00002.safetensors"]


def _edited_model(ctx: Ctx, name: str, file: str, edit: Callable[[dict], None]) -> Path:
    model = ctx.model(name)
    data = json.loads((model / file).read_text())
    edit(data)
    (model / file).write_text(json.dumps(data))
    return model


def _png_header(width: int, height: int) -> bytes:
    """A PNG that is only a signature and a header claiming `width` x `height` (no pixel data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def _tiny_image(ctx: Ctx) -> Path:
    path = ctx.tmp / "dot.png"
    Image.new("RGB", (1, 1)).save(path)
    return path


def _broken_config(ctx: Ctx, file: str) -> tuple[list[str], list[str]]:
    model = ctx.model()
    (model / file).write_text('{"_class_name": "CogVideoXDDIMScheduler", ')  # cut short
    # parastep reads the scheduler's config at plan time too; either way the file is named
    argv = ["--model", str(model), *COG[2:], "--strategy", "parastep", "--devices", "cpu:2"]
    return argv, [str(model / file), "not a valid JSON"]


def _socket_raw(data: bytes, expected: list[str]) -> tuple[Callable, list[str]]:
    def run(client: EngineClient) -> str:
        client.send_raw(data)
        return client.wait_for("error")["message"]

    return run, expected


def _frame(body: bytes) -> bytes:
    return HEADER.pack(len(body)) + body


def _socket_message(message: dict, expected: list[str]) -> tuple[Callable, list[str]]:
    def run(client: EngineClient) -> str:
        client.send(message)
        return client.wait_for("error")["message"]

    return run, expected


def _socket_fresh(messages: list[dict], expected: list[str]) -> Callable[[Ctx], tuple[Callable, list[str]]]:
    """Sent on a new connection that has not said hello (yet)."""

    def build(ctx: Ctx) -> tuple[Callable, list[str]]:
        def run(client: EngineClient) -> str:
            fresh = EngineClient.connect(client.sock.getpeername(), timeout=10)
            try:
                for message in messages:
                    fresh.send(message)
                return fresh.wait_for("error")["message"]
            finally:
                fresh.close()

        return run, expected

    return build


def _socket_job(request: dict, expected: list[str]) -> tuple[Callable, list[str]]:
    """Queued, then failed by the runner when it plans the job (no worker starts)."""

    def run(client: EngineClient) -> str:
        job_id = client.submit(request)
        return client.wait_for("job_failed", 60, job_id=job_id)["error"]

    return run, expected


def _outside_output(ctx: Ctx, how: str) -> tuple[Callable, list[str]]:
    elsewhere = ctx.tmp / "elsewhere"
    elsewhere.mkdir()
    ctx.out.mkdir(parents=True, exist_ok=True)
    if how == "absolute":
        output = str(elsewhere) + "/"
    elif how == "dotdot":
        output = str(ctx.out / ".." / "elsewhere" / "clip.mp4")
    elif how == "symlink":
        (ctx.out / "link").symlink_to(elsewhere, target_is_directory=True)
        output = str(ctx.out / "link") + "/"
    else:  # relative: would land wherever the engine process happens to run
        output = "clips/clip.mp4"
    return _socket_message({"type": "submit", "request": {**GOOD, "output": output}}, ["'output'", output])


CASES = [
    # ---- request fields out of range or of the wrong type ------------------------------------------
    Case("zero steps", "cli", lambda c: ([*COG, "--steps", "0"], ["'steps' is 0", "--steps"])),
    Case("too many steps", "cli", lambda c: ([*COG, "--steps", "5000"], ["'steps' is 5000"])),
    Case("negative guidance", "cli", lambda c: ([*COG, "--guidance-scale", "-1"], ["'guidance_scale'"])),
    Case("negative seed", "request", lambda c: ({**GOOD, "seed": -1}, ["'seed' is -1"])),
    Case("steps of the wrong type", "request", lambda c: ({**GOOD, "steps": "six"}, ["'steps'", "int"])),
    Case("frames not a whole number", "request", lambda c: ({**GOOD, "frames": 9.5}, ["'frames'"])),
    Case("seed given as true", "request", lambda c: ({**GOOD, "seed": True}, ["'seed'"])),
    Case("unknown request field", "request", lambda c: ({**GOOD, "stepz": 3}, ["stepz"])),
    Case("no model", "request", lambda c: ({"prompt": "x"}, ["no model", "'model'"])),
    Case(
        "unknown strategy", "request", lambda c: ({**GOOD, "strategy": "fastest"}, ["'fastest'", "parastep"])
    ),
    Case(
        "unknown strategy option",
        "request",
        lambda c: ({**GOOD, "strategy": "parastep", "strategy_options": {"speed": 3}}, ["speed", "warmup"]),
    ),
    Case(
        "option of the wrong type",
        "request",
        lambda c: ({**GOOD, "strategy": "parastep", "strategy_options": {"warmup": "two"}}, ["'warmup'"]),
    ),
    Case(
        "negative warmup",
        "cli",
        lambda c: ([*COG, "--strategy", "parastep", "--devices", "cpu:2", "--warmup", "-1"], ["warmup"]),
    ),
    Case(
        "warmup above steps",
        "cli",
        lambda c: ([*COG, "--strategy", "parastep", "--devices", "cpu:2", "--warmup", "5"], ["Warm-up 5"]),
    ),
    Case(
        "no warm-up with two ranks",
        "cli",
        lambda c: ([*COG, "--strategy", "parastep", "--devices", "cpu:2", "--warmup", "0"], ["--warmup"]),
    ),
    Case(
        "lookahead above steps",
        "cli",
        lambda c: ([*COG, "--strategy", "batchstep", "--lookahead", "9"], ["Look-ahead 9", "--lookahead"]),
    ),
    Case("sequential on two devices", "cli", lambda c: ([*COG, "--devices", "cpu:2"], ["1 device", "cpu:2"])),
    # ---- family constraints ----------------------------------------------------------------------
    Case("frames not 8k+1", "cli", lambda c: ([*COG, "--frames", "10"], ["8k+1", "--frames 9"])),
    Case("height not a multiple", "cli", lambda c: ([*COG, "--height", "70"], ["height 70", "multiple of"])),
    Case("width not a multiple", "cli", lambda c: ([*COG, "--width", "100"], ["width 100", "multiple of"])),
    Case("fps zero", "cli", lambda c: ([*COG, "--fps", "0"], ["fps 0", "--fps"])),
    Case(
        "height far over the family's largest",
        "cli",
        lambda c: ([*COG, "--height", "262144"], ["height 262144", "at most 2048", "--height 2048"]),
    ),
    Case(
        "width over the cap from a request",
        "request",
        lambda c: ({**GOOD, "width": 262144}, ["width 262144", "at most 8192"]),
    ),
    Case(
        "prompt with a byte that is not UTF-8",
        "cli",  # argv decodes such bytes to lone surrogates (surrogateescape)
        lambda c: ([*COG, "--prompt", b"caf\xe9".decode("utf-8", "surrogateescape")], ["'prompt'", "UTF-8"]),
    ),
    Case(
        "prompt with a lone surrogate",
        "request",
        lambda c: ({**GOOD, "prompt": "a \ud800 circle"}, ["'prompt'", "UTF-8", "surrogate"]),
    ),
    Case(
        "guidance NaN",
        "request",
        lambda c: ({**GOOD, "guidance_scale": float("nan")}, ["'guidance_scale'", "finite"]),
    ),
    Case(
        "strategy option that is not a plain value",
        "request",
        lambda c: ({**GOOD, "strategy_options": {"warmup": [[1]]}}, ["'strategy_options'"]),
    ),
    Case(
        "audio too long", "cli", lambda c: (["--model", "tiny-audioldm2", "--seconds", "999"], ["--seconds"])
    ),
    Case("audio of no length", "cli", lambda c: (["--model", "tiny-audioldm2", "--seconds", "0"], ["0.0 s"])),
    Case(
        "svd with no frames",
        "cli",
        lambda c: (["--model", "tiny-svd", "--image", str(c.image()), "--frames", "0"], ["frames 0"]),
    ),
    Case(
        "svd guidance below its floor",
        "cli",
        lambda c: (["--model", "tiny-svd", "--image", str(c.image()), "--guidance-scale", "0.5"], ["0.5"]),
    ),
    # ---- images ------------------------------------------------------------------------------------
    Case("svd without image", "cli", lambda c: (["--model", "tiny-svd"], ["conditioning image", "--image"])),
    Case(
        "svd missing image",
        "cli",
        lambda c: (["--model", "tiny-svd", "--image", str(c.tmp / "nope.png")], [str(c.tmp / "nope.png")]),
    ),
    Case(
        "svd unreadable image",
        "cli",
        lambda c: (
            ["--model", "tiny-svd", "--image", str(_write(c.tmp / "broken.png", b"not a png"))],
            ["broken.png", "cannot be read"],
        ),
    ),
    Case(
        "svd image whose header claims 100000x100000 (a decompression bomb)",
        "cli",
        lambda c: (
            ["--model", "tiny-svd", "--image", str(_write(c.tmp / "bomb.png", _png_header(100000, 100000)))],
            ["bomb.png", "too large", "smaller image"],
        ),
    ),
    Case(
        "svd image of 1x1 pixels",
        "cli",
        lambda c: (
            ["--model", "tiny-svd", "--image", str(_tiny_image(c))],
            ["dot.png", "1x1", "at least 16"],
        ),
    ),
    Case(
        "svd truncated image",
        "cli",
        lambda c: (
            ["--model", "tiny-svd", "--image", str(_write(c.tmp / "cut.png", c.image().read_bytes()[:200]))],
            ["cut.png"],
        ),
    ),
    # ---- model folders ------------------------------------------------------------------------------
    Case("unknown model", "cli", lambda c: (["--model", "no-such-model"], ["'no-such-model'", "models"])),
    Case(
        "not a diffusers folder",
        "cli",
        lambda c: (["--model", str(_write(c.tmp / "readme.txt", "hi").parent)], ["model_index.json"]),
    ),
    Case(
        "model path is a file",
        "cli",
        lambda c: (["--model", str(_write(c.tmp / "model.safetensors", b"x"))], ["is a file"]),
    ),
    Case(
        "model_index.json not JSON",
        "cli",
        lambda c: (
            ["--model", str(_write(c.model() / "model_index.json", "{oops").parent)],
            ["model_index.json", "not a valid"],
        ),
    ),
    Case(
        "custom pipeline class (remote code)",
        "cli",
        lambda c: (
            [
                "--model",
                str(_edited_model(c, "tiny-cogvideox", "model_index.json", _set("_class_name", ["x", "Y"]))),
            ],
            ["custom pipeline"],
        ),
    ),
    Case(
        "component from a custom module",
        "cli",
        lambda c: (
            [
                "--model",
                str(_edited_model(c, "tiny-cogvideox", "model_index.json", _set("vae", ["my_code", "VAE"]))),
                *COG[2:],
            ],
            ["'vae'", "my_code"],
        ),
    ),
    Case(
        "truncated weights",
        "cli",
        lambda c: (
            ["--model", str(_truncate(next((c.model() / "transformer").glob("*.safetensors")))), *COG[2:]],
            [str(c.tmp / "model" / "transformer"), "corrupt or truncated"],
        ),
    ),
    Case(
        "missing weights",
        "cli",
        lambda c: (
            ["--model", str(_remove(c.model(), "vae/*.safetensors")), *COG[2:]],
            [str(c.tmp / "model" / "vae"), "no weight file"],
        ),
    ),
    Case(
        "missing component folder",
        "cli",
        lambda c: (
            ["--model", str(_remove(c.model(), "text_encoder")), *COG[2:]],
            [str(c.tmp / "model" / "text_encoder"), "is missing"],
        ),
    ),
    Case("missing weight shard", "cli", _index_with_missing_shard),
    Case(
        "scheduler_config.json not JSON",
        "cli",
        lambda c: _broken_config(c, "scheduler/scheduler_config.json"),
    ),
    Case("transformer config.json not JSON", "cli", lambda c: _broken_config(c, "transformer/config.json")),
    Case(
        "studio.json a list",
        "cli",
        lambda c: (
            ["--model", str(_write(c.model() / "studio.json", "[1, 2]").parent), *COG[2:]],
            ["studio.json", "JSON list", "delete it"],
        ),
    ),
    Case(
        "studio.json of the wrong types",
        "cli",
        lambda c: (
            [
                "--model",
                str(_edited_model(c, "tiny-cogvideox", "studio.json", _set("defaults", {"steps": "many"}))),
                *COG[2:],
            ],
            ["studio.json", "defaults.steps"],
        ),
    ),
    Case("pickle weights without the user's allowance", "cli", _pickled),
    Case(
        "claims another family",
        "cli",
        lambda c: (
            ["--model", str(_edited_model(c, "tiny-cogvideox", "studio.json", _set("family", "svd")))],
            ["claims family 'svd'", "studio.json"],
        ),
    ),
    Case(
        "an SVD model that says it is CogVideoX",
        "cli",
        lambda c: (
            [
                "--model",
                str(
                    _remove(
                        _edited_model(
                            c, "tiny-svd", "model_index.json", _set("_class_name", "CogVideoXPipeline")
                        ),
                        "studio.json",  # no family claim to catch it first: only its components tell
                    )
                ),
                *COG[2:],
            ],
            [str(c.tmp / "model" / "transformer" / "config.json")],
        ),
    ),
    # ---- devices ------------------------------------------------------------------------------------
    Case(
        "GPU that does not exist",
        "cli",
        lambda c: ([*COG, "--strategy", "parastep", "--devices", "cuda:3"], ["cuda:3", "does not exist"]),
    ),
    Case(
        "too many CPU workers",
        "cli",
        lambda c: ([*COG, "--strategy", "parastep", "--devices", "cpu:999"], ["cpu:999", "cpu:1 to"]),
    ),
    Case("malformed CPU spec", "cli", lambda c: ([*COG, "--devices", "cpu:two"], ["cpu:two", "cpu:N"])),
    Case("unknown device kind", "cli", lambda c: ([*COG, "--devices", "tpu:0"], ["tpu:0", "cpu:N"])),
    # ---- output paths given on the command line -----------------------------------------------------
    Case(
        "output folder blocked by a file",
        "cli",
        lambda c: (
            [*COG, "--output", str(_write(c.tmp / "a-file", "x") / "sub") + "/"],
            [str(c.tmp / "a-file")],
        ),
    ),
    Case(
        "output file name of 300 characters",
        "cli",
        lambda c: ([*COG, "--output", str(c.tmp / ("x" * 296 + ".mp4"))], ["300 bytes", "at most 255"]),
    ),
    Case("wrong clip extension", "cli", lambda c: ([*COG, "--output", str(c.tmp / "clip.wav")], [".mp4"])),
    Case(
        "output file exists",
        "cli",
        lambda c: (
            [*COG, "--output", str(_write(c.tmp / "taken.mp4", b"x"))],
            [str(c.tmp / "taken.mp4"), "never overwrites"],
        ),
    ),
    # ---- the engine socket --------------------------------------------------------------------------
    Case("frame not JSON", "socket", lambda c: _socket_raw(_frame(b"{nope"), ["not valid JSON"])),
    Case("frame not UTF-8", "socket", lambda c: _socket_raw(_frame(b'{"type": "\xff"}'), ["not UTF-8"])),
    Case(
        "frame of 2 KB of nested brackets",
        "socket",
        lambda c: _socket_raw(_frame(b"[" * 2048), ["nested more than 32 levels"]),
    ),
    Case(
        "frame with NaN in a request",
        "socket",
        lambda c: _socket_raw(
            _frame(b'{"type": "submit", "request": {"model": "tiny-cogvideox", "guidance_scale": NaN}}'),
            ["NaN"],
        ),
    ),
    Case(
        "frame with a number too large for a float",
        "socket",
        lambda c: _socket_raw(
            _frame(b'{"type": "submit", "request": {"model": "x", "seconds": 1e999}}'), ["1e999"]
        ),
    ),
    Case(
        "frame with a lone surrogate in a prompt",
        "socket",
        lambda c: _socket_raw(
            _frame(b'{"type": "submit", "request": {"model": "tiny-cogvideox", "prompt": "\\ud800"}}'),
            ["surrogate"],
        ),
    ),
    Case("frame a JSON list", "socket", lambda c: _socket_raw(_frame(b"[1, 2]"), ["not an object"])),
    Case("frame without type", "socket", lambda c: _socket_raw(_frame(b'{"kind": "queue"}'), ["'type'"])),
    Case(
        "frame over the size limit",
        "socket",
        lambda c: _socket_raw(
            HEADER.pack(MAX_MESSAGE_BYTES + 1) + bytes(MAX_MESSAGE_BYTES + 1), ["16 MiB limit"]
        ),
    ),
    Case(
        "unknown message type", "socket", lambda c: _socket_message({"type": "frobnicate"}, ["'frobnicate'"])
    ),
    Case("submit without request", "socket", lambda c: _socket_message({"type": "submit"}, ["'request'"])),
    Case(
        "submit with a field of the wrong type",
        "socket",
        lambda c: _socket_message({"type": "submit", "request": {**GOOD, "steps": "six"}}, ["'steps'"]),
    ),
    Case(
        "submit with a malformed comparison",
        "socket",
        lambda c: _socket_message(
            {"type": "submit", "request": GOOD, "compare": [["parastep"]]}, ["'compare'"]
        ),
    ),
    Case("cancel without a job id", "socket", lambda c: _socket_message({"type": "cancel"}, ["'job_id'"])),
    Case(
        "allow_output with a relative folder",
        "socket",
        lambda c: _socket_message({"type": "allow_output", "folder": "clips"}, ["'clips'", "absolute"]),
    ),
    Case("message before hello", "socket", _socket_fresh([{"type": "queue"}], ["before 'hello'", "hello"])),
    Case(
        "hello with a version of the wrong type",
        "socket",
        _socket_fresh([{"type": "hello", "version": "one"}], ["'one'", str(PROTOCOL_VERSION)]),
    ),
    Case(
        "a queued job that cannot run",
        "socket",
        lambda c: _socket_job({**GOOD, "height": 70}, ["height 70", "multiple of"]),
    ),
    Case("request output outside the output folder", "socket", lambda c: _outside_output(c, "absolute")),
    Case("request output escaping with ..", "socket", lambda c: _outside_output(c, "dotdot")),
    Case("request output through a symlink", "socket", lambda c: _outside_output(c, "symlink")),
    Case("request output relative", "socket", lambda c: _outside_output(c, "relative")),
    Case(
        "request output in the home of an unknown user",  # found by scripts/fuzz_protocol.py
        "socket",
        lambda c: _socket_message(
            {"type": "submit", "request": {**GOOD, "output": "~no-such-user-x/clip.mp4"}},
            ["~no-such-user-x", "absolute path"],
        ),
    ),
    # ---- sidecars and latents files -----------------------------------------------------------------
    Case(
        "sidecar from a newer version",
        "file",
        lambda c: _read_sidecar(c, _set("format_version", 99), ["clip.json", "newer", "Update"]),
    ),
    Case(
        "sidecar request from a newer version",
        "file",
        lambda c: _read_sidecar(c, _set("request.version", 99), ["clip.json", "newer", "Update"]),
    ),
    Case(
        "sidecar edited: steps of the wrong type",
        "file",
        lambda c: _read_sidecar(c, _set("request.steps", "ten"), ["clip.json", "'steps'"]),
    ),
    Case(
        "sidecar edited: unknown field",
        "file",
        lambda c: _read_sidecar(c, _set("request.turbo", True), ["clip.json", "turbo"]),
    ),
    Case(
        "sidecar edited: not a ParaStep sidecar",
        "file",
        lambda c: _read_sidecar(c, _set("format", "someone-else"), ["clip.json", "not a ParaStep"]),
    ),
    Case("export of a clip whose sidecar was edited", "file", lambda c: _export_edited(c)),
    Case(
        "decode of a file that is not latents", "file", lambda c: _decode(c.image(), ["not a latents file"])
    ),
    Case(
        "decode of latents whose stored request has fps 0",
        "file",
        lambda c: _decode(c.latents(fps=0), ["request stored", "fps 0", "--fps"]),
    ),
    Case(
        "decode of latents whose stored request has a NaN guidance",
        "file",
        lambda c: _decode(c.latents(guidance_scale=float("nan")), ["request stored", "'guidance_scale'"]),
    ),
    Case(
        "decode of latents whose output points elsewhere",
        "file",
        lambda c: _decode(
            c.latents(output=str(c.tmp / "elsewhere") + "/"), ["'output'", "elsewhere", "--output"]
        ),
    ),
]


def _read_sidecar(ctx: Ctx, edit: Callable[[dict], None], expected: list[str]) -> tuple[Callable, list[str]]:
    """What "use these settings" and "Open clip settings" do with a sidecar."""
    sidecar = ctx.sidecar(edit)
    return (lambda: user_error(lambda: read_request(sidecar))), expected


def _export_edited(ctx: Ctx) -> tuple[Callable, list[str]]:
    """A clip with no embedded copy of its settings, whose sidecar was edited by hand."""
    sidecar = ctx.sidecar(_set("request.seed", "x"))
    clip = sidecar.with_name("plain.gif")
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(clip)
    shutil.copy(sidecar, clip.with_suffix(".json"))
    return (lambda: user_error(lambda: export_clip(clip, ctx.out / "again.mp4"))), ["plain.json", "'seed'"]


def _decode(path: Path, expected: list[str]) -> tuple[Callable, list[str]]:
    """`parastep-studio decode PATH`, as the error message of a failed save suggests."""
    return (lambda: cli_error("decode", str(path))), [path.name, *expected]


# ---- runners ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("engine")
    server = EngineServer(root / "sock" / "engine.sock", root / "state" / "queue.json")
    server.start()
    thread = threading.Thread(target=server.serve_forever, name="test-engine", daemon=True)
    thread.start()
    client = EngineClient.connect(server.socket_path)
    client.hello()
    try:
        yield server, client
    finally:
        client.close()
        server.stop()
        thread.join(60)
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def engine():
    with Engine() as engine:
        yield engine


def _files(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if not p.is_dir()}


def test_the_catalogue_covers_enough_cases():
    assert len({case.name for case in CASES}) == len(CASES) >= 30
    assert {case.channel for case in CASES} == {"cli", "request", "socket", "file"}


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_refused_clearly(case, tmp_path, _output_dir, request):
    ctx = Ctx(tmp_path, _output_dir)
    given, expected = case.build(ctx)
    before = _files(tmp_path)

    if case.channel == "cli":
        text = cli_error("generate", *given)
    elif case.channel == "request":
        engine = request.getfixturevalue("engine")
        text = user_error(lambda: engine.generate(GenerationRequest.from_dict(given)))
        assert engine.plan(GenerationRequest(**GOOD)).request.steps == 2  # the engine still plans
        assert engine.group is None  # refused before any worker started
    elif case.channel == "socket":
        server, client = request.getfixturevalue("server")
        text = given(client)
        assert client.call({"type": "queue"}, "queue")["type"] == "queue"  # still answering
    else:
        text = given()

    assert "Fix:" in text and text.index("Fix:") < len(text) - 10, text  # a fix follows the problem
    for word in expected:
        assert word in text, f"{word!r} not in {text!r}"
    assert _files(tmp_path) == before, "a file was written"
    assert not _output_dir.exists() or not _files(_output_dir)


def test_after_all_that_the_engine_still_runs_a_good_job(server, _output_dir):
    import imageio.v3 as iio

    _, client = server
    job_id = client.submit({**GOOD, "devices": "cpu:1"})
    finished = client.wait_for("job_finished", 180, job_id=job_id)
    clip = Path(finished["result"]["output"])
    assert clip.parent == _output_dir and iio.imread(clip, index=None).shape[:3] == (9, 64, 96)
    assert read_request(clip).steps == 2


def test_export_carries_the_embedded_settings_not_an_edited_sidecar(tmp_path, _output_dir):
    clip = Ctx(tmp_path, _output_dir).sidecar(_set("request.seed", "x")).with_suffix(".gif")
    assert read_request(clip).seed == 0  # the sidecar is damaged; the copy embedded in the GIF is not
    exported = export_clip(clip, tmp_path / "again.mp4")
    sidecar = json.loads(exported.with_suffix(".json").read_text())
    assert sidecar["request"]["seed"] == 0 and read_request(exported) == read_request(clip)
