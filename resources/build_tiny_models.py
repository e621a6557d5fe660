"""Build the tiny random-weight diffusers pipelines embedded in ``resources/models``.

Run with ``python -m resources.build_tiny_models [NAME ...] [--out DIR]``. It writes three folders:

* ``tiny-cogvideox``: a ``CogVideoXPipeline`` (text to video) laid out like THUDM/CogVideoX-2b;
* ``tiny-svd``: a ``StableVideoDiffusionPipeline`` (image to video) laid out like
  stabilityai/stable-video-diffusion-img2vid;
* ``tiny-audioldm2``: an ``AudioLDM2Pipeline`` (text to audio) laid out like cvssp/audioldm2-large;
* ``tiny-wan``: a ``WanPipeline`` (text to video) laid out like Wan-AI/Wan2.1-T2V-1.3B-Diffusers;
* ``tiny-stable-audio``: a ``StableAudioPipeline`` (text to 44.1 kHz stereo audio) laid out like
  stabilityai/stable-audio-open-1.0;
* ``tiny-wan-i2v``: a ``WanImageToVideoPipeline`` laid out like Wan-AI/Wan2.1-I2V-14B-480P-Diffusers;
* ``tiny-wan-a14b``: the same with two experts (``transformer``, ``transformer_2`` and a
  ``boundary_ratio``), laid out like Wan-AI/Wan2.2-T2V-A14B-Diffusers (built by the tests, not shipped);
* ``tiny-ltx``: an ``LTXPipeline`` (text to video) laid out like Lightricks/LTX-Video (0.9.0).
* ``tiny-hunyuan-video15``: a ``HunyuanVideo15Pipeline`` (text to video) laid out like
  hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v (built by the tests, not shipped: its ByT5
  projection has a fixed 2048-wide hidden layer, 17 MB of weights at any model width).

Why: the application, its tests and its benchmarks need pipelines that load exactly like a published
checkpoint, ``DiffusionPipeline.from_pretrained(folder, local_files_only=True, use_safetensors=True)``, and
run a full generation, decoding included, on a CPU-only machine with no network. The weights are random, so
the output is noise, but the component classes, scheduler configurations, tokenizer types and tensor layouts
are those of the real models, so the same code paths run. The folders are small enough to commit to git (a
few MB in all), yet the CogVideoX transformer is sized so that one denoiser call (batch 2, for classifier-free
guidance) takes about 40 ms on one CPU thread: speed measurements then measure the model, not Python overhead.

Everything is built from configs with a fixed seed; nothing is downloaded. The tokenizers are built from a
small English word list. Each folder also gets a ``studio.json`` with the app's default generation settings.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AudioLDM2Pipeline,
    AudioLDM2ProjectionModel,
    AudioLDM2UNet2DConditionModel,
    AutoencoderKL,
    AutoencoderKLCogVideoX,
    AutoencoderKLHunyuanVideo15,
    AutoencoderKLLTXVideo,
    AutoencoderKLTemporalDecoder,
    AutoencoderKLWan,
    AutoencoderOobleck,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    CosineDPMSolverMultistepScheduler,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideo15Pipeline,
    HunyuanVideo15Transformer3DModel,
    LTXPipeline,
    LTXVideoTransformer3DModel,
    StableAudioDiTModel,
    StableAudioPipeline,
    StableAudioProjectionModel,
    StableVideoDiffusionPipeline,
    UNetSpatioTemporalConditionModel,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from diffusers.guiders import ClassifierFreeGuidance
from diffusers.utils import logging as diffusers_logging
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import (
    ByT5Tokenizer,
    ClapAudioConfig,
    ClapConfig,
    ClapFeatureExtractor,
    ClapModel,
    ClapTextConfig,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    CLIPVisionModelWithProjection,
    GPT2Config,
    GPT2LMHeadModel,
    Qwen2_5_VLTextConfig,
    Qwen2_5_VLTextModel,
    Qwen2Tokenizer,
    RobertaTokenizer,
    SpeechT5HifiGan,
    SpeechT5HifiGanConfig,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
)
from transformers.utils import logging as transformers_logging

from engine.previews import write_model_factors

MODELS_DIR = Path(__file__).resolve().parent / "models"
SEED = 0

# Vocabulary of the locally built tokenizers: common English words of video and audio prompts.
WORDS = """
a an the of in on at to from with and or but by for into over under above below near behind through across
is are was be being it its this that these those there here very slowly quickly gently softly loudly
man woman person people child boy girl baby crowd dancer singer drummer guitarist pianist astronaut robot
dog cat bird horse cow sheep fish whale dolphin lion tiger bear monkey panda rabbit fox wolf owl eagle duck
insect bee butterfly frog snake squirrel deer elephant
car truck train bus bicycle motorcycle boat ship plane airplane helicopter rocket engine siren horn bell
clock phone door window wall floor roof table chair bed kitchen room house building city street road
bridge tower castle village market station park garden farm forest jungle desert mountain hill valley
river lake sea ocean beach wave waves island sky cloud clouds sun moon star stars rain snow wind storm
thunder lightning fire smoke water ice rock stone sand grass tree trees flower flowers leaf leaves
red orange yellow green blue purple pink brown black white gray grey golden silver dark bright colorful
big small large tiny tall short long old young new beautiful cute happy sad calm quiet noisy loud soft
hard warm cold hot wet dry sunny cloudy foggy night day morning evening sunset sunrise spring summer
autumn winter
walking running jumping flying swimming dancing singing playing talking laughing crying barking meowing
chirping roaring buzzing ringing knocking hitting tapping clapping falling rolling spinning driving riding
eating drinking sleeping sitting standing looking smiling cooking reading writing painting burning
flowing crashing splashing blowing whistling humming typing
sound music song melody rhythm beat drum drums guitar piano violin flute trumpet saxophone bass voice
speech noise applause footsteps techno jazz classical ambient orchestra choir electronic
hammer wooden wood metal glass paper plastic surface
camera shot view scene close closeup aerial wide slow motion cinematic realistic photo video film style
drawing cartoon animation anime detailed high quality resolution 4k hd background foreground
light shadow lights neon color colors
one two three four five many some all
""".split()

# Single characters: the T5 (unigram) tokenizer's fallback pieces for words outside WORDS.
FALLBACK_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()&/"

Built = tuple[DiffusionPipeline, dict[str, Any]]


# --- Tokenizers and text encoders ---------------------------------------------------------------------------


def build_t5_tokenizer(model_max_length: int) -> T5Tokenizer:
    """A T5 tokenizer (SentencePiece-style unigram) over ``WORDS``, falling back to single characters."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]  # T5's ids: pad=0, eos=1, unk=2
    pieces += [("\u2581" + word, -2.0) for word in dict.fromkeys(WORDS)]
    pieces += [("\u2581", -3.0)] + [(char, -5.0) for char in FALLBACK_CHARS]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)


def build_roberta_tokenizer(model_max_length: int) -> RobertaTokenizer:
    """A RoBERTa tokenizer (byte-level BPE, as CLAP's text branch uses) with merges trained on ``WORDS``."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],  # ids 0-4: CLAP's bos=0, pad=1, eos=2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([" ".join(WORDS), " ".join(word.capitalize() for word in WORDS)], trainer)
    trained = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    return RobertaTokenizer(vocab=trained["vocab"], merges=merges, model_max_length=model_max_length)


# Qwen2-style chat template (the turns the HunyuanVideo 1.5 pipeline formats: system, user, assistant).
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def build_qwen2_tokenizer(model_max_length: int) -> Qwen2Tokenizer:
    """A Qwen2 tokenizer (byte-level BPE) with merges trained on ``WORDS``, Qwen's chat specials and
    chat template."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # Qwen2: pad = unk = <|endoftext|>
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=1024,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([" ".join(WORDS), " ".join(word.capitalize() for word in WORDS)], trainer)
    trained = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=trained["vocab"], merges=merges, model_max_length=model_max_length)
    tokenizer.add_special_tokens({"additional_special_tokens": specials[1:]})  # never split into bytes
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def build_t5_encoder(vocab_size: int, d_model: int) -> T5EncoderModel:
    """A two-layer T5 v1.1 (gated-gelu) encoder; its relative position buckets take any sequence length."""
    torch.manual_seed(SEED)
    config = T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // 2,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=2,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    return T5EncoderModel(config)


# --- CogVideoX (text to video), laid out like THUDM/CogVideoX-2b --------------------------------------------

COGVIDEOX_DEFAULTS = {"steps": 20, "frames": 9, "height": 128, "width": 192, "fps": 8, "guidance_scale": 6.0}


def build_cogvideox() -> Built:
    """T5 text encoder (prompts padded to 226 tokens), DiT with 3D sin-cos positions, causal 3D VAE."""
    defaults = COGVIDEOX_DEFAULTS
    vae_spatial, vae_temporal = 8, 4
    text_dim = 32

    tokenizer = build_t5_tokenizer(model_max_length=226)
    text_encoder = build_t5_encoder(len(tokenizer), text_dim)

    # 6 layers of width 64 over 226 text + 3 * 8 * 12 video tokens: ~40 ms per call (batch 2, one thread).
    torch.manual_seed(SEED)
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=2,
        attention_head_dim=32,
        in_channels=16,
        out_channels=16,
        time_embed_dim=16,
        text_embed_dim=text_dim,
        num_layers=6,
        sample_width=defaults["width"] // vae_spatial,
        sample_height=defaults["height"] // vae_spatial,
        sample_frames=defaults["frames"],
        patch_size=2,
        temporal_compression_ratio=vae_temporal,
        max_text_seq_length=226,
        use_rotary_positional_embeddings=False,
    )

    torch.manual_seed(SEED)
    vae = AutoencoderKLCogVideoX(
        block_out_channels=(8, 8, 8, 8),  # 4 blocks: 8x spatial compression
        latent_channels=16,
        layers_per_block=1,
        norm_num_groups=4,
        temporal_compression_ratio=vae_temporal,
        sample_height=defaults["height"],
        sample_width=defaults["width"],
        scaling_factor=1.15258426,
    )

    scheduler = CogVideoXDDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        rescale_betas_zero_snr=True,
        snr_shift_scale=3.0,  # CogVideoX-2b's value; CogVideoX-5b uses 1.0
    )

    pipe = CogVideoXPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    description = (
        "Tiny random-weight CogVideoX (CogVideoX-2b layout) for tests and CPU benchmarks; outputs noise."
    )
    return pipe, {"family": "cogvideox", "description": description, "defaults": dict(defaults)}


# --- Stable Video Diffusion (image to video), laid out like stabilityai/stable-video-diffusion-img2vid ------

# guidance_scale is the pipeline's max_guidance_scale; its min_guidance_scale is 1.0.
SVD_DEFAULTS = {
    "steps": 20,
    "frames": 8,
    "height": 64,
    "width": 96,
    "fps": 7,
    "guidance_scale": 3.0,
    "min_guidance_scale": 1.0,
}


def build_svd() -> Built:
    """CLIP vision encoder (224 px input), spatio-temporal UNet, KL VAE with a temporal decoder."""
    defaults = SVD_DEFAULTS
    embed_dim = 32

    torch.manual_seed(SEED)
    image_encoder = CLIPVisionModelWithProjection(
        CLIPVisionConfig(
            hidden_size=embed_dim,
            projection_dim=embed_dim,
            intermediate_size=2 * embed_dim,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=224,  # the pipeline always resizes the conditioning image to 224x224
            patch_size=14,
        )
    )
    feature_extractor = CLIPImageProcessor(
        size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}
    )

    # One resolution level (no UNet downsampling) whose mid block cross-attends to the image embedding: the
    # smallest layout that runs every SVD code path. Its group norms need multiples of 32 channels.
    torch.manual_seed(SEED)
    unet = UNetSpatioTemporalConditionModel(
        sample_size=defaults["height"] // 8,
        in_channels=8,  # noisy latents + conditioning image latents
        out_channels=4,
        down_block_types=("DownBlockSpatioTemporal",),
        up_block_types=("UpBlockSpatioTemporal",),
        block_out_channels=(32,),
        addition_time_embed_dim=16,
        projection_class_embeddings_input_dim=3 * 16,  # fps, motion bucket id, noise augmentation strength
        layers_per_block=1,
        cross_attention_dim=embed_dim,
        num_attention_heads=(2,),
        num_frames=defaults["frames"],
    )

    torch.manual_seed(SEED)
    vae = AutoencoderKLTemporalDecoder(
        down_block_types=("DownEncoderBlock2D",) * 4,  # 4 blocks: 8x spatial compression
        block_out_channels=(32, 32, 32, 32),  # the temporal decoder's group norms need multiples of 32
        layers_per_block=1,
        latent_channels=4,
        sample_size=defaults["height"],
        scaling_factor=0.18215,
    )

    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        interpolation_type="linear",
        prediction_type="v_prediction",
        sigma_max=700.0,
        sigma_min=0.002,
        steps_offset=1,
        timestep_spacing="leading",
        timestep_type="continuous",
        use_karras_sigmas=True,
    )

    pipe = StableVideoDiffusionPipeline(
        vae=vae,
        image_encoder=image_encoder,
        unet=unet,
        scheduler=scheduler,
        feature_extractor=feature_extractor,
    )
    # Without torchvision, transformers 5 hands out CLIPImageProcessorPil for CLIPImageProcessor. Record the
    # public class name, as the real checkpoint does, so the folder loads the same way with or without it.
    pipe.register_to_config(feature_extractor=("transformers", "CLIPImageProcessor"))
    description = (
        "Tiny random-weight Stable Video Diffusion (img2vid layout) for tests and CPU benchmarks; outputs "
        "noise. guidance_scale is the pipeline's max_guidance_scale."
    )
    return pipe, {"family": "svd", "description": description, "defaults": dict(defaults)}


# --- AudioLDM2 (text to audio), laid out like cvssp/audioldm2-large -----------------------------------------

AUDIOLDM2_DEFAULTS = {"steps": 20, "seconds": 2.0, "guidance_scale": 3.5}


def build_audioldm2() -> Built:
    """CLAP and Flan-T5 text encoders, GPT-2, UNet over mel-spectrogram latents, 16 kHz HiFi-GAN vocoder."""
    defaults = AUDIOLDM2_DEFAULTS
    clap_dim, t5_dim, lm_dim = 32, 32, 32
    mel_bins, vae_factor = 64, 4
    upsample_rates = [5, 4, 2, 2, 2]  # 160 samples (10 ms) per mel frame, as in AudioLDM2
    sampling_rate = 16000
    mel_frames = round(defaults["seconds"] * sampling_rate / math.prod(upsample_rates))

    tokenizer = build_roberta_tokenizer(model_max_length=512)  # CLAP pads every prompt to 512 tokens
    tokenizer_2 = build_t5_tokenizer(model_max_length=128)  # AudioLDM2's Flan-T5 limit

    torch.manual_seed(SEED)
    text_config = ClapTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=clap_dim,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * clap_dim,
        max_position_embeddings=514,
        projection_dim=clap_dim,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
    )
    # The audio branch only ranks waveforms (num_waveforms_per_prompt > 1 with librosa installed).
    audio_config = ClapAudioConfig(
        spec_size=256,
        num_mel_bins=mel_bins,
        patch_size=4,
        patch_stride=4,
        window_size=8,
        patch_embeds_hidden_size=16,
        hidden_size=32,  # patch_embeds_hidden_size * 2 ** (len(depths) - 1)
        depths=[1, 1],
        num_attention_heads=[2, 2],
        intermediate_size=64,
        projection_dim=clap_dim,
    )
    text_encoder = ClapModel(
        ClapConfig(
            text_config=text_config.to_dict(), audio_config=audio_config.to_dict(), projection_dim=clap_dim
        )
    )
    # "rand_trunc": one-channel features, as the unfused CLAP (laion/clap-htsat-unfused) expects.
    feature_extractor = ClapFeatureExtractor(
        feature_size=mel_bins, sampling_rate=48000, truncation="rand_trunc"
    )

    text_encoder_2 = build_t5_encoder(len(tokenizer_2), t5_dim)

    torch.manual_seed(SEED)
    projection_model = AudioLDM2ProjectionModel(
        text_encoder_dim=clap_dim, text_encoder_1_dim=t5_dim, langauge_model_dim=lm_dim
    )

    # GPT2LMHeadModel, not GPT2Model: since transformers 4.50 only models with a head inherit GenerationMixin,
    # whose _update_model_kwargs_for_generation the pipeline's generate_language_model calls.
    torch.manual_seed(SEED)
    lm_config = GPT2Config(
        vocab_size=64,  # unused: the pipeline feeds input embeddings, never token ids
        n_positions=256,
        n_embd=lm_dim,
        n_layer=2,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    lm_config.max_new_tokens = 8  # AudioLDM2 generates 8 "language of audio" vectors
    language_model = GPT2LMHeadModel(lm_config)

    # Two resolution levels; cross-attention to the GPT-2 and T5 states happens in the mid block only.
    torch.manual_seed(SEED)
    unet = AudioLDM2UNet2DConditionModel(
        sample_size=mel_frames // vae_factor,  # sets the pipeline's default audio_length_in_s
        in_channels=8,
        out_channels=8,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=4,
        cross_attention_dim=([None, lm_dim, t5_dim], [None, lm_dim, t5_dim]),
    )

    torch.manual_seed(SEED)
    vae = AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * 3,  # 3 blocks: 4x compression, as in AudioLDM2
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(8, 16, 16),
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=8,
        sample_size=mel_frames,
    )

    torch.manual_seed(SEED)
    vocoder = SpeechT5HifiGan(
        SpeechT5HifiGanConfig(
            model_in_dim=mel_bins,
            sampling_rate=sampling_rate,
            upsample_initial_channel=32,
            upsample_rates=upsample_rates,
            upsample_kernel_sizes=[10, 8, 4, 4, 4],
            resblock_kernel_sizes=[3, 7],
            resblock_dilation_sizes=[[1, 3], [1, 3]],
            normalize_before=False,
            initializer_range=0.2,  # with the default 0.01 the random vocoder outputs ~1e-10: silence
        )
    )

    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0015,
        beta_end=0.0195,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )

    pipe = AudioLDM2Pipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        projection_model=projection_model,
        language_model=language_model,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        feature_extractor=feature_extractor,
        unet=unet,
        scheduler=scheduler,
        vocoder=vocoder,
    )
    description = (
        f"Tiny random-weight AudioLDM2 (audioldm2-large layout, {sampling_rate} Hz) for tests and CPU "
        "benchmarks; outputs noise."
    )
    return pipe, {"family": "audioldm2", "description": description, "defaults": dict(defaults)}


# --- Wan 2.1 / 2.2 (text to video), laid out like Wan-AI/Wan2.1-T2V-1.3B-Diffusers ----------------------

WAN_DEFAULTS = {"steps": 20, "frames": 9, "height": 64, "width": 96, "fps": 16, "guidance_scale": 5.0}


def build_wan_transformer(
    num_layers: int = 2, heads: int = 2, head_dim: int = 12, image_dim: int | None = None
) -> WanTransformer3DModel:
    """Wan's DiT (3D rotary positions, cross-attention to the text); head_dim a multiple of 6 (rope).
    `image_dim`: Wan 2.1 I2V's, whose input also holds the image latents and a first-frame mask
    (16 + 4 + 16 channels) and whose cross-attention also reads CLIP image embeddings."""
    torch.manual_seed(SEED)
    image = {"image_dim": image_dim, "added_kv_proj_dim": heads * head_dim} if image_dim else {}
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=36 if image_dim else 16,
        **image,
        out_channels=16,
        text_dim=32,
        freq_dim=64,
        ffn_dim=64,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
    )


def build_wan(experts: int = 1, num_layers: int = 2) -> Built:
    """UMT5 text encoder (prompts padded to 512 tokens), DiT(s), Wan's causal 3D VAE, UniPC flow scheduler.

    `experts` 2: Wan 2.2 A14B's shape, a high-noise `transformer` and a low-noise `transformer_2`
    switched at `boundary_ratio` of the training timesteps.
    """
    tokenizer = build_t5_tokenizer(model_max_length=512)
    torch.manual_seed(SEED)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=32,
            d_kv=16,
            d_ff=64,
            num_layers=2,
            num_heads=2,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            decoder_start_token_id=0,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    torch.manual_seed(SEED)
    vae = AutoencoderKLWan(
        base_dim=8,
        z_dim=16,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
    )
    # Wan 2.1's published scheduler: UniPC on flow sigmas, shift 3.0 (480p).
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=3.0
    )
    transformer = build_wan_transformer(num_layers)
    second = None
    if experts == 2:
        second = build_wan_transformer(num_layers)
        torch.manual_seed(SEED + 1)
        for parameter in second.parameters():  # another expert: other weights
            parameter.data.add_(0.02 * torch.randn_like(parameter))
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=scheduler,
        transformer=transformer,
        transformer_2=second,
        boundary_ratio=0.875 if experts == 2 else None,  # Wan2.2-T2V-A14B's value
    )
    layout = "Wan 2.2 A14B layout, two experts" if experts == 2 else "Wan 2.1 T2V layout"
    description = f"Tiny random-weight Wan ({layout}) for tests and CPU benchmarks; outputs noise."
    return pipe, {"family": "wan", "description": description, "defaults": dict(WAN_DEFAULTS)}


def build_wan_i2v() -> Built:
    """Wan 2.1 image to video (Wan-AI/Wan2.1-I2V-14B-480P-Diffusers layout): the text-to-video parts, a
    CLIP vision encoder (its penultimate hidden states are the image embeddings) and the I2V DiT."""
    t2v, studio = build_wan()
    embed_dim = 32
    torch.manual_seed(SEED)
    image_encoder = CLIPVisionModel(
        CLIPVisionConfig(
            hidden_size=embed_dim,
            intermediate_size=2 * embed_dim,
            num_hidden_layers=2,
            num_attention_heads=2,
            image_size=224,  # the pipeline's CLIP processor resizes the image to 224x224
            patch_size=14,
        )
    )
    pipe = WanImageToVideoPipeline(
        tokenizer=t2v.tokenizer,
        text_encoder=t2v.text_encoder,
        vae=t2v.vae,
        scheduler=t2v.scheduler,
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}
        ),
        image_encoder=image_encoder,
        transformer=build_wan_transformer(image_dim=embed_dim),
    )
    description = "Tiny random-weight Wan image-to-video (Wan 2.1 I2V layout) for tests; outputs noise."
    return pipe, {"family": "wan-i2v", "description": description, "defaults": dict(WAN_DEFAULTS)}


# --- Stable Audio Open (text to audio), laid out like stabilityai/stable-audio-open-1.0 -----------------

STABLE_AUDIO_DEFAULTS = {"steps": 20, "seconds": 1.0, "guidance_scale": 7.0}


def build_stable_audio() -> Built:
    """T5 text encoder, number conditioners for the start/end seconds, the DiT over Oobleck latents,
    the Oobleck VAE (44.1 kHz stereo, the published 2048x downsampling), cosine SDE DPM-Solver++.

    The latent has 8 channels instead of 64 and 32 frames instead of 1024: the longest clip is
    32 * 2048 / 44100 = 1.49 s (the published one: 47.55 s).
    """
    text_dim, latent_channels, sample_size = 32, 8, 32
    tokenizer = build_t5_tokenizer(model_max_length=128)  # the published tokenizer's limit
    text_encoder = build_t5_encoder(len(tokenizer), text_dim)
    torch.manual_seed(SEED)
    # text_encoder_dim == conditioning_dim, as published (768): the text projection is the identity.
    projection_model = StableAudioProjectionModel(
        text_encoder_dim=text_dim, conditioning_dim=text_dim, min_value=0, max_value=512
    )
    torch.manual_seed(SEED)
    transformer = StableAudioDiTModel(
        sample_size=sample_size,
        in_channels=latent_channels,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        num_key_value_attention_heads=1,  # grouped-query attention, as published (24 heads, 12 kv)
        out_channels=latent_channels,
        cross_attention_dim=text_dim,
        time_proj_dim=32,
        global_states_input_dim=2 * text_dim,  # start and end seconds, concatenated
        cross_attention_input_dim=text_dim,
    )
    torch.manual_seed(SEED)
    vae = AutoencoderOobleck(
        encoder_hidden_size=2 * latent_channels,  # the encoder outputs mean and scale
        downsampling_ratios=[2, 4, 4, 8, 8],
        channel_multiples=[1, 2, 2, 2, 2],
        decoder_channels=8,
        decoder_input_channels=latent_channels,
        audio_channels=2,
        sampling_rate=44100,
    )
    # The published scheduler configuration.
    scheduler = CosineDPMSolverMultistepScheduler(
        euler_at_final=False,
        final_sigmas_type="zero",
        lower_order_final=True,
        num_train_timesteps=1000,
        prediction_type="v_prediction",
        rho=7.0,
        sigma_data=1.0,
        sigma_max=500,
        sigma_min=0.3,
        sigma_schedule="exponential",
        solver_order=2,
        solver_type="midpoint",
    )
    pipe = StableAudioPipeline(
        vae=vae,
        text_encoder=text_encoder,
        projection_model=projection_model,
        tokenizer=tokenizer,
        transformer=transformer,
        scheduler=scheduler,
    )
    description = (
        "Tiny random-weight Stable Audio Open (stable-audio-open-1.0 layout, 44100 Hz stereo) for tests "
        "and CPU benchmarks; outputs noise."
    )
    return pipe, {
        "family": "stable-audio",
        "description": description,
        "defaults": dict(STABLE_AUDIO_DEFAULTS),
    }


# --- LTX-Video 0.9.x (text to video), laid out like Lightricks/LTX-Video -----------------------------------

# 9 frames at 64 x 96: 2 x 2 x 3 latent tokens. fps is the pipeline's frame_rate (it scales the rotary
# positions in time), 25 as the pipeline's default.
LTX_DEFAULTS = {"steps": 20, "frames": 9, "height": 64, "width": 96, "fps": 25, "guidance_scale": 3.0}


def build_ltx_vae(latent_channels: int = 8, timestep_conditioning: bool = False) -> AutoencoderKLLTXVideo:
    """LTX-Video's VAE: 4x4 patchify and three spatio-temporal 2x stages, 32x spatial and 8x temporal
    compression as published; `timestep_conditioning` True is 0.9.1's decoder (decode_timestep)."""
    torch.manual_seed(SEED)
    vae = AutoencoderKLLTXVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=latent_channels,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True, False),
        decoder_spatio_temporal_scaling=(True, True, True, False),
        decoder_inject_noise=(False,) * 5,
        timestep_conditioning=timestep_conditioning,
        patch_size=4,
        patch_size_t=1,
        scaling_factor=1.0,
        encoder_causal=True,
        decoder_causal=False,
    )
    # The published weights carry per-channel latent statistics; non-trivial ones make the decode's
    # denormalisation matter.
    torch.manual_seed(SEED + 2)
    vae.latents_mean.copy_(0.1 * torch.randn(latent_channels))
    vae.latents_std.copy_(1.0 + 0.2 * torch.rand(latent_channels))
    return vae


def build_ltx(timestep_conditioning: bool = False) -> Built:
    """T5 text encoder (prompts padded to 128 tokens), LTX DiT over packed latent tokens [B, F*H*W, C]
    (patch 1 x 1 x 1), LTX VAE, flow-matching Euler scheduler with the published dynamic shift."""
    text_dim, heads, head_dim, latent_channels = 32, 2, 12, 8
    tokenizer = build_t5_tokenizer(model_max_length=128)
    text_encoder = build_t5_encoder(len(tokenizer), text_dim)
    torch.manual_seed(SEED)
    transformer = LTXVideoTransformer3DModel(
        in_channels=latent_channels,
        out_channels=latent_channels,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        cross_attention_dim=heads * head_dim,  # the published 2048 is the inner width too
        num_layers=2,
        activation_fn="gelu-approximate",
        qk_norm="rms_norm_across_heads",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        caption_channels=text_dim,
        attention_bias=True,
        attention_out_bias=True,
    )
    vae = build_ltx_vae(latent_channels, timestep_conditioning)
    # Lightricks/LTX-Video's scheduler_config.json, values as published.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.95,
        max_shift=2.05,
        base_image_seq_len=1024,
        max_image_seq_len=4096,
        shift_terminal=0.1,
        invert_sigmas=False,
    )
    pipe = LTXPipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    layout = "0.9.1 layout, timestep-conditioned decoder" if timestep_conditioning else "0.9.0 layout"
    description = f"Tiny random-weight LTX-Video ({layout}) for tests and CPU benchmarks; outputs noise."
    return pipe, {"family": "ltx", "description": description, "defaults": dict(LTX_DEFAULTS)}


# --- HunyuanVideo 1.5 (text to video),
# laid out like hunyuanvideo-community/HunyuanVideo-1.5-Diffusers-480p_t2v

HUNYUAN_VIDEO15_DEFAULTS = {
    "steps": 20,
    "frames": 5,
    "height": 32,
    "width": 48,
    "fps": 24,
    "guidance_scale": 6.0,
}


def build_hunyuan_video15() -> Built:
    """Qwen2.5-VL language model and ByT5 encoder, the 480p T2V DiT's layout, the causal 3D DC-AE VAE.

    The pipeline pads prompts to 1000 Qwen tokens, glyph text to 256 ByT5 tokens and adds 729 image
    tokens, and the transformer's ByT5 projection is 2048 wide whatever its other sizes, so one call
    costs ~0.1-0.2 s on one CPU thread even with these small widths. The published 16x spatial /
    4x temporal compression, 4k+1 frames, patch 1, latent channels + conditioning + mask input, the
    FlowMatch Euler scheduler (shift 5) and the ClassifierFreeGuidance guider (scale 6) are kept.
    """
    latent_channels, text_dim, byt5_dim = 8, 32, 32
    tokenizer = build_qwen2_tokenizer(model_max_length=131072)
    torch.manual_seed(SEED)
    text_encoder = Qwen2_5_VLTextModel(
        Qwen2_5_VLTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=text_dim,
            intermediate_size=2 * text_dim,
            num_hidden_layers=3,  # the pipeline takes the third hidden state from the end
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=2048,  # prompts are 108 + 1000 tokens
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=None,
            eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    tokenizer_2 = ByT5Tokenizer()  # bytes: no vocabulary file
    text_encoder_2 = build_t5_encoder(len(tokenizer_2), byt5_dim)
    torch.manual_seed(SEED)
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=2 * latent_channels + 1,  # latents, conditioning latents (zero for t2v), mask
        out_channels=latent_channels,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=1,
        patch_size_t=1,
        text_embed_dim=text_dim,
        text_embed_2_dim=byt5_dim,
        image_embed_dim=16,
        rope_axes_dim=(2, 2, 4),  # sums to attention_head_dim
        target_size=64,  # the pipeline's default size when none is given
        task_type="t2v",
    )
    torch.manual_seed(SEED)
    vae = AutoencoderKLHunyuanVideo15(
        block_out_channels=(8, 8, 16, 16, 16),  # five levels: 16x spatial, 4x temporal, as published
        latent_channels=latent_channels,
        layers_per_block=1,
        spatial_compression_ratio=16,
        temporal_compression_ratio=4,
        scaling_factor=1.03682,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)  # the published 480p T2V scheduler
    guider = ClassifierFreeGuidance(guidance_scale=6.0)
    pipe = HunyuanVideo15Pipeline(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=scheduler,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        guider=guider,
    )
    description = (
        "Tiny random-weight HunyuanVideo 1.5 (480p T2V layout) for tests and CPU benchmarks; outputs noise."
    )
    return pipe, {
        "family": "hunyuanvideo15",
        "description": description,
        "defaults": dict(HUNYUAN_VIDEO15_DEFAULTS),
    }


# --- Saving -------------------------------------------------------------------------------------------------

BUILDERS: dict[str, Callable[[], Built]] = {
    "tiny-cogvideox": build_cogvideox,
    "tiny-svd": build_svd,
    "tiny-audioldm2": build_audioldm2,
    "tiny-wan": build_wan,
    "tiny-wan-a14b": lambda: build_wan(experts=2),
    "tiny-wan-i2v": build_wan_i2v,
    "tiny-stable-audio": build_stable_audio,
    "tiny-ltx": build_ltx,
    "tiny-hunyuan-video15": build_hunyuan_video15,
}
SHIPPED = (
    "tiny-cogvideox",
    "tiny-svd",
    "tiny-audioldm2",
    "tiny-wan",
    "tiny-wan-i2v",
    "tiny-stable-audio",
    "tiny-ltx",
)  # the others: built by the tests


def save_model(pipe: DiffusionPipeline, studio: dict[str, Any], target: Path) -> None:
    """Save ``pipe`` (safetensors) and ``studio.json`` in a temporary folder, then move it to ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        (staging / "studio.json").write_text(json.dumps(studio, indent=2) + "\n")
        for config in staging.glob("*/config.json"):  # a component loaded from a folder names it: drop it
            fields = json.loads(config.read_text())
            if fields.pop("_name_or_path", None) is not None:
                config.write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
        for path in [staging, *staging.rglob("*")]:  # mkdtemp makes a private folder: use ordinary modes
            path.chmod(0o755 if path.is_dir() else 0o644)
        if target.exists():
            old = target.with_name(f".{target.name}-old")
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            staging.rename(target)
            shutil.rmtree(old)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def build_all(models_dir: Path = MODELS_DIR, names: list[str] | None = None) -> list[Path]:
    """Build and save the named tiny models (the shipped ones by default) under ``models_dir``."""
    folders = []
    for name in names or list(SHIPPED):
        pipe, studio = BUILDERS[name]()
        studio = {**studio, "random_weights": True}  # the window labels them: they output noise
        save_model(pipe, studio, models_dir / name)
        write_model_factors(models_dir / name)  # previews need no VAE decode at run time
        folders.append(models_dir / name)
    return folders


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"any of {', '.join(BUILDERS)} (default: {', '.join(SHIPPED)})",
    )
    parser.add_argument("--out", type=Path, default=MODELS_DIR, help="output folder (default: %(default)s)")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.names) - set(BUILDERS))
    if unknown:
        parser.error(f"unknown model name(s): {', '.join(unknown)}")

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    for folder in build_all(args.out, args.names):
        size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
        print(f"{folder}: {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
