"""Context parallelism from diffusers itself: `enable_parallelism` with a `ContextParallelConfig`.

Every rank runs the whole loop on the same inputs (same seed, same latents). Inside each
transformer call the model's context-parallel plan (`_cp_plan`, declared by diffusers per model
class) splits the token sequence into N parts, one per rank; attention exchanges them (Ulysses: an
all-to-all that trades tokens for heads before attention and back after it; ring: key/value blocks
gathered from every rank) and the plan gathers the output on every rank, so all ranks hold the same
noise prediction and step identically. Exact up to float summation order; only rank 0 decodes.

Where it cannot run (refused at plan time, with the reason):
- models whose diffusers class declares no `_cp_plan` (CogVideoX, and the SVD and AudioLDM2 UNets,
  in diffusers 0.42; Wan, Flux, LTX-Video and QwenImage declare one);
- CPU workers: diffusers puts rank r on `torch.accelerator` device r % count and builds its device
  mesh there; with no accelerator that is a division by zero, and on a GPU machine the mesh would
  not be the CPU workers'. (With the device count patched to 1, the same calls run on gloo.)

Traffic per rank and transformer call, S tokens, D = heads x head dim, b bytes per element, L
attention layers; not in the rank counters, the collectives run inside diffusers:
- Ulysses: 4 all-to-alls (q, k, v out, result back) per layer, each sending (N-1)/N of the rank's
  S/N x D tensor: L * 4 * (N-1) * S * D * b / N^2;
- ring (all-gather rotation): k and v of S/N x D to N-1 ranks per layer: L * 2 * (N-1) * S * D * b / N;
- both: the output gather, (N-1) * (S/N) * C_out * b.
"""

from __future__ import annotations

from typing import Any

import torch

from engine.devices import parse_devices
from engine.errors import UserError
from engine.strategies.base import Strategy, StrategyOption, denoiser_of
from engine.strategies.denoiser_info import denoiser_class, denoiser_class_name

# Ring attention merges partial results by their log-sum-exp, which torch's plain SDPA does not return.
RING_BACKEND = "_native_cudnn"
RING_DTYPES = (torch.float16, torch.bfloat16)
# Device meshes are process groups: built once per worker and layout, reused by later jobs.
_MESHES: dict[tuple[str, int, int], Any] = {}


def has_accelerator() -> bool:
    return torch.accelerator.is_available() and torch.accelerator.device_count() > 0


class ContextParallelStrategy(Strategy):
    name = "context-parallel"
    description = (
        "diffusers' own context parallelism: each rank holds 1/N of the tokens and attention exchanges "
        "them (Ulysses or ring). Exact; heavy traffic inside every layer. GPUs, models with a plan."
    )
    options = (
        StrategyOption(
            "ring",
            "0: Ulysses attention (all-to-all of heads; heads must divide by N); 1: ring attention "
            "(fp16/bf16).",
            0,
            0,
        ),
    )
    min_devices = 2
    max_devices = None
    keeps_denoiser_whole = False
    needs_every_step = False  # every rank runs the whole loop; only the tokens are split
    width_from = "ranks"

    @classmethod
    def unavailable_reason(cls, entry: Any) -> str | None:
        import diffusers

        name = denoiser_class_name(entry.path)
        model = denoiser_class(entry.path)
        if model is None:
            return "it needs a diffusers transformer; this pipeline's denoiser is not one diffusers knows."
        if getattr(model, "_cp_plan", None) is None:
            return (
                f"diffusers {diffusers.__version__} declares no context-parallel plan (_cp_plan) for {name}; "
                "transformers such as Wan, Flux, LTX-Video and QwenImage have one."
            )
        return None

    @classmethod
    def check_request(cls, request: Any, adapter: Any, ranks: int) -> None:
        if request.strategy_options.get("ring", 0) > 1:
            raise UserError(
                f"--ring is {request.strategy_options['ring']}; it is 0 or 1.", "Use --ring 0 or 1."
            )
        devices = parse_devices(request.devices, cls.max_devices)
        if any(device.startswith("cpu") for device in devices) or not has_accelerator():
            raise UserError(
                "context-parallel runs diffusers' enable_parallelism, which places each rank on an "
                "accelerator (torch.accelerator) and builds its device mesh there; CPU workers cannot run "
                "it.",
                "Use two or more GPUs (--devices cuda:0,cuda:1), or a CPU strategy such as parastep.",
            )

    def __init__(self, ctx: Any) -> None:
        super().__init__(ctx)
        self.parallel_model: Any = None
        self.backend: str | None = None

    def install(self, pipe: Any) -> None:
        from diffusers import ContextParallelConfig

        denoiser = denoiser_of(pipe)
        n, ring = self.ctx.world_size, bool(self.ctx.options.get("ring", 0))
        heads = getattr(denoiser.config, "num_attention_heads", None)
        if not ring and heads and heads % n:
            raise UserError(
                f"Ulysses attention splits the {heads} attention heads over the ranks; {n} ranks do not "
                "divide them.",
                f"Use --ring 1, or a device count that divides {heads}.",
            )
        if ring and next(denoiser.parameters()).dtype not in RING_DTYPES:
            raise UserError(
                "Ring attention needs an attention kernel that returns log-sum-exp (cuDNN, fp16/bf16 only); "
                f"this model runs in {next(denoiser.parameters()).dtype}.",
                "Use --dtype fp16 or bf16, or Ulysses attention (--ring 0).",
            )
        self.backend = RING_BACKEND if ring else None
        degrees = (n, 1) if ring else (1, n)
        config = ContextParallelConfig(ring_degree=degrees[0], ulysses_degree=degrees[1], mesh=_mesh(degrees))
        denoiser.enable_parallelism(config=config)
        self.parallel_model = denoiser
        try:
            super().install(pipe)  # after the plan's hooks: the strategy's hook is outermost and times it all
        except BaseException:
            self.uninstall()
            raise

    def denoise(self, forward: Any, args: tuple, kwargs: dict) -> Any:
        if self.backend is None:  # Ulysses: diffusers' default (native) attention
            return self.compute(forward, args, kwargs)
        from diffusers import attention_backend

        with attention_backend(self.backend):  # for this call only: nothing stays set in the worker
            return self.compute(forward, args, kwargs)

    def uninstall(self) -> None:
        super().uninstall()  # first: diffusers unlinks a hook correctly only when it is the last one
        model, self.parallel_model = self.parallel_model, None
        if model is not None:
            disable_parallelism(model)


def _mesh(degrees: tuple[int, int]) -> Any:
    """The ("ring", "ulysses") device mesh diffusers would build, made once per layout."""
    from torch.distributed.device_mesh import init_device_mesh

    accelerator = torch.accelerator.current_accelerator()
    device_type = accelerator.type if accelerator is not None else "cpu"  # cpu: only with a patched count
    key = (device_type, *degrees)
    if key not in _MESHES:
        _MESHES[key] = init_device_mesh(device_type, mesh_shape=degrees, mesh_dim_names=("ring", "ulysses"))
    return _MESHES[key]


def disable_parallelism(model: Any) -> None:
    """Undoes `enable_parallelism` (diffusers has no inverse): the plan's hooks, the attention
    processors' config and the model's, so that the warm model runs alone again and accepts a
    later `enable_parallelism`."""
    from diffusers.hooks.context_parallel import remove_context_parallel

    remove_context_parallel(model, model._cp_plan)
    for module in model.modules():
        processor = getattr(module, "processor", None)
        if processor is not None and getattr(processor, "_parallel_config", None) is not None:
            processor._parallel_config = None
    model._parallel_config = None
