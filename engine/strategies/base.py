"""What every strategy shares: two interception points on a stock pipeline, and per-rank counters.

A strategy never copies a pipeline's `__call__`. It installs

- a diffusers `ModelHook` on the denoiser (transformer or UNet) whose `new_forward` may compute,
  return a cached or received output, or exchange tensors, and
- a wrapper around `scheduler.step`, which may replace the returned latent (after a broadcast) and
  sees `pred_original_sample` for previews.

A *step* is everything between two `scheduler.step` calls. Older loops (CogVideoX, SVD, AudioLDM2)
call the denoiser once per step on a batch holding both guidance halves; newer ones (Wan,
HunyuanVideo 1.5, LTX-2) make several calls per step (conditional, unconditional, ...), and Wan 2.2
switches from `transformer` to `transformer_2` at a boundary. So the hook sits on every denoiser,
the wrapper counts steps, and `self.call` numbers the calls within a step: what a strategy caches,
reuses, sends or splits is keyed by (step, call).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from diffusers.hooks import HookRegistry, ModelHook

from engine.errors import JobCancelled, UserError
from engine.protocol import RankCounters

HOOK_NAME = "parastep_strategy"


@dataclass
class StepReport:
    """What a rank did in one step, handed to the worker for its events."""

    step: int
    action: str  # compute | reuse | receive | idle | batched
    compute_s: float
    comm_wait_s: float
    pred_original_sample: torch.Tensor | None


@dataclass
class JobContext:
    """Per-job facts a strategy needs, set by the worker before the pipeline call."""

    rank: int
    world_size: int
    device: torch.device
    total_steps: int
    options: dict[str, Any]
    # Rebuilds the denoiser input for a look-ahead latent and combines CFG halves (family adapter).
    adapter: Any = None
    pipe: Any = None
    params: Any = None
    cancel_requested: Callable[[], bool] = lambda: False
    on_step: Callable[[StepReport], None] = lambda report: None
    on_first_denoise: Callable[[], None] = lambda: None
    group: Any = None  # the torch.distributed group; None is the default (world) group


def split_output(output: Any) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    """The denoiser's prediction tensor, and a function that rebuilds the output around another one."""
    if isinstance(output, torch.Tensor):
        return output, lambda t: t
    if isinstance(output, tuple | list):
        rest = tuple(output[1:])
        return output[0], lambda t: (t, *rest)
    if hasattr(output, "sample"):  # a diffusers BaseOutput (return_dict=True)
        cls = type(output)
        return output.sample, lambda t: cls(sample=t)
    raise TypeError(f"Unsupported denoiser output type {type(output).__name__}")


class _DenoiserHook(ModelHook):
    """Routes every denoiser forward through the strategy."""

    def __init__(self, strategy: Strategy) -> None:
        super().__init__()
        self.strategy = strategy

    def new_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        return self.strategy._denoise(module, self.fn_ref.original_forward, args, kwargs)


@dataclass(frozen=True)
class Peers:
    """Ranks that exchange tensors: their torch.distributed group (None: the world group), this
    rank's index among them and their count. Ranks named to send/recv/broadcast are group indices."""

    group: Any
    rank: int
    size: int


@dataclass(frozen=True)
class StrategyOption:
    """An option a strategy takes; the CLI and the window build their controls from these."""

    name: str
    help: str
    default: int | None = None  # None: chosen per model family (e.g. the warm-up)
    minimum: int = 0
    maximum: int | None = None  # 0..1 is an on/off switch (a check box in the window)


class Strategy:
    """Base class: subclasses implement `denoise` and, where they communicate, `after_step`."""

    name = "strategy"
    description = ""
    options: tuple[StrategyOption, ...] = ()
    min_devices = 1
    max_devices: int | None = 1  # None: any number
    device_multiple = 1  # the device count must be a multiple of this (e.g. CFG pairs)
    one_call_per_step = False  # True: the strategy splits the denoiser itself and needs one call a step
    needs_every_step = True  # False: the loop runs untouched (any schedule length, any scheduler order)
    keeps_denoiser_whole = True  # False: patches or splits the denoiser's layers (LoRA is refused)
    steps_scheduler_itself = False  # True: calls scheduler.step outside the loop (BatchStep's look-ahead)
    # Ideal loop speedup, factor * T / (W + ceil((T - W) / width)), described as data so that the
    # window (which cannot import this module) computes it too: width is the rank count divided by
    # `ranks_per_width` ("ranks"), an option's value (e.g. "lookahead") or 1 (""); with a
    # `stride_from` option S, (ranks - S + 1) parts each run once per S steps: width (ranks - S + 1) * S.
    # W is the "warmup" option (0 without one, and 0 when `warmup_parallel`: warm-up steps that are
    # split across the ranks too, only synchronously); `rounds` marks steps that go in rounds of width.
    width_from = ""
    ranks_per_width = 1
    stride_from = ""
    warmup_parallel = False
    speedup_factor = 1
    rounds = False

    @classmethod
    def parallel_width(cls, options: dict[str, Any], ranks: int) -> int:
        if cls.width_from == "ranks":
            stride = int(options.get(cls.stride_from, 1) or 1) if cls.stride_from else 1
            return max(1, (ranks // cls.ranks_per_width - stride + 1) * stride)
        if cls.width_from:
            return int(options.get(cls.width_from, 1))
        return 1

    @classmethod
    def ideal_speedup(cls, steps: int, options: dict[str, Any], ranks: int) -> float:
        width = cls.parallel_width(options, ranks)
        warmup = 0 if cls.warmup_parallel else int(options.get("warmup", 0) or 0)
        loop = ideal_speedup(steps, warmup, width) if width > 1 else 1.0
        return cls.speedup_factor * loop

    @classmethod
    def unavailable_reason(cls, entry: Any) -> str | None:
        """Why this strategy cannot run this model at all (None: it can); reads config files only,
        so the catalog can tell the window before anything is loaded."""
        return None

    @classmethod
    def check_request(cls, request: Any, adapter: Any, ranks: int) -> None:
        """Raises UserError when this resolved request cannot run under the strategy on `ranks`."""

    @classmethod
    def check_model_request(cls, request: Any, entry: Any, ranks: int) -> None:
        """As check_request, for checks that read the model's config files (e.g. latent sizes)."""

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """What the CLI and the window show, and what the window needs for the ideal speedup."""
        return {
            "name": cls.name,
            "description": cls.description,
            "min_devices": cls.min_devices,
            "max_devices": cls.max_devices,
            "device_multiple": cls.device_multiple,
            "options": [
                {
                    "name": o.name,
                    "help": o.help,
                    "default": o.default,
                    "minimum": o.minimum,
                    "maximum": o.maximum,
                }
                for o in cls.options
            ],
            "ideal": {
                "width_from": cls.width_from,
                "ranks_per_width": cls.ranks_per_width,
                "stride_from": cls.stride_from,
                "warmup_parallel": cls.warmup_parallel,
                "factor": cls.speedup_factor,
                "rounds": cls.rounds,
            },
        }

    def __init__(self, ctx: JobContext) -> None:
        self.ctx = ctx
        self.counters = RankCounters(rank=ctx.rank)
        self.world = Peers(ctx.group, ctx.rank, ctx.world_size)
        self.peers = self.world  # whom send/recv/broadcast talk to unless told otherwise
        self.step = 0
        self.call = 0  # index of the current denoiser call within the step
        self.calls_per_step: int | None = None  # learned at step 0
        self.noise: torch.Tensor | None = None  # the (guided) prediction the loop gave scheduler.step
        self.latent: torch.Tensor | None = None  # latest latent returned by scheduler.step
        self.last_step_kwargs: dict[str, Any] = {}
        self._step_compute = 0.0
        self._step_wait = 0.0
        self._action = "compute"
        self._installed: tuple[Any, Any] | None = None
        self._timed_first = False

    # ---- installation -------------------------------------------------------------------------
    def install(self, pipe: Any) -> None:
        denoisers = denoisers_of(pipe)
        for denoiser in denoisers:
            HookRegistry.check_if_exists_or_initialize(denoiser).register_hook(_DenoiserHook(self), HOOK_NAME)
        scheduler = pipe.scheduler
        original_step = scheduler.step

        # wraps(): pipelines inspect step's signature to decide whether to pass eta and generator.
        @functools.wraps(original_step)
        def step(*args: Any, **kwargs: Any) -> Any:
            return self._scheduler_step(original_step, args, kwargs)

        scheduler.step = step
        self._installed = (denoisers, scheduler)

    def uninstall(self) -> None:
        if self._installed is None:
            return
        denoisers, scheduler = self._installed
        for denoiser in denoisers:
            HookRegistry.check_if_exists_or_initialize(denoiser).remove_hook(HOOK_NAME, recurse=False)
        del scheduler.step  # drops the instance attribute, the class method shows through again
        self._installed = None

    # ---- the two interception points ----------------------------------------------------------
    def _denoise(self, module: torch.nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        if self.call and self.one_call_per_step:  # every rank meets it at the same step
            raise UserError(
                f"{type(module).__name__} is called more than once per step (e.g. separate conditional "
                f"and unconditional passes); '{self.name}' splits the denoiser itself and needs one call "
                "per step.",
                "Use parastep, batchstep, cfg-parallel or sequential for this pipeline.",
            )
        if self.needs_every_step and self.calls_per_step is not None and self.call >= self.calls_per_step:
            self._refuse_call_layout(self.call + 1)
        if not self._timed_first:
            self._timed_first = True
            self._check_step_count()
            self.ctx.on_first_denoise()
        output = self.denoise(forward, args, kwargs)
        self.call += 1
        return output

    def _refuse_call_layout(self, calls: int) -> None:
        """Every rank meets the same loop, so all refuse at the same call: nobody waits on a peer."""
        raise UserError(
            f"The loop calls the denoiser {calls} times in step {self.step} where step 0 had "
            f"{self.calls_per_step}; '{self.name}' needs the same calls at every step.",
            "Use the sequential strategy for this pipeline.",
        )

    def _check_step_count(self) -> None:
        """Round arithmetic assumes the loop runs the requested step count; a pipeline that trims
        its schedule (e.g. an img2img `strength`) would desynchronise the ranks' rounds."""
        timesteps = getattr(getattr(self.ctx.pipe, "scheduler", None), "timesteps", None)
        if not self.needs_every_step or timesteps is None or len(timesteps) == self.ctx.total_steps:
            return
        raise UserError(
            f"The pipeline runs {len(timesteps)} steps where {self.ctx.total_steps} were asked (it trims "
            "its schedule, e.g. by an img2img strength); step-parallel strategies need every step.",
            "Use the sequential strategy for this pipeline.",
        )

    def _scheduler_step(self, original_step: Callable, args: tuple, kwargs: dict) -> Any:
        want_dict = kwargs.pop("return_dict", True)
        if self.calls_per_step is None:
            self.calls_per_step = self.call
        elif self.needs_every_step and self.call != self.calls_per_step:
            self._refuse_call_layout(self.call)
        self.noise = args[0] if args else kwargs.get("model_output")
        self.last_step_kwargs = {k: v for k, v in kwargs.items() if k != "model_output"}
        output = original_step(*args, **kwargs, return_dict=True)
        self.latent = output.prev_sample
        self.after_step(output.prev_sample)
        x0 = getattr(output, "pred_original_sample", None)
        if x0 is None and self._installed is not None and self.ctx.rank == 0:  # only rank 0 previews
            x0 = estimated_x0(self._installed[1], args, kwargs, self.noise)
        self.ctx.on_step(StepReport(self.step, self._action, self._step_compute, self._step_wait, x0))
        self.step += 1
        self._step_compute = self._step_wait = 0.0
        self.call = 0
        return output if want_dict else output.to_tuple()

    # ---- to be implemented ----------------------------------------------------------------------
    def denoise(self, forward: Callable, args: tuple, kwargs: dict) -> Any:
        return self.compute(forward, args, kwargs)

    def after_step(self, latent: torch.Tensor) -> None:
        """Called after every scheduler step with the new latent (may be replaced in place)."""
        if self.ctx.cancel_requested():
            raise JobCancelled()

    # ---- helpers for subclasses -----------------------------------------------------------------
    def compute(self, forward: Callable, args: tuple, kwargs: dict) -> Any:
        """Runs the real denoiser, counted as compute."""
        self._sync_device()
        start = time.perf_counter()
        output = forward(*args, **kwargs)
        self._sync_device()
        elapsed = time.perf_counter() - start
        self.counters.denoiser_calls += 1
        self.counters.compute_s += elapsed
        self._step_compute += elapsed
        self._action = "compute"
        return output

    def _sync_device(self) -> None:
        if self.ctx.device.type == "cuda":
            torch.cuda.synchronize(self.ctx.device)

    def _waited(self, start: float) -> None:
        self._sync_device()  # NCCL ops return once queued; the wait is real only after a sync
        elapsed = time.perf_counter() - start
        self.counters.comm_wait_s += elapsed
        self._step_wait += elapsed

    def send(self, tensor: torch.Tensor, dst: int, peers: Peers | None = None, tag: int = 0) -> dist.Work:
        """Starts a point-to-point send; the caller waits on the returned work. `tag`: the call of
        the step, so that a step's several predictions pair up with their receives."""
        peers = peers or self.peers
        self.counters.bytes_sent += tensor.numel() * tensor.element_size()
        return dist.isend(tensor.contiguous(), group=peers.group, group_dst=dst, tag=tag)

    def wait(self, work: dist.Work | None) -> None:
        if work is not None:
            start = time.perf_counter()
            work.wait()
            self._waited(start)

    def recv(self, like: torch.Tensor, src: int, peers: Peers | None = None, tag: int = 0) -> torch.Tensor:
        peers = peers or self.peers
        # Contiguous whatever `like`'s strides: gloo and NCCL need it, and some denoisers return a
        # permuted view (HunyuanVideo 1.5's unpatchify), which empty_like would copy.
        buffer = torch.empty_like(like, memory_format=torch.contiguous_format)
        start = time.perf_counter()
        dist.recv(buffer, group=peers.group, group_src=src, tag=tag)
        self._waited(start)
        self.counters.bytes_received += buffer.numel() * buffer.element_size()
        return buffer

    def broadcast(self, tensor: torch.Tensor, src: int = 0, peers: Peers | None = None) -> None:
        """In-place broadcast from `src`; the root counts one copy sent per receiver."""
        peers = peers or self.peers
        nbytes = tensor.numel() * tensor.element_size()
        start = time.perf_counter()
        dist.broadcast(tensor, group=peers.group, group_src=src)
        self._waited(start)
        if peers.rank == src:
            self.counters.bytes_sent += nbytes * (peers.size - 1)
        else:
            self.counters.bytes_received += nbytes

    def agree_on_cancel(self, decision: bool = False) -> bool:
        """World rank 0 decides whether the user cancelled and tells every rank, so all stop together.

        The same byte carries one more yes/no decision of rank 0's (`decision`), returned on every rank.
        """
        cancelled = self.ctx.rank == 0 and self.ctx.cancel_requested()
        flag = torch.tensor([int(cancelled) | int(decision) << 1], dtype=torch.uint8, device=self.ctx.device)
        self.broadcast(flag, peers=self.world)
        if flag.item() & 1:
            raise JobCancelled()
        return bool(flag.item() & 2)


def estimated_x0(scheduler: Any, args: tuple, kwargs: dict, noise: Any) -> torch.Tensor | None:
    """The clean-sample estimate of the step just taken, for previews, where the step's output
    carries no `pred_original_sample`:

    - multistep solvers that work in data prediction (DPM-Solver++, the cosine DPM-Solver, which has
      no other algorithm, UniPC's `predict_x0`) keep it as their newest model output;
    - flow matching (FlowMatchEuler): x_t = (1 - s) x0 + s eps and the model predicts v = eps - x0,
      so x0 = x_t - s v, with s the sigma of the step just taken.
    """
    algorithm = getattr(scheduler.config, "algorithm_type", None)  # None: always data prediction
    data = getattr(scheduler, "predict_x0", False) or algorithm is None or "++" in algorithm
    outputs = getattr(scheduler, "model_outputs", None)
    if outputs and outputs[-1] is not None and data:
        return outputs[-1]
    index = getattr(scheduler, "step_index", None)
    sample = args[2] if len(args) > 2 else kwargs.get("sample")
    flow = getattr(scheduler.config, "prediction_type", None) == "flow_prediction"
    if (
        not (flow or "FlowMatch" in type(scheduler).__name__)
        or index is None
        or sample is None
        or noise is None
    ):
        return None
    sigma = scheduler.sigmas[index - 1].to(sample.device, torch.float32)
    return (sample.float() - sigma * noise.float()).to(sample.dtype)


# diffusers' component names for denoisers; transformer_2 is a second expert (Wan 2.2 A14B's low-noise one).
DENOISER_NAMES = ("transformer", "transformer_2", "unet")


def denoisers_of(pipe: Any) -> list[torch.nn.Module]:
    """Every module the loop may call in a step: the transformers of DiTs (two experts in Wan 2.2
    A14B), else the UNet."""
    found = [getattr(pipe, name, None) for name in DENOISER_NAMES]
    found = [module for module in found if isinstance(module, torch.nn.Module)]
    if not found:
        raise UserError(
            f"{type(pipe).__name__} has neither a transformer nor a UNet to run a strategy on.",
            "Use a pipeline whose loop calls a denoiser at every step.",
        )
    return found


def denoiser_of(pipe: Any) -> torch.nn.Module:
    """The first denoiser the loop calls: the transformer of DiTs, else the UNet."""
    return denoisers_of(pipe)[0]


def ideal_speedup(total_steps: int, warmup: int, width: int) -> float:
    """Loop speedup if only the exact-step calls cost time: T / (W + ceil((T - W) / N))."""
    if total_steps <= 0:
        return 1.0
    warmup = min(max(warmup, 0), total_steps)
    rounds = -(-(total_steps - warmup) // width) if total_steps > warmup else 0
    return total_steps / (warmup + rounds)
