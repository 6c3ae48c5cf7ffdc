#!/usr/bin/env python3
"""How long making one request's vLLM input takes on the host: bare vLLM's way and qvl's.

    python scripts/bench_render.py --model DIR [--requests 16]

No engine starts and no device is used: vLLM's renderer is built from the engine arguments alone.
Every request carries a new 448x448 JPEG (`workloads.uniform`), so no cache is ever hit. Rows:
- the JPEG's decode as qvl's worker does it (`open_image`);
- bare vLLM's way, as `bench_peer.py` sends it: the chat template's text and a PIL image, rendered
  by vLLM with its processor cache at its default (4 GiB) and off;
- qvl's way (`VllmEngine._render`, the worker's own code): qvl's prompt tokens, then vLLM's
  renderer with the cache off, as the worker runs it; alone, and from 2 and 4 threads as on the
  worker's image pool (`_render_lock` held, each thread decoding its JPEG first).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import threading
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

from qvl.protocol.contract import ModelOptions  # noqa: E402
from qvl.protocol.messages import GenerationParams  # noqa: E402
from qvl.worker.images import open_image  # noqa: E402
from qvl.worker.prompts import PromptTokenizer  # noqa: E402
from qvl.worker.vllm_engine import VllmEngine  # noqa: E402

MAX_PIXELS = 1 << 26
PARAMS = GenerationParams(max_new_tokens=64)
MESSAGES = [{"role": "user", "content": [{"type": "image", "frame": 0}, {"type": "text", "text": QUESTION}]}]


def vllm_renderer(model: str, cache_gb: float):
    config = EngineArgs(model=model, max_model_len=8192, limit_mm_per_prompt={"image": 4, "video": 0},
                        mm_processor_cache_gb=cache_gb).create_engine_config()
    return config.model_config, renderer_from_config(config)


def qvl_renderer(model: str, processor) -> VllmEngine:
    """A `VllmEngine` with only what `_render` reads: its renderer, no engine core."""
    engine = VllmEngine.__new__(VllmEngine)
    engine.options = ModelOptions(model=model, vllm_max_model_len=8192)
    engine.max_prompt_tokens = 8192
    engine.prompt_tokenizer = PromptTokenizer(processor)
    engine.model_config, engine.renderer = vllm_renderer(model, 0)
    engine._render_lock = threading.Lock()
    return engine


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
        model_config, renderer = vllm_renderer(args.model, cache_gb)

        def make(jpeg: bytes):
            image = Image.open(io.BytesIO(jpeg)).convert("RGB")
            prompt = {"prompt": text, "multi_modal_data": {"image": image}}
            return renderer.render_cmpl([parse_model_prompt(model_config, prompt)])
        return make

    engine = qvl_renderer(args.model, processor)

    def qvl_way(jpeg: bytes):
        return engine._render(MESSAGES, [open_image(jpeg, MAX_PIXELS)], 0, PARAMS)

    rows = [("JPEG decode (`open_image`)", per_request_ms(lambda jpeg: open_image(jpeg, MAX_PIXELS), images())),
            ("bare vLLM's way, processor cache 4 GiB", per_request_ms(bare_way(4), images())),
            ("bare vLLM's way, processor cache off", per_request_ms(bare_way(0), images())),
            ("qvl's way, 1 thread", per_request_ms(qvl_way, images()))]
    rows += [(f"qvl's way, {n} threads", per_request_ms(qvl_way, images(), threads=n)) for n in (2, 4)]
    print("| 448x448 JPEG, decode included unless named alone | ms a request (wall) |\n| --- | --- |")
    for name, ms in rows:
        print(f"| {name} | {ms:.2f} |")


if __name__ == "__main__":
    main()
