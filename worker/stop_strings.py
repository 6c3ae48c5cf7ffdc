"""Stop strings: where a request's answer ends, and how much of a growing answer may be streamed.

Pure text functions; imports nothing. A stop string ends the answer where it first appears, and is
not part of it (as OpenAI does). "First" means the first to be complete as the text grows, as a
streaming reader sees it: among stop strings found, the one that ends earliest, and of those the
one that starts earliest. So the text cut from a prefix of an answer is always a prefix of the text
cut from the whole answer, which is what lets `streamable` never send text that is later taken back.
"""

from __future__ import annotations

from typing import Sequence


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the answer in `text` ends: the start of its first complete stop string, or None."""
    best: tuple[int, int] | None = None  # (end, start)
    for stop in stops:
        start = text.find(stop)
        if start >= 0 and (best is None or (start + len(stop), start) < best):
            best = (start + len(stop), start)
    return None if best is None else best[1]


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """`text` up to, and without, its first stop string."""
    at = find_stop(text, stops)
    return text if at is None else text[:at]


def streamable(text: str, stops: Sequence[str]) -> str:
    """Of a text still growing, what may be sent now: the text before its first stop string, or,
    where none is complete yet, the text without its longest tail that could begin one."""
    at = find_stop(text, stops)
    if at is not None:
        return text[:at]
    held = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:size]):
                held = size
                break
    return text[:len(text) - held]
