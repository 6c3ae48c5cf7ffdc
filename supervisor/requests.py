"""Accepted requests and the bounded queue they wait in.

A request is `queued`, then `dispatched` to a worker (possibly again after that worker died),
then answered exactly once. The queue refuses new requests past its bound; that refusal is the
supervisor's backpressure.
"""

import collections
import time
from dataclasses import dataclass, field
from typing import Iterator


@dataclass(eq=False)
class Request:
    key: int                 # the supervisor's own id, unique across clients
    client: bytes            # routing id of the client's socket
    client_id: object        # the id the client chose
    worker_parts: list       # the message sent to a worker: header and image frames
    accepted_at: float = field(default_factory=time.monotonic)
    deadline: float | None = None  # monotonic time after which it must not start
    attempts: int = 0
    dispatched_at: float = 0.0
    streamed: bool = False   # text already went to the client: never run it again
    failed_on: bytes | None = None  # the worker whose out-of-memory error sent it back: try another
    size: int = field(init=False)  # bytes it holds: the header and frames it will send to a worker

    def __post_init__(self) -> None:
        self.size = sum(len(part) for part in self.worker_parts)  # counted once, read on every queue move

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline


class RequestQueue:
    """FIFO of requests waiting for a worker, bounded by `capacity` requests and `byte_budget` bytes."""

    def __init__(self, capacity: int, byte_budget: int):
        self.capacity = capacity
        self.byte_budget = byte_budget
        self.bytes = 0
        self._items: collections.deque[Request] = collections.deque()

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._items)

    def refusal(self, size: int) -> str | None:
        """Why a new request of `size` bytes cannot wait here now, or None if it can."""
        if len(self._items) >= self.capacity:
            return f"queue is full ({self.capacity} waiting)"
        if self.bytes + size > self.byte_budget:
            return f"queue holds {self.bytes} bytes; {size} more exceed its budget of {self.byte_budget}"
        return None

    def push(self, request: Request) -> None:
        self._items.append(request)
        self.bytes += request.size

    def push_front(self, request: Request) -> None:
        """Put back a request whose worker died: it has waited longest, so it goes first.
        Past the bounds if need be: an accepted request is never dropped."""
        self._items.appendleft(request)
        self.bytes += request.size

    def pop(self) -> Request:
        request = self._items.popleft()
        self.bytes -= request.size
        return request

    def remove_expired(self, now: float) -> list[Request]:
        expired = [r for r in self._items if r.expired(now)]
        if expired:
            self._items = collections.deque(r for r in self._items if not r.expired(now))
            self.bytes -= sum(r.size for r in expired)
        return expired

    def next_deadline(self) -> float | None:
        return min((r.deadline for r in self._items if r.deadline is not None), default=None)

    def drain(self) -> list[Request]:
        items, self._items = list(self._items), collections.deque()
        self.bytes = 0
        return items
