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

from engine.errors import UserError
from engine.strategies.base import StrategyOption
from engine.strategies.distrifusion import DistriFusionStrategy, LayerShape, edge_rows
from engine.strategies.distrifusion import expected_traffic as distrifusion_traffic
from engine.strategies.patch_comm import BandRun
from engine.strategies.patch_layers import StaleKV, join_rows, token_rows

PUBLISHED_PORTION = 30  # percent; the published code's default (0.3)


class NeighbourKV(StaleKV):
    """Keys/values of this band (fresh) and the nearest rows of the neighbouring bands (stale)."""

    def __init__(self, run: BandRun, index: int, portion: int) -> None:
        super().__init__(run, index)
        self.portion = portion
        self.edges: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)

    def remember(self, parts: list[torch.Tensor], grid: tuple[int, int, int]) -> None:
        """Warm-up: keep only the neighbours' rows the first stale step uses."""
        frames, rows, cols = grid
        used, rank = edge_rows(self.portion, rows), self.run.rank
        above = token_rows(parts[rank - 1], frames, cols, rows - used, rows) if self.run.has_upper else None
        below = token_rows(parts[rank + 1], frames, cols, 0, used) if self.run.has_lower else None
        self.edges = (above, below)

    def arrived(self, incoming: Any) -> None:
        self.edges = incoming

    def stale_context(self, kv: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        above, below = self.edges
        return join_rows([above, kv, below], grid[0], grid[2])

    def start(self, kv: torch.Tensor, grid: tuple[int, int, int]) -> tuple[Any, list[Any]]:
        frames, rows, cols = grid
        used = edge_rows(self.portion, rows)
        first = token_rows(kv, frames, cols, 0, used)  # what the rank above conditions on
        last = token_rows(kv, frames, cols, rows - used, rows)  # what the rank below conditions on
        above, below, works = self.run.comm.swap_edges(first, last, self.tag, wait=False)
        return (above, below), works


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
            0,
        ),
    )

    @classmethod
    def check_request(cls, request: Any, adapter: Any, ranks: int) -> None:
        portion = request.strategy_options.get("portion", PUBLISHED_PORTION)
        if portion > 100:
            raise UserError(
                f"Option 'portion' of 'pcpp' is {portion}; it is a percent of a neighbour band, at most 100.",
                "Set --portion from 0 to 100.",
            )

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.portion = int(ctx.options.get("portion", PUBLISHED_PORTION))

    def kv_context(self, index: int) -> StaleKV:
        return NeighbourKV(self.run, index, self.portion)


def expected_traffic(
    total_steps: int, warmup: int, world_size: int, layers: list[LayerShape], output_bytes: int, portion: int
) -> list[dict[str, int]]:
    """DistriFusion's traffic with the keys/values after warm-up cut to the neighbours' edge rows."""
    return distrifusion_traffic(total_steps, warmup, world_size, layers, output_bytes, portion=portion)
