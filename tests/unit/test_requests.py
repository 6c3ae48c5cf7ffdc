"""Request bookkeeping: a cancel finds only its own client's open request; a queued one leaves the
queue (bytes and all), a dispatched one is marked; an answered, unknown or repeated cancel finds
nothing. A stateful property test keeps the queue's byte count and the open set honest under any
order of accepts, dispatches, answers and cancels."""

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import msgpack
import pytest
from hypothesis import given

from qvl.protocol.codec import encode
from qvl.protocol.messages import MAX_TIMEOUT_MS
from qvl.supervisor.requests import OpenRequests, Request, RequestQueue


def request(key: int, client: bytes = b"a", client_id: object = None) -> Request:
    return Request(key, client, f"r{key}" if client_id is None else client_id, [b"h" * 10, b"f" * key])


def accepted(*requests: Request) -> tuple[RequestQueue, OpenRequests]:
    queue, open_ = RequestQueue(16), OpenRequests(1 << 20)
    for r in requests:
        queue.push(r)
        open_.add(r)
    return queue, open_


def test_a_queued_request_leaves_the_queue():
    first, second, third = request(1), request(2), request(3)
    queue, open_ = accepted(first, second, third)
    found = open_.cancel(b"a", "r2", queue)
    assert found.request is second and found.queued and second.cancelled
    assert list(queue) == [first, third] and open_.bytes == sum(r.size for r in (first, second, third))


def test_a_dispatched_request_is_marked_and_stays_with_its_worker():
    r = request(1)
    queue, open_ = accepted(r)
    assert queue.pop() is r
    found = open_.cancel(b"a", "r1", queue)
    assert found.request is r and not found.queued and r.cancelled
    assert len(open_) == 1  # still open: its worker's answer (or death) ends it


def test_cancels_that_find_nothing():
    r = request(1)
    queue, open_ = accepted(r)
    assert open_.cancel(b"a", "nope", queue) is None       # unknown id
    assert open_.cancel(b"b", "r1", queue) is None         # another client's request
    assert not r.cancelled and list(queue) == [r]
    assert open_.cancel(b"a", "r1", queue) is not None
    assert open_.cancel(b"a", "r1", queue) is None         # cancelled already
    open_.answered(r)
    assert open_.cancel(b"a", "r1", queue) is None and len(open_) == 0  # answered


def test_an_id_reused_by_its_client_keeps_the_newer_request_open():
    old, new = request(1, client_id="x"), request(2, client_id="x")
    queue, open_ = accepted(old, new)
    open_.answered(old)
    assert open_.cancel(b"a", "x", queue).request is new


def test_the_byte_budget_counts_every_request_until_its_answer_an_id_reused_included():
    old, new = request(1, client_id="x"), request(2, client_id="x")
    queue, open_ = RequestQueue(16), OpenRequests(old.size + new.size)
    queue.push(old)
    open_.add(old)
    queue.pop()  # on a worker now: still held for a retry
    queue.push(new)
    open_.add(new)
    assert open_.bytes == old.size + new.size
    assert "budget" in open_.refusal(1) and open_.refusal(0) is None
    open_.answered(old)
    assert open_.bytes == new.size and open_.refusal(old.size) is None


class Bookkeeping(RuleBasedStateMachine):
    """Requests move queued -> dispatched -> answered, or are cancelled on the way; the supervisor's
    rules: a cancel that finds a queued request answers it, any other ends when its worker answers."""

    def __init__(self):
        super().__init__()
        self.queue, self.open = RequestQueue(1000), OpenRequests(1 << 30)
        self.keys = iter(range(1, 10_000))
        self.dispatched: list[Request] = []
        self.answers: dict[int, int] = {}

    def answer(self, r: Request) -> None:
        self.open.answered(r)
        self.answers[r.key] = self.answers.get(r.key, 0) + 1

    @rule(client=st.sampled_from([b"a", b"b"]))
    def accept(self, client):
        r = request(next(self.keys), client)
        self.queue.push(r)
        self.open.add(r)
        self.answers[r.key] = 0

    @precondition(lambda self: len(self.queue))
    @rule()
    def dispatch(self):
        self.dispatched.append(self.queue.pop())

    @precondition(lambda self: self.dispatched)
    @rule(i=st.integers(0, 100))
    def worker_answers(self, i):
        self.answer(self.dispatched.pop(i % len(self.dispatched)))

    @rule(client=st.sampled_from([b"a", b"b"]), key=st.integers(0, 30))
    def cancel(self, client, key):
        found = self.open.cancel(client, f"r{key}", self.queue)
        if found is not None:
            assert found.request.client == client and found.request.cancelled
            if found.queued:
                self.answer(found.request)

    @invariant()
    def books_balance(self):
        assert self.open.bytes == sum(r.size for r in self.queue) + sum(r.size for r in self.dispatched)
        assert all(count <= 1 for count in self.answers.values())  # never answered twice
        waiting = {r.key for r in self.queue} | {r.key for r in self.dispatched}
        assert len(self.open) == len(waiting) and all(self.answers[k] == 0 for k in waiting)


TestBookkeeping = Bookkeeping.TestCase
TestBookkeeping.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


@given(st.floats(1.0, 7 * 24 * 3600 * 1000.0), st.floats(0.0, 1.0), st.lists(st.binary(max_size=8), max_size=3))
def test_a_request_is_sent_to_a_worker_with_the_time_it_has_left(timeout_ms, spent, frames):
    header = {"v": 1, "kind": "generate", "id": 7, "messages": [], "params": {}, "timeout_ms": float(timeout_ms)}
    request = Request(7, b"c", "x", encode(header, frames), accepted_at=100.0, deadline=100.0 + timeout_ms / 1000.0)
    now = 100.0 + spent * timeout_ms / 1000.0
    parts = request.parts_at(now)
    sent = msgpack.unpackb(parts[0], raw=False)
    assert sent["timeout_ms"] == pytest.approx(timeout_ms * (1 - spent), abs=1e-3)
    assert 0 < sent["timeout_ms"] <= MAX_TIMEOUT_MS  # what a worker accepts
    assert {k: v for k, v in sent.items() if k != "timeout_ms"} == {k: v for k, v in header.items() if k != "timeout_ms"}
    assert parts[1:] == frames and len(parts[0]) == len(request.worker_parts[0])  # the size it was counted at


def test_a_request_without_a_deadline_is_sent_as_it_came():
    request = Request(7, b"c", "x", encode({"v": 1, "kind": "generate", "id": 7}, [b"img"]))
    assert request.parts_at(5.0) is request.worker_parts
