#!/usr/bin/env python3
"""How long making one request's vLLM input takes on the host: bare vLLM's way and qvl's.

    python scripts/bench_render.py --model DIR [--requests 16]

No engine starts and no device is used: vLLM's renderer is built from the engine arguments alone.
Every request carries a new 448x448 JPEG (`workloads.uniform`), so no cache is ever hit. Rows:
- the JPEG's decode as qvl's worker does it (`open_image`);
- bare vLLM's way, as `bench_peer.py` sends it: the chat template's text and a PIL image, rendered
  by vLLM with its processor cache at its default (4 GiB) and off;
- qvl's way (`VllmInputs`, the worker's own code): qvl's prompt tokens, then vLLM's renderer with
  the cache off; in the worker's process as with `vllm_render_processes = 0`, alone and from 2 and
  4 threads as on the worker's image pool (a lock held, each thread decoding its JPEG first); and
  handed to 2 and 4 render processes (`RenderProcesses`) from as many threads.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import threading
from contextlib import contextmanager
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from PIL import Image  # noqa: E402
from transformers import AutoProcessor  # noqa: E402
from vllm import EngineArgs  # noqa: E402
from vllm.renderers import renderer_from_config  # noqa: E402
from vllm.renderers.inputs.preprocess import parse_model_prompt  # noqa: E402
from workloads import QUESTION, uniform  # noqa: E402

from qvl.protocol.messages import GenerationParams  # noqa: E402
from qvl.worker.images import open_image  # noqa: E402
from qvl.worker.render_processes import RenderProcesses  # noqa: E402
from qvl.worker.vllm_inputs import VllmInputs  # noqa: E402

MAX_PIXELS = 1 << 26
PARAMS = GenerationParams(max_new_tokens=64)
MESSAGES = [{"role": "user", "content": [{"type": "image", "frame": 0}, {"type": "text", "text": QUESTION}]}]


def engine_config(model: str, cache_gb: float):
    return EngineArgs(model=model, max_model_len=8192, limit_mm_per_prompt={"image": 4, "video": 0},
                      mm_processor_cache_gb=cache_gb).create_engine_config()


@contextmanager
def render_processes(model: str, count: int):
    pool = RenderProcesses(count, VllmInputs.of_config, model, engine_config(model, 0), 8192, 8192)
    try:
        pool.wait_ready()
        yield pool
    finally:
        pool.close()


def per_request_ms(make, images: list[bytes], threads: int = 1, warm: int = 3) -> float:
    """Wall time per request of `make(image)` over `images` (the first `warm` untimed) on `threads`."""
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(make, images[:warm]))
        started = time.perf_counter()
        list(pool.map(make, images[warm:]))
    return (time.perf_counter() - started) * 1000.0 / len(images[warm:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--requests", type=int, default=16, help="timed requests a row")
    args = ap.parse_args()
    processor = AutoProcessor.from_pretrained(args.model)
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    fresh = iter(item.image for item in uniform(1000))

    def images() -> list[bytes]:  # new ones for every row
        return [next(fresh) for _ in range(args.requests + 3)]

    def bare_way(cache_gb: float):
        config = engine_config(args.model, cache_gb)
        model_config, renderer = config.model_config, renderer_from_config(config)

        def make(jpeg: bytes):
            image = Image.open(io.BytesIO(jpeg)).convert("RGB")
            prompt = {"prompt": text, "multi_modal_data": {"image": image}}
            return renderer.render_cmpl([parse_model_prompt(model_config, prompt)])
        return make

    config = engine_config(args.model, 0)
    inputs, lock = VllmInputs(processor, config.model_config, renderer_from_config(config), 8192, 8192), threading.Lock()

    def qvl_way(jpeg: bytes):
        image = open_image(jpeg, MAX_PIXELS)
        with lock:
            return inputs.render(MESSAGES, [image], 0, PARAMS)

    rows = [("JPEG decode (`open_image`)", per_request_ms(lambda jpeg: open_image(jpeg, MAX_PIXELS), images())),
            ("bare vLLM's way, processor cache 4 GiB", per_request_ms(bare_way(4), images())),
            ("bare vLLM's way, processor cache off", per_request_ms(bare_way(0), images())),
            ("qvl's way, 1 thread", per_request_ms(qvl_way, images()))]
    rows += [(f"qvl's way, {n} threads", per_request_ms(qvl_way, images(), threads=n)) for n in (2, 4)]
    for n in (2, 4):
        with render_processes(args.model, n) as pool:
            def in_pool(jpeg: bytes):
                return pool.render(MESSAGES, [open_image(jpeg, MAX_PIXELS)], 0, PARAMS)
            rows.append((f"qvl's way, {n} render processes from {n} threads", per_request_ms(in_pool, images(), threads=n)))
    print("| 448x448 JPEG, decode included unless named alone | ms a request (wall) |\n| --- | --- |")
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} |")


if __name__ == "__main__":
    main()
