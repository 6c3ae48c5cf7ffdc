"""What the supervisor reads of devices and worker processes without touching CUDA.

NVML (never creates a CUDA context) for GPU memory, in total and per worker pid; psutil for
host memory. Where NVML is missing (no driver, a CPU host) readings are simply absent.
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
    def rss(pid: int | None) -> int | None:
        try:
            return psutil.Process(pid).memory_info().rss if pid else None
        except psutil.Error:
            return None
