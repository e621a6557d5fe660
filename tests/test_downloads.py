"""Pulling models from a local stand-in of the hub (tests/local_hub.py): a pull that then generates,
dropped connections, bad checksums, gated repos, a full disk, cancel and resume, file selection."""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from pathlib import Path

import pytest

from engine.catalog import ModelCatalog
from engine.checkpoints import MANIFEST, STAGING, folder_for, models_dir
from engine.downloads import PullCancelled, RemoteFile, file_variant, pull, select_files
from engine.errors import UserError
from resources import EMBEDDED_MODELS_DIR
from tests.local_hub import LocalHub, Repo

HUB_ID = "parastep/tiny-cogvideox-test"
BIG = "transformer/diffusion_pytorch_model.safetensors"  # 1.6 MB, the largest file


@pytest.fixture
def served(tmp_path) -> Path:
    """tiny-cogvideox as a hub repository, plus files a pull must never take."""
    repo = tmp_path / "repo"
    shutil.copytree(EMBEDDED_MODELS_DIR / "tiny-cogvideox", repo)
    (repo / "transformer" / "diffusion_pytorch_model.bin").write_bytes(b"pickle weights")
    (repo / "pipeline.py").write_text("raise SystemExit('code from a repository must never run')\n")
    (repo / "single-file-checkpoint.safetensors").write_bytes(b"root checkpoint, not a component")
    return repo


@pytest.fixture
def hub(served, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("PARASTEP_MODELS_DIR", str(tmp_path / "models"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    # small chunks, so progress, cancel and resume happen inside the 1.6 MB file
    monkeypatch.setattr("huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE", 64 * 1024)
    with LocalHub({HUB_ID: served}) as local_hub:
        monkeypatch.setenv("HF_ENDPOINT", local_hub.url)
        yield local_hub


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def offered() -> list[str]:
    return [entry.name for entry in ModelCatalog().entries() if entry.source == "downloaded"]


def assert_nothing_installed() -> None:
    assert not folder_for(HUB_ID).exists()
    assert offered() == []


def test_pull_takes_only_pipeline_files_then_generates(hub, served):
    from engine.engine import Engine
    from engine.protocol import GenerationRequest

    events = []
    folder = pull(HUB_ID, events.append)
    assert folder == folder_for(HUB_ID)
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert not [f for f in files if f.endswith((".bin", ".py")) or f.startswith("single-file")]
    assert BIG in files and "model_index.json" in files
    for name in files:
        if name != MANIFEST:
            assert sha256(folder / name) == sha256(served / name)
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["hub_id"] == HUB_ID and manifest["commit"] == hub.repos[HUB_ID].commit
    # byte-accurate progress: ends at the exact total, never goes past it
    downloads = [e for e in events if e.stage in ("download", "verify")]
    total = sum((served / f).stat().st_size for f in files if f != MANIFEST)
    assert downloads[-1].total_bytes == total and downloads[-1].done_bytes == total
    assert all(e.done_bytes <= e.total_bytes for e in downloads)
    assert events[-1].stage == "done"
    assert offered() == [HUB_ID]
    gets = len([entry for entry in hub.log if entry[0] == "GET"])
    assert pull(HUB_ID) == folder  # the same commit again: nothing downloaded
    assert len([entry for entry in hub.log if entry[0] == "GET"]) == gets + 1  # the listing only

    request = GenerationRequest(
        model=HUB_ID, prompt="a red circle", frames=9, height=32, width=48, steps=2, devices="cpu:1"
    )
    with Engine() as engine:
        result = engine.run(engine.plan(request), previews=False)
    assert result.output.shape[0] == 9


def test_dropped_connection_resumes_without_duplicate_bytes(hub, served):
    hub.faults.drop_after[BIG] = 700_000
    folder = pull(HUB_ID)
    ranges = hub.bytes_sent_ranges(BIG)
    assert ranges[0] is None and ranges[1] is not None  # the second request asks for the rest only
    start = int(ranges[1].split("=")[1].split("-")[0])
    assert 0 < start <= 700_000
    assert sha256(folder / BIG) == sha256(served / BIG)


def test_wrong_checksum_is_refused_and_nothing_offered(hub):
    hub.faults.corrupt.add(BIG)
    with pytest.raises(UserError, match="sha256.*removed.*not installed"):
        pull(HUB_ID)
    staged = list((models_dir() / STAGING).rglob("diffusion_pytorch_model.safetensors*"))
    assert [p for p in staged if p.parent.name == "transformer"] == []
    assert_nothing_installed()


@pytest.mark.parametrize("status", [401, 403])
def test_gated_repo_names_the_page_to_accept_and_a_token_opens_it(hub, status, monkeypatch):
    hub.repos[HUB_ID].gated_status, hub.repos[HUB_ID].token = status, "hf_granted"
    if status == 403:
        monkeypatch.setenv("HF_TOKEN", "hf_without_access")
    with pytest.raises(UserError) as caught:
        pull(HUB_ID)
    message = str(caught.value)
    assert f"HTTP {status}" in message and f"{hub.url}/{HUB_ID}" in message and "HF_TOKEN" in message
    assert "\n" not in message
    assert_nothing_installed()
    assert pull(HUB_ID, token="hf_granted") == folder_for(HUB_ID)


def test_full_disk_is_checked_before_the_weights(hub, monkeypatch):
    monkeypatch.setattr("engine.downloads.disk_free", lambda path: 100_000)
    with pytest.raises(UserError, match="Not enough disk space.*nothing was installed"):
        pull(HUB_ID)
    assert hub.bytes_sent_ranges(BIG) == []
    assert_nothing_installed()


def test_cancel_keeps_the_part_and_the_next_pull_resumes(hub, served):
    hub.faults.chunk_delay_s = 0.005
    cancel = threading.Event()

    def on_progress(event):
        if event.file == BIG and event.stage == "download" and event.done_bytes > 1_000_000:
            cancel.set()

    with pytest.raises(PullCancelled):
        pull(HUB_ID, on_progress, cancel)
    assert_nothing_installed()
    parts = list((models_dir() / STAGING).rglob("*.part"))
    assert len(parts) == 1 and parts[0].name == "diffusion_pytorch_model.safetensors.part"
    kept = parts[0].stat().st_size
    assert 0 < kept < (served / BIG).stat().st_size

    hub.faults.chunk_delay_s = 0.0
    folder = pull(HUB_ID)
    assert hub.bytes_sent_ranges(BIG) == [None, f"bytes={kept}-"]  # only the rest was fetched
    assert sha256(folder / BIG) == sha256(served / BIG)
    assert not list((models_dir() / STAGING).rglob("*.part"))


def test_cli_pull_json_lines_then_models_available_and_delete(hub, capsys):
    from app.cli import main

    assert main(["pull", HUB_ID, "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[-1] == {"type": "done", "path": str(folder_for(HUB_ID))}
    assert {line["stage"] for line in lines[:-1]} >= {"plan", "download", "done"}
    assert main(["models", "--available", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["checkpoints"]
    assert {"cogvideox-2b", "svd-xt", "wan2.2-ti2v-5b", "stable-audio-open-1.0"} <= {r["name"] for r in rows}
    assert all(r["installed"] is None for r in rows)
    assert main(["models", "--delete", HUB_ID]) == 0
    capsys.readouterr()
    assert_nothing_installed()
    assert main(["models", "--delete", HUB_ID]) == 2


def _remote(path: str) -> RemoteFile:
    return RemoteFile(path, 10, "0" * 64 if path.endswith(".safetensors") else None, "1" * 40)


def test_file_selection_variants_shards_and_pickle():
    assert file_variant("diffusion_pytorch_model.fp16.safetensors") == "fp16"
    assert file_variant("diffusion_pytorch_model-00001-of-00002.fp16.safetensors") == "fp16"
    assert file_variant("model.fp16-00001-of-00002.safetensors") == "fp16"
    assert file_variant("model.safetensors.index.fp16.json") == "fp16"
    assert file_variant("model-00001-of-00002.safetensors") == ""
    index = {"_class_name": "X", "unet": ["diffusers", "UNet"], "scheduler": ["diffusers", "DDIMScheduler"]}
    files = [
        _remote(p)
        for p in [
            "model_index.json",
            "svd.safetensors",
            "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "unet/diffusion_pytorch_model.bin",
            "unet/diffusion_pytorch_model.fp16.bin",
            "scheduler/scheduler_config.json",
            "vae/diffusion_pytorch_model.safetensors",  # not a component of this index
        ]
    ]
    paths = lambda variant: sorted(f.path for f in select_files(files, index, variant, "o/n"))  # noqa: E731
    assert paths("fp16") == [
        "model_index.json",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "unet/diffusion_pytorch_model.fp16.safetensors",
    ]
    assert "unet/diffusion_pytorch_model.safetensors" in paths(None)
    assert "unet/diffusion_pytorch_model.safetensors" in paths("bf16")  # no such variant: the plain files
    pickle_only = [f for f in files if not f.path.startswith("unet/") or f.path.endswith((".bin", ".json"))]
    with pytest.raises(UserError, match="only pickle weights.*nothing was downloaded"):
        select_files(pickle_only, index, None, "o/n")


def test_unknown_repo_and_a_repo_that_is_not_a_pipeline(hub, tmp_path):
    with pytest.raises(UserError, match="no repository parastep/unknown"):
        pull("parastep/unknown")
    with pytest.raises(UserError, match="neither a known checkpoint nor a hub id"):
        pull("not-a-hub-id")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "model.safetensors").write_bytes(b"{}")
    hub.repos["parastep/plain"] = Repo(plain, commit="0" * 40)
    with pytest.raises(UserError, match="no model_index.json: it is not a diffusers pipeline"):
        pull("parastep/plain")
    assert offered() == []
