"""Accepted requests, the bounded queue they wait in, and the open requests a cancel can find.

A request is `queued`, then `dispatched` to a worker (possibly again after that worker died),
then answered exactly once. The queue refuses new requests past its bound; that refusal is the
supervisor's backpressure. A client may cancel its own request while it is open (accepted and not
yet answered): a queued one leaves the queue, to be answered at once; a dispatched one is marked,
so its worker is told and whatever ends it answers it as cancelled.
"""

import collections
import time
from dataclasses import dataclass, field
from typing import Iterator

import msgpack

from qvl.protocol.codec import encode
from qvl.protocol.messages import MAX_TIMEOUT_MS


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
    streamed_text: str = ""  # what went to the client in chunks: once any did, never run it again
    cancelled: bool = False  # its client cancelled it: never run again, answered "cancelled"
    worker: bytes | None = None  # identity of the worker it was last dispatched to
    failed_on: bytes | None = None  # the worker whose out-of-memory error sent it back: try another
    size: int = field(init=False)  # bytes it holds: the header and frames it will send to a worker

    def __post_init__(self) -> None:
        self.size = sum(len(part) for part in self.worker_parts)  # counted once, read on every queue move

    @property
    def streamed(self) -> bool:
        return bool(self.streamed_text)

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    def parts_at(self, now: float) -> list:
        """The message to send a worker at `now`. With a deadline, its header's `timeout_ms` is the
        time left, so the worker refuses the request if it is still waiting in the worker then."""
        if self.deadline is None:
            return self.worker_parts
        header = msgpack.unpackb(self.worker_parts[0], raw=False)
        # a float, so the header keeps its size; within what a worker accepts (the caller sends
        # nothing past its deadline, and float rounding must not lift it over the maximum)
        header["timeout_ms"] = min(max((self.deadline - now) * 1000.0, 1e-3), float(MAX_TIMEOUT_MS))
        return [*encode(header), *self.worker_parts[1:]]


class RequestQueue:
    """FIFO of requests waiting for a worker, bounded by `capacity` requests. Their bytes are
    budgeted with every other accepted request's, in `OpenRequests`."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._items: collections.deque[Request] = collections.deque()

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[Request]:
        return iter(self._items)

    def refusal(self) -> str | None:
        """Why a new request cannot wait here now, or None if it can."""
        if len(self._items) >= self.capacity:
            return f"queue is full ({self.capacity} waiting)"
        return None

    def push(self, request: Request) -> None:
        self._items.append(request)

    def push_front(self, request: Request) -> None:
        """Put back a request whose worker died: it has waited longest, so it goes first.
        Past the bound if need be: an accepted request is never dropped."""
        self._items.appendleft(request)

    def remove(self, request: Request) -> bool:
        """Take `request` out of the queue; False if it is not waiting here."""
        try:
            self._items.remove(request)  # by identity: `Request` compares as an object
        except ValueError:
            return False
        return True

    def pop(self) -> Request:
        return self._items.popleft()

    def remove_expired(self, now: float) -> list[Request]:
        expired = [r for r in self._items if r.expired(now)]
        if expired:
            self._items = collections.deque(r for r in self._items if not r.expired(now))
        return expired

    def next_deadline(self) -> float | None:
        return min((r.deadline for r in self._items if r.deadline is not None), default=None)

    def drain(self) -> list[Request]:
        items, self._items = list(self._items), collections.deque()
        return items


@dataclass(frozen=True)
class Cancelled:
    """A cancel that found its request. `queued`: it was waiting and has left the queue, so it is
    answered now; otherwise it is on `request.worker`, which is told to stop it."""

    request: Request
    queued: bool


class OpenRequests:
    """Every accepted request not yet answered, by (client, the client's id): how a cancel finds
    the request it names, and only among its own client's. Their bytes, queued or on a worker
    (where each is kept for a retry), share one budget: the supervisor's memory for requests."""

    def __init__(self, byte_budget: int) -> None:
        self._open: dict[tuple[bytes, object], Request] = {}
        self.byte_budget = byte_budget
        self.bytes = 0  # of every request added and not answered, a reused id's older one included

    def __len__(self) -> int:
        return len(self._open)

    def refusal(self, size: int) -> str | None:
        """Why a new request of `size` bytes cannot be accepted now, or None if it can."""
        if self.bytes + size > self.byte_budget:
            return (f"accepted requests (queued or on a worker) hold {self.bytes} bytes; {size} more "
                    f"exceed the budget of {self.byte_budget}")
        return None

    def add(self, request: Request) -> None:
        self._open[(request.client, request.client_id)] = request
        self.bytes += request.size

    def answered(self, request: Request) -> None:
        """`request` got its reply (each gets one). A client that reused an id keeps its newer request open."""
        self.bytes -= request.size
        if self._open.get((request.client, request.client_id)) is request:
            del self._open[(request.client, request.client_id)]

    def cancel(self, client: bytes, client_id: object, queue: RequestQueue) -> Cancelled | None:
        """Cancel `client`'s open request `client_id`; None when there is none to cancel (an id
        unknown, already answered, another client's, or already cancelled)."""
        request = self._open.get((client, client_id))
        if request is None or request.cancelled:
            return None
        request.cancelled = True
        return Cancelled(request, queue.remove(request))
