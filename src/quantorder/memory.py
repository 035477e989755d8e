"""Peak memory of the current process: GPU allocator peak on CUDA, peak resident set on CPU."""

from __future__ import annotations

import resource

import torch


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak window on CUDA (the CPU peak RSS cannot be reset: it covers the process)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def process_peak_memory() -> dict[str, int | None]:
    """This process's peaks so far: GPU allocator bytes (largest over devices, None without CUDA
    use) and resident set bytes."""
    gpu = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        gpu = max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
    return {"gpu_bytes": gpu, "rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
