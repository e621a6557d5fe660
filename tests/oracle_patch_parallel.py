"""A single-process reference of patch parallelism (DistriFusion, PCPP) for the strategy tests.

Written independently of engine.strategies: nothing is imported from them. It reuses tests/oracle.py
to record a family's loop and to rebuild it (denoiser input, guidance, scheduler step).

N ranks are simulated in one process with the whole activations of the previous step at hand:

- a warm-up step is the unsplit denoiser (an exact exchange gives exactly that), run with recording
  layers that keep, for every layer that mixes rows, what the next step needs: self-attention
  keys/values of the whole token grid, each convolution's whole input, the GroupNorm statistics of
  every band;
- a later step runs the denoiser N times, once per band, each layer completing its band from the
  previous step's record: self-attention with the whole previous keys/values with this band's rows
  replaced by its fresh ones (PCPP: only this band plus the nearest `portion` percent of each
  neighbour's rows), convolutions with the previous input's rows around the band as halos (zeros
  beyond the image), GroupNorm with the previous global statistics corrected by this band's fresh
  minus previous statistics. The denoiser's first convolution sees the whole current input (every
  rank holds it) and CogVideoX's patch embedding is taken on the whole input. The bands' records are
  joined into the next step's. The band outputs are stacked into the prediction the loop applies.
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from tests import oracle

# ---- the layers that mix rows (this module's own rules) ---------------------------------------------


def row_mixing_layers(denoiser: torch.nn.Module) -> dict[str, list]:
    """name -> module of each layer kind this reference treats."""
    from diffusers.models.attention import BasicTransformerBlock

    found: dict[str, list] = {"attention": [], "conv": [], "norm": [], "embed": [], "grid": []}
    if type(denoiser).__name__ == "CogVideoXTransformer3DModel":
        found["attention"] = [(f"block{i}", b.attn1) for i, b in enumerate(denoiser.transformer_blocks)]
        found["embed"] = [("patch_embed", denoiser.patch_embed)]
        return found
    for name, module in denoiser.named_modules():
        if isinstance(module, torch.nn.Conv2d) and module.kernel_size[0] > 1:
            found["conv"].append((name, module))
        elif isinstance(module, torch.nn.GroupNorm):
            found["norm"].append((name, module))
        elif type(module) is BasicTransformerBlock:  # SVD's temporal blocks are another class
            for attn_name in ("attn1", "attn2"):
                if getattr(module, attn_name) is not None:
                    found["attention"].append((f"{name}.{attn_name}", getattr(module, attn_name)))
        elif type(module).__name__ in ("Transformer2DModel", "TransformerSpatioTemporalModel"):
            found["grid"].append((name, module))
    return found


@dataclass
class Simulation:
    """The simulated ranks' shared view: the previous step's whole activations, and this step's."""

    ranks: int
    portion: int | None  # None: DistriFusion; else PCPP's percent of a neighbour band
    rank: int | None = None  # None: an unsplit (warm-up) step
    whole_input: torch.Tensor | None = None
    grid: tuple[int, int, int] | None = None  # (frames, rows, cols) of the whole token grid
    previous: dict[str, Any] = field(default_factory=dict)
    current: dict[str, Any] = field(default_factory=dict)
    previous_next: dict[str, Any] = field(default_factory=dict)  # being recorded by an unsplit step
    shapes: dict[str, Any] = field(default_factory=dict)  # per layer, what the byte formula needs

    sizes: list[int] = field(default_factory=list)  # the bands' rows in the latent

    def bands(self, whole_rows: int) -> list[tuple[int, int]]:
        """(start, stop) of every band in a layer of `whole_rows` rows (in the latent's proportion)."""
        latent = sum(self.sizes)
        edges = [whole_rows * sum(self.sizes[:k]) // latent for k in range(self.ranks + 1)]
        return list(zip(edges[:-1], edges[1:], strict=True))

    def band(self, whole_rows: int) -> tuple[int, int]:
        return self.bands(whole_rows)[self.rank]

    def whole_rows(self, band_rows: int) -> int:
        """The rows of a layer in which the simulated rank's band has `band_rows`."""
        start, stop = self.band(sum(self.sizes))
        return band_rows * sum(self.sizes) // (stop - start)


# ---- attention --------------------------------------------------------------------------------------------


def _split_heads(attn: Any, x: torch.Tensor) -> torch.Tensor:
    batch, tokens, inner = x.shape
    return x.view(batch, tokens, attn.heads, inner // attn.heads).transpose(1, 2)


def _context(sim: Simulation, name: str, kv: torch.Tensor) -> torch.Tensor:
    """kv [2, B, heads, tokens, d] of this call (whole grid, or the simulated rank's band)."""
    frames, rows, cols = sim.grid
    *lead, _, dim = kv.shape
    if sim.rank is None:
        sim.previous_next[name] = kv
        sim.shapes[name] = ("kv", rows, kv[:, :, :, : frames * cols].numel() * kv.element_size())
        return kv
    start, stop = sim.band(rows)
    fresh = kv.reshape(*lead, frames, stop - start, cols, dim)
    sim.current.setdefault(name, [None] * sim.ranks)[sim.rank] = fresh
    whole = sim.previous[name].reshape(*lead, frames, rows, cols, dim).clone()
    whole[..., start:stop, :, :] = fresh
    if sim.portion is not None:  # the nearest `portion` percent of each neighbour band
        bands = sim.bands(rows)
        above = bands[sim.rank - 1] if sim.rank > 0 else (start, start)
        below = bands[sim.rank + 1] if sim.rank + 1 < sim.ranks else (stop, stop)
        used_above = math.ceil(sim.portion * (above[1] - above[0]) / 100)
        used_below = math.ceil(sim.portion * (below[1] - below[0]) / 100)
        whole = whole[..., start - used_above : stop + used_below, :, :]
    return whole.reshape(*lead, -1, dim)


class CogVideoXAttention:
    def __init__(self, sim: Simulation, name: str) -> None:
        self.sim, self.name = sim, name

    def __call__(
        self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None
    ):
        assert attention_mask is None
        text = encoder_hidden_states.size(1)
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        q, k, v = (_split_heads(attn, proj(joint)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if image_rotary_emb is not None:  # the band's rows of the whole table (sliced by the driver)
            from diffusers.models.embeddings import apply_rotary_emb

            q = torch.cat([q[:, :, :text], apply_rotary_emb(q[:, :, text:], image_rotary_emb)], dim=2)
            k = torch.cat([k[:, :, :text], apply_rotary_emb(k[:, :, text:], image_rotary_emb)], dim=2)
        video = _context(self.sim, self.name, torch.stack([k[:, :, text:], v[:, :, text:]]))
        k = torch.cat([k[:, :, :text], video[0]], dim=2)
        v = torch.cat([v[:, :, :text], video[1]], dim=2)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).flatten(2)
        out = attn.to_out[1](attn.to_out[0](out))
        return out[:, text:], out[:, :text]


class SpatialSelfAttention:
    def __init__(self, sim: Simulation, name: str, stock: Any) -> None:
        self.sim, self.name, self.stock = sim, name, stock

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        if encoder_hidden_states is not None:
            return self.stock(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        q, k, v = (_split_heads(attn, proj(hidden_states)) for proj in (attn.to_q, attn.to_k, attn.to_v))
        context = _context(self.sim, self.name, torch.stack([k, v]))
        out = F.scaled_dot_product_attention(q, context[0], context[1])
        out = attn.to_out[1](attn.to_out[0](out.transpose(1, 2).flatten(2)))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor


# ---- convolutions, norms, embeddings -----------------------------------------------------------------


def conv_forward(sim: Simulation, name: str, module: torch.nn.Conv2d, first: bool):
    stock = module.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if sim.rank is None:
            if not first:
                sim.previous_next[name] = x
                sim.shapes[name] = ("halo", module, x)
            return stock(x)
        if first:  # the whole input is on every rank: its band of the whole output
            whole = sim.whole_input.reshape(-1, *sim.whole_input.shape[-3:])
            start, stop = sim.band(whole.shape[-2])
            return stock(whole)[..., start:stop, :]
        sim.current.setdefault(name, [None] * sim.ranks)[sim.rank] = x
        previous = sim.previous[name]
        start, stop = sim.band(previous.shape[-2])
        top = module.padding[0]
        bottom = max(0, module.kernel_size[0] - module.stride[0] - top)
        padded = F.pad(previous, (0, 0, top, bottom))  # zero rows beyond the image
        above = padded[..., start : start + top, :]
        below = padded[..., stop + top : stop + top + bottom, :]
        return F.conv2d(
            torch.cat([above, x, below], dim=-2),
            module.weight,
            module.bias,
            module.stride,
            (0, module.padding[1]),
            module.dilation,
            module.groups,
        )

    return forward


def band_moments(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[2, B, G] float64: E[x] and E[x^2] per sample and group."""
    grouped = x.reshape(x.shape[0], groups, -1).double()
    return torch.stack([grouped.mean(-1), (grouped * grouped).mean(-1)])


def norm_forward(sim: Simulation, name: str, module: torch.nn.GroupNorm):
    stock = module.forward

    def forward(x: torch.Tensor) -> torch.Tensor:
        if sim.rank is None:
            sim.previous_next[name] = [
                band_moments(x[..., start:stop, :], module.num_groups)
                for start, stop in sim.bands(x.shape[-2])
            ]
            sim.shapes[name] = ("stats", sim.previous_next[name][0])
            return stock(x)
        local = band_moments(x, module.num_groups)
        sim.current.setdefault(name, [None] * sim.ranks)[sim.rank] = local
        previous = sim.previous[name]
        weights = [size / sum(sim.sizes) for size in sim.sizes]  # each band's share of the elements
        moments = sum(w * p for w, p in zip(weights, previous, strict=True)) + local - previous[sim.rank]
        var = moments[1] - moments[0] ** 2
        var = torch.where(var < 0, local[1] - local[0] ** 2, var)
        grouped = x.reshape(x.shape[0], module.num_groups, -1)
        out = (grouped - moments[0][..., None].float()) / torch.sqrt(var[..., None] + module.eps).float()
        shape = (1, -1) + (1,) * (x.ndim - 2)
        return out.reshape(x.shape) * module.weight.view(shape) + module.bias.view(shape)

    return forward


def embed_forward(sim: Simulation, module: Any):
    stock = module.forward

    def forward(text_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        if sim.rank is None:
            return stock(text_embeds, image_embeds)
        embeds = stock(text_embeds, sim.whole_input)
        text = text_embeds.shape[1]
        frames, rows, cols = sim.grid
        start, stop = sim.band(rows)
        video = embeds[:, text:].reshape(embeds.shape[0], frames, rows, cols, -1)[:, :, start:stop]
        return torch.cat([embeds[:, :text], video.flatten(1, 3)], dim=1)

    return forward


# ---- the simulation ----------------------------------------------------------------------------------------


def _join(parts: list, kind: str) -> Any:
    """The bands' records of one layer as the whole layer's: stats stay per band, keys/values and
    convolution inputs are stacked row-wise (keys/values per frame: [..., frames, rows, cols, d])."""
    if kind == "norm":
        return parts
    return torch.cat(parts, dim=-3 if kind == "attention" else -2)


def patch_parallel(
    rec: oracle.Recording, ranks: int, warmup: int, portion: int | None = None
) -> tuple[torch.Tensor, dict]:
    """The final latent under patch parallelism with `ranks` simulated ranks, and the layer shapes
    of an unsplit step (for the byte formula)."""
    denoiser = rec.denoiser
    layers = row_mixing_layers(denoiser)
    sim = Simulation(ranks, portion)
    # Bands of whole units of rows (the patch size; a UNet's total downsampling), as even as
    # possible, the first bands one unit taller.
    if type(denoiser).__name__ == "CogVideoXTransformer3DModel":
        unit = denoiser.config.patch_size
    else:
        unit = 2 ** (len(denoiser.config.down_block_types) - 1)
    kinds = {name: kind for kind in ("attention", "conv", "norm") for name, _ in layers[kind]}
    transformer = type(denoiser).__name__ == "CogVideoXTransformer3DModel"
    first_conv = getattr(denoiser, "conv_in", None)
    stock_processors = {}
    for name, attn in layers["attention"]:
        stock_processors[name] = attn.processor
        attn.set_processor(
            CogVideoXAttention(sim, name) if transformer else SpatialSelfAttention(sim, name, attn.processor)
        )
    for name, module in layers["conv"]:
        module.forward = conv_forward(sim, name, module, module is first_conv)
    for name, module in layers["norm"]:
        module.forward = norm_forward(sim, name, module)
    for _, module in layers["embed"]:
        module.forward = embed_forward(sim, module)
    handles = [
        module.register_forward_pre_hook(lambda m, args: _unet_grid(sim, args[0]))
        for _, module in layers["grid"]
    ]
    stock_forward = denoiser.forward
    signature = inspect.signature(stock_forward)

    def forward(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        name = next(iter(bound.arguments))
        whole = bound.arguments[name]
        sim.whole_input = whole
        units = whole.shape[-2] // unit
        sim.sizes = [unit * (units // ranks + (k < units % ranks)) for k in range(ranks)]
        if transformer:
            patch = denoiser.config.patch_size
            sim.grid = (whole.shape[1], whole.shape[-2] // patch, whole.shape[-1] // patch)
        if sim.rank is None:
            sim.previous_next = {}
            output = stock_forward(*bound.args, **bound.kwargs)
            sim.previous = sim.previous_next
            return output
        bands = []
        rotary = bound.arguments.get("image_rotary_emb")
        for rank in range(ranks):
            sim.rank = rank
            start, stop = sim.band(whole.shape[-2])
            bound.arguments[name] = whole[..., start:stop, :]
            if rotary is not None:  # [frames * rows * cols, d] tables: keep the band's rows
                frames, grid_rows, cols = sim.grid
                start, stop = sim.band(grid_rows)
                bound.arguments["image_rotary_emb"] = tuple(
                    t.reshape(frames, grid_rows, cols, -1)[:, start:stop].reshape(-1, t.shape[-1])
                    for t in rotary
                )
            bands.append(stock_forward(*bound.args, **bound.kwargs)[0])
        sim.previous = {key: _join(parts, kinds[key]) for key, parts in sim.current.items()}
        sim.current = {}
        return (torch.cat(bands, dim=-2),)

    denoiser.forward = forward
    try:
        with oracle.single_thread(), torch.inference_mode():
            scheduler = copy.deepcopy(rec.scheduler)
            x = rec.x0.clone()
            for i in range(rec.steps):
                sim.rank = None if i < warmup else 0
                raw = oracle.denoise(rec, scheduler, x, i)
                x = oracle.advance(rec, scheduler, raw, i, x)
    finally:
        del denoiser.forward
        for name, attn in layers["attention"]:
            attn.set_processor(stock_processors[name])
        for kind in ("conv", "norm", "embed"):
            for _, module in layers[kind]:
                del module.forward
        for handle in handles:
            handle.remove()
    return x, dict(sim.shapes)


def _unet_grid(sim: Simulation, hidden: torch.Tensor) -> None:
    """A UNet transformer's tokens are its input's rows x cols (the whole grid's rows)."""
    rows = hidden.shape[-2] if sim.rank is None else sim.whole_rows(hidden.shape[-2])
    sim.grid = (1, rows, hidden.shape[-1])
