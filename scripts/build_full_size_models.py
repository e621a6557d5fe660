"""Build full-size random-weight pipelines from the published configurations in ``resources/configs``.

    .venv/bin/python -m scripts.build_full_size_models [NAME ...] --out DIR [--layout folder|hf-cache]
        [--reduced] [--device cpu|cuda] [--dtype auto|fp32|fp16|bf16] [--force]

NAME is any of cogvideox-2b, svd, svd-xt, audioldm2-large, wan2.1-t2v-1.3b, wan2.1-t2v-14b, wan2.2-t2v-a14b,
wan2.2-ti2v-5b (default: all). Each pipeline is written in
diffusers layout with safetensors weights:

* ``--layout folder`` (default): ``DIR/<name>/model_index.json, transformer/, ...``, a local folder that
  ``parastep-studio --model DIR/<name>`` loads;
* ``--layout hf-cache``: ``DIR/models--THUDM--CogVideoX-2b/{blobs,refs/main,snapshots/<hash>/...}``, the
  layout ``huggingface_hub`` leaves after a download (files in ``blobs/`` named by their hash, symlinked from
  the snapshot). With ``HF_HUB_CACHE=DIR`` the catalog then finds ``THUDM/CogVideoX-2b`` exactly as it
  would find a downloaded checkpoint.

Why random weights: speed and memory do not depend on the values, and nothing can be downloaded here. The
classes, configurations, tensor shapes and file layout are those of the published checkpoints, so loading,
memory and step time are those of the real models. Tokenizers are built locally with the published
vocabulary sizes (their ids mean nothing, like the weights).

Memory: every weighted component is created on the meta device (accelerate's ``init_empty_weights``, buffers
kept real), then its parameters are allocated one tensor at a time directly in the target dtype on
``--device`` and filled with variance-preserving random values; each component is saved (5 GB shards) and
freed before the next. The peak is about the largest component plus one shard: the 4.8 B-parameter T5-XXL of
CogVideoX-2b needs ~10 GB in bf16, SVD and AudioLDM2-large ~3 GB, so a 24 GB machine builds all of them.

``--reduced`` shrinks widths and depths (same classes, same code path, same file layout) so that the whole
chain, building, cataloguing, loading and running, can be checked on a CPU in seconds.
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "resources" / "configs"
SEED = 0
SHARD_SIZE = "5GB"


@dataclass(frozen=True)
class ModelSpec:
    repo_id: str  # the published repository this reproduces
    dtype: str  # the dtype the model is published for / run in
    reduced: dict[str, dict[str, Any]]  # component -> config overrides for --reduced

    @property
    def configs(self) -> Path:
        return CONFIGS_DIR / self.repo_id.replace("/", "--")


# --reduced: small widths/depths, every cross-component dimension kept consistent.
_SVD_REDUCED: dict[str, dict[str, Any]] = {
    "unet": {
        "block_out_channels": [32, 64, 64, 64],
        "num_attention_heads": [1, 2, 2, 2],
        "layers_per_block": 1,
        "cross_attention_dim": 32,
        "addition_time_embed_dim": 16,
        "projection_class_embeddings_input_dim": 48,  # 3 * addition_time_embed_dim
    },
    "vae": {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1},
    "image_encoder": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "projection_dim": 32,
    },
}

# Wan (2.1 T2V 1.3B/14B, 2.2 T2V A14B, 2.2 TI2V 5B): UMT5 text encoder, WanTransformer3DModel (two of them
# for A14B), AutoencoderKLWan. Reduced: text_dim = the encoder's d_model; head_dim a multiple of 6 (rope).
_WAN_TRANSFORMER_REDUCED: dict[str, Any] = {
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "ffn_dim": 64,
    "num_layers": 2,
    "text_dim": 64,
    "freq_dim": 64,
    "rope_max_seq_len": 64,
}
_WAN_REDUCED: dict[str, dict[str, Any]] = {
    "transformer": _WAN_TRANSFORMER_REDUCED,
    "transformer_2": _WAN_TRANSFORMER_REDUCED,
    "text_encoder": {
        "d_model": 64,
        "d_ff": 128,
        "d_kv": 32,
        "num_heads": 2,
        "num_layers": 2,
        "num_decoder_layers": 2,
    },
    "vae": {"base_dim": 16, "num_res_blocks": 1},
}

MODELS: dict[str, ModelSpec] = {
    "cogvideox-2b": ModelSpec(
        "THUDM/CogVideoX-2b",
        "bf16",
        {
            "transformer": {
                "num_layers": 2,
                "num_attention_heads": 2,
                "time_embed_dim": 64,
                "text_embed_dim": 64,
            },
            "text_encoder": {"d_model": 64, "d_ff": 128, "d_kv": 32, "num_heads": 2, "num_layers": 2},
            "vae": {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1},
        },
    ),
    "svd": ModelSpec("stabilityai/stable-video-diffusion-img2vid", "fp16", _SVD_REDUCED),
    "svd-xt": ModelSpec("stabilityai/stable-video-diffusion-img2vid-xt", "fp16", _SVD_REDUCED),
    "audioldm2-large": ModelSpec(
        "cvssp/audioldm2-large",
        "fp16",
        {
            "unet": {
                "block_out_channels": [32, 64, 64, 64],
                "layers_per_block": 1,
                "cross_attention_dim": [[None, 64, 64, None]] * 4,  # [self, GPT-2 width, T5 width, self]
            },
            "vae": {"block_out_channels": [32, 32, 32], "layers_per_block": 1},
            "vocoder": {"upsample_initial_channel": 32},
            "text_encoder": {
                "projection_dim": 32,
                "text_config": {
                    "hidden_size": 64,
                    "num_hidden_layers": 2,
                    "num_attention_heads": 2,
                    "intermediate_size": 128,
                    "projection_hidden_size": 64,
                },
                "audio_config": {
                    "depths": [1, 1, 1, 1],
                    "num_attention_heads": [1, 2, 4, 8],
                    "patch_embeds_hidden_size": 16,
                    "hidden_size": 128,  # patch_embeds_hidden_size * 2 ** (len(depths) - 1)
                    "projection_hidden_size": 64,
                },
            },
            "text_encoder_2": {"d_model": 64, "d_ff": 128, "d_kv": 32, "num_heads": 2, "num_layers": 2},
            "language_model": {"n_embd": 64, "n_layer": 2, "n_head": 2},
            "projection_model": {"text_encoder_dim": 32, "text_encoder_1_dim": 64, "langauge_model_dim": 64},
        },
    ),
    "wan2.1-t2v-1.3b": ModelSpec("Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "bf16", _WAN_REDUCED),
    "wan2.1-t2v-14b": ModelSpec("Wan-AI/Wan2.1-T2V-14B-Diffusers", "bf16", _WAN_REDUCED),
    "wan2.2-t2v-a14b": ModelSpec("Wan-AI/Wan2.2-T2V-A14B-Diffusers", "bf16", _WAN_REDUCED),
    "wan2.2-ti2v-5b": ModelSpec(
        "Wan-AI/Wan2.2-TI2V-5B-Diffusers",
        "bf16",
        {**_WAN_REDUCED, "vae": {"base_dim": 16, "decoder_base_dim": 32, "num_res_blocks": 1}},
    ),
}
WAN_MODELS = tuple(name for name in MODELS if name.startswith("wan"))

# Components whose files are copied as published (no weights).
_CONFIG_ONLY = ("Scheduler", "ImageProcessor", "FeatureExtractor")
# The published model_index names GPT2Model; the diffusers pipeline needs the generation helpers of the
# model with a head (see resources/configs/SOURCES.md).
_CLASS_FIXES = {("language_model", "GPT2Model"): "GPT2LMHeadModel"}


# --- configs --------------------------------------------------------------------------------------


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def deep_update(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_update(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def component_config(spec: ModelSpec, component: str, reduced: bool) -> dict[str, Any]:
    config = read_json(spec.configs / component / "config.json")
    if reduced:
        config = deep_update(config, spec.reduced.get(component, {}))
    return config


def model_index(spec: ModelSpec) -> dict[str, Any]:
    index = read_json(spec.configs / "model_index.json")
    for (component, published), replacement in _CLASS_FIXES.items():
        if index.get(component, [None, None])[1] == published:
            index[component] = [index[component][0], replacement]
    return index


# --- random weights -------------------------------------------------------------------------------


def fill_random_(tensor: Any, name: str, generator: Any) -> None:
    """Variance-preserving values: activations stay O(1) through deep stacks, also in fp16."""
    import torch

    if tensor.ndim <= 1:
        if name.endswith("bias"):
            tensor.zero_()
        elif name.endswith("weight"):  # norm scales
            tensor.fill_(1.0)
        else:  # learned scalars and vectors (logit scales, start/end embeddings)
            tensor.normal_(0.0, 0.02, generator=generator)
        return
    fan_in = max(1, tensor.numel() // tensor.shape[0])
    if tensor.dtype in (torch.float16, torch.bfloat16) and tensor.device.type == "cpu":
        # Half-precision normal_ is slow on CPU; draw in chunks of float32 and convert.
        flat = tensor.view(-1)
        chunk = 1 << 24
        for start in range(0, flat.numel(), chunk):
            part = flat[start : start + chunk]
            part.copy_(torch.randn(part.numel(), generator=generator) / math.sqrt(fan_in))
    else:
        tensor.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=generator)


def materialize_(module: Any, dtype: Any, device: str, seed: int) -> int:
    """Allocates every meta parameter in `dtype` on `device` and fills it; keeps tied parameters tied.

    Returns the number of parameters."""
    import torch

    generator = torch.Generator(device="cpu" if device == "cpu" else device).manual_seed(seed)
    made: dict[int, torch.nn.Parameter] = {}
    count = 0
    for submodule in module.modules():
        for name, param in list(submodule._parameters.items()):
            if param is None:
                continue
            if id(param) not in made:
                wanted = dtype if param.is_floating_point() else param.dtype
                data = torch.empty(param.shape, dtype=wanted, device=device)
                if data.is_floating_point():
                    fill_random_(data, name, generator)
                else:
                    data.zero_()
                made[id(param)] = torch.nn.Parameter(data, requires_grad=False)
                count += data.numel()
            submodule._parameters[name] = made[id(param)]
        for name, buffer in list(submodule._buffers.items()):
            if buffer is None:
                continue
            wanted = dtype if buffer.is_floating_point() else buffer.dtype
            submodule._buffers[name] = buffer.to(device=device, dtype=wanted)
    return count


def build_weighted(library: str, class_name: str, config: dict[str, Any], dtype: Any, device: str) -> Any:
    """The component with random weights, created without ever holding a float32 copy."""
    from accelerate import init_empty_weights

    if library == "transformers":
        import transformers

        cls = getattr(transformers, class_name)
        settings = {k: v for k, v in config.items() if k not in ("architectures", "torch_dtype", "dtype")}
        model_config = cls.config_class(**settings)
        if "max_new_tokens" in settings:  # generation setting the AudioLDM2 pipeline reads from the config
            model_config.max_new_tokens = settings["max_new_tokens"]
        with init_empty_weights(include_buffers=False):
            model = cls(model_config)
    else:  # diffusers, or a diffusers pipeline module such as "audioldm2"
        import diffusers

        cls = getattr(diffusers, class_name)
        with init_empty_weights(include_buffers=False):
            model = cls.from_config(config)
    materialize_(model, dtype, device, SEED)
    if hasattr(
        model, "tie_weights"
    ):  # transformers ties embeddings after init (T5 shared/encoder, GPT-2 head)
        model.tie_weights()
    return model.eval()


# --- tokenizers -----------------------------------------------------------------------------------


def _words() -> list[str]:
    from resources.build_tiny_models import WORDS

    return list(dict.fromkeys(WORDS))


def build_t5_tokenizer(model_max_length: int, pieces_total: int = 32000, extra_ids: int = 100) -> Any:
    """A T5 (unigram) tokenizer with T5's 32,000 pieces + 100 sentinels: English words, then characters,
    then filler pieces."""
    from transformers import T5Tokenizer

    from resources.build_tiny_models import FALLBACK_CHARS

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + word, -2.0) for word in _words()]
    pieces += [("\u2581", -3.0)] + [(char, -5.0) for char in FALLBACK_CHARS]
    pieces += [(f"\u2581tok{i}", -20.0) for i in range(pieces_total - len(pieces))]
    return T5Tokenizer(vocab=pieces, extra_ids=extra_ids, model_max_length=model_max_length)


def build_roberta_tokenizer(model_max_length: int, vocab_size: int = 50265) -> Any:
    """A RoBERTa byte-level BPE tokenizer (CLAP's text branch) padded to RoBERTa's 50,265 entries."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import RobertaTokenizer

    words = _words()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=2048,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([" ".join(words), " ".join(word.capitalize() for word in words)], trainer)
    trained = json.loads(bpe.to_str())["model"]
    vocab = dict(trained["vocab"])
    for i in range(vocab_size - len(vocab)):
        vocab[f"\u0120tok{i}"] = len(vocab)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    return RobertaTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


TOKENIZERS = {  # (model, component) -> builder; model_max_length as the published tokenizers
    ("cogvideox-2b", "tokenizer"): lambda: build_t5_tokenizer(226),
    ("audioldm2-large", "tokenizer"): lambda: build_roberta_tokenizer(512),
    ("audioldm2-large", "tokenizer_2"): lambda: build_t5_tokenizer(128),
}
for _wan in WAN_MODELS:  # UMT5's 256,000 pieces + 300 sentinels (the encoder's vocab_size is 256,384)
    TOKENIZERS[(_wan, "tokenizer")] = lambda: build_t5_tokenizer(512, pieces_total=256000, extra_ids=300)


# --- one pipeline ---------------------------------------------------------------------------------


def resolve_dtype(name: str, spec: ModelSpec) -> Any:
    import torch

    table = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    return table[spec.dtype if name == "auto" else name]


def build_pipeline_folder(
    name: str, target: Path, reduced: bool, device: str, dtype_name: str
) -> dict[str, Any]:
    """Writes the pipeline in diffusers layout into `target` (which must not exist); returns a summary."""
    import torch

    spec = MODELS[name]
    dtype = resolve_dtype(dtype_name, spec)
    index = model_index(spec)
    target.mkdir(parents=True)
    summary: dict[str, Any] = {"model": name, "repo_id": spec.repo_id, "reduced": reduced, "components": {}}
    for component, entry in index.items():
        if component.startswith("_") or not isinstance(entry, list) or entry[0] is None:
            continue  # settings (boundary_ratio, ...) and absent components (TI2V-5B's transformer_2)
        library, class_name = entry
        folder = target / component
        start = time.perf_counter()
        if any(word in class_name for word in _CONFIG_ONLY):
            shutil.copytree(spec.configs / component, folder)
            summary["components"][component] = {"class": class_name, "parameters": 0}
            continue
        if "Tokenizer" in class_name:
            TOKENIZERS[(name, component)]().save_pretrained(folder)
            summary["components"][component] = {"class": class_name, "parameters": 0}
            continue
        config = component_config(spec, component, reduced)
        model = build_weighted(library, class_name, config, dtype, device)
        parameters = sum(p.numel() for p in model.parameters())
        model.save_pretrained(folder, safe_serialization=True, max_shard_size=SHARD_SIZE)
        del model
        gc.collect()
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        summary["components"][component] = {
            "class": class_name,
            "parameters": parameters,
            "seconds": round(time.perf_counter() - start, 1),
        }
    (target / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    summary["bytes"] = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    return summary


# --- the Hugging Face cache layout ----------------------------------------------------------------


def snapshot_hash(repo_id: str, reduced: bool) -> str:
    """A fixed 40-hex commit id per model and scale (real snapshots are named by git commit)."""
    return hashlib.sha1(
        f"parastep-random-weights:{repo_id}:{'reduced' if reduced else 'full'}".encode()
    ).hexdigest()


def blob_name(path: Path) -> str:
    """huggingface_hub names LFS blobs by their sha256 and small files by their git blob sha1."""
    if path.suffix == ".safetensors":
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
        return digest.hexdigest()
    data = path.read_bytes()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def move_into_hf_cache(folder: Path, cache: Path, repo_id: str, reduced: bool) -> Path:
    """Turns a built pipeline folder into models--ORG--NAME/{blobs,refs/main,snapshots/<hash>}."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    commit = snapshot_hash(repo_id, reduced)
    snapshot = repo_dir / "snapshots" / commit
    blobs = repo_dir / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    if snapshot.exists():
        shutil.rmtree(snapshot)
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = file.relative_to(folder)
        blob = blobs / blob_name(file)
        if blob.exists():
            file.unlink()
        else:
            file.replace(blob)
        link = snapshot / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    shutil.rmtree(folder)
    return snapshot


def build(name: str, out: Path, layout: str, reduced: bool, device: str, dtype: str, force: bool) -> dict:
    spec = MODELS[name]
    out.mkdir(parents=True, exist_ok=True)
    if layout == "folder":
        final = out / name
        if final.exists() and not force:
            return {"model": name, "path": str(final), "skipped": "exists (use --force to rebuild)"}
    else:
        final = (
            out
            / ("models--" + spec.repo_id.replace("/", "--"))
            / "snapshots"
            / snapshot_hash(spec.repo_id, reduced)
        )
        if final.exists() and not force:
            return {"model": name, "path": str(final), "skipped": "exists (use --force to rebuild)"}
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=out)) / name
    start = time.perf_counter()
    try:
        summary = build_pipeline_folder(name, staging, reduced, device, dtype)
        for path in [staging, *staging.rglob("*")]:  # mkdtemp makes a private folder: ordinary modes
            path.chmod(0o755 if path.is_dir() else 0o644)
        if layout == "folder":
            if final.exists():
                shutil.rmtree(final)
            staging.replace(final)
        else:
            final = move_into_hf_cache(staging, out, spec.repo_id, reduced)
    finally:
        shutil.rmtree(staging.parent, ignore_errors=True)
    summary.update(path=str(final), seconds=round(time.perf_counter() - start, 1))
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(MODELS)} (default: all)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (a HF hub cache for hf-cache)")
    parser.add_argument("--layout", choices=("folder", "hf-cache"), default="folder")
    parser.add_argument("--reduced", action="store_true", help="small widths/depths for a CPU check")
    parser.add_argument("--device", default="cpu", help="where the random weights are made (cpu, cuda)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"))
    parser.add_argument("--force", action="store_true", help="rebuild models that already exist")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(MODELS))
    if unknown:
        parser.error(f"unknown model name(s): {', '.join(unknown)}")

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    for name in args.names or list(MODELS):
        summary = build(name, args.out, args.layout, args.reduced, args.device, args.dtype, args.force)
        if "skipped" in summary:
            print(f"{name}: {summary['path']} {summary['skipped']}")
            continue
        parts = ", ".join(
            f"{component} {info['parameters'] / 1e6:.1f}M"
            for component, info in summary["components"].items()
            if info["parameters"]
        )
        print(
            f"{name}: {summary['path']}  {summary['bytes'] / 1e9:.2f} GB in {summary['seconds']} s  ({parts})"
        )


if __name__ == "__main__":
    main()
