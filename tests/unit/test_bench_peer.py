"""How `scripts/bench_peer.py` times requests, with stand-in systems in its own event loop (no model,
no process): a request's clock starts when its slot frees, so a system that holds the event loop
while it prepares a request (bare vLLM renders inside `generate`) is charged for that time, and a
slot's next request starts its clock when the one before it ends. The rounds of a uniform level
are cut from its timeline in order, and a round with a failed request is left out, not merged."""

import asyncio
import sys
import time

from harness import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import bench_peer  # noqa: E402
from workloads import Item  # noqa: E402

HOLD_S, ANSWER_S = 0.05, 0.01


class LoopHoldingSystem:
    """Holds the event loop `HOLD_S` before it sends each request (as bare vLLM's `generate` renders
    in the loop), then answers one token `ANSWER_S` later."""

    async def one(self, item: Item, mark, stream: bool = True) -> int:
        time.sleep(HOLD_S)
        mark(sent=True)
        await asyncio.sleep(ANSWER_S)
        mark()
        return 1


def test_requests_released_together_are_timed_from_their_release_not_from_when_the_loop_runs_them():
    _, records = asyncio.run(bench_peer.run_level(LoopHoldingSystem(), [], [Item(None, "q", 1)] * 4, 4))
    starts = [r["start"] for r in records]
    assert max(starts) - min(starts) < HOLD_S / 2  # all four released at the level's start
    waits = sorted(r["sent"] - r["start"] for r in records)
    assert waits[-1] >= 3 * HOLD_S  # the last was sent after three others held the loop, and that counts
    assert max(r["first"] - r["start"] for r in records) >= 4 * HOLD_S


def test_a_slots_next_request_starts_its_clock_when_the_one_before_it_ends():
    _, records = asyncio.run(bench_peer.run_level(LoopHoldingSystem(), [Item(None, "w", 1)],
                                                  [Item(None, "q", 1)] * 3, 1))
    assert [r["start"] for r in records[1:]] == [r["end"] for r in records[:-1]]


def _request(start: float, error: bool = False) -> dict:
    """A bare vLLM request of a uniform round, in a timeline's ms."""
    t = {"start": start, "sent": start + 1.0, "first": start + 30.0, "end": start + 100.0,
         "core_arrival_ms": 2.0, "core_queue_ms": 0.5, "core_prefill_ms": 20.0}
    return {**t, "error": "EngineDeadError"} if error else t


def test_rounds_are_cut_in_order_and_one_with_a_failed_request_is_left_out():
    rounds = [[_request(200.0 * n + i) for i in range(4)] for n in range(3)]
    rounds[1][2] = _request(202.0, error=True)
    requests = [t for r in reversed(rounds) for t in reversed(r)]  # any order in the file
    assert bench_peer.uniform_rounds(requests, 4) == [(3.0, 23.5, 76.5), (3.0, 23.5, 76.5)]
    assert bench_peer.uniform_rounds(requests[:3], 4) == []
