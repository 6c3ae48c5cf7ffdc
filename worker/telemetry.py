"""Memory telemetry of this worker: the CUDA caching allocator, the device and host RSS.

Read with every reply and heartbeat, so it stays cheap: `memory_stats()` only reads counters.
The largest free block inside reserved memory needs a full `memory_snapshot()`, so it is taken
at most every `snapshot_interval_s` and reported until the next one.

`ModelProcessFigures` reads the process that holds the model: the worker itself for the default
engine; vLLM's engine core, the worker's child, for `engine = vllm` (there it runs inside vLLM's
GPU worker, `vllm_core.py`, and the worker reads its figures over vLLM's RPC). `Telemetry` adds the
worker's own counters and the engine's figures, numbers only: the supervisor refuses a message
whose telemetry holds anything else, so one such figure would make every reply unreadable.
"""

import logging
import os
import threading
import time
from typing import Callable

import psutil
import torch

log = logging.getLogger("qvl.worker")


class ModelProcessFigures:
    """The allocator, device memory and RSS of this process, as telemetry fields."""

    def __init__(self, device: torch.device, snapshot_interval_s: float = 30.0):
        self.device = device
        self.snapshot_interval_s = snapshot_interval_s
        self._process = psutil.Process(os.getpid())
        self._snapshot: dict = {}
        self._snapshot_at = float("-inf")
        self._lock = threading.Lock()  # read by the heartbeat and the main thread

    def read(self) -> dict:
        out = {"rss_bytes": self._process.memory_info().rss}
        if self.device.type != "cuda":
            return out
        stats = torch.cuda.memory_stats(self.device)
        reserved = stats.get("reserved_bytes.all.current", 0)
        allocated = stats.get("allocated_bytes.all.current", 0)
        inactive_split = stats.get("inactive_split_bytes.all.current", 0)
        free, total = torch.cuda.mem_get_info(self.device)
        out.update(
            allocated_bytes=allocated,
            reserved_bytes=reserved,
            active_bytes=stats.get("active_bytes.all.current", 0),
            inactive_split_bytes=inactive_split,
            peak_reserved_bytes=stats.get("reserved_bytes.all.peak", 0),
            num_alloc_retries=stats.get("num_alloc_retries", 0),
            allocator_ooms=stats.get("num_ooms", 0),  # every OOM, also those a batch split recovered from
            fragmentation=(reserved - allocated) / reserved if reserved else 0.0,
            inactive_split_ratio=inactive_split / reserved if reserved else 0.0,
            device_used_bytes=total - free,
            device_total_bytes=total,
        )
        out.update(self._largest_free_block())
        return out

    def _largest_free_block(self) -> dict:
        """The largest free block in reserved memory, beside all free reserved memory."""
        now = time.monotonic()
        with self._lock:
            if now - self._snapshot_at >= self.snapshot_interval_s:
                largest = free = 0
                for segment in torch.cuda.memory_snapshot():
                    for block in segment["blocks"]:
                        if block["state"] == "inactive":
                            free += block["size"]
                            largest = max(largest, block["size"])
                self._snapshot = {"largest_free_block_bytes": largest, "free_reserved_bytes": free}
                self._snapshot_at = now
            return dict(self._snapshot)


class Telemetry:
    def __init__(self, model_process: Callable[[], dict], engine_stats: Callable[[], dict] = dict):
        self.model_process = model_process  # `ModelProcessFigures.read`, or the engine's own reader
        self.engine_stats = engine_stats  # the engine's own figures (vLLM's KV cache usage), if any
        # out-of-memory errors blamed on a single request: what the recycle policy reads as `num_ooms`
        self.ooms = 0
        self._left_out: set[str] = set()  # figures that were not numbers, logged once each

    def read(self) -> dict:
        figures = {"num_ooms": self.ooms, **self.engine_stats(), **self.model_process()}
        numbers = {k: v for k, v in figures.items() if type(v) in (int, float)}
        for key in figures.keys() - numbers.keys() - self._left_out:
            log.warning("event=telemetry_left_out key=%s type=%s", key, type(figures[key]).__name__)
            self._left_out.add(key)
        return numbers
