#!/usr/bin/env python3
"""A real recycle on a GPU under load, with the default configuration (static KV pool and CUDA
graphs), once with overlap and once without: what clients see.

    python scripts/recycle_gpu.py --model DIR [--concurrency 16] [--tokens 32] [--warm-s 20] [--worker-flags "--engine vllm"]

A steady load of mixed image sizes runs; after `--warm-s` an operator `recycle` starts. Printed
per mode: trigger to the first answer from the replacement, the longest request latency before
the trigger and during the recycle, and how every request ended (none may fail).
"""

import argparse
import asyncio
import io
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image

from qvl.protocol import AsyncClient, Client, QvlError

SIZES = [(224, 224), (448, 448), (896, 672), (1344, 896), (640, 1280)]


def image(size, seed) -> bytes:
    rng = random.Random(seed)
    img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


async def load(endpoint: str, args) -> dict:
    """Run the load, trigger a recycle after the warm-up, stop a few seconds after the replacement
    answers. Returns each request's (start, end, generation or error code) and the trigger time."""
    images = [image(SIZES[i % len(SIZES)], i) for i in range(64)]  # made before any timing
    done: list[tuple[float, float, object]] = []
    state = {"trigger": None, "old_gen": None, "served_new": None}

    async with AsyncClient(endpoint, timeout=600) as client:
        def finished() -> bool:
            return state["served_new"] is not None and time.monotonic() - state["served_new"] > args.after_s

        async def one(i: int) -> None:
            while not finished():
                start = time.monotonic()
                try:
                    r = await client.ask(images[i % len(images)], "Describe the picture.",
                                         max_new_tokens=args.tokens, min_new_tokens=args.tokens)
                    end, outcome = time.monotonic(), r.worker["generation"]
                    if state["trigger"] is not None and outcome != state["old_gen"] and state["served_new"] is None:
                        state["served_new"] = end
                except QvlError as exc:
                    end, outcome = time.monotonic(), exc.code
                done.append((start, end, outcome))
                i += args.concurrency

        async def trigger() -> None:
            await asyncio.sleep(args.warm_s)
            status = await client.status()
            state["old_gen"] = status["workers"][0]["generation"]
            state["trigger"] = time.monotonic()
            await client.recycle(0)

        await asyncio.gather(trigger(), *(one(i) for i in range(args.concurrency)))
    return {"requests": done, **state}


def run(args, overlap: str) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="qvl-recycle-"))
    endpoint, log = f"ipc://{run_dir}/frontend", run_dir / "supervisor.log"
    cmd = [sys.executable, "-m", "qvl.supervisor.cli", "start", "--model", args.model,
           "--device", args.device, "--frontend", endpoint, "--recycle-overlap", overlap,
           *args.worker_flags.split()]
    with open(log, "w") as f:
        sup = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    try:
        with Client(endpoint, timeout=30) as c:
            c.wait_ready(timeout=300)
        result = asyncio.run(load(endpoint, args))
        with Client(endpoint, timeout=30) as c:
            result["telemetry"] = c.status()["workers"][0]["telemetry"]
    except (QvlError, KeyError):
        print(log.read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        sup.terminate()
        sup.wait(timeout=120)
    return result


def report(overlap: str, r: dict) -> str:
    t, new = r["trigger"], r["served_new"]
    before = [end - start for start, end, _ in r["requests"] if end < t]
    during = [end - start for start, end, _ in r["requests"] if end >= t and start <= new]
    outcomes: dict = {}
    for _, _, outcome in r["requests"]:
        key = "ok" if isinstance(outcome, int) else outcome
        outcomes[key] = outcomes.get(key, 0) + 1
    return (f"| {overlap} | {new - t:.1f} s | {max(before):.2f} s | {max(during):.2f} s | "
            f"{len(r['requests'])} | {outcomes} | {r['telemetry'].get('reserved_bytes', 0) / 2**30:.1f} GiB |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--warm-s", type=float, default=20.0, help="load before the recycle starts")
    ap.add_argument("--after-s", type=float, default=5.0, help="load after the replacement answers")
    ap.add_argument("--modes", default="always,never", help="recycle_overlap values to run")
    ap.add_argument("--worker-flags", default="", help="extra `qvl-supervisor start` flags, e.g. `--engine vllm`")
    args = ap.parse_args()
    rows = ["| overlap | trigger to replacement answering | longest latency before | longest latency during | "
            "requests | outcomes | replacement reserved |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for overlap in args.modes.split(","):
        rows.append(report(overlap, run(args, overlap)))
        print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
