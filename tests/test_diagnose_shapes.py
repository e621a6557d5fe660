"""The shapes diagnosis (scripts/diagnose_shapes.py) on the shipped model: its loop starts where it is told
and follows the prompt, so the figures docs/models.md quotes from it measure the model, not the script."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from resources import EMBEDDED_MODELS_DIR  # noqa: E402
from resources import shapes_data as data  # noqa: E402
from scripts import diagnose_shapes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def model():
    return diagnose_shapes.Denoiser(EMBEDDED_MODELS_DIR / "shapes")


def test_its_schedule_is_the_models_default(model):
    assert len(model.timesteps) == model.studio["steps"]
    assert int(model.timesteps[0]) == 999 and int(model.timesteps[-1]) < 100


def test_a_rendered_triangle_survives_the_round_trip_and_the_last_step(model):
    spec = data.ClipSpec("red", "triangle", "right", "white")
    latents = model.encode(data.render(spec, np.random.default_rng(0))[None])
    assert data.read_shape(model.decode(latents)[0]) == "triangle"
    last = model.denoise(latents, [spec.prompt], len(model.timesteps) - 1, lambda t: 1.0)
    assert all(data.check_clip(model.decode(last)[0], spec).values())


def test_from_noise_the_prompt_sets_the_clip(model):
    specs = [data.ClipSpec("green", "circle", "up", "black"), data.ClipSpec("blue", "circle", "left", "gray")]
    shape = model.encode(data.render(specs[0], np.random.default_rng(0))[None]).shape[1:]
    latents = torch.zeros(len(specs), *shape)  # only their shape counts when starting from noise
    clips = model.decode(model.denoise(latents, [s.prompt for s in specs], 0, lambda t: 6.0, seed=3))
    for clip, spec in zip(clips, specs, strict=True):
        assert data.read_colour(clip) == spec.colour and data.read_background(clip) == spec.background
