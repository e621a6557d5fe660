"""Projected multi-GPU speedups from a one-GPU profile: a cost model, not a measurement (no torch).

Input: what one device measured (or an estimate) for one model at one size, a `StepProfile`: the time of
one denoiser call with its classifier-free-guidance batch, of one CFG half, of the rest of a loop step
(guidance, scheduler step), of the encode and decode stages, and the sizes of the tensors each strategy
sends. Output: loop and end-to-end speedups for N devices over a `Link` of stated bandwidth and latency.

The strategies follow ../shared/DESIGN.md. Stated assumptions, the same for every strategy:

- compute splits perfectly where a strategy splits it (AsyncDiff parts of equal compute, DistriFusion
  patches), so those figures are upper bounds;
- a point-to-point message costs `latency + bytes / bandwidth`; a broadcast or all-gather is pipelined
  (`ceil(log2 N)` latencies plus the bytes once);
- ParaStep does not overlap communication with compute (as implemented here and published); AsyncDiff
  and DistriFusion overlap theirs with the next compute, as published.

Two loop shapes (engine/strategies/base.py). Batched (CogVideoX, SVD, AudioLDM2): one denoiser call per
step holds both guidance halves. Separate calls (Wan, `guidance_calls` 2): the loop calls the denoiser
once per guidance pass; then `denoise_s` is all of a step's calls, `half_denoise_s` one call,
`prediction_bytes` all of a step's outputs (ParaStep sends them as `guidance_calls` messages), and
CFG-parallel runs step 0 whole on both ranks with no exchange (engine.strategies.cfg_parallel).
A multistep scheduler's state (UniPC: two model outputs and the last sample, `solver_tensors` 3, each
latent-sized) rides on ParaStep's round-end broadcast with `sync_solver` 1 (a variant, off by default):
one more broadcast of `latent_bytes` per tensor. `refused` names the strategies the engine refuses for the
family (the plan-time checks); `project` leaves them out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# The published ParaStep end-to-end maxima and the settings they were reached with (DESIGN.md §3).
PUBLISHED_PARASTEP = {
    "svd": {"speedup": 3.88, "steps": 50, "warmup": 5},
    "cogvideox-2b": {"speedup": 2.43, "steps": 50, "warmup": 13},
    "audioldm2-large": {"speedup": 6.56, "steps": 200, "warmup": 5},
}
ASYNCDIFF_WARMUP = 3  # whole-model steps before the parts run asynchronously
DISTRIFUSION_WARMUP = 4  # synchronous steps before stale activations are used


@dataclass(frozen=True)
class Link:
    """An interconnect between two devices: effective bandwidth per direction and per-message latency."""

    name: str
    bandwidth_gb_s: float  # 1e9 bytes per second
    latency_us: float

    def message_s(self, nbytes: float) -> float:
        return self.latency_us * 1e-6 + nbytes / (self.bandwidth_gb_s * 1e9)

    def collective_s(self, nbytes: float, devices: int) -> float:
        """A pipelined broadcast or all-gather: tree latency, the bytes once."""
        hops = max(1, math.ceil(math.log2(max(devices, 2))))
        return hops * self.latency_us * 1e-6 + nbytes / (self.bandwidth_gb_s * 1e9)


# PCIe 4.0 x16: 31.5 GB/s per direction on paper, about 25 GB/s achieved by NCCL between two GPUs.
PCIE4_X16 = Link("PCIe 4.0 x16 (25 GB/s effective)", 25.0, 15.0)
# H100 SXM NVLink 4: 900 GB/s bidirectional = 450 GB/s per direction (peak; NCCL reaches ~80% of it).
NVLINK4 = Link("NVLink 4, H100 SXM (450 GB/s per direction)", 450.0, 5.0)
LINKS = (PCIE4_X16, NVLINK4)


@dataclass(frozen=True)
class StepProfile:
    """One model at one size on one device. Times in seconds, sizes in bytes."""

    model: str
    denoise_s: float  # one denoiser call with its CFG batch (both halves)
    half_denoise_s: float  # one denoiser call on one CFG half
    loop_s: float  # the rest of a loop step: guidance and scheduler step
    encode_s: float  # prompt/image encoding before the loop
    decode_s: float  # VAE (and vocoder) after the loop
    prediction_bytes: int  # the denoiser's output, both CFG halves
    latent_bytes: int
    activation_bytes: int  # tensors crossing one AsyncDiff cut per step (hidden states, skips)
    kv_bytes: int  # keys and values of every spatial self-attention layer per step (DistriFusion)
    source: str = ""  # how the numbers were obtained: measured (device), estimate, CPU-reduced
    guidance_calls: int = 1  # denoiser calls per step: 1 = both halves batched; 2 = separate (Wan)
    solver_tensors: int = 0  # latent-sized tensors a multistep scheduler carries (UniPC order 2: 3)
    refused: tuple[str, ...] = ()  # strategies the engine refuses for this family: not projected

    @property
    def step_s(self) -> float:
        return self.denoise_s + self.loop_s

    def sequential_loop_s(self, steps: int) -> float:
        return steps * self.step_s


def ideal_parastep_speedup(steps: int, warmup: int, devices: int) -> float:
    """T / (W + ceil((T - W) / N)): only the exact-step denoiser calls cost time."""
    rounds = -(-(steps - warmup) // devices) if steps > warmup else 0
    return steps / (warmup + rounds)


def parastep_loop_s(
    profile: StepProfile, steps: int, warmup: int, devices: int, link: Link, sync_solver: bool = False
) -> float:
    """ParaStep's loop: W warm-up steps, then rounds of N.

    A round of n steps: every rank runs one step's denoiser calls at once; rank 0 then applies n
    scheduler steps, receiving the n-1 predictions one after another over its link (one message per
    call of a step); unless it is the last round, rank 0 broadcasts its latent (and, with
    `sync_solver`, each of the scheduler's `solver_tensors`), and every step before it a one-byte
    cancel flag (engine.strategies.parastep).
    """
    if devices == 1:
        return profile.sequential_loop_s(steps)
    calls = max(1, profile.guidance_calls)
    receive_s = calls * link.message_s(profile.prediction_bytes / calls)
    broadcasts = 1 + (profile.solver_tensors if sync_solver else 0)
    flag_s = link.collective_s(1, devices)
    total = min(warmup, steps) * profile.step_s + min(warmup, steps - 1) * flag_s
    starts = list(range(warmup, steps, devices))
    for index, start in enumerate(starts):
        size = min(devices, steps - start)
        total += profile.denoise_s + size * profile.loop_s + (size - 1) * receive_s
        if index < len(starts) - 1:
            total += broadcasts * link.collective_s(profile.latent_bytes, devices) + flag_s
    return total


def cfg_parallel_loop_s(profile: StepProfile, steps: int, devices: int, link: Link) -> float | None:
    """Unconditional and conditional halves on two ranks, the halves all-gathered each step. N=2 only.

    Separate calls (`guidance_calls` > 1): step 0 runs every call on both ranks (no exchange); from
    step 1 the calls go in pairs, one per rank, each pair's two outputs all-gathered; an odd last call
    runs on both ranks."""
    if devices == 1:
        return profile.sequential_loop_s(steps)
    if devices != 2:
        return None
    calls = profile.guidance_calls
    if calls <= 1:
        gather_s = link.collective_s(profile.prediction_bytes / 2, devices)
        return steps * (profile.half_denoise_s + profile.loop_s + gather_s)
    pairs, odd = divmod(calls, 2)
    paired_step = (
        (pairs + odd) * profile.half_denoise_s
        + profile.loop_s
        + pairs * link.collective_s(profile.prediction_bytes / calls, devices)
    )
    return min(steps, 1) * profile.step_s + max(steps - 1, 0) * paired_step


def asyncdiff_loop_s(
    profile: StepProfile, steps: int, devices: int, link: Link, warmup: int = ASYNCDIFF_WARMUP
) -> float:
    """N parts of equal compute run at once on stale inputs; each boundary tensor goes to the next part
    (overlapped with compute), the last part's prediction is broadcast to all for the scheduler step."""
    if devices == 1:
        return profile.sequential_loop_s(steps)
    warm = min(warmup, steps)
    boundary_s = link.message_s(profile.activation_bytes)
    warm_step = profile.step_s + (devices - 1) * boundary_s  # whole model, parts in sequence
    parallel_step = (
        max(profile.denoise_s / devices, boundary_s)
        + profile.loop_s
        + link.collective_s(profile.prediction_bytes, devices)
    )
    return warm * warm_step + (steps - warm) * parallel_step


def distrifusion_loop_s(
    profile: StepProfile, steps: int, devices: int, link: Link, warmup: int = DISTRIFUSION_WARMUP
) -> float:
    """Row bands on N ranks; every step all-gathers the keys/values of each spatial self-attention
    layer (a rank receives (N-1)/N of them); asynchronous after the warm-up steps."""
    if devices == 1:
        return profile.sequential_loop_s(steps)
    warm = min(warmup, steps)
    gather_s = link.collective_s(profile.kv_bytes * (devices - 1) / devices, devices)
    compute_s = profile.denoise_s / devices
    warm_step = compute_s + gather_s + profile.loop_s
    parallel_step = max(compute_s, gather_s) + profile.loop_s
    return warm * warm_step + (steps - warm) * parallel_step


@dataclass(frozen=True)
class Projection:
    strategy: str
    devices: int
    link: str
    loop_s: float
    loop_speedup: float
    end_to_end_speedup: float
    ideal: float | None  # ParaStep's call-count bound, for reference


def project(
    profile: StepProfile, steps: int, warmup: int, devices: tuple[int, ...] = (2, 4, 8), links=LINKS
) -> list[Projection]:
    """Every strategy at every N over every link; CFG-parallel only where it applies (N=2), none of the
    profile's `refused` ones. With a multistep scheduler (`solver_tensors`), also ParaStep with
    `sync_solver` 1 ("parastep-sync-solver": the scheduler's state rides on the broadcast)."""
    sequential = profile.sequential_loop_s(steps)
    fixed = profile.encode_s + profile.decode_s
    rows = []
    for link in links:
        for n in devices:
            candidates = {
                "parastep": parastep_loop_s(profile, steps, warmup, n, link),
                "cfg-parallel": cfg_parallel_loop_s(profile, steps, n, link),
                "asyncdiff": asyncdiff_loop_s(profile, steps, n, link),
                "distrifusion": distrifusion_loop_s(profile, steps, n, link),
            }
            if profile.solver_tensors and "parastep" not in profile.refused:
                candidates["parastep-sync-solver"] = parastep_loop_s(
                    profile, steps, warmup, n, link, sync_solver=True
                )
            for strategy, loop in candidates.items():
                if loop is None or strategy in profile.refused:
                    continue
                rows.append(
                    Projection(
                        strategy=strategy,
                        devices=n,
                        link=link.name,
                        loop_s=loop,
                        loop_speedup=sequential / loop,
                        end_to_end_speedup=(sequential + fixed) / (loop + fixed),
                        ideal=(
                            ideal_parastep_speedup(steps, warmup, n)
                            if strategy.startswith("parastep")
                            else None
                        ),
                    )
                )
    return rows
