"""The worker launcher for real: workers and spares forked from it are the supervisor's own children
and hold nothing of it; a launcher killed while it imports, one that forked a worker and died before
it said so, and one that stops answering leave no process behind and the slot serving through fresh
interpreters, no start charged as a crash where none was tried; a stop while it imports does not
wait for it; `worker_launch exec` starts none.
The subreaper's duties (`reap_strays`, `kill_strays`, `Launched`) with real processes, in a child
interpreter (a pytest process made a subreaper would inherit every other test's orphans)."""

import os
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest

from harness import ROOT, alive, events, png, wait_for, wait_gone

pytestmark = pytest.mark.timeout(180)


def children(sup) -> dict[int, list[str]]:
    """The supervisor's live children's command lines (an exited one may wait to be reaped)."""
    found = {}
    for child in psutil.Process(sup.pid).children():
        try:
            found[child.pid] = child.cmdline()
        except psutil.ZombieProcess:
            pass
    return found


def status(sup) -> dict:
    with sup.client() as client:
        return client.status()["workers"][0]


def launcher_pid(sup) -> int:
    found = wait_for(lambda: events(sup.log(), "launcher_ready"), 60)
    assert found, f"no launcher became ready\n{sup.log()[-3000:]}"
    return int(found[0]["pid"])


def ask(sup, text: str) -> dict:
    with sup.client(timeout=60) as client:
        return client.ask(png(), text, max_new_tokens=2).worker


def test_forked_workers_and_spares_are_the_supervisors_children(start_supervisor):
    sup = start_supervisor("--spare-workers", "true", "--restart-backoff-s", "0.1")
    sup.wait_ready()
    launcher = launcher_pid(sup)
    first = wait_for(lambda: (w := status(sup))["spare_state"] == "waiting" and w, 120, interval=0.2)
    assert first, sup.log()[-3000:]
    sup.remember_workers()
    kids = children(sup)
    assert set(kids) == {launcher, first["pid"], first["spare_pid"]}, kids
    channel = os.readlink(f"/proc/{launcher}/fd/{kids[launcher][-1]}")  # its end of the socket pair
    for pid in (first["pid"], first["spare_pid"]):  # forked: the launcher's command line, not their own
        assert kids[pid] == kids[launcher] and psutil.Process(pid).ppid() == sup.pid
        held = {os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")}
        assert channel.startswith("socket:") and channel not in held
    os.kill(first["pid"], signal.SIGKILL)
    assert ask(sup, "after the kill")["pid"] == first["spare_pid"]
    second = wait_for(lambda: (w := status(sup))["spare_pid"] not in (None, first["spare_pid"]) and w, 120)
    assert second and psutil.Process(second["spare_pid"]).ppid() == sup.pid
    sup.remember_workers()
    assert sup.stop() == 0
    assert not wait_gone({launcher, second["pid"], second["spare_pid"]})


def test_a_launcher_killed_while_it_imports_leaves_fresh_interpreters(start_supervisor):
    sup = start_supervisor("--restart-backoff-s", "0.1")
    launcher = wait_for(lambda: next(iter(children(sup)), None), 30, interval=0.01)
    assert launcher and "qvl.worker.launcher" in children(sup)[launcher]
    os.kill(launcher, signal.SIGKILL)  # the first worker's launch waits for it to be ready
    sup.wait_ready()
    worker = status(sup)  # the first worker, waiting for the launcher, starts fresh: no crash
    assert (worker["generation"], worker["restarts"]) == (1, 0)
    assert children(sup)[worker["pid"]][-2] == "qvl.worker"  # python -m qvl.worker SPEC
    assert ask(sup, "served")["pid"] == worker["pid"]
    gone = events(sup.log(), "launcher_gone")
    assert len(gone) == 1 and not alive(launcher)


def test_a_launcher_dying_after_a_fork_leaves_no_worker_of_nobodys(start_supervisor):
    sup = start_supervisor("--restart-backoff-s", "0.1", env={"QVL_FAULTS": "launcher_dies_at=2"})
    sup.wait_ready()
    launcher, first = launcher_pid(sup), status(sup)
    os.kill(first["pid"], signal.SIGKILL)  # its replacement is the launch after which the launcher dies
    assert ask(sup, "served")["generation"] == 2
    worker = status(sup)  # started fresh in its place: no crash of its own
    assert worker["restarts"] == 1 and children(sup)[worker["pid"]][-2] == "qvl.worker"
    sup.remember_workers()
    # the launch's forked worker, lost with the launcher, is killed, not left loading for nobody
    assert wait_for(lambda: set(children(sup)) == {worker["pid"]}, 20), children(sup)
    assert not alive(launcher) and events(sup.log(), "launcher_gone")


def test_a_launcher_that_stops_answering_is_killed_and_the_slot_serves_fresh(start_supervisor):
    sup = start_supervisor("--restart-backoff-s", "0.1")
    sup.wait_ready()
    launcher, first = launcher_pid(sup), status(sup)
    os.kill(launcher, signal.SIGSTOP)  # alive, holding its socket, answering nothing
    os.kill(first["pid"], signal.SIGKILL)
    assert ask(sup, "served")["generation"] == 2
    worker = status(sup)
    assert worker["restarts"] == 1 and children(sup)[worker["pid"]][-2] == "qvl.worker"
    assert wait_for(lambda: set(children(sup)) == {worker["pid"]}, 20), children(sup)
    assert not alive(launcher) and "unanswered" in events(sup.log(), "launcher_gone")[0]["why"]


def test_a_stop_while_the_launcher_imports_does_not_wait_for_it(start_supervisor):
    sup = start_supervisor()
    assert wait_for(lambda: events(sup.log(), "launcher_start"), 30)
    assert sup.stop(timeout=30) == 0
    assert not events(sup.log(), "launcher_ready") and "Traceback" not in sup.log()
    assert not wait_gone(sup.worker_pids)


def test_worker_launch_exec_starts_no_launcher(start_supervisor):
    sup = start_supervisor("--worker-launch", "exec")
    sup.wait_ready()
    worker = status(sup)
    assert set(children(sup)) == {worker["pid"]}
    assert children(sup)[worker["pid"]][-2] == "qvl.worker"
    assert not events(sup.log(), "launcher_ready")


SUBREAPER = """
import os, signal, subprocess, sys, time
from qvl.supervisor.launcher import Launched, become_subreaper, kill_strays, reap_strays

become_subreaper()
owned = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])

def stray(seconds):
    # a grandchild orphaned at once, as a launch's worker or a dead worker's child is: re-parented here
    read, write = os.pipe()
    if os.fork() == 0:
        pid = os.fork()
        if pid == 0:
            time.sleep(seconds)
            os._exit(3)
        os.write(write, str(pid).encode())
        os._exit(0)
    pid = int(os.read(read, 32))
    while psutil_ppid(pid) != os.getpid():  # until the middle process has exited
        time.sleep(0.01)
    return pid

def psutil_ppid(pid):
    import psutil
    return psutil.Process(pid).ppid()

exiting = stray(0.2)
living = stray(60)
time.sleep(1.0)
reaped = reap_strays({owned.pid, living})
assert exiting in reaped, (exiting, reaped)
assert owned.poll() is None and psutil_ppid(living) == os.getpid()
kill_strays({owned.pid})
time.sleep(0.5)
assert living in reap_strays({owned.pid}) and owned.poll() is None

pending = Launched([], {})
pending.send_signal(signal.SIGTERM)
pending.send_signal(signal.SIGKILL)
pending.send_signal(signal.SIGTERM)  # a weaker signal after SIGKILL does not replace it
assert pending.poll() is None
pending.started(stray(60))
assert pending.wait() == -signal.SIGKILL
lost = Launched([], {})
lost.failed()
lost.kill()
assert lost.poll() == lost.wait() == 6  # SPAWN_FAILED
owned.kill()
owned.wait()
print("ok")
"""


def test_the_subreaper_reaps_and_kills_only_what_it_does_not_own():
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(SUBREAPER)], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert done.stdout.strip() == "ok", done.stderr[-3000:]
