"""What a model family adapter does: request -> pipeline arguments, validation, decode, previews.

One adapter per pipeline family. Adapters run in the engine (validation, before any worker is
started, from config files only) and in the workers (arguments, decode, look-ahead inputs).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from engine.catalog import ModelEntry
from engine.errors import UserError
from engine.protocol import MAX_SIDE, MAX_STEPS, GenerationRequest, check_values


class FamilyAdapter:
    family = "base"
    modality = "video"  # video | audio
    conditioning = "text"  # text | image (the request needs --image)
    # Published defaults: steps and ParaStep warm-up (the warm-up scales with fewer steps).
    published_steps = 50
    published_warmup = 5
    # Request defaults for checkpoints that carry no studio.json.
    defaults: dict[str, Any] = {}
    # The denoiser class this family's loop calls (component "transformer" or "unet"); strategies that
    # cut the denoiser into blocks or bands find the family's declarations below through it.
    denoiser_class = ""
    denoiser_component = "transformer"
    # FasterCache's latent layout for the denoiser's input ("" : the loop does not fit FasterCache).
    faster_cache_layout = ""
    # The loop's shape: False, one denoiser call per step on a batch holding both guidance halves
    # (CogVideoX, SVD, AudioLDM2); True, one call per guidance pass (Wan, HunyuanVideo 1.5, LTX-2).
    separate_guidance_calls = False
    largest_side = MAX_SIDE  # height/width; families whose memory grows past use set less

    # ---- engine side: validation --------------------------------------------------------------
    def resolve(
        self, request: GenerationRequest, entry: ModelEntry, inputs: bool = True
    ) -> GenerationRequest:
        """The request with every default filled in, checked against the family's constraints.

        `inputs` False skips the input files (for `decode` of kept latents, whose image may be gone).
        """
        defaults = {**self.defaults, **entry.defaults}
        filled = {
            name: defaults[name]
            for name in self.request_fields()
            if getattr(request, name) is None and name in defaults
        }
        resolved = dataclasses.replace(request, **filled)
        if self.modality == "video":  # the family's limit first: it names the model's sizes
            for name in ("height", "width"):
                check_side(name, getattr(resolved, name), self.max_side(entry), defaults.get(name))
        check_values(resolved)  # the command line builds requests without from_dict
        _check_range("steps", resolved.steps, 1, MAX_STEPS)
        if resolved.guidance_scale is None:
            raise UserError(
                "'guidance_scale' is None; it must be from 0 to 100.",
                "Set --guidance-scale.",
                "guidance_scale",
            )
        self.check(resolved, entry)
        if inputs:
            self.check_inputs(resolved)
        return resolved

    def max_side(self, entry: ModelEntry) -> int:
        """The largest height or width this family makes; past it a job only runs out of memory."""
        return min(self.largest_side, MAX_SIDE)

    def check_inputs(self, request: GenerationRequest) -> None:
        """Checks the files a request reads (an image): not needed to decode kept latents."""

    def request_fields(self) -> tuple[str, ...]:
        common = ("steps", "guidance_scale")
        if self.modality == "audio":
            return (*common, "seconds")
        return (*common, "frames", "height", "width", "fps")

    def check(self, request: GenerationRequest, entry: ModelEntry) -> None:
        """Family constraints; raises UserError naming the field and the fix."""

    def switches_denoiser(self, entry: ModelEntry) -> bool:
        """Whether the loop changes denoiser during the run (Wan 2.2 A14B's two experts)."""
        return False

    def per_token_timesteps(self, entry: ModelEntry) -> bool:
        """Whether the loop gives every latent token its own timestep (Wan 2.2 TI2V)."""
        return False

    def default_warmup(self, steps: int) -> int:
        """The published warm-up, scaled down proportionally for fewer steps."""
        if steps >= self.published_steps:
            return self.published_warmup
        return max(1, round(self.published_warmup * steps / self.published_steps))

    # ---- worker side --------------------------------------------------------------------------
    def component_overrides(self, entry: ModelEntry, dtype: Any) -> dict[str, Any]:
        """Components to load in place of what model_index.json names (published checkpoints whose
        index no longer matches the installed libraries)."""
        return {}

    def pipeline_kwargs(self, pipe: Any, request: GenerationRequest, generator: Any) -> dict[str, Any]:
        raise NotImplementedError

    def decode(self, pipe: Any, latents: Any, request: GenerationRequest) -> np.ndarray:
        """Video: uint8 [F, H, W, 3]. Audio: float32 [S] (mono) or [S, C] (e.g. stereo) in [-1, 1]."""
        raise NotImplementedError

    def output_rate(self, pipe: Any, request: GenerationRequest) -> float:
        """Frames per second for video, sample rate for audio."""
        return float(request.fps)

    def uses_guidance(self, request: GenerationRequest) -> bool:
        return request.guidance_scale is not None and request.guidance_scale > 1.0

    def denoiser_input(self, scheduler: Any, latent: Any, timestep: Any, current_input: Any) -> Any:
        """The denoiser input the loop would build from `latent` at `timestep`.

        CFG doubling and `scale_model_input` as in every supported loop; extra conditioning channels
        that the loop concatenates (SVD's image latents) are taken from the current step's input.
        """
        import torch

        doubled = current_input.shape[0] == 2 * latent.shape[0]
        sample = torch.cat([latent] * 2) if doubled else latent
        sample = scheduler.scale_model_input(sample, timestep).to(current_input.dtype)
        if sample.shape != current_input.shape:
            dim = next(d for d in range(sample.ndim) if sample.shape[d] != current_input.shape[d])
            extra = current_input.narrow(dim, sample.shape[dim], current_input.shape[dim] - sample.shape[dim])
            sample = torch.cat([sample, extra], dim=dim)
        return sample

    def copy_scheduler(self, scheduler: Any) -> Any:
        """A private copy of the loop's scheduler (BatchStep's look-ahead steps run on copies)."""
        import copy

        return copy.deepcopy(scheduler)

    def preview_part(self, x0: Any) -> Any:
        """A small part of x0 that decodes alone, to fit the preview map on: video, the first latent
        frame along dim 1 (as in [B, F, C, H, W] latents); audio, the first sample."""
        return x0[:1] if self.modality == "audio" else x0[:, :1]

    def preview_images(self, x0: Any) -> tuple[Any, list[int]]:
        """x0 as a stack of latent images [N, C, h, w] and the output frame index of each."""
        raise NotImplementedError

    # ---- the denoiser's structure, for strategies that cut it (None: they refuse the family) -----
    def denoiser_blocks(self, denoiser: Any) -> list[tuple[str, Any]] | None:
        """AsyncDiff's cut points: the blocks in call order, each called once per forward, with only
        bookkeeping between them."""
        return None

    def block_count(self, config: dict[str, Any]) -> int | None:
        """How many blocks `denoiser_blocks` finds, from the denoiser's config alone."""
        return None

    def latent_rows(self, entry: ModelEntry, request: GenerationRequest) -> LatentRows | None:
        """Patch parallelism's geometry: the latent rows a request makes and the multiple a band must
        be of to stay whole through every downsampling or patching."""
        return None

    def preview_target(self, pipe: Any, x0: Any, request: GenerationRequest) -> Any:
        """What the preview of x0 (one frame's worth, `preview_images` of it giving one image) should
        look like, [1, K, H, W] with K 3 (RGB) or 1 (grey); the preview fit pools it to the latent
        image's size. Video: the decoded first frame."""
        import torch

        frames = torch.from_numpy(self.decode(pipe, x0, request)[:1]).float() / 255.0
        return frames.permute(0, 3, 1, 2)  # [1, 3, H, W]

    def describe(self) -> dict[str, Any]:
        """What the window shows and computes with for a model of this family (the catalog reply)."""
        return {
            "family": self.family,
            "modality": self.modality,
            "conditioning": self.conditioning,
            "published_steps": self.published_steps,
            "published_warmup": self.published_warmup,
        }


@dataclasses.dataclass(frozen=True)
class LatentRows:
    """The latent rows a request makes, the multiple a band must be of, and the request field that
    sets them ("height" or "seconds", `per_row` of its units per latent row), for the fix."""

    rows: int
    unit: int
    what: str
    per_row: float


def causal_video_preview(frames: Any, temporal: int) -> tuple[Any, list[int]]:
    """Latent frames [F, C, h, w] as preview images and the output frame each shows: a causal video
    VAE maps latent frame 0 to frame 0 and latent frame f to frames t*f-t+1 .. t*f (t = `temporal`)."""
    return frames, [0] + [temporal * f for f in range(1, frames.shape[0])]


def transformer_blocks(denoiser: Any) -> list[tuple[str, Any]]:
    """A DiT's blocks: its top-level `transformer_blocks`."""
    return [(f"transformer_blocks.{i}", b) for i, b in enumerate(denoiser.transformer_blocks)]


def unet_blocks(denoiser: Any) -> list[tuple[str, Any]]:
    """A UNet's blocks: conv_in, the down blocks, the mid block, the up blocks."""
    blocks = [("conv_in", denoiser.conv_in)]
    blocks += [(f"down_blocks.{i}", b) for i, b in enumerate(denoiser.down_blocks)]
    if denoiser.mid_block is not None:
        blocks.append(("mid_block", denoiser.mid_block))
    return blocks + [(f"up_blocks.{i}", b) for i, b in enumerate(denoiser.up_blocks)]


def unet_block_count(config: dict[str, Any], has_mid: bool) -> int:
    return 1 + len(config["down_block_types"]) + int(has_mid) + len(config["up_block_types"])


MIN_IMAGE_SIDE = 16  # pixels; smaller images carry nothing to animate once resized to the clip
MAX_IMAGE_PIXELS = 8192 * 8192  # a header may claim anything; PIL itself refuses only past 179M


def load_image(path: str | None, model: str) -> Any:
    """The conditioning image of an image-to-video `model` as RGB, or a clear error (checked from the
    header before anything is decoded)."""
    from PIL import Image, UnidentifiedImageError

    if not path:
        raise UserError(f"{model} needs a conditioning image.", "Pass --image FILE (PNG or JPEG).", "image")
    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"Image '{file}' does not exist.", "Check the path given to --image.", "image")
    try:
        with Image.open(file) as image:
            width, height = image.size  # from the header: nothing decoded yet
            if width * height > MAX_IMAGE_PIXELS:
                raise Image.DecompressionBombError(f"{width}x{height} pixels")
            if min(width, height) < MIN_IMAGE_SIDE:
                raise UserError(
                    f"Image '{file}' is {width}x{height} pixels; it must be at least "
                    f"{MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}.",
                    "Give a larger image (ideally the clip's size, e.g. 1024x576).",
                )
            return image.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise UserError(
            f"Image '{file}' is too large to open ({_size_of(exc)}; at most {MAX_IMAGE_PIXELS} pixels).",
            "Give a smaller image (ideally the clip's size, e.g. 1024x576).",
        ) from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UserError(f"Image '{file}' cannot be read ({exc}).", "Give a PNG or JPEG file.") from None


def _size_of(exc: Exception) -> str:
    """PIL's bomb message names the pixel count; keep just that part."""
    text = str(exc)
    return text.split(" exceeds ")[0].replace("Image size (", "").rstrip(")") if " exceeds " in text else text


def _check_range(name: str, value: Any, low: float, high: float) -> None:
    if value is None or not low <= value <= high:
        fixed = None if value is None else min(max(value, low), high)
        message = f"'{name}' is {value}; it must be from {low} to {high}."
        raise UserError(message, f"Set --{name} in range.", name, fixed)


def check_side(name: str, value: int | None, largest: int, default: Any) -> None:
    if value is not None and value > largest:
        hint = f" (its default is {default})" if default else ""
        raise UserError(
            f"{name} {value} is larger than this model makes (at most {largest}).",
            f"Use --{name} {largest} or less{hint}.",
            field=name,
            value=largest,
        )


def check_multiple(name: str, value: int | None, factor: int, family: str) -> None:
    if value is None or value < factor or value % factor:
        raise UserError(
            f"{name} {value} is not a positive multiple of {factor}, which {family} needs.",
            f"Use a {name} such as {max(factor, (value or 0) // factor * factor)}.",
            field=name,
            value=max(factor, (value or 0) // factor * factor),
        )


def check_video_size(request: GenerationRequest, family: str, period: int, spatial: int, fps: int) -> None:
    """The usual video constraints: `period`k+1 frames (causal VAEs keep the first frame apart),
    height and width multiples of `spatial` (VAE compression x patch size), at least 1 fps."""
    frames = request.frames
    if frames is None or frames < 1 or (frames - 1) % period:
        good = max(1, ((frames or 1) - 1) // period * period + 1)
        raise UserError(
            f"{family} needs a frame count of {period}k+1 (1, {period + 1}, {2 * period + 1}, ...), "
            f"not {frames}.",
            f"Use --frames {good} or {good + period}.",
            field="frames",
            value=good,
        )
    check_multiple("height", request.height, spatial, f"this {family} model")
    check_multiple("width", request.width, spatial, f"this {family} model")
    if not request.fps or request.fps < 1:
        raise UserError(f"fps {request.fps} must be at least 1.", f"Use --fps {fps}.", "fps", fps)


def to_uint8_frames(video: Any) -> np.ndarray:
    """[F, C, H, W] or [F, H, W, C] float in [0, 1] -> uint8 [F, H, W, 3]."""
    array = video.float().cpu().numpy() if hasattr(video, "cpu") else np.asarray(video)
    if array.shape[-1] not in (1, 3) and array.shape[1] in (1, 3):
        array = array.transpose(0, 2, 3, 1)
    return (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
