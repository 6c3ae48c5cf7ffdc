#!/usr/bin/env python3
"""Throughput and latency on a GPU: qvl at concurrency 1, 8, 32 and 64 beside the seed's service
as the seed writes it, same model, same requests, one run.

The seed's service is written here with transformers directly, as a user would: `AutoProcessor`
and `AutoModelForImageTextToText`, then per request `processor.apply_chat_template(...,
tokenize=True, return_dict=True)` and `model.generate` behind a lock, `torch.cuda.empty_cache()`
every 5 requests. It does not stream. Its clients send one request at a time by default
(`--seed-concurrency`): behind the lock more of them only wait longer, for the same req/s.

Both services get the same treatment: requests made before any clock starts
(`scripts/workloads.py`), a warm-up of at least `--warmup` requests of the workload first (qvl: a
wave at each concurrency, as large as the concurrency when that is larger), and at least
`--min-requests` (12) timed requests per row. Percentiles are nearest-rank (`workloads.percentile`).

Workloads (`--workloads`): `uniform` (448x448 image, 64 new tokens, greedy) and `mixed` (images
224² to 1344x896 and a fifth text-only, 16/64/256 new tokens, half greedy and half sampled with a
seed each). qvl runs with its default configuration (continuous batching, 64 rows, the decode step
compiled) and whatever `--worker-flags` adds.

Columns: req/s and output tok/s over the wall time of the timed requests; p50/p99 client latency,
send to answer; TTFT p50, for the requests that stream (every other one, qvl only): send to the
first text chunk (the worker sends text every 4 decoding steps, so this holds up to 4 of them);
TPOT, the median of the worker's decode time per output token after the first (qvl only: the
seed's service reports no split; its latency per token is printed below its table); 16-tok p50,
in `mixed`, the 16-token requests' p50 under that load, and the row "alone" runs them one at a
time; peak reserved GiB. Below each qvl row of `mixed`, the medians of the 16-token requests'
parts, from their replies' timings (`short_parts`).

    python scripts/bench_gpu.py --model DIR [--workloads uniform,mixed] [--concurrency 1,8,32,64]
"""

from __future__ import annotations

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
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from qvl.protocol import AsyncClient, Client
from qvl.supervisor.events import parse_event

sys.path.insert(0, str(Path(__file__).resolve().parent))
from workloads import SHORT, Item, mixed, percentile, uniform  # noqa: E402

MIN_REQUESTS = 12
HEADER = (f"{'service':<28} {'reqs':>5} {'req/s':>8} {'tok/s':>9} {'p50 ms':>9} {'p99 ms':>9} "
          f"{'TTFT p50':>9} {'TPOT ms':>8} {f'{SHORT}-tok p50':>11} {'peak GiB':>9} {'vs seed':>8}")


@dataclass(frozen=True)
class Done:
    """One timed request: what it asked and how it went."""

    item: Item
    latency_s: float
    tokens: int
    ttft_s: float | None = None  # streamed requests only
    tpot_ms: float | None = None  # the worker's decode time per token after the first (qvl only)
    timings: dict | None = None  # the reply's (qvl only)


@dataclass(frozen=True)
class Round:
    done: list[Done]
    wall_s: float

    @property
    def rate(self) -> float:
        return len(self.done) / self.wall_s


def row(name: str, r: Round, peak_bytes: float, seed_rate: float | None) -> str:
    latencies = [d.latency_s * 1000 for d in r.done]
    ttft = [d.ttft_s * 1000 for d in r.done if d.ttft_s is not None]
    tpot = [d.tpot_ms for d in r.done if d.tpot_ms is not None]
    short = [d.latency_s * 1000 for d in r.done if d.item.max_new_tokens == SHORT]
    tokens = sum(d.tokens for d in r.done)
    return (f"{name:<28} {len(r.done):>5} {r.rate:>8.2f} {tokens / r.wall_s:>9.0f} "
            f"{percentile(latencies, 50):>9.0f} {percentile(latencies, 99):>9.0f} "
            f"{_or_dash(ttft and percentile(ttft, 50), 9, '.0f')} {_or_dash(tpot and statistics.median(tpot), 8, '.1f')} "
            f"{_or_dash(short and percentile(short, 50), 11, '.0f')} {peak_bytes / 2**30:>9.2f} "
            f"{_or_dash(seed_rate and r.rate / seed_rate, 7, '.1f')}{'' if seed_rate is None else 'x'}")


def short_parts(r: Round) -> str | None:
    """Where the short requests' latency went, from their replies' timings: the medians of each
    part, and what is left of the client's latency (sockets, the client, the step the answer waits
    for). `wait` is the time in the worker before the engine took the request, `images` the part
    of it spent making its images."""
    short = [d for d in r.done if d.item.max_new_tokens == SHORT and d.timings]
    if not short:
        return None
    parts = {name: statistics.median(d.timings.get(f"{name}_ms", 0.0) for d in short)
             for name in ("queue", "wait", "images", "prefill", "decode")}
    rest = statistics.median(d.latency_s * 1000 - sum(d.timings.get(f"{name}_ms", 0.0)
                                                      for name in ("queue", "wait", "prefill", "decode"))
                             for d in short)
    return f"  {SHORT}-token medians, ms: " + ", ".join(f"{k} {v:.0f}" for k, v in parts.items()) + f", rest {rest:.0f}"


def _or_dash(value, width: int, spec: str) -> str:
    return f"{'–':>{width}}" if value in (None, []) else f"{value:>{width}{spec}}"


# --- the seed's service --------------------------------------------------------------------------

class SeedService:
    """The seed's service as the seed writes it: transformers directly, one `generate` at a time
    behind a lock, `torch.cuda.empty_cache()` every 5 requests."""

    def __init__(self, model: str, device: str = "cuda:0"):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.torch = torch
        self.processor = AutoProcessor.from_pretrained(model)
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        self.model = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype).to(device).eval()
        self.lock = threading.Lock()
        self.served = 0

    def answer(self, item: Item) -> tuple[str, int]:
        """The answer's text and its number of new tokens."""
        content = [{"type": "text", "text": item.text}]
        if item.image is not None:  # the handler decodes the upload it received
            content.insert(0, {"type": "image", "image": Image.open(io.BytesIO(item.image)).convert("RGB")})
        messages = [{"role": "user", "content": content}]
        if item.temperature > 0:
            sampling = {"do_sample": True, "temperature": item.temperature, "top_p": item.top_p}
        else:
            sampling = {"do_sample": False}
        with self.lock:
            inputs = self.processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                                        return_dict=True, return_tensors="pt").to(self.model.device)
            if item.seed is not None:
                self.torch.manual_seed(item.seed)
            with self.torch.inference_mode():
                output = self.model.generate(**inputs, max_new_tokens=item.max_new_tokens,
                                             min_new_tokens=item.max_new_tokens, **sampling)
            new = output[0, inputs["input_ids"].shape[1]:]
            text = self.processor.decode(new, skip_special_tokens=True)
            self.served += 1
            if self.served % 5 == 0:
                self.torch.cuda.empty_cache()
        return text, len(new)

    def run(self, items: list[Item], concurrency: int) -> Round:
        """`items` sent by `concurrency` client threads, each sending its next as its last returns."""
        done: list[Done] = []
        queue = iter(list(items))
        taking = threading.Lock()

        def client() -> None:
            while True:
                with taking:
                    item = next(queue, None)
                if item is None:
                    return
                started = time.perf_counter()
                _, tokens = self.answer(item)
                done.append(Done(item, time.perf_counter() - started, tokens))

        started = time.perf_counter()
        threads = [threading.Thread(target=client) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return Round(done, time.perf_counter() - started)

    def close(self) -> None:
        """Free the model before qvl's worker loads its own."""
        self.model = self.processor = None
        gc.collect()
        self.torch.cuda.empty_cache()


def seed_rows(args, workloads: dict[str, dict]) -> dict[str, tuple[str, float, float]]:
    """Per workload: the seed's row, its req/s and its median latency per output token (ms)."""
    service = SeedService(args.model)
    out = {}
    for name, w in workloads.items():
        service.run(w["warm"][:args.warmup], args.seed_concurrency)  # untimed
        service.torch.cuda.reset_peak_memory_stats()
        r = service.run(w["items"][:args.seed_requests], args.seed_concurrency)
        per_token = statistics.median(d.latency_s * 1000 / d.tokens for d in r.done)
        label = f"seed's service, {args.seed_concurrency} at once"
        out[name] = (row(label, r, service.torch.cuda.max_memory_reserved(), None), r.rate, per_token)
        print(f"[{name}] {out[name][0]}", file=sys.stderr, flush=True)
    service.close()
    return out


# --- qvl ------------------------------------------------------------------------------------------

async def qvl_round(endpoint: str, items: list[Item], concurrency: int) -> Round:
    """`items` at `concurrency` clients; every other request streams."""
    sem = asyncio.Semaphore(concurrency)
    async with AsyncClient(endpoint, timeout=1800) as client:
        async def one(i: int, item: Item) -> Done:
            async with sem:
                started = time.perf_counter()
                ttft = None
                if i % 2:
                    async for chunk in client.stream(item.messages(), **item.params()):
                        if ttft is None and chunk.text:
                            ttft = time.perf_counter() - started
                        usage, timings = chunk.usage, chunk.timings  # the last chunk's are the reply's
                else:
                    result = await client.generate(item.messages(), **item.params())
                    usage, timings = result.usage, result.timings
                latency = time.perf_counter() - started
                tokens = usage["completion_tokens"]
                return Done(item, latency, tokens, ttft if i % 2 else None,
                            timings["decode_ms"] / max(1, tokens - 1), timings)

        started = time.perf_counter()
        done = await asyncio.gather(*(one(i, item) for i, item in enumerate(items)))
        return Round(list(done), time.perf_counter() - started)


def peak_reserved(endpoint: str) -> float:
    with Client(endpoint, timeout=30) as c:
        return c.status()["workers"][0]["telemetry"].get("peak_reserved_bytes", 0)


def qvl_rows(args, levels: list[int], workloads: dict[str, dict], seeds: dict) -> dict[str, list[str]]:
    tmp = Path(tempfile.mkdtemp(prefix="qvl-bench-gpu-"))
    endpoint, log = f"ipc://{tmp}/frontend", tmp / "supervisor.log"
    started = time.perf_counter()
    sup = subprocess.Popen(
        [sys.executable, "-m", "qvl.supervisor.cli", "start", "--frontend", endpoint, "--model", args.model,
         "--device", "cuda:0", *args.worker_flags.split()], stdout=open(log, "w"), stderr=subprocess.STDOUT)
    rows: dict[str, list[str]] = {name: [] for name in workloads}
    try:
        with Client(endpoint, timeout=30) as c:
            c.wait_ready(timeout=600)
        ready_s = time.perf_counter() - started
        for name, w in workloads.items():
            seed_rate = seeds[name][1] if name in seeds else None
            for conc in levels:
                asyncio.run(qvl_round(endpoint, w["warm"][:max(args.warmup, conc)], conc))  # untimed
                r = asyncio.run(qvl_round(endpoint, w["items"][:requests(args, conc)], conc))
                rows[name].append(row(f"qvl, concurrency {conc}", r, peak_reserved(endpoint), seed_rate))
                print(f"[{name}] {rows[name][-1]}", file=sys.stderr, flush=True)
                if (parts := short_parts(r)) is not None:
                    rows[name].append(parts)
            if w["short"]:
                r = asyncio.run(qvl_round(endpoint, w["short"], 1))
                rows[name].append(row(f"qvl, {SHORT}-token alone", r, peak_reserved(endpoint), None))
                if (parts := short_parts(r)) is not None:
                    rows[name].append(parts)
    finally:
        sup.terminate()
        sup.wait(60)
    states = [parse_event(line) for line in log.read_text().splitlines() if "event=worker_state" in line]
    load_s = next((float(e["load_s"]) for e in states if e.get("new") == "ready"), float("nan"))
    rows["_ready"] = [f"worker start to ready: {ready_s:.1f}s (model load and warm-up {load_s:.1f}s)"]
    return rows


def requests(args, concurrency: int) -> int:
    return max(args.min_requests, args.rounds * concurrency)


# --- the run --------------------------------------------------------------------------------------

def make_workloads(args, levels: list[int]) -> dict[str, dict]:
    """Every request of the run, made before any timing: per workload the timed `items` (the first
    n of them per row), the `warm` ones and, for `mixed`, the `short` ones run alone."""
    largest = max(args.seed_requests, *(requests(args, c) for c in levels))
    warm = max(args.warmup, *levels)
    out = {}
    for name in args.workloads.split(","):
        if name == "uniform":
            out[name] = {"items": uniform(largest), "warm": uniform(warm), "short": []}
        elif name == "mixed":
            pool = mixed(largest + 8 * args.alone_requests, args.mix_seed)
            short = [item for item in pool if item.max_new_tokens == SHORT][:args.alone_requests]
            out[name] = {"items": pool[:largest], "warm": mixed(warm, args.mix_seed + 1), "short": short}
        else:
            raise SystemExit(f"unknown workload {name!r}: uniform or mixed")
    return out


def main() -> None:
    summary, _, details = __doc__.partition("\n\n")
    ap = argparse.ArgumentParser(description=summary, epilog=details,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="a model folder (scripts/make_model.py --preset qwen3-vl-4b)")
    ap.add_argument("--workloads", default="uniform,mixed", help="comma-separated: uniform, mixed")
    ap.add_argument("--concurrency", default="1,8,32,64", help="qvl's concurrency levels")
    ap.add_argument("--rounds", type=int, default=3, help="qvl's timed requests per level: rounds x concurrency "
                                                         "(at least --min-requests)")
    ap.add_argument("--min-requests", type=int, default=MIN_REQUESTS, help="timed requests per row, at least")
    ap.add_argument("--seed-requests", type=int, default=MIN_REQUESTS, help="timed requests of the seed's service")
    ap.add_argument("--seed-concurrency", type=int, default=1, help="clients of the seed's service")
    ap.add_argument("--warmup", type=int, default=8, help="untimed requests before each row, at least")
    ap.add_argument("--alone-requests", type=int, default=MIN_REQUESTS,
                    help=f"mixed: {SHORT}-token requests run one at a time on qvl")
    ap.add_argument("--mix-seed", type=int, default=0, help="mixed: the seed its requests are drawn from")
    ap.add_argument("--no-seed", action="store_true", help="skip the seed's service")
    ap.add_argument("--worker-flags", default="", help="extra `qvl-supervisor start` flags")
    args = ap.parse_args()
    if min(args.min_requests, args.seed_requests, args.alone_requests) < MIN_REQUESTS:
        ap.error(f"every row times at least {MIN_REQUESTS} requests")
    levels = [int(c) for c in args.concurrency.split(",")]

    workloads = make_workloads(args, levels)
    seeds = {} if args.no_seed else seed_rows(args, workloads)
    rows = qvl_rows(args, levels, workloads, seeds)
    for name, w in workloads.items():
        prompts = "a fifth text-only, 16/64/256 new tokens, mixed sampling" if name == "mixed" else \
            "448x448 image, 64 new tokens, greedy"
        print(f"\n## {name} ({prompts})\n{HEADER}")
        if name in seeds:
            print(seeds[name][0])
        for line in rows[name]:
            print(line)
        if name in seeds:
            print(f"(the seed's service: {seeds[name][2]:.1f} ms per output token, its latency over its tokens; "
                  "it does not stream)")
    print("\n" + rows["_ready"][0])


if __name__ == "__main__":
    main()
