"""GPU checks: run with `./dev test -m gpu` on a machine with CUDA GPUs (NCCL between them)."""

from __future__ import annotations

import numpy as np
import pytest

from engine.engine import Engine
from engine.protocol import GenerationRequest

pytestmark = pytest.mark.gpu

REQUEST = dict(model="tiny-cogvideox", prompt="a red circle", frames=9, height=64, width=96, steps=8, seed=1)


def gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.fixture(scope="module")
def engine():
    if gpus() == 0:
        pytest.fail("the gpu marker was selected on a machine without a CUDA GPU")
    with Engine(dtype="fp32") as engine:
        yield engine


def test_parastep_on_one_gpu_equals_sequential(engine):
    seq = engine.run(engine.plan(GenerationRequest(**REQUEST, devices="cuda:0")), previews=False)
    para = engine.run(
        engine.plan(GenerationRequest(**REQUEST, strategy="parastep", devices="cuda:0")), previews=False
    )
    assert np.array_equal(seq.latents, para.latents)


def test_parastep_across_gpus_matches_batchstep(engine):
    if gpus() < 2:
        pytest.skip("needs two GPUs for NCCL")
    options = {"warmup": 2}
    para = engine.run(
        engine.plan(
            GenerationRequest(**REQUEST, strategy="parastep", devices="cuda:0,1", strategy_options=options)
        ),
        previews=False,
    )
    batch = engine.run(
        engine.plan(
            GenerationRequest(**REQUEST, strategy="batchstep", devices="cuda:0", strategy_options=options)
        ),
        previews=False,
    )
    np.testing.assert_allclose(para.latents, batch.latents, rtol=1e-3, atol=1e-4)
    assert para.ranks[1]["bytes_sent"] > 0
