#!/usr/bin/env python3
"""A real recycle on a GPU: mixed image sizes under a memory-fraction cap until a real allocator
threshold trips, once with overlap and once without; prints telemetry and recycle times.

    python scripts/recycle_gpu.py --model DIR [--memory-fraction 0.2] [--reserved-gib 10]

Thresholds on: reserved bytes (set above a ready 4B worker's 8.4 GiB, so only the workload's own
allocations reach it), allocator retries and fragmentation; whichever trips first recycles.
The workers decode with transformers' `generate` (`--kv-cache dynamic`): the static KV pool is
reserved whole at load, so the growth this run provokes comes from the dynamic path.
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
from qvl.supervisor.events import parse_event

SIZES = [(224, 224), (448, 448), (896, 672), (1344, 896), (640, 1280)]
GIB = 1 << 30


def image(size, seed) -> bytes:
    rng = random.Random(seed)
    img = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def logged(path: Path, name: str) -> list[dict]:
    return [parse_event(l) for l in path.read_text().splitlines() if f"event={name} " in l]


def mem(t: dict) -> str:
    return (f"alloc {t.get('allocated_bytes', 0) / GIB:.2f} GiB, reserved {t.get('reserved_bytes', 0) / GIB:.2f} GiB, "
            f"frag {t.get('fragmentation', 0):.3f}, retries {t.get('num_alloc_retries', 0)}, "
            f"ooms {t.get('num_ooms', 0)}, largest free block {t.get('largest_free_block_bytes', 0) / 2**20:.0f} MiB")


async def load(endpoint: str, stop, concurrency: int, tokens: int) -> dict:
    outcome = {"ok": 0}
    async with AsyncClient(endpoint, timeout=300) as client:
        async def one(i):
            while not stop():
                try:
                    await client.ask(image(SIZES[i % len(SIZES)], i), "Describe the picture.",
                                     max_new_tokens=tokens, min_new_tokens=tokens)
                    outcome["ok"] += 1
                except QvlError as exc:
                    outcome[exc.code] = outcome.get(exc.code, 0) + 1
                i += concurrency
        await asyncio.gather(*(one(i) for i in range(concurrency)))
    return outcome


def run(args, overlap: str) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix="qvl-recycle-"))
    endpoint, log = f"ipc://{run_dir}/frontend", run_dir / "supervisor.log"
    base = [sys.executable, "-m", "qvl.supervisor.cli", "start", "--model", args.model,
            "--device", args.device, "--frontend", endpoint, "--memory-fraction", str(args.memory_fraction),
            "--max-batch-size", str(args.batch), "--max-inflight", str(args.batch),
            "--recycle-overlap", overlap, "--recycle-soft-wait-s", "2",
            "--recycle-alloc-retries", "1", "--recycle-fragmentation", str(args.fragmentation),
            "--recycle-reserved-bytes", str(int(args.reserved_gib * GIB)), "--kv-cache", "dynamic"]
    with open(log, "w") as f:
        sup = subprocess.Popen(base, stdout=f, stderr=subprocess.STDOUT)
    try:
        with Client(endpoint, timeout=30) as c:
            before = c.wait_ready(timeout=300)["workers"][0]["telemetry"]
        t0 = time.monotonic()
        done = lambda: bool(logged(log, "recycle_done")) and time.monotonic() - done.at > 5
        done.at = float("inf")

        def stop():
            if logged(log, "recycle_done") and done.at == float("inf"):
                done.at = time.monotonic()
            return done() or time.monotonic() - t0 > args.max_seconds

        outcome = asyncio.run(load(endpoint, stop, args.concurrency, args.tokens))
        with Client(endpoint, timeout=30) as c:
            after = c.status()["workers"][0]
    except QvlError:
        print(log.read_text()[-3000:], file=sys.stderr)
        raise
    finally:
        sup.terminate()
        sup.wait(timeout=120)
    wanted = logged(log, "recycle_wanted")
    return {"overlap": overlap, "before": before, "wanted": wanted[0] if wanted else None,
            "done": (logged(log, "recycle_done") or [None])[0], "after": after, "outcome": outcome}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--memory-fraction", type=float, default=0.2)
    ap.add_argument("--reserved-gib", type=float, default=10.0)
    ap.add_argument("--fragmentation", type=float, default=0.2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--max-seconds", type=float, default=120)
    args = ap.parse_args()
    for overlap in ("always", "never"):
        r = run(args, overlap)
        print(f"\n== overlap={overlap}")
        print(f"ready:            {mem(r['before'])}")
        if r["wanted"]:
            w = r["wanted"]
            print(f"tripped:          reason={w['reason']} value={w['value']} threshold={w['threshold']} "
                  f"(reserved {int(w.get('reserved_bytes', 0)) / GIB:.2f} GiB, frag {w.get('fragmentation')}, "
                  f"retries {w.get('num_alloc_retries')})")
        if r["done"]:
            d = r["done"]
            print(f"recycle:          waited {float(d['waited_s']):.2f}s for idle/turn, then "
                  f"{float(d['took_s']):.2f}s from start to the replacement serving (overlap={d['overlap']})")
        print(f"replacement:      gen {r['after']['generation']}: {mem(r['after']['telemetry'])}")
        print(f"requests:         {r['outcome']}")


if __name__ == "__main__":
    main()
