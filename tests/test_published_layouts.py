"""Checkpoints laid out as published load and run, where the published index and today's
libraries disagree."""

from __future__ import annotations

import json
import shutil

from engine.engine import Engine
from engine.protocol import GenerationRequest
from tests.conftest import REPO


def test_audioldm2_with_the_published_gpt2model_language_model_runs(tmp_path):
    # cvssp/audioldm2-large's model_index.json names GPT2Model, which cannot generate with
    # transformers 5; the loader substitutes GPT2LMHeadModel with the same weights.
    model = tmp_path / "audioldm2-as-published"
    shutil.copytree(REPO / "resources" / "models" / "tiny-audioldm2", model)
    index = json.loads((model / "model_index.json").read_text())
    index["language_model"] = ["transformers", "GPT2Model"]
    (model / "model_index.json").write_text(json.dumps(index))
    with Engine() as engine:
        plan = engine.plan(GenerationRequest(model=str(model), prompt="a tone", steps=2, seconds=0.5))
        result = engine.run(plan, previews=False)
        result.discard_pending()
    assert result.output.ndim == 1 and result.output.size > 0
