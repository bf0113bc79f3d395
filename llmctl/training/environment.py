"""What this machine offers for training: versions, CPU, memory, GPUs, distributed backends."""

from __future__ import annotations

import os
import platform
import sys
from typing import Any


def total_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def available_memory_bytes() -> int | None:
    """Memory the kernel could give a new process now (MemAvailable), in bytes."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cpu_has_bf16_units() -> bool:
    """Whether the CPU has bf16 matrix instructions (AMX or AVX512-BF16), where bf16 autocast pays."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def describe_environment() -> dict[str, Any]:
    """Versions, CPU cores and memory, each GPU, and which torch.distributed backends exist."""
    import accelerate
    import torch
    import torch.distributed as dist

    gpus = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            free, total = torch.cuda.mem_get_info(i)
            gpus.append(
                {
                    "index": i,
                    "name": props.name,
                    "memory_bytes": total,
                    "free_bytes": free,
                    "compute_capability": f"{props.major}.{props.minor}",
                    "bf16": props.major >= 8,
                }
            )
    backends = {
        "gloo": dist.is_available() and dist.is_gloo_available(),
        "nccl": dist.is_available() and dist.is_nccl_available(),
        "mpi": dist.is_available() and dist.is_mpi_available(),
    }
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "accelerate": accelerate.__version__,
        "cuda": torch.version.cuda,
        "cpu": {"cores": os.cpu_count(), "usable": usable_cpus(), "bf16_units": cpu_has_bf16_units()},
        "memory": {"total_bytes": total_memory_bytes(), "available_bytes": available_memory_bytes()},
        "gpus": gpus,
        "distributed_backends": backends,
        "visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
