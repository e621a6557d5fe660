"""The embedded ``tones`` model makes what its prompts ask: pitch within 3%, sweeps the asked way, the chord's
three notes, a flat spectrum for noise, the number of beeps.

Generations go through the real engine (sequential, cpu:1) on the shipped weights, at fixed seeds; the full
grid and its pass rates are scripts/evaluate_tones.py's job (docs/models.md). The analyses themselves are
checked first on synthesised sounds, so that a pass below means the model, not a lenient measurement.
"""

from __future__ import annotations

import pytest

from engine.protocol import GenerationRequest
from resources import tones_data as td

SOUNDS = {sound.prompt: sound for sound in td.grammar()}


def test_analyses_tell_the_synthesised_sounds_apart():
    tone_440, tone_220 = SOUNDS["a 440 Hz sine tone"], SOUNDS["a 220 Hz sine tone"]
    rising, falling = SOUNDS["a rising sweep"], SOUNDS["a falling sweep"]
    audio = td.synthesize(tone_440, seed=3)
    assert td.check(tone_440, audio) == {"pitch": True}
    assert td.check(tone_220, audio) == {"pitch": False}
    assert td.check(SOUNDS["an A4 note"], audio) == {"pitch": True}  # the same pitch by name
    up = td.synthesize(rising, seed=3)
    assert td.sweep_slope(up) > 1.0 and td.check(falling, up) == {"direction": False}
    assert td.check(SOUNDS["a C major chord"], td.synthesize(SOUNDS["a C major chord"], 1)) == {"chord": True}
    assert td.check(SOUNDS["a C minor chord"], td.synthesize(SOUNDS["a C major chord"], 1)) == {
        "chord": False
    }
    assert td.onset_count(td.synthesize(SOUNDS["three short beeps"], 2)) == 3
    assert td.spectral_flatness(td.synthesize(SOUNDS["a noise burst"], 2)) > 0.1 > td.spectral_flatness(audio)


def test_mel_frames_match_the_vocoder_hop():
    import torch

    wave = torch.zeros(2, int(td.CLIP_SECONDS * td.SAMPLE_RATE))
    assert td.log_mel(wave).shape == (2, wave.shape[1] // td.HOP, td.N_MELS)


GENERATIONS = [
    ("a 440 Hz sine tone", 0),
    ("an 880 Hz sine tone", 1),
    ("a C4 note", 2),
    ("a G4 note", 3),
    ("a rising sweep", 4),
    ("a falling sweep", 5),
    ("a G major chord", 0),
    ("an E minor chord", 1),
    # Its 311 Hz note sank under its neighbours with the trained vocoder shipped before.
    ("a C minor chord", 0),
    ("a noise burst", 2),
    ("three short beeps", 1),
    ("four short beeps", 2),
]


@pytest.fixture(scope="module")
def generated(shared_engine):
    """prompt -> (audio, rate), one engine group for all of them."""
    clips = {}
    for prompt, seed in GENERATIONS:
        plan = shared_engine.plan(GenerationRequest(model="tones", prompt=prompt, seed=seed, devices="cpu:1"))
        result = shared_engine.run(plan, previews=False)
        clips[prompt] = (result.output, int(result.rate))
    return clips


@pytest.mark.parametrize("prompt", [p for p, _ in GENERATIONS if "tone" in p or "note" in p])
def test_generated_pitch_is_within_three_percent(generated, prompt):
    audio, rate = generated[prompt]
    assert rate == td.SAMPLE_RATE and len(audio) == int(td.CLIP_SECONDS * rate)
    wanted = SOUNDS[prompt].pitches[0]
    peak = td.spectral_peak_hz(audio, rate)
    assert abs(peak - wanted) <= 0.03 * wanted, f"{prompt!r}: peak {peak:.1f} Hz, asked {wanted:.1f} Hz"


@pytest.mark.parametrize("prompt", ["a rising sweep", "a falling sweep"])
def test_generated_sweep_goes_the_asked_way(generated, prompt):
    audio, rate = generated[prompt]
    slope = td.sweep_slope(audio, rate)
    assert td.check(SOUNDS[prompt], audio, rate)["direction"], f"{prompt!r}: slope {slope:+.2f} octaves/s"


@pytest.mark.parametrize("prompt", ["a G major chord", "an E minor chord", "a C minor chord"])
def test_generated_chord_has_its_three_notes(generated, prompt):
    audio, rate = generated[prompt]
    peaks = [round(p) for p in td.spectral_peaks(audio, rate, 3)]
    wanted = [round(p) for p in SOUNDS[prompt].pitches]
    assert td.check(SOUNDS[prompt], audio, rate)["chord"], f"{prompt!r}: peaks {peaks} Hz, notes {wanted} Hz"


def test_generated_noise_is_flat(generated):
    audio, rate = generated["a noise burst"]
    flatness = td.spectral_flatness(audio, rate)
    assert td.check(SOUNDS["a noise burst"], audio, rate)["noise"], f"spectral flatness {flatness:.3f}"


@pytest.mark.parametrize("prompt", ["three short beeps", "four short beeps"])
def test_generated_beeps_have_the_asked_count_and_pitch(generated, prompt):
    audio, rate = generated[prompt]
    checks = td.check(SOUNDS[prompt], audio, rate)
    assert checks == {"count": True, "pitch": True}, (
        f"{prompt!r}: {td.onset_count(audio, rate)} onsets, {checks}"
    )
