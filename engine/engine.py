"""The engine: validates requests, keeps a warm worker group, runs jobs, writes clips, compares.

Headless (no Qt). The CLI uses it in-process; the window talks to it in a background process.
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.catalog import ModelCatalog, ModelEntry
from engine.devices import format_devices, parse_devices
from engine.errors import JobCancelled, UserError, WorkerFailure
from engine.loading import check_configs, check_weights
from engine.loras import check_loras
from engine.models import FamilyAdapter, adapter_for
from engine.pending_decode import clip_folder, decode_command
from engine.protocol import GenerationRequest, StageEvent
from engine.strategies import strategy_class
from engine.worker import INJECT_STALL_ENV, Job
from engine.worker_group import DEFAULT_COLLECTIVE_TIMEOUT_S, CancelFlag, WorkerGroup, clean_stale_rendezvous

EventSink = Callable[[Any], None]


@dataclass
class Plan:
    """A validated request: the model, its adapter, the ranks' devices, every default filled in."""

    entry: ModelEntry
    adapter: FamilyAdapter
    request: GenerationRequest
    devices: list[str]

    @property
    def ideal_speedup(self) -> float:
        strategy = strategy_class(self.request.strategy)
        return strategy.ideal_speedup(self.request.steps, self.request.strategy_options, len(self.devices))


@dataclass
class RunResult:
    plan: Plan
    output: Any  # frames uint8 [F, H, W, 3] or audio float32 [S] (mono) or [S, C] (stereo)
    rate: float
    latents: Any
    timings: dict[str, float]
    ranks: list[dict[str, Any]]
    pending: Path | None = None  # the final latents on disk, until the clip is saved

    def discard_pending(self) -> None:
        if self.pending is not None:
            self.pending.unlink(missing_ok=True)
            self.pending = None


class Engine:
    def __init__(
        self,
        catalog: ModelCatalog | None = None,
        collective_timeout_s: float = DEFAULT_COLLECTIVE_TIMEOUT_S,
        dtype: str = "auto",
    ) -> None:
        self.catalog = catalog or ModelCatalog()
        self.collective_timeout_s = collective_timeout_s
        self.dtype = dtype
        self.group: WorkerGroup | None = None
        # Owned here, not by a group, so that a cancel during loading is not lost.
        self._cancel = CancelFlag()
        clean_stale_rendezvous()  # left by an engine or CLI that was killed (SIGKILL)

    # ---- planning (no workers) ------------------------------------------------------------------
    def plan(self, request: GenerationRequest) -> Plan:
        entry = self.catalog.resolve(request.model)
        check_configs(entry)
        adapter = adapter_for(entry)
        strategy = strategy_class(request.strategy)
        devices = parse_devices(request.devices, strategy.max_devices)
        if (request.devices or "auto").strip().lower() == "auto" and len(devices) > strategy.device_multiple:
            devices = devices[: len(devices) - len(devices) % strategy.device_multiple]
        _check_device_count(strategy, request.devices, len(devices), all(d == "cpu" for d in devices))
        reason = strategy.unavailable_reason(entry)
        if reason is not None:
            raise UserError(
                f"Strategy '{strategy.name}' cannot run '{entry.name}': {reason}",
                "Pick another strategy (sequential always works).",
                field="strategy",
                value="sequential",
            )
        check_loras(request.loras, entry.pipeline_class, strategy)
        try:
            resolved = adapter.resolve(request, entry)
        except (KeyError, TypeError, IndexError, ValueError) as exc:  # a config.json that parses but is wrong
            raise UserError(
                f"The config files of model '{entry.name}' ({entry.path}) do not hold what a {entry.family} "
                f"model needs ({type(exc).__name__}: {exc}).",
                "Restore the folder from the model's source, or re-save the pipeline with diffusers.",
            ) from None
        _check_scheduler(strategy, entry)
        options = self._resolve_options(strategy, resolved, adapter, len(devices))
        with_options = dataclasses.replace(resolved, strategy_options=options)
        strategy.check_request(with_options, adapter, len(devices))
        strategy.check_model_request(with_options, entry, len(devices))
        resolved = dataclasses.replace(
            resolved, strategy_options=options, devices=format_devices(devices), model=request.model
        )
        return Plan(entry, adapter, resolved, devices)

    def _resolve_options(
        self, strategy: Any, request: GenerationRequest, adapter: FamilyAdapter, ranks: int
    ) -> dict[str, Any]:
        given = dict(request.strategy_options)
        known = {option.name: option for option in strategy.options}
        unknown = sorted(set(given) - set(known))
        if unknown:
            allowed = ", ".join(known) or "none"
            raise UserError(
                f"Strategy '{strategy.name}' has no option {', '.join(unknown)} (its options: {allowed}).",
                "Drop the option or pick another strategy.",
            )
        options = {}
        for name, option in known.items():
            value = given.get(name, option.default)
            if value is None and name == "warmup":
                value = adapter.default_warmup(request.steps)
            too_big = option.maximum is not None and isinstance(value, int) and value > option.maximum
            if isinstance(value, bool) or not isinstance(value, int) or value < option.minimum or too_big:
                bounds = f">= {option.minimum}"
                if option.maximum is not None:
                    bounds = f"from {option.minimum} to {option.maximum}"
                raise UserError(
                    f"Option '{name}' of '{strategy.name}' is {value!r}; it must be a whole number {bounds}.",
                    f"Set --{name.replace('_', '-')} to a valid value.",
                    field=f"strategy_options.{name}",
                )
            options[name] = value
        warmup = options.get("warmup")
        if warmup is not None:
            if warmup > request.steps:
                raise UserError(
                    f"Warm-up {warmup} is larger than the step count {request.steps}.",
                    f"Use --warmup from 1 to {request.steps}.",
                    field="strategy_options.warmup",
                    value=request.steps,
                )
            parallel = strategy.parallel_width(options, ranks)
            if warmup == 0 and parallel > 1 and request.steps > 0:
                raise UserError(
                    f"'{strategy.name}' needs at least one warm-up step: the first round reuses a "
                    "prediction that only a warm-up step can make.",
                    "Use --warmup 1 or more.",
                    field="strategy_options.warmup",
                    value=1,
                )
        if options.get("lookahead", 1) > request.steps:
            raise UserError(
                f"Look-ahead {options['lookahead']} is larger than the step count {request.steps}.",
                "Use a smaller --lookahead.",
                field="strategy_options.lookahead",
                value=request.steps,
            )
        return options

    # ---- running ----------------------------------------------------------------------------------
    def ensure_group(self, plan: Plan, on_event: EventSink) -> WorkerGroup:
        key = (str(plan.entry.path), tuple(plan.devices), self.dtype)
        if self.group is not None and (self.group.key != key or not self.group.alive()):
            self.group.shutdown()
            self.group = None
        if self.group is None:
            check_weights(plan.entry)
            group = WorkerGroup(plan.entry, plan.devices, self.dtype, self.collective_timeout_s, self._cancel)
            group.start()
            self.group = group
        return self.group

    def run(self, plan: Plan, on_event: EventSink | None = None, previews: bool = True) -> RunResult:
        """Runs a planned job (loading the model if needed); writes nothing."""
        sink = on_event or (lambda event: None)
        job_id = uuid.uuid4().hex[:12]
        start = time.perf_counter()
        self._cancel.clear()
        sink(StageEvent(job_id, "load"))
        group = self.ensure_group(plan, sink)
        load_s = time.perf_counter() - start
        if self._cancel.is_set():
            raise JobCancelled()
        try:
            # Where the clip goes, as this process sees it: the latents' second place if the state
            # folder cannot hold them.
            options = {"output_folder": str(clip_folder(plan.request))}
            if os.environ.get(INJECT_STALL_ENV):
                options["inject_stall"] = os.environ[INJECT_STALL_ENV]
            payload = group.run(Job(job_id, plan.request, previews, options), sink)
        except WorkerFailure:
            self.group = None  # already torn down; the next job starts a new group
            raise
        timings = {
            "load_s": load_s,
            "encode_s": payload["timings"]["encode_s"],
            "denoise_s": payload["timings"]["denoise_s"],
            "decode_s": payload["timings"]["decode_s"],
        }
        timings["total_s"] = time.perf_counter() - start
        pending = Path(payload["pending"]) if payload.get("pending") else None
        return RunResult(
            plan, payload["output"], payload["rate"], payload["latents"], timings, payload["ranks"], pending
        )

    def generate(
        self, request: GenerationRequest, on_event: EventSink | None = None, previews: bool = True
    ) -> dict[str, Any]:
        """Plans, runs and saves one clip; returns the CLI's `generate --json` object.

        The output path is checked before the run, so a bad folder fails before any work.
        """
        from engine.outputs import plan_output

        plan = self.plan(request)
        path = plan_output(request.output, plan.adapter.modality, clip_stem(plan.request))
        result = self.run(plan, on_event, previews=previews)
        if self._cancel.is_set():  # cancelled after the decode: skip the save, keep nothing
            result.discard_pending()
            raise JobCancelled()
        return self.save(result, path, on_event)

    def save(self, result: RunResult, path: Path, on_event: EventSink | None = None) -> dict[str, Any]:
        from engine.outputs import build_metadata, sidecar_path, write_clip

        start = time.perf_counter()
        if on_event:
            on_event(StageEvent("", "save"))
        request = result.plan.request
        metadata = build_metadata(request, timings=result.timings, ranks=result.ranks)
        try:
            if result.plan.adapter.modality == "audio":
                clip = write_clip(path, audio=result.output, sample_rate=int(result.rate), metadata=metadata)
            else:
                clip = write_clip(path, frames=result.output, fps=result.rate, metadata=metadata)
        except UserError as exc:
            if result.pending is None:
                raise
            raise UserError(
                f"{exc.problem} The generated latents are kept in {result.pending}.",
                f"{exc.fix} Then run `{decode_command(result.pending, request)}` to save the clip.",
            ) from None
        result.discard_pending()
        result.timings["total_s"] += time.perf_counter() - start
        return {
            "output": str(clip),
            "metadata": str(sidecar_path(clip)),
            "model": request.model,
            "strategy": request.strategy,
            "strategy_options": request.strategy_options,
            "devices": request.devices,
            "seed": request.seed,
            "timings": result.timings,
            "ranks": result.ranks,
        }

    def finish_pending(
        self, path: str | Path, output: str | None = None, device: str = "cpu"
    ) -> dict[str, Any]:
        """Decodes kept latents in this process and saves the clip (`parastep-studio decode`)."""
        import torch

        from engine.catalog import read_entry
        from engine.loading import load_pipeline, resolve_dtype
        from engine.output_policy import check_output_inside
        from engine.outputs import default_output_dir, plan_output
        from engine.pending_decode import decode_with_fallback, load_pending

        latents, request, model_path = load_pending(path)
        if output is None:  # a path read from a file: only inside the default output folder
            check_output_inside(request.output, [default_output_dir()], f"the latents file {path}")
        entry = read_entry(model_path)
        adapter = adapter_for(entry)
        try:  # a latents file is data: its request gets the plan's checks (not its image: may be gone)
            adapter.resolve(request, entry, inputs=False)
        except UserError as exc:
            raise UserError(f"The request stored in '{path}' is not valid: {exc.problem}", exc.fix) from None
        target = plan_output(
            output if output is not None else request.output, adapter.modality, clip_stem(request)
        )
        start = time.perf_counter()
        pipe = load_pipeline(entry, device, resolve_dtype(self.dtype, device))
        load_s = time.perf_counter() - start
        with torch.inference_mode():
            decoded = decode_with_fallback(
                lambda p, x: adapter.decode(p, x, request), pipe, latents.to(device), lambda message: None
            )
        timings = {"load_s": load_s, "decode_s": time.perf_counter() - start - load_s}
        timings["total_s"] = time.perf_counter() - start
        plan = Plan(entry, adapter, request, [device])
        result = RunResult(
            plan, decoded, adapter.output_rate(pipe, request), None, timings, [], Path(path).expanduser()
        )
        return self.save(result, target)

    def cancel(self) -> None:
        """Stops the running job at the next step boundary every rank agrees on; skips the decode.

        Safe to call from another thread, at any stage (a cancel during loading stops the job
        once the model is loaded).
        """
        self._cancel.set()

    def shutdown(self) -> None:
        if self.group is not None:
            self.group.shutdown()
            self.group = None

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _check_device_count(strategy: Any, spec: str, count: int, on_cpu: bool = True) -> None:
    low, high, multiple = strategy.min_devices, strategy.max_devices, strategy.device_multiple
    if low <= count and (high is None or count <= high) and count % multiple == 0:
        return
    if high == low:
        wanted = f"{low}"
    elif high is None:
        wanted = f"at least {low}" + (f", a multiple of {multiple}" if multiple > 1 else "")
    else:
        wanted = f"{low} to {high}"
    example = "cpu:1 or a single GPU" if high == 1 else f"cpu:{max(low, multiple)} or that many GPUs"
    # The nearest valid count, for a one-click fix of CPU workers (GPUs are the user's to pick).
    fitting = max(low, count + (-count) % multiple)
    fitting = fitting if high is None else min(fitting, high)
    raise UserError(
        f"Strategy '{strategy.name}' runs on {wanted} device(s); '{spec}' gives {count}.",
        f"Use --devices {example}, or pick another strategy.",
        field="devices",
        value=f"cpu:{fitting}" if on_cpu else None,
    )


def _check_scheduler(strategy: Any, entry: ModelEntry) -> None:
    """Strategies that keep ranks or look-ahead slots in step with the loop need a scheduler of order
    1 (one `scheduler.step` per denoiser evaluation); BatchStep also calls `step` itself, which needs
    nothing from the loop but the prediction, the timestep and the sample."""
    scheduler = scheduler_class(entry)
    if scheduler is None or not strategy.needs_every_step:
        return
    if getattr(scheduler, "order", 1) != 1:
        raise UserError(
            f"'{entry.name}' uses {scheduler.__name__}, a scheduler of order {scheduler.order} (several "
            f"denoiser calls per step), which '{strategy.name}' cannot split.",
            "Use the sequential strategy, or a first-order scheduler (DDIM, Euler, DPM-Solver multistep).",
        )
    extra = loop_state_arguments(scheduler)
    if strategy.steps_scheduler_itself and extra:
        raise UserError(
            f"'{entry.name}' uses {scheduler.__name__}, whose step needs {', '.join(extra)} from the loop; "
            f"{strategy.name}'s look-ahead cannot call it.",
            "Use parastep or sequential for this model.",
        )


def scheduler_class(entry: ModelEntry) -> Any:
    """The diffusers class named in the model's scheduler config (None: none or unknown)."""
    import diffusers

    from engine.catalog import read_model_json

    config = entry.path / "scheduler" / "scheduler_config.json"
    name = read_model_json(config).get("_class_name", "") if config.is_file() else ""
    if not isinstance(name, str):
        raise UserError(f"'{config}' has _class_name {name!r}, not a class name.", "Restore the file.")
    return getattr(diffusers, name, None) if name else None


def loop_state_arguments(scheduler: Any) -> list[str]:
    """Required arguments of `scheduler.step` beyond (model_output, timestep, sample): state the loop
    carries from step to step (CogVideoXDPMScheduler's previous estimate and its timestep)."""
    import inspect

    parameters = inspect.signature(scheduler.step).parameters.values()
    required = [p.name for p in parameters if p.default is inspect.Parameter.empty and p.name != "self"]
    return [name for name in required if name not in ("model_output", "timestep", "sample")]


def clip_stem(request: GenerationRequest) -> str:
    model = Path(request.model).name or "model"
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{model}-{request.strategy}-seed{request.seed}"
