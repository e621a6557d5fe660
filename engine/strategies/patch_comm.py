"""What the band ranks of patch parallelism exchange, and how, counted in the strategy's counters.

Each rank holds one band of rows of the latent. A layer that mixes rows (self-attention, a 3x3
convolution, GroupNorm) completes its band with the other ranks' activations in one of two modes,
chosen per step by the strategy:

- sync (warm-up steps): the exchange is started and waited for at once, so the layer sees this
  step's fresh activations of every rank and the result equals the unsplit model;
- async (after warm-up): the layer uses what the previous step's exchange brought (stale) and starts
  this step's exchange without waiting; it is waited for when the same layer runs at the next step,
  so the transfer overlaps the rest of this step's compute. The last step starts none.

Bands are whole multiples of a unit of rows (so that they stay whole through every downsampling),
as even as possible: the first ranks get one unit more when the units do not divide evenly. Every
layer's bands are then in the same proportion as the units. Two transports: `all_gather` (every rank
gets every rank's tensor; bands of unequal height travel padded to the tallest) and `swap_edges`
(point-to-point with the rank above and the rank below, for halos and partial context).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F


def split_units(units: int, ranks: int) -> list[int]:
    """Units per band, as even as possible, the first ranks taking the remainder."""
    base, extra = divmod(units, ranks)
    return [base + (rank < extra) for rank in range(ranks)]


@dataclass
class BandRun:
    """Per-job state the layer hooks read: who this rank is, the bands, and what this step does."""

    rank: int
    world: int
    comm: BandComm
    units: list[int] = field(default_factory=list)  # units of rows per band, set per call
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

    def band_rows(self, own_rows: int) -> list[int]:
        """Every band's rows in a layer where this rank's band has `own_rows`."""
        return [own_rows * units // self.units[self.rank] for units in self.units]

    def band_start(self, own_rows: int) -> int:
        return sum(self.band_rows(own_rows)[: self.rank])

    def drain(self) -> None:
        """Waits for every exchange still in flight (before stopping together on a cancel)."""
        for layer in self.layers:
            layer.finish_pending()


class Pending:
    """An exchange in flight; `result()` waits for it and returns what it brought."""

    def __init__(self, comm: BandComm, works: list[Any], finish: Callable[[], Any]) -> None:
        self.comm, self.works, self.finish = comm, works, finish

    def result(self) -> Any:
        self.comm.wait(self.works)
        return self.finish()


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

    def all_gather(self, tensor: torch.Tensor, rows: list[int] | None = None, dim: int = -2) -> Pending:
        """Every rank's `tensor`, in rank order. `rows`: each rank's size along `dim` where they
        differ (the tensors travel padded to the largest and are cut back on arrival)."""
        tallest = max(rows) if rows else tensor.shape[dim]
        if tensor.shape[dim] < tallest:
            pad = [0, 0] * (-dim - 1) + [0, tallest - tensor.shape[dim]]
            tensor = F.pad(tensor, pad)
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.world)]
        nbytes = _nbytes(tensor)
        self._count(nbytes * (self.world - 1), nbytes * (self.world - 1))
        work = dist.all_gather(parts, tensor, group=self.group, async_op=True)
        if rows:
            return Pending(
                self, [work], lambda: [p.narrow(dim, 0, n) for p, n in zip(parts, rows, strict=True)]
            )
        return Pending(self, [work], lambda: parts)

    def swap_edges(
        self,
        first_rows: torch.Tensor,
        last_rows: torch.Tensor,
        tag: int,
        from_upper: torch.Tensor | None = None,
        from_lower: torch.Tensor | None = None,
    ) -> Pending:
        """Sends `first_rows` to the rank above and `last_rows` to the rank below; receives the
        upper rank's last rows into `from_upper` and the lower rank's first rows into `from_lower`
        (default: buffers shaped like `last_rows` and `first_rows`, when every rank sends as many
        rows). Empty tensors are not sent; the result is (from upper, from lower), None where no
        rows come."""
        if from_upper is None:
            from_upper = torch.empty_like(last_rows)
        if from_lower is None:
            from_lower = torch.empty_like(first_rows)
        ops = []
        sent = received = 0
        above, below = self.rank > 0, self.rank < self.world - 1
        if above and from_upper.numel():
            ops.append(dist.P2POp(dist.irecv, from_upper, self.rank - 1, self.group, tag))
            received += _nbytes(from_upper)
        if above and first_rows.numel():
            first_rows = first_rows.contiguous()
            ops.append(dist.P2POp(dist.isend, first_rows, self.rank - 1, self.group, tag + 1))
            sent += _nbytes(first_rows)
        if below and last_rows.numel():
            last_rows = last_rows.contiguous()
            ops.append(dist.P2POp(dist.isend, last_rows, self.rank + 1, self.group, tag))
            sent += _nbytes(last_rows)
        if below and from_lower.numel():
            ops.append(dist.P2POp(dist.irecv, from_lower, self.rank + 1, self.group, tag + 1))
            received += _nbytes(from_lower)
        self._count(sent, received)
        # batch_isend_irecv groups the pairs (NCCL would deadlock on two plain blocking sends).
        works = list(dist.batch_isend_irecv(ops)) if ops else []
        result = (
            from_upper if above and from_upper.numel() else None,
            from_lower if below and from_lower.numel() else None,
        )
        return Pending(self, works, lambda: result)

    def wait(self, works: list[Any]) -> None:
        """Waits for `works`, counting the host time as communication wait. With NCCL `wait()`
        only orders the compute stream after the transfer: no device sync here (there are dozens
        of waits per step), so on GPUs a transfer not done in time shows up as compute time."""
        if not works:
            return
        start = time.perf_counter()
        for work in works:
            work.wait()
        elapsed = time.perf_counter() - start
        self.strategy.counters.comm_wait_s += elapsed
        self.strategy._step_wait += elapsed


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()
