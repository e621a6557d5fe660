"""LoRA adapters for a job: a tiny LoRA made here changes the clip, ParaStep on one rank with it equals
sequential with it, and the warm pipeline is back to the plain model after the job."""

from __future__ import annotations

import numpy as np
import pytest

from engine.errors import UserError
from engine.loras import check_loras, parse_lora_arg
from engine.protocol import GenerationRequest
from engine.strategies import STRATEGIES
from resources import EMBEDDED_MODELS_DIR

REQUEST = dict(model="tiny-cogvideox", prompt="a red circle", frames=9, height=32, width=48, steps=4)


@pytest.fixture(scope="module")
def tiny_lora(tmp_path_factory) -> str:
    """Rank-4 LoRA on every attention projection of tiny-cogvideox's transformer, in diffusers' key
    layout (`transformer.<module>.lora_A/B.weight`), random but seeded."""
    pytest.importorskip("peft")  # diffusers' adapters need it (the `lora` extra)
    import torch
    from diffusers import CogVideoXTransformer3DModel
    from safetensors.torch import save_file

    transformer = CogVideoXTransformer3DModel.from_pretrained(
        EMBEDDED_MODELS_DIR / "tiny-cogvideox/transformer"
    )
    generator = torch.Generator().manual_seed(0)
    state = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v"):
            state[f"transformer.{name}.lora_A.weight"] = 0.1 * torch.randn(
                4, module.in_features, generator=generator
            )
            state[f"transformer.{name}.lora_B.weight"] = 0.1 * torch.randn(
                module.out_features, 4, generator=generator
            )
    path = tmp_path_factory.mktemp("lora") / "tiny-lora.safetensors"
    save_file(state, str(path))
    return str(path)


def test_lora_changes_the_clip_parastep_and_cfg_parallel_keep_it_and_it_unloads(tiny_lora):
    from engine.engine import Engine

    def latents(engine, strategy, loras, devices="cpu:1", **options):
        request = GenerationRequest(
            **REQUEST, strategy=strategy, strategy_options=options, devices=devices, loras=loras
        )
        return engine.run(engine.plan(request), previews=False).latents

    lora = [{"path": tiny_lora, "weight": 0.8}]
    with Engine() as engine:
        plain = latents(engine, "sequential", [])
        with_lora = latents(engine, "sequential", lora)
        parastep = latents(engine, "parastep", lora, warmup=1)
        plain_again = latents(engine, "sequential", [])
        # Both ranks load the adapter: CFG-parallel with it equals sequential with it (each guidance
        # half at batch size 1 rounds the last bits differently: tests/test_cfg_parallel.py).
        cfg = latents(engine, "cfg-parallel", lora, devices="cpu:2")
    np.testing.assert_allclose(cfg, with_lora, rtol=0, atol=1e-5 * np.abs(with_lora).max())
    assert np.linalg.norm(cfg - plain) / np.linalg.norm(plain) > 0.01
    change = np.linalg.norm(with_lora - plain) / np.linalg.norm(plain)
    assert change > 0.01, change
    assert np.array_equal(parastep, with_lora)  # one rank: ParaStep is the sequential loop
    assert np.array_equal(plain_again, plain)  # the adapters left with the job


def test_lora_entries_are_checked_before_any_work(tiny_lora, tmp_path):
    check_loras([{"path": tiny_lora, "weight": 0.5}], "CogVideoXPipeline", STRATEGIES["parastep"])
    pickle = tmp_path / "lora.bin"
    pickle.write_bytes(b"x")
    cases = [
        ([{"path": str(pickle), "weight": 1}], "CogVideoXPipeline", "sequential", "pickle"),
        ([{"path": str(tmp_path / "no.safetensors")}], "CogVideoXPipeline", "sequential", "does not exist"),
        (
            [{"path": tiny_lora, "weight": "high"}],
            "CogVideoXPipeline",
            "sequential",
            "not a path with a weight",
        ),
        (["lora.safetensors"], "CogVideoXPipeline", "sequential", "not a path with a weight"),
        ([{"path": tiny_lora}], "CogVideoXPipeline", "distrifusion", "not checked with LoRA"),
        ([{"path": tiny_lora}], "StableVideoDiffusionPipeline", "sequential", "no LoRA support"),
    ]
    for loras, pipeline, strategy, message in cases:
        with pytest.raises(UserError, match=message):
            check_loras(loras, pipeline, STRATEGIES[strategy])


def test_lora_on_the_command_line_and_in_requests():
    assert parse_lora_arg("/a/b.safetensors") == {"path": "/a/b.safetensors", "weight": 1.0}
    assert parse_lora_arg("/a/b.safetensors:0.6") == {"path": "/a/b.safetensors", "weight": 0.6}
    request = GenerationRequest(model="m", loras=[{"path": "x.safetensors", "weight": 0.5}])
    assert GenerationRequest.from_dict(request.to_dict()) == request
    with pytest.raises(UserError, match="loras"):
        GenerationRequest.from_dict({"model": "m", "loras": "x.safetensors"})
