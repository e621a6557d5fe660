"""Preview maps: a model without shipped factors gets one fitted without holding up peer ranks."""

from __future__ import annotations

import shutil

from engine.engine import Engine
from engine.previews import FACTORS_FILE, cache_dir
from engine.protocol import GenerationRequest, PreviewEvent
from tests.conftest import REPO


def test_a_map_is_fitted_after_a_multi_rank_job_and_used_by_the_next(tmp_path):
    model = tmp_path / "no-factors"
    shutil.copytree(REPO / "resources" / "models" / "tiny-cogvideox", model)
    (model / FACTORS_FILE).unlink()
    request = GenerationRequest(
        model=str(model),
        prompt="x",
        steps=4,
        frames=9,
        height=32,
        width=48,
        strategy="parastep",
        devices="cpu:2",
    )
    with Engine() as engine:
        plan = engine.plan(request)
        first: list = []
        engine.run(plan, first.append).discard_pending()
        # No decode inside the loop on rank 0 while rank 1 waits: this run shows no previews,
        # and leaves a fitted map in the cache.
        assert not [e for e in first if isinstance(e, PreviewEvent)]
        assert list(cache_dir().glob("*.json"))
        second: list = []
        engine.run(plan, second.append).discard_pending()
    previews = [e for e in second if isinstance(e, PreviewEvent)]
    assert previews and previews[-1].step == 3
