"""The gateway process wrapper with a fake process factory and a fake clock: when it starts,
restarts after a doubling capped backoff, forgets old crashes after a long run, and stops."""

import subprocess

from qvl.supervisor.config import Config
from qvl.supervisor.gateway_process import GatewayProcess, GatewaySpec, gateway_spec

CONFIG = Config(http="127.0.0.1:8000", restart_backoff_s=1.0, restart_backoff_max_s=4.0,
                restart_period_s=60.0, kill_grace_s=5.0)


class FakeProcess:
    """Stands in for a Popen: dies when told to, and may ignore SIGTERM."""

    def __init__(self, pid: int, ignores_term: bool = False):
        self.pid, self.ignores_term = pid, ignores_term
        self.returncode: int | None = None
        self.signals: list[str] = []

    def poll(self):
        return self.returncode

    def die(self, code: int) -> None:
        self.returncode = code

    def terminate(self):
        self.signals.append("TERM")
        if not self.ignores_term:
            self.returncode = -15

    def kill(self):
        self.signals.append("KILL")
        self.returncode = -9

    def wait(self, timeout=None):
        if self.returncode is None:
            raise subprocess.TimeoutExpired("gateway", timeout)
        return self.returncode


class FakePopen:
    def __init__(self, ignores_term: bool = False):
        self.started: list[FakeProcess] = []
        self.commands: list[list[str]] = []
        self.ignores_term = ignores_term

    def __call__(self, command):
        self.commands.append(command)
        self.started.append(FakeProcess(100 + len(self.started), self.ignores_term))
        return self.started[-1]


def test_started_on_the_first_tick_with_the_whole_spec():
    popen = FakePopen()
    gateway = GatewayProcess(CONFIG, popen)
    assert popen.started == []
    gateway.tick(0.0)
    assert len(popen.started) == 1
    spec = GatewaySpec.from_json(popen.commands[0][-1])
    assert spec == gateway_spec(CONFIG, spec.parent) and spec.listen == "127.0.0.1:8000"
    assert gateway.status() == {"listen": "127.0.0.1:8000", "pid": 100, "restarts": 0, "last_exit": None}


def test_restarts_back_off_doubling_to_the_cap():
    popen = FakePopen()
    gateway = GatewayProcess(CONFIG, popen)
    now = 0.0
    gateway.tick(now)
    waits = []
    for _ in range(5):
        popen.started[-1].die(-9)
        now += 0.5  # a short run: each death counts
        gateway.tick(now)
        died_at, before = now, len(popen.started)
        while len(popen.started) == before:
            now += 0.25
            gateway.tick(now)
        waits.append(now - died_at)
    assert waits == [1.0, 2.0, 4.0, 4.0, 4.0]
    assert gateway.status()["restarts"] == 5 and gateway.status()["last_exit"] == "signal 9"


def test_no_restart_before_the_backoff_and_none_while_alive():
    popen = FakePopen()
    gateway = GatewayProcess(CONFIG, popen)
    gateway.tick(0.0)
    for t in (1.0, 2.0, 3.0):
        gateway.tick(t)
    assert len(popen.started) == 1
    popen.started[0].die(1)
    gateway.tick(3.0)
    assert gateway.status()["pid"] is None and gateway.status()["last_exit"] == "exit code 1"
    gateway.tick(3.99)
    assert len(popen.started) == 1
    gateway.tick(4.0)
    assert len(popen.started) == 2 and gateway.status()["pid"] == 101


def test_a_long_run_forgets_earlier_crashes():
    popen = FakePopen()
    gateway = GatewayProcess(CONFIG, popen)
    gateway.tick(0.0)
    for t in (1.0, 3.0):  # two quick deaths: the next wait would be 4 s
        popen.started[-1].die(-9)
        gateway.tick(t)
        gateway.tick(t + 2.0)
    assert len(popen.started) == 3
    popen.started[-1].die(-9)  # after a run of over restart_period_s
    gateway.tick(100.0)
    gateway.tick(101.0)
    assert len(popen.started) == 4  # the first delay again


def test_stop_terminates_and_kills_one_that_ignores_it():
    for ignores, signals in ((False, ["TERM"]), (True, ["TERM", "KILL"])):
        popen = FakePopen(ignores_term=ignores)
        gateway = GatewayProcess(CONFIG, popen)
        gateway.tick(0.0)
        gateway.stop()
        assert popen.started[0].signals == signals and gateway.status()["pid"] is None
