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
    """A `qvl-supervisor start` subprocess on a private ipc endpoint, with its log captured. Without
    spare processes unless the flags ask for them (`--spare-workers true`): on a machine of few cores
    a spare's imports beside every test's workers would only slow the tests that do not need one."""

    def __init__(self, run_dir: Path, model: Path, *flags: str, workers: int = 1, env: dict | None = None):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.endpoint = f"ipc://{run_dir}/frontend"
        self.log_path = run_dir / "supervisor.log"
        self.worker_pids: set[int] = set()
        if "--spare-workers" not in flags:  # spares are tested by the tests that ask for them
            flags = ("--spare-workers", "false", *flags)
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

    def wait_ready(self, workers: int = 1, timeout: float = 120.0) -> dict:
        with self.client() as c:
            status = c.wait_ready(timeout=timeout, workers=workers)
        self.remember_workers()
        return status

    def remember_workers(self) -> set[int]:
        """Record the pids of the supervisor's descendants (its workers and their children, vLLM's
        engine cores; its worker launcher), to check later that they are gone; returns the workers'."""
        try:
            children = psutil.Process(self.pid).children()
            descendants = psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            children = descendants = []
        self.worker_pids |= {c.pid for c in descendants}
        launchers = {int(e["pid"]) for e in events(self.log(), "launcher_start")}
        return {c.pid for c in children} - launchers

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


def a_stop_string(text: str) -> str:
    """Two characters from the second half of an answer whose first appearance is not at its start:
    a stop string that cuts it somewhere in the middle."""
    for k in range(len(text) // 2, len(text) - 1):
        stop = text[k:k + 2]
        if "\ufffd" not in stop and text.find(stop) > 0:
            return stop
    raise AssertionError(f"no usable stop string in {text!r}")


def events(log: str, name: str | None = None) -> list[dict]:
    """The supervisor's logged events, in order, optionally only those called `name`."""
    from qvl.supervisor.events import parse_event
    found = [parse_event(line) for line in log.splitlines() if "event=" in line]
    return [e for e in found if name is None or e["event"] == name]


def wait_for(predicate, timeout: float, interval: float = 0.05):
    """Poll `predicate` until it returns something true; that value, or None after `timeout`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    return None


class RawLoad:
    """Requests over bare DEALER sockets that count every reply per id, so that a lost or a
    duplicated reply shows (the client library would hide a duplicate)."""

    def __init__(self, endpoint: str, sockets: int = 4, max_new_tokens: int = 4):
        import zmq
        self.ctx = zmq.Context.instance()
        self.socks = []
        for _ in range(sockets):
            s = self.ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            s.connect(endpoint)
            self.socks.append(s)
        self.max_new_tokens = max_new_tokens
        self.replies: dict[str, list[dict]] = {}
        self.sent: list[str] = []
        self.image = png((64, 48))

    def send(self, n: int) -> None:
        from qvl.protocol.codec import encode
        from qvl.protocol.messages import GenerationParams, build_generate
        for _ in range(n):
            rid = f"r{len(self.sent)}"
            req = build_generate(rid, [{"role": "user", "content": [
                {"type": "image", "image": self.image}, {"type": "text", "text": f"question {rid}"}]}],
                GenerationParams(max_new_tokens=self.max_new_tokens))
            self.socks[len(self.sent) % len(self.socks)].send_multipart(encode(req.header(), req.images))
            self.sent.append(rid)
            self.replies.setdefault(rid, [])

    def receive(self, timeout: float) -> None:
        """Collect replies until every sent request has one, or `timeout` passes."""
        import msgpack
        import zmq
        poller = zmq.Poller()
        for s in self.socks:
            poller.register(s, zmq.POLLIN)
        end = time.monotonic() + timeout
        while time.monotonic() < end and self.pending():
            for sock, _ in poller.poll(100):
                while sock.poll(0):
                    reply = msgpack.unpackb(sock.recv_multipart()[0], raw=False)
                    self.replies.setdefault(reply["id"], []).append(reply)

    def pending(self) -> int:
        return sum(1 for v in self.replies.values() if not v)

    def outcomes(self) -> dict[str, int]:
        """How many requests ended each way: 'ok' or an error code."""
        import collections
        return collections.Counter("ok" if r[0]["ok"] else r[0]["error"]["code"]
                                   for r in self.replies.values() if r)

    def close(self) -> None:
        for s in self.socks:
            s.close(0)
