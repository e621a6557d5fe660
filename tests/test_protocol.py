import pytest

from engine.errors import UserError
from engine.protocol import PROTOCOL_VERSION, GenerationRequest


def test_request_round_trips():
    request = GenerationRequest(
        model="tiny-cogvideox", prompt="a", seed=3, steps=4, strategy_options={"warmup": 1}
    )
    assert GenerationRequest.from_dict(request.to_dict()) == request


@pytest.mark.parametrize(
    ("change", "word"),
    [
        ({"seed": "3"}, "seed"),
        ({"steps": True}, "steps"),
        ({"bogus": 1}, "bogus"),
        ({"version": PROTOCOL_VERSION + 1}, "newer"),
    ],
)
def test_bad_request_fields_are_named(change, word):
    data = {**GenerationRequest(model="m").to_dict(), **change}
    with pytest.raises(UserError, match=word):
        GenerationRequest.from_dict(data)
