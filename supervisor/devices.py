"""What the supervisor reads of devices and worker processes without touching CUDA.

NVML (never creates a CUDA context) for GPU memory, in total and per worker process tree; psutil
for host memory. Where NVML is missing (no driver, a CPU host) readings are simply absent.
"""

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
    def process_tree(pid: int | None) -> list[psutil.Process]:
        """A worker's process and its descendants (with `engine = vllm`, vLLM's engine core, which
        holds the device memory); empty once it is gone."""
        try:
            process = psutil.Process(pid) if pid else None
            return [process, *process.children(recursive=True)] if process else []
        except psutil.Error:
            return []

    @classmethod
    def rss(cls, pid: int | None) -> int | None:
        """Host RSS of a worker's process tree."""
        total = None
        for process in cls.process_tree(pid):
            try:
                total = (total or 0) + process.memory_info().rss
            except psutil.Error:
                pass
        return total

    @classmethod
    def tree_gpu_bytes(cls, per_pid: dict[int, int], pid: int | None) -> int | None:
        """GPU bytes of a worker's process tree, from `gpu_process_memory`; None where NVML sees none of it."""
        found = [per_pid[p.pid] for p in cls.process_tree(pid) if p.pid in per_pid]
        return sum(found) if found else None
