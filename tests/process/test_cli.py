"""The `qvl-supervisor` command against real supervisors."""

import json
import subprocess
import sys

from harness import png, wait_gone


def cli(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "qvl.supervisor.cli", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_status_json_shows_ready_workers(shared_supervisor):
    out = cli("status", "--json", "--endpoint", shared_supervisor.endpoint)
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    assert status["pid"] == shared_supervisor.pid
    assert [w["state"] for w in status["workers"]] == ["ready", "ready"]
    assert {w["pid"] for w in status["workers"]} == shared_supervisor.remember_workers()
    assert all(w["telemetry"]["rss_bytes"] > 0 and w["host_rss_bytes"] > 0 for w in status["workers"])
    assert status["queue_depth"] == 0


def test_status_table(shared_supervisor):
    out = cli("status", "--endpoint", shared_supervisor.endpoint)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines() if line.strip()[:1].isdigit()]
    assert [r[1] for r in rows] == ["ready", "ready"]


def test_ask(shared_supervisor, tmp_path):
    path = tmp_path / "img.png"
    path.write_bytes(png())
    out = cli("ask", str(path), "What is this?", "--json", "--max-new-tokens", "5",
              "--endpoint", shared_supervisor.endpoint)
    assert out.returncode == 0, out.stderr
    assert 1 <= json.loads(out.stdout)["usage"]["completion_tokens"] <= 5


def test_ask_a_missing_supervisor_times_out_cleanly(tmp_path):
    out = cli("status", "--endpoint", f"ipc://{tmp_path}/nobody", "--timeout", "0.5")
    assert out.returncode == 1 and "timeout" in out.stderr


def test_start_refuses_bad_config(tmp_path):
    out = cli("start", "--workers", "0", "--device", "tpu")
    assert out.returncode == 2
    assert "workers must be at least 1" in out.stderr and "device must be" in out.stderr


def test_stop_exits_zero_and_leaves_no_worker(start_supervisor):
    sup = start_supervisor(workers=2)
    sup.wait_ready(workers=2)
    workers = sup.remember_workers()
    assert len(workers) == 2
    out = cli("stop", "--endpoint", sup.endpoint)
    assert out.returncode == 0, out.stderr
    assert sup.proc.wait(timeout=30) == 0
    assert wait_gone(workers, timeout=5) == set()
    assert "event=supervisor_exit" in sup.log()
