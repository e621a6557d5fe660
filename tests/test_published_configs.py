"""The transcribed published configurations in resources/configs (see resources/configs/SOURCES.md).

Two checks, both on the meta device (no memory, a few seconds):

* every diffusers component config of the repositories below loads into its diffusers 0.42 class with
  no key left unused, and every component named in model_index.json has its config (or is a tokenizer);
* the models built from the transformer / VAE configs have the parameter count implied by the size of the
  published weight files (size / bytes per parameter), within 0.5% (sizes are given to three digits).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

CONFIGS = Path(__file__).resolve().parents[1] / "resources" / "configs"

# The repositories transcribed for the video/audio checkpoints (resources/configs/ORG--NAME).
PUBLISHED_REPOS = [
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    "Wan-AI/Wan2.1-T2V-14B-Diffusers",
    "Wan-AI/Wan2.2-T2V-A14B-Diffusers",
    "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
    "stabilityai/stable-audio-open-1.0",
    "Lightricks/LTX-Video",
]

# Repositories of which only some component configs are transcribed (no model_index.json).
PARTIAL_REPOS = {
    "THUDM/CogVideoX-5b": {"transformer": "CogVideoXTransformer3DModel", "vae": "AutoencoderKLCogVideoX"},
    "hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v": {
        "transformer": "HunyuanVideo15Transformer3DModel",
        "vae": "AutoencoderKLHunyuanVideo15",
        "scheduler": "FlowMatchEulerDiscreteScheduler",
    },
    "Lightricks/LTX-2": {"transformer": "LTX2VideoTransformer3DModel", "vae": "AutoencoderKLLTX2Video"},
}

GB = 1e9
MB = 1e6

# Parameters implied by the published weight files (total size / bytes per parameter), with their source.
PUBLISHED_PARAMETERS = {
    # Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/diffusion_pytorch_model-0000{1,2}-of-00002.safetensors:
    # 5 GB + 677 MB = 5.68 GB in fp32 (hub tree page, folder total 5.68 GB)
    ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "transformer"): (5 * GB + 677 * MB) / 4,
    # Wan VAE: StevenZhang/Wan2.1-VAE_Diff diffusion_pytorch_model.safetensors (the converted VAE the
    # Wan2.1 Diffusers repos ship): 508 MB in fp32
    ("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "vae"): 508 * MB / 4,
    # Wan2.1-T2V-14B-Diffusers ships 12 fp32 shards whose total is not in the stored pages; the same
    # transformer as one file: Comfy-Org/Wan_2.1_ComfyUI_repackaged wan2.1_t2v_14B_fp16.safetensors, LFS
    # pointer "size 28577761176" (bytes, fp16, header included)
    ("Wan-AI/Wan2.1-T2V-14B-Diffusers", "transformer"): 28577761176 / 2,
    # Wan2.2-T2V-A14B: two experts with the Wan2.1-14B shape; Comfy-Org/Wan_2.2_ComfyUI_Repackaged
    # wan2.2_t2v_high_noise_14B_fp16.safetensors and wan2.2_t2v_low_noise_14B_fp16.safetensors: 28.6 GB each
    ("Wan-AI/Wan2.2-T2V-A14B-Diffusers", "transformer"): 28.6 * GB / 2,
    ("Wan-AI/Wan2.2-T2V-A14B-Diffusers", "transformer_2"): 28.6 * GB / 2,
    # Wan2.2-TI2V-5B: Comfy-Org/Wan-2.2 wan2.2_ti2v_5B_fp16.safetensors: "10 GB" in fp16 (two digits only)
    ("Wan-AI/Wan2.2-TI2V-5B-Diffusers", "transformer"): 10 * GB / 2,
    # Wan2.2 VAE (z_dim 48): callgg/wan2-decoder vae/diffusion_pytorch_model.safetensors: 2.82 GB in fp32
    ("Wan-AI/Wan2.2-TI2V-5B-Diffusers", "vae"): 2.82 * GB / 4,
    # stabilityai/stable-audio-open-1.0 transformer/diffusion_pytorch_model.safetensors: 4.23 GB in fp32
    # (RedbeardNZ/stable-audio-open-1.0 and ylacombe/stable-audio-1.0 tree pages)
    ("stabilityai/stable-audio-open-1.0", "transformer"): 4.23 * GB / 4,
    # stable-audio-open-1.0 vae/diffusion_pytorch_model.safetensors: 624 MB in fp32
    ("stabilityai/stable-audio-open-1.0", "vae"): 624 * MB / 4,
    # stable-audio-open-1.0 projection_model/diffusion_pytorch_model.safetensors: 1.59 MB in fp32
    ("stabilityai/stable-audio-open-1.0", "projection_model"): 1.59 * MB / 4,
    # Lightricks/LTX-Video transformer/diffusion_pytorch_model-0000{1,2}-of-00002.safetensors:
    # 4.94 GB + 2.75 GB in fp32 (hub tree page, "Diffusers weights test (#32)")
    ("Lightricks/LTX-Video", "transformer"): (4.94 + 2.75) * GB / 4,
    # Lightricks/LTX-Video vae/diffusion_pytorch_model.safetensors: 1.68 GB in fp32 (duplicate
    # Alignment-Lab-AI/Vid of Lightricks/LTX-Video)
    ("Lightricks/LTX-Video", "vae"): 1.68 * GB / 4,
    # THUDM/CogVideoX-5b transformer/diffusion_pytorch_model-0000{1,2}-of-00002.safetensors:
    # 9.93 GB + 1.22 GB in bf16 (hub tree pages at 8fc5b28 and f854f4b)
    ("THUDM/CogVideoX-5b", "transformer"): (9.93 + 1.22) * GB / 2,
    # CogVideoX-5b VAE: Kijai/CogVideoX-5b-Tora vae/diffusion_pytorch_model.safetensors, 431 MB in 16-bit (the
    # official file's size was not found; CogVideoX-2b's fp16 VAE is also 431 MB)
    ("THUDM/CogVideoX-5b", "vae"): 431 * MB / 2,
    # HunyuanVideo-1.5 480p T2V: the original tencent/HunyuanVideo-1.5 transformer/480p_t2v/
    # diffusion_pytorch_model.safetensors is 33.3 GB in fp32 (the diffusers conversion maps it tensor for
    # tensor, splitting fused qkv); the converted repo's own shard sizes were not found
    ("hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v", "transformer"): 33.3 * GB / 4,
    # tencent/HunyuanVideo-1.5 vae/diffusion_pytorch_model.safetensors: 5.04 GB in fp32
    ("hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v", "vae"): 5.04 * GB / 4,
    # Lightricks/LTX-2 VAE: Remudl/ltx-vae, "BF16 version of vae from Lightricks/LTX-2",
    # ltx-vae-bf16.safetensors "2.28 GB". That page's sizes are binary (its Wan VAE, 126.9 M
    # parameters, is listed as "0.24 GB" = 0.24 GiB), so 2.28 GiB. (No size was found for the LTX-2
    # transformer.)
    ("Lightricks/LTX-2", "vae"): 2.28 * 2**30 / 2,
}


def repo_dir(repo: str) -> Path:
    return CONFIGS / repo.replace("/", "--")


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def model_index(repo: str) -> dict[str, tuple[str | None, str | None]]:
    index = read(repo_dir(repo) / "model_index.json")
    return {k: tuple(v) for k, v in index.items() if not k.startswith("_") and isinstance(v, list)}


def component_config(repo: str, component: str) -> dict:
    folder = repo_dir(repo) / component
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    return read(folder / name)


def diffusers_class(class_name: str):
    import diffusers

    return getattr(diffusers, class_name)


# Classes whose diffusers module needs an optional package that an environment may lack (diffusers then
# exports a dummy): their config keys are checked against the __init__ arguments in the module's source.
OPTIONAL_BACKEND_MODULES = {
    # needs torchsde (BrownianTreeNoiseSampler)
    "CosineDPMSolverMultistepScheduler": "diffusers.schedulers.scheduling_cosine_dpmsolver_multistep",
}


def init_arguments_from_source(class_name: str) -> set[str]:
    import ast
    import importlib.util

    source = Path(importlib.util.find_spec(OPTIONAL_BACKEND_MODULES[class_name]).origin).read_text()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == class_name:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                    return {a.arg for a in item.args.args + item.args.kwonlyargs} - {"self"}
    raise AssertionError(f"{class_name}.__init__ not found")


def backend_available(class_name: str) -> bool:
    import importlib

    if class_name not in OPTIONAL_BACKEND_MODULES:
        return True
    try:
        importlib.import_module(OPTIONAL_BACKEND_MODULES[class_name])
    except ImportError:
        return False
    return True


def build_on_meta(repo: str, component: str):
    config = component_config(repo, component)
    with torch.device("meta"):
        return diffusers_class(config["_class_name"]).from_config(config)


def check_loads(repo: str, component: str, class_name: str) -> None:
    """The config names its class, uses only keys the class knows and comes back unchanged from the class."""
    config = component_config(repo, component)
    assert config["_class_name"] == class_name, (repo, component)
    if not backend_available(class_name):
        keys = {k for k in config if not k.startswith("_")}
        assert keys <= init_arguments_from_source(class_name), (repo, component)
        return
    cls = diffusers_class(class_name)
    _, unused, _ = cls.extract_init_dict(dict(config))
    unused = {k for k in unused if not k.startswith("_")}
    assert not unused, (repo, component, unused)
    model = cls.from_config(config) if component == "scheduler" else build_on_meta(repo, component)
    for key, value in config.items():
        if not key.startswith("_"):
            got = model.config[key]
            assert list(got) == value if isinstance(value, list) else got == value, (repo, key)


@pytest.mark.parametrize("repo", PUBLISHED_REPOS)
def test_every_component_has_its_config_and_loads_into_its_class(repo):
    index = model_index(repo)
    assert index, repo
    for component, (library, class_name) in index.items():
        if library is None:  # an optional component left empty (Wan2.2 TI2V-5B transformer_2)
            assert class_name is None
            continue
        if component == "tokenizer":  # not transcribed (see SOURCES.md)
            continue
        folder = repo_dir(repo) / component
        if library == "transformers":
            if not folder.is_dir():  # text encoders not found are listed in SOURCES.md
                continue
            import transformers

            config = read(folder / "config.json")
            assert class_name in config["architectures"], (repo, component)
            config_class = getattr(transformers, class_name).config_class
            assert config["model_type"] == config_class.model_type, (repo, component)
            continue
        # diffusers classes; StableAudioProjectionModel is listed under the pipeline module "stable_audio"
        assert library in ("diffusers", "stable_audio"), (repo, component, library)
        check_loads(repo, component, class_name)


@pytest.mark.parametrize(("repo", "component"), [(r, c) for r, cs in PARTIAL_REPOS.items() for c in cs])
def test_partial_repositories_load_into_their_classes(repo, component):
    assert not (repo_dir(repo) / "model_index.json").exists()
    check_loads(repo, component, PARTIAL_REPOS[repo][component])


@pytest.mark.parametrize(("repo", "component"), list(PUBLISHED_PARAMETERS))
def test_published_configs_give_the_published_parameter_counts(repo, component):
    model = build_on_meta(repo, component)
    counted = sum(p.numel() for p in model.parameters())
    # Sizes are given to three digits: 0.5% covers the rounding and the safetensors header.
    assert counted == pytest.approx(PUBLISHED_PARAMETERS[(repo, component)], rel=5e-3)


def test_wan22_expert_settings():
    a14b = read(repo_dir("Wan-AI/Wan2.2-T2V-A14B-Diffusers") / "model_index.json")
    assert a14b["boundary_ratio"] == 0.875 and a14b["expand_timesteps"] is False
    assert component_config("Wan-AI/Wan2.2-T2V-A14B-Diffusers", "transformer") == component_config(
        "Wan-AI/Wan2.2-T2V-A14B-Diffusers", "transformer_2"
    )
    ti2v = read(repo_dir("Wan-AI/Wan2.2-TI2V-5B-Diffusers") / "model_index.json")
    assert ti2v["boundary_ratio"] is None and ti2v["expand_timesteps"] is True
    assert ti2v["transformer_2"] == [None, None]
