"""Entry point of a worker process: `python -m qvl.worker --backend ENDPOINT --slot N ...`.

The supervisor starts this with the device already chosen through `CUDA_VISIBLE_DEVICES`.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from .engine import ModelOptions
from .service import WorkerOptions, WorkerService, exit_with_parent


def parse_args(argv: list[str] | None = None) -> WorkerOptions:
    ap = argparse.ArgumentParser(prog="python -m qvl.worker", description=__doc__.splitlines()[0])
    ap.add_argument("--backend", required=True, help="the supervisor's backend endpoint")
    ap.add_argument("--slot", type=int, required=True)
    ap.add_argument("--generation", type=int, required=True)
    ap.add_argument("--model", required=True, help="local folder or hub id")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--attn-implementation", default="sdpa")
    ap.add_argument("--memory-fraction", type=float, default=None)
    ap.add_argument("--engine", choices=("hf", "noop"), default="hf")
    ap.add_argument("--kv-cache", choices=("auto", "static", "dynamic"), default="auto")
    ap.add_argument("--kv-cache-tokens", type=int, default=32768)
    ap.add_argument("--max-batch-size", type=int, default=8)
    ap.add_argument("--max-image-pixels", type=int, default=40_000_000)
    ap.add_argument("--heartbeat-interval", type=float, default=1.0)
    a = ap.parse_args(argv)
    model = ModelOptions(a.model, a.device, a.dtype, a.attn_implementation, a.memory_fraction,
                         a.engine, a.kv_cache, a.kv_cache_tokens)
    return WorkerOptions(a.backend, a.slot, a.generation, model, a.max_batch_size,
                         a.max_image_pixels, a.heartbeat_interval)


def main(argv: list[str] | None = None) -> int:
    exit_with_parent()
    # Ctrl-C reaches the whole process group; only the supervisor decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    options = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s qvl.worker[{options.slot}:{options.generation}] %(message)s")
    import transformers
    transformers.utils.logging.disable_progress_bar()
    return WorkerService(options).run()


if __name__ == "__main__":
    sys.exit(main())
