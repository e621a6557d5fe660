"""DistriFusion (Li et al. 2024): patch parallelism with stale activations.

The latent is split into N bands of rows (the rows of every video frame; for AudioLDM2 the mel
latent's time axis, which is its row axis [B, C, time, mel bins]). Bands are whole units of rows
(CogVideoX's patch size; 2 ** the UNet's downsamplings, so they stay whole at every resolution),
as even as possible; sizes that do not split so are refused at plan time. Rank k runs the whole
denoiser on band k; the layers that read other rows get them from the other ranks (patch_layers):
self-attention keys/values (all-gathered), halo rows of 3x3 convolutions (from the two neighbours),
GroupNorm statistics (all-gathered); cross-attention and per-token layers need nothing.

Warm-up steps exchange synchronously, so they equal the unsplit model. After warm-up each layer
uses the previous step's activations of the other bands and starts this step's exchange without
waiting (async all-gather / send-receive), to be waited for when the layer runs at the next step:
the transfer overlaps compute. GroupNorm corrects the stale global statistics with this band's
fresh minus stale statistics. At the end of every call the output bands are all-gathered, so every
rank holds the whole prediction and runs the scheduler step on the whole latent itself.

CogVideoX: the video tokens of a band are the patch rows of every frame (bands split at patch
granularity), text tokens are replicated on every rank, rotary embeddings are sliced to the band.
The UNets (SVD, AudioLDM2): convolution halos with stride handling, corrected GroupNorm and stale
keys/values for the spatial self-attention; SVD's temporal layers act per pixel and stay local.
"""

from __future__ import annotations

import inspect
import itertools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import HookRegistry

from engine.errors import JobCancelled, UserError
from engine.models import ADAPTERS, FamilyAdapter, adapter_for
from engine.strategies.base import Strategy, StrategyOption, denoiser_of, split_output
from engine.strategies.patch_comm import BandComm, BandRun, split_units
from engine.strategies.patch_layers import (
    BandCogVideoXProcessor,
    BandPatchEmbed,
    BandSelfAttnProcessor,
    CorrectedGroupNorm,
    HaloConv,
    HaloRows,
    StaleKV,
    StaleStats,
    conv_halo,
    token_rows,
)

LAYER_HOOK = "patch_parallel_layer"


class DistriFusionStrategy(Strategy):
    name = "distrifusion"
    description = (
        "Patch parallelism: each device denoises a band of rows with the other bands' activations "
        "from the previous step (DistriFusion)."
    )
    options = (
        StrategyOption(
            "warmup", "Warm-up steps with an exact, synchronous exchange before stale activations.", None, 0
        ),
    )
    min_devices = 1
    max_devices = None
    keeps_denoiser_whole = False
    one_call_per_step = True  # the bands exchange the one call's activations
    width_from = "ranks"
    warmup_parallel = True  # warm-up steps are split into bands too, with a synchronous exchange

    @classmethod
    def unavailable_reason(cls, entry: Any) -> str | None:
        adapter = adapter_for(entry)
        if type(adapter).latent_rows is FamilyAdapter.latent_rows:
            families = [
                name for name, a in ADAPTERS.items() if a.latent_rows is not FamilyAdapter.latent_rows
            ]
            return (
                "patch parallelism needs to know which layers of the denoiser mix rows; its model families "
                f"({', '.join(families)}) declare them, not '{entry.family}'."
            )
        component, expected = adapter.denoiser_component, adapter.denoiser_class
        config = entry.path / component / "config.json"
        if config.is_file():
            import json

            found = json.loads(config.read_text()).get("_class_name")
            if found != expected:
                return f"its {component} is a {found}, and patch parallelism supports {expected} only."
        return None

    @classmethod
    def check_model_request(cls, request: Any, entry: Any, ranks: int) -> None:
        """Refuses sizes that do not split into `ranks` equal bands at every resolution."""
        if ranks > 1:
            band_geometry(entry, request).check(ranks)

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.warmup = int(ctx.options.get("warmup", 0) or 0)
        self.run = BandRun(ctx.rank, ctx.world_size, BandComm(self))
        self._undo: list[Callable[[], None]] = []
        self._unit = 1  # the bands split at multiples of this many latent rows
        self._patch: tuple[int, int | None] | None = None  # CogVideoX (patch_size, patch_size_t)

    def kv_context(self, index: int) -> StaleKV:
        """The self-attention context of one layer (PCPP swaps in its own)."""
        return StaleKV(self.run, index)

    # ---- installation ---------------------------------------------------------------------------------
    def install(self, pipe: Any) -> None:
        super().install(pipe)
        if self.ctx.world_size > 1:
            try:
                self._install_layers(denoiser_of(pipe))
            except BaseException:
                self.uninstall()
                raise

    def uninstall(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()
        self.run.layers.clear()
        self.run.full_input = None
        super().uninstall()

    def _install_layers(self, denoiser: torch.nn.Module) -> None:
        # A family that declares its latent rows says which component its denoiser is (plan time).
        component = getattr(self.ctx.adapter, "denoiser_component", "")
        if component == "transformer":
            self._install_transformer(denoiser)
        elif component == "unet":
            self._install_unet(denoiser)
        else:
            kind = type(denoiser).__name__
            raise UserError(f"Patch parallelism does not support a {kind}.", "Use another strategy.")

    def _install_transformer(self, model: torch.nn.Module) -> None:
        self._patch = (model.config.patch_size, model.config.patch_size_t)
        self._unit = model.config.patch_size
        self._hook(model.patch_embed, BandPatchEmbed(self.run))
        for index, block in enumerate(model.transformer_blocks):
            self._set_processor(block.attn1, BandCogVideoXProcessor(self.run, self.kv_context(index)))

    def _install_unet(self, unet: torch.nn.Module) -> None:
        from diffusers.models.attention import BasicTransformerBlock, TemporalBasicTransformerBlock
        from diffusers.models.attention_processor import Attention
        from diffusers.models.downsampling import Downsample2D
        from diffusers.models.transformers.transformer_2d import Transformer2DModel
        from diffusers.models.transformers.transformer_temporal import TransformerSpatioTemporalModel

        downsamplers = sum(1 for block in unet.down_blocks if getattr(block, "downsamplers", None))
        self._unit = 2**downsamplers
        blocks = [
            m for m in unet.modules() if isinstance(m, BasicTransformerBlock | TemporalBasicTransformerBlock)
        ]
        in_blocks = {id(m) for block in blocks for m in block.modules()}
        index = itertools.count()
        for name, module in unet.named_modules():
            _refuse_unsupported(name, module, in_blocks, Attention, Downsample2D)
            if isinstance(module, torch.nn.Conv2d) and any(conv_halo(module)):
                halo = None if module is unet.conv_in else HaloRows(self.run, next(index), *conv_halo(module))
                self._hook(module, HaloConv(self.run, halo))
            elif isinstance(module, torch.nn.GroupNorm):
                self._hook(module, CorrectedGroupNorm(self.run, StaleStats(self.run, next(index))))
        for block in blocks:
            if isinstance(block, TemporalBasicTransformerBlock):
                continue  # attends across frames at each pixel: local to the band
            for attn in (block.attn1, block.attn2):
                if attn is not None:  # self-attention calls use the band context, cross-attention stays local
                    processor = BandSelfAttnProcessor(self.run, self.kv_context(next(index)), attn.processor)
                    self._set_processor(attn, processor)
        for model in unet.modules():
            if isinstance(model, Transformer2DModel | TransformerSpatioTemporalModel):
                handle = model.register_forward_pre_hook(self._record_grid, with_kwargs=True)
                self._undo.append(handle.remove)

    def _record_grid(self, module: Any, args: tuple, kwargs: dict) -> None:
        """A UNet transformer model's input [B, C, rows, cols]: its tokens are rows x cols."""
        hidden = args[0] if args else kwargs["hidden_states"]
        self.run.grid = (1, hidden.shape[-2], hidden.shape[-1])

    def _hook(self, module: torch.nn.Module, hook: Any) -> None:
        registry = HookRegistry.check_if_exists_or_initialize(module)
        registry.register_hook(hook, LAYER_HOOK)
        self._undo.append(lambda: registry.remove_hook(LAYER_HOOK, recurse=False))

    def _set_processor(self, attn: Any, processor: Any) -> None:
        original = attn.processor
        attn.set_processor(processor)
        self._undo.append(lambda: attn.set_processor(original))

    # ---- the loop ------------------------------------------------------------------------------------
    def denoise(self, forward: Callable, args: tuple, kwargs: dict) -> Any:
        world, rank, run = self.ctx.world_size, self.ctx.rank, self.run
        if world == 1:
            return self.compute(forward, args, kwargs)
        run.sync = self.step < self.warmup
        run.post = not run.sync and self.step < self.ctx.total_steps - 1
        bound = inspect.signature(forward).bind(*args, **kwargs)
        name = next(iter(bound.arguments))
        sample = bound.arguments[name]
        rows = sample.shape[-2]
        if rows % self._unit or rows // self._unit < world:  # checked at plan time already
            raise UserError(
                f"{rows} latent rows do not split into {world} bands of multiples of {self._unit}.",
                "Pick a height (or audio length) whose latent rows divide evenly, or fewer devices.",
            )
        run.units = split_units(rows // self._unit, world)
        sizes = [units * self._unit for units in run.units]
        run.full_input = sample
        bound.arguments[name] = sample.narrow(-2, sum(sizes[:rank]), sizes[rank])
        if self._patch is not None:
            self._band_tokens(bound, sample, sizes[rank])
        output = self._timed(forward, bound)
        run.full_input = None
        prediction, rebuild = split_output(output)
        parts = run.comm.all_gather(prediction, rows=sizes).result()
        return rebuild(torch.cat(parts, dim=-2))

    def _band_tokens(self, bound: inspect.BoundArguments, sample: torch.Tensor, band: int) -> None:
        """CogVideoX: the token grid of the band, and its rotary embeddings."""
        patch, patch_t = self._patch
        frames = sample.shape[1] // patch_t if patch_t else sample.shape[1]
        cols, rows = sample.shape[-1] // patch, band // patch
        self.run.grid = (frames, rows, cols)
        rotary = bound.arguments.get("image_rotary_emb")
        if rotary is not None:
            start = self.run.band_start(rows)
            bound.arguments["image_rotary_emb"] = tuple(
                token_rows(table, frames, cols, start, start + rows) for table in rotary
            )

    def _timed(self, forward: Callable, bound: inspect.BoundArguments) -> Any:
        """The band's forward; compute time excludes the waits for exchanges inside it."""
        self._sync_device()
        start, waited = time.perf_counter(), self.counters.comm_wait_s
        output = forward(*bound.args, **bound.kwargs)
        self._sync_device()
        elapsed = time.perf_counter() - start - (self.counters.comm_wait_s - waited)
        self.counters.denoiser_calls += 1
        self.counters.compute_s += elapsed
        self._step_compute += elapsed
        self._action = "compute"
        return output

    def after_step(self, latent: torch.Tensor) -> None:
        if self.ctx.world_size == 1:
            super().after_step(latent)
            return
        if self.step == self.ctx.total_steps - 1:
            return  # nothing is in flight: the last step starts no exchange
        try:
            self.agree_on_cancel()
        except JobCancelled:
            self.run.drain()  # every rank started the same exchanges; finish them before stopping
            raise


def _refuse_unsupported(
    name: str, module: Any, in_blocks: set[int], attention: type, downsample: type
) -> None:
    """Layers that mix rows in a way the band hooks do not cover."""
    problem = None
    if isinstance(module, torch.nn.Conv2d) and (
        module.padding_mode != "zeros" or isinstance(module.padding, str)
    ):
        problem = "a convolution with non-zero or implicit padding"
    elif isinstance(module, torch.nn.Conv3d) and (module.kernel_size[-2] > 1 or module.padding[-2]):
        problem = "a 3D convolution across rows"
    elif isinstance(module, torch.nn.Conv1d):
        problem = "a 1D convolution"
    elif isinstance(module, downsample) and module.use_conv and module.padding == 0:
        problem = "a downsampler that pads the bottom row itself"
    elif isinstance(module, attention) and id(module) not in in_blocks:
        problem = "an attention layer outside the transformer blocks"
    if problem:
        raise UserError(
            f"Patch parallelism cannot split this model: '{name}' is {problem}.", "Use another strategy."
        )


# ---- geometry (plan time, from config files) ---------------------------------------------------------
@dataclass(frozen=True)
class BandGeometry:
    """The latent rows a request makes, the multiple a band must be of, and how to fix a bad size."""

    rows: int
    unit: int
    what: str  # "height" | "seconds"
    per_row: float  # request units (pixels or seconds) per latent row

    def check(self, ranks: int) -> None:
        """Bands are whole units of rows, at least one per rank."""
        if self.rows % self.unit == 0 and self.rows // self.unit >= ranks:
            return
        good = max(ranks, math.ceil(self.rows / self.unit)) * self.unit
        if self.what == "height":
            value, axis = f"--height {int(good * self.per_row)}", "rows"
        else:
            value, axis = f"--seconds {good * self.per_row:.3f}", "time frames"
        if self.rows % self.unit:
            problem = f"not a multiple of {self.unit}, so bands cannot stay whole through every downsampling"
            fix = f"Use {value}."
        else:
            problem = f"fewer than {ranks} bands of {self.unit} rows"
            fix = f"Use {value}, or at most {self.rows // self.unit} devices."
        raise UserError(f"The latent has {self.rows} {axis}: {problem}.", fix)


def band_geometry(entry: Any, request: Any) -> BandGeometry:
    rows = adapter_for(entry).latent_rows(entry, request)
    return BandGeometry(rows.rows, rows.unit, rows.what, rows.per_row)


# ---- traffic ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerShape:
    """One exchanging layer at full size, as the byte formula needs it.

    kv: `rows` token rows of `row_bytes` keys+values each (every frame, column, sample and head);
    halo: a convolution input of `rows` rows of `row_bytes`, reading `top`/`bottom` rows beyond a band;
    stats: a GroupNorm whose statistics tensor is `nbytes`;
    output: the denoiser's output, `rows` rows of `row_bytes`.
    """

    kind: str
    rows: int = 0
    row_bytes: int = 0
    top: int = 0
    bottom: int = 0
    nbytes: int = 0


def edge_rows(portion: int, band_rows: int) -> int:
    """PCPP: rows of a neighbour band of `band_rows` rows that condition a band (at least one for
    any portion > 0)."""
    return min(band_rows, -(-portion * band_rows // 100))


def expected_traffic(
    total_steps: int,
    warmup: int,
    units: list[int],
    layers: list[LayerShape],
    output: LayerShape,
    portion: int | None = None,
) -> list[dict[str, int]]:
    """Bytes each rank sends and receives in one job, from the algorithm and the layer shapes.

    `units`: the bands' units of rows (split_units), one entry per rank; in a layer of R rows band k
    has R * units[k] / sum(units) rows. An all-gather sends the band padded to the tallest band to
    each of the N-1 others and receives as much from each.
    Every layer exchanges at each warm-up step (synchronously) and at each later step but the last
    (started there, used at the next step): T - 1 exchanges, or T when every step is warm-up.
    - kv (DistriFusion): an all-gather of the band's keys/values.
      kv (PCPP, `portion` given): warm-up as DistriFusion; later, edge_rows(portion, own rows) rows
      to each neighbour, and edge_rows(portion, neighbour rows) rows from each.
    - halo: `bottom` rows to the rank above and `top` rows to the rank below; received: `top` rows
      from above and `bottom` from below (the denoiser's first convolution exchanges nothing and is
      not listed).
    - stats: an all-gather of the statistics.
    Every step all-gathers the output bands, and after every step but the last rank 0 broadcasts a
    one-byte cancel flag (one copy per receiver).
    """
    n, t, total = len(units), total_steps, sum(units)
    traffic = [{"bytes_sent": 0, "bytes_received": 0} for _ in range(n)]
    if n == 1:
        return traffic
    warm = min(warmup, t)
    exchanges = t if warm >= t else t - 1
    later = exchanges - warm

    def bands(layer: LayerShape) -> list[int]:
        return [layer.rows * u // total for u in units]

    def gathered(layer: LayerShape) -> int:
        return (n - 1) * max(bands(layer)) * layer.row_bytes

    for rank, counts in enumerate(traffic):
        neighbours = [k for k in (rank - 1, rank + 1) if 0 <= k < n]
        sent = received = t * gathered(output)
        for layer in layers:
            if layer.kind == "kv" and portion is not None:
                rows = bands(layer)
                sent += (
                    warm * gathered(layer)
                    + later * len(neighbours) * edge_rows(portion, rows[rank]) * layer.row_bytes
                )
                received += warm * gathered(layer) + later * sum(
                    edge_rows(portion, rows[k]) * layer.row_bytes for k in neighbours
                )
            elif layer.kind == "kv":
                sent, received = sent + exchanges * gathered(layer), received + exchanges * gathered(layer)
            elif layer.kind == "halo":
                above, below = rank > 0, rank < n - 1
                sent += exchanges * (above * layer.bottom + below * layer.top) * layer.row_bytes
                received += exchanges * (above * layer.top + below * layer.bottom) * layer.row_bytes
            elif layer.kind == "stats":
                sent += exchanges * (n - 1) * layer.nbytes
                received += exchanges * (n - 1) * layer.nbytes
            else:
                raise ValueError(f"unknown layer kind {layer.kind}")
        counts["bytes_sent"], counts["bytes_received"] = sent, received
    traffic[0]["bytes_sent"] += (t - 1) * (n - 1)
    for counts in traffic[1:]:
        counts["bytes_received"] += t - 1
    return traffic
