"""Fixtures: the tiny model (made once per session), a shared supervisor, and a leak check that
fails a test whose processes outlive it."""

import os
import subprocess
import sys

import pytest
from harness import ROOT, SupervisorProcess, png, wait_gone

# Every test process and every worker it starts computes on one thread: many share the machine's
# few cores, and threads that wait for one another on a busy core only slow every test.
os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "tiny"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_model.py"), "--preset", "tiny",
                    "--out", str(out)], check=True, capture_output=True)
    return out


@pytest.fixture
def start_supervisor(tmp_path, tiny_model):
    """Start supervisors of the test's own; each is stopped and proven gone afterwards."""
    started: list[SupervisorProcess] = []

    def start(*flags: str, workers: int = 1, env: dict | None = None) -> SupervisorProcess:
        sup = SupervisorProcess(tmp_path / f"sup{len(started)}", tiny_model, *flags,
                                workers=workers, env=env)
        started.append(sup)
        return sup

    yield start
    for sup in started:
        _stop_and_check(sup)


@pytest.fixture(scope="session")
def shared_supervisor(tmp_path_factory, tiny_model):
    """One supervisor with two CPU workers for every test that does not need its own."""
    sup = SupervisorProcess(tmp_path_factory.mktemp("shared"), tiny_model, workers=2)
    sup.wait_ready(workers=2)
    yield sup
    _stop_and_check(sup)


def _stop_and_check(sup: SupervisorProcess) -> None:
    try:
        sup.stop()
    except subprocess.TimeoutExpired:
        sup.kill()
        pytest.fail(f"supervisor {sup.pid} did not stop on SIGTERM\n{sup.log()[-3000:]}")
    left = wait_gone({sup.pid, *sup.worker_pids})
    if left:
        sup.kill()
        pytest.fail(f"processes outlived their test: {sorted(left)}")


@pytest.fixture
def image():
    return png()


def pytest_terminal_summary(terminalreporter):
    """Print what the stateful tests recorded of the runs they made, so a CI log holds the figure;
    reports carry their properties back from xdist's workers, where a print would be lost."""
    for report in terminalreporter.stats.get("passed", []):
        for name, value in getattr(report, "user_properties", []):
            if name == "stateful_runs":
                terminalreporter.write_line(f"{report.nodeid}: {value} stateful runs of up to 40 steps")
