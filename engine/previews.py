"""Cheap previews of the denoised estimate x0: a linear latent-to-RGB (or -to-mel) map.

The map (a C x K matrix and a bias) is fitted once per model by least squares against a VAE
decode of a small part of an x0, then cached in the user's cache folder. Models may ship their own
`preview_factors.json`. Previews are throttled, small, and made on rank 0 only. A single rank fits
on the first x0 it sees; with peers it fits after the job from the final latents instead, since a
VAE decode inside the loop would keep every other rank waiting on rank 0 (a real model's decode on
a CPU can approach the collective timeout). That run has no previews; the next ones do.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

FACTORS_FILE = "preview_factors.json"
MAX_PREVIEW_SIDE = 512
MIN_INTERVAL_S = 0.1  # at most ~10 previews per second


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "parastep-studio" / "preview-factors"


def fit_factors(latents: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
    """Least squares fit of targets [P, K] from latents [P, C] with a bias."""
    design = torch.cat([latents, torch.ones(latents.shape[0], 1)], dim=1).double()
    solution = torch.linalg.lstsq(design, targets.double()).solution
    fitted = design @ solution
    low, high = float(fitted.min()), float(fitted.max())
    if high - low < 1e-6:
        high = low + 1.0
    return {"weights": solution[:-1].tolist(), "bias": solution[-1].tolist(), "range": [low, high]}


class PreviewRenderer:
    """Turns x0 into PNG images; fits and caches the linear map on first use."""

    def __init__(
        self, adapter: Any, pipe: Any, request: Any, model_path: Path, fit_in_loop: bool = True
    ) -> None:
        self.adapter, self.pipe, self.request = adapter, pipe, request
        self.model_path = model_path
        self.fit_in_loop = fit_in_loop
        self.factors: dict[str, Any] | None = None
        self.last = 0.0

    def due(self, step: int, total: int) -> bool:
        now = time.monotonic()
        if step == total - 1 or now - self.last >= MIN_INTERVAL_S:
            self.last = now
            return True
        return False

    def render(self, x0: torch.Tensor) -> tuple[list[bytes], list[int]] | None:
        """PNG previews of x0 and their output frame indices; None while no map is known and
        fitting one now would hold up peers."""
        factors = self._factors(x0 if self.fit_in_loop else None)
        if factors is None:
            return None
        images, indices = self.adapter.preview_images(x0.detach())
        images = images.float().cpu()  # [N, C, h, w]
        weights = torch.tensor(factors["weights"], dtype=torch.float32)
        bias = torch.tensor(factors["bias"], dtype=torch.float32)
        low, high = factors["range"]
        mapped = torch.einsum("nchw,ck->nhwk", images, weights) + bias
        mapped = ((mapped - low) / (high - low)).clamp(0, 1)
        return [_png(frame) for frame in mapped.numpy()], indices

    def learn(self, latents: torch.Tensor) -> None:
        """After a job: fits and caches the map from its final latents if none is known yet."""
        self._factors(latents)

    def _factors(self, x0: torch.Tensor | None) -> dict[str, Any] | None:
        """The shipped or cached map; else one fitted on `x0` and cached (None without x0)."""
        if self.factors is None:
            shipped = self.model_path / FACTORS_FILE
            cached = cache_dir() / f"{_key(self.model_path)}.json"
            for file in (shipped, cached):
                if file.is_file():
                    self.factors = json.loads(file.read_text())
                    break
            else:
                if x0 is None:
                    return None
                self.factors = self.fit(x0)
                cached.parent.mkdir(parents=True, exist_ok=True)
                cached.write_text(json.dumps(self.factors))
        return self.factors

    @torch.no_grad()
    def fit(self, x0: torch.Tensor) -> dict[str, Any]:
        """Decodes a small part of x0 and fits the latent -> output map against it."""
        part = self.adapter.preview_part(x0)
        latent_images, _ = self.adapter.preview_images(part)
        target = self.adapter.preview_target(self.pipe, part, self.request)  # [1, K, H, W]
        latent_images = latent_images[:1].float().cpu()
        target = torch.nn.functional.adaptive_avg_pool2d(target.float().cpu(), latent_images.shape[-2:])
        channels = latent_images.shape[1]
        return fit_factors(
            latent_images.permute(0, 2, 3, 1).reshape(-1, channels),
            target.permute(0, 2, 3, 1).reshape(-1, target.shape[1]),
        )


def _key(path: Path) -> str:
    index = path / "model_index.json"
    stamp = index.stat().st_mtime_ns if index.exists() else 0
    return hashlib.sha1(f"{path.resolve()}:{stamp}".encode()).hexdigest()[:16]


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    array = (image * 255 + 0.5).astype(np.uint8)
    if array.shape[-1] == 1:
        array = array[..., 0]
    picture = Image.fromarray(array)
    scale = max(1, min(4, MAX_PREVIEW_SIDE // max(picture.size)))
    if scale > 1:  # latents are tiny: enlarge a little so a window does not have to
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def write_model_factors(folder: Path, image: str | None = None) -> Path:
    """Fits a model's preview map once and stores it in the model folder (used for shipped models).

    The latents come from a short run at the model's default size; SVD needs a conditioning image.
    """
    import tempfile

    from engine.catalog import read_entry
    from engine.loading import load_pipeline
    from engine.models import adapter_for
    from engine.protocol import GenerationRequest

    entry = read_entry(folder)
    adapter = adapter_for(entry)
    pipe = load_pipeline(entry, "cpu", torch.float32)
    with tempfile.TemporaryDirectory() as scratch:
        if adapter.conditioning == "image" and image is None:
            from PIL import Image

            image = str(Path(scratch) / "gradient.png")
            ramp = np.linspace(0, 255, 64, dtype=np.uint8)
            red, green = np.meshgrid(ramp, ramp[::-1])
            Image.fromarray(np.stack([red, green, np.full_like(red, 128)], -1)).save(image)
        request = adapter.resolve(
            GenerationRequest(model=str(folder), prompt="a preview", image=image, steps=4), entry
        )
        kwargs = adapter.pipeline_kwargs(pipe, request, torch.Generator("cpu").manual_seed(0))
        with torch.inference_mode():
            result = pipe(**kwargs)
        latents = result.frames if hasattr(result, "frames") else result.audios
        factors = PreviewRenderer(adapter, pipe, request, folder).fit(latents)
    target = folder / FACTORS_FILE
    target.write_text(json.dumps(factors, indent=1) + "\n")
    return target
