#!/usr/bin/env python3
"""Where decode time goes at concurrency 1: time per output token with transformers' `generate`
(dynamic KV cache) and with qvl's static KV pool replayed as CUDA graphs, and a profile of each.

    python scripts/bench_decode.py --model DIR [--tokens 64]
"""

import argparse
import time

import torch
from PIL import Image

from qvl.protocol.messages import GenerationParams
from qvl.protocol.contract import ModelOptions
from qvl.worker.engine import Engine


def prompt(engine, params):
    img = Image.effect_noise((448, 448), 50).convert("RGB")
    msgs = [{"role": "user", "content": [{"type": "image", "frame": 0},
                                         {"type": "text", "text": "Describe this picture in detail."}]}]
    return engine.prepare(msgs, [img], params)


def tpot(engine, tokens, runs=3):
    params = GenerationParams(max_new_tokens=tokens, min_new_tokens=tokens)
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        c = engine.generate([prompt(engine, params)], params)[0]
        out.append((time.perf_counter() - t0, c.decode_ms / (c.completion_tokens - 1), c.prefill_ms))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokens", type=int, default=64)
    args = ap.parse_args()
    engine = Engine(ModelOptions(args.model, "cuda:0", kv_cache="static"))
    engine.warm_up()
    kv_pools = {"dynamic": None, "static": engine.kv_pool}
    greedy = GenerationParams(max_new_tokens=16)
    answers = {}
    for name, kv_pool in kv_pools.items():
        engine.kv_pool = kv_pool
        answers[name] = engine.generate([prompt(engine, greedy)], greedy)[0].text
        for i, (wall, t, prefill) in enumerate(tpot(engine, args.tokens)):
            print(f"{name:<8} run {i}: wall {wall:7.2f}s  TPOT {t:6.1f} ms  prefill {prefill:7.1f} ms", flush=True)
    print(f"greedy 16 tokens, static equals dynamic: {answers['static'] == answers['dynamic']}")
    for name, kv_pool in kv_pools.items():
        engine.kv_pool = kv_pool
        profile(engine, name)


def profile(engine, name, tokens=8):
    """CPU time, GPU kernel time and kernel launches of one request of `tokens` new tokens."""
    params = GenerationParams(max_new_tokens=tokens, min_new_tokens=tokens)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        engine.generate([prompt(engine, params)], params)
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    print(events.table(sort_by="self_cpu_time_total", row_limit=8))
    print(events.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=70))
    cpu = sum(e.self_cpu_time_total for e in events) / 1000
    gpu = sum(getattr(e, "self_device_time_total", 0) for e in events) / 1000
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC",
                                                        "cudaGraphLaunch"))
    print(f"{name}, {tokens} new tokens: wall {wall * 1000:.0f} ms, CPU self time {cpu:.0f} ms, "
          f"GPU kernel time {gpu:.0f} ms, launches {launches}")


if __name__ == "__main__":
    main()
