"""Final latents kept on disk until their clip is saved, and a decode that falls back instead of failing.

An out-of-memory in the VAE decode, a full disk or an unwritable folder must not throw a long
denoising run away: rank 0 writes the final latents (with the request) before it decodes, the
engine deletes them once the clip is written, and `parastep-studio decode FILE` finishes a run
whose save failed. The decode itself retries with VAE tiling/slicing, then on the CPU.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.errors import UserError, out_of_memory
from engine.job_queue import default_state_dir
from engine.protocol import GenerationRequest

INJECT_OOM_ENV = "PARASTEP_INJECT_DECODE_OOM"  # tests: this many decode attempts raise out-of-memory
_injected = {"left": None}


def pending_dir() -> Path:
    return default_state_dir() / "pending"


def decode_command(pending: Path, request: GenerationRequest) -> str:
    """The command that finishes a kept run. `decode` trusts no path read from the latents file
    (engine.output_policy), so a run that chose its output names it explicitly."""
    import shlex

    command = f"parastep-studio decode {shlex.quote(str(pending))}"
    if request.output:
        command += f" --output {shlex.quote(request.output)}"
    return command


def save_pending(
    latents: Any,
    request: GenerationRequest,
    model_path: Path,
    job_id: str,
    log: Callable[[str], None] = lambda message: None,
    output_folder: Path | None = None,
) -> Path:
    """Writes the latents (safetensors, with the request in its metadata) atomically: in the state
    folder, else (full, read-only) next to the output; if neither can hold them, fails before the
    decode with both reasons rather than decode a run it could not keep. `output_folder`: where the
    clip goes, as the engine resolved it (a worker's environment may be older than the engine's)."""
    from safetensors.torch import save

    metadata = {"request": json.dumps(request.to_dict()), "model_path": str(model_path)}
    # Written by Python, not safetensors.save_file, which returned without an error on a full disk.
    data = save({"latents": latents.detach().contiguous().cpu()}, metadata=metadata)
    places = [
        (pending_dir(), f"{job_id}.safetensors"),
        (output_folder or clip_folder(request), f"parastep-latents-{job_id}.safetensors"),
    ]
    reasons = []
    for folder, name in places:
        path = folder / name
        temporary = path.with_suffix(".partial")
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with open(temporary, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except OSError as exc:
            try:  # a partial file on a full disk
                temporary.unlink(missing_ok=True)
            except OSError:
                pass
            reasons.append(f"{folder} ({exc.strerror or exc})")
            continue
        if reasons:
            log(f"The final latents could not be kept in {reasons[0]}; they are in {path} instead.")
        return path
    raise UserError(
        f"The final latents could not be written to {reasons[0]} nor next to the output in {reasons[1]}; "
        "the job stopped before the decode.",
        f"Free space in {pending_dir()} (or set PARASTEP_STATE_DIR to a folder with room), then run "
        "it again.",
    )


def clip_folder(request: GenerationRequest) -> Path:
    """The folder the clip goes to (engine.outputs.plan_output's rule, without creating anything)."""
    from engine.outputs import default_output_dir

    if not request.output:
        return default_output_dir()
    path = Path(request.output).expanduser()
    return path if request.output.endswith(("/", os.sep)) or path.is_dir() else path.parent


def load_pending(path: str | Path) -> tuple[Any, GenerationRequest, Path]:
    """(latents, request, model folder) of a saved run, or a clear error."""
    from safetensors import safe_open

    file = Path(path).expanduser()
    if not file.is_file():
        raise UserError(f"Saved latents '{file}' do not exist.", f"List what is kept in {pending_dir()}.")
    try:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata() or {}
            latents = handle.get_tensor("latents")
        request = GenerationRequest.from_dict(json.loads(metadata["request"]))
        return latents, request, Path(metadata["model_path"])
    except UserError as exc:  # the stored request is checked like a new one
        raise UserError(f"The request stored in '{file}' is not valid: {exc.problem}", exc.fix) from None
    except Exception as exc:  # safetensors and json raise their own types
        raise UserError(
            f"'{file}' is not a latents file saved by ParaStep Studio ({exc}).",
            "Pass a file from " + str(pending_dir()),
        ) from None


def decode_with_fallback(
    decode: Callable[[Any, Any], Any], pipe: Any, latents: Any, log: Callable[[str], None]
) -> Any:
    """decode(pipe, latents), retried with VAE tiling/slicing and then on the CPU on out-of-memory."""
    import torch

    def tiled() -> None:
        for name in ("enable_tiling", "enable_slicing"):
            if hasattr(pipe.vae, name):
                getattr(pipe.vae, name)()

    def untiled() -> None:
        for name in ("disable_tiling", "disable_slicing"):
            if hasattr(pipe.vae, name):
                getattr(pipe.vae, name)()

    attempts = [("as configured", None), ("with VAE tiling and slicing", tiled), ("on the CPU", "cpu")]
    for number, (label, change) in enumerate(attempts):
        device = None
        try:
            if callable(change):
                change()
            elif change == "cpu":
                device = pipe.vae.device
                _move_decoders(pipe, "cpu")
                latents = latents.to("cpu")
            _maybe_inject_oom()
            return decode(pipe, latents)
        except Exception as exc:
            if not out_of_memory(exc) or number == len(attempts) - 1:
                raise
            log(f"Out of memory decoding {label}; trying again {attempts[number + 1][0]}.")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        finally:
            if callable(change):
                untiled()
            if device is not None:
                _move_decoders(pipe, device)
    raise AssertionError("unreachable")


def _move_decoders(pipe: Any, device: Any) -> None:
    for name in ("vae", "vocoder"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.to(device)


def _maybe_inject_oom() -> None:
    import torch

    if _injected["left"] is None:
        _injected["left"] = int(os.environ.get(INJECT_OOM_ENV, "0"))
    if _injected["left"] > 0:
        _injected["left"] -= 1
        raise torch.OutOfMemoryError("injected for a test")
