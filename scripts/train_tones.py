"""Train the embedded ``tones`` text-to-audio model (AudioLDM2 architecture) on sounds synthesised here.

    nice -n 19 .venv/bin/python -m scripts.train_tones all > build/tones_train.log 2>&1

Stages, each saving into ``--work`` (default build/tones_train) so that they can run separately:

* ``vocoder``: a SpeechT5HifiGan (the HiFi-GAN class AudioLDM2 uses) whose weights are set to an oscillator
  bank on the whole 10 Hz grid from 100 Hz to 3 kHz, read off the log-mel, the lines between the tonal ones
  opened only by broadband (noise) mels (see build_oscillator_vocoder); ``--vocoder-steps`` trains it further
  (see make_vocoder: measured to cost chords, so the default is 0). It reads the VAE from the work folder,
  else from the shipped model. HiFi-GANs trained from a random start (``hifigan`` stage, no discriminator)
  did not learn pitch in the CPU budget: after 500-750 steps they put out one or two fixed frequencies
  whatever the mel;
* ``vae``: the mel AutoencoderKL (4x compression in time and frequency, as AudioLDM2's);
* ``unet``: the AudioLDM2UNet2DConditionModel predicting the clean latent (``sample``; epsilon prediction
  diverged at high noise after this little training), 10% dropped prompts for guidance, conditioned on the
  frozen random text side's embeddings, computed once per prompt with the pipeline's own ``encode_prompt``
  (so training sees exactly the tensors inference feeds);
* ``assemble``: the AudioLDM2Pipeline saved (safetensors) to resources/models/tones with studio.json and
  preview_factors.json, and the loss curves drawn to docs/tones_training.png. Each part comes from the work
  folder, else from the shipped model (so ``vocoder`` then ``assemble`` rebuilds only the vocoder).

The text side (CLAP text encoder, Flan-T5-style encoder, GPT-2, projection) stays frozen at its seeded random
initialisation; its tokenizers are word-level over the grammar's vocabulary, so every word of a prompt is one
token with its own embedding. Everything is seeded (SEED), so a rerun gives the same model on the same
machine. Threads default to 1: on the shared 2-core machine one thread per process ran the UNet step 4x
faster than two (OpenMP threads stall when descheduled); ``vae`` then ``unet`` can run beside ``vocoder``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from resources import tones_data as td

REPO = Path(__file__).resolve().parents[1]

SEED = 0
CLIPS: list[int] = []  # clips per prompt, from the command line
TEXT_DIM = 32
DEFAULTS = {"steps": 20, "seconds": td.CLIP_SECONDS, "guidance_scale": 3.0}
VOCODER_RATES = [5, 5, 4, 4, 2]  # product = td.HOP
FRAMES = int(td.CLIP_SECONDS * td.SAMPLE_RATE) // td.HOP


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --- Data ---------------------------------------------------------------------------------------------------


def dataset() -> tuple[torch.Tensor, torch.Tensor, list[td.Sound]]:
    """All training clips [N, S], their log-mels [N, FRAMES, N_MELS] and the prompt index of each."""
    sounds = td.grammar()
    waves, labels = [], []
    for index, sound in enumerate(sounds):
        for k in range(CLIPS[-1]):
            waves.append(td.synthesize(sound, seed=1000 * index + k))
            labels.append(index)
    wave = torch.tensor(np.stack(waves))
    mels = torch.cat([td.log_mel(chunk) for chunk in wave.split(256)])
    return wave, mels, torch.tensor(labels)


# --- The text side (frozen) ---------------------------------------------------------------------------------


def build_text_side() -> dict:
    """Tokenizers over the grammar's words and seeded random CLAP / T5 / GPT-2 / projection models."""
    from diffusers import AudioLDM2ProjectionModel
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import (
        ClapAudioConfig,
        ClapConfig,
        ClapFeatureExtractor,
        ClapModel,
        ClapTextConfig,
        GPT2Config,
        GPT2LMHeadModel,
        RobertaTokenizer,
        T5Tokenizer,
    )

    from resources.build_tiny_models import FALLBACK_CHARS, build_t5_encoder

    words = td.vocabulary()
    # T5 (unigram): each word one piece, single characters as the fallback for other words.
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    pieces += [("\u2581" + word, -2.0) for word in words]
    pieces += [("\u2581", -3.0)] + [(char, -5.0) for char in FALLBACK_CHARS]
    tokenizer_2 = T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=128)

    # RoBERTa (byte-level BPE, as CLAP's) whose merges make each grammar word one token.
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator([" ".join(words)] * 4 + [" ".join(s.prompt for s in td.grammar())], trainer)
    trained = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    tokenizer = RobertaTokenizer(vocab=trained["vocab"], merges=merges, model_max_length=512)

    torch.manual_seed(SEED)
    text_config = ClapTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * TEXT_DIM,
        max_position_embeddings=514,
        projection_dim=TEXT_DIM,
        bos_token_id=0,
        pad_token_id=1,
        eos_token_id=2,
    )
    audio_config = ClapAudioConfig(
        spec_size=256,
        num_mel_bins=64,
        patch_size=4,
        patch_stride=4,
        window_size=8,
        patch_embeds_hidden_size=16,
        hidden_size=32,
        depths=[1, 1],
        num_attention_heads=[2, 2],
        intermediate_size=64,
        projection_dim=TEXT_DIM,
    )
    text_encoder = ClapModel(
        ClapConfig(
            text_config=text_config.to_dict(), audio_config=audio_config.to_dict(), projection_dim=TEXT_DIM
        )
    )
    feature_extractor = ClapFeatureExtractor(feature_size=64, sampling_rate=48000, truncation="rand_trunc")
    text_encoder_2 = build_t5_encoder(len(tokenizer_2), TEXT_DIM)
    torch.manual_seed(SEED)
    projection_model = AudioLDM2ProjectionModel(
        text_encoder_dim=TEXT_DIM, text_encoder_1_dim=TEXT_DIM, langauge_model_dim=TEXT_DIM
    )
    torch.manual_seed(SEED)
    lm_config = GPT2Config(
        vocab_size=64, n_positions=256, n_embd=TEXT_DIM, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    lm_config.max_new_tokens = 8
    language_model = GPT2LMHeadModel(lm_config)
    return {
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "text_encoder": text_encoder.eval(),
        "text_encoder_2": text_encoder_2.eval(),
        "projection_model": projection_model.eval(),
        "language_model": language_model.eval(),
        "feature_extractor": feature_extractor,
    }


def build_vocoder():
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    torch.manual_seed(SEED)
    return SpeechT5HifiGan(
        SpeechT5HifiGanConfig(
            model_in_dim=td.N_MELS,
            sampling_rate=td.SAMPLE_RATE,
            upsample_initial_channel=256,
            upsample_rates=VOCODER_RATES,
            upsample_kernel_sizes=[
                2 * r + r % 2 for r in VOCODER_RATES
            ],  # odd rate, odd kernel: exact length
            resblock_kernel_sizes=[3, 7],
            resblock_dilation_sizes=[[1, 3], [1, 3]],
            normalize_before=False,
        )
    )


def build_vae():
    from diffusers import AutoencoderKL

    torch.manual_seed(SEED)
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D",) * 3,  # 4x compression in time and frequency
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=8,
        sample_size=FRAMES,
    )


def build_unet():
    from diffusers import AudioLDM2UNet2DConditionModel

    torch.manual_seed(SEED)
    return AudioLDM2UNet2DConditionModel(
        sample_size=FRAMES // 4,  # sets the pipeline's default audio_length_in_s
        in_channels=8,
        out_channels=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=8,
        cross_attention_dim=([None, TEXT_DIM, TEXT_DIM],) * 3,  # self, GPT-2 states, T5 states
    )


def build_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.0015,
        beta_end=0.0195,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="sample",  # x0: a weak model's errors at high noise stay bounded (epsilon diverged)
    )


def build_pipeline(vocoder=None, vae=None, unet=None):
    from diffusers import AudioLDM2Pipeline

    return AudioLDM2Pipeline(
        vae=vae or build_vae(),
        unet=unet or build_unet(),
        scheduler=build_scheduler(),
        vocoder=vocoder or build_vocoder(),
        **build_text_side(),
    )


VOCODER_TUNE_LR = 1e-4  # training from the oscillator bank: small steps keep its pitch while it learns
OSCILLATOR_BAND = (100, 3000)  # Hz: every line of the 10 Hz grid in this band (where the analyses look)
OSCILLATOR_PHASES = 200  # output samples per step of the first upsampler: its channels, one per phase
# 10 Hz frames -> 40 Hz x 200 phases, then transposed convolutions that only interleave phases:
# 80 Hz x 100, 160 Hz x 50, 320 Hz x 25, 1.6 kHz x 5, 8 kHz x 1.
OSCILLATOR_RATES = [td.HOP // OSCILLATOR_PHASES, 2, 2, 2, 5, 5]


def oscillator_hz() -> list[int]:
    """The oscillator bank: every multiple of the frame rate (10 Hz) in OSCILLATOR_BAND."""
    step = td.SAMPLE_RATE // td.HOP
    return list(range(OSCILLATOR_BAND[0], OSCILLATOR_BAND[1] + 1, step))


def tonal_hz() -> set[int]:
    """The oscillators that play whatever the mel: each pitch of the grammar (on the 10 Hz grid) and every
    50 Hz from 150 to 2600 Hz (the whole bank before noise was wanted). The others are noise oscillators."""
    wanted = {round(p / 10) * 10 for sound in td.grammar() for p in sound.pitches}
    return wanted | set(range(150, 2650, 50))


def _mel_reader(freqs: list[int]) -> np.ndarray:
    """[len(freqs), N_MELS]: each oscillator's level as a linear function of the log-mel frame, the
    quadratic interpolation between the three mel bins nearest its frequency."""
    edges = td._mel_to_hz(np.linspace(td._hz_to_mel(0.0), td._hz_to_mel(td.F_MAX), td.N_MELS + 2))
    centres = td._hz_to_mel(edges[1:-1])
    step = centres[1] - centres[0]
    rows = np.zeros((len(freqs), td.N_MELS))
    for j, hz in enumerate(freqs):
        position = float((td._hz_to_mel(hz) - centres[0]) / step)
        m0 = int(np.clip(round(position), 1, td.N_MELS - 2))
        u = position - m0
        for dm, weight in ((-1, u * (u - 1) / 2), (0, 1 - u * u), (1, u * (u + 1) / 2)):
            rows[j, m0 + dm] += weight
    return rows


def build_oscillator_vocoder(
    threshold: float = -1.0,
    gain: float = 0.08,
    offset: float = 10.0,
    gate: float = -1.5,
    gate_weight: float = 2.0,
    noise_gain: float = 0.25,
):
    """A SpeechT5HifiGan whose weights are set, not trained, to an oscillator bank on the whole 10 Hz grid
    from 100 Hz to 3 kHz (291 sines with seeded random phases).

    conv_pre reads each oscillator's level off the log-mel (see _mel_reader), minus `threshold`. The tonal
    oscillators (tonal_hz) play at that level; the noise oscillators, the lines between them, add
    `gate_weight` times the excess of the band's mean log-mel (100 Hz - 3 kHz) over `gate`: a tone, chord,
    sweep or beep leaves most of the band at the floor (mean log-mel at most -2.97 on every generated clip
    of the grammar) and keeps them silent, so the tonal content sounds as from the tonal oscillators alone;
    a noise burst (mean -2 to 0) opens them, and every line of the 10 Hz comb carries energy. conv_pre also
    passes the log-mel itself and a constant, both raised by `offset` so that they stay positive: the leaky
    ReLU is made an exact ReLU as lrelu(y) = (1 - s) relu(y) + s y, with s y, linear in the mel, taken back
    through those channels. The first upsampler overlap-adds each oscillator's Hann-windowed sine (two
    frames long, whole cycles per 100 ms frame, so phases line up across frames) into 200 polyphase
    channels, kept positive by `offset`; the next ones interleave them into samples (weights 0 or 1), and
    conv_post removes the offset. The residual blocks are zero, hence identities.
    """
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    freqs = oscillator_hz()
    n, phases = len(freqs), OSCILLATOR_PHASES
    channels = n + td.N_MELS + 1  # levels, the mel + offset, the constant
    rates = OSCILLATOR_RATES
    assert channels // 2 >= phases and math.prod(rates) == td.HOP
    vocoder = SpeechT5HifiGan(
        SpeechT5HifiGanConfig(
            model_in_dim=td.N_MELS,
            sampling_rate=td.SAMPLE_RATE,
            upsample_initial_channel=channels,
            upsample_rates=rates,
            upsample_kernel_sizes=[2 * rates[0], *rates[1:]],  # the first spans two frames, 50% overlap
            resblock_kernel_sizes=[1],
            resblock_dilation_sizes=[[1]],
            normalize_before=False,
        )
    )
    slope = vocoder.config.leaky_relu_slope
    reader = _mel_reader(freqs)  # [n, N_MELS]
    edges = td._mel_to_hz(np.linspace(td._hz_to_mel(0.0), td._hz_to_mel(td.F_MAX), td.N_MELS + 2))[1:-1]
    band = (edges >= OSCILLATOR_BAND[0]) & (edges <= OSCILLATOR_BAND[1])
    noise = np.array([hz not in tonal_hz() for hz in freqs])
    reader[noise] += gate_weight * band / band.sum()
    bias = np.where(noise, -threshold - gate_weight * gate, -threshold)
    rng = np.random.default_rng(SEED)
    # Sample tau of a frame's kernel, from the frame's start: -HOP/2 .. 3 HOP/2, centred on the frame's
    # centre (log_mel centres frame k on sample k HOP + HOP / 2).
    tau = np.arange(2 * td.HOP) - td.HOP // 2
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(2 * td.HOP) / (2 * td.HOP))  # periodic Hann
    gains = gain * np.where(noise, noise_gain, 1.0)
    kernels = np.stack(
        [
            g * window * np.sin(2 * np.pi * hz * tau / td.SAMPLE_RATE + rng.uniform(0, 2 * np.pi))
            for g, hz in zip(gains, freqs, strict=True)
        ]
    )  # [n, 2 HOP]
    mel_kernels = -slope / (1 - slope) * reader.T @ kernels  # [N_MELS, 2 HOP]: takes s y back
    constant = slope / (1 - slope) * (offset * reader.sum(1) - bias) @ kernels / offset

    def taps(kernel: np.ndarray) -> torch.Tensor:
        # output sample (k - pad) * phases + p of the frame <- tap k, channel p; pad = rates[0] // 2
        return torch.tensor(kernel.reshape(2 * rates[0], phases).T, dtype=torch.float32)

    with torch.no_grad():
        for parameter in vocoder.parameters():
            parameter.zero_()
        pre_w, pre_b, up_w = vocoder.conv_pre.weight, vocoder.conv_pre.bias, vocoder.upsampler[0].weight
        pre_w[:n, :, 3] = torch.tensor(reader, dtype=torch.float32)
        pre_b[:n] = torch.tensor(bias, dtype=torch.float32)
        for m in range(td.N_MELS):
            pre_w[n + m, m, 3] = 1.0
        pre_b[n : n + td.N_MELS] = offset
        pre_b[channels - 1] = offset  # the constant channel
        for j in range(n):
            up_w[j, :phases] = taps(kernels[j] / (1 - slope))
        for m in range(td.N_MELS):
            up_w[n + m, :phases] = taps(mel_kernels[m])
        up_w[channels - 1, :phases] = taps(constant)
        vocoder.upsampler[0].bias[:phases] = offset
        for i, rate in enumerate(rates[1:], start=1):  # phase p = r * (P / rate) + q -> channel q, tap r
            out = phases // math.prod(rates[1 : i + 1])
            for r in range(rate):
                for q in range(out):
                    vocoder.upsampler[i].weight[r * out + q, q, r] = 1.0
        vocoder.conv_post.weight[0, 0, 3] = 1.0
        vocoder.conv_post.bias[0] = -offset
    return vocoder.eval()


def vocoder_checks(vocoder, vae=None) -> dict[str, str]:
    """Pass counts of the semantic checks on the vocoded mels of every prompt (held-out seeds): clean mels,
    and with a `vae` also their VAE reconstructions (what the pipeline gives the vocoder)."""
    results: dict[str, list[bool]] = {}
    with torch.no_grad():
        for index, sound in enumerate(td.grammar()):
            mel = td.log_mel(torch.tensor(td.synthesize(sound, seed=10**6 + index))[None])
            inputs = {"clean": mel, "vae": vae_round_trip(vae, mel)} if vae is not None else {"clean": mel}
            for kind, x in inputs.items():
                for name, ok in td.check(sound, vocoder(x)[0].numpy()).items():
                    results.setdefault(f"{kind} {name}", []).append(bool(ok))
    return {name: f"{sum(v)}/{len(v)}" for name, v in results.items()}


def vae_round_trip(vae, mels: torch.Tensor) -> torch.Tensor:
    """[B, FRAMES, N_MELS] log-mels through the VAE (posterior mode) and back."""
    return vae.decode(vae.encode(mels.unsqueeze(1)).latent_dist.mode()).sample.squeeze(1)


def make_vocoder(work: Path, steps: int, vae_dir: Path) -> None:
    """The shipped vocoder: the oscillator bank as set (build_oscillator_vocoder), checked on held-out clean
    and VAE-reconstructed mels (the VAE from `vae_dir`). With `steps`, it is then trained (see
    train_vocoder) in how it reads the mel (conv_pre) and assembles samples (the later upsamplers,
    conv_post), the oscillators' waveforms (the first upsampler) frozen. Measured (docs/models.md): 400
    steps lowered the held-out loss by 13% but cost chords end to end (the middle note of C minor and D
    major sinks under its neighbours: 92% -> 83%), 100 steps cost more (67%); so none are (default 0).
    Training the waveforms too, or with the coarse STFT resolutions (31 and 16 Hz bins, which cannot tell
    neighbouring oscillators apart), did no better on the previous 65-oscillator bank (chords 9-10/12 on
    held-out mels instead of 11/12)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()  # the vocoder learns from its reconstructions
    vocoder = build_oscillator_vocoder()
    report = {"bank": vocoder_checks(vocoder, vae), "bank_loss": held_out_loss(vocoder, vae)}
    log(f"oscillator bank on held-out mels: {report['bank']}, held-out loss {report['bank_loss']}")
    if steps:
        vocoder.upsampler[0].requires_grad_(False)
        fine = tuple(size for size in STFT_SIZES if size[0] >= 1024)
        vocoder = train_vocoder(work, steps, vocoder, peak_lr=VOCODER_TUNE_LR, sizes=fine, vae=vae).eval()
        report["trained"] = vocoder_checks(vocoder, vae)
        report["trained_loss"] = held_out_loss(vocoder, vae)
        log(f"trained vocoder on held-out mels: {report['trained']}, held-out loss {report['trained_loss']}")
    else:
        (work / "vocoder_losses.json").unlink(missing_ok=True)  # no curve to draw for a set bank
    vocoder.save_pretrained(work / "vocoder", safe_serialization=True)
    (work / "vocoder_check.json").write_text(json.dumps(report))


# --- Losses -------------------------------------------------------------------------------------------------

STFT_SIZES = ((256, 64), (512, 128), (1024, 256), (2048, 512))


def stft_loss(fake: torch.Tensor, real: torch.Tensor, sizes: tuple = STFT_SIZES) -> torch.Tensor:
    """Multi-resolution STFT loss: spectral convergence plus L1 of log(1 + magnitude), averaged over
    resolutions.

    The spectra of tones are mostly empty: a plain log-magnitude L1 is then ruled by the empty bins and
    trained the vocoder into near silence; log(1 + |X|) and the convergence term weigh the tones' peaks.
    The convergence term's norms run over the whole batch, plus one, so that a silent example (between
    beeps) cannot divide by almost nothing."""
    total = 0.0
    for n_fft, hop in sizes:
        window = torch.hann_window(n_fft)
        a = torch.stft(fake, n_fft, hop, n_fft, window, return_complex=True).abs()
        b = torch.stft(real, n_fft, hop, n_fft, window, return_complex=True).abs()
        total = (
            total + torch.linalg.norm(a - b) / (torch.linalg.norm(b) + 1.0) + F.l1_loss(a.log1p(), b.log1p())
        )
    return total / len(sizes)


def mel_loss(fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """L1 of the log-mels floored at 1e-2 (60 dB under the loudest tones), for the same reason."""
    return F.l1_loss(td.log_mel(fake).clamp(min=-2.0), td.log_mel(real).clamp(min=-2.0))


def cosine_lr(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


# --- Stages -------------------------------------------------------------------------------------------------


def train_vocoder(
    work: Path,
    steps: int,
    vocoder=None,
    peak_lr: float = 1e-3,
    sizes: tuple = STFT_SIZES,
    vae=None,
    name: str = "vocoder",
):
    """Trains `vocoder` (a fresh HiFi-GAN when None; only its parameters that require gradients) with the
    mel and STFT losses at `sizes` on 0.8 s crops, saving to work/`name` (only "vocoder" is assembled).
    With a `vae`, its inputs are the VAE's reconstructions of the mels (the targets stay the clean
    waveforms), so it learns to undo the VAE's blur, as a vocoder fine-tuned on a TTS model's
    ground-truth-aligned outputs does."""
    wave, mels, _ = dataset()
    if vae is not None:
        with torch.no_grad():
            mels = torch.cat([vae_round_trip(vae, chunk) for chunk in mels.split(64)])
    vocoder = (vocoder or build_vocoder()).train()
    trained = [p for p in vocoder.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trained, lr=peak_lr, betas=(0.8, 0.99))
    generator = torch.Generator().manual_seed(SEED + 1)
    segment, batch = 8, 4  # 8 frames = 0.8 s per example
    losses, start = [], time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, peak_lr, warmup=50)
        rows = torch.randint(0, len(wave), (batch,), generator=generator)
        offsets = torch.randint(0, FRAMES - segment + 1, (batch,), generator=generator)
        mel = torch.stack([mels[r, o : o + segment] for r, o in zip(rows, offsets, strict=True)])
        real = torch.stack(
            [wave[r, o * td.HOP : (o + segment) * td.HOP] for r, o in zip(rows, offsets, strict=True)]
        )
        fake = vocoder(mel)
        mel_error = mel_loss(fake, real)
        loss = stft_loss(fake, real, sizes) + mel_error
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 5.0)
        optimizer.step()
        losses.append([loss.item(), mel_error.item()])
        if step % 250 == 249:  # a checkpoint to fall back on
            vocoder.save_pretrained(work / name, safe_serialization=True)
        if step % 50 == 0 or step == steps - 1:
            log(f"{name} {step}/{steps} loss {np.mean(losses[-50:], 0)} ({time.time() - start:.0f} s)")
    vocoder.save_pretrained(work / name, safe_serialization=True)
    (work / f"{name}_losses.json").write_text(json.dumps({"seconds": time.time() - start, "losses": losses}))
    return vocoder


@torch.no_grad()
def held_out_loss(vocoder, vae=None, clips: int = 64) -> dict[str, float]:
    """The training losses (all four STFT sizes + mel, mel alone) on whole clips of seeds no training clip
    uses, vocoded from their mels (through `vae` when given)."""
    sounds = td.grammar()
    wave = torch.tensor(
        np.stack([td.synthesize(sounds[k % len(sounds)], seed=2 * 10**6 + k) for k in range(clips)])
    )
    mels = [td.log_mel(chunk) for chunk in wave.split(16)]
    fake = torch.cat([vocoder(vae_round_trip(vae, m) if vae is not None else m) for m in mels])
    mel_error = mel_loss(fake, wave).item()
    return {"loss": round(stft_loss(fake, wave).item() + mel_error, 4), "mel": round(mel_error, 4)}


def train_vae(work: Path, steps: int) -> None:
    _, mels, _ = dataset()
    vae = build_vae().train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(SEED + 2)
    batch, segment = 8, FRAMES  # whole clips (crops would do too: the VAE is convolutional)
    losses, start = [], time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, 2e-3, warmup=30)
        rows = torch.randint(0, len(mels), (batch,), generator=generator)
        offsets = torch.randint(0, (FRAMES - segment) // 4 + 1, (batch,), generator=generator) * 4
        x = torch.stack([mels[r, o : o + segment] for r, o in zip(rows, offsets, strict=True)]).unsqueeze(1)
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=generator)).sample
        # Errors where there is sound matter most (pitch lives in a few bins): weigh them up.
        weight = 1.0 + 4.0 * (x > math.log10(td.LOG_FLOOR) + 0.5)
        rec_loss = (weight * (recon - x).abs()).mean()
        kl = posterior.kl().mean() / x[0].numel()
        loss = rec_loss + 1e-4 * kl
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        losses.append([rec_loss.item(), kl.item()])
        if step % 50 == 0 or step == steps - 1:
            log(f"vae {step}/{steps} rec, kl {np.mean(losses[-50:], 0)} ({time.time() - start:.0f} s)")
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(m.unsqueeze(1)).latent_dist.mode() for m in mels.split(64)])
        recon = torch.cat([vae.decode(z).sample for z in latents[:256].split(64)]).squeeze(1)
    scaling = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling)
    error = float((recon - mels[:256]).abs().mean())
    log(f"vae done: latent std {1 / scaling:.3f}, reconstruction L1 {error:.4f} (log10 mel)")
    vae.save_pretrained(work / "vae", safe_serialization=True)
    report = {"seconds": time.time() - start, "losses": losses, "recon_l1": error, "scaling_factor": scaling}
    (work / "vae_losses.json").write_text(json.dumps(report))


@torch.no_grad()
def prompt_embeddings(pipe, sounds: list[td.Sound]) -> dict[str, torch.Tensor]:
    """Per prompt, the (unconditional, conditional) embeddings exactly as the pipeline's encode_prompt makes
    them with guidance on; T5 states padded to one length with their masks."""
    gen, t5, mask = [], [], []
    for sound in sounds:
        t5_states, t5_mask, generated = pipe.encode_prompt(sound.prompt, "cpu", 1, True)
        gen.append(generated)  # [2, 8, D]: unconditional, conditional
        t5.append(t5_states)
        mask.append(t5_mask)
    length = max(x.shape[1] for x in t5)
    t5 = [F.pad(x, (0, 0, 0, length - x.shape[1])) for x in t5]
    mask = [F.pad(m, (0, length - m.shape[1])) for m in mask]
    return {"generated": torch.stack(gen), "t5": torch.stack(t5), "mask": torch.stack(mask)}


def separation(states: torch.Tensor) -> float:
    """Smallest distance between two prompts' conditional states, over the typical distance."""
    flat = states[:, 1].flatten(1)
    distances = torch.cdist(flat, flat)
    off = distances[~torch.eye(len(flat), dtype=torch.bool)]
    return float(off.min() / off.median())


def train_unet(work: Path, steps: int, vae_dir: Path) -> None:
    from diffusers import AutoencoderKL

    _, mels, labels = dataset()
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    pipe = build_pipeline(vae=vae)
    embeds = prompt_embeddings(pipe, td.grammar())
    log(
        f"prompt separation (min/median distance): GPT-2 states {separation(embeds['generated']):.3f}, "
        f"T5 states {separation(embeds['t5']):.3f}"
    )
    with torch.no_grad():
        latents = torch.cat([vae.encode(m.unsqueeze(1)).latent_dist.mode() for m in mels.split(64)])
        latents = latents * vae.config.scaling_factor
    unet = build_unet().train()
    ema = build_unet().eval()
    ema.load_state_dict(unet.state_dict())
    scheduler = build_scheduler()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=5e-4, weight_decay=0.0)
    generator = torch.Generator().manual_seed(SEED + 3)
    batch = 8
    losses, start = [], time.time()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, 1e-3, warmup=30)
        rows = torch.randint(0, len(latents), (batch,), generator=generator)
        x0, prompt = latents[rows], labels[rows]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(0, 1000, (batch,), generator=generator)
        noisy = scheduler.add_noise(x0, noise, t)
        conditional = (torch.rand(batch, generator=generator) >= 0.1).long()  # 10% unconditional
        pred = unet(
            noisy,
            t,
            encoder_hidden_states=embeds["generated"][prompt, conditional],
            encoder_hidden_states_1=embeds["t5"][prompt, conditional],
            encoder_attention_mask_1=embeds["mask"][prompt, conditional],
        ).sample
        loss = F.mse_loss(pred, x0)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        decay = min(0.995, (1 + step) / (10 + step))
        with torch.no_grad():
            for p_ema, p in zip(ema.parameters(), unet.parameters(), strict=True):
                p_ema.lerp_(p, 1 - decay)
        losses.append(loss.item())
        if step % 250 == 249:
            ema.save_pretrained(work / "unet", safe_serialization=True)
        if step % 50 == 0 or step == steps - 1:
            log(f"unet {step}/{steps} loss {np.mean(losses[-50:]):.4f} ({time.time() - start:.0f} s)")
    ema.save_pretrained(work / "unet", safe_serialization=True)
    (work / "unet_losses.json").write_text(json.dumps({"seconds": time.time() - start, "losses": losses}))


def trained_part(work: Path, out: Path, name: str) -> Path:
    """Where a later stage reads part `name` (vae, vocoder, unet): this run's work folder when a stage made
    it there, else the shipped model's folder `out` (e.g. only the vocoder retrained on a fresh checkout)."""
    if (work / name).is_dir():
        return work / name
    if (out / name).is_dir():
        log(f"no {name} in {work}: using the shipped {out / name}")
        return out / name
    raise SystemExit(f"no {name} in {work} or {out}: run the {name} stage first")


def assemble(work: Path, out: Path) -> None:
    from diffusers import AudioLDM2UNet2DConditionModel, AutoencoderKL
    from transformers import SpeechT5HifiGan

    from engine.previews import write_model_factors
    from resources.build_tiny_models import save_model

    if (work / "vae").is_dir() and not (work / "unet").is_dir():
        raise SystemExit(
            f"{work / 'vae'} is new but there is no UNet trained on it: run the unet stage first"
        )
    pipe = build_pipeline(  # loaded whole into memory before save_model replaces `out`
        vocoder=SpeechT5HifiGan.from_pretrained(trained_part(work, out, "vocoder")),
        vae=AutoencoderKL.from_pretrained(trained_part(work, out, "vae")),
        unet=AudioLDM2UNet2DConditionModel.from_pretrained(trained_part(work, out, "unet")),
    )
    words = ", ".join(s.prompt for s in td.grammar()[::5])
    studio = {
        "family": "audioldm2",
        "description": (
            f"Tones: a small AudioLDM2 (audioldm2-large layout, {td.SAMPLE_RATE} Hz; UNet and mel VAE "
            f"trained, the vocoder an oscillator bank set in its weights) for synthetic sounds: sine tones, "
            f"notes, major/minor chords, rising/falling sweeps, noise bursts, beeps (e.g. {words})."
        ),
        "defaults": dict(DEFAULTS),
    }
    save_model(pipe, studio, out)
    write_model_factors(out)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    log(f"saved {out} ({size / 1e6:.2f} MB)")
    if all((work / f"{name}_losses.json").is_file() for name in ("vae", "unet")):
        draw_losses(work, REPO / "docs" / "tones_training.png")
    else:  # e.g. only the vocoder rebuilt: the figure of the shipped VAE and UNet stays
        log(f"no VAE and UNet losses in {work}: docs/tones_training.png kept")


def draw_losses(work: Path, target: Path) -> None:
    """Loss curves (log scale, 50-step running mean) of the three trained parts, drawn with PIL."""
    from PIL import Image, ImageDraw

    curves = []
    for name, column in (("vocoder", 0), ("vae", 0), ("unet", None)):
        path = work / f"{name}_losses.json"
        if path.is_file():
            report = json.loads(path.read_text())
            values = np.array(report["losses"], dtype=float)
            values = values[:, column] if column is not None else values
            label = f"{name}: {len(values)} steps, {report['seconds'] / 60:.1f} min"
            curves.append((label, np.convolve(values, np.ones(50) / 50, mode="valid")))
    width, height, pad = 420, 260, 40
    image = Image.new("RGB", (width * max(1, len(curves)), height), "white")
    draw = ImageDraw.Draw(image)
    for i, (label, values) in enumerate(curves):
        x0 = i * width + pad
        logs = np.log10(np.maximum(values, 1e-8))
        low, high = logs.min(), logs.max() + 1e-9
        xs = x0 + np.arange(len(logs)) / max(1, len(logs) - 1) * (width - 2 * pad)
        ys = height - pad - (logs - low) / (high - low) * (height - 2 * pad)
        draw.rectangle([x0, pad, x0 + width - 2 * pad, height - pad], outline="gray")
        draw.line(list(zip(xs.tolist(), ys.tolist(), strict=True)), fill="navy", width=2)
        draw.text((x0, 10), label, fill="black")
        draw.text((x0 - 35, pad - 5), f"{10**high:.3g}", fill="black")
        draw.text((x0 - 35, height - pad - 5), f"{10**low:.3g}", fill="black")
        draw.text((x0, height - pad + 8), "step ->   loss (log scale)", fill="black")
    target.parent.mkdir(parents=True, exist_ok=True)
    image.save(target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=["vocoder", "vae", "unet", "assemble", "all", "hifigan"])
    parser.add_argument("--work", type=Path, default=REPO / "build" / "tones_train")
    parser.add_argument("--out", type=Path, default=REPO / "resources" / "models" / "tones")
    parser.add_argument("--vocoder-steps", type=int, default=0, help="training after the set bank")
    parser.add_argument("--hifigan-steps", type=int, default=750, help="the hifigan stage (from random)")
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--unet-steps", type=int, default=4000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clips-per-prompt", type=int, default=48, help="fewer for smoke runs")
    args = parser.parse_args()
    CLIPS.append(args.clips_per_prompt)
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if args.stage in ("vae", "all"):
        train_vae(args.work, args.vae_steps)
    if args.stage in ("vocoder", "all"):  # after the VAE: it trains on the VAE's reconstructions
        make_vocoder(args.work, args.vocoder_steps, trained_part(args.work, args.out, "vae"))
    if args.stage == "hifigan":  # the trained HiFi-GAN that was tried first (see docs/models.md); not shipped
        train_vocoder(args.work, args.hifigan_steps, name="hifigan")  # beside, not over, the shipped one
    if args.stage in ("unet", "all"):
        train_unet(args.work, args.unet_steps, trained_part(args.work, args.out, "vae"))
    if args.stage in ("assemble", "all"):
        assemble(args.work, args.out)
    log(f"{args.stage} done in {(time.time() - started) / 60:.1f} min")


if __name__ == "__main__":
    main()
