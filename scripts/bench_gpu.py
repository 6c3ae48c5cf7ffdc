#!/usr/bin/env python3
"""Throughput on a GPU: qvl at concurrency 1, 8, 32 and 64 beside the seed's style of service
(one generate at a time behind a lock, `empty_cache()` every 5 requests), same model, one run.

Workload: a 448x448 image, about 230 prompt tokens, a fixed 64 new tokens (random weights never
stop on EOS, so min_new_tokens = max_new_tokens).

    python scripts/bench_gpu.py --model DIR [--seed-requests 8] [--rounds 3]
"""

import argparse
import asyncio
import gc
import io
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from PIL import Image

from qvl.protocol import AsyncClient, Client
from qvl.supervisor.events import parse_event

QUESTION = ("Describe this picture in detail: the objects, their colours and positions, the light, "
            "and anything written in it. Then say what the picture is most likely used for.")


def picture(seed: int) -> bytes:
    img = Image.effect_noise((448, 448), 40 + seed % 50).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def row(name, n, wall, lat, tokens, tpot, peak):
    lat = sorted(lat)
    return (f"{name:<26} {n:>5} {n / wall:>8.2f} {tokens / wall:>9.0f} {1000 * statistics.median(lat):>9.0f} "
            f"{1000 * lat[max(0, int(0.99 * len(lat)) - 1)]:>9.0f} {tpot:>8.1f} {peak / 2**30:>9.2f}")


def seed_style(model: str, n: int, tokens: int) -> str:
    """The hand-written service: a lock around one generate per request."""
    import torch

    from qvl.protocol.messages import GenerationParams
    from qvl.protocol.contract import ModelOptions
    from qvl.worker.engine import Engine
    from qvl.worker.images import open_image

    engine = Engine(ModelOptions(model, "cuda:0", kv_cache="dynamic"))  # plain eager generate
    engine.warm_up()
    torch.cuda.reset_peak_memory_stats()
    lock, lat, tpots = threading.Lock(), [], []
    params = GenerationParams(max_new_tokens=tokens, min_new_tokens=tokens)

    def serve(i):
        t0 = time.perf_counter()
        with lock:
            msgs = [{"role": "user", "content": [{"type": "image", "frame": 0}, {"type": "text", "text": QUESTION}]}]
            c = engine.generate([engine.prepare(msgs, [open_image(picture(i), 10**8)], params)], params)[0]
            if i % 5 == 4:
                torch.cuda.empty_cache()
        lat.append(time.perf_counter() - t0)
        tpots.append(c.decode_ms / max(1, c.completion_tokens - 1))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=serve, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    peak = torch.cuda.max_memory_reserved()
    out = row("seed style (lock)", n, wall, lat, n * tokens, statistics.median(tpots), peak)
    engine = None  # free the model before qvl's worker loads its own
    gc.collect()
    torch.cuda.empty_cache()
    return out, n / wall


async def qvl_round(endpoint: str, concurrency: int, n: int, tokens: int):
    lat, tpots = [], []
    async with AsyncClient(endpoint, timeout=600) as client:
        async def one(i):
            t0 = time.perf_counter()
            r = await client.ask(picture(i), QUESTION, max_new_tokens=tokens, min_new_tokens=tokens)
            lat.append(time.perf_counter() - t0)
            tpots.append(r.timings["decode_ms"] / max(1, r.usage["completion_tokens"] - 1))
            return r
        sem = asyncio.Semaphore(concurrency)

        async def limited(i):
            async with sem:
                return await one(i)
        await asyncio.gather(*(limited(i) for i in range(concurrency)))  # warm this shape
        lat.clear(), tpots.clear()
        t0 = time.perf_counter()
        results = await asyncio.gather(*(limited(i) for i in range(n)))
        wall = time.perf_counter() - t0
    prompt = statistics.median(r.usage["prompt_tokens"] for r in results)
    return wall, lat, statistics.median(tpots), prompt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--seed-requests", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="requests per round = rounds x concurrency")
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--worker-flags", default="", help="extra `qvl-supervisor start` flags")
    args = ap.parse_args()
    header = (f"{'service':<26} {'reqs':>5} {'req/s':>8} {'tok/s':>9} {'p50 ms':>9} {'p99 ms':>9} "
              f"{'TPOT ms':>8} {'peak GiB':>9}")
    seed_row, seed_rate = seed_style(args.model, args.seed_requests, args.tokens)
    print(header, "\n" + seed_row, flush=True)

    levels = [int(c) for c in args.concurrency.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="qvl-bench-gpu-"))
    endpoint, log = f"ipc://{tmp}/frontend", tmp / "supervisor.log"
    t0 = time.perf_counter()
    sup = subprocess.Popen(
        [sys.executable, "-m", "qvl.supervisor.cli", "start", "--frontend", endpoint, "--model", args.model,
         "--device", "cuda:0", "--max-batch-size", str(max(levels)), "--max-inflight", str(max(levels)),
         *args.worker_flags.split()], stdout=open(log, "w"), stderr=subprocess.STDOUT)
    try:
        with Client(endpoint, timeout=30) as c:
            c.wait_ready(timeout=600)
        ready_s = time.perf_counter() - t0
        for conc in levels:
            n = args.rounds * conc
            wall, lat, tpot, prompt = asyncio.run(qvl_round(endpoint, conc, n, args.tokens))
            with Client(endpoint, timeout=30) as c:
                peak = c.status()["workers"][0]["telemetry"].get("peak_reserved_bytes", 0)
            print(row(f"qvl, concurrency {conc}", n, wall, lat, n * args.tokens, tpot, peak)
                  + f"   x{n / wall / seed_rate:.1f} seed", flush=True)
    finally:
        sup.terminate()
        sup.wait(60)
    states = [parse_event(l) for l in log.read_text().splitlines() if "event=worker_state" in l]
    load_s = next((float(e["load_s"]) for e in states if e.get("new") == "ready"), float("nan"))
    print(f"\nworker start to ready: {ready_s:.1f}s (model load and warm-up {load_s:.1f}s); "
          f"median prompt {prompt:.0f} tokens; {args.tokens} new tokens per request")


if __name__ == "__main__":
    main()
