"""Benchmark workloads, made before any timing, and the percentile every benchmark reports.

Owns what a benchmark sends, never how: `uniform(n)` and `mixed(n, seed)` return lists of `Item`s
whose images are already encoded bytes, so no script makes a picture while a clock runs. Each list
is a prefix of a longer one made with the same arguments (`mixed(8, s) == mixed(20, s)[:8]`), so a
service timed on fewer requests sees the same first ones. Imports PIL only; no torch, no qvl.

    uniform(n)       every request alike: a 448x448 JPEG, `QUESTION`, 64 new tokens, greedy
    mixed(n, seed)   images of 224², 448², 896x672 and 1344x896 and a fifth text-only; 16, 64 or 256
                     new tokens; about half greedy, half sampled (temperature 0.7, top_p 0.9) each
                     with a seed of its own

Random weights never stop by themselves, so every item fixes its length: min_new_tokens =
max_new_tokens (`Item.params`).
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass
from typing import Sequence

from PIL import Image

QUESTION = ("Describe this picture in detail: the objects, their colours and positions, the light, "
            "and anything written in it. Then say what the picture is most likely used for.")
TEXT_QUESTION = ("Write a short story about a lighthouse keeper who finds a message in a bottle, "
                 "and say what the message means to her.")
MIXED_SIZES = ((224, 224), (448, 448), (896, 672), (1344, 896), None)  # None: text only
MIXED_LENGTHS = (16, 64, 256)
SHORT = MIXED_LENGTHS[0]  # the short requests whose latency a mixed run reports apart


@dataclass(frozen=True)
class Item:
    """One request of a workload. `temperature` 0 is greedy; `seed` is set only when sampling."""

    image: bytes | None
    text: str
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def params(self) -> dict:
        """Keyword arguments of qvl's `Client.generate` (and `stream`)."""
        params = {"max_new_tokens": self.max_new_tokens, "min_new_tokens": self.max_new_tokens,
                  "temperature": self.temperature, "top_p": self.top_p}
        if self.seed is not None:
            params["seed"] = self.seed
        return params

    def messages(self) -> list:
        """The request's chat messages in qvl's client form (image parts hold the bytes)."""
        content = [] if self.image is None else [{"type": "image", "image": self.image}]
        return [{"role": "user", "content": [*content, {"type": "text", "text": self.text}]}]


def picture(size: tuple[int, int], seed: int) -> bytes:
    """A JPEG of Gaussian noise: every picture different, none compressible to nothing."""
    image = Image.effect_noise(size, 40 + seed % 50).convert("RGB")
    buf = io.BytesIO()
    image.save(buf, format="JPEG")
    return buf.getvalue()


def uniform(n: int) -> list[Item]:
    """`n` alike requests: a 448x448 image each, the same question, 64 new tokens, greedy."""
    return [Item(picture((448, 448), i), QUESTION, 64) for i in range(n)]


def mixed(n: int, seed: int = 0) -> list[Item]:
    """`n` requests of mixed sizes, lengths and sampling, drawn from `seed`. Kinds take turns (so
    a fifth are text-only, exactly when `n` is a multiple of five); each item's length and whether
    it samples are drawn in order, so a shorter list is a prefix of a longer one."""
    rng = random.Random(seed)
    items = []
    for i in range(n):
        size = MIXED_SIZES[i % len(MIXED_SIZES)]
        length = rng.choice(MIXED_LENGTHS)
        sampled = rng.random() < 0.5
        request_seed = rng.randrange(1 << 31)
        image = None if size is None else picture(size, i)
        text = TEXT_QUESTION if size is None else QUESTION
        if sampled:
            items.append(Item(image, text, length, temperature=0.7, top_p=0.9, seed=request_seed))
        else:
            items.append(Item(image, text, length))
    return items


def percentile(values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile: the smallest value with at least q % of `values` at or below it
    (rank ceil(q/100 * n), counted from 1). Always one of the values: of two, p50 is the lower and
    p99 the higher; p100 is the maximum. `q` in (0, 100]; `values` not empty."""
    if not values:
        raise ValueError("the percentile of no values")
    if not 0 < q <= 100:
        raise ValueError(f"q must be in (0, 100], not {q}")
    ordered = sorted(values)
    rank = math.ceil(round(q * len(ordered) / 100, 9))  # rounded first: 70 % of 10 is rank 7, not 8
    return ordered[rank - 1]
