"""The layers of a denoiser that mix rows, made to work on one band of rows (patch parallelism).

Three kinds of layers see beyond their own rows, and each gets its missing part from the other
ranks through an exchange object (sync in warm-up steps, stale after; see patch_comm):

- self-attention: keys/values of the other bands (`StaleKV`, all-gathered; PCPP swaps in a
  partial neighbour context). Installed as attention processors (`set_processor`), one for the
  joint text+video attention of CogVideoX and one for the UNets' spatial self-attention;
- convolutions with a kernel taller than one row: halo rows from the neighbouring bands
  (`HaloRows`, point-to-point); the denoiser's first convolution takes them from the whole input
  every rank holds, so it exchanges nothing;
- GroupNorm: statistics of the whole tensor (`StaleStats`, all-gathered; after warm-up the stale
  global statistics corrected by this band's fresh minus stale statistics, as DistriFusion does).

Convolutions and GroupNorms are wrapped with diffusers `ModelHook`s. Tokens are ordered frame,
then row, then column; a `grid` (frames, rows, columns) says how, so that bands are joined row-wise
in every frame and the joined keys/values are in the unsplit model's order. Bands may differ in
height by one unit of rows (patch_comm); every rank knows every band's rows from the units.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.hooks import ModelHook

from engine.errors import UserError
from engine.strategies.patch_comm import BandRun, Pending

# ---- token rows -----------------------------------------------------------------------------------


def token_rows(tokens: torch.Tensor, frames: int, cols: int, start: int, stop: int) -> torch.Tensor:
    """Rows start..stop of every frame of `tokens` [..., frames*rows*cols, d]."""
    *lead, count, dim = tokens.shape
    grid = tokens.reshape(*lead, frames, count // (frames * cols), cols, dim)
    return grid[..., start:stop, :, :].reshape(*lead, -1, dim)


# ---- exchanges --------------------------------------------------------------------------------------


class Exchange:
    """One layer's exchange: the data of the previous step, and the transfer in flight, if any."""

    def __init__(self, run: BandRun, index: int) -> None:
        self.run = run
        self.tag = 2 * index  # point-to-point tags: tag and tag + 1, unique per layer
        self._pending: Pending | None = None
        run.layers.append(self)

    def finish_pending(self) -> None:
        """Waits for the transfer started at the previous step and keeps what it brought."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self.arrived(pending.result())

    def arrived(self, incoming: Any) -> None:
        raise NotImplementedError


class StaleKV(Exchange):
    """DistriFusion's self-attention context: every band's keys/values, this rank's fresh and the
    others' from the previous step, refreshed by an all-gather started now and waited for when
    this layer runs at the next step. In warm-up steps every band's are fresh.

    Keys/values travel as a grid [2, B, heads, frames, rows, cols, d] and are joined row-wise in
    every frame, so the context is in the unsplit model's token order."""

    def __init__(self, run: BandRun, index: int) -> None:
        super().__init__(run, index)
        self.stale: list[torch.Tensor] | None = None  # every rank's band keys/values, last step

    def __call__(self, kv: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """kv [2, B, heads, band tokens, d] (keys, values) -> the context's keys/values."""
        frames, rows, cols = grid
        *lead, _, dim = kv.shape
        kv = kv.reshape(*lead, frames, rows, cols, dim)
        if self.run.sync:
            parts = self.gather(kv).result()
            self.remember(parts)
            parts[self.run.rank] = kv
            context = torch.cat(parts, dim=-3)
        else:
            self.finish_pending()
            context = self.stale_context(kv)
            if self.run.post:
                self._pending = self.start(kv)
        return context.reshape(*lead, -1, dim)

    def gather(self, kv: torch.Tensor) -> Pending:
        return self.run.comm.all_gather(kv, rows=self.run.band_rows(kv.shape[-3]), dim=-3)

    def remember(self, parts: list[torch.Tensor]) -> None:
        self.stale = parts

    def arrived(self, incoming: Any) -> None:
        self.stale = incoming

    def stale_context(self, kv: torch.Tensor) -> torch.Tensor:
        parts = list(self.stale)
        parts[self.run.rank] = kv
        return torch.cat(parts, dim=-3)

    def start(self, kv: torch.Tensor) -> Pending:
        return self.gather(kv)


class HaloRows(Exchange):
    """The rows a convolution reads above and below its band: `top` rows from the rank above and
    `bottom` from the rank below (zeros at the image's edges, as the convolution's own padding)."""

    def __init__(self, run: BandRun, index: int, top: int, bottom: int) -> None:
        super().__init__(run, index)
        self.top, self.bottom = top, bottom
        self.halos: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = x.shape[-2]
        first = x[..., : self.bottom, :]  # what the rank above reads below its band
        last = x[..., rows - self.top :, :]  # what the rank below reads above its band
        if self.run.sync:
            above, below = self.run.comm.swap_edges(first, last, self.tag).result()
            self.halos = (above, below)
        else:
            self.finish_pending()
            above, below = self.halos
            if self.run.post:
                self._pending = self.run.comm.swap_edges(first, last, self.tag)
        if above is None:  # the image's top edge (or no rows above are read)
            above = x.new_zeros(*x.shape[:-2], self.top, x.shape[-1])
        if below is None:
            below = x.new_zeros(*x.shape[:-2], self.bottom, x.shape[-1])
        return above, below

    def arrived(self, incoming: Any) -> None:
        self.halos = incoming


class StaleStats(Exchange):
    """GroupNorm statistics (E[x], E[x^2] per sample and group) of the whole tensor. Warm-up: the
    bands' fresh statistics weighted by their sizes. After: the previous step's global statistics
    plus this band's fresh minus its previous statistics (DistriFusion's corrected asynchronous
    GroupNorm)."""

    def __init__(self, run: BandRun, index: int) -> None:
        super().__init__(run, index)
        self.stale: list[torch.Tensor] | None = None

    def __call__(self, local: torch.Tensor) -> torch.Tensor:
        if self.run.sync:
            self.stale = self.run.comm.all_gather(local).result()
            return self.whole(self.stale)
        self.finish_pending()
        moments = self.whole(self.stale) + (local - self.stale[self.run.rank])
        if self.run.post:
            self._pending = self.run.comm.all_gather(local)
        return moments

    def whole(self, parts: list[torch.Tensor]) -> torch.Tensor:
        total = sum(self.run.units)
        return sum(part * (units / total) for part, units in zip(parts, self.run.units, strict=True))

    def arrived(self, incoming: Any) -> None:
        self.stale = incoming


# ---- attention processors ---------------------------------------------------------------------------


class BandCogVideoXProcessor:
    """CogVideoX's joint text+video attention (as CogVideoXAttnProcessor2_0) on one band of video
    tokens: text tokens are replicated on every rank; the video keys/values are completed with the
    other bands' by `context`."""

    def __init__(self, run: BandRun, context: StaleKV) -> None:
        self.run, self.context = run, context

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: Any = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if attention_mask is not None:
            raise UserError(
                "Patch parallelism cannot split an attention mask.", "Use another strategy for this model."
            )
        text = encoder_hidden_states.size(1)
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        batch = joint.shape[0]
        query, key, value = (_heads(attn, proj(joint), batch) for proj in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:  # already sliced to this band's tokens by the strategy
            from diffusers.models.embeddings import apply_rotary_emb

            query[:, :, text:] = apply_rotary_emb(query[:, :, text:], image_rotary_emb)
            if not attn.is_cross_attention:
                key[:, :, text:] = apply_rotary_emb(key[:, :, text:], image_rotary_emb)
        video = self.context(torch.stack([key[:, :, text:], value[:, :, text:]]), self.run.grid)
        key = torch.cat([key[:, :, :text], video[0]], dim=2)
        value = torch.cat([value[:, :, :text], video[1]], dim=2)
        out = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * query.shape[-1])
        out = attn.to_out[1](attn.to_out[0](out))
        encoder_out, out = out.split([text, out.size(1) - text], dim=1)
        return out, encoder_out


class BandSelfAttnProcessor:
    """A UNet transformer block's spatial self-attention (as AttnProcessor2_0) on one band of
    tokens, keys/values completed by `context`; calls with encoder states (cross-attention) stay
    local and go to the layer's own processor."""

    def __init__(self, run: BandRun, context: StaleKV, original: Any) -> None:
        self.run, self.context, self.original = run, context, original

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            extra = {"temb": temb} if temb is not None else {}
            return self.original(
                attn, hidden_states, *args, encoder_hidden_states=encoder_hidden_states,
                attention_mask=attention_mask, **extra, **kwargs,
            )  # fmt: skip
        if attention_mask is not None or hidden_states.ndim != 3:
            raise UserError(
                "Patch parallelism supports spatial self-attention on token sequences without a mask only.",
                "Use another strategy for this model.",
            )
        residual = hidden_states
        batch = hidden_states.shape[0]
        query, key, value = (
            _heads(attn, proj(hidden_states), batch) for proj in (attn.to_q, attn.to_k, attn.to_v)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        context = self.context(torch.stack([key, value]), self.run.grid)
        out = F.scaled_dot_product_attention(query, context[0], context[1], dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * query.shape[-1]).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _heads(attn: Any, projected: torch.Tensor, batch: int) -> torch.Tensor:
    """[B, tokens, heads*d] -> [B, heads, tokens, d]."""
    return projected.view(batch, -1, attn.heads, projected.shape[-1] // attn.heads).transpose(1, 2)


# ---- module hooks -------------------------------------------------------------------------------------


def conv_halo(module: torch.nn.Conv2d) -> tuple[int, int]:
    """(rows above, rows below) a band's input that its output rows read, for a band that starts
    and ends on multiples of the stride: the padding above, the rest of the kernel below."""
    kernel = (module.kernel_size[0] - 1) * module.dilation[0] + 1
    top = module.padding[0]
    return top, max(0, kernel - module.stride[0] - top)


class HaloConv(ModelHook):
    """A Conv2d on a band: its input padded with halo rows, then convolved with no row padding.
    `halo` None marks the denoiser's first convolution, whose halo comes from the whole input."""

    def __init__(self, run: BandRun, halo: HaloRows | None) -> None:
        super().__init__()
        self.run, self.halo = run, halo

    def new_forward(self, module: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
        if self.halo is not None:
            above, below = self.halo(x)
        else:
            above, below = self._from_whole_input(module, x)
        padded = torch.cat([above, x, below], dim=-2)
        out = F.conv2d(
            padded,
            module.weight,
            module.bias,
            module.stride,
            (0, module.padding[1]),
            module.dilation,
            module.groups,
        )
        if x.shape[-2] % module.stride[0] or out.shape[-2] != x.shape[-2] // module.stride[0]:
            raise UserError(
                f"A band of {x.shape[-2]} rows does not divide by a stride-{module.stride[0]} convolution.",
                "Use a height (or audio length) that divides into equal bands at every resolution.",
            )
        return out

    def _from_whole_input(
        self, module: torch.nn.Conv2d, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        top, bottom = conv_halo(module)
        whole = self.run.full_input.reshape(-1, *self.run.full_input.shape[-3:])
        if whole.shape[:-2] != x.shape[:-2] or whole.shape[-1] != x.shape[-1]:
            raise UserError(
                f"{type(module).__name__} does not read the denoiser's input directly.",
                "Use another strategy for this model.",
            )
        rows, start = x.shape[-2], self.run.band_start(x.shape[-2])
        padded = F.pad(whole, (0, 0, top, bottom))  # zero rows beyond the image, as the padding
        above = padded[..., start : start + top, :]
        below = padded[..., start + top + rows : start + top + rows + bottom, :]
        return above, below


class CorrectedGroupNorm(ModelHook):
    """GroupNorm on a band with the statistics of the whole tensor (see StaleStats). Moments are
    taken in float32 per band and combined in float64, so the warm-up matches the unsplit norm;
    half-precision inputs are normalised in float32, as GroupNorm's own kernels do."""

    def __init__(self, run: BandRun, stats: StaleStats) -> None:
        super().__init__()
        self.run, self.stats = run, stats

    def new_forward(self, module: torch.nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        batch, channels = x.shape[:2]
        grouped = x.reshape(batch, module.num_groups, -1).float()  # as GroupNorm's own kernels
        var, mean = torch.var_mean(grouped, dim=-1, unbiased=False)
        mean, var = mean.double(), var.double()
        moments = self.stats(torch.stack([mean, var + mean * mean]))
        global_mean = moments[0]
        global_var = moments[1] - global_mean * global_mean
        global_var = torch.where(global_var < 0, var, global_var)  # a correction can overshoot
        scale = torch.rsqrt(global_var + module.eps)
        out = (grouped - global_mean[..., None].float()) * scale[..., None].float()
        out = out.reshape(x.shape).to(x.dtype)
        if module.affine:
            shape = (1, channels) + (1,) * (x.ndim - 2)
            out = out * module.weight.view(shape) + module.bias.view(shape)
        return out


class BandPatchEmbed(ModelHook):
    """CogVideoX's patch embedding: the whole input is embedded (a per-patch projection plus the
    positional embedding of the whole grid, both cheap) and the band's video tokens are kept."""

    def __init__(self, run: BandRun) -> None:
        super().__init__()
        self.run = run

    def new_forward(self, module: Any, text_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        embeds = self.fn_ref.original_forward(text_embeds, self.run.full_input)
        text = text_embeds.shape[1]
        frames, rows, cols = self.run.grid
        start = self.run.band_start(rows)
        band = token_rows(embeds[:, text:], frames, cols, start, start + rows)
        return torch.cat([embeds[:, :text], band], dim=1)
