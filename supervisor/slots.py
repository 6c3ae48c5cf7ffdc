"""Worker slots: the state machine of one worker position and the process that fills it.

A slot goes `spawning -> loading -> ready -> draining -> stopping -> exited`, then is filled again
by a new incarnation with the next generation number; a slot that crashes too often is `failed`.
Every change of state goes through `WorkerSlot.set_state`, which logs it with its reason.
"""

import collections
import enum
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field

from .config import Config
from .events import event
from .requests import Request


class SlotState(enum.Enum):
    SPAWNING = "spawning"  # process started, not yet connected
    LOADING = "loading"    # connected (hello), loading the model
    READY = "ready"        # serving
    DRAINING = "draining"  # finishing its in-flight requests, takes no new ones
    STOPPING = "stopping"  # asked to exit; escalating to signals after grace periods
    EXITED = "exited"      # no process; waiting to be spawned again
    FAILED = "failed"      # crashed too often; left empty


LIVE = (SlotState.SPAWNING, SlotState.LOADING, SlotState.READY, SlotState.DRAINING,
        SlotState.STOPPING)


def restart_delay(recent_crashes: int, config: Config) -> float:
    """Exponential backoff: the first restart waits `restart_backoff_s`, each further one twice as long."""
    if recent_crashes <= 0:
        return 0.0
    return min(config.restart_backoff_s * 2 ** (recent_crashes - 1), config.restart_backoff_max_s)


@dataclass(eq=False)
class WorkerSlot:
    index: int
    state: SlotState = SlotState.EXITED
    generation: int = 0
    process: subprocess.Popen | None = None
    inflight: dict[int, Request] = field(default_factory=dict)
    telemetry: dict = field(default_factory=dict)
    served: int = 0            # requests answered by the current incarnation
    served_total: int = 0      # by every incarnation of this slot
    restarts: int = 0          # after crashes
    recycles: int = 0          # clean replacements
    crashes: collections.deque = field(default_factory=collections.deque)
    state_since: float = field(default_factory=time.monotonic)
    last_seen: float = 0.0
    respawn_at: float = 0.0
    stop_deadline: float = 0.0
    signals_sent: int = 0
    last_reason: str = ""

    @property
    def identity(self) -> bytes:
        return f"{self.index}:{self.generation}".encode()

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def set_state(self, state: SlotState, reason: str, **fields: object) -> None:
        event("worker_state", worker=self.index, gen=self.generation, pid=self.pid,
              old=self.state.value, new=state.value, reason=reason, **fields)
        self.state, self.state_since, self.last_reason = state, time.monotonic(), reason

    def spawn(self, config: Config, backend: str) -> None:
        self.generation += 1
        self.served = 0
        self.telemetry = {}
        self.process = subprocess.Popen(worker_command(config, backend, self.index, self.generation),
                                        env=worker_env(config), stdin=subprocess.DEVNULL)
        self.last_seen = time.monotonic()
        self.set_state(SlotState.SPAWNING, "spawn")

    def signal(self, signum: int) -> None:
        if self.process and self.process.poll() is None:
            try:
                os.kill(self.process.pid, signum)
            except ProcessLookupError:
                pass

    def escalate(self, now: float, grace: float) -> None:
        """A stopping worker that overstays its grace gets SIGTERM, then SIGKILL."""
        if now < self.stop_deadline or self.signals_sent >= 2:
            return
        signum = signal.SIGTERM if self.signals_sent == 0 else signal.SIGKILL
        event("worker_signal", worker=self.index, gen=self.generation, pid=self.pid,
              signal=signal.Signals(signum).name)
        self.signal(signum)
        self.signals_sent += 1
        self.stop_deadline = now + grace

    def status(self) -> dict:
        return {
            "slot": self.index, "state": self.state.value, "pid": self.pid,
            "generation": self.generation, "inflight": len(self.inflight), "served": self.served,
            "served_total": self.served_total, "restarts": self.restarts,
            "recycles": self.recycles, "last_reason": self.last_reason,
            "state_age_s": round(time.monotonic() - self.state_since, 3),
            "telemetry": self.telemetry,
        }


def worker_command(config: Config, backend: str, slot: int, generation: int) -> list[str]:
    device = "cuda:0" if config.device.startswith("cuda") else config.device
    cmd = [sys.executable, "-m", "qvl.worker", "--backend", backend, "--slot", str(slot),
           "--generation", str(generation), "--model", config.model, "--device", device,
           "--dtype", config.dtype, "--attn-implementation", config.attn_implementation,
           "--max-batch-size", str(config.max_batch_size),
           "--max-image-pixels", str(config.max_image_pixels),
           "--heartbeat-interval", str(config.heartbeat_interval_s)]
    if config.memory_fraction:
        cmd += ["--memory-fraction", str(config.memory_fraction)]
    return cmd


def worker_env(config: Config) -> dict:
    """The worker sees only its own device, as cuda:0."""
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF=config.alloc_conf)
    if config.device.startswith("cuda"):
        env["CUDA_VISIBLE_DEVICES"] = config.device.partition(":")[2] or "0"
    return env
