"""Fault injection, a testing hook: the worker reads `QVL_FAULTS` and misbehaves on purpose.

Inert when the variable is unset. Its value is comma-separated `name=value` items:

- `crash_at_start=1`: exit with `WorkerExit.INJECTED` before loading the model;
- `crash_after=N`: exit with `WorkerExit.INJECTED` when the N-th request arrives (abruptly, like a segfault);
- `hang_at=N`: the N-th request never finishes (the worker sleeps; heartbeats go on);
- `slow_ms=M`: every generate takes M ms longer (a slow but alive worker);
- `step_ms=M`: generation pauses M ms each time it reports progress (a slow stream);
- `oom_at=N`: every generate call holding the N-th request raises a CUDA out-of-memory error;
- `oom_rows_over=R`: every generate call of more than R rows raises it (a batch too big, rows fine alone);
- `garble_at=N`: as the N-th request arrives, send the supervisor malformed messages first;
- `oom_batch_step=K`: a generate call of several rows runs out of memory at its K-th progress report
  (after streamed text has gone out; the rows run again alone);
- `step_fail_at=K`: the K-th step of a step-scheduled engine (`kv_cache = continuous`, vLLM) raises;
- `telemetry.KEY=VALUE`: report VALUE for telemetry KEY, once `telemetry_after=N` requests are done;
- `generation=G`, `slot=S`: only incarnations with that generation number / slot misbehave;
- `launcher_dies_at=N`: the worker launcher exits with `WorkerExit.INJECTED` once it has forked its
  N-th process, before it answers with its pid (read by the launcher alone, `launcher_fault`).

CPU workers have no CUDA allocator; injected telemetry lets tests trip every recycle threshold.
"""

import os
import time

import msgpack
import torch
from qvl.protocol.exits import WorkerExit

ENV = "QVL_FAULTS"


class Faults:
    def __init__(self, spec: str, slot: int, generation: int):
        items = dict(item.split("=", 1) for item in spec.split(",") if "=" in item)
        numbers = {k: int(v) for k, v in items.items() if not k.startswith("telemetry.")}
        targeted = (numbers.get("generation", generation) == generation
                    and numbers.get("slot", slot) == slot)
        self.settings = numbers if targeted else {}
        self.telemetry = {k[len("telemetry."):]: float(v) for k, v in items.items()
                          if targeted and k.startswith("telemetry.")}
        self.steps = 0  # steps of a step-scheduled engine so far

    @staticmethod
    def launcher_fault() -> int:
        """The launch after which the worker launcher dies (`launcher_dies_at`; 0: none)."""
        items = dict(item.split("=", 1) for item in os.environ.get(ENV, "").split(",") if "=" in item)
        return int(items.get("launcher_dies_at", 0))

    @classmethod
    def from_env(cls, slot: int, generation: int) -> "Faults":
        return cls(os.environ.get(ENV, ""), slot, generation)

    def get(self, name: str) -> int:
        return self.settings.get(name, 0)

    def at_start(self) -> None:
        if self.get("crash_at_start"):
            os._exit(WorkerExit.INJECTED)

    def on_arrival(self, count: int) -> None:
        """Called as the `count`-th request arrives."""
        if self.get("crash_after") and count >= self.get("crash_after"):
            os._exit(WorkerExit.INJECTED)

    def garbage(self, count: int) -> list[list[bytes]]:
        """Malformed messages to send the supervisor as the `count`-th request arrives."""
        if self.get("garble_at") != count:
            return []
        return [[b"\xc1 not msgpack"],
                [msgpack.packb({"v": 1, "kind": "reply", "id": [count], "ok": True})],
                [msgpack.packb({"v": 1, "kind": "heartbeat", "telemetry": {"rss_bytes": "lots"}})],
                [msgpack.packb({"v": 1, "kind": "chunk", "id": 1, "text": None})]]

    def before_generate(self, numbers: list[int]) -> None:
        """Called before a generate call whose rows are the requests that arrived `numbers`-th
        (counted from 1, so an unset fault, 0, names none)."""
        if self.get("hang_at") in numbers:
            while True:
                time.sleep(3600)
        rows_over = self.get("oom_rows_over")
        if self.get("oom_at") in numbers or (rows_over and len(numbers) > rows_over):
            raise torch.OutOfMemoryError("CUDA out of memory (injected by QVL_FAULTS)")
        if self.get("slow_ms"):
            time.sleep(self.get("slow_ms") / 1000.0)

    def on_progress(self, step: int, rows: int) -> None:
        """Called at the `step`-th progress report (from 1) of a generate call of `rows` rows."""
        if self.get("step_ms"):
            time.sleep(self.get("step_ms") / 1000.0)
        if rows > 1 and step == self.get("oom_batch_step"):
            raise torch.OutOfMemoryError("CUDA out of memory mid-batch (injected by QVL_FAULTS)")

    def on_step(self) -> None:
        """Called before every step of a step-scheduled engine."""
        self.steps += 1
        if self.steps == self.get("step_fail_at"):
            raise RuntimeError("engine step failed (injected by QVL_FAULTS)")

    def apply(self, telemetry: dict, done: int) -> dict:
        if self.telemetry and done >= self.get("telemetry_after"):
            telemetry.update({k: (int(v) if v.is_integer() and k.endswith(("bytes", "retries", "ooms")) else v)
                              for k, v in self.telemetry.items()})
        return telemetry
