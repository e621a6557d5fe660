"""Where models come from: embedded, local folders, the Hugging Face cache; all offline."""

from __future__ import annotations

import json
import shutil

import pytest

from engine.catalog import ModelCatalog
from engine.errors import UserError
from engine.loading import check_weights
from tests.conftest import REPO

TINY = REPO / "resources" / "models" / "tiny-cogvideox"


def test_embedded_models_are_listed_with_their_family():
    entries = {e.name: e for e in ModelCatalog().entries()}
    assert {"tiny-cogvideox", "tiny-svd", "tiny-audioldm2"} <= set(entries)
    assert entries["tiny-svd"].family == "svd" and entries["tiny-svd"].source == "embedded"
    for entry in entries.values():
        if entry.source == "embedded":
            check_weights(entry)  # the shipped weights are complete safetensors


def test_hugging_face_cache_snapshot_resolves_by_repo_name(tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "models--acme--tiny-video"
    snapshot = repo / "snapshots" / "abc123"
    shutil.copytree(TINY, snapshot)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    entry = ModelCatalog().resolve("acme/tiny-video")
    assert entry.source == "hf-cache" and entry.path == snapshot and entry.family == "cogvideox"
    assert "acme/tiny-video" in {e.name for e in ModelCatalog().entries()}


def test_local_folder_and_family_claims(tmp_path):
    folder = tmp_path / "mine"
    shutil.copytree(TINY, folder)
    assert ModelCatalog().resolve(str(folder)).family == "cogvideox"
    studio = json.loads((folder / "studio.json").read_text())
    (folder / "studio.json").write_text(json.dumps({**studio, "family": "audioldm2"}))
    with pytest.raises(UserError, match="claims family .audioldm2."):
        ModelCatalog().resolve(str(folder))


def test_pickle_weights_are_refused(tmp_path):
    folder = tmp_path / "pickled"
    shutil.copytree(TINY, folder)
    for file in (folder / "vae").glob("*.safetensors"):
        file.rename(file.with_suffix(".bin"))
    with pytest.raises(UserError, match="pickle"):
        check_weights(ModelCatalog().resolve(str(folder)))


def test_custom_pipeline_class_is_refused_not_crashing(tmp_path):
    folder = tmp_path / "custom"
    shutil.copytree(TINY, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "_class_name": ["pipeline", "MyPipeline"]}))
    with pytest.raises(UserError, match="custom pipeline"):
        ModelCatalog().resolve(str(folder))


@pytest.mark.parametrize(
    ("scheduler", "strategy", "message"),
    [("HeunDiscreteScheduler", "parastep", "order 2"), ("CogVideoXDPMScheduler", "batchstep", "look-ahead")],
)
def test_schedulers_a_strategy_cannot_split_are_refused_at_plan_time(tmp_path, scheduler, strategy, message):
    from engine.engine import Engine
    from engine.protocol import GenerationRequest

    folder = tmp_path / "model"
    shutil.copytree(TINY, folder)
    config_file = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "_class_name": scheduler}))
    request = GenerationRequest(model=str(folder), strategy=strategy, devices="cpu:1", steps=4)
    with pytest.raises(UserError, match=message):
        Engine().plan(request)
    assert Engine().plan(GenerationRequest(model=str(folder), steps=4)).request.strategy == "sequential"
