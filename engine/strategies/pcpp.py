"""PCPP, partially conditioned patch parallelism (Zhang et al. 2024), on DistriFusion's machinery.

As published (github.com/xiuyuz/pcpp, built on DistriFusion): warm-up steps exchange every band's
keys/values synchronously, exactly as DistriFusion. After warm-up a band's self-attention is
conditioned only on itself and the nearest part of each neighbouring band: `portion` percent of the
neighbour's rows (in every frame), taken from the previous step and refreshed by an asynchronous
point-to-point exchange with the two neighbours that overlaps compute. Convolution halos and
GroupNorm statistics are DistriFusion's. One departure, to cut bytes further: the published code
sends a neighbour the whole band and slices after; here only the rows the neighbour uses are sent.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.strategies.base import StrategyOption
from engine.strategies.distrifusion import DistriFusionStrategy, LayerShape, edge_rows
from engine.strategies.distrifusion import expected_traffic as distrifusion_traffic
from engine.strategies.patch_comm import BandRun, Pending
from engine.strategies.patch_layers import StaleKV

PUBLISHED_PORTION = 30  # percent; the published code's default (0.3)


class NeighbourKV(StaleKV):
    """Keys/values of this band (fresh) and the nearest rows of the neighbouring bands (stale).
    Keys/values are grids [2, B, heads, frames, rows, cols, d]; rows are dimension -3."""

    def __init__(self, run: BandRun, index: int, portion: int) -> None:
        super().__init__(run, index)
        self.portion = portion
        self.edges: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)

    def remember(self, parts: list[torch.Tensor]) -> None:
        """Warm-up: keep only the neighbours' rows the first stale step uses."""
        rank, above, below = self.run.rank, None, None
        if self.run.has_upper:
            rows = parts[rank - 1].shape[-3]
            above = parts[rank - 1][..., rows - edge_rows(self.portion, rows) :, :, :]
        if self.run.has_lower:
            below = parts[rank + 1][..., : edge_rows(self.portion, parts[rank + 1].shape[-3]), :, :]
        self.edges = (above, below)

    def arrived(self, incoming: Any) -> None:
        self.edges = incoming

    def stale_context(self, kv: torch.Tensor) -> torch.Tensor:
        above, below = self.edges
        return torch.cat([part for part in (above, kv, below) if part is not None], dim=-3)

    def start(self, kv: torch.Tensor) -> Pending:
        rows = kv.shape[-3]
        used = edge_rows(self.portion, rows)
        bands, rank = self.run.band_rows(rows), self.run.rank

        def buffer(neighbour: int) -> torch.Tensor:  # what that neighbour sends: its nearest rows
            count = edge_rows(self.portion, bands[neighbour]) if 0 <= neighbour < len(bands) else 0
            return kv.new_empty(*kv.shape[:-3], count, *kv.shape[-2:])

        first, last = kv[..., :used, :, :], kv[..., rows - used :, :, :]  # for the rank above / below
        return self.run.comm.swap_edges(first, last, self.tag, buffer(rank - 1), buffer(rank + 1))


class PCPPStrategy(DistriFusionStrategy):
    name = "pcpp"
    description = (
        "Patch parallelism conditioning each band's self-attention on itself and the nearest part "
        "of its neighbours only, sending just that part (PCPP)."
    )
    options = (
        *DistriFusionStrategy.options,
        StrategyOption(
            "portion",
            "Percent of each neighbouring band's rows a band's self-attention sees after warm-up (100: all).",
            PUBLISHED_PORTION,
            minimum=0,
            maximum=100,
        ),
    )

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.portion = int(ctx.options.get("portion", PUBLISHED_PORTION))

    def kv_context(self, index: int) -> StaleKV:
        return NeighbourKV(self.run, index, self.portion)


def expected_traffic(
    total_steps: int,
    warmup: int,
    units: list[int],
    layers: list[LayerShape],
    output: LayerShape,
    portion: int,
) -> list[dict[str, int]]:
    """DistriFusion's traffic with the keys/values after warm-up cut to the neighbours' edge rows."""
    return distrifusion_traffic(total_steps, warmup, units, layers, output, portion=portion)
