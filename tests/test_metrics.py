"""Fidelity metrics on signals whose values are known."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from engine.metrics import (
    audio_snr_db,
    bit_identical,
    fidelity,
    json_safe,
    log_spectral_distance,
    relative_l2,
    video_psnr,
    video_ssim,
)


def pattern(frames: int = 2, height: int = 24, width: int = 30) -> np.ndarray:
    """Smooth float frames in [0.1, 0.9], [F, H, W, 3]."""
    f, y, x, c = np.meshgrid(
        np.arange(frames), np.arange(height), np.arange(width), np.arange(3), indexing="ij"
    )
    return 0.5 + 0.4 * np.sin(0.3 * x + 0.2 * y + c + f)


def tone(n: int = 4096, periods: int = 64) -> np.ndarray:
    return np.sin(2 * np.pi * periods * np.arange(n) / n)


# -------------------------------------------------------------------------------------------- PSNR


def test_psnr_uniform_error_is_20_db():
    ref = np.full((3, 8, 8, 3), 0.5)
    assert video_psnr(ref + 0.1, ref) == pytest.approx(20.0)
    assert video_psnr(ref - 0.01, ref) == pytest.approx(40.0)


def test_psnr_uint8_is_scaled_to_unit_range():
    ref = np.full((2, 4, 4, 3), 100, np.uint8)
    test = ref + np.uint8(51)  # error 0.2 of the range
    assert video_psnr(test, ref) == pytest.approx(20 * math.log10(5))
    assert video_psnr(test, ref.astype(np.float64) / 255) == pytest.approx(20 * math.log10(5))


def test_psnr_is_the_mean_of_per_frame_values():
    ref = np.full((2, 4, 4, 3), 0.5)
    test = ref.copy()
    test[0] += 0.1  # 20 dB
    test[1] += 0.01  # 40 dB
    assert video_psnr(test, ref) == pytest.approx(30.0)


def test_psnr_identical():
    ref = pattern()
    assert video_psnr(ref, ref.copy()) == math.inf
    test = ref.copy()
    test[1] += 0.1
    assert video_psnr(test, ref) == pytest.approx((100 + 20) / 2)  # identical frame capped at 100 dB


def test_psnr_accepts_torch():
    ref = np.full((1, 4, 4, 3), 0.5, np.float32)
    assert video_psnr(torch.from_numpy(ref + 0.1), torch.from_numpy(ref)) == pytest.approx(20.0, abs=1e-5)
    assert isinstance(video_psnr(torch.from_numpy(ref + 0.1), ref), float)


# -------------------------------------------------------------------------------------------- SSIM


def test_ssim_identical_is_one():
    ref = pattern()
    assert video_ssim(ref, ref.copy()) == pytest.approx(1.0, abs=1e-12)


def test_ssim_of_constant_frames_is_the_luminance_term():
    a, b = 0.5, 0.6
    c1 = 0.01**2
    expected = (2 * a * b + c1) / (a * a + b * b + c1)
    assert video_ssim(np.full((1, 16, 16, 3), a), np.full((1, 16, 16, 3), b)) == pytest.approx(expected)


def test_ssim_matches_scikit_image_reference():
    # skimage.metrics.structural_similarity(test[i], ref[i], gaussian_weights=True, sigma=1.5,
    # use_sample_covariance=False, data_range=1, channel_axis=-1), averaged over the frames.
    f, y, x, c = np.meshgrid(np.arange(2), np.arange(24), np.arange(30), np.arange(3), indexing="ij")
    ref = 0.5 + 0.4 * np.sin(0.3 * x + 0.2 * y + c + f)
    test = np.clip(ref + 0.1 * np.cos(1.7 * x * y + c), 0, 1)
    assert video_ssim(test, ref) == pytest.approx(0.8609219368291536, abs=1e-9)


def test_ssim_drops_with_noise():
    ref = pattern(2, 32, 32)
    rng = np.random.default_rng(0)
    noise = rng.standard_normal(ref.shape)
    scores = [video_ssim(np.clip(ref + s * noise, 0, 1), ref) for s in (0.01, 0.05, 0.2)]
    assert 1.0 > scores[0] > scores[1] > scores[2] > 0
    assert scores[0] > 0.95 and scores[2] < 0.6


def test_ssim_small_frames_use_a_smaller_window():
    ref = pattern(1, 6, 9)
    assert video_ssim(ref, ref.copy()) == pytest.approx(1.0)
    assert video_ssim(np.clip(ref + 0.1 * np.cos(ref * 50), 0, 1), ref) < 1.0


def test_ssim_uint8_and_torch():
    ref = np.round(pattern() * 255).astype(np.uint8)
    noisy = np.clip(ref.astype(int) + 10, 0, 255).astype(np.uint8)
    value = video_ssim(noisy, ref)
    assert value == pytest.approx(video_ssim(noisy.astype(np.float64) / 255, ref.astype(np.float64) / 255))
    assert video_ssim(torch.from_numpy(noisy), torch.from_numpy(ref)) == pytest.approx(value)


# ------------------------------------------------------------------------------------------- audio


def test_snr_with_known_noise_power():
    ref = tone()  # power 0.5
    noise = 0.05 * np.where(np.arange(ref.size) % 2 == 0, 1.0, -1.0)  # power 0.0025
    assert audio_snr_db(ref + noise, ref) == pytest.approx(10 * math.log10(200))
    assert audio_snr_db(ref, ref) == math.inf
    assert audio_snr_db(ref, np.zeros_like(ref)) == -math.inf


def test_snr_multichannel_and_torch():
    ref = np.stack([tone(), tone()], axis=1).astype(np.float32)
    test = ref * 0.9  # noise = 0.1 * ref: 20 dB
    assert audio_snr_db(torch.from_numpy(test), torch.from_numpy(ref)) == pytest.approx(20.0, abs=1e-4)


def test_lsd():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal(8000)  # broadband: every bin well above the epsilon
    assert log_spectral_distance(ref, ref.copy()) == 0.0
    # A gain g shifts every bin by exactly 20 log10(g) dB.
    assert log_spectral_distance(0.5 * ref, ref) == pytest.approx(20 * math.log10(2), rel=1e-9)
    small = log_spectral_distance(ref + 0.01 * rng.standard_normal(ref.size), ref)
    large = log_spectral_distance(ref + 0.3 * rng.standard_normal(ref.size), ref)
    assert 0 < small < large


def test_lsd_ignores_bins_below_epsilon():
    ref = tone(8000, 440)  # a pure tone: most bins hold (numerically) no power
    assert 0 < log_spectral_distance(0.5 * ref, ref) < 20 * math.log10(2)


def test_lsd_short_and_stereo_and_torch():
    rng = np.random.default_rng(2)
    short = rng.standard_normal(300)
    assert log_spectral_distance(short * 0.5, short) == pytest.approx(20 * math.log10(2))  # < n_fft
    stereo = rng.standard_normal((4096, 2))
    value = log_spectral_distance(torch.from_numpy(stereo * 0.5), torch.from_numpy(stereo), n_fft=256, hop=64)
    assert value == pytest.approx(20 * math.log10(2))
    single = log_spectral_distance(stereo[:, 1] * 0.5 + 0.1, stereo[:, 1], n_fft=256, hop=64)
    mixed = np.stack([stereo[:, 0] * 0.5, stereo[:, 1] * 0.5 + 0.1], axis=1)
    both = log_spectral_distance(mixed, stereo, n_fft=256, hop=64)
    assert both == pytest.approx((20 * math.log10(2) + single) / 2)  # mean over channels


# --------------------------------------------------------------------------------------- any shape


def test_relative_l2_exact():
    assert relative_l2(np.array([3.0, 4.0]), np.array([0.0, 0.0]) + np.array([3.0, 0.0])) == pytest.approx(
        4 / 3
    )
    assert relative_l2(np.array([1.0, 1.0, 1.0, 1.0]), np.array([2.0, 2.0, 2.0, 2.0])) == pytest.approx(0.5)
    assert relative_l2(torch.ones(2, 3), torch.ones(2, 3)) == 0.0
    assert relative_l2(np.ones(3), np.zeros(3)) == math.inf
    assert relative_l2(np.zeros(3), np.zeros(3)) == 0.0


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\[2, 8, 8, 3\].*\[2, 8, 9, 3\]"):
        video_psnr(np.zeros((2, 8, 8, 3)), np.zeros((2, 8, 9, 3)))
    with pytest.raises(ValueError, match=r"\[100\].*\[101\]"):
        fidelity("audio", np.zeros(100), np.zeros(101))
    with pytest.raises(ValueError, match=r"\[3\].*\[4\]"):
        relative_l2(torch.zeros(3), np.zeros(4))


def test_bad_inputs():
    with pytest.raises(ValueError, match="F, H, W, C"):
        video_ssim(np.zeros((8, 8, 3)), np.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match="uint8 or float"):
        video_psnr(np.zeros((1, 2, 2, 3), np.int32), np.zeros((1, 2, 2, 3), np.int32))
    with pytest.raises(ValueError, match="modality"):
        fidelity("image", np.zeros(3), np.zeros(3))


# ---------------------------------------------------------------------------------------- fidelity


def test_fidelity_video():
    ref = np.round(pattern() * 255).astype(np.uint8)
    same = fidelity("video", ref, ref.copy())
    assert same == {"psnr_db": math.inf, "ssim": pytest.approx(1.0), "identical": True}
    other = fidelity("video", np.clip(ref.astype(int) + 3, 0, 255).astype(np.uint8), ref)
    assert set(other) == {"psnr_db", "ssim", "identical"}
    assert other["identical"] is False and 30 < other["psnr_db"] < 60 and other["ssim"] < 1


def test_fidelity_audio():
    ref = tone().astype(np.float32)
    assert fidelity("audio", ref, ref.copy()) == {"snr_db": math.inf, "lsd": 0.0, "identical": True}
    other = fidelity("audio", torch.from_numpy(ref * 0.9), ref)
    assert set(other) == {"snr_db", "lsd", "identical"}
    assert other["identical"] is False and other["snr_db"] == pytest.approx(20.0, abs=1e-4)


def test_bit_identical():
    a = np.array([0.0, np.nan, 1.5], np.float32)
    assert bit_identical(a, a.copy())
    assert bit_identical(torch.from_numpy(a), a)  # NaNs with the same bits count as identical
    assert not bit_identical(a, a.astype(np.float64))  # same values, different dtype
    assert not bit_identical(np.array([0.0]), np.array([-0.0]))
    assert bit_identical(torch.ones(3, dtype=torch.bfloat16), torch.ones(3, dtype=torch.bfloat16))
    assert not bit_identical(torch.ones(3, dtype=torch.bfloat16), torch.ones(3, dtype=torch.float16))


def test_json_safe():
    result = {
        "psnr_db": math.inf,
        "snr_db": -math.inf,
        "x": math.nan,
        "ssim": np.float32(0.5),
        "n": [1, (2,)],
    }
    safe = json_safe(result)
    assert safe == {"psnr_db": "inf", "snr_db": "-inf", "x": "nan", "ssim": 0.5, "n": [1, [2]]}
    json.dumps(safe, allow_nan=False)  # strict JSON
    assert result["psnr_db"] == math.inf  # input untouched
