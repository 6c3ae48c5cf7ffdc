"""The HTTP gateway as an OS process: its contract, its command line, and the wrapper that keeps
it running.

The supervisor builds a `GatewaySpec` once from its `Config` and hands it whole to
`python -m qvl.supervisor.gateway SPEC` as JSON. `GatewayProcess` starts that process, notices
its death on `tick(now)`, restarts it after a doubling, capped backoff, and stops it. It owns
Popen and signals only: no sockets, and the clock comes in as an argument, so it is tested with
a fake process factory and a fake clock.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Callable

from qvl.protocol.codec import Limits

from .config import Config
from .events import event
from .lifecycle import restart_delay


@dataclass(frozen=True)
class GatewaySpec:
    """Everything the gateway process is told: where to listen, whom to serve, within what limits."""

    frontend: str
    listen: str = "127.0.0.1:8000"
    model_name: str = "qvl"
    parent: int = 0  # the gateway exits when this process is gone (0: never)
    api_key_file: str = ""
    remote_images: bool = False
    curve_dir: str = ""
    max_body_bytes: int = 32 << 20
    max_concurrent: int = 256
    limits: Limits = field(default_factory=Limits)  # the supervisor's own: images, bytes, tokens

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "GatewaySpec":
        """The spec `to_json` wrote; `ValueError` or `TypeError` for anything else."""
        raw = json.loads(text)
        if not isinstance(raw, dict) or not isinstance(raw.get("limits"), dict):
            raise ValueError("a gateway spec must be a JSON object with `limits`")
        return cls(**{**raw, "limits": Limits(**raw["limits"])})


def gateway_spec(config: Config, parent: int) -> GatewaySpec:
    return GatewaySpec(config.frontend, config.http, os.path.basename(config.model.rstrip("/")), parent,
                       config.http_api_key_file, config.http_remote_images, config.curve_dir,
                       config.http_max_body_bytes, config.http_max_concurrent, config.limits)


def gateway_command(spec: GatewaySpec) -> list[str]:
    return [sys.executable, "-m", "qvl.supervisor.gateway", spec.to_json()]


def _popen(command: list[str]) -> subprocess.Popen:
    return subprocess.Popen(command, stdin=subprocess.DEVNULL)


class GatewayProcess:
    """One gateway process kept alive: restarted after `restart_delay` of its consecutive crashes.

    A gateway that ran at least `restart_period_s` before it died starts its count again, so a
    death a week counts as a first one. There is no failed state: the delay is capped at
    `restart_backoff_max_s`, and it is always tried again.
    """

    def __init__(self, config: Config, popen: Callable[[list[str]], subprocess.Popen] = _popen):
        self.config = config
        self.command = gateway_command(gateway_spec(config, os.getpid()))
        self.popen = popen
        self.process: subprocess.Popen | None = None
        self.started_at = 0.0
        self.start_at = 0.0  # when the next start is due, while no process runs
        self.crashes = 0  # consecutive deaths, each after a short run
        self.restarts = 0
        self.last_exit: str | None = None

    def tick(self, now: float) -> None:
        """Start the process when due; notice its death and schedule the restart."""
        if self.process is None:
            if now >= self.start_at:
                self.process = self.popen(self.command)
                self.started_at = now
                event("gateway_start", pid=self.process.pid, listen=self.config.http,
                      restarts=self.restarts)
            return
        code = self.process.poll()
        if code is None:
            return
        ran = now - self.started_at
        self.crashes = 1 if ran >= self.config.restart_period_s else self.crashes + 1
        delay = restart_delay(self.crashes, self.config)
        self.last_exit = f"signal {-code}" if code < 0 else f"exit code {code}"
        self.restarts += 1
        self.start_at = now + delay
        event("gateway_exit", logging.WARNING, pid=self.process.pid, how=self.last_exit,
              ran_s=round(ran, 3), backoff_s=delay)
        self.process = None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after `kill_grace_s`; returns once the process is reaped."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(self.config.kill_grace_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None

    def status(self) -> dict:
        return {"listen": self.config.http, "pid": self.process.pid if self.process else None,
                "restarts": self.restarts, "last_exit": self.last_exit}
