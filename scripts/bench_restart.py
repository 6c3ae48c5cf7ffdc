#!/usr/bin/env python3
"""How long a slot is without a worker after a SIGKILL, and what a start costs in CPU, for each way
workers start (`worker_launch` fork and exec; spares off, so every restart is a new process), in one
run on the same model.

For each way: a supervisor starts (time to its first ready worker), then `--kills` times the
worker is SIGKILLed while idle and a request sent at once; the table gives the kill to that
request's answer (restart backoff, start, load and the answer), and the CPU seconds the new
worker had spent by then (its user and system time: the imports it did or did not make). Runs
anywhere (CPU):

    python scripts/bench_restart.py --model DIR [--kills 5] [--device cpu]
"""

import argparse
import io
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import psutil
from PIL import Image

from qvl.protocol import Client


def png() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def run(model: str, device: str, launch: str, kills: int) -> dict:
    run_dir = tempfile.mkdtemp(prefix="qvl-bench-restart-")
    endpoint = f"ipc://{run_dir}/frontend"
    cmd = [sys.executable, "-m", "qvl.supervisor.cli", "start", "--frontend", endpoint, "--model", model,
           "--device", device, "--spare-workers", "false", "--worker-launch", launch,
           "--restart-backoff-s", "0", "--restart-intensity", str(kills + 5)]
    with open(os.path.join(run_dir, "supervisor.log"), "w") as log:
        sup = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    image, downs, cpus = png(), [], []
    try:
        started = time.monotonic()
        with Client(endpoint, timeout=300) as client:
            client.wait_ready(timeout=300)
            first_ready = time.monotonic() - started
            client.ask(image, "warm", max_new_tokens=2)
            for _ in range(kills):
                pid = client.status()["workers"][0]["pid"]
                os.kill(pid, signal.SIGKILL)
                killed = time.monotonic()
                reply = client.ask(image, "after the kill", max_new_tokens=2)
                downs.append(time.monotonic() - killed)
                assert reply.worker["pid"] != pid, "answered by the killed worker"
                times = psutil.Process(reply.worker["pid"]).cpu_times()
                cpus.append(times.user + times.system)
    finally:
        sup.send_signal(signal.SIGTERM)
        sup.wait(timeout=60)
    return {"first_ready": first_ready, "down": statistics.median(downs), "down_max": max(downs),
            "cpu": statistics.median(cpus)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--kills", type=int, default=5)
    args = parser.parse_args()
    rows = {launch: run(args.model, args.device, launch, args.kills) for launch in ("exec", "fork")}
    print(f"{args.kills} SIGKILLs each, {args.device}, spares off, restart backoff 0")
    print("worker_launch  first ready s  kill to answer p50 s  max s  new worker's CPU s")
    for launch, r in rows.items():
        print(f"{launch:<13}  {r['first_ready']:>13.2f}  {r['down']:>20.2f}  {r['down_max']:>5.2f}  {r['cpu']:>18.2f}")
    print(f"fork / exec: kill to answer {rows['fork']['down'] / rows['exec']['down']:.2f}x, "
          f"CPU {rows['fork']['cpu'] / rows['exec']['cpu']:.2f}x")


if __name__ == "__main__":
    main()
