"""The supervisor's end of the worker launcher (`qvl.worker.launcher`), the fresh-interpreter start
it stands in for (`exec_worker`), and the child-subreaper duties that come with it.

`Launcher` starts the launcher process. Once it is ready, `launch` sends it a launch and waits for
the pid (a fork takes milliseconds; one not answered within `_ANSWER_TIMEOUT_S` ends the launcher),
so a worker's pid is known before anything it sends is read; a launch asked for while the launcher
still imports waits, pid unknown, and is forked when it is ready (`read`, when its socket is
readable). A `Launched` is polled, signalled and waited on as a `subprocess.Popen` is: it is this
process's own child (the launcher forks it twice and `become_subreaper` makes this process the one
it is re-parented to). A signal sent before its pid is known is delivered when it is.

A launcher that ends, fails to start or to answer is killed and not started again: `usable` turns
False and workers start as fresh interpreters from then on, the launches waiting for it included.
A launch it was sent and never answered may have been forked: `lost_launches` tells the supervisor
to kill the children it does not own (`kill_strays`) once the launcher is reaped.

A subreaper inherits every orphan among its descendants (a vLLM engine core whose worker died, a
compile helper), so `reap_strays` reaps the exited children that nothing here owns.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
from typing import Callable

import psutil
from qvl.protocol.exits import WorkerExit

from .events import event

_ANSWER_TIMEOUT_S = 5.0


def exec_worker(args: list[str], env: dict) -> subprocess.Popen:
    """Start `python -m qvl.worker ARGS` as a fresh interpreter."""
    return subprocess.Popen([sys.executable, "-m", "qvl.worker", *args], env=env, stdin=subprocess.DEVNULL)


def become_subreaper() -> None:
    PR_SET_CHILD_SUBREAPER = 36
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


def reap_strays(owned: set[int]) -> list[int]:
    """Reap the exited children whose pids are not in `owned` (their owners reap those); the pids
    reaped. An owned child that has exited hides the rest until its owner reaps it."""
    reaped = []
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return reaped
        if info is None or info.si_pid in owned:
            return reaped
        os.waitpid(info.si_pid, 0)
        reaped.append(info.si_pid)


def kill_strays(owned: set[int]) -> int:
    """SIGKILL the live children whose pids are not in `owned`, and theirs (a launch's middle
    process may not have exited yet); how many were found. `reap_strays` reaps them."""
    found = 0
    for child in psutil.Process().children():
        if child.pid in owned:
            continue
        try:
            family = [child, *child.children(recursive=True)]
        except psutil.Error:
            family = [child]
        for process in family:
            try:
                if process.status() != psutil.STATUS_ZOMBIE:
                    process.kill()
                    found += 1
            except psutil.Error:
                pass
    return found


class Launched:
    """A worker process the launcher forks (or, where it cannot, a fresh interpreter): Popen's
    `pid`, `returncode`, `poll`, `send_signal`, `kill` and `wait`, with `pid` None until it starts."""

    def __init__(self, args: list[str], env: dict):
        self.args, self.env = args, env
        self.pid: int | None = None
        self.returncode: int | None = None
        self.on_pid: Callable[[int], None] | None = None  # told the pid once it is known
        self._signal: int | None = None  # the strongest signal sent before the pid was known
        self._fresh: subprocess.Popen | None = None  # the fresh interpreter started instead

    def started(self, pid: int) -> None:
        self.pid = pid
        if self._signal is not None:
            self.send_signal(self._signal)
        if self.on_pid is not None:
            self.on_pid(pid)

    def start_fresh(self) -> None:
        """Start it as a fresh interpreter instead (the launcher is gone)."""
        try:
            self._fresh = exec_worker(self.args, self.env)
        except OSError as exc:
            event("spawn_failed", error=str(exc))
            self.failed()
            return
        self.started(self._fresh.pid)

    def failed(self) -> None:
        self.returncode = WorkerExit.SPAWN_FAILED

    def poll(self) -> int | None:
        if self.returncode is not None or self.pid is None:
            return self.returncode
        if self._fresh is not None:
            self.returncode = self._fresh.poll()
            return self.returncode
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # not this process's child: its launch went wrong
            self.returncode = WorkerExit.SPAWN_FAILED
            return self.returncode
        if pid:
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.pid is None:
            if self.returncode is None and (self._signal is None or signum == signal.SIGKILL):
                self._signal = signum
            return
        if self.poll() is None:
            try:
                os.kill(self.pid, signum)
            except ProcessLookupError:
                pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self) -> int:
        if self.returncode is None and self.pid is not None:
            if self._fresh is not None:
                self.returncode = self._fresh.wait()
            else:
                try:
                    self.returncode = os.waitstatus_to_exitcode(os.waitpid(self.pid, 0)[1])
                except ChildProcessError:
                    self.returncode = WorkerExit.SPAWN_FAILED
        return self.returncode if self.returncode is not None else WorkerExit.SPAWN_FAILED


class Launcher:
    """The launcher process, and the launches waiting for it to be ready."""

    def __init__(self, env: dict):
        self._ours, theirs = socket.socketpair()
        try:
            self.process = subprocess.Popen([sys.executable, "-m", "qvl.worker.launcher", str(theirs.fileno())],
                                            pass_fds=(theirs.fileno(),), env=env, stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        self._ours.setblocking(False)
        event("launcher_start", pid=self.pid)
        self.ready = False
        self.usable = True
        self.lost_launches = False  # it ended with a launch unanswered: its worker may run, unknown
        self._waiting: list[Launched] = []  # asked for while it imports
        self._heard = b""

    def fileno(self) -> int:
        return self._ours.fileno()

    @property
    def pid(self) -> int:
        return self.process.pid

    def status(self) -> dict:
        state = "gone" if not self.usable else "ready" if self.ready else "importing"
        return {"pid": self.pid, "state": state}

    def launch(self, args: list[str], env: dict) -> Launched:
        """A worker of `args` (those of `python -m qvl.worker`) and `env`: forked now if the launcher
        is ready, once it is if it imports, fresh where it is gone."""
        launched = Launched(args, env)
        if not self.usable:
            launched.start_fresh()
        elif self.ready:
            self._fork(launched)
        else:
            self._waiting.append(launched)
        return launched

    def read(self) -> None:
        """Take what the launcher said unasked: that it is ready, or (its socket closed) that it is gone."""
        while self.usable:
            try:
                data = self._ours.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._end("its socket closed")
                return
            self._heard += data
            while b"\n" in self._heard:
                line, self._heard = self._heard.split(b"\n", 1)
                if said(line).get("ready") is True and not self.ready:
                    self.ready = True
                    event("launcher_ready", pid=self.pid)
                    waiting, self._waiting = self._waiting, []
                    for launched in waiting:
                        if self.usable:
                            self._fork(launched)
                        else:
                            launched.start_fresh()

    def check(self) -> None:
        """Reap the launcher once it has exited (an exited child left unreaped would hide the strays
        behind it from `reap_strays`), and end its use (the socket may not say so yet)."""
        if self.process.poll() is not None and self.usable:
            self.read()
            self._end(f"it exited with {self.process.returncode}")

    def close(self) -> None:
        """Kill the launcher (it holds nothing: it may still be importing) and reap it; launches
        still waiting for it fail, on the way out."""
        self.usable = False
        for launched in self._waiting:
            launched.failed()
        self._waiting = []
        self._kill()
        self._ours.close()

    def _fork(self, launched: Launched) -> None:
        request = json.dumps({"args": launched.args, "env": launched.env}).encode() + b"\n"
        try:
            self._ours.settimeout(_ANSWER_TIMEOUT_S)
            self._ours.sendall(request)
            while b"\n" not in self._heard:
                data = self._ours.recv(65536)
                if not data:
                    raise ConnectionError("its socket closed")
                self._heard += data
        except OSError as exc:  # socket.timeout included
            self._end(f"a launch went unanswered: {exc}", lost=True)
            launched.start_fresh()
            return
        finally:
            self._ours.setblocking(False)
        line, self._heard = self._heard.split(b"\n", 1)
        answer = said(line)
        pid = answer.get("pid")
        if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0:
            launched.started(pid)
        else:
            event("launch_failed", error=str(answer.get("error", line[:200])))
            launched.start_fresh()

    def _end(self, why: str, lost: bool = False) -> None:
        if not self.usable:
            return
        self.usable = False
        self.lost_launches = lost
        self._kill()  # one that stopped answering could still fork what it was sent
        event("launcher_gone", pid=self.pid, why=why, then="workers start as fresh processes")
        waiting, self._waiting = self._waiting, []
        for launched in waiting:
            launched.start_fresh()

    def _kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def said(line: bytes) -> dict:
    """A line from the launcher as a map; empty for anything else."""
    try:
        heard = json.loads(line)
    except (ValueError, RecursionError):
        return {}
    return heard if isinstance(heard, dict) else {}
