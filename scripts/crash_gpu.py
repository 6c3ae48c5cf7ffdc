#!/usr/bin/env python3
"""SIGKILL of the worker under load, with and without a spare process: kill to the replacement serving.

    python scripts/crash_gpu.py --model DIR [--spares on,off] [--concurrency 64] [--tokens 256]
                                [--warm-s 20] [--worker-flags "..."]

Per mode a supervisor starts with one slot (`--spare-workers on` or `off`, batch and in-flight
limits at `--concurrency`) and a steady load of `--concurrency` requests of exactly `--tokens` new
tokens runs. After `--warm-s` (and, with spares, once the spare has finished its imports) the worker
is killed with SIGKILL. Printed per mode: kill to the replacement ready (status polled every 50 ms),
kill to its first answer, whether the replacement is the former spare (same pid), and how every
request ended (those in flight at the kill are dispatched again; none may be lost).
"""

import argparse
import asyncio
import io
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from qvl.protocol import AsyncClient, Client, QvlError


def image(seed: int) -> bytes:
    rng = random.Random(seed)
    img = Image.new("RGB", (448, 448), tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


async def load(endpoint: str, args, spares: bool) -> dict:
    """Run the load, kill the worker after the warm-up, stop `--after-s` after the replacement's
    first answer. Returns each request's (start, end, generation or error code) and the times."""
    images = [image(i) for i in range(16)]  # made before any timing
    done: list[tuple[float, float, object]] = []
    state: dict = {"killed": None, "old": None, "ready": None, "answered": None, "new_pid": None}

    async with AsyncClient(endpoint, timeout=900) as client:
        def finished() -> bool:
            return state["answered"] is not None and time.monotonic() - state["answered"] > args.after_s

        async def one(i: int) -> None:
            while not finished():
                start = time.monotonic()
                try:
                    r = await client.ask(images[i % len(images)], "Describe the picture.",
                                         max_new_tokens=args.tokens, min_new_tokens=args.tokens)
                    end, outcome = time.monotonic(), r.worker["generation"]
                    old = state["old"]
                    if old is not None and outcome > old["generation"] and state["answered"] is None:
                        state["answered"] = end
                except QvlError as exc:
                    end, outcome = time.monotonic(), exc.code
                done.append((start, end, outcome))
                i += args.concurrency

        async def kill() -> None:
            await asyncio.sleep(args.warm_s)
            while True:  # with spares: only once the spare can be loaded, or the run measures a cold start
                slot = (await client.status())["workers"][0]
                if slot["state"] == "ready" and (not spares or slot["spare_state"] == "waiting"):
                    break
                await asyncio.sleep(0.2)
            state["old"] = slot
            os.kill(slot["pid"], signal.SIGKILL)
            state["killed"] = time.monotonic()
            while True:
                now = (await client.status())["workers"][0]
                if now["state"] == "ready" and now["generation"] > slot["generation"]:
                    state["ready"], state["new_pid"] = time.monotonic(), now["pid"]
                    return
                await asyncio.sleep(0.05)

        await asyncio.gather(kill(), *(one(i) for i in range(args.concurrency)))
    return {"requests": done, **state}


def run(args, spares: bool) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="qvl-crash-"))
    endpoint, log = f"ipc://{run_dir}/frontend", run_dir / "supervisor.log"
    cmd = [sys.executable, "-m", "qvl.supervisor.cli", "start", "--model", args.model,
           "--device", args.device, "--frontend", endpoint, "--spare-workers", "on" if spares else "off",
           "--max-batch-size", str(args.concurrency), "--max-inflight", str(args.concurrency),
           *shlex.split(args.worker_flags)]
    with open(log, "w") as f:
        sup = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    try:
        with Client(endpoint, timeout=30) as c:
            c.wait_ready(timeout=600)
        return asyncio.run(load(endpoint, args, spares))
    except (QvlError, KeyError):
        print(log.read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        sup.terminate()
        sup.wait(timeout=120)


def report(spares: bool, r: dict) -> str:
    killed, old = r["killed"], r["old"]
    outcomes: dict = {}
    for _, _, outcome in r["requests"]:
        key = "ok" if isinstance(outcome, int) else outcome
        outcomes[key] = outcomes.get(key, 0) + 1
    was_spare = old["spare_pid"] is not None and r["new_pid"] == old["spare_pid"]
    return (f"| {'on' if spares else 'off'} | {r['ready'] - killed:.1f} s | {r['answered'] - killed:.1f} s | "
            f"{'yes' if was_spare else 'no'} | {len(r['requests'])} | {outcomes} | "
            f"{_gib(old.get('spare_rss_bytes'))} |")


def _gib(n: int | None) -> str:
    return "-" if not n else f"{n / 2**30:.2f} GiB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--spares", default="on,off", help="spare_workers values to run, in order")
    ap.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    ap.add_argument("--tokens", type=int, default=256, help="new tokens of every request")
    ap.add_argument("--warm-s", type=float, default=20.0, help="load before the kill")
    ap.add_argument("--after-s", type=float, default=5.0, help="load after the replacement answers")
    ap.add_argument("--worker-flags", default="", help="extra `qvl-supervisor start` flags")
    args = ap.parse_args()
    modes = [m.strip() for m in args.spares.split(",") if m.strip()]
    if not modes or any(m not in ("on", "off") for m in modes):
        ap.error("--spares takes on, off or both (on,off)")
    rows = ["| spare | kill to replacement ready | kill to its first answer | replacement was the spare | "
            "requests | outcomes | spare host RSS |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for mode in modes:
        rows.append(report(mode == "on", run(args, mode == "on")))
        print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
