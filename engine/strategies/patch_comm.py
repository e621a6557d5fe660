"""What the band ranks of patch parallelism exchange, and how, counted in the strategy's counters.

Each rank holds one band of rows of the latent. A layer that mixes rows (self-attention, a 3x3
convolution, GroupNorm) completes its band with the other ranks' activations in one of two modes,
chosen per step by the strategy:

- sync (warm-up steps): the exchange is started and waited for at once, so the layer sees this
  step's fresh activations of every rank and the result equals the unsplit model;
- async (after warm-up): the layer uses what the previous step's exchange brought (stale) and starts
  this step's exchange without waiting; it is waited for when the same layer runs at the next step,
  so the transfer overlaps the rest of this step's compute. The last step starts none.

Two transports: `all_gather` (every rank gets every rank's tensor) and `swap_edges` (point-to-point
with the rank above and the rank below, for halos and partial context).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class BandRun:
    """Per-job state the layer hooks read: who this rank is and what this step does."""

    rank: int
    world: int
    comm: BandComm
    sync: bool = True  # this step waits for fresh activations (warm-up)
    post: bool = False  # async step that starts an exchange for the next step (all but the last)
    full_input: torch.Tensor | None = None  # the denoiser's whole input this step (every rank has it)
    # (frames, band rows, columns) of the tokens the attention layer being run sees, token order
    # frame-major then row-major; set per call by the denoiser hook (transformers) or by a
    # pre-hook on each UNet transformer model.
    grid: tuple[int, int, int] | None = None
    layers: list[Any] = field(default_factory=list)  # every exchanging layer, for `drain`

    @property
    def has_upper(self) -> bool:
        return self.rank > 0

    @property
    def has_lower(self) -> bool:
        return self.rank < self.world - 1

    def drain(self) -> None:
        """Waits for every exchange still in flight (before stopping together on a cancel)."""
        for layer in self.layers:
            layer.finish_pending()


class BandComm:
    """Collectives between the band ranks; bytes and waits go to the strategy's counters."""

    def __init__(self, strategy: Any) -> None:
        self.strategy = strategy
        self.rank = strategy.ctx.rank
        self.world = strategy.ctx.world_size
        self.group = strategy.ctx.group

    def _count(self, sent: int, received: int) -> None:
        self.strategy.counters.bytes_sent += sent
        self.strategy.counters.bytes_received += received

    def all_gather(self, tensor: torch.Tensor, wait: bool) -> tuple[list[torch.Tensor], list[Any]]:
        """Every rank's `tensor` (same shape on all), in rank order; `wait` False returns the work."""
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        nbytes = tensor.numel() * tensor.element_size()
        self._count(nbytes * (self.world - 1), nbytes * (self.world - 1))
        work = dist.all_gather(parts, tensor, group=self.group, async_op=True)
        if wait:
            self.wait([work])
            return parts, []
        return parts, [work]

    def swap_edges(
        self, first_rows: torch.Tensor | None, last_rows: torch.Tensor | None, tag: int, wait: bool
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, list[Any]]:
        """Sends `first_rows` to the rank above and `last_rows` to the rank below; receives the
        upper rank's last rows (shaped like `last_rows`) and the lower rank's first rows (shaped
        like `first_rows`). Every rank uses the same row counts, so the shapes match; None or an
        empty tensor means nothing goes that way."""
        ops, from_upper, from_lower = [], None, None
        sent = received = 0
        if self.rank > 0 and _nonempty(last_rows):
            from_upper = torch.empty_like(last_rows)
            ops.append(dist.P2POp(dist.irecv, from_upper, self.rank - 1, self.group, tag))
            received += _nbytes(from_upper)
        if self.rank > 0 and _nonempty(first_rows):
            first_rows = first_rows.contiguous()
            ops.append(dist.P2POp(dist.isend, first_rows, self.rank - 1, self.group, tag + 1))
            sent += _nbytes(first_rows)
        if self.rank < self.world - 1 and _nonempty(last_rows):
            last_rows = last_rows.contiguous()
            ops.append(dist.P2POp(dist.isend, last_rows, self.rank + 1, self.group, tag))
            sent += _nbytes(last_rows)
        if self.rank < self.world - 1 and _nonempty(first_rows):
            from_lower = torch.empty_like(first_rows)
            ops.append(dist.P2POp(dist.irecv, from_lower, self.rank + 1, self.group, tag + 1))
            received += _nbytes(from_lower)
        self._count(sent, received)
        # batch_isend_irecv groups the pairs (NCCL would deadlock on two plain blocking sends).
        works = list(dist.batch_isend_irecv(ops)) if ops else []
        if wait:
            self.wait(works)
            works = []
        return from_upper, from_lower, works

    def wait(self, works: list[Any]) -> None:
        if not works:
            return
        start = time.perf_counter()
        for work in works:
            work.wait()
        self.strategy._waited(start)


def _nonempty(tensor: torch.Tensor | None) -> bool:
    return tensor is not None and tensor.numel() > 0


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
