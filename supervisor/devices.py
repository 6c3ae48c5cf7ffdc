"""What the supervisor reads of devices and worker processes without touching CUDA.

NVML (never creates a CUDA context) for GPU memory, in total and per worker process tree; psutil
for host memory. Where NVML is missing (no driver, a CPU host) readings are simply absent.
"""

import os

import psutil

try:
    import pynvml
except ImportError:  # pragma: no cover - the supervisor extra installs it
    pynvml = None


class DeviceMonitor:
    def __init__(self) -> None:
        self._nvml = False
        if pynvml is not None:
            try:
                pynvml.nvmlInit()
                self._nvml = True
            except pynvml.NVMLError:
                pass

    def gpu_count(self) -> int:
        """GPUs NVML sees (0 without NVML)."""
        if not self._nvml:
            return 0
        try:
            return pynvml.nvmlDeviceGetCount()
        except pynvml.NVMLError:
            return 0

    def gpu_memory(self, index: int) -> dict | None:
        """Used, free and total bytes of GPU `index` (NVML order), or None without NVML."""
        if not self._nvml:
            return None
        try:
            info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
        except pynvml.NVMLError:
            return None
        return {"used_bytes": info.used, "free_bytes": info.free, "total_bytes": info.total}

    def gpu_process_memory(self, index: int) -> dict[int, int]:
        """GPU bytes used by each process on device `index`, as far as NVML can see them."""
        if not self._nvml:
            return {}
        try:
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
        except pynvml.NVMLError:
            return {}
        return {p.pid: p.usedGpuMemory or 0 for p in procs}

    @staticmethod
    def host_available() -> int:
        return psutil.virtual_memory().available

    @staticmethod
    def process_tree(pid: int | None) -> list[int]:
        """A worker's pid and its descendants' (with `engine = vllm`, vLLM's engine core, which holds
        the device memory); empty once it is gone. Read from each process's own list of children,
        so the cost follows the tree, not the host's process table."""
        if not pid or not psutil.pid_exists(pid):
            return []
        tree, todo = [], [pid]
        while todo and len(tree) < _MAX_TREE:
            current = todo.pop()
            tree.append(current)
            todo.extend(_children(current))
        return tree

    @staticmethod
    def rss(pid: int | None) -> int | None:
        """Host RSS of a worker's own process (its telemetry's `rss_bytes` adds its engine core's)."""
        try:
            return psutil.Process(pid).memory_info().rss if pid else None
        except psutil.Error:
            return None

    @classmethod
    def tree_gpu_bytes(cls, per_pid: dict[int, int], pid: int | None) -> int | None:
        """GPU bytes of a worker's process tree, from `gpu_process_memory`; None where NVML sees none of it."""
        found = [per_pid[p] for p in cls.process_tree(pid) if p in per_pid]
        return sum(found) if found else None


_MAX_TREE = 64  # a worker has a child or two; a deeper tree is not one of ours to walk


def _children(pid: int) -> list[int]:
    """The children of `pid`, from /proc/PID/task/*/children (Linux), else from psutil's scan."""
    try:
        found: list[int] = []
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(child) for child in f.read().split()]
        return found
    except (OSError, ValueError):
        try:
            return [child.pid for child in psutil.Process(pid).children()]
        except psutil.Error:
            return []
