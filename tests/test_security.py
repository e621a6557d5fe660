"""Security: pickle weights only where the user allowed them, never code from a model folder, no path
from a request or a sidecar outside the output folders, a private engine socket."""

from __future__ import annotations

import re
import shutil
import threading
from pathlib import Path

import pytest

from engine.catalog import ALLOW_PICKLE_FILE, read_entry
from engine.client import EngineClient, EngineError
from engine.errors import UserError
from engine.loading import check_weights, load_pipeline
from engine.output_policy import check_output_inside
from engine.server import EngineServer
from tests.conftest import REPO

MODEL = REPO / "resources" / "models" / "tiny-cogvideox"
GOOD = {"model": "tiny-cogvideox", "prompt": "x", "frames": 9, "height": 64, "width": 96, "steps": 2}


def pickled_copy(folder: Path) -> Path:
    """tiny-cogvideox with its VAE weights as a pickle (.bin) instead of safetensors."""
    import torch
    from safetensors.torch import load_file

    shutil.copytree(MODEL, folder)
    weights = next((folder / "vae").glob("*.safetensors"))
    torch.save(load_file(weights), folder / "vae" / "diffusion_pytorch_model.bin")
    weights.unlink()
    return folder


# ---- weights --------------------------------------------------------------------------------------------
def test_pickle_weights_load_only_in_the_folder_the_user_allowed(tmp_path):
    import torch
    from safetensors.torch import load_file

    allowed, other = pickled_copy(tmp_path / "allowed"), pickled_copy(tmp_path / "other")
    for folder in (allowed, other):
        with pytest.raises(UserError, match=re.escape(str(folder / ALLOW_PICKLE_FILE))):
            check_weights(read_entry(folder))

    (allowed / ALLOW_PICKLE_FILE).touch()  # the user's explicit choice, for this folder only
    (tmp_path / ALLOW_PICKLE_FILE).touch()  # one in a parent folder allows nothing
    check_weights(read_entry(allowed))
    with pytest.raises(UserError, match="pickle weights"):
        check_weights(read_entry(other))

    pipe = load_pipeline(read_entry(allowed), "cpu", torch.float32)
    original = load_file(next((MODEL / "vae").glob("*.safetensors")))
    name, tensor = next(iter(original.items()))
    assert torch.equal(pipe.vae.state_dict()[name], tensor)  # the pickle's weights were loaded


def test_code_in_a_model_folder_never_runs(tmp_path):
    import json

    import torch

    model = shutil.copytree(MODEL, tmp_path / "model")
    index = json.loads((model / "model_index.json").read_text())
    index["vae"] = ["my_vae", "MyVAE"]
    (model / "model_index.json").write_text(json.dumps(index))
    ran = tmp_path / "the-code-ran"
    (model / "vae" / "my_vae.py").write_text(
        f"open({str(ran)!r}, 'w').write('x')\nfrom diffusers import AutoencoderKLCogVideoX as MyVAE\n"
    )
    with pytest.raises(UserError, match="'vae'.*my_vae.*never run"):
        check_weights(read_entry(model))  # what the engine does before starting workers
    with pytest.raises(UserError, match="trust_remote_code"):
        load_pipeline(read_entry(model), "cpu", torch.float32)  # and diffusers refuses it too
    assert not ran.exists()


def test_no_source_passes_trust_remote_code():
    sources = [
        p for folder in ("engine", "app", "ui", "resources", "scripts") for p in (REPO / folder).rglob("*.py")
    ]
    assert len(sources) > 20
    offenders = [
        str(p.relative_to(REPO))
        for p in sources
        if re.search(r"trust_remote_code\s*=|custom_pipeline\s*=", p.read_text(errors="replace"))
    ]
    assert not offenders


# ---- paths from requests and sidecars ------------------------------------------------------------------
def test_output_rule_accepts_paths_inside_and_refuses_the_rest(tmp_path):
    root = tmp_path / "clips"
    (root / "sub").mkdir(parents=True)
    (root / "inner-link").symlink_to(root / "sub", target_is_directory=True)
    (tmp_path / "outer-link").symlink_to(root, target_is_directory=True)
    for inside in (
        None,
        "",
        str(root),
        f"{root}/",
        f"{root}/sub/a.mp4",
        f"{root}/inner-link/",
        f"{tmp_path}/outer-link/x.mp4",
    ):
        check_output_inside(inside, [root], "the request")
    for outside in (
        str(tmp_path),
        f"{root}/../x.mp4",
        f"{root}/sub/../../x.mp4",
        "/etc/",
        "~/x.mp4",
        "x.mp4",
    ):
        with pytest.raises(UserError, match="'output'"):
            check_output_inside(outside, [root], "the request")


@pytest.fixture
def server(tmp_path):
    server = EngineServer(tmp_path / "sock" / "engine.sock", tmp_path / "state" / "queue.json")
    server.start()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with EngineClient.connect(server.socket_path) as client:
            client.hello()
            yield client
    finally:
        server.stop()
        thread.join(60)


def test_a_folder_the_user_chose_is_accepted_once_the_client_allows_it(server, tmp_path):
    chosen = tmp_path / "my clips"
    chosen.mkdir()
    # height 70 is no multiple of the model's 16: the job fails when it is planned, not at submit
    request = {**GOOD, "height": 70, "output": f"{chosen}/"}
    with pytest.raises(EngineError, match="outside the output folder"):
        server.submit(request)
    folders = server.call({"type": "allow_output", "folder": str(chosen)}, "output_folders")["folders"]
    assert str(chosen) in folders
    job_id = server.submit(request)  # accepted now
    failed = server.wait_for("job_failed", 60, job_id=job_id)
    assert "height 70" in failed["error"] and not any(chosen.iterdir())


# ---- the engine socket ------------------------------------------------------------------------------
def test_the_engine_refuses_a_socket_folder_that_others_can_open(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    server = EngineServer(shared / "engine.sock", tmp_path / "state" / "queue.json")
    with pytest.raises(UserError, match="can be opened by other users.*chmod 700"):
        server.start()
    assert not (shared / "engine.sock").exists()
