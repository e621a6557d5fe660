"""The full-size model builder (scripts/build_full_size_models.py): published configs, the HF-cache layout.

Full-size weights are never made here: parameter counts come from meta-device skeletons (no memory), and
the layout test builds the --reduced variant, which goes through the same code.
"""

from __future__ import annotations

import json

import pytest
import torch

from scripts import build_full_size_models as builder

# Parameters implied by the published weight files (size / bytes per parameter), with their source.
PUBLISHED_PARAMETERS = {
    # THUDM/CogVideoX-2b transformer/diffusion_pytorch_model.safetensors: 3.39 GB in fp16
    ("cogvideox-2b", "transformer"): 3.39e9 / 2,
    # THUDM/CogVideoX-2b vae/diffusion_pytorch_model.safetensors: 431 MB in fp16
    ("cogvideox-2b", "vae"): 431e6 / 2,
    # cvssp/audioldm2-large unet/diffusion_pytorch_model.safetensors: 2.87 GB in fp32
    ("audioldm2-large", "unet"): 2.87e9 / 4,
    # cvssp/audioldm2-large language_model/model.safetensors: 498 MB in fp32 (GPT-2 base)
    ("audioldm2-large", "language_model"): 498e6 / 4,
}


def skeleton_parameters(name: str, component: str) -> int:
    spec = builder.MODELS[name]
    library, class_name = builder.model_index(spec)[component]
    config = builder.component_config(spec, component, reduced=False)
    with torch.device("meta"):
        if library == "transformers":
            import transformers

            cls = getattr(transformers, class_name)
            settings = {k: v for k, v in config.items() if k not in ("architectures", "torch_dtype")}
            model = cls(cls.config_class(**settings))
        else:
            import diffusers

            model = getattr(diffusers, class_name).from_config(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(("name", "component"), list(PUBLISHED_PARAMETERS))
def test_published_configs_give_the_published_parameter_counts(name, component):
    counted = skeleton_parameters(name, component)
    # Files sizes are given to three digits: 0.5% covers the rounding and the safetensors header.
    assert counted == pytest.approx(PUBLISHED_PARAMETERS[(name, component)], rel=5e-3)


def test_every_model_index_component_has_a_config_or_a_tokenizer():
    for name, spec in builder.MODELS.items():
        for component, entry in builder.model_index(spec).items():
            if component.startswith("_") or not isinstance(entry, list) or entry[0] is None:
                continue  # pipeline settings (boundary_ratio, expand_timesteps) and absent components
            has_files = (spec.configs / component).is_dir()
            assert has_files or (name, component) in builder.TOKENIZERS, (name, component)


def test_reduced_build_loads_from_the_hf_cache_like_a_download(tmp_path, monkeypatch):
    from engine.catalog import ModelCatalog
    from engine.loading import check_weights, load_pipeline

    builder.main(["cogvideox-2b", "--reduced", "--layout", "hf-cache", "--out", str(tmp_path)])
    repo = tmp_path / "models--THUDM--CogVideoX-2b"
    commit = (repo / "refs" / "main").read_text()
    snapshot = repo / "snapshots" / commit
    weights = snapshot / "transformer" / "diffusion_pytorch_model.safetensors"
    assert weights.is_symlink() and weights.resolve().parent == (repo / "blobs").resolve()
    assert not any(p.is_symlink() for p in (repo / "blobs").iterdir())

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    entry = ModelCatalog().resolve("THUDM/CogVideoX-2b")
    assert (entry.source, entry.family, entry.path) == ("hf-cache", "cogvideox", snapshot)
    check_weights(entry)

    pipe = load_pipeline(entry, "cpu", torch.float32)
    published = json.loads(
        (builder.MODELS["cogvideox-2b"].configs / "transformer" / "config.json").read_text()
    )
    reduced = builder.MODELS["cogvideox-2b"].reduced["transformer"]
    for key, value in published.items():
        if not key.startswith("_"):
            assert pipe.transformer.config[key] == reduced.get(key, value), key
    assert pipe.text_encoder.config.vocab_size == 32128 and len(pipe.tokenizer) == 32100
    assert (
        pipe.text_encoder.shared.weight.data_ptr() == pipe.text_encoder.encoder.embed_tokens.weight.data_ptr()
    )
    with torch.inference_mode():
        latents = pipe(
            "a red panda", num_frames=9, height=64, width=96, num_inference_steps=1, output_type="latent"
        ).frames
    assert latents.shape == (1, 3, 16, 8, 12) and torch.isfinite(latents).all()


def test_materialized_weights_keep_activations_in_range():
    """Variance-preserving random weights: a reduced T5 gives O(1) outputs (no overflow in fp16 later)."""
    spec = builder.MODELS["cogvideox-2b"]
    config = builder.component_config(spec, "text_encoder", reduced=True)
    model = builder.build_weighted("transformers", "T5EncoderModel", config, torch.float32, "cpu")
    with torch.inference_mode():
        states = model(torch.arange(1, 40).unsqueeze(0)).last_hidden_state
    assert torch.isfinite(states).all() and 0.05 < states.std().item() < 20


@pytest.mark.parametrize("name", builder.WAN_MODELS)
def test_wan_reduced_configs_build_on_meta_with_consistent_widths(name):
    """The reduced Wan variants: every weighted component builds from its overridden config, and the
    transformers read the text encoder's width (what a reduced pipeline needs to run)."""
    import diffusers
    import transformers

    spec = builder.MODELS[name]
    index = builder.model_index(spec)
    encoder = builder.component_config(spec, "text_encoder", reduced=True)
    for component, entry in index.items():
        if component.startswith("_") or not isinstance(entry, list) or entry[0] is None:
            continue
        if component in ("tokenizer", "scheduler"):
            continue
        config = builder.component_config(spec, component, reduced=True)
        with torch.device("meta"):
            if entry[0] == "transformers":
                cls = getattr(transformers, entry[1])
                settings = {k: v for k, v in config.items() if k not in ("architectures", "torch_dtype")}
                cls(cls.config_class(**settings))
            else:
                getattr(diffusers, entry[1]).from_config(config)
        if component.startswith("transformer"):
            assert config["text_dim"] == encoder["d_model"]


def test_wan_estimate_shapes_and_solver_state():
    """The published sampling the estimates use, and the UniPC state ParaStep's sync_solver broadcasts."""
    from scripts import estimate_full_size as estimate

    assert estimate.wan_latent_shape("wan2.1-t2v-1.3b") == (1, 16, 21, 60, 104)  # 81 x 480x832
    assert estimate.wan_latent_shape("wan2.2-t2v-a14b") == (1, 16, 21, 90, 160)  # 81 x 720x1280
    assert estimate.wan_latent_shape("wan2.2-ti2v-5b") == (1, 48, 31, 44, 80)  # 121 x 704x1280, VAE /16
    # UniPC, solver_order 2: two model outputs and the last sample.
    assert estimate.wan_solver_tensors("wan2.1-t2v-14b") == 3
    row = {"steps": 50, "warmup": 12, "latent_bytes": 8, "solver_tensors": 3, "prediction_bytes": 4}
    per_step = dict(estimate.wan_bytes_per_step(row))
    # N=2, T=50, W=12: 19 rounds of 2 -> 19 predictions, 18 broadcasts of 4 x 8 B; 12 + 19 segments,
    # a flag after each but the last: 30.
    assert per_step["parastep N=2, sync_solver 1"] == pytest.approx((19 * 4 + 18 * 32 + 30) / 50)
    assert per_step["parastep N=2, sync_solver 0"] == pytest.approx((19 * 4 + 18 * 8 + 30) / 50)
    # cfg-parallel, separate calls: 49 steps exchange half the prediction each way, 49 flags.
    assert per_step["cfg-parallel N=2"] == pytest.approx((2 * 49 * 2 + 49) / 50)
