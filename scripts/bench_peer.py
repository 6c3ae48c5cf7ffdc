#!/usr/bin/env python3
"""Bare vLLM beside qvl with `--engine vllm` and qvl with its default engine, one model folder, one run.

    python scripts/bench_peer.py --model DIR [--systems vllm,qvl-vllm,qvl-hf] [--parts sweep,death]
                                 [--concurrency 1,8,32,64] [--json FILE]
    python scripts/bench_peer.py --report FILE [FILE ...]   # the tables of earlier runs, together

Each system runs in a process of its own, one after another, so each has the GPU alone:
- `vllm`: vLLM's `AsyncLLM` as its documentation writes it (engine arguments at their defaults:
  torch.compile, CUDA graphs, 90% of the device), a chat-template prompt and a PIL image per request;
- `qvl-vllm` and `qvl-hf`: `qvl-supervisor start` with that engine, requests through `AsyncClient`.
Every request streams, so time to first token and time per output token are measured the same way
for all: at the client, from when the request's slot frees (`run_level`) to the first streamed
tokens, and from there to the last (random weights often make tokens with no text, so tokens, not
text, are what is waited for). Workloads (`workloads.py`) are made before any timing; each level is
warmed with one round first.

`sweep`: the uniform and mixed workloads at each concurrency: req/s, output tok/s, p50/p99 latency,
TTFT, TPOT, the 16-token requests' p50 in the mix, peak device memory (NVML, whole device); and
where the time to first token went: for qvl waiting in the worker (read off its socket until the
engine has it), from there to the first token, and outside the worker (client, supervisor, sockets);
for vLLM's engine core, bare or in qvl's worker, its own timestamps (`core_timings`): the request's
arrival there, its wait to be scheduled, and from scheduled to its first token.
`death`: 64 requests of 256 tokens in flight (not streamed), SIGKILL 2 s in to vLLM's engine core (bare
vLLM) or qvl's worker: requests answered, failed and lost, and the time from the kill until the
system answers a new request (bare vLLM: never, until restarted by hand). `death-core` does the same
to the engine core child of qvl's vLLM worker.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import io
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from workloads import Item, mixed, percentile, uniform  # noqa: E402

SYSTEMS = ("vllm", "qvl-vllm", "qvl-hf")
DEATH_REQUESTS, DEATH_TOKENS, DEATH_AFTER_S = 64, 256, 2.0
MAX_MODEL_LEN = 32768
MAX_IMAGES = 16


class PeakMemory(threading.Thread):
    """Device memory in use (NVML), sampled every 0.2 s; the highest seen."""

    def __init__(self):
        super().__init__(daemon=True)
        import pynvml
        try:
            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.read = lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used
        except pynvml.NVMLError:  # no GPU: the script's own trial run on CPU
            self.read = lambda: 0
        self.peak = 0
        self.stopped = threading.Event()

    def run(self):
        while not self.stopped.wait(0.2):
            self.peak = max(self.peak, self.read())


class BareVllm:
    """vLLM's AsyncLLM in this process, written the way vLLM's examples write it."""

    def __init__(self, model: str):
        self.model = model

    async def start(self) -> None:
        from transformers import AutoProcessor
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from qvl.worker.vllm_engine import core_timings  # as qvl's vLLM worker reads them
        self.core_timings = core_timings
        self.processor = AutoProcessor.from_pretrained(self.model)
        self.llm = AsyncLLM.from_engine_args(AsyncEngineArgs(
            model=self.model, max_model_len=MAX_MODEL_LEN, seed=0,
            limit_mm_per_prompt={"image": MAX_IMAGES, "video": 0}))
        self.counter = 0

    async def one(self, item: Item, mark, stream: bool = True) -> int:
        from PIL import Image
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        content = ([{"type": "image"}] if item.image else []) + [{"type": "text", "text": item.text}]
        text = self.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True)
        prompt = {"prompt": text}
        if item.image:
            prompt["multi_modal_data"] = {"image": Image.open(io.BytesIO(item.image)).convert("RGB")}
        params = SamplingParams(max_tokens=item.max_new_tokens, min_tokens=item.max_new_tokens,
                                temperature=item.temperature, top_p=item.top_p, seed=item.seed,
                                output_kind=RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY)
        self.counter += 1
        mark(sent=True)
        tokens, sent_at = 0, time.monotonic()
        async for out in self.llm.generate(prompt, params, request_id=str(self.counter)):
            if out.outputs[0].token_ids:
                mark()
            tokens += len(out.outputs[0].token_ids)
            if out.finished:  # its core arrival counted from the client's call, rendering included
                mark(worker=self.core_timings(out.metrics, sent_at))
        return tokens

    def model_pid(self, engine_core: bool = True) -> int:
        """Its engine core's pid: bare vLLM's model lives there."""
        import psutil
        children = psutil.Process().children(recursive=True)
        return next(c.pid for c in children if "EngineCor" in " ".join(c.cmdline()) + c.name())  # its process title, cut to 15 by comm

    async def stop(self) -> None:
        self.llm.shutdown()


class Qvl:
    """qvl-supervisor with one engine, over AsyncClient."""

    def __init__(self, model: str, engine: str, max_concurrency: int, device: str, flags: str = ""):
        self.model, self.engine, self.max_concurrency, self.device = model, engine, max_concurrency, device
        self.flags = flags.split()

    async def start(self) -> None:
        from qvl.protocol import AsyncClient, Client

        run = Path(tempfile.mkdtemp(prefix="qvl-peer-"))
        self.endpoint, self.log = f"ipc://{run}/frontend", run / "supervisor.log"
        flags = ["--engine", self.engine, "--max-inflight", str(4 * self.max_concurrency),
                 "--max-batch-size", str(self.max_concurrency), *self.flags]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "qvl.supervisor.cli", "start", "--frontend", self.endpoint,
             "--model", self.model, "--device", self.device, "--queue-size", "1024", *flags],
            stdout=open(self.log, "w"), stderr=subprocess.STDOUT)
        with Client(self.endpoint, timeout=30) as c:
            c.wait_ready(timeout=600)
        self.client = AsyncClient(self.endpoint, timeout=900)

    async def one(self, item: Item, mark, stream: bool = True) -> int:
        content = ([{"type": "image", "image": item.image}] if item.image else []) + \
                  [{"type": "text", "text": item.text}]
        messages = [{"role": "user", "content": content}]
        params = dict(max_new_tokens=item.max_new_tokens, min_new_tokens=item.max_new_tokens,
                      temperature=item.temperature, top_p=item.top_p)
        if item.seed is not None:
            params["seed"] = item.seed
        if not stream:
            return (await self.client.generate(messages, **params)).usage.get("completion_tokens", 0)
        tokens = 0
        mark(sent=True)
        async for chunk in self.client.stream(messages, **params):
            if not chunk.done:
                mark()
            else:  # chunks carry only new text, which random weights seldom make: where none came, the
                # first token was the worker's decode time before this last chunk arrived
                tokens = chunk.usage.get("completion_tokens", 0)
                mark(time.perf_counter() - chunk.timings.get("decode_ms", 0.0) / 1000.0)
                mark(worker=chunk.timings)
        return tokens

    def model_pid(self, engine_core: bool = False) -> int:
        """The ready worker's pid, or with `engine_core` its vLLM engine core's."""
        from qvl.protocol import Client
        with Client(self.endpoint, timeout=30) as c:
            worker = next(w for w in c.status()["workers"] if w["state"] == "ready")
        return worker["telemetry"]["engine_core_pid"] if engine_core else worker["pid"]

    async def stop(self) -> None:
        await self.client.close()
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(120)


async def timed(system, item: Item, stream: bool = True, issued: float | None = None) -> dict:
    """One request: start (`issued`, else now), send, first text (streams) and end times, output
    tokens, or the error. The system calls `mark` as the request goes: `sent` as it sends it,
    `worker` with its own account of it, else (the first time) at its first tokens."""
    record = {"start": time.perf_counter() if issued is None else issued, "first": None,
              "max_new_tokens": item.max_new_tokens}

    def mark(at: float | None = None, worker: dict | None = None, sent: bool = False):
        if sent:
            record["sent"] = time.perf_counter()
        elif worker is not None:  # the worker's account, vLLM's core's
            record["worker"] = worker
        elif record["first"] is None:
            record["first"] = time.perf_counter() if at is None else at
    try:
        record["tokens"] = await system.one(item, mark, stream)
    except Exception as exc:  # counted, not raised: the death test expects failures
        record["error"] = f"{type(exc).__name__}: {exc}"[:200]
    record["end"] = time.perf_counter()
    return record


async def run_level(system, warm: list[Item], items: list[Item], concurrency: int) -> tuple[float, list[dict]]:
    """`concurrency` requests in flight, each sent as one ends. A request's time starts when its
    slot is free (the level's start, or the end of the request before it in that slot), not when
    its coroutine first runs: bare vLLM renders in the event loop, so a request released while
    others render would otherwise start its clock only once they are done."""
    gate = asyncio.Semaphore(concurrency)
    freed: collections.deque[float] = collections.deque()

    async def limited(item):
        async with gate:
            record = await timed(system, item, issued=freed.popleft())
            freed.append(record["end"])
            return record

    async def phase(batch: list[Item]) -> list[dict]:
        freed.clear()
        freed.extend([time.perf_counter()] * concurrency)
        return await asyncio.gather(*(limited(i) for i in batch))
    await phase(warm)
    started = time.perf_counter()
    records = await phase(items)
    return time.perf_counter() - started, records


def summarize(workload: str, concurrency: int, wall: float, records: list[dict]) -> dict:
    ok = [r for r in records if "error" not in r]
    latency = [r["end"] - r["start"] for r in ok]
    ttft = [r["first"] - r["start"] for r in ok if r["first"]]
    tpot = [(r["end"] - r["first"]) / (r["tokens"] - 1) for r in ok if r["first"] and r["tokens"] > 1]
    short = [r["end"] - r["start"] for r in ok if r["max_new_tokens"] == 16]
    outside = [1000 * (r["first"] - r["start"]) - r["worker"]["wait_ms"] - r["worker"]["prefill_ms"]
               for r in ok if r["first"] and "prefill_ms" in r.get("worker", {})]

    def p50_of(key: str, name: str) -> dict:  # one of the system's own timings, where it reports it
        values = [r["worker"][key] for r in ok if key in r.get("worker", {})]
        return {f"{name}_p50_ms": percentile(values, 50)} if values else {}
    return {"workload": workload, "concurrency": concurrency, "requests": len(records),
            "failed": len(records) - len(ok), "req_s": len(ok) / wall,
            "tok_s": sum(r["tokens"] for r in ok) / wall,
            "p50_s": percentile(latency, 50), "p99_s": percentile(latency, 99),
            "ttft_p50_s": percentile(ttft, 50), "tpot_p50_ms": 1000 * percentile(tpot, 50),
            "short_p50_s": percentile(short, 50) if short else None,
            # qvl only: where the time to first token went, p50 of each part
            **p50_of("wait_ms", "worker_wait"), **p50_of("prefill_ms", "worker_prefill"),
            **({"outside_worker_p50_ms": percentile(outside, 50)} if outside else {}),
            **p50_of("images_ms", "worker_images"), **p50_of("render_ms", "worker_render"),
            # vLLM's engine core, bare or in qvl's worker: its own timestamps
            **p50_of("core_arrival_ms", "core_arrival"), **p50_of("core_queue_ms", "core_queue"),
            **p50_of("core_prefill_ms", "core_prefill")}


def timeline(records: list[dict]) -> list[dict]:
    """Each request's start, send, first token and end in ms from the level's first start, its
    output length and the system's own account of it: to read one level request by request."""
    zero = min(r["start"] for r in records)

    def ms(t: float | None) -> float | None:
        return None if t is None else round(1000 * (t - zero), 2)
    return [{"start": ms(r["start"]), "sent": ms(r.get("sent")), "first": ms(r["first"]), "end": ms(r["end"]),
             "max_new_tokens": r["max_new_tokens"],
             **{k: round(v, 2) for k, v in r.get("worker", {}).items() if isinstance(v, (int, float))},
             **({"error": r["error"]} if "error" in r else {})} for r in records]


def uniform_rounds(requests: list[dict], concurrency: int) -> list[tuple[float, float, float]]:
    """Each closed round of `concurrency` requests of a uniform level, in order of start: (from the
    round's start, its first slot freed, to its first request queued in vLLM's engine core; from
    there to its last first token; from there to its last answer). A round with a request that
    failed or lacks the core's timings is left out. qvl's requests reach its worker half their time
    outside it after the send (the other half is the first token's way back); bare vLLM's core
    arrival counts from its send. Runs written before sends were marked sent at their start."""
    needed = ("first", "core_arrival_ms", "core_queue_ms", "core_prefill_ms")

    def queued(t: dict) -> float:
        sent = t["sent"] if t.get("sent") is not None else t["start"]
        if "wait_ms" not in t:  # bare vLLM
            return sent + t["core_arrival_ms"]
        outside = t["first"] - sent - t["wait_ms"] - t["prefill_ms"]
        return sent + outside / 2 + t["wait_ms"] + t["core_arrival_ms"]
    ordered = sorted(requests, key=lambda t: t["start"])
    rounds = []
    for i in range(0, len(ordered) - concurrency + 1, concurrency):
        group = ordered[i:i + concurrency]
        if any("error" in t or any(t.get(k) is None for k in needed) for t in group):
            continue
        first_queued = min(map(queued, group))
        last_first = max(queued(t) + t["core_queue_ms"] + t["core_prefill_ms"] for t in group)
        rounds.append((first_queued - group[0]["start"], last_first - first_queued,
                       max(t["end"] for t in group) - last_first))
    return rounds


async def sweep(system, levels: list[int], rounds: int) -> list[dict]:
    rows = []
    for workload, make in (("uniform", uniform), ("mixed", mixed)):
        for concurrency in levels:
            items = make(concurrency + max(12, rounds * concurrency))
            wall, records = await run_level(system, items[:concurrency], items[concurrency:], concurrency)
            rows.append(summarize(workload, concurrency, wall, records))
            print(json.dumps(rows[-1]), flush=True)
            rows[-1]["timeline"] = timeline(records)  # in the JSON file only
    return rows


async def death(system, pid: int) -> dict:
    """SIGKILL process `pid` with requests in flight; count their fates; time the return."""
    items = [Item(i.image, i.text, DEATH_TOKENS) for i in uniform(DEATH_REQUESTS)]
    # not streamed: a stream cut by the death is answered `worker_failed`, since its client holds
    # part of a text that a second run might not repeat
    flight = [asyncio.ensure_future(timed(system, item, stream=False)) for item in items]
    await asyncio.sleep(DEATH_AFTER_S)
    killed_at = time.perf_counter()
    os.kill(pid, signal.SIGKILL)
    done, lost = await asyncio.wait(flight, timeout=600)
    records = [f.result() for f in done]
    answered = [r for r in records if "error" not in r]
    serves_again_s = None
    while time.perf_counter() - killed_at < 300:  # a fresh request, until one is answered
        probe = await timed(system, Item(None, "Say hello.", 4))
        if "error" not in probe:
            serves_again_s = probe["end"] - killed_at
            break
        if "Dead" in probe["error"]:  # vLLM's engine stays dead until restarted
            break
        await asyncio.sleep(0.5)
    return {"in_flight": len(items), "answered": len(answered), "failed": len(records) - len(answered),
            "lost": len(lost), "last_answer_after_kill_s": max((r["end"] - killed_at for r in answered), default=None),
            "serves_again_after_kill_s": serves_again_s,
            "errors": sorted({r["error"][:80] for r in records if "error" in r})[:3]}


async def run_system(args) -> dict:
    levels = [int(c) for c in args.concurrency.split(",")]
    system = BareVllm(args.model) if args.one == "vllm" else Qvl(args.model, args.one[len("qvl-"):], max(levels), args.device,
                                                                  args.qvl_flags)
    peak = PeakMemory()
    peak.start()
    started = time.perf_counter()
    await system.start()
    result = {"system": args.one, "ready_s": time.perf_counter() - started}
    print(json.dumps(result), flush=True)
    try:
        if "sweep" in args.parts.split(","):
            result["sweep"] = await sweep(system, levels, args.rounds)
            result["peak_device_gib"] = peak.peak / 2**30
        for part in ("death", "death-core"):
            if part in args.parts.split(",") and (part == "death" or args.one == "qvl-vllm"):
                result[part] = await death(system, system.model_pid(engine_core=part == "death-core"))
                print(json.dumps(result[part]), flush=True)
    finally:
        peak.stopped.set()
        await system.stop()
    return result


def report(results: list[dict]) -> str:
    runs: dict[str, int] = {}
    labelled = []
    for r in results:  # a system run twice is shown twice: "qvl-vllm", then "qvl-vllm #2"
        runs[r["system"]] = runs.get(r["system"], 0) + 1
        n = runs[r["system"]]
        labelled.append(r if n == 1 else {**r, "system": f"{r['system']} #{n}"})
    results = labelled
    by = {r["system"]: r for r in results}
    out = ["| workload | concurrency | " + " | ".join(f"{s} req/s" for s in by) + " | qvl-vllm / vllm |",
           "| --- | --- | " + " | ".join("---" for _ in by) + " | --- |"]
    keys = [(row["workload"], row["concurrency"]) for r in results for row in r.get("sweep", [])]
    table = {(r["system"], row["workload"], row["concurrency"]): row for r in results for row in r.get("sweep", [])}
    for workload, c in dict.fromkeys(keys):
        rates = [table.get((s, workload, c), {}).get("req_s") for s in by]
        ratio = ""
        if (a := table.get(("qvl-vllm", workload, c))) and (b := table.get(("vllm", workload, c))):
            ratio = f"{a['req_s'] / b['req_s']:.2f}"
        out.append(f"| {workload} | {c} | " + " | ".join("" if x is None else f"{x:.2f}" for x in rates)
                   + f" | {ratio} |")
    out += ["", "| system | workload | concurrency | req/s | tok/s | p50 s | p99 s | TTFT p50 s | TPOT p50 ms "
            "| 16-token p50 s | failed |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (s, workload, c), row in table.items():
        short = "" if row["short_p50_s"] is None else f"{row['short_p50_s']:.2f}"
        out.append(f"| {s} | {workload} | {c} | {row['req_s']:.2f} | {row['tok_s']:.0f} | {row['p50_s']:.2f} | "
                   f"{row['p99_s']:.2f} | {row['ttft_p50_s']:.3f} | {row['tpot_p50_ms']:.2f} | {short} | {row['failed']} |")
    split = [(key, row) for key, row in table.items() if "core_prefill_p50_ms" in row or "worker_wait_p50_ms" in row]
    if split:
        parts = ("worker_wait", "worker_images", "worker_render", "worker_prefill", "outside_worker",
                 "core_arrival", "core_queue", "core_prefill")
        out += ["", "Where the time to first token went, p50 ms (core arrival: bare vLLM from its `generate` call, "
                "rendering included; qvl from when its worker added the request):", "",
                "| system | workload | concurrency | TTFT | " + " | ".join(p.replace("_", " ") for p in parts) + " |",
                "| --- | --- | --- | --- | " + " | ".join("---" for _ in parts) + " |"]
        for (s, workload, c), row in split:
            cells = ["" if row.get(f"{p}_p50_ms") is None else f"{row[f'{p}_p50_ms']:.1f}" for p in parts]
            out.append(f"| {s} | {workload} | {c} | {1000 * row['ttft_p50_s']:.1f} | " + " | ".join(cells) + " |")
    phases = [(key, parts) for key, row in table.items() if row["workload"] == "uniform"
              and (parts := uniform_rounds(row.get("timeline", []), row["concurrency"]))]
    if phases:
        out += ["", "Rounds of the uniform workload (all of a round's requests end in one step, so the next round "
                "starts together), median ms: from the round's start to its first request reaching vLLM's "
                "engine core, from there to the round's last first token, from there to its last answer:", "",
                "| system | concurrency | rounds | to the core | to the last first token | to the last answer |",
                "| --- | --- | --- | --- | --- | --- |"]
        for (s, _, c), parts in phases:
            medians = [statistics.median(p) for p in zip(*parts)]
            out.append(f"| {s} | {c} | {len(parts)} | " + " | ".join(f"{m:.0f}" for m in medians) + " |")
    out += ["", "| system | start to ready s | peak device GiB |", "| --- | --- | --- |"]
    out += [f"| {s} | {r['ready_s']:.1f} | {r.get('peak_device_gib', float('nan')):.1f} |" for s, r in by.items()]
    deaths = [(s + (" (engine core)" if part == "death-core" else ""), r[part])
              for s, r in by.items() for part in ("death", "death-core") if part in r]
    if deaths:
        out += ["", "| system | in flight | answered | failed | lost | last answer after kill s | "
                "serves again after kill s |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for s, d in deaths:
            last = "" if d["last_answer_after_kill_s"] is None else f"{d['last_answer_after_kill_s']:.1f}"
            again = "never (dead until restarted)" if d["serves_again_after_kill_s"] is None \
                else f"{d['serves_again_after_kill_s']:.1f}"
            out.append(f"| {s} | {d['in_flight']} | {d['answered']} | {d['failed']} | {d['lost']} | {last} | {again} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--parts", default="sweep,death")
    ap.add_argument("--concurrency", default="1,8,32,64")
    ap.add_argument("--device", default="cuda:0", help="qvl's device (cpu: a trial run of the script with a tiny model)")
    ap.add_argument("--qvl-flags", default="", help="extra `qvl-supervisor start` flags for the qvl systems")
    ap.add_argument("--rounds", type=int, default=3, help="timed requests per level: rounds x concurrency, at least 12")
    ap.add_argument("--json", help="append each system's results to this file, one JSON line each")
    ap.add_argument("--report", nargs="+", metavar="FILE", help="print the tables of earlier runs")
    ap.add_argument("--one", choices=SYSTEMS, help=argparse.SUPPRESS)  # a child running one system
    args = ap.parse_args()
    if args.report:
        print(report([json.loads(line) for f in args.report for line in Path(f).read_text().splitlines()]))
        return
    if args.one:
        print("RESULT " + json.dumps(asyncio.run(run_system(args))), flush=True)
        return
    results = []
    for name in args.systems.split(","):
        child = subprocess.Popen([sys.executable, __file__, "--one", name, "--model", args.model, "--parts",
                                  args.parts, "--concurrency", args.concurrency, "--rounds", str(args.rounds), "--device", args.device,
                                  f"--qvl-flags={args.qvl_flags}"],  # one argument: its value starts with --
                                 stdout=subprocess.PIPE, text=True)
        lines = []
        for line in child.stdout:  # progress as it comes
            print(f"{name}: {line}", end="", flush=True)
            if line.startswith("RESULT "):
                lines.append(line)
        if child.wait() or not lines:
            print(f"{name}: no result (exit {child.returncode})", flush=True)
            continue
        results.append(json.loads(lines[-1][len("RESULT "):]))
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(results[-1]) + "\n")
    print(report(results))


if __name__ == "__main__":
    main()
