"""What can run a worker: CUDA GPUs and CPU worker processes, and parsing of device specs.

`cpu:N` means N worker processes with one intra-op thread each; `cuda:0,1` two GPUs; `auto` all
GPUs when there are any, else CPU workers.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

from engine.errors import UserError

MAX_CPU_WORKERS_PER_CORE = 4  # beyond this, oversubscription only measures the OS scheduler


@dataclass
class DeviceInfo:
    id: str
    kind: str  # cuda | cpu
    name: str
    memory_total: int | None = None
    memory_free: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def inventory() -> list[DeviceInfo]:
    import platform

    import torch

    devices = []
    for index in range(cuda_count()):
        # Device properties, not mem_get_info: that would create a CUDA context (hundreds of MB on
        # every GPU) in the engine process, which never computes. Free memory comes from NVML.
        properties = torch.cuda.get_device_properties(index)
        devices.append(
            DeviceInfo(
                f"cuda:{index}", "cuda", properties.name, properties.total_memory, _nvml_free_memory(index)
            )
        )
    try:
        import psutil  # optional: exact free memory

        memory = psutil.virtual_memory()
        total, free = memory.total, memory.available
    except ImportError:
        pages = os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
        total = pages * os.sysconf("SC_PAGE_SIZE") if pages else None
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") if pages else None
    name = f"{platform.processor() or platform.machine()} ({cpu_cores()} cores)"
    devices.append(DeviceInfo("cpu", "cpu", name, total, free))
    return devices


def parse_devices(spec: str, wanted: int | None = None) -> list[str]:
    """The device of each rank. `wanted` is how many ranks `auto` should give (None: all it can)."""
    spec = (spec or "auto").strip().lower()
    gpus = cuda_count()
    if spec == "auto":
        if gpus:
            count = gpus if wanted is None else min(wanted, gpus)
            return [f"cuda:{i}" for i in range(count)]
        count = min(cpu_cores(), 4) if wanted is None else wanted
        return ["cpu"] * max(1, count)
    if spec == "cpu":
        return ["cpu"]
    if spec.startswith("cpu:"):
        try:
            count = int(spec[4:])
        except ValueError:
            raise UserError(
                f"Device spec '{spec}' is malformed.", "Write cpu:N with N a whole number."
            ) from None
        limit = cpu_cores() * MAX_CPU_WORKERS_PER_CORE
        if not 1 <= count <= limit:
            raise UserError(
                f"cpu:{count} asks for {count} CPU workers; this machine has {cpu_cores()} cores "
                f"(at most {limit} workers).",
                f"Use cpu:1 to cpu:{limit}.",
                field="devices",
                value=f"cpu:{min(max(count, 1), limit)}",
            )
        return ["cpu"] * count
    if spec.startswith("cuda"):
        rest = spec[4:].lstrip(":")
        try:
            indices = [int(part) for part in rest.split(",")] if rest else [0]
        except ValueError:
            raise UserError(f"Device spec '{spec}' is malformed.", "Write cuda:0 or cuda:0,1.") from None
        missing = [i for i in indices if not 0 <= i < gpus]
        if missing:
            have = f"GPUs cuda:0 to cuda:{gpus - 1}" if gpus else "no CUDA GPU"
            raise UserError(
                f"Device cuda:{missing[0]} does not exist; this machine has {have}.",
                "Pick devices from `parastep-studio devices`, or use cpu:N.",
            )
        if len(set(indices)) != len(indices):
            raise UserError(f"Device spec '{spec}' names a GPU twice.", "List each GPU once.")
        return [f"cuda:{i}" for i in indices]
    raise UserError(f"Unknown device spec '{spec}'.", "Use auto, cpu:N or cuda:0,1,...")


def format_devices(devices: list[str]) -> str:
    if all(d == "cpu" for d in devices):
        return f"cpu:{len(devices)}"
    return "cuda:" + ",".join(d.split(":")[1] for d in devices)


def _nvml_free_memory(index: int) -> int | None:
    """Free memory of the index-th visible GPU from NVML (nvidia-ml-py), or None without it."""
    try:
        import pynvml
    except ImportError:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    try:
        physical = int(visible.split(",")[index]) if visible else index
        pynvml.nvmlInit()
        try:
            return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(physical)).free)
        finally:
            pynvml.nvmlShutdown()
    except (ValueError, IndexError, pynvml.NVMLError):  # e.g. GPU UUIDs in CUDA_VISIBLE_DEVICES
        return None
