"""What the family adapters hand the stock pipelines."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from engine.models.cogvideox import CogVideoXAdapter
from engine.protocol import GenerationRequest


@pytest.mark.parametrize("text_tokens", [16, 226])
def test_cogvideox_pads_the_prompt_to_the_transformers_text_length(text_tokens):
    """The pipeline pads to max_sequence_length (226 unless told); a transformer trained on fewer text
    tokens (the embedded shapes: 16) must get exactly its own count, or it sees padding it never saw."""
    pipe = SimpleNamespace(
        transformer=SimpleNamespace(config=SimpleNamespace(max_text_seq_length=text_tokens))
    )
    request = GenerationRequest(model="shapes", prompt="a red circle", frames=9, height=32, width=32)
    kwargs = CogVideoXAdapter().pipeline_kwargs(pipe, request, generator=None)
    assert kwargs["max_sequence_length"] == text_tokens
