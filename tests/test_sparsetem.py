"""SparseTem (engine/sparsetem.py): exact at threshold 0, sparser and smoothly worse above, clean removal."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    AutoencoderKLLTXVideo,
    AutoencoderKLTemporalDecoder,
    AutoencoderKLWan,
)

from engine.sparsetem import SparseTem, SparseTemConfig, sparse_decoder

MODELS = Path(__file__).resolve().parent.parent / "resources" / "models"

# (model folder, VAE class, latent shape) at reduced size; static latents with one moving patch so
# that the difference path has zero and non-zero tiles
CASES = {
    "shapes": (AutoencoderKLCogVideoX, (1, 8, 3, 8, 8)),
    "tiny-cogvideox": (AutoencoderKLCogVideoX, None),
    "tiny-svd": (AutoencoderKLTemporalDecoder, None),
    "tiny-wan": (AutoencoderKLWan, None),
    "tiny-ltx": (AutoencoderKLLTXVideo, None),
}

# where a static clip gives static tiles; elsewhere the decoders stay exact but nothing is skipped
SPARSE = {"shapes", "tiny-cogvideox"}
NOT_SPARSE = {
    # the (3,1,1) temporal convs zero-pad time, so frame 0's window differs from every other frame's
    # at every pixel: downstream of the first temporal block no tile is static
    "tiny-svd": "zero-padded temporal convs",
    # WanCausalConv3d pads inside its own forward, so only the up-samplers' Conv2d are hooked, and
    # the decoder runs one latent frame per call (nothing in the batch to difference against)
    "tiny-wan": "causal 3D convs left dense, one frame per decoder call",
    # measured: every tile of every hooked layer differs from the reference even on this clip;
    # not diagnosed yet (the time up-sampling / causal padding of its decoder are the suspects)
    "tiny-ltx": "every tile differs, not diagnosed",
}


def _vae(name: str) -> torch.nn.Module:
    cls, _ = CASES[name]
    return cls.from_pretrained(str(MODELS / name / "vae")).eval()


def _latents(vae: torch.nn.Module, name: str, frames: int = 3, size: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    c = vae.config.get("latent_channels") or vae.config.z_dim  # Wan names it z_dim
    if isinstance(vae, AutoencoderKLTemporalDecoder):  # frames in the batch dimension
        z = torch.randn(1, c, size, size, generator=g).repeat(frames, 1, 1, 1)
        z[1:, :, :2, :2] += torch.randn(frames - 1, c, 2, 2, generator=g)
        return z
    z = torch.randn(1, c, 1, size, size, generator=g).repeat(1, 1, frames, 1, 1)
    z[:, :, 1:, :2, :2] += torch.randn(1, c, frames - 1, 2, 2, generator=g)
    return z


def _decode(vae: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if isinstance(vae, AutoencoderKLTemporalDecoder):
            return vae.decode(z, num_frames=z.shape[0]).sample
        return vae.decode(z).sample


@pytest.fixture(scope="module", params=list(CASES))
def model(request: pytest.FixtureRequest) -> tuple[str, torch.nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    vae = _vae(request.param)
    z = _latents(vae, request.param)
    return request.param, vae, z, _decode(vae, z)


@pytest.mark.parametrize("groupnorm", ["dense", "frozen"])
@pytest.mark.parametrize("reference", ["call", "session"])
def test_threshold_zero_equals_dense(model, reference: str, groupnorm: str) -> None:
    name, vae, z, dense = model
    # frozen GroupNorm changes the function where frames sit in the batch (SVD's per-frame norms)
    cfg = SparseTemConfig(threshold=0.0, reference=reference, groupnorm=groupnorm, dense_above=1.0)
    with sparse_decoder(vae, cfg) as st:
        sparse = _decode(vae, z)
    assert st.layers, f"{name}: no convolution was hooked"
    frozen_changes = groupnorm == "frozen" and isinstance(vae, AutoencoderKLTemporalDecoder)
    if frozen_changes:
        assert torch.isfinite(sparse).all()
        return
    torch.testing.assert_close(sparse, dense, rtol=0, atol=1e-4)
    if name in SPARSE:
        assert st.active_fraction() < 1.0, "the static part of the clip should skip tiles"


def test_positive_threshold_is_sparser_and_degrades_smoothly(model) -> None:
    name, vae, z, dense = model
    if name not in SPARSE:
        pytest.skip(f"{name}: no static tiles at threshold 0 ({NOT_SPARSE[name]}; see docs/sparsetem.md)")
    fractions, errors = [], []
    for thr in (0.0, 0.02, 0.1, 0.5):
        with sparse_decoder(vae, SparseTemConfig(threshold=thr, dense_above=1.0)) as st:
            out = _decode(vae, z)
        fractions.append(st.active_fraction())
        errors.append((out - dense).abs().max().item())
    assert fractions[0] < 1.0 and fractions[-1] < fractions[0], (name, fractions)
    assert all(a >= b - 1e-9 for a, b in zip(fractions, fractions[1:], strict=False)), (name, fractions)
    assert errors[0] < 1e-4 and errors[-1] < 2.0, (name, errors)  # bounded, no blow-up
    assert all(e1 <= e2 + 1e-3 for e1, e2 in zip(errors, errors[1:], strict=False)), (name, errors)


def test_adaptive_thresholds_move_into_band() -> None:
    vae = _vae("shapes")
    z = _latents(vae, "shapes", frames=5)
    cfg = SparseTemConfig(threshold=0.0, adapt=True, band=(0.0, 0.2), max_threshold=0.2)
    with sparse_decoder(vae, cfg) as st:
        for _ in range(6):
            _decode(vae, z)
    raised = [s.threshold for s in st.layers.values() if s.threshold > 0]
    assert raised and max(raised) <= 0.2 + 1e-12


def test_removal_leaves_the_vae_bit_identical(model) -> None:
    name, vae, z, dense = model
    before = {n: (type(m), dict(m.__dict__)) for n, m in vae.named_modules()}
    state = {k: v.clone() for k, v in vae.state_dict().items()}
    st = SparseTem(
        vae.decoder, SparseTemConfig(threshold=0.1, groupnorm="frozen", reference="session")
    ).install()
    _decode(vae, z)
    st.remove()
    after = {n: (type(m), dict(m.__dict__)) for n, m in vae.named_modules()}
    assert before.keys() == after.keys()
    for n in before:
        assert before[n][0] is after[n][0]
        assert before[n][1].keys() == after[n][1].keys(), (name, n)
    for k, v in vae.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert torch.equal(_decode(vae, z), dense)
