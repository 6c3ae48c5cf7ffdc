#!/usr/bin/env python3
"""A worker replaced on a GPU under load: an operator recycle or a SIGKILL, with or without overlap,
with or without a spare process. What clients see.

    python scripts/recycle_gpu.py --model DIR [--runs recycle:always:on,recycle:never:on,kill:auto:off]
                                  [--concurrency 16] [--tokens 32] [--warm-s 20] [--worker-flags "--engine vllm"]

Each run (`EVENT:OVERLAP:SPARE`: `recycle` or `kill`, a `recycle_overlap` value, `spare_workers`
on or off) starts a supervisor with one slot and a steady load of mixed image sizes, every request
exactly `--tokens` new tokens. After `--warm-s`, once the worker is ready (and, with spares, its
spare has finished its imports, or the run would measure a cold start), an operator `recycle` is
sent or the worker is SIGKILLed. Printed per run: the event to the replacement ready (status
polled every 50 ms) and to its first answer, whether the replacement was the spare (same pid), the
longest request latency before the event and during the replacement, how every request ended
(none may fail; requests in flight at a kill are dispatched again), and the spare's host RSS.
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
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from qvl.protocol import AsyncClient, Client, QvlError

SIZES = [(224, 224), (448, 448), (896, 672), (1344, 896), (640, 1280)]
EVENTS, OVERLAPS, SPARES = ("recycle", "kill"), ("always", "never", "auto"), ("on", "off")


@dataclass(frozen=True)
class Run:
    event: str
    overlap: str
    spare: str

    @classmethod
    def parse(cls, text: str) -> "Run":
        parts = text.strip().split(":")
        if len(parts) != 3 or parts[0] not in EVENTS or parts[1] not in OVERLAPS or parts[2] not in SPARES:
            raise ValueError(f"a run is EVENT:OVERLAP:SPARE ({'|'.join(EVENTS)}:{'|'.join(OVERLAPS)}:"
                             f"{'|'.join(SPARES)}), not {text!r}")
        return cls(*parts)


def image(size, seed) -> bytes:
    rng = random.Random(seed)
    img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


async def load(endpoint: str, args, run: Run) -> dict:
    """Run the load, replace the worker after the warm-up, stop `--after-s` after the replacement's
    first answer. Returns each request's (start, end, generation or error code) and the times."""
    images = [image(SIZES[i % len(SIZES)], i) for i in range(64)]  # made before any timing
    done: list[tuple[float, float, object]] = []
    state: dict = {"event": None, "old": None, "ready": None, "answered": None, "new_pid": None}

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

        async def replace() -> None:
            await asyncio.sleep(args.warm_s)
            while True:
                slot = (await client.status())["workers"][0]
                if slot["state"] == "ready" and (run.spare == "off" or slot["spare_state"] == "waiting"):
                    break
                await asyncio.sleep(0.2)
            state["old"], state["event"] = slot, time.monotonic()
            if run.event == "kill":
                os.kill(slot["pid"], signal.SIGKILL)
            else:
                await client.recycle(0)
            while True:
                now = (await client.status())["workers"][0]
                if now["state"] == "ready" and now["generation"] > slot["generation"]:
                    state["ready"], state["new_pid"] = time.monotonic(), now["pid"]
                    return
                await asyncio.sleep(0.05)

        await asyncio.gather(replace(), *(one(i) for i in range(args.concurrency)))
    return {"requests": done, **state}


def serve(args, run: Run) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="qvl-replace-"))
    endpoint, log = f"ipc://{run_dir}/frontend", run_dir / "supervisor.log"
    cmd = [sys.executable, "-m", "qvl.supervisor.cli", "start", "--model", args.model,
           "--device", args.device, "--frontend", endpoint, "--recycle-overlap", run.overlap,
           "--spare-workers", run.spare, *shlex.split(args.worker_flags)]
    with open(log, "w") as f:
        sup = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    try:
        with Client(endpoint, timeout=30) as c:
            c.wait_ready(timeout=600)
        return asyncio.run(load(endpoint, args, run))
    except (QvlError, KeyError):
        print(log.read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        sup.terminate()
        sup.wait(timeout=120)


def report(run: Run, r: dict) -> str:
    t, old = r["event"], r["old"]
    before = [end - start for start, end, _ in r["requests"] if end < t]
    during = [end - start for start, end, _ in r["requests"] if end >= t and start <= r["answered"]]
    outcomes: dict = {}
    for _, _, outcome in r["requests"]:
        key = "ok" if isinstance(outcome, int) else outcome
        outcomes[key] = outcomes.get(key, 0) + 1
    was_spare = old["spare_pid"] is not None and r["new_pid"] == old["spare_pid"]
    spare_rss = old.get("spare_rss_bytes")
    return (f"| {run.event} | {run.overlap} | {run.spare} | {r['ready'] - t:.1f} s | {r['answered'] - t:.1f} s | "
            f"{'yes' if was_spare else 'no'} | {max(before):.2f} s | {max(during):.2f} s | {len(r['requests'])} | "
            f"{outcomes} | {f'{spare_rss / 2**30:.2f} GiB' if spare_rss else '-'} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--runs", default="recycle:always:on,recycle:never:on,recycle:never:off,kill:auto:on,kill:auto:off",
                    help="comma-separated EVENT:OVERLAP:SPARE, run in order")
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens of every request")
    ap.add_argument("--warm-s", type=float, default=20.0, help="load before the event")
    ap.add_argument("--after-s", type=float, default=5.0, help="load after the replacement answers")
    ap.add_argument("--worker-flags", default="", help="extra `qvl-supervisor start` flags, e.g. `--engine vllm`")
    args = ap.parse_args()
    try:
        runs = [Run.parse(text) for text in args.runs.split(",")]
    except ValueError as exc:
        ap.error(str(exc))
    rows = ["| event | overlap | spare | to replacement ready | to its first answer | replacement was the spare | "
            "longest latency before | longest latency during | requests | outcomes | spare host RSS |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for run in runs:
        rows.append(report(run, serve(args, run)))
        print(rows[-1], flush=True)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
