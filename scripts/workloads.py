"""The benchmark workloads, made whole before any timing, and the percentile every table uses.

`uniform`: a 448x448 image and one question, 64 new tokens, greedy. `mixed`: images of four
sizes from 224x224 to 1344x896, a fifth of the requests text-only, 16, 64 or 256 new tokens, half
greedy and half sampled (temperature 0.7, top-p 0.9, a seed per request). Random weights never
stop on EOS, so every request asks for exactly its length (min = max new tokens).
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

from PIL import Image

QUESTION = ("Describe this picture in detail: the objects, their colours and positions, the light, "
            "and anything written in it. Then say what the picture is most likely used for.")
TEXT_ONLY = "Write a short story about a lighthouse keeper who finds a message in a bottle."
MIXED_SIZES = [(224, 224), (448, 448), (896, 672), (1344, 896)]
MIXED_LENGTHS = [16, 64, 256]


@dataclass(frozen=True)
class Item:
    image: bytes | None  # JPEG, or None for a text-only request
    text: str
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None


def jpeg(size: tuple[int, int], seed: int) -> bytes:
    img = Image.effect_noise(size, 40 + seed % 50).convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format="JPEG")
    return buf.getvalue()


def uniform(n: int, tokens: int = 64) -> list[Item]:
    return [Item(jpeg((448, 448), i), QUESTION, tokens) for i in range(n)]


def mixed(n: int, seed: int = 0) -> list[Item]:
    rng = random.Random(seed)
    items = []
    for i in range(n):
        image = None if rng.random() < 0.2 else jpeg(rng.choice(MIXED_SIZES), i)
        sampled = rng.random() < 0.5
        items.append(Item(image, QUESTION if image else TEXT_ONLY, rng.choice(MIXED_LENGTHS),
                          0.7 if sampled else 0.0, 0.9 if sampled else 1.0))
    return items


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile: the smallest value with at least q% of the values at or below it."""
    ordered = sorted(values)
    if not ordered:
        return math.nan
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]
