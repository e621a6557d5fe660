"""Single-device step-reuse caches shipped by diffusers, as strategies: the one-GPU baselines.

Each strategy applies one of diffusers' own cache hook sets (`diffusers.hooks`) to the denoiser in
`install` and removes exactly the hooks it added in `uninstall`, so the worker's warm pipeline is
the stock one again for the next job. The loop itself is untouched: one denoiser call per step,
the caches decide inside it what to compute.

- `cache-fbc` FirstBlockCache: the first transformer block always runs; when its residual changed
  by less than the threshold since the last full step, the other blocks reuse their last residual.
- `cache-pab` PyramidAttentionBroadcast: attention outputs are recomputed every N-th call and
  reused in between, in the middle of the run.
- `cache-faster` FasterCache: attention outputs extrapolated from the last two, and the
  unconditional half of the CFG batch estimated from the conditional one (frequency-wise).
- `cache-taylorseer` TaylorSeer: attention outputs forecast by a Taylor series between full steps.
- `cache-mag` MagCache: the blocks are skipped (last residual reused) while the accumulated change
  of the residual's magnitude, read from per-model calibration ratios, stays under the threshold.

Conventions shared by all of them:
- Options are whole numbers: thresholds per mille, shares of the run in percent; each cache has a
  value that means "never reuse" (threshold 0, or every-N of 1), which makes it the stock loop.
- Timestep windows (PAB, FasterCache) keep diffusers' default 0..1000 ranges but are measured as
  progress through the run, 1000 * (1 - step / steps), so that they mean the same for every
  scheduler (SVD's "timesteps" are log-sigmas, not 0..1000).
- Counters: a step counts as a denoiser call only when no cached unit was reused in it; a step
  that reused anything reports the action "reuse" (the timeline shows it).
- Which models: what diffusers' hooks find in the denoiser decides. `unavailable_reason` applies
  the cache to an empty (meta-device) skeleton of the denoiser built from its config file and
  refuses, with the requirement, when nothing gets hooked.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    HookRegistry,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
    apply_faster_cache,
    apply_first_block_cache,
    apply_mag_cache,
    apply_pyramid_attention_broadcast,
    apply_taylorseer_cache,
)
from diffusers.hooks.hooks import CacheContext, StateManager
from diffusers.hooks.mag_cache import MagCacheHeadHook
from diffusers.models.attention import AttentionModuleMixin
from diffusers.models.attention_processor import Attention, MochiAttention

from engine.errors import UserError
from engine.models import ADAPTERS, adapter_for_denoiser
from engine.strategies.base import JobContext, Strategy, StrategyOption, denoiser_of
from engine.strategies.denoiser_info import (
    config_mtime,
    denoiser_class_name,
    denoiser_skeleton,
    weights_stamp,
)

PROGRESS_SCALE = 1000.0  # diffusers' timestep ranges assume 1000 training timesteps
CONTEXT_NAME = "parastep"
REGISTRY_ATTR = "_diffusers_hook"  # where diffusers keeps a module's HookRegistry
ATTENTION_CLASSES = (Attention, MochiAttention, AttentionModuleMixin)
DIT_BLOCKS = (
    "a top-level list of transformer blocks of a kind diffusers registers (DiTs such as CogVideoX, "
    "Wan, Flux or HunyuanVideo); UNets have none"
)

Hook = tuple[torch.nn.Module, str]


# ---- adding and removing exactly the hooks a cache registers ------------------------------------
def _hook_names(module: torch.nn.Module) -> list[str]:
    registry = getattr(module, REGISTRY_ATTR, None)
    return list(registry._hook_order) if isinstance(registry, HookRegistry) else []


def apply_hooks(root: torch.nn.Module, apply: Callable[[], None]) -> tuple[list[Hook], set[int]]:
    """Runs `apply()`; returns the (module, hook name) pairs it registered under `root`, in order, and
    the ids of the modules that had no hook registry before (removal deletes the ones it created)."""
    had_registry = {id(m) for m in root.modules() if hasattr(m, REGISTRY_ATTR)}
    before = {(id(m), name) for m in root.modules() for name in _hook_names(m)}

    def added() -> list[Hook]:
        return [(m, n) for m in root.modules() for n in _hook_names(m) if (id(m), n) not in before]

    quiet = logging.getLogger("diffusers.hooks")  # FasterCache warns it is experimental on every apply
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        apply()
    except Exception:
        remove_hooks(root, added(), had_registry)
        raise
    finally:
        quiet.setLevel(level)
    return added(), had_registry


def remove_hooks(root: torch.nn.Module, hooks: list[Hook], had_registry: set[int]) -> None:
    """Removes `hooks` (last added first) and the registries that only they needed."""
    for module, name in reversed(hooks):
        getattr(module, REGISTRY_ATTR).remove_hook(name, recurse=False)
    for module, _ in hooks:
        registry = getattr(module, REGISTRY_ATTR, None)
        if registry is not None and not registry.hooks and id(module) not in had_registry:
            delattr(module, REGISTRY_ATTR)
    if hasattr(root, REGISTRY_ATTR):  # its cached list of child registries may name removed ones
        getattr(root, REGISTRY_ATTR).invalidate_child_registries_cache()


def _batch(args: tuple, kwargs: dict) -> int | None:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor) and value.ndim > 0:
            return value.shape[0]
    return None


class _ReuseCounter:
    """Counts the calls in which a hook did not compute in full: it returned a cached or predicted
    output without calling the module, or called it on a smaller batch (FasterCache's CFG half)."""

    def __init__(self, hook: Any) -> None:
        self.fn_ref = hook.fn_ref
        self.outer, self.inner = self.fn_ref.forward, self.fn_ref.original_forward
        self.reused = 0
        self._computed: int | None = None
        self.fn_ref.forward, self.fn_ref.original_forward = self._call, self._compute

    def _call(self, *args: Any, **kwargs: Any) -> Any:
        self._computed = None
        output = self.outer(*args, **kwargs)
        given = _batch(args, kwargs)
        if self._computed is None or (given is not None and self._computed < given):
            self.reused += 1
        return output

    def _compute(self, *args: Any, **kwargs: Any) -> Any:
        self._computed = _batch(args, kwargs) or 0
        return self.inner(*args, **kwargs)

    def restore(self) -> None:
        self.fn_ref.forward, self.fn_ref.original_forward = self.outer, self.inner


# ---- the shared strategy ---------------------------------------------------------------------------
class CacheStrategy(Strategy):
    """A diffusers cache on one device; subclasses give the config and the apply function."""

    max_devices = 1
    needs_every_step = False  # the caches count their own calls; the loop is left as it is
    cache = ""  # the cache's name, for messages
    needs = ""  # what the denoiser must have for the cache to find something to hook
    probe_options: dict[str, int] = {}  # options for the availability probe, over the defaults

    # ---- what each cache defines --------------------------------------------------------------
    def make_config(self, denoiser: torch.nn.Module) -> Any:
        raise NotImplementedError

    @staticmethod
    def apply(denoiser: torch.nn.Module, config: Any) -> None:
        raise NotImplementedError

    @classmethod
    def class_reason(cls, class_name: str) -> str | None:
        """A refusal known from the denoiser's class name alone (None: probe the skeleton)."""
        return None

    # ---- availability ---------------------------------------------------------------------------
    @classmethod
    def unavailable_reason(cls, entry: Any) -> str | None:
        path = Path(entry.path).resolve()
        return _model_reason(cls, str(path), config_mtime(path))

    # ---- install / uninstall ----------------------------------------------------------------------
    def __init__(self, ctx: JobContext) -> None:
        super().__init__(ctx)
        self.hooks: list[Hook] = []
        self.counters_by_hook: list[_ReuseCounter] = []
        self.state_managers: list[StateManager] = []
        self.denoiser: torch.nn.Module | None = None
        self._had_registry: set[int] = set()

    def option(self, name: str) -> int:
        return int(self.ctx.options[name])

    def progress(self) -> float:
        """Where the run is, on diffusers' 1000..0 timestep scale (the timestep-window callback)."""
        return PROGRESS_SCALE * (1.0 - self.step / max(1, self.ctx.total_steps))

    def install(self, pipe: Any) -> None:
        denoiser = denoiser_of(pipe)
        self.prepare(pipe)
        config = self.make_config(denoiser)
        self.hooks, self._had_registry = apply_hooks(denoiser, lambda: self.apply(denoiser, config))
        self.denoiser = denoiser
        try:
            if not self.hooks:
                raise UserError(
                    f"diffusers' {self.cache} finds nothing to cache in {type(denoiser).__name__}: it needs "
                    f"{self.needs}.",
                    "Pick another strategy (sequential always works).",
                )
            for module, name in self.hooks:
                hook = getattr(module, REGISTRY_ATTR).get_hook(name)
                if hook.fn_ref.original_forward is not None:
                    self.counters_by_hook.append(_ReuseCounter(hook))
                self.state_managers += [v for v in vars(hook).values() if isinstance(v, StateManager)]
            super().install(pipe)  # after the cache: the strategy's hook is the outermost, and times it all
        except BaseException:
            self.uninstall()
            raise

    def prepare(self, pipe: Any) -> None:
        """Reads what the config needs from the pipeline (MagCache: the calibration)."""

    def uninstall(self) -> None:
        super().uninstall()  # first: diffusers unlinks a hook correctly only when it is the last one
        for counter in self.counters_by_hook:
            counter.restore()
        if self.denoiser is not None:
            remove_hooks(self.denoiser, self.hooks, self._had_registry)
        self.hooks, self.counters_by_hook, self.state_managers, self.denoiser = [], [], [], None

    # ---- the step ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def cache_context(self) -> Iterator[None]:
        """The context diffusers' stateful cache hooks key their state by (UNet loops set none)."""
        context = CacheContext(CONTEXT_NAME)
        for manager in self.state_managers:
            manager.set_context(context)
        try:
            yield
        finally:
            for manager in self.state_managers:
                manager.set_context(None)

    def reused_units(self) -> int:
        return sum(counter.reused for counter in self.counters_by_hook)

    def denoise(self, forward: Callable, args: tuple, kwargs: dict) -> Any:
        reused = self.reused_units()
        with self.cache_context():
            output = self.compute(forward, args, kwargs)
        if self.reused_units() > reused:
            self.counters.denoiser_calls -= 1  # compute() counted it; it was not a full computation
            self._action = "reuse"
        return output


@functools.lru_cache(maxsize=256)
def _model_reason(cls: type[CacheStrategy], model_path: str, mtime: float) -> str | None:
    path = Path(model_path)
    class_name = denoiser_class_name(path)
    if class_name is None:
        return f"{cls.cache} runs on a transformer or UNet denoiser; this pipeline has neither."
    reason = cls.class_reason(class_name)
    if reason is not None:
        return reason
    options = {o.name: o.default for o in cls.options} | cls.probe_options
    probe = cls(
        JobContext(rank=0, world_size=1, device=torch.device("meta"), total_steps=10, options=options)
    )
    with _probe_lock:  # one skeleton per model, shared by the caches' probes, each removing its hooks
        skeleton = _skeleton(model_path, mtime)
        if skeleton is None:
            return None  # cannot tell from the config; install refuses if nothing gets hooked
        try:
            hooks, had_registry = apply_hooks(
                skeleton, lambda: probe.apply(skeleton, probe.make_config(skeleton))
            )
        except Exception:
            hooks = []
        else:
            remove_hooks(skeleton, hooks, had_registry)
    if not hooks:
        return f"diffusers' {cls.cache} finds nothing to cache in {class_name}: it needs {cls.needs}."
    return None


_probe_lock = threading.Lock()  # the engine server answers catalog requests on a thread


@functools.lru_cache(maxsize=8)
def _skeleton(model_path: str, mtime: float) -> torch.nn.Module | None:
    return denoiser_skeleton(Path(model_path))


# ---- the caches ------------------------------------------------------------------------------------
class FirstBlockCacheStrategy(CacheStrategy):
    name = "cache-fbc"
    description = (
        "diffusers' FirstBlockCache on one device: when the first block's output barely changed since "
        "the last full step, the other blocks reuse their last residual."
    )
    options = (
        StrategyOption(
            "threshold",
            "Relative change of the first block's residual under which the other blocks are skipped, per "
            "mille (50 = 0.05; 0 = never skip).",
            50,
            0,
        ),
    )
    cache = "FirstBlockCache"
    needs = DIT_BLOCKS
    apply = staticmethod(apply_first_block_cache)

    def make_config(self, denoiser: torch.nn.Module) -> Any:
        return FirstBlockCacheConfig(threshold=self.option("threshold") / 1000)


class PyramidAttentionBroadcastStrategy(CacheStrategy):
    name = "cache-pab"
    description = (
        "diffusers' Pyramid Attention Broadcast on one device: in the middle of the run, attention "
        "outputs are recomputed every N-th step and reused in between."
    )
    options = (
        StrategyOption(
            "skip",
            "Self-attention is recomputed every N-th step and reused in between (1 = never reuse).",
            2,
            1,
        ),
        StrategyOption(
            "cross_skip", "The same for cross-attention, where the model has it (1 = never reuse).", 6, 1
        ),
    )
    cache = "PyramidAttentionBroadcast"
    needs = "diffusers attention layers inside transformer blocks"
    apply = staticmethod(apply_pyramid_attention_broadcast)

    def make_config(self, denoiser: torch.nn.Module) -> Any:
        # Window (100, 800) on the progress scale: the first ~20% and last ~10% of steps always compute.
        return PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=self.option("skip"),
            temporal_attention_block_skip_range=self.option("skip"),
            cross_attention_block_skip_range=self.option("cross_skip"),
            current_timestep_callback=self.progress,
        )


def faster_cache_layout(class_name: str | None) -> str:
    """The latent layout the denoiser is called with, as its family declares it ("": none)."""
    adapter = adapter_for_denoiser(class_name)
    return adapter.faster_cache_layout if adapter is not None else ""


class FasterCacheStrategy(CacheStrategy):
    name = "cache-faster"
    description = (
        "diffusers' FasterCache on one device: attention outputs extrapolated from the last two, and the "
        "unconditional half of guidance estimated from the conditional one, in the second part of the run."
    )
    options = (
        StrategyOption(
            "skip",
            "Self-attention is recomputed every N-th step and extrapolated in between (1 = never).",
            2,
            1,
        ),
        StrategyOption(
            "uncond_skip",
            "The unconditional half is computed every N-th step and estimated in between (1 = never).",
            5,
            1,
        ),
    )
    cache = "FasterCache"
    needs = "diffusers attention layers in top-level transformer blocks"
    apply = staticmethod(apply_faster_cache)

    @classmethod
    def class_reason(cls, class_name: str) -> str | None:
        if faster_cache_layout(class_name):
            return None
        known = sorted(a.denoiser_class for a in ADAPTERS.values() if a.faster_cache_layout)
        return (
            f"FasterCache needs a loop that batches both guidance halves into one call with keyword inputs "
            f"and the latent layout of {class_name}; the model families declare them for "
            f"{', '.join(known)} only."
        )

    def make_config(self, denoiser: torch.nn.Module) -> Any:
        adapter, request = self.ctx.adapter, self.ctx.params
        guided = adapter.uses_guidance(request) if adapter is not None and request is not None else True
        return FasterCacheConfig(
            spatial_attention_block_skip_range=self.option("skip"),
            unconditional_batch_skip_range=self.option("uncond_skip"),
            current_timestep_callback=self.progress,
            attention_weight_callback=lambda module: 0.5,  # diffusers' default, stated to keep it quiet
            tensor_format=faster_cache_layout(type(denoiser).__name__) or "BFCHW",
            is_guidance_distilled=not guided,  # no unconditional half to estimate
        )


class TaylorSeerStrategy(CacheStrategy):
    name = "cache-taylorseer"
    description = (
        "diffusers' TaylorSeer on one device: after the first steps, attention outputs are computed every "
        "N-th step and forecast by a Taylor series in between."
    )
    options = (
        StrategyOption(
            "interval", "Attention is computed every N-th step and forecast in between (1 = never).", 5, 1
        ),
        StrategyOption("start", "Steps computed in full before the first forecast.", 3, 1),
        StrategyOption("order", "Order of the Taylor series (0 = repeat the last output).", 1, 0),
    )
    cache = "TaylorSeer"
    needs = "diffusers attention layers"
    apply = staticmethod(apply_taylorseer_cache)

    def make_config(self, denoiser: torch.nn.Module) -> Any:
        # diffusers' default patterns ("^transformer_blocks.*attn", full match) miss CogVideoX's `attn1`
        # and every UNet, so the attention layers are named explicitly.
        names = [re.escape(n) for n, m in denoiser.named_modules() if isinstance(m, ATTENTION_CLASSES)]
        dtype = next(denoiser.parameters()).dtype
        return TaylorSeerCacheConfig(
            cache_interval=self.option("interval"),
            disable_cache_before_step=self.option("start"),
            max_order=self.option("order"),
            # diffusers' default bfloat16 factors; float32 models keep float32 (exact with interval 1)
            taylor_factors_dtype=torch.float32 if dtype == torch.float32 else torch.bfloat16,
            cache_identifiers=names,
        )


class MagCacheStrategy(CacheStrategy):
    name = "cache-mag"
    description = (
        "diffusers' MagCache on one device: the blocks are skipped while the accumulated change of the "
        "residual's magnitude, from this model's calibration, stays small. Calibrate once per model."
    )
    options = (
        StrategyOption(
            "threshold",
            "Accumulated magnitude error under which steps are skipped, per mille (60 = 0.06; 0 = never "
            "skip).",
            60,
            0,
        ),
        StrategyOption("max_skip", "Most consecutive steps skipped.", 3, 0),
        StrategyOption("retention", "First share of the steps never skipped, percent.", 20, 0),
        StrategyOption(
            "calibrate",
            "1: a full-cost run that records this model's magnitude ratios (once per model and scheduler); "
            "0: skip steps using them.",
            0,
            0,
        ),
    )
    cache = "MagCache"
    needs = DIT_BLOCKS
    probe_options = {"calibrate": 1}
    apply = staticmethod(apply_mag_cache)

    @classmethod
    def check_request(cls, request: Any, adapter: Any, ranks: int) -> None:
        options = request.strategy_options
        if options.get("calibrate", 0) > 1:
            raise UserError(
                f"--calibrate is {options['calibrate']}; it is 0 or 1.", "Use --calibrate 0 or 1."
            )
        if options.get("retention", 0) > 100:
            raise UserError(
                f"--retention is {options['retention']}%; at most 100.", "Use --retention 0 to 100."
            )

    @classmethod
    def check_model_request(cls, request: Any, entry: Any, ranks: int) -> None:
        """Refuses at plan time, from config files, a run with no recorded ratios (the worker checks
        again against the loaded pipeline)."""
        if request.strategy_options.get("calibrate", 0):
            return
        config = entry.path / "scheduler" / "scheduler_config.json"
        scheduler = json.loads(config.read_text()).get("_class_name", "") if config.is_file() else ""
        if not ratios_file_for(entry.path, denoiser_class_name(entry.path) or "", scheduler).is_file():
            raise UserError(*_no_ratios(scheduler))

    def __init__(self, ctx: JobContext) -> None:
        super().__init__(ctx)
        self.calibrating = bool(ctx.options.get("calibrate", 0))
        self.ratios: list[float] | None = None
        self.ratios_file: Path | None = None
        self.recorded: list[float] | None = None

    def prepare(self, pipe: Any) -> None:
        self.ratios_file = ratios_file(pipe)
        if self.calibrating:
            return
        try:
            self.ratios = json.loads(self.ratios_file.read_text())["ratios"]
        except (OSError, ValueError, KeyError):
            raise UserError(*_no_ratios(type(pipe.scheduler).__name__)) from None

    def make_config(self, denoiser: torch.nn.Module) -> Any:
        steps = self.ctx.total_steps
        if self.calibrating:
            return MagCacheConfig(calibrate=True, num_inference_steps=steps)
        return MagCacheConfig(
            threshold=self.option("threshold") / 1000,
            max_skip_steps=self.option("max_skip"),
            retention_ratio=self.option("retention") / 100,
            num_inference_steps=steps,
            mag_ratios=self.ratios,  # diffusers interpolates them to the step count
        )

    def denoise(self, forward: Callable, args: tuple, kwargs: dict) -> Any:
        if not self.calibrating:
            return super().denoise(forward, args, kwargs)
        # diffusers prints the ratios at the end of a calibration run; they go to a file instead.
        with self.cache_context(), contextlib.redirect_stdout(io.StringIO()):
            if self.recorded is None:  # the list diffusers appends each step's ratio to (replaced at the end)
                self.recorded = self._head_state().calibration_ratios
            output = self.compute(forward, args, kwargs)
        if len(self.recorded) == self.ctx.total_steps:
            save_ratios(self.ratios_file, self.recorded, self.ctx.total_steps)
        return output

    def _head_state(self) -> Any:
        for module, name in self.hooks:
            hook = getattr(module, REGISTRY_ATTR).get_hook(name)
            if isinstance(hook, MagCacheHeadHook):
                return hook.state_manager.get_state()
        raise RuntimeError("MagCache's head hook is missing")


# ---- MagCache calibrations ---------------------------------------------------------------------------
def _no_ratios(scheduler: str) -> tuple[str, str]:
    return (
        f"MagCache needs this model's magnitude ratios ({scheduler}); none are recorded yet.",
        "Run it once with --calibrate 1 (a full-cost run that records them), then run cache-mag again.",
    )


def ratios_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "parastep-studio" / "mag-ratios"


def ratios_file(pipe: Any) -> Path:
    """One calibration per model folder, denoiser weights and scheduler."""
    model = getattr(pipe, "name_or_path", None) or "unknown"
    return ratios_file_for(model, type(denoiser_of(pipe)).__name__, type(pipe.scheduler).__name__)


def ratios_file_for(model: str | Path, denoiser: str, scheduler: str) -> Path:
    folder = Path(model).expanduser().resolve()
    key = "|".join((str(folder), denoiser, scheduler, weights_stamp(folder)))
    return ratios_dir() / f"{hashlib.sha1(key.encode()).hexdigest()[:16]}.json"


def save_ratios(path: Path, ratios: list[float], steps: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps({"steps": steps, "ratios": [float(r) for r in ratios]}))
    temporary.replace(path)


CACHE_STRATEGIES = (
    FirstBlockCacheStrategy,
    PyramidAttentionBroadcastStrategy,
    FasterCacheStrategy,
    TaylorSeerStrategy,
    MagCacheStrategy,
)
