"""The command line as a user meets it: each family end to end, and bad input refused cleanly."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from app.cli import main
from engine.outputs import read_request
from engine.protocol import GenerationRequest
from tests.conftest import REPO

SMALL = {
    "tiny-cogvideox": ["--prompt", "a red circle", "--frames", "9", "--height", "64", "--width", "96"],
    "tiny-svd": ["--frames", "4", "--height", "64", "--width", "96"],
    "tiny-audioldm2": ["--prompt", "a 440 Hz sine tone", "--seconds", "1.0"],
}


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "start.png"
    Image.fromarray((np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)).save(path)
    return path


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize(
    ("model", "strategy", "devices", "suffix"),
    [
        ("tiny-cogvideox", "parastep", "cpu:2", ".mp4"),
        ("tiny-svd", "batchstep", "cpu:1", ".gif"),
        ("tiny-audioldm2", "parastep", "cpu:2", ".flac"),
    ],
)
def test_each_family_end_to_end(model, strategy, devices, suffix, image, _output_dir):
    extra = ["--image", str(image)] if model == "tiny-svd" else []
    target = _output_dir / f"clip{suffix}"
    _output_dir.mkdir(parents=True)
    args = ["generate", "--model", model, *SMALL[model], *extra, "--steps", "6", "--seed", "7"]
    done = run_cli(
        *args,
        "--strategy",
        strategy,
        "--devices",
        devices,
        "--warmup",
        "2",
        "--output",
        str(target),
        "--json",
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["output"] == str(target) and target.stat().st_size > 0
    assert (
        report["timings"]["denoise_s"] > 0 and report["timings"]["total_s"] >= report["timings"]["denoise_s"]
    )
    assert [r["rank"] for r in report["ranks"]] == list(range(int(devices.split(":")[1])))
    assert all(r["denoiser_calls"] > 0 for r in report["ranks"])
    if strategy == "parastep":
        assert report["ranks"][1]["bytes_sent"] > 0 and report["ranks"][0]["bytes_received"] > 0

    # The clip is valid and the sidecar restores the same request.
    if suffix == ".flac":
        import soundfile

        info = soundfile.info(str(target))
        assert info.samplerate == 16000 and info.frames == 16000
    else:
        import imageio.v3 as iio

        frames = iio.imread(target, index=None)
        assert frames.shape[0] >= 1 and frames.shape[1:3] == (64, 96)
    restored = read_request(report["metadata"])
    assert restored == read_request(target)
    assert (restored.model, restored.seed, restored.steps, restored.strategy) == (model, 7, 6, strategy)
    assert restored.strategy_options["warmup"] == 2 and restored.devices == devices
    if model == "tiny-svd":
        assert restored.image == str(image)
    # Every default was filled in before saving: planning the restored request changes nothing.
    from engine.engine import Engine

    assert Engine().plan(restored).request == restored


def test_devices_and_models_list_what_is_here():
    done = run_cli("models", "--json")
    assert done.returncode == 0, done.stderr
    names = {m["name"]: m["family"] for m in json.loads(done.stdout)["models"]}
    assert names["tiny-cogvideox"] == "cogvideox" and names["tiny-svd"] == "svd"
    assert names["tiny-audioldm2"] == "audioldm2"
    done = run_cli("devices", "--json")
    assert done.returncode == 0 and any(d["kind"] == "cpu" for d in json.loads(done.stdout)["devices"])


def test_request_restores_through_sidecar_round_trip():
    request = GenerationRequest(model="tiny-cogvideox", prompt="p", steps=3, strategy_options={"warmup": 1})
    assert GenerationRequest.from_dict(json.loads(json.dumps(request.to_dict()))) == request


# ---- bad input: one line naming the problem and the fix, non-zero exit, nothing written ------------


def copy_model(tmp_path, name="tiny-cogvideox"):
    target = tmp_path / name
    shutil.copytree(REPO / "resources" / "models" / name, target)
    return target


def bad_cases(tmp_path, image):
    not_a_model = tmp_path / "plain"
    not_a_model.mkdir()
    (not_a_model / "readme.txt").write_text("hello")
    truncated = copy_model(tmp_path)
    weights = next((truncated / "transformer").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    missing = copy_model(tmp_path / "m")
    for file in (missing / "vae").glob("*.safetensors"):
        file.unlink()
    broken_image = tmp_path / "broken.png"
    broken_image.write_bytes(b"not a png")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    cog = ["--model", "tiny-cogvideox", "--frames", "9", "--height", "64", "--width", "96", "--steps", "4"]
    return {
        "unknown model": (["--model", "no-such-model"], "Unknown model"),
        "not a pipeline": (["--model", str(not_a_model)], "model_index.json"),
        "truncated weights": (["--model", str(truncated), "--steps", "2"], "corrupt or truncated"),
        "missing weights": (["--model", str(missing), "--steps", "2"], "no weight file"),
        "svd without image": (["--model", "tiny-svd"], "needs a conditioning image"),
        "svd missing image": (
            ["--model", "tiny-svd", "--image", str(tmp_path / "nope.png")],
            "does not exist",
        ),
        "svd unreadable image": (["--model", "tiny-svd", "--image", str(broken_image)], "cannot be read"),
        "frames not 8k+1": ([*cog, "--frames", "10"], "8k+1"),
        "height not a multiple": ([*cog, "--height", "70"], "multiple of"),
        "width not a multiple": ([*cog, "--width", "100"], "multiple of"),
        "zero steps": ([*cog, "--steps", "0"], "'steps' is 0"),
        "negative warmup": (
            [*cog, "--strategy", "parastep", "--devices", "cpu:2", "--warmup", "-1"],
            "warmup",
        ),
        "warmup above steps": (
            [*cog, "--strategy", "parastep", "--devices", "cpu:2", "--warmup", "5"],
            "larger",
        ),
        "no warm-up with two ranks": (
            [*cog, "--strategy", "parastep", "--devices", "cpu:2", "--warmup", "0"],
            "warm-up",
        ),
        "GPU that does not exist": (
            [*cog, "--strategy", "parastep", "--devices", "cuda:3"],
            "does not exist",
        ),
        "too many CPU workers": ([*cog, "--strategy", "parastep", "--devices", "cpu:999"], "CPU workers"),
        "sequential on two devices": ([*cog, "--devices", "cpu:2"], "runs on 1 device"),
        "unwritable output folder": ([*cog, "--output", str(blocker / "sub") + "/"], str(blocker)),
        "wrong clip extension": ([*cog, "--output", str(tmp_path / "clip.wav")], ".mp4"),
        "audio too long": (["--model", "tiny-audioldm2", "--seconds", "999"], "out of range"),
    }


def test_bad_input_is_refused_with_the_fix_and_no_file(tmp_path, image, capsys, _output_dir):
    failures = []
    for name, (args, expected) in bad_cases(tmp_path, image).items():
        code = main(["generate", *args])
        err = capsys.readouterr().err.strip()
        errors = [line for line in err.splitlines() if not line.startswith("[")]  # [stage] lines aside
        ok = code != 0 and len(errors) == 1 and errors[0].startswith("error: ") and expected in err
        ok = ok and "Fix:" in errors[0]
        if not ok:
            failures.append(f"{name}: exit {code}, stderr {err!r}")
    assert not failures, "\n".join(failures)
    assert not _output_dir.exists() or not any(_output_dir.iterdir())
    assert not list(tmp_path.glob("**/*.mp4"))
