"""The worker process: one per device, holding a pipeline replica, running the jobs it is sent.

Messages to the engine go through one queue as tuples: ("loaded", rank, info), ("event", rank,
event), ("pending", rank, path of the kept final latents), ("done", rank, payload), ("cancelled",
rank, None), ("error", rank, message), ("peer_error", rank, message): a collective failed, most
likely because a peer died or stalled (the engine then names that peer).

Spawned through engine.worker_entry, which ties the process to the engine's life first.
"""

from __future__ import annotations

import os
import signal
import time
import traceback
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from engine.catalog import ModelEntry
from engine.errors import JobCancelled, UserError, out_of_memory
from engine.loras import apply_loras, remove_loras
from engine.pending_decode import decode_command, decode_with_fallback, save_pending
from engine.protocol import GenerationRequest, LogEvent, PreviewEvent, StageEvent, StepEvent

# Tests: "STEP" (every rank) or "STEP@RANK": the first job of each such worker process runs out of
# memory after that denoising step.
INJECT_LOOP_OOM_ENV = "PARASTEP_INJECT_LOOP_OOM"
INJECT_LOOP_OOM_KIND_ENV = "PARASTEP_INJECT_LOOP_OOM_KIND"  # "cpu": the CPU allocator's RuntimeError
_loop_oom = {"armed": True}
# Tests: "decode" or "step:N@RANK" (read by the engine into Job.options, so a warm group obeys it): that
# rank stops itself (SIGSTOP) there, as a hung driver or a suspended process would.
INJECT_STALL_ENV = "PARASTEP_INJECT_STALL"


@dataclass
class WorkerSpec:
    rank: int
    world_size: int
    device: str
    init_method: str | None
    timeout_s: float
    entry: ModelEntry
    dtype: str


@dataclass
class Job:
    job_id: str
    request: GenerationRequest  # resolved: every default filled in
    previews: bool = True
    options: dict[str, Any] = field(default_factory=dict)


def worker_main(spec: WorkerSpec, commands: Any, results: Any, cancel: Any) -> None:
    from engine.logfile import LOG_FILE_ENV, route_warnings

    if os.environ.get(LOG_FILE_ENV):  # under the window's engine: warnings to its log file
        route_warnings()
    import torch

    if spec.device == "cpu":
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    else:
        torch.cuda.set_device(torch.device(spec.device))
    try:
        if spec.world_size > 1:
            import torch.distributed as dist

            dist.init_process_group(
                backend="gloo" if spec.device == "cpu" else "nccl",
                init_method=spec.init_method,
                rank=spec.rank,
                world_size=spec.world_size,
                timeout=timedelta(seconds=spec.timeout_s),
                device_id=None if spec.device == "cpu" else torch.device(spec.device),
            )
        from engine.loading import load_pipeline, resolve_dtype
        from engine.models import adapter_for

        start = time.perf_counter()
        pipe = load_pipeline(spec.entry, spec.device, resolve_dtype(spec.dtype, spec.device))
        adapter = adapter_for(spec.entry)
        results.put(("loaded", spec.rank, {"load_s": time.perf_counter() - start}))
    except Exception as exc:  # report, then exit: the engine shows it
        results.put(("error", spec.rank, _describe(exc)))
        return

    while True:
        command = commands.get()
        if command[0] == "stop":
            break
        job: Job = command[1]
        try:
            payload = run_job(spec, pipe, adapter, job, results, cancel)
            results.put(("done", spec.rank, payload))
        except JobCancelled:
            results.put(("cancelled", spec.rank, None))
        except Exception as exc:
            kind = "peer_error" if spec.world_size > 1 and _collective_failure(exc) else "error"
            results.put((kind, spec.rank, _describe(exc)))
    if spec.world_size > 1:
        import torch.distributed as dist

        dist.destroy_process_group()


def run_job(spec: WorkerSpec, pipe: Any, adapter: Any, job: Job, results: Any, cancel: Any) -> dict[str, Any]:
    """One pipeline call with the job's strategy installed; rank 0 also decodes."""
    import torch

    from engine.previews import PreviewRenderer
    from engine.strategies import strategy_class
    from engine.strategies.base import JobContext, StepReport

    request, rank = job.request, spec.rank
    device = torch.device(spec.device)
    marks: dict[str, float] = {}
    renderer = (
        PreviewRenderer(adapter, pipe, request, spec.entry.path, fit_in_loop=spec.world_size == 1)
        if rank == 0 and job.previews
        else None
    )

    def emit(event: Any) -> None:
        results.put(("event", rank, event))

    def first_denoise() -> None:
        marks["denoise_start"] = time.perf_counter()
        if rank == 0:
            emit(StageEvent(job.job_id, "denoise"))

    def on_step(report: StepReport) -> None:
        _maybe_inject_loop_oom(report.step, rank)
        _maybe_stall(job, f"step:{report.step}", rank, results)
        marks["denoise_end"] = time.perf_counter()
        emit(
            StepEvent(
                job.job_id,
                rank,
                report.step,
                request.steps,
                report.action,
                report.compute_s,
                report.comm_wait_s,
            )
        )
        if renderer and report.pred_original_sample is not None and renderer.due(report.step, request.steps):
            rendered = renderer.render(report.pred_original_sample)
            if rendered is not None:
                emit(PreviewEvent(job.job_id, report.step, request.steps, *rendered))

    ctx = JobContext(
        rank=rank,
        world_size=spec.world_size,
        device=device,
        total_steps=request.steps,
        options=dict(request.strategy_options),
        adapter=adapter,
        pipe=pipe,
        params=request,
        cancel_requested=cancel.is_set,
        on_step=on_step,
        on_first_denoise=first_denoise,
    )
    strategy = strategy_class(request.strategy)(ctx)
    # A CPU generator on every device: the same seed gives the same noise on CPU workers and GPUs.
    generator = torch.Generator("cpu").manual_seed(request.seed)
    kwargs = adapter.pipeline_kwargs(pipe, request, generator)
    decodes_in_pipeline = getattr(adapter, "decodes_in_pipeline", False)
    if rank > 0 and decodes_in_pipeline:
        kwargs["output_type"] = "latent"  # only rank 0 decodes
    if rank == 0:
        emit(StageEvent(job.job_id, "encode"))
    loras = apply_loras(pipe, request.loras)  # the job's adapters, unloaded again below
    strategy.install(pipe)
    start = time.perf_counter()
    try:
        with torch.inference_mode():
            result = pipe(**kwargs)
    except Exception as exc:
        if not out_of_memory(exc):
            raise
        raise UserError(
            f"Out of memory on {spec.device} in the denoising loop; nothing was saved.",
            "Each device holds a whole model copy and the full latents: lower --frames or "
            "--height/--width (video) or --seconds (audio), use --dtype fp16 or bf16 on a GPU, use a "
            "smaller --lookahead with batchstep (each look-ahead latent is one more batch entry), or "
            "free the memory other programs hold on that device.",
        ) from None
    finally:
        strategy.uninstall()
        remove_loras(pipe, loras)
    call_end = time.perf_counter()
    loop_end = marks.get("denoise_end", call_end)
    timings = {
        "encode_s": marks.get("denoise_start", start) - start,
        "denoise_s": loop_end - marks.get("denoise_start", start),
    }
    payload: dict[str, Any] = {"counters": strategy.counters.to_dict(), "timings": timings}
    if rank != 0:
        return payload
    if cancel.is_set():
        raise JobCancelled()  # skip the decode
    # A generic pipeline decoded inside its own call, after the last step.
    decode_start = loop_end if decodes_in_pipeline else time.perf_counter()
    pending = None
    latents = None if decodes_in_pipeline else (result.frames if hasattr(result, "frames") else result.audios)
    if latents is not None:
        # Before the stage is announced: from then on the engine can say where they are if the decode
        # stalls or the user interrupts it.
        folder = job.options.get("output_folder")
        pending = save_pending(
            latents,
            request,
            spec.entry.path,
            job.job_id,
            lambda m: emit(LogEvent(job.job_id, m)),
            Path(folder) if folder else None,
        )
        results.put(("pending", rank, str(pending)))
    emit(StageEvent(job.job_id, "decode"))
    _maybe_stall(job, "decode", rank, results)
    with torch.inference_mode():
        if decodes_in_pipeline:
            output = adapter.decoded_output(result)
        else:
            try:
                output = decode_with_fallback(
                    lambda p, x: adapter.decode(p, x, request),
                    pipe,
                    latents,
                    lambda m: emit(LogEvent(job.job_id, m)),
                )
            except Exception as exc:
                if out_of_memory(exc):
                    raise UserError(
                        f"Out of memory decoding on {spec.device}, also with VAE tiling and on the CPU. "
                        f"The final latents are kept in {pending}.",
                        f"Free memory, then run `{decode_command(pending, request)}`.",
                    ) from None
                raise UserError(
                    f"Decoding failed ({_describe(exc)}). The final latents are kept in {pending}.",
                    f"Run `{decode_command(pending, request)}` once the cause is fixed.",
                ) from None
    timings["decode_s"] = time.perf_counter() - decode_start
    if renderer is not None and latents is not None:
        try:
            with torch.inference_mode():
                renderer.learn(latents)  # previews for the next run of a model with no map yet
        except Exception as exc:  # previews are a nicety: never fail a finished clip over them
            emit(LogEvent(job.job_id, f"preview map not fitted: {_describe(exc)}"))
    payload.update(
        output=output,
        rate=adapter.output_rate(pipe, request),
        latents=None if latents is None else latents.float().cpu().numpy(),
        pending=None if pending is None else str(pending),
    )
    return payload


def _maybe_inject_loop_oom(step: int, rank: int) -> None:
    at, _, on_rank = os.environ.get(INJECT_LOOP_OOM_ENV, "").partition("@")
    if at and _loop_oom["armed"] and step >= int(at) and (not on_rank or int(on_rank) == rank):
        import torch

        _loop_oom["armed"] = False
        if os.environ.get(INJECT_LOOP_OOM_KIND_ENV) == "cpu":  # what the CPU allocator raises
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: injected for a test")
        raise torch.OutOfMemoryError(f"injected for a test at step {step}")


def _maybe_stall(job: Job, where: str, rank: int, results: Any) -> None:
    spec = job.options.get("inject_stall") or ""
    at, _, on_rank = spec.partition("@")
    if at == where and (not on_rank or int(on_rank) == rank):
        deadline = time.monotonic() + 5.0  # let the queue's feeder thread send what was put, first
        while getattr(results, "_buffer", None) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGSTOP)


def _collective_failure(exc: BaseException) -> bool:
    """A collective that timed out or lost its peer: a symptom on this rank, not the cause."""
    if isinstance(exc, UserError):
        return False
    if type(exc).__name__ in ("DistBackendError", "DistNetworkError", "DistStoreError"):
        return True
    text = str(exc).lower()
    return any(
        sign in text
        for sign in ("gloo", "nccl", "timed out", "connection closed by peer", "connection reset by peer")
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, UserError):
        return str(exc)
    detail = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    if os.environ.get("PARASTEP_DEBUG"):
        detail += "\n" + traceback.format_exc()
    return detail
