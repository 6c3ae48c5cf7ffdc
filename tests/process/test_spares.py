"""Spare processes for real: a killed worker's replacement is its slot's spare (the same pid) and a new
spare follows; a killed spare disturbs nothing, is no crash, and comes back; with spares off a slot
runs one process, as before; spares die with the supervisor; a spare alone speaks its small protocol
and imports without touching CUDA."""

import os
import random
import signal
import subprocess
import sys
import time

import msgpack
import pytest
import zmq

from harness import RawLoad, alive, events, png, wait_for, wait_gone
from qvl.protocol.codec import PROTOCOL_VERSION, encode, spare_identity, worker_identity
from qvl.protocol.contract import ModelOptions, SpareSpec, WorkerSpec
from qvl.protocol.exits import WorkerExit
from qvl.protocol.messages import Load, Stop

SPARES = ("--spare-workers", "true", "--restart-backoff-s", "0.1")


def slot_status(sup, slot: int = 0) -> dict:
    with sup.client() as client:
        return client.status()["workers"][slot]


def wait_spare(sup, other_than: int | None = None, timeout: float = 120) -> dict:
    """The slot's status once it serves beside a spare that finished its imports (not `other_than`)."""
    def ready():
        w = slot_status(sup)
        return w if (w["state"] == "ready" and w["spare_state"] == "waiting"
                     and w["spare_pid"] != other_than) else None
    status = wait_for(ready, timeout, interval=0.2)
    assert status, f"no spare came\n{sup.log()[-3000:]}"
    sup.remember_workers()
    return status


@pytest.mark.timeout(240)
def test_a_killed_worker_is_replaced_by_its_spare_and_a_new_spare_follows(start_supervisor):
    sup = start_supervisor(*SPARES)
    sup.wait_ready()
    before = wait_spare(sup)
    assert before["spare_rss_bytes"] > 0 and before["spare_pid"] != before["pid"]
    os.kill(before["pid"], signal.SIGKILL)
    with sup.client(timeout=60) as client:
        reply = client.ask(png(), "after the kill", max_new_tokens=2)
    assert reply.worker == {"slot": 0, "generation": 2, "pid": before["spare_pid"]}
    after = wait_spare(sup, other_than=before["spare_pid"])
    assert after["pid"] == before["spare_pid"] and after["generation"] == 2
    assert after["spare_pid"] not in (before["pid"], before["spare_pid"])
    assert not alive(before["pid"])
    log = sup.log()
    assert [e["spare"] for e in events(log, "worker_state") if e["old"] == "spare"] == ["1"]
    with sup.client() as client:
        assert client.status()["counters"]["spares_used"] == 1
    assert sup.stop() == 0
    assert not wait_gone({after["pid"], after["spare_pid"]})


@pytest.mark.timeout(240)
def test_killing_the_spare_disturbs_nothing_is_no_crash_and_it_comes_back(start_supervisor):
    sup = start_supervisor(*SPARES, env={"QVL_FAULTS": "slow_ms=50"})
    sup.wait_ready()
    first = wait_spare(sup)
    load = RawLoad(sup.endpoint, sockets=2)
    try:
        load.send(20)
        os.kill(first["spare_pid"], signal.SIGKILL)
        load.send(20)
        load.receive(timeout=90)
    finally:
        load.close()
    assert load.outcomes() == {"ok": 40}
    again = wait_spare(sup, other_than=first["spare_pid"])
    assert (again["pid"], again["generation"], again["restarts"]) == (first["pid"], 1, 0)
    with sup.client() as client:
        counters = client.status()["counters"]
    assert counters.get("worker_crashes", 0) == 0 and counters["spare_deaths"] == 1
    log = sup.log()
    assert len(events(log, "spare_exited")) == 1
    assert not events(log, "worker_restart") and not events(log, "slot_failed")


@pytest.mark.timeout(300)
def test_sigkill_chaos_among_workers_and_spares_loses_no_request(start_supervisor):
    """Requests from 4 sockets while workers and spares of two slots are SIGKILLed at random, 6 times:
    every request gets exactly one reply, and afterwards each slot serves beside a waiting spare."""
    sup = start_supervisor(*SPARES, "--max-attempts", "3", "--restart-intensity", "100",
                           "--max-inflight", "4", workers=2, env={"QVL_FAULTS": "slow_ms=60"})
    sup.wait_ready(workers=2)
    rng = random.Random(11)
    load = RawLoad(sup.endpoint, sockets=4)
    victims = []
    try:
        while len(victims) < 6:
            load.send(8)
            load.receive(timeout=rng.uniform(0.8, 2.0))
            with sup.client() as client:
                slots = client.status()["workers"]
            pids = [p for w in slots for p in (w["pid"], w["spare_pid"]) if p]
            sup.remember_workers()
            victim = rng.choice(pids)
            try:
                os.kill(victim, signal.SIGKILL)
            except ProcessLookupError:  # it ended since the status was read
                continue
            victims.append(victim)
        load.send(8)
        load.receive(timeout=120)
        time.sleep(1.0)  # any duplicate reply would arrive by now
        load.receive(timeout=0.5)
    finally:
        load.close()
    counts = [len(r) for r in load.replies.values()]
    assert counts.count(1) == len(load.sent), f"lost {counts.count(0)}, duplicated {sum(c > 1 for c in counts)}"
    assert set(load.outcomes()) <= {"ok", "worker_failed"}, load.outcomes()
    for slot in (0, 1):
        status = wait_for(lambda: (w := slot_status(sup, slot))["state"] == "ready"
                          and w["spare_state"] == "waiting", 120, interval=0.2)
        assert status, f"slot {slot} did not come back with a spare\n{sup.log()[-3000:]}"
    sup.remember_workers()


@pytest.mark.timeout(180)
def test_with_spares_off_a_slot_runs_one_process_and_restarts_cold(start_supervisor):
    sup = start_supervisor("--spare-workers", "false", "--restart-backoff-s", "0.1")
    sup.wait_ready()
    time.sleep(2.0)  # a spare would have started at once
    first = slot_status(sup)
    assert sup.remember_workers() == {first["pid"]} and first["spare_pid"] is None
    os.kill(first["pid"], signal.SIGKILL)
    with sup.client(timeout=120) as client:
        reply = client.ask(png(), "after the kill", max_new_tokens=2)
    assert reply.worker["generation"] == 2 and reply.worker["pid"] != first["pid"]
    assert sup.remember_workers() == {reply.worker["pid"]}
    assert not events(sup.log(), "spare_state")


@pytest.mark.timeout(180)
def test_a_spare_dies_with_its_supervisor(start_supervisor):
    sup = start_supervisor(*SPARES)
    sup.wait_ready()
    status = wait_spare(sup)
    os.kill(sup.pid, signal.SIGKILL)
    assert not wait_gone({status["pid"], status["spare_pid"]}, timeout=15)


# --- a spare alone, its supervisor played by a bare ROUTER socket -----------------------------------

@pytest.fixture
def bare_backend(tmp_path):
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    endpoint = f"ipc://{tmp_path}/backend"
    sock.bind(endpoint)
    procs: list[subprocess.Popen] = []

    def start(spec: SpareSpec) -> subprocess.Popen:
        log = open(tmp_path / f"spare{spec.number}.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "qvl.worker", "--spare", spec.to_json()],
                                stdout=log, stderr=subprocess.STDOUT)
        procs.append(proc)
        return proc

    yield endpoint, sock, start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
    sock.close(0)
    assert not wait_gone({p.pid for p in procs})


def receive(sock, timeout: float) -> tuple[bytes, dict]:
    assert sock.poll(int(timeout * 1000)), "nothing came"
    identity, header, *_ = sock.recv_multipart()
    return identity, msgpack.unpackb(header, raw=False)


@pytest.mark.timeout(180)
def test_a_spare_alone_says_hello_and_becomes_the_worker_it_is_told(bare_backend, tiny_model):
    backend, sock, start = bare_backend
    proc = start(SpareSpec(backend, 0, 5))
    identity, hello = receive(sock, 120)
    assert identity == spare_identity(0, 5)
    assert (hello["kind"], hello["spare"], hello["generation"], hello["pid"]) == ("hello", True, 5, proc.pid)
    spec = WorkerSpec(backend, 0, 9, ModelOptions(str(tiny_model), "cpu"), heartbeat_interval_s=0.5)
    sock.send_multipart([identity, *encode(Load(spec.to_json()).header())])
    seen = []
    while len(seen) < 2:  # hello and ready of generation 9, from the same process (heartbeats skipped)
        identity, message = receive(sock, 60)
        if identity == worker_identity(0, 9):
            seen.append(message)
    assert [m["kind"] for m in seen] == ["hello", "ready"]
    assert seen[0]["pid"] == proc.pid and seen[0]["generation"] == 9 and "spare" not in seen[0]
    sock.send_multipart([worker_identity(0, 9), *encode(Stop().header())])
    assert proc.wait(timeout=30) == WorkerExit.OK


@pytest.mark.timeout(180)
@pytest.mark.parametrize("sent", ["not json", '{"slot": 0}', "for another slot", "on another backend",
                                  "a load of a number", "a stop", "no message"])
def test_a_spare_told_what_it_cannot_use_exits_bad_spec(bare_backend, tiny_model, sent):
    """The supervisor counts a spare it sent a `load` as that worker: it must not wait for one that
    dropped it, so a spare that cannot become a worker ends, whatever it was sent."""
    backend, sock, start = bare_backend
    proc = start(SpareSpec(backend, 1, 1))
    identity, _ = receive(sock, 120)
    other = {"for another slot": WorkerSpec(backend, 0, 2, ModelOptions(str(tiny_model), "cpu")),
             "on another backend": WorkerSpec(backend + "x", 1, 2, ModelOptions(str(tiny_model), "cpu"))}
    garbage = {"a load of a number": encode({"v": PROTOCOL_VERSION, "kind": "load", "spec": 7}),
               "a stop": encode(Stop().header()), "no message": [b"\xc1"]}
    text = other[sent].to_json() if sent in other else sent
    sock.send_multipart([identity, *garbage.get(sent, encode(Load(text).header()))])
    assert proc.wait(timeout=30) == WorkerExit.BAD_SPEC


@pytest.mark.timeout(150)
def test_a_spare_whose_supervisor_died_during_its_imports_exits(tmp_path):
    """The supervisor dies before the spare could ask the kernel to be told: it is re-parented, and
    must still see that it is orphaned."""
    spec = SpareSpec(f"ipc://{tmp_path}/backend", 0, 1)
    code = ("import os, subprocess, sys\n"
            f"p = subprocess.Popen([sys.executable, '-m', 'qvl.worker', '--spare', {spec.to_json()!r}],\n"
            "                     env=dict(os.environ, QVL_SUPERVISOR_PID=str(os.getpid())))\n"
            "print(p.pid, flush=True)\n"
            "os._exit(0)\n")
    pid = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30).stdout)
    assert not wait_gone({pid}, timeout=120)


@pytest.mark.timeout(120)
def test_a_spare_imports_everything_without_initialising_cuda():
    """Every call that would make a CUDA context goes through torch.cuda's lazy init: make it fail."""
    code = ("import torch, torch.cuda\n"
            "def refuse(): raise AssertionError('a spare initialised CUDA')\n"
            "torch.cuda._lazy_init = refuse\n"
            "import qvl.worker.__main__\n"
            "from qvl.worker.spare import import_engine\n"
            "import_engine('hf')\n"
            "assert not torch.cuda.is_initialized()\n"
            "print('clean')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=100)
    assert done.returncode == 0 and "clean" in done.stdout, done.stderr[-2000:]
