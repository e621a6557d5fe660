"""Synthetic sounds and prompts for the embedded ``tones`` text-to-audio model, and the analyses that check
them.

Everything here is procedural and deterministic from a seed: tones at named pitches (Hz) and note names,
major and minor triads, rising and falling sweeps, noise bursts and rhythms of beeps, each with a prompt from
a small grammar. The same module holds the log-mel transform shared by the VAE, the vocoder and the training
script, and the measurements (spectral peak, sweep slope, onset count, flatness) that the evaluation and the
semantic tests use, so that what is trained and what is checked agree by construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

# Mel settings: one definition for the VAE, the vocoder and the pipeline. The hop is long on purpose: a
# HiFi-GAN is equivariant to shifts of one frame, so from the constant mel frames of a steady tone it can only
# make a signal periodic in the hop, whose spectrum lies on multiples of SAMPLE_RATE / HOP. A 100 ms hop puts
# that grid at 10 Hz, within 2% of any pitch from 220 Hz up (a 20 ms hop snapped 440 Hz to 450, 220 to 350).
SAMPLE_RATE = 8000
HOP = 800  # samples per mel frame (100 ms); the product of the vocoder's upsample rates
N_FFT = 1024  # a 128 ms window: fine frequency detail for pitch, which the mel bins keep
N_MELS = 128
F_MAX = SAMPLE_RATE / 2
LOG_FLOOR = 1e-5  # log10 of the clamped mel magnitude: values in about [-5, 1]
CLIP_SECONDS = 2.0

# --- The grammar --------------------------------------------------------------------------------------------

HZ_PITCHES = (220, 330, 440, 550, 660, 880)
NOTE_OFFSETS = {"C": -9, "D": -7, "E": -5, "F": -4, "G": -2, "A": 0, "B": 2}  # semitones from A4 (440 Hz)
NOTE_NAMES = ("C4", "D4", "E4", "F4", "G4", "A4", "B4", "C5")
CHORD_ROOTS = ("C", "D", "E", "F", "G", "A")
CHORD_INTERVALS = {"major": (0, 4, 7), "minor": (0, 3, 7)}
BEEP_COUNTS = {"two": 2, "three": 3, "four": 4}
BEEP_HZ = 660.0
SWEEP_LOW = (200.0, 300.0)  # a sweep runs between a low and a high frequency drawn from these ranges
SWEEP_HIGH = (1500.0, 2500.0)


def note_hz(name: str) -> float:
    """Equal-tempered frequency of a note name such as 'A4' or 'C5'."""
    semitones = NOTE_OFFSETS[name[0]] + 12 * (int(name[1:]) - 4)
    return 440.0 * 2 ** (semitones / 12)


@dataclass(frozen=True)
class Sound:
    """One prompt of the grammar and what it asks for."""

    prompt: str
    kind: str  # tone | chord | sweep | noise | beeps
    pitches: tuple[float, ...] = ()  # Hz: one for a tone or the beeps, three for a chord
    direction: str = ""  # rising | falling, for sweeps
    count: int = 0  # number of beeps


def _article(word: str) -> str:
    """'an' before words read with a leading vowel sound (A, E, F, 880), else 'a'."""
    return "an" if word[0] in "AEF8" else "a"


def grammar() -> list[Sound]:
    """Every prompt the model is trained on."""
    sounds = [Sound(f"{_article(str(hz))} {hz} Hz sine tone", "tone", (float(hz),)) for hz in HZ_PITCHES]
    sounds += [Sound(f"{_article(name)} {name} note", "tone", (note_hz(name),)) for name in NOTE_NAMES]
    for root in CHORD_ROOTS:
        for quality, intervals in CHORD_INTERVALS.items():
            base = note_hz(f"{root}4")
            pitches = tuple(base * 2 ** (step / 12) for step in intervals)
            sounds.append(Sound(f"{_article(root)} {root} {quality} chord", "chord", pitches))
    sounds += [Sound(f"a {way} sweep", "sweep", direction=way) for way in ("rising", "falling")]
    sounds.append(Sound("a noise burst", "noise"))
    sounds += [Sound(f"{word} short beeps", "beeps", (BEEP_HZ,), count=n) for word, n in BEEP_COUNTS.items()]
    return sounds


def vocabulary() -> list[str]:
    """The words of the grammar (for the word-level tokenizers)."""
    return list(dict.fromkeys(word for sound in grammar() for word in sound.prompt.split()))


# --- Synthesis ----------------------------------------------------------------------------------------------


def _envelope(samples: int, start: int, stop: int, fade: int) -> np.ndarray:
    """1 between start and stop, with raised-cosine fades of `fade` samples at both ends."""
    env = np.zeros(samples)
    env[start:stop] = 1.0
    ramp = 0.5 - 0.5 * np.cos(np.linspace(0, np.pi, fade))
    env[start : start + fade] *= ramp
    env[stop - fade : stop] *= ramp[::-1]
    return env


def synthesize(sound: Sound, seed: int, seconds: float = CLIP_SECONDS) -> np.ndarray:
    """A float32 waveform of `seconds` at SAMPLE_RATE for `sound`; varies (loudness, timing, sweep ends,
    phase) with `seed` but always keeps what the prompt asks."""
    rng = np.random.default_rng(seed)
    n = int(round(seconds * SAMPLE_RATE))
    t = np.arange(n) / SAMPLE_RATE
    gain = rng.uniform(0.25, 0.6)
    fade = int(0.02 * SAMPLE_RATE)
    if sound.kind in ("tone", "chord"):
        wave = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi)) for f in sound.pitches)
        wave = wave / len(sound.pitches) * _envelope(n, 0, n, fade)
    elif sound.kind == "sweep":
        low, high = rng.uniform(*SWEEP_LOW), rng.uniform(*SWEEP_HIGH)
        start, stop = (low, high) if sound.direction == "rising" else (high, low)
        freq = start * (stop / start) ** (t / seconds)  # exponential: equal octaves per second
        wave = np.sin(2 * np.pi * np.cumsum(freq) / SAMPLE_RATE) * _envelope(n, 0, n, fade)
    elif sound.kind == "noise":
        length = int(rng.uniform(0.3, 0.6) * SAMPLE_RATE)
        start = int(rng.uniform(0.1, seconds - 0.1 - length / SAMPLE_RATE) * SAMPLE_RATE)
        decay = np.exp(-np.arange(length) / (rng.uniform(0.3, 1.0) * length))
        env = np.zeros(n)
        env[start : start + length] = decay * _envelope(length, 0, length, fade // 4)
        wave = rng.standard_normal(n) * env * 0.5
    elif sound.kind == "beeps":
        wave = np.zeros(n)
        beep = int(0.15 * SAMPLE_RATE)
        slot = (n - int(0.2 * SAMPLE_RATE)) // sound.count  # evenly spaced, 0.1 s margins
        for k in range(sound.count):
            start = int(0.1 * SAMPLE_RATE) + k * slot + int(rng.uniform(0, 0.05) * SAMPLE_RATE)
            tone = np.sin(2 * np.pi * sound.pitches[0] * t[:beep] + rng.uniform(0, 2 * np.pi))
            wave[start : start + beep] += tone * _envelope(beep, 0, beep, fade // 2)
    else:
        raise ValueError(f"unknown kind {sound.kind!r}")
    return (gain * wave).astype(np.float32)


# --- Log-mel spectrogram -----------------------------------------------------------------------------------


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale (linear below 1 kHz, logarithmic above), as librosa's default."""
    hz = np.asarray(hz, dtype=np.float64)
    mel = hz / (200.0 / 3)
    log_part = 15.0 + np.log(np.maximum(hz, 1e-9) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(hz >= 1000.0, log_part, mel)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    return np.where(mel >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (mel - 15.0)), mel * 200.0 / 3)


def mel_filterbank() -> torch.Tensor:
    """[N_FFT // 2 + 1, N_MELS] Slaney-normalised triangular filters from 0 Hz to F_MAX."""
    fft_hz = np.linspace(0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(F_MAX), N_MELS + 2))
    lower = (fft_hz[:, None] - edges[None, :-2]) / (edges[1:-1] - edges[:-2])[None, :]
    upper = (edges[None, 2:] - fft_hz[:, None]) / (edges[2:] - edges[1:-1])[None, :]
    weights = np.maximum(0.0, np.minimum(lower, upper)) * (2.0 / (edges[2:] - edges[:-2]))[None, :]
    return torch.tensor(weights, dtype=torch.float32)


_FILTERS: dict[str, torch.Tensor] = {}


def log_mel(wave: torch.Tensor) -> torch.Tensor:
    """[B, S] waveforms -> [B, S // HOP, N_MELS] log10 mel magnitudes, the vocoder's input layout.

    Padded so that frame k is centred on sample k * HOP + HOP / 2: S // HOP frames, and a vocoder with
    upsampling HOP gives back exactly S samples."""
    key = str(wave.device)
    if key not in _FILTERS:
        _FILTERS[key] = mel_filterbank().to(wave.device)
    pad = (N_FFT - HOP) // 2
    padded = torch.nn.functional.pad(wave.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
    window = torch.hann_window(N_FFT, device=wave.device)
    spec = torch.stft(padded, N_FFT, HOP, N_FFT, window, center=False, return_complex=True).abs()
    mel = spec.transpose(1, 2) @ _FILTERS[key]
    return torch.log10(torch.clamp(mel, min=LOG_FLOOR))[:, : wave.shape[-1] // HOP]


# --- Analyses -----------------------------------------------------------------------------------------------


def _trimmed(audio: np.ndarray, edge: float = 0.05) -> np.ndarray:
    audio = np.asarray(audio, dtype=np.float64).reshape(-1)
    cut = int(len(audio) * edge)
    return audio[cut : len(audio) - cut] if cut else audio


def _spectrum(audio: np.ndarray, sample_rate: int) -> tuple[np.ndarray, np.ndarray]:
    """Magnitude spectrum (Hann window, zero-padded 4x) and its frequencies."""
    audio = _trimmed(audio)
    size = 4 * 2 ** math.ceil(math.log2(len(audio)))
    magnitude = np.abs(np.fft.rfft(audio * np.hanning(len(audio)), size))
    return magnitude, np.fft.rfftfreq(size, 1.0 / sample_rate)


def _refine(log_mag: np.ndarray, index: int) -> float:
    """Parabolic interpolation of a peak's position, in bins."""
    if 0 < index < len(log_mag) - 1:
        a, b, c = log_mag[index - 1 : index + 2]
        denominator = a - 2 * b + c
        if denominator < 0:
            return index + 0.5 * (a - c) / denominator
    return float(index)


def spectral_peaks(
    audio: np.ndarray, sample_rate: int = SAMPLE_RATE, count: int = 1, min_hz: float = 50.0
) -> list[float]:
    """The `count` strongest spectral peaks (Hz), strongest first, at least a semitone apart."""
    magnitude, freqs = _spectrum(audio, sample_rate)
    log_mag = np.log(magnitude + 1e-12)
    order = np.argsort(magnitude)[::-1]
    peaks: list[float] = []
    for index in order:
        hz = float(freqs[index])
        if hz < min_hz or any(abs(math.log2(hz / p)) < 1 / 12 for p in peaks):
            continue
        peaks.append(_refine(log_mag, int(index)) * float(freqs[1]))
        if len(peaks) == count:
            break
    return peaks


def spectral_peak_hz(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """Frequency (Hz) of the strongest spectral component above 50 Hz."""
    return spectral_peaks(audio, sample_rate, 1)[0]


def pitch_track(audio: np.ndarray, sample_rate: int = SAMPLE_RATE, frame: int = 512) -> np.ndarray:
    """Per-frame peak frequency (Hz) of frames with over a tenth of the loudest frame energy (others NaN)."""
    audio = np.asarray(audio, dtype=np.float64).reshape(-1)
    hop = frame // 2
    starts = range(0, len(audio) - frame + 1, hop)
    frames = np.stack([audio[s : s + frame] * np.hanning(frame) for s in starts])
    magnitude = np.abs(np.fft.rfft(frames, 4 * frame, axis=1))
    freqs = np.fft.rfftfreq(4 * frame, 1.0 / sample_rate)
    magnitude[:, freqs < 50] = 0
    energy = (frames**2).sum(axis=1)
    track = freqs[np.argmax(magnitude, axis=1)]
    return np.where(energy > 0.1 * energy.max(), track, np.nan)


def sweep_slope(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """Octaves per second of the per-frame peak frequency (least squares); positive when rising."""
    track = pitch_track(audio, sample_rate)
    times = (np.arange(len(track)) + 1) * 256 / sample_rate
    keep = np.isfinite(track)
    if keep.sum() < 3:
        return 0.0
    return float(np.polyfit(times[keep], np.log2(track[keep]), 1)[0])


def onset_count(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> int:
    """Number of separate loud events: the RMS envelope (10 ms frames, 100 ms running mean, which smooths a
    vocoder's frame-rate buzz) crossing up through half its maximum."""
    audio = np.asarray(audio, dtype=np.float64).reshape(-1)
    hop = sample_rate // 100
    rms = np.sqrt(np.mean(audio[: len(audio) // hop * hop].reshape(-1, hop) ** 2, axis=1))
    smooth = np.convolve(rms, np.ones(10) / 10, mode="same")
    loud = smooth > 0.5 * smooth.max()
    return int(loud[0]) + int(np.count_nonzero(loud[1:] & ~loud[:-1]))


def spectral_flatness(audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """Geometric over arithmetic mean of the power spectrum between 100 Hz and 3 kHz: near 0 for tones,
    about 0.5 for white noise."""
    magnitude, freqs = _spectrum(audio, sample_rate)
    power = magnitude[(freqs >= 100) & (freqs <= 3000)] ** 2 + 1e-20
    return float(np.exp(np.mean(np.log(power))) / np.mean(power))


def within(measured: float, wanted: float, tolerance: float = 0.03) -> bool:
    return abs(measured - wanted) <= tolerance * wanted


def check(sound: Sound, audio: np.ndarray, sample_rate: int = SAMPLE_RATE) -> dict[str, bool]:
    """Attribute -> whether `audio` has it, for what `sound` asks:

    * tone: ``pitch`` (the spectral peak within 3% of the asked pitch);
    * chord: ``chord`` (each of its three notes within 3% of one of the three strongest peaks);
    * sweep: ``direction`` (the per-frame peak frequency rises or falls as asked);
    * noise: ``noise`` (a flat spectrum: flatness above 0.1);
    * beeps: ``count`` (as many onsets as asked) and ``pitch`` (the beeps' peak within 3%).
    """
    audio = np.asarray(audio, dtype=np.float64).reshape(-1)
    if sound.kind == "tone":
        return {"pitch": within(spectral_peak_hz(audio, sample_rate), sound.pitches[0])}
    if sound.kind == "chord":
        peaks = spectral_peaks(audio, sample_rate, 3)
        return {"chord": all(any(within(p, note) for p in peaks) for note in sound.pitches)}
    if sound.kind == "sweep":
        slope = sweep_slope(audio, sample_rate)
        return {"direction": slope > 0.5 if sound.direction == "rising" else slope < -0.5}
    if sound.kind == "noise":
        return {"noise": spectral_flatness(audio, sample_rate) > 0.1}
    if sound.kind == "beeps":
        return {
            "count": onset_count(audio, sample_rate) == sound.count,
            "pitch": within(spectral_peak_hz(audio, sample_rate), sound.pitches[0]),
        }
    raise ValueError(f"unknown kind {sound.kind!r}")
