"""Recycles while requests flow: each policy threshold, the operator's command, SIGHUP, overlap.

CPU workers have no CUDA allocator, so allocator telemetry is injected by the worker's fault
hook (`QVL_FAULTS`), for the first incarnation only; the replacement reports its own.
"""

import json
import signal
import subprocess
import sys
import time

import pytest

from harness import RawLoad, events, png, wait_for


def load_until_recycled(sup, recycles=1, timeout=120.0, batch=8):
    """Keep requests flowing until `recycles` recycles completed, then let them finish; every
    request must have been answered."""
    load = RawLoad(sup.endpoint)
    try:
        end = time.monotonic() + timeout
        while len(events(sup.log(), "recycle_done")) < recycles and time.monotonic() < end:
            load.send(batch)
            load.receive(timeout=5)
        load.send(batch)  # and a few served by the replacement
        load.receive(timeout=30)
        assert len(events(sup.log(), "recycle_done")) >= recycles
        assert load.pending() == 0
        assert load.outcomes() == {"ok": len(load.sent)}, load.outcomes()
        return load
    finally:
        load.close()


THRESHOLDS = {
    "fragmentation": (["--recycle-fragmentation", "0.5"],
                      "telemetry.fragmentation=0.6,telemetry.reserved_bytes=2e9"),
    "reserved_bytes": (["--recycle-reserved-bytes", "4000000000"], "telemetry.reserved_bytes=5e9"),
    "device_used": (["--recycle-device-used-fraction", "0.9"],
                    "telemetry.device_used_bytes=78e9,telemetry.device_total_bytes=80e9"),
    "alloc_retries": (["--recycle-alloc-retries", "2"], "telemetry.num_alloc_retries=3"),
    "host_rss": (["--recycle-rss-bytes", "8000000000"], "telemetry.rss_bytes=9e9"),
    "out_of_memory": ([], "oom_at=6"),
    "requests": (["--recycle-requests", "12"], ""),
    "age": (["--recycle-age-s", "2"], ""),
}


@pytest.mark.timeout(120)
@pytest.mark.parametrize("reason", sorted(THRESHOLDS))
def test_threshold_recycles_while_requests_flow(start_supervisor, reason):
    flags, faults = THRESHOLDS[reason]
    env = {"QVL_FAULTS": f"{faults},telemetry_after=4,generation=1"} if faults else {}
    sup = start_supervisor(*flags, env=env)
    sup.wait_ready()
    load_until_recycled(sup)
    wanted = events(sup.log(), "recycle_wanted")[0]
    assert wanted["reason"] == reason
    assert wanted["hard"] == str(reason in ("out_of_memory", "device_used"))
    done = events(sup.log(), "recycle_done")[0]
    assert done["reason"] == reason and int(done["gen"]) == 2
    with sup.client() as c:
        slot = c.status()["workers"][0]
    assert slot["recycles"] >= 1 and slot["generation"] >= 2 and slot["state"] == "ready"


@pytest.mark.timeout(120)
@pytest.mark.parametrize("overlap", ["always", "never"])
def test_operator_recycle_loses_nothing(start_supervisor, overlap):
    sup = start_supervisor("--recycle-overlap", overlap)
    sup.wait_ready()
    out = subprocess.run([sys.executable, "-m", "qvl.supervisor.cli", "recycle", "--worker", "0",
                          "--endpoint", sup.endpoint], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "[0]" in out.stdout, out.stderr
    load_until_recycled(sup)
    done = events(sup.log(), "recycle_done")[0]
    assert done["overlap"] == str(overlap == "always")
    states = [(e["gen"], e["new"]) for e in events(sup.log(), "worker_state")]
    ready_2, draining_1 = states.index(("2", "ready")), states.index(("1", "draining"))
    # overlapped: the replacement is ready before the old worker stops taking requests
    assert (ready_2 < draining_1) == (overlap == "always")


@pytest.mark.timeout(300)
def test_sighup_recycles_every_slot_one_at_a_time(start_supervisor):
    sup = start_supervisor(workers=2)
    sup.wait_ready(workers=2)
    sup.proc.send_signal(signal.SIGHUP)
    load_until_recycled(sup, recycles=2, timeout=200)  # two worker starts, one after the other
    order = [(e["event"], e["worker"]) for e in events(sup.log())
             if e["event"] in ("recycle", "recycle_done")]
    assert order in ([("recycle", "0"), ("recycle_done", "0"), ("recycle", "1"), ("recycle_done", "1")],
                     [("recycle", "1"), ("recycle_done", "1"), ("recycle", "0"), ("recycle_done", "0")])


@pytest.mark.timeout(120)
def test_counters_survive_a_supervisor_restart(start_supervisor, tmp_path):
    state = tmp_path / "state.json"
    sup = start_supervisor("--state-file", str(state))
    sup.wait_ready()
    with sup.client() as c:
        assert c.recycle(0)["recycling"] == [0]
    assert wait_for(lambda: events(sup.log(), "recycle_done"), 90)
    assert sup.stop() == 0
    assert json.loads(state.read_text())["slots"]["0"]["recycles"] == 1
    again = start_supervisor("--state-file", str(state))
    status = again.wait_ready()
    slot = status["workers"][0]
    assert slot["recycles"] == 1 and slot["generation"] == 3 and slot["last_reason"]


@pytest.mark.timeout(120)
def test_a_threshold_a_fresh_worker_already_trips_is_logged_once_not_recycled_forever(start_supervisor):
    """Fault h at run time: every incarnation reports reserved bytes above the threshold from its
    first heartbeat; recycling would only give another such worker."""
    sup = start_supervisor("--recycle-reserved-bytes", "4000000000", "--recycle-soft-wait-s", "0",
                           env={"QVL_FAULTS": "telemetry.reserved_bytes=5e9"})
    sup.wait_ready()
    with sup.client() as client:
        for i in range(4):
            client.ask(png(), f"q{i}", max_new_tokens=2)
        time.sleep(2.0)  # ten heartbeats, each a verdict
        slot = client.status()["workers"][0]
    assert events(sup.log(), "recycle_wanted") == []
    at_start = events(sup.log(), "threshold_at_start")
    assert len(at_start) == 1 and at_start[0]["reason"] == "reserved_bytes"
    assert slot["thresholds_at_start"] == ["reserved_bytes"] and slot["generation"] == 1
