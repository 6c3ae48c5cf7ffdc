"""Starting and stopping real supervisor processes for tests, and proving none are left behind."""

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
from PIL import Image

from qvl.protocol import Client

ROOT = Path(__file__).resolve().parent.parent


class SupervisorProcess:
    """A `qvl-supervisor start` subprocess on a private ipc endpoint, with its log captured."""

    def __init__(self, run_dir: Path, model: Path, *flags: str, workers: int = 1, env: dict | None = None):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.endpoint = f"ipc://{run_dir}/frontend"
        self.log_path = run_dir / "supervisor.log"
        self.worker_pids: set[int] = set()
        cmd = [sys.executable, "-m", "qvl.supervisor.cli", "start", "--frontend", self.endpoint,
               "--model", str(model), "--device", "cpu", "--workers", str(workers),
               "--heartbeat-interval-s", "0.2", "--kill-grace-s", "3", *flags]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                         env={**os.environ, **(env or {})})

    @property
    def pid(self) -> int:
        return self.proc.pid

    def client(self, timeout: float = 30.0) -> Client:
        return Client(self.endpoint, timeout=timeout)

    def wait_ready(self, workers: int = 1, timeout: float = 60.0) -> dict:
        with self.client() as c:
            status = c.wait_ready(timeout=timeout, workers=workers)
        self.remember_workers()
        return status

    def remember_workers(self) -> set[int]:
        """Record the pids of the current worker processes, to check later that they are gone."""
        try:
            children = psutil.Process(self.pid).children()
        except psutil.NoSuchProcess:
            children = []
        self.worker_pids |= {c.pid for c in children}
        return {c.pid for c in children}

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self, timeout: float = 30.0) -> int:
        self.remember_workers()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        """Last resort: the supervisor and every worker it started."""
        for pid in {self.pid, *self.worker_pids}:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=10)


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(pids: set[int], timeout: float = 10.0) -> set[int]:
    """The pids still alive after `timeout` seconds (empty when all exited)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        left = {p for p in pids if alive(p)}
        if not left:
            return left
        time.sleep(0.05)
    return {p for p in pids if alive(p)}


def png(size=(96, 64), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()
