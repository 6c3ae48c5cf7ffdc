"""Worker slots: the positions that serve, and the two halves of one worker incarnation.

`WorkerProcess` is the OS process (exec'd, or forked by the launcher): its pid, signals, and a stop's escalation to SIGTERM and SIGKILL.
`Worker` is the protocol peer: routing identity, requests in flight, telemetry and counters, and
`life`, its `Incarnation` in the slot's lifecycle (read here, changed only by the lifecycle).
A `Slot` is a position that always wants one serving worker: its GPU, its `SlotLifecycle`
(phase, current, successor, retiring, recycle, backoff, spare: `lifecycle.py`), the peers of its live
workers by generation, and its spare process (`SparePeer`) by number; a spare told to load becomes
the `Worker` of its new generation, same process. Nothing here decides what happens next.
"""

import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable

from qvl.protocol.codec import spare_identity, worker_identity
from qvl.protocol.contract import SUPERVISOR_PID_ENV, ModelOptions, SpareSpec, WorkerSpec

from .config import Config
from .launcher import Launched
from .lifecycle import Incarnation, Phase, SlotLifecycle, WorkerState
from .requests import Request

StartProcess = Callable[[list[str], dict], "subprocess.Popen | Launched"]  # a worker's args and env
SAVED_FIELDS = ("generation", "restarts", "recycles", "last_reason")  # lifecycle counters kept across runs


class WorkerProcess:
    """One worker's OS process (a `subprocess.Popen`, or a `Launched` the launcher forks, whose pid
    may come later): it can be polled, signalled, and stopped with escalation."""

    def __init__(self, child: subprocess.Popen | Launched):
        self.child = child
        self.stop_deadline = 0.0
        self.signals_sent = 0

    @property
    def pid(self) -> int | None:
        return self.child.pid

    def when_started(self, tell: Callable[[int], None]) -> None:
        """Call `tell(pid)` once the pid is known: now, or when the launcher answers."""
        if self.child.pid is not None:
            tell(self.child.pid)
        else:
            self.child.on_pid = tell

    def poll(self) -> int | None:
        return self.child.poll()

    def signal(self, signum: int) -> None:
        self.child.send_signal(signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.signals_sent = 2

    def terminate(self, now: float, grace: float) -> None:
        """SIGTERM now; SIGKILL follows if it overstays `grace` (`escalate`)."""
        self.signal(signal.SIGTERM)
        self.stop_deadline, self.signals_sent = now + grace, 1

    def begin_stop(self, now: float, grace: float) -> None:
        """It was asked to exit: signals follow if it overstays `grace`."""
        self.stop_deadline, self.signals_sent = now + grace, 0

    def escalate(self, now: float, grace: float) -> str | None:
        """SIGTERM once the grace is over, SIGKILL after another; the name of a signal sent."""
        if now < self.stop_deadline or self.signals_sent >= 2:
            return None
        signum = signal.SIGTERM if self.signals_sent == 0 else signal.SIGKILL
        self.signal(signum)
        self.signals_sent += 1
        self.stop_deadline = now + grace
        return signal.Signals(signum).name

    def wait(self) -> int:
        return self.child.wait()


@dataclass(eq=False)
class Worker:
    """The protocol peer of one incarnation: who it is to the backend and what it holds."""

    slot: int
    life: Incarnation
    process: WorkerProcess
    requests_jitter: int = 0
    accepting: bool = False  # set only by the lifecycle's `Accept` actions
    inflight: dict[int, Request] = field(default_factory=dict)
    telemetry: dict = field(default_factory=dict)
    served: int = 0
    started_at: float = field(default_factory=time.monotonic)
    last_seen: float = field(default_factory=time.monotonic)
    last_answer: float = 0.0  # when it last sent a reply or a chunk (heartbeats aside)
    exempt: tuple[str, ...] = ()  # soft thresholds its telemetry already tripped when it became ready

    def __post_init__(self) -> None:
        self.identity = worker_identity(self.slot, self.generation)  # its request socket's routing id
        self.identities = (self.identity, worker_identity(self.slot, self.generation, heartbeat=True))

    @property
    def generation(self) -> int:
        return self.life.generation

    @property
    def state(self) -> WorkerState:
        return self.life.state

    @property
    def pid(self) -> int:
        return self.process.pid

    def stalled_since(self) -> float | None:
        """Since when this worker, holding requests, has answered or streamed none of them: the
        later of its oldest dispatch and its last reply or chunk (a request waiting in it behind
        others is not hung while the others get answers). None while it holds none."""
        oldest = min((r.dispatched_at for r in self.inflight.values()), default=None)
        return None if oldest is None else max(oldest, self.last_answer)


@dataclass(eq=False)
class SparePeer:
    """A spare process as the backend knows it: its number, routing identity and OS process."""

    slot: int
    number: int
    process: WorkerProcess
    stopping: bool = False

    @property
    def identity(self) -> bytes:
        return spare_identity(self.slot, self.number)

    @property
    def pid(self) -> int:
        return self.process.pid


@dataclass(eq=False)
class Slot:
    index: int
    lifecycle: SlotLifecycle
    gpu: int | None = None  # the GPU (NVML index) its workers run on; None on CPU
    peers: dict[int, Worker] = field(default_factory=dict)  # live workers by generation
    spares: dict[int, SparePeer] = field(default_factory=dict)  # live spare processes by number
    served_total: int = 0

    @property
    def failed(self) -> bool:
        return self.lifecycle.phase is Phase.FAILED

    @property
    def current(self) -> Worker | None:
        life = self.lifecycle.current
        return self.peers.get(life.generation) if life else None

    def workers(self) -> list[Worker]:
        return list(self.peers.values())

    def spawn(self, life: Incarnation, config: Config, backend: str, start: StartProcess) -> Worker:
        spec = worker_spec(config, backend, self.index, life.generation)
        child = start([spec.to_json()], worker_env(config, self.gpu))
        worker = Worker(self.index, life, WorkerProcess(child),
                        requests_jitter=random.randint(0, config.recycle_requests_jitter))
        self.peers[life.generation] = worker
        return worker

    def spawn_spare(self, number: int, config: Config, backend: str, start: StartProcess) -> SparePeer:
        spec = SpareSpec(backend, self.index, number, config.engine, config.limits)
        child = start(["--spare", spec.to_json()], worker_env(config, self.gpu))
        peer = self.spares[number] = SparePeer(self.index, number, WorkerProcess(child))
        return peer

    def adopt_spare(self, number: int, life: Incarnation, config: Config, backend: str) -> tuple[Worker, WorkerSpec]:
        """The spare `number` becomes the worker of `life`: the same process, a new peer; and the
        spec to send it."""
        peer = self.spares.pop(number)
        worker = Worker(self.index, life, peer.process,
                        requests_jitter=random.randint(0, config.recycle_requests_jitter))
        self.peers[life.generation] = worker
        return worker, worker_spec(config, backend, self.index, life.generation)

    def saved(self) -> dict:
        return {"served_total": self.served_total,
                **{f: getattr(self.lifecycle, f) for f in SAVED_FIELDS}}

    def restore(self, saved: dict) -> None:
        if isinstance(saved.get("served_total"), int):
            self.served_total = saved["served_total"]
        for f in SAVED_FIELDS:
            if f in saved and isinstance(saved[f], type(getattr(self.lifecycle, f))):
                setattr(self.lifecycle, f, saved[f])

    def status(self, now: float) -> dict:
        life, w = self.lifecycle, self.current
        successor = self.peers.get(life.successor.generation) if life.successor else None
        state = "failed" if self.failed else (w.state.value if w else "exited")
        return {
            "slot": self.index, "gpu": self.gpu, "state": state, "phase": life.phase.value,
            "pid": w.pid if w else None, "generation": w.generation if w else life.generation,
            "accepting": bool(w and w.accepting),
            "inflight": sum(len(x.inflight) for x in self.workers()),
            "served": w.served if w else 0, "served_total": self.served_total,
            "restarts": life.restarts, "recycles": life.recycles, "last_reason": life.last_reason,
            "recycling": life.recycle.reason if life.recycle else None,
            "failed": {"reason": life.failed_reason, "failures": life.failures,
                       "retry_in_s": round(max(0.0, life.retry_at - now), 3)} if self.failed else None,
            "thresholds_at_start": list(w.exempt) if w else [],
            "successor_pid": successor.pid if successor else None,
            "retiring_pids": [x.pid for x in self.workers() if x.life in life.retiring],
            "spare_pid": life.spare.pid if life.spare else None,
            "spare_state": life.spare.state.value if life.spare else None,
            "age_s": round(now - w.started_at, 3) if w else None,
            "telemetry": w.telemetry if w else {},
        }


def telemetry_fields(t: dict) -> dict:
    """The telemetry worth logging beside a recycle verdict."""
    keys = ("fragmentation", "reserved_bytes", "allocated_bytes", "num_alloc_retries",
            "num_ooms", "device_used_bytes", "rss_bytes")
    return {k: t[k] for k in keys if k in t}


def worker_spec(config: Config, backend: str, slot: int, generation: int) -> WorkerSpec:
    """The whole contract of one worker incarnation, built from the supervisor's own settings."""
    device = "cuda:0" if config.device.startswith("cuda") else config.device  # it sees only its GPU
    model = ModelOptions(config.model, device, config.dtype, config.attn_implementation,
                         config.memory_fraction or None, config.engine, config.kv_cache,
                         config.kv_cache_tokens, config.vllm_memory_share, config.vllm_max_model_len,
                         config.vllm_compile, config.prefill_tokens, config.compile_decode,
                         config.vllm_render_processes)
    return WorkerSpec(backend, slot, generation, model, config.limits, config.max_batch_size,
                      config.max_image_pixels, config.max_prompt_tokens, config.heartbeat_interval_s)


def worker_env(config: Config, gpu: int | None) -> dict:
    """The worker sees only its own device, as cuda:0, numbered as NVML numbers it, and knows its
    supervisor by pid (`qvl.worker.parent`: a worker re-parented before it could ask to die with it
    still sees it is orphaned)."""
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF=config.alloc_conf,
               CUDA_DEVICE_ORDER="PCI_BUS_ID", **{SUPERVISOR_PID_ENV: str(os.getpid())})
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
