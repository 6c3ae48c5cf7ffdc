"""The serving-path benchmark and its no-op engine, and the mixed-workload profile on the tiny
model: they run, and every request is answered."""

import subprocess
import sys

from harness import ROOT, RawLoad


def test_noop_engine_answers_plain_and_streamed_requests(start_supervisor):
    sup = start_supervisor("--engine", "noop")
    sup.wait_ready()
    load = RawLoad(sup.endpoint, sockets=2)
    try:
        load.send(20)
        load.receive(timeout=20)
        assert load.outcomes() == {"ok": 20}
        assert all(len(replies) == 1 for replies in load.replies.values())
    finally:
        load.close()
    with sup.client() as client:
        chunks = list(client.stream([{"role": "user", "content": "hi"}], max_new_tokens=4))
    assert [c.done for c in chunks] == [True] and chunks[0].text == ""


def test_router_benchmark_prints_both_paths():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_router.py"), "--requests", "100",
                             "--window", "8"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {line.split("  ")[0] for line in result.stdout.splitlines()}
    assert {"raw pyzmq DEALER echo (floor)", "bare Python proxy + echo worker (no qvl code)",
            "qvl supervisor + no-op worker"} <= rows


def test_mixed_profile_times_steps_and_prefills(tiny_model):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "profile_mixed.py"), "--model", str(tiny_model),
                             "--device", "cpu", "--concurrency", "4", "--requests", "10", "--alone", "5",
                             "--profile-adds", "2", "--flags", "kv_cache=continuous", "kv_cache_tokens=32768"],
                            capture_output=True, text=True, timeout=300, cwd=ROOT / "scripts")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "concurrency 4, 10 requests in" in result.stdout
    rows = {line.split(" | ")[0].strip("| ") for line in result.stdout.splitlines() if line.startswith("| ")}
    assert {"step", "add", "of add: vision tower"} <= rows
    assert "2 adds of " in result.stdout and " requests under the profiler" in result.stdout


def test_restart_benchmark_kills_and_times_both_ways(tiny_model):
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_restart.py"), "--model", str(tiny_model),
                             "--kills", "1"], capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {line.split()[0] for line in result.stdout.splitlines()[2:4]}
    assert rows == {"exec", "fork"} and "fork / exec" in result.stdout
