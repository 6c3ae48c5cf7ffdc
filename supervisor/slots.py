"""Workers and slots: the state machine of one worker process, and the position it fills.

A `Worker` is one incarnation: `spawning -> loading -> ready -> draining -> stopping -> exited`.
A `Slot` is a position that always wants one ready worker. During an overlapped recycle it holds
two: the old one still serving and its `successor` warming up. A slot that crashes too often is
`failed` and left empty. Every change of state goes through `Worker.set_state`, which logs it.
"""

import collections
import enum
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from qvl.protocol.codec import worker_identity
from qvl.protocol.contract import ModelOptions, WorkerSpec

from .config import Config
from .events import event
from .policy import Verdict
from .requests import Request


class WorkerState(enum.Enum):
    SPAWNING = "spawning"  # process started, not yet connected
    LOADING = "loading"    # connected (hello), loading the model
    READY = "ready"        # serving
    DRAINING = "draining"  # finishing its in-flight requests, takes no new ones
    STOPPING = "stopping"  # asked to exit; escalating to signals after grace periods
    EXITED = "exited"


STARTING = (WorkerState.SPAWNING, WorkerState.LOADING)


@dataclass(eq=False)
class Worker:
    slot: int
    generation: int
    process: subprocess.Popen
    requests_jitter: int = 0
    state: WorkerState = WorkerState.SPAWNING
    inflight: dict[int, Request] = field(default_factory=dict)
    telemetry: dict = field(default_factory=dict)
    served: int = 0
    started_at: float = field(default_factory=time.monotonic)
    state_since: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    stop_deadline: float = 0.0
    signals_sent: int = 0

    def __post_init__(self) -> None:
        self.identity = worker_identity(self.slot, self.generation)  # its request socket's routing id
        self.identities = (self.identity, worker_identity(self.slot, self.generation, heartbeat=True))

    @property
    def pid(self) -> int:
        return self.process.pid

    def set_state(self, state: WorkerState, reason: str, **fields: object) -> None:
        event("worker_state", worker=self.slot, gen=self.generation, pid=self.pid,
              old=self.state.value, new=state.value, reason=reason, **fields)
        self.state, self.state_since = state, time.monotonic()

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            try:
                os.kill(self.process.pid, signum)
            except ProcessLookupError:
                pass

    def escalate(self, now: float, grace: float) -> None:
        """A stopping worker that overstays its grace gets SIGTERM, then SIGKILL."""
        if now < self.stop_deadline or self.signals_sent >= 2:
            return
        signum = signal.SIGTERM if self.signals_sent == 0 else signal.SIGKILL
        event("worker_signal", worker=self.slot, gen=self.generation, pid=self.pid,
              signal=signal.Signals(signum).name)
        self.signal(signum)
        self.signals_sent += 1
        self.stop_deadline = now + grace

    def oldest_dispatch(self) -> float | None:
        return min((r.dispatched_at for r in self.inflight.values()), default=None)


@dataclass
class PendingRecycle:
    reason: str
    hard: bool        # stop dispatching to the old worker at once
    wait_idle: bool   # a soft policy reason: start when the worker is idle (or waited long enough)
    since: float = field(default_factory=time.monotonic)
    started_at: float = 0.0
    started: bool = False
    overlap: bool = False


@dataclass(eq=False)
class Slot:
    index: int
    gpu: int | None = None  # the GPU (NVML index) its workers run on; None on CPU
    generation: int = 0
    current: Worker | None = None
    successor: Worker | None = None
    retiring: list[Worker] = field(default_factory=list)
    failed: bool = False
    respawn_at: float = 0.0
    crashes: collections.deque = field(default_factory=collections.deque)
    restarts: int = 0
    recycles: int = 0
    served_total: int = 0
    last_reason: str = ""
    recycle: PendingRecycle | None = None

    def workers(self) -> list[Worker]:
        return [w for w in (self.current, self.successor, *self.retiring) if w is not None]

    @property
    def state(self) -> str:
        if self.failed:
            return "failed"
        return self.current.state.value if self.current else "exited"

    def spawn(self, config: Config, backend: str) -> Worker:
        self.generation += 1
        spec = worker_spec(config, backend, self.index, self.generation)
        process = subprocess.Popen(worker_command(spec),
                                   env=worker_env(config, self.gpu), stdin=subprocess.DEVNULL)
        worker = Worker(self.index, self.generation, process, state=WorkerState.EXITED,
                        requests_jitter=random.randint(0, config.recycle_requests_jitter))
        worker.set_state(WorkerState.SPAWNING, self.last_reason or "start")
        return worker

    def ask_recycle(self, verdict: Verdict, wait_idle: bool) -> bool:
        """Note that this slot should recycle; False if it is already doing so."""
        if self.recycle is not None or self.failed or self.current is None:
            return False
        self.recycle = PendingRecycle(verdict.reason, verdict.hard, wait_idle and not verdict.hard)
        event("recycle_wanted", worker=self.index, gen=self.current.generation,
              reason=verdict.reason, hard=verdict.hard, value=verdict.value,
              threshold=verdict.threshold, **_telemetry_fields(self.current.telemetry))
        return True

    def status(self) -> dict:
        w = self.current
        return {
            "slot": self.index, "gpu": self.gpu, "state": self.state, "pid": w.pid if w else None,
            "generation": w.generation if w else self.generation,
            "inflight": sum(len(x.inflight) for x in self.workers()),
            "served": w.served if w else 0, "served_total": self.served_total,
            "restarts": self.restarts, "recycles": self.recycles, "last_reason": self.last_reason,
            "recycling": self.recycle.reason if self.recycle else None,
            "successor_pid": self.successor.pid if self.successor else None,
            "retiring_pids": [x.pid for x in self.retiring],
            "age_s": round(time.monotonic() - w.started_at, 3) if w else None,
            "telemetry": w.telemetry if w else {},
        }


def _telemetry_fields(t: dict) -> dict:
    keys = ("fragmentation", "reserved_bytes", "allocated_bytes", "num_alloc_retries",
            "num_ooms", "device_used_bytes", "rss_bytes")
    return {k: t[k] for k in keys if k in t}


def worker_spec(config: Config, backend: str, slot: int, generation: int) -> WorkerSpec:
    """The whole contract of one worker incarnation, built from the supervisor's own settings."""
    device = "cuda:0" if config.device.startswith("cuda") else config.device  # it sees only its GPU
    model = ModelOptions(config.model, device, config.dtype, config.attn_implementation,
                         config.memory_fraction or None, config.engine, config.kv_cache,
                         config.kv_cache_tokens)
    return WorkerSpec(backend, slot, generation, model, config.limits, config.max_batch_size,
                      config.max_image_pixels, config.max_prompt_tokens, config.heartbeat_interval_s)


def worker_command(spec: WorkerSpec) -> list[str]:
    return [sys.executable, "-m", "qvl.worker", spec.to_json()]


def gateway_command(config: Config) -> list[str]:
    """The HTTP gateway, a client of this supervisor's frontend that exits with it."""
    cmd = [sys.executable, "-m", "qvl.supervisor.gateway", "--frontend", config.frontend,
           "--listen", config.http, "--model-name", os.path.basename(config.model.rstrip("/")),
           "--parent", str(os.getpid())]
    if config.http_api_key_file:
        cmd += ["--api-key-file", config.http_api_key_file]
    if config.http_remote_images:
        cmd.append("--remote-images")
    if config.curve_dir:
        cmd += ["--curve-dir", config.curve_dir]
    return cmd


def worker_env(config: Config, gpu: int | None) -> dict:
    """The worker sees only its own device, as cuda:0, numbered as NVML numbers it."""
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF=config.alloc_conf,
               CUDA_DEVICE_ORDER="PCI_BUS_ID")
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    return env


def slot_gpus(config: Config, gpu_count: int) -> list[int | None]:
    """The GPU of each slot: one slot per listed GPU, else `workers` slots on `device`."""
    if config.gpus == "all":
        return list(range(gpu_count))
    if config.gpus:
        return [int(p) for p in config.gpus.split(",")]
    if config.device.startswith("cuda"):
        return [int(config.device.partition(":")[2] or 0)] * config.workers
    return [None] * config.workers


def restart_delay(recent_crashes: int, config: Config) -> float:
    """Exponential backoff: the first restart waits `restart_backoff_s`, each further one twice as long."""
    if recent_crashes <= 0:
        return 0.0
    return min(config.restart_backoff_s * 2 ** (recent_crashes - 1), config.restart_backoff_max_s)
