"""Memory telemetry of this worker: the CUDA caching allocator, the device (NVML) and host RSS.

Read on every reply and heartbeat, so it must stay cheap: `memory_stats()` only reads counters.
"""

from __future__ import annotations

import os

import psutil
import torch

_PROCESS = psutil.Process(os.getpid())


def read_telemetry(device: torch.device) -> dict:
    """Allocator and memory figures in bytes, plus derived fragmentation ratios."""
    out = {"rss_bytes": _PROCESS.memory_info().rss}
    if device.type != "cuda":
        return out
    stats = torch.cuda.memory_stats(device)
    reserved = stats.get("reserved_bytes.all.current", 0)
    allocated = stats.get("allocated_bytes.all.current", 0)
    inactive_split = stats.get("inactive_split_bytes.all.current", 0)
    free, total = torch.cuda.mem_get_info(device)
    out.update(
        allocated_bytes=allocated,
        reserved_bytes=reserved,
        active_bytes=stats.get("active_bytes.all.current", 0),
        inactive_split_bytes=inactive_split,
        peak_reserved_bytes=stats.get("reserved_bytes.all.peak", 0),
        num_alloc_retries=stats.get("num_alloc_retries", 0),
        num_ooms=stats.get("num_ooms", 0),
        fragmentation=(reserved - allocated) / reserved if reserved else 0.0,
        inactive_split_ratio=inactive_split / reserved if reserved else 0.0,
        device_used_bytes=total - free,
        device_total_bytes=total,
    )
    return out
