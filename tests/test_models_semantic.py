"""The embedded `shapes` model makes what the prompt asks: the colour, the shape, the motion and the
background.

A handful of generations at the model's default size (9 x 32 x 32, 20 steps) through the engine
(sequential on one CPU worker), read back with resources.shapes_data. The seeds are fixed, so the
clips are the same on every run; scripts/evaluate_shapes.py measures the pass rates over the full grid.
"""

from __future__ import annotations

import numpy as np
import pytest

from engine.protocol import GenerationRequest
from resources import shapes_data as data

pytestmark = pytest.mark.slow

# Every colour, shape, motion and background at least once.
CASES = [
    (data.ClipSpec("red", "circle", "right", "white"), 0),
    (data.ClipSpec("green", "rectangle", "left", "black"), 1),
    (data.ClipSpec("blue", "triangle", "down", "gray"), 2),
    (data.ClipSpec("yellow", "circle", "up", "black"), 3),
    (data.ClipSpec("purple", "rectangle", "growing", "white"), 4),
    (data.ClipSpec("red", "triangle", "shrinking", "gray"), 5),
]


@pytest.fixture(scope="module")
def clips(shared_engine):
    runs = {}
    for spec, seed in CASES:
        request = GenerationRequest(model="shapes", prompt=spec.prompt, seed=seed, devices="cpu:1")
        result = shared_engine.run(shared_engine.plan(request), previews=False)
        result.discard_pending()
        runs[spec] = result.output
    return runs


def test_readers_recover_every_attribute_of_rendered_clips():
    rng = np.random.default_rng(0)
    for spec in data.all_specs()[::7]:
        frames = (data.render(spec, rng) * 255).round().astype(np.uint8)
        assert data.check_clip(frames, spec) == dict.fromkeys(
            ["colour", "shape", "motion", "background"], True
        )


def test_clips_have_the_default_size(clips):
    for frames in clips.values():
        assert frames.shape == (data.FRAMES, data.SIZE, data.SIZE, 3) and frames.dtype == np.uint8


@pytest.mark.parametrize("spec", [spec for spec, _ in CASES], ids=lambda spec: spec.prompt)
def test_background_follows_the_prompt(clips, spec):
    assert data.read_background(clips[spec]) == spec.background


@pytest.mark.parametrize("spec", [spec for spec, _ in CASES], ids=lambda spec: spec.prompt)
def test_colour_follows_the_prompt(clips, spec):
    assert data.read_colour(clips[spec]) == spec.colour


@pytest.mark.parametrize("spec", [spec for spec, _ in CASES], ids=lambda spec: spec.prompt)
def test_motion_follows_the_prompt(clips, spec):
    assert data.read_motion(clips[spec]) == spec.motion


@pytest.mark.parametrize("spec", [spec for spec, _ in CASES], ids=lambda spec: spec.prompt)
def test_shape_follows_the_prompt(clips, spec):
    assert data.read_shape(clips[spec]) == spec.shape


def test_the_prompt_changes_the_clip(clips, shared_engine):
    """Case 2's seed with case 1's prompt: the text, not the seed, sets the colour."""
    request = GenerationRequest(model="shapes", prompt=CASES[1][0].prompt, seed=CASES[2][1], devices="cpu:1")
    result = shared_engine.run(shared_engine.plan(request), previews=False)
    result.discard_pending()
    assert data.read_colour(clips[CASES[2][0]]) == "blue"  # case 2's prompt at its own seed
    assert data.read_colour(result.output) == "green"
