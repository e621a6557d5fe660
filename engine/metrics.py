"""Fidelity of a clip against a reference clip (same request and seed, generated sequentially).

Every function takes numpy arrays or torch tensors (any device; they are copied to the CPU) and
returns Python floats, computed in float64. Arrays compared must have the same shape (ValueError
naming both shapes otherwise).

Infinity: identical inputs give `float("inf")` for PSNR and SNR (and -inf for an SNR against a
silent reference). The functions return plain floats; `json_safe` turns non-finite floats into the
strings "inf", "-inf" and "nan" so the result can be written as strict JSON (the sidecar writer
uses it; CLI JSON output should too).

Importing this module does not import torch; torch is imported when a metric needs it.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import numpy as np

# When some but not all frames are identical, per-frame PSNR is capped at this value before
# averaging, so that one identical frame does not make the average infinite. 100 dB is far past
# any visible difference (8-bit rounding alone is about 59 dB).
PSNR_CAP_DB = 100.0

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03

LSD_EPS = 1e-10


# ------------------------------------------------------------------------------------------ helpers


def _is_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _raw(x: Any) -> np.ndarray:
    """`x` as a numpy array of its own dtype (torch tensors: detached, on the CPU)."""
    if _is_tensor(x):
        import torch

        t = x.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy()
    arr = np.asarray(x)
    if arr.dtype == object:
        raise ValueError("expected a numeric array")
    return arr


def _pair(test: Any, ref: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = _raw(test), _raw(ref)
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: test has shape {list(a.shape)}, reference has {list(b.shape)}")
    for arr in (a, b):
        if arr.dtype.kind not in "iuf":
            raise ValueError(f"expected integer or float values, got {arr.dtype}")
    return a, b


def _video_pair(test: Any, ref: Any) -> tuple[np.ndarray, np.ndarray]:
    """Frames [F, H, W, C] scaled to [0, 1] float64: uint8 is divided by 255, floats are kept."""
    a, b = _pair(test, ref)
    if a.ndim != 4:
        raise ValueError(f"frames must be [F, H, W, C], got shape {list(a.shape)}")
    if 0 in a.shape:
        raise ValueError(f"frames are empty: shape {list(a.shape)}")
    out = []
    for arr in (a, b):
        if arr.dtype == np.uint8:
            out.append(arr.astype(np.float64) / 255.0)
        elif arr.dtype.kind == "f":
            out.append(arr.astype(np.float64))
        else:
            raise ValueError(f"frames must be uint8 or float in [0, 1], got {arr.dtype}")
    return out[0], out[1]


def _audio_pair(test: Any, ref: Any) -> tuple[np.ndarray, np.ndarray]:
    """Audio [S] or [S, C] as float64."""
    a, b = _pair(test, ref)
    if a.ndim not in (1, 2) or a.shape[0] == 0:
        raise ValueError(f"audio must be [S] or [S, C] with S > 0, got shape {list(a.shape)}")
    return a.astype(np.float64), b.astype(np.float64)


# -------------------------------------------------------------------------------------------- video


def video_psnr(test: Any, ref: Any) -> float:
    """Mean over frames of the PSNR (dB) of each frame, on values in [0, 1].

    Frames are uint8 [F, H, W, C] (divided by 255) or float in [0, 1]. Returns inf when every
    frame is identical; otherwise frames' PSNRs are capped at `PSNR_CAP_DB` before averaging.
    """
    a, b = _video_pair(test, ref)
    mse = np.mean((a - b) ** 2, axis=(1, 2, 3))
    if np.all(mse == 0):
        return math.inf
    with np.errstate(divide="ignore"):
        psnr = 10.0 * np.log10(1.0 / mse)
    return float(np.mean(np.minimum(psnr, PSNR_CAP_DB)))


def _gaussian_1d(size: int, sigma: float) -> list[float]:
    coords = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(coords**2) / (2 * sigma**2))
    return (g / g.sum()).tolist()


def _blur_valid(x, weights: list[float]):
    """Separable Gaussian filter over the last two axes, 'valid' positions only.

    Shifted multiply-adds: in float64 on the CPU this is several times faster than conv2d.
    """
    k = len(weights)
    width = x.shape[-1] - k + 1
    rows = x[..., 0:width] * weights[0]
    for i in range(1, k):
        rows.add_(x[..., i : i + width], alpha=weights[i])
    height = x.shape[-2] - k + 1
    out = rows[..., 0:height, :] * weights[0]
    for i in range(1, k):
        out.add_(rows[..., i : i + height, :], alpha=weights[i])
    return out


def video_ssim(test: Any, ref: Any) -> float:
    """Mean SSIM over frames (each frame: mean over channels and positions), values in [0, 1].

    Wang et al. (2004): 11x11 Gaussian window with sigma 1.5, K1 = 0.01, K2 = 0.03, data range
    1, population (co)variances, statistics over 'valid' window positions only (no padding), as
    in scikit-image's `structural_similarity(gaussian_weights=True, use_sample_covariance=False)`.
    Frames smaller than 11 px in height or width use the largest odd window that fits, with sigma
    scaled in proportion (1.5 * window / 11). Computed in float64 on the CPU.
    """
    import torch

    a, b = _video_pair(test, ref)
    frames, height, width, channels = a.shape
    size = min(SSIM_WINDOW, height, width)
    if size % 2 == 0:
        size -= 1
    weights = _gaussian_1d(size, SSIM_SIGMA * size / SSIM_WINDOW)
    c1, c2 = SSIM_K1**2, SSIM_K2**2

    per_frame = []
    # Chunks of frames keep the float64 intermediates around 256 MiB.
    chunk = max(1, (256 << 20) // (16 * 8 * channels * height * width))
    for start in range(0, frames, chunk):
        x = torch.from_numpy(a[start : start + chunk]).permute(0, 3, 1, 2)
        y = torch.from_numpy(b[start : start + chunk]).permute(0, 3, 1, 2)
        stats = _blur_valid(torch.stack([x, y, x * x, y * y, x * y]), weights)
        mu_x, mu_y, xx, yy, xy = stats.unbind(0)
        mu_xy = mu_x * mu_y
        mu_xx = mu_x * mu_x
        mu_yy = mu_y * mu_y
        numerator = (2 * mu_xy + c1) * (2 * (xy - mu_xy) + c2)
        denominator = (mu_xx + mu_yy + c1) * ((xx - mu_xx) + (yy - mu_yy) + c2)
        per_frame.append((numerator / denominator).mean(dim=(1, 2, 3)))
    return float(torch.cat(per_frame).mean())


# -------------------------------------------------------------------------------------------- audio


def audio_snr_db(test: Any, ref: Any) -> float:
    """10 log10(sum ref^2 / sum (ref - test)^2) in dB, over all samples and channels.

    inf when identical; -inf when the reference is silent and the test is not.
    """
    a, b = _audio_pair(test, ref)
    noise = float(np.sum((b - a) ** 2))
    signal = float(np.sum(b**2))
    if noise == 0:
        return math.inf
    if signal == 0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def log_spectral_distance(test: Any, ref: Any, n_fft: int = 512, hop: int = 128) -> float:
    """Log-spectral distance in dB: mean over STFT frames (and channels) of
    sqrt(mean over frequency of (10 log10 P_ref - 10 log10 P_test)^2), with P = |STFT|^2 + 1e-10.

    STFT: Hann window of `n_fft`, hop `hop`, centred frames with zero padding (so clips shorter
    than `n_fft` work too). 0 for identical signals.
    """
    import torch

    a, b = _audio_pair(test, ref)
    if n_fft < 2 or hop < 1:
        raise ValueError(f"need n_fft >= 2 and hop >= 1, got n_fft={n_fft}, hop={hop}")
    window = torch.hann_window(n_fft, dtype=torch.float64)

    def power_db(x: np.ndarray):
        signal = torch.from_numpy(np.ascontiguousarray(x.T if x.ndim == 2 else x[None, :]))
        spec = torch.stft(
            signal,
            n_fft=n_fft,
            hop_length=hop,
            win_length=n_fft,
            window=window,
            center=True,
            pad_mode="constant",
            return_complex=True,
        )
        return 10.0 * torch.log10(spec.abs() ** 2 + LSD_EPS)  # [C, freq, frames]

    diff = power_db(b) - power_db(a)
    per_frame = torch.sqrt(torch.mean(diff**2, dim=1))
    return float(per_frame.mean())


# ---------------------------------------------------------------------------------------------- any


def relative_l2(test: Any, ref: Any) -> float:
    """||test - ref|| / ||ref|| (Frobenius norm over all elements, raw values).

    0 for identical inputs; inf when the reference is all zeros and the test is not.
    """
    a, b = _pair(test, ref)
    a, b = a.astype(np.float64), b.astype(np.float64)
    diff = float(np.linalg.norm((a - b).ravel()))
    norm = float(np.linalg.norm(b.ravel()))
    if diff == 0:
        return 0.0
    if norm == 0:
        return math.inf
    return diff / norm


def bit_identical(test: Any, ref: Any) -> bool:
    """True when both have the same shape, dtype and bytes (NaNs with equal bits match; -0.0 != 0.0)."""
    is_bf16 = [_is_tensor(x) and str(x.dtype) == "torch.bfloat16" for x in (test, ref)]
    if is_bf16[0] != is_bf16[1]:
        return False
    arrays = []
    for x, bf16 in zip((test, ref), is_bf16, strict=True):
        if bf16:
            import torch

            arrays.append(x.detach().cpu().contiguous().view(torch.int16).numpy())
        else:
            arrays.append(_raw(x))
    a, b = arrays
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dtype.itemsize in (1, 2, 4, 8):
        unsigned = np.dtype(f"u{a.dtype.itemsize}")
        return bool(
            np.array_equal(np.ascontiguousarray(a).view(unsigned), np.ascontiguousarray(b).view(unsigned))
        )
    return a.tobytes() == b.tobytes()


def fidelity(modality: str, test: Any, ref: Any) -> dict[str, float | bool]:
    """Fidelity of `test` against `ref`.

    video: {"psnr_db", "ssim", "identical"}; audio: {"snr_db", "lsd", "identical"}. "identical" is
    True when the arrays are bit-identical (same dtype too). Values are plain floats (inf possible;
    pass the dict through `json_safe` before writing strict JSON).
    """
    if modality == "video":
        result: dict[str, float | bool] = {"psnr_db": video_psnr(test, ref), "ssim": video_ssim(test, ref)}
    elif modality == "audio":
        result = {"snr_db": audio_snr_db(test, ref), "lsd": log_spectral_distance(test, ref)}
    else:
        raise ValueError(f"modality must be 'video' or 'audio', not {modality!r}")
    result["identical"] = bit_identical(test, ref)
    return result


def json_safe(obj: Any) -> Any:
    """A copy of `obj` (dicts, lists, tuples, scalars) that strict JSON can hold: non-finite floats
    become the strings "inf", "-inf" and "nan"; numpy scalars and arrays become Python values;
    tuples become lists. Other values are returned unchanged."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj
