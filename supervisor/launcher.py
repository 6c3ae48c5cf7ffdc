"""The supervisor's end of the worker launcher (`qvl.worker.launcher`), and the child-subreaper
duties that come with it.

`Launcher` starts the launcher process and hands it launches in order; each `launch` gives at once a
`Launched`, the process to be, whose pid comes with the launcher's answer (`read`, when its socket
is readable). A `Launched` is polled, signalled and waited on as a `subprocess.Popen` is: it is this
process's own child (the launcher forks it twice and `become_subreaper` makes this process the one
it is re-parented to). A signal sent before its pid is known is delivered when it is; a launch the
launcher could not make, or one pending when the launcher ends, exits `SPAWN_FAILED`, as a worker
the supervisor could not start does. A launcher that ends, or fails to start, is not started again:
`usable` turns False and the supervisor starts its workers itself from then on.

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

_SEND_TIMEOUT_S = 5.0


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


def kill_strays(owned: set[int]) -> None:
    """SIGKILL the live children whose pids are not in `owned`, and theirs (a launch's middle
    process may not have exited yet); `reap_strays` reaps them."""
    for child in psutil.Process().children():
        if child.pid in owned:
            continue
        try:
            family = [child, *child.children(recursive=True)]
        except psutil.Error:
            family = [child]
        for process in family:
            try:
                process.kill()
            except psutil.Error:
                pass


class Launched:
    """A worker process the launcher forks: Popen's `pid`, `returncode`, `poll`, `send_signal`,
    `kill` and `wait`, with `pid` None until the launcher answers."""

    def __init__(self):
        self.pid: int | None = None
        self.returncode: int | None = None
        self.on_pid: Callable[[int], None] | None = None  # told the pid once it is known
        self._signal: int | None = None  # the strongest signal sent before the pid was known

    def started(self, pid: int) -> None:
        self.pid = pid
        if self._signal is not None:
            self.send_signal(self._signal)
        if self.on_pid is not None:
            self.on_pid(pid)

    def failed(self) -> None:
        self.returncode = WorkerExit.SPAWN_FAILED

    def poll(self) -> int | None:
        if self.returncode is not None or self.pid is None:
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
            _, status = os.waitpid(self.pid, 0)
            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode if self.returncode is not None else WorkerExit.SPAWN_FAILED


class Launcher:
    """The launcher process and the launches it has not answered yet, in order."""

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
        self.lost_launches = False  # it ended with launches unanswered: their workers may run, unknown
        self._unsent: list[tuple[bytes, Launched]] = []
        self._unanswered: list[Launched] = []
        self._partial = b""

    def fileno(self) -> int:
        return self._ours.fileno()

    @property
    def pid(self) -> int:
        return self.process.pid

    def status(self) -> dict:
        state = "gone" if not self.usable else "ready" if self.ready else "importing"
        return {"pid": self.pid, "state": state}

    def launch(self, args: list[str], env: dict) -> Launched:
        """A worker forked with `args` (those of `python -m qvl.worker`) and `env`; sent now if the
        launcher is ready, else once it is."""
        launched = Launched()
        request = json.dumps({"args": args, "env": env}).encode() + b"\n"
        if not self.usable:
            launched.failed()
        elif self.ready:
            self._send(request, launched)
        else:
            self._unsent.append((request, launched))
        return launched

    def read(self) -> None:
        """Take what the launcher has said: it is ready, or a launch's pid or failure."""
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
            *lines, self._partial = (self._partial + data).split(b"\n")
            for line in lines:
                self._answer(line)

    def check(self) -> None:
        """Reap the launcher once it has exited (an exited child left unreaped would hide the strays
        behind it from `reap_strays`), and end its use (the socket may not say so yet)."""
        if self.process.poll() is not None and self.usable:
            self.read()
            self._end(f"it exited with {self.process.returncode}")

    def settle(self, timeout: float) -> None:
        """Wait up to `timeout` seconds for the launches sent to be answered (on the way out)."""
        self._ours.settimeout(timeout)
        try:
            while self.usable and self._unanswered:
                data = self._ours.recv(65536)
                if not data:
                    break
                *lines, self._partial = (self._partial + data).split(b"\n")
                for line in lines:
                    self._answer(line)
        except OSError:
            pass
        finally:
            self._ours.setblocking(False)

    def close(self) -> None:
        """Close the launcher's socket, so it ends, and wait for it."""
        self._end("the supervisor closed it", quiet=True)
        self._ours.close()
        try:
            self.process.wait(timeout=_SEND_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def _answer(self, line: bytes) -> None:
        try:
            said = json.loads(line)
        except ValueError:
            said = {}
        if not isinstance(said, dict):
            said = {}
        if said.get("ready") is True and not self.ready:
            self.ready = True
            event("launcher_ready", pid=self.pid)
            unsent, self._unsent = self._unsent, []
            for request, launched in unsent:
                self._send(request, launched)
            return
        if not self._unanswered:
            return
        launched = self._unanswered.pop(0)
        pid = said.get("pid")
        if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0:
            launched.started(pid)
        else:
            event("launch_failed", error=str(said.get("error", line[:200])))
            launched.failed()

    def _send(self, request: bytes, launched: Launched) -> None:
        try:
            self._ours.settimeout(_SEND_TIMEOUT_S)
            self._ours.sendall(request)
        except OSError as exc:
            launched.failed()
            self._end(f"a launch could not be sent: {exc}")
            return
        finally:
            if self._ours.fileno() >= 0:
                self._ours.setblocking(False)
        self._unanswered.append(launched)

    def _end(self, why: str, quiet: bool = False) -> None:
        if not self.usable:
            return
        self.usable = False
        self.lost_launches = bool(self._unanswered)
        for launched in self._unanswered + [launched for _, launched in self._unsent]:
            launched.failed()
        self._unanswered, self._unsent = [], []
        if not quiet:
            event("launcher_gone", pid=self.pid, why=why, then="workers start as fresh processes")
