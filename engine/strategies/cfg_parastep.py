"""CFG-ParaStep: ParaStep over N pairs of devices, each pair splitting classifier-free guidance.

2N ranks; world rank 2p + c is CFG half c (0 unconditional, 1 conditional) of ParaStep rank p.
Every denoiser evaluation of ParaStep rank p runs as in `cfg-parallel` on its pair (2p, 2p+1),
so both ranks of a pair hold the same whole output and the same latent. The ParaStep algorithm
(engine/strategies/parastep.py, unchanged, variants included) then runs twice side by side, once
among the ranks of each CFG half ({0, 2, ...} and {1, 3, ...}): rank (p, c) sends its whole
prediction to (0, c), and (0, c) broadcasts its latent to its half. Both ParaStep runs see the same
tensors, so they stay in step without talking to each other; cancel flags (and the adaptive
warm-up's decision) go from world rank 0 to every rank.

The subgroups are created once per worker process, identically on every rank (torch.distributed
requires every rank to call `new_group` for every group, in the same order).
With N = 1 this is `cfg-parallel`; it equals ParaStep with N ranks up to the last bits that
evaluating each half at batch size 1 changes.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from engine.errors import UserError
from engine.strategies.base import Peers
from engine.strategies.cfg_parallel import CfgSplitCompute, refuse_without_guidance
from engine.strategies.parastep import (
    ParaStepStrategy,
    Segment,
    evaluations,
    published_schedule,
    round_traffic,
)

# World group object -> {ranks: subgroup}: created once per process, reused by every job.
_SUBGROUPS: dict[int, dict[tuple[int, ...], Any]] = {}


def _subgroups(world_size: int) -> dict[tuple[int, ...], Any]:
    """The N pair groups and the two half groups, created on first use by every rank, in order."""
    key = id(dist.group.WORLD)
    if key not in _SUBGROUPS:
        wanted = [(2 * p, 2 * p + 1) for p in range(world_size // 2)]
        wanted += [tuple(range(c, world_size, 2)) for c in (0, 1)]
        _SUBGROUPS[key] = {ranks: dist.new_group(list(ranks)) for ranks in wanted}
    return _SUBGROUPS[key]


class CfgParaStepStrategy(CfgSplitCompute, ParaStepStrategy):
    name = "cfg-parastep"
    description = "ParaStep over N pairs of devices, each pair running one guidance half (2N devices)."
    min_devices = 2
    device_multiple = 2
    ranks_per_width = 2
    speedup_factor = 2

    @classmethod
    def check_request(cls, request: Any, adapter: Any, ranks: int) -> None:
        refuse_without_guidance(cls.name, request, adapter)
        if adapter.separate_guidance_calls:
            raise UserError(
                f"'{cls.name}' splits the guidance batch of one denoiser call, but {adapter.family} "
                "models run the guidance passes as separate calls.",
                "Use cfg-parallel (2 devices) or parastep for this model.",
                field="strategy",
                value="parastep",
            )

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        if ctx.group is not None or ctx.world_size % 2:
            raise ValueError("cfg-parastep runs on an even world group")
        pair, half = divmod(ctx.rank, 2)
        n = ctx.world_size // 2
        if n == 1:  # one pair: the world is the pair, and each half is one ParaStep rank alone
            self.pair = self.world
            self.peers = Peers(None, 0, 1)
            return
        groups = _subgroups(ctx.world_size)
        self.pair = Peers(groups[(2 * pair, 2 * pair + 1)], half, 2)
        self.peers = Peers(groups[tuple(range(half, ctx.world_size, 2))], pair, n)


def expected_traffic(
    total_steps: int,
    warmup: int,
    world_size: int,
    prediction_bytes: int,
    latent_bytes: int,
    fresh_reuse: bool = False,
    schedule: list[Segment] | None = None,
) -> list[dict[str, int]]:
    """Bytes each world rank sends and receives in one job, from the algorithm alone.

    World rank 2p + c: ParaStep rank p's `round_traffic` among N ranks (whole predictions, its
    half's latent broadcasts); half a prediction each way with its pair for each of its denoiser
    evaluations (every sync step, and the rounds whose size exceeds p); and world rank 0's one-byte
    cancel flag at the end of every segment but the last (every step but the last at N = 1).
    `schedule`: the segments the job ran (with `adaptive`); by default W sync steps, then rounds.
    """
    n = world_size // 2
    schedule = schedule if schedule is not None else published_schedule(total_steps, warmup, n)
    peer = round_traffic(schedule, n, prediction_bytes, latent_bytes, fresh_reuse)
    flags = len(schedule) - 1
    traffic = []
    for rank in range(world_size):
        p = rank // 2
        gathered = evaluations(schedule, p) * (prediction_bytes // 2)
        traffic.append(
            {
                "bytes_sent": peer[p]["bytes_sent"]
                + gathered
                + (flags * (world_size - 1) if rank == 0 else 0),
                "bytes_received": peer[p]["bytes_received"] + gathered + (flags if rank else 0),
            }
        )
    return traffic
