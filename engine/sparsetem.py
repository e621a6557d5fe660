"""SparseTem: difference computation in a video VAE decoder's convolutions (issue 22, first step).

A convolution is linear, so for every frame t and a reference frame r of the same layer

    conv(x_t) = conv(x_r) + conv_nobias(x_t - x_r)

The reference is computed dense; the difference term is computed only on the output tiles whose
input difference (over the tile plus its kernel halo) exceeds a per-layer threshold: the active
tiles are gathered from the padded difference, convolved in one batched call, and scattered back.
Skipped tiles keep the reference output. With threshold 0 only tiles whose difference is exactly
zero are skipped, so the result equals the dense decode up to float rounding.

Hooks (diffusers ``ModelHook``) go on the stock decoder's ``nn.Conv2d`` / ``nn.Conv3d`` layers;
nothing of the decoder is copied. Everything but the convolutions (activations, up-sampling,
spatial norms) stays dense. ``GroupNorm`` is either left alone ("dense": statistics recomputed per
call) or frozen to the statistics of the reference ("frozen"), which makes it a fixed per-channel
affine map, so static regions keep an exactly zero difference into the next convolution.

What a "frame" is:

* ``nn.Conv2d`` (SVD's temporal decoder, the up-samplers of CogVideoX / Wan): frames are the
  batch rows, as the decoders fold time into the batch for their 2D layers.
* ``nn.Conv3d`` with temporal stride 1 (CogVideoX's causal convs, whose inputs arrive already
  padded in time; SVD's (3,1,1) temporal convs): output frame t is a conv2d of the window
  ``x[:, :, t:t+kt]`` with the time taps folded into channels, so the window difference against
  the reference window is exact as well.
* Modules that pad inside their own ``forward`` (Wan's ``WanCausalConv3d``) are left dense: the
  hook would have to repeat the padding code.

The reference is row 0 of each call ("call"), or the first row the layer ever saw since the last
``reset()`` ("session"; CogVideoX decodes two latent frames per decoder call, so per-call references
bound the saving, while a session reference makes every later chunk sparse).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers.hooks import HookRegistry, ModelHook
from torch import nn

HOOK_NAME = "sparsetem"


@dataclass
class SparseTemConfig:
    """Knobs of the difference computation. Thresholds are relative to the reference's RMS."""

    threshold: float = (
        0.0  # initial per-layer threshold (max |diff| over a tile's receptive field / RMS(ref))
    )
    tile: int = 8  # output tile side in pixels
    adapt: bool = False  # adapt each layer's threshold online towards the active-fraction band
    band: tuple[float, float] = (0.1, 0.3)  # target active fraction (low, high) when adapting
    step: float = 1.5  # multiplicative threshold step when adapting
    max_threshold: float = 0.05  # error bound: a skipped input difference never exceeds this (relative)
    min_threshold: float = 1e-4  # floor when adapting down (a zero threshold cannot grow)
    dense_above: float = 0.6  # above this active fraction the layer runs dense (exact; gather costs more)
    groupnorm: Literal["dense", "frozen"] = "dense"
    reference: Literal["call", "session"] = "call"


@dataclass
class LayerStats:
    """Per-layer counters: tiles seen / computed, rows computed sparse, dense fall-backs."""

    name: str
    threshold: float
    calls: int = 0
    tiles: int = 0
    active_tiles: int = 0
    sparse_rows: int = 0
    dense_fallbacks: int = 0
    history: list[float] = field(default_factory=list)  # active fraction of each call

    @property
    def active_fraction(self) -> float:
        return self.active_tiles / self.tiles if self.tiles else 1.0


def _eligible_conv(module: nn.Module) -> bool:
    """Convs whose forward is the stock one (or only chunks it, as CogVideoXSafeConv3d does)."""
    if isinstance(module, nn.Conv2d):
        ok_forward = type(module).forward is nn.Conv2d.forward
        spatial = (module.stride, module.dilation)
    elif isinstance(module, nn.Conv3d):
        # CogVideoXSafeConv3d only splits > 2 GB inputs in time; the diff path replaces that split
        ok_forward = (
            type(module).forward is nn.Conv3d.forward or type(module).__name__ == "CogVideoXSafeConv3d"
        )
        spatial = (module.stride, module.dilation)
    else:
        return False
    return (
        ok_forward
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
        and all(s == 1 for s in spatial[0])
        and all(d == 1 for d in spatial[1])
    )


class _ConvDiffHook(ModelHook):
    def __init__(self, owner: SparseTem, stats: LayerStats) -> None:
        super().__init__()
        self.owner = owner
        self.stats = stats
        self.ref: tuple[torch.Tensor, torch.Tensor] | None = None  # session reference (input row, output row)

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.ref = None
        return module

    def new_forward(self, module: nn.Module, x: torch.Tensor) -> torch.Tensor:
        cfg = self.owner.config
        if isinstance(module, nn.Conv3d):
            kt, kh, kw = module.kernel_size
            pt, ph, pw = module.padding
            if pt:
                x = F.pad(x, (0, 0, 0, 0, pt, pt))
            b, c, t = x.shape[:3]
            t_out = t - kt + 1
            # output frame j sees the window x[:, :, j:j+kt]: fold the time taps into channels
            rows = x.unfold(2, kt, 1).permute(0, 2, 1, 5, 3, 4).reshape(b * t_out, c * kt, *x.shape[3:])
            weight = module.weight.reshape(module.out_channels, c * kt, kh, kw)
        else:
            kh, kw = module.kernel_size
            ph, pw = module.padding
            rows, weight = x, module.weight
        out = self._rows(rows, weight, module.bias, kh, kw, ph, pw, cfg)
        if isinstance(module, nn.Conv3d):
            out = out.reshape(b, t_out, *out.shape[1:]).permute(0, 2, 1, 3, 4)
        return out

    def _rows(
        self,
        rows: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        kh: int,
        kw: int,
        ph: int,
        pw: int,
        cfg: SparseTemConfig,
    ) -> torch.Tensor:
        st = self.stats
        st.calls += 1
        ref = self.ref if cfg.reference == "session" else None
        if ref is not None and (ref[0].shape[1:] != rows.shape[1:] or ref[0].dtype != rows.dtype):
            ref = None
        head: torch.Tensor | None = None
        if ref is None:
            ref_in = rows[:1]
            ref_out = F.conv2d(ref_in, weight, bias, padding=(ph, pw))
            if cfg.reference == "session":
                self.ref = (ref_in, ref_out)
            head, rows = ref_out, rows[1:]
        else:
            ref_in, ref_out = ref
        if rows.shape[0] == 0:
            return head

        n, _, h, w = rows.shape
        ho, wo = h + 2 * ph - kh + 1, w + 2 * pw - kw + 1
        ts = cfg.tile
        nty, ntx = math.ceil(ho / ts), math.ceil(wo / ts)
        # zero padding is linear: pad(x) - pad(ref) == pad(x - ref); padded to whole tiles at the
        # bottom / right, and the difference written straight into the padded buffer (one pass)
        diff = rows.new_empty(n, rows.shape[1], nty * ts + kh - 1, ntx * ts + kw - 1)
        diff[:, :, :ph].zero_(), diff[:, :, ph + h :].zero_()  # only the borders need zeros
        diff[:, :, :, :pw].zero_(), diff[:, :, :, pw + w :].zero_()
        torch.sub(rows, ref_in, out=diff[:, :, ph : ph + h, pw : pw + w])
        # max |diff| over channels; amax and amin beat abs().amax() and aminmax() here on a CPU
        mag = torch.maximum(diff.amax(dim=1, keepdim=True), diff.amin(dim=1, keepdim=True).neg_())
        tile_max = F.max_pool2d(mag, kernel_size=(ts + kh - 1, ts + kw - 1), stride=ts)[:, 0]
        scale = ref_in.pow(2).mean().sqrt().item() + 1e-12
        active = tile_max > st.threshold * scale
        n_active = int(active.sum())
        frac = n_active / active.numel()
        st.tiles += active.numel()
        st.history.append(frac)
        if cfg.adapt:
            self._adapt(frac, cfg)

        if frac > cfg.dense_above:
            st.active_tiles += active.numel()
            st.dense_fallbacks += 1
            body = F.conv2d(rows, weight, bias, padding=(ph, pw))
        else:
            st.active_tiles += n_active
            st.sparse_rows += n
            o = weight.shape[0]
            # every row starts as the reference output; active tiles get their difference added in place
            grid = (
                ref_out
                if (ho, wo) == (nty * ts, ntx * ts)
                else F.pad(ref_out, (0, ntx * ts - wo, 0, nty * ts - ho))
            )
            grid = grid.repeat(n, 1, 1, 1)  # a copy even for n == 1: the reference must stay intact
            if n_active:
                idx_n, idx_y, idx_x = active.nonzero(as_tuple=True)
                patches = diff.unfold(2, ts + kh - 1, ts).unfold(3, ts + kw - 1, ts)[idx_n, :, idx_y, idx_x]
                tiles = grid.view(n, o, nty, ts, ntx, ts).permute(0, 2, 4, 1, 3, 5)
                tiles.index_put_((idx_n, idx_y, idx_x), F.conv2d(patches, weight), accumulate=True)
            body = grid[:, :, :ho, :wo]
        return body if head is None else torch.cat([head, body], dim=0)

    def _adapt(self, frac: float, cfg: SparseTemConfig) -> None:
        st = self.stats
        lo, hi = cfg.band
        if frac > hi:
            st.threshold = min(max(st.threshold, cfg.min_threshold) * cfg.step, cfg.max_threshold)
        elif frac < lo:
            st.threshold = max(st.threshold / cfg.step, cfg.min_threshold)


class _FrozenGroupNormHook(ModelHook):
    """GroupNorm with the statistics of the reference (first sample of the call, or of the session)."""

    def __init__(self, owner: SparseTem) -> None:
        super().__init__()
        self.owner = owner
        self.stats: tuple[torch.Tensor, torch.Tensor] | None = None

    def reset_state(self, module: nn.Module) -> nn.Module:
        self.stats = None
        return module

    def new_forward(self, module: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        g = module.num_groups
        grouped = x.reshape(x.shape[0], g, -1)
        stats = self.stats if self.owner.config.reference == "session" else None
        if stats is None or stats[0].dtype != x.dtype:
            var, mean = torch.var_mean(grouped[:1], dim=-1, unbiased=False, keepdim=True)
            stats = (mean, torch.rsqrt(var + module.eps))
            self.stats = stats
        y = ((grouped - stats[0]) * stats[1]).reshape(x.shape)
        if module.affine:
            shape = (1, -1) + (1,) * (x.dim() - 2)
            y = y * module.weight.reshape(shape) + module.bias.reshape(shape)
        return y


class SparseTem:
    """Installs the difference hooks on a decoder; ``remove()`` restores it exactly."""

    def __init__(self, decoder: nn.Module, config: SparseTemConfig | None = None) -> None:
        self.decoder = decoder
        self.config = config or SparseTemConfig()
        self.layers: dict[str, LayerStats] = {}
        self.skipped: list[str] = []  # convs left dense (own padding in forward, strides, groups)
        self._hooked: list[tuple[nn.Module, bool, bool]] = []  # module, had a registry, had a forward attr

    def install(self) -> SparseTem:
        if self._hooked:
            return self
        for name, module in self.decoder.named_modules():
            hook: ModelHook | None = None
            if isinstance(module, (nn.Conv2d, nn.Conv3d)):
                if _eligible_conv(module):
                    stats = LayerStats(name, self.config.threshold)
                    self.layers[name] = stats
                    hook = _ConvDiffHook(self, stats)
                else:
                    self.skipped.append(name)
            elif isinstance(module, nn.GroupNorm) and self.config.groupnorm == "frozen":
                hook = _FrozenGroupNormHook(self)
            if hook is None:
                continue
            had_registry = hasattr(module, "_diffusers_hook")
            had_forward = "forward" in module.__dict__
            HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, HOOK_NAME)
            self._hooked.append((module, had_registry, had_forward))
        return self

    def remove(self) -> None:
        for module, had_registry, had_forward in self._hooked:
            registry = module._diffusers_hook
            registry.remove_hook(HOOK_NAME, recurse=False)
            # the registry leaves an instance `forward` and itself behind; drop what we added
            if not had_forward and not registry.hooks:
                module.__dict__.pop("forward", None)
            if not had_registry and not registry.hooks:
                del module._diffusers_hook
        self._hooked = []
        self._invalidate_caches()

    def _invalidate_caches(self) -> None:
        for module in self.decoder.modules():
            if hasattr(module, "_diffusers_hook"):
                module._diffusers_hook._child_registries_cache = None

    def reset(self) -> None:
        """Forget session references and frozen statistics (call between clips)."""
        for module, _, _ in self._hooked:
            hook = module._diffusers_hook.get_hook(HOOK_NAME)
            if hook is not None:
                hook.reset_state(module)

    def active_fraction(self) -> float:
        """Tile-weighted active fraction over all hooked layers (dense fall-backs count as 1)."""
        tiles = sum(s.tiles for s in self.layers.values())
        return sum(s.active_tiles for s in self.layers.values()) / tiles if tiles else 1.0

    def summary(self) -> dict[str, Any]:
        return {
            "active_fraction": self.active_fraction(),
            "layers": {
                n: {
                    "active_fraction": s.active_fraction,
                    "threshold": s.threshold,
                    "calls": s.calls,
                    "dense_fallbacks": s.dense_fallbacks,
                }
                for n, s in self.layers.items()
            },
            "skipped": list(self.skipped),
        }

    def __enter__(self) -> SparseTem:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.remove()


def sparse_decoder(vae: nn.Module, config: SparseTemConfig | None = None) -> SparseTem:
    """A SparseTem, not installed yet, on ``vae.decoder``: ``with sparse_decoder(vae, cfg): vae.decode(z)``"""
    return SparseTem(vae.decoder, config)
