"""The command line as a user meets it: each family end to end (bad input: tests/test_bad_input.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

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


# The bad-input cases of the command line are in tests/test_bad_input.py (one catalogue for all).
