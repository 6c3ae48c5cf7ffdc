#!/usr/bin/env python3
"""Where the continuous engine's time goes on the mixed workload: the engine driven in this
process (no supervisor, no sockets) with `--concurrency` requests kept in flight, each joining as
one ends, and every call timed with the device synchronised. Prints the time in decode steps, in
prefill forwards (the vision tower apart), in making pixels and prompts, and the short requests'
latency beside their latency alone.

    python scripts/profile_mixed.py --model DIR [--concurrency 32] [--requests 96] [--alone 16] [--flags k=v ...]
        [--profile-adds 8]

With `--profile-adds N`, N adds of the workload's requests (each as many as one add takes, then
aborted) run under torch.profiler after the timed run, and the operators taking the most device and
host time are printed: where an add's time goes beyond the vision tower.
"""

import argparse
import collections
import io
import json
import statistics
import time

import torch
from PIL import Image

from qvl.protocol.contract import ModelOptions
from qvl.protocol.messages import GenerationParams
from qvl.worker import continuous
from qvl.worker.continuous import ContinuousEngine
from qvl.worker.engine import NO_IMAGES, Engine

import workloads


def made(engine, item):
    """The item's messages, frames and params as the worker makes them, timed."""
    p = item.params()
    params = GenerationParams(max_new_tokens=p["max_new_tokens"], min_new_tokens=p["min_new_tokens"],
                              temperature=p["temperature"], top_p=p["top_p"], seed=p.get("seed"))
    content = [] if item.image is None else [{"type": "image", "frame": 0}]
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": item.text}]}]
    t0 = time.perf_counter()
    frames = [] if item.image is None else [Image.open(io.BytesIO(item.image)).convert("RGB")]
    images = engine.process_images(messages, frames, params) if frames else NO_IMAGES
    t1 = time.perf_counter()
    prompt = engine.prompt(messages, images, params)
    t2 = time.perf_counter()
    return prompt, params, t1 - t0, t2 - t1


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Timer:
    def __init__(self):
        self.total = collections.defaultdict(float)
        self.count = collections.Counter()
        self.longest = collections.defaultdict(float)

    def time(self, name, fn, *args):
        sync()
        t0 = time.perf_counter()
        out = fn(*args)
        sync()
        self.record(name, time.perf_counter() - t0)
        return out

    def record(self, name, took):
        self.total[name] += took
        self.longest[name] = max(self.longest[name], took)
        self.count[name] += 1


def run(engine, items, concurrency, timer):
    """Keep `concurrency` requests in flight; returns each request's (max_new_tokens, latency)."""
    queue = collections.deque(enumerate(items))
    started, latency = {}, []
    while queue or engine.running:
        joining = []
        while queue and engine.running + len(joining) < concurrency:
            key, (prompt, params) = queue[0]
            if not engine.has_room([p for _, p, _ in joining], prompt):
                break
            queue.popleft()
            joining.append((key, prompt, params))
            started[key] = time.perf_counter()
        if joining:
            timer.time("add", engine.add, joining)
            timer.total["add tokens"] += sum(len(p.ids) for _, p, _ in joining)
        for out in timer.time("step", engine.step):
            if out.completion is not None or out.error is not None:
                latency.append((items[out.key][1].max_new_tokens, time.perf_counter() - started[out.key]))
    return latency


def profile_adds(engine, items, adds, per_add):
    """`adds` adds of `per_add` requests each (as many as the timed run's adds held), run under
    torch.profiler and aborted: their wall time, and the operators that take the most of the
    device's time and of the host's."""
    from torch.profiler import ProfilerActivity, profile
    queue = collections.deque(enumerate(items))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    wall, tokens, done = 0.0, 0, 0
    with profile(activities=activities) as prof:
        for _ in range(adds):
            joining = []
            while queue and len(joining) < per_add and engine.has_room([p for _, p, _ in joining], queue[0][1][0]):
                key, (prompt, params) = queue.popleft()
                joining.append((key, prompt, params))
            if not joining:
                break
            sync()
            t0 = time.perf_counter()
            engine.add(joining)
            sync()
            wall += time.perf_counter() - t0
            tokens += sum(len(p.ids) for _, p, _ in joining)
            done += 1
            for key, _, _ in joining:
                engine.abort(key)
    events = prof.key_averages()
    print(f"\n{done} adds of {per_add} requests under the profiler, {tokens / max(1, done):.0f} prompt tokens per add: "
          f"{wall:.2f} s wall (the device's time in kernels: the tables' Self CUDA total)")
    for sort in ("self_device_time_total", "self_cpu_time_total"):
        print(events.table(sort_by=sort, row_limit=25, max_name_column_width=60))


def time_calls(timer, owner, name, label):
    """Time every call of `owner.name` under `label` (the device synchronised around it)."""
    inner = getattr(owner, name)
    setattr(owner, name, lambda *args, **kwargs: timer.time(label, lambda: inner(*args, **kwargs)))


def time_module(timer, module, label):
    """Time every forward of `module` under `label` (the device synchronised around it)."""
    def before(*_):
        sync()
        timer.started = time.perf_counter()

    def after(*_):
        sync()
        timer.record(label, time.perf_counter() - timer.started)
    module.register_forward_pre_hook(before)
    module.register_forward_hook(after)


def _value(text):
    """A flag's value as JSON reads it (true, 8192, 0.5), else the text itself (continuous)."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--alone", type=int, default=16, help="requests run one at a time first, for the short ones' latency")
    ap.add_argument("--no-cudnn-attention", action="store_true", help="SDPA without its cuDNN backend")
    ap.add_argument("--profile-adds", type=int, default=0, help="adds run under torch.profiler after the timed run")
    ap.add_argument("--flags", nargs="*", default=[], help="ModelOptions fields, as name=value (JSON values)")
    args = ap.parse_args()
    fields = {name: _value(text) for name, text in (flag.split("=", 1) for flag in args.flags)}
    if args.no_cudnn_attention:
        torch.backends.cuda.enable_cudnn_sdp(False)
    options = ModelOptions(args.model, args.device, **fields)
    engine = ContinuousEngine(Engine(options), 64)
    t0 = time.perf_counter()
    engine.warm_up()
    print(f"warm-up {time.perf_counter() - t0:.1f} s, options {fields}")

    timer = Timer()
    time_module(timer, engine.model.model.visual, "of add: vision tower")
    time_calls(timer, continuous, "decoder_inputs", "of add: model forward up to the decoder")
    time_calls(timer, engine.packed, "prefill", "of add: decoder layers (packed)")

    raw = workloads.mixed(args.requests + args.alone, seed=1)
    made_items = [made(engine, item) for item in raw]
    pixels_s = collections.defaultdict(list)
    for item, (_, _, tp, _) in zip(raw, made_items):
        pixels_s[None if item.image is None else Image.open(io.BytesIO(item.image)).size].append(tp)
    items = [(p, params) for p, params, _, _ in made_items]

    short_alone = [lat for n, lat in run(engine, items[:args.alone], 1, Timer()) if n == workloads.SHORT]
    timer.total.clear(), timer.count.clear(), timer.longest.clear()
    t0 = time.perf_counter()
    latency = run(engine, items[args.alone:], args.concurrency, timer)
    wall = time.perf_counter() - t0
    short = [lat for n, lat in latency if n == workloads.SHORT]

    print(f"\nconcurrency {args.concurrency}, {len(latency)} requests in {wall:.2f} s: {len(latency) / wall:.2f} req/s")
    print("| part | calls | total s | share of wall | mean ms | longest ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in ("step", "add", "of add: model forward up to the decoder", "of add: vision tower",
                 "of add: decoder layers (packed)"):
        print(f"| {name} | {timer.count[name]} | {timer.total[name]:.2f} | {timer.total[name] / wall:.0%} | "
              f"{1000 * timer.total[name] / max(1, timer.count[name]):.1f} | {1000 * timer.longest[name]:.0f} |")
    print(f"\nprefill: {engine.prefill_forwards} forwards, {engine.prefill_chunks} chunks, "
          f"{timer.total['add tokens'] / max(1, timer.count['add']):.0f} prompt tokens per add")
    if short and short_alone:
        print(f"16-token p50 {statistics.median(short):.3f} s under load, alone {statistics.median(short_alone):.3f} s "
              f"({statistics.median(short) / statistics.median(short_alone):.1f}x)")
    for size, times in pixels_s.items():
        print(f"pixels {size}: {1000 * statistics.mean(times):.1f} ms (CPU, worker's image pool)")
    if args.profile_adds:
        profile_adds(engine, items, args.profile_adds, max(1, round(len(latency) / max(1, timer.count["add"]))))


if __name__ == "__main__":
    main()
