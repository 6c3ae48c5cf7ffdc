"""`Client` (blocking) and `AsyncClient` (asyncio): talk to a supervisor's frontend over ZeroMQ.

Each client holds one DEALER socket. Calls carry a fresh id; a reply is matched to its call by
that id, and late replies to calls that already timed out are dropped. `Client` is for one thread
(as a ZeroMQ socket is); one `AsyncClient` serves any number of concurrent tasks. `stream` yields
an answer's text in chunks as it is generated; the last chunk carries usage and timings.

A generate call given up before its answer (its timeout passed, its task was cancelled, its stream
was closed early) sends `cancel`, so the service stops working on it; `cancel(id)` does it for a
stream whose chunks are still wanted up to the end (the last one says `finish_reason` "cancelled").
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator, Sequence

import msgpack
import zmq
import zmq.asyncio

from .codec import CHUNK, DEFAULT_LIMITS, PING, PROTOCOL_VERSION, RECYCLE, STATUS, Limits, encode
from .errors import BadRequest, InternalError, QvlError, RequestTimeout, error_from_wire
from .messages import Cancel, GenerationParams, build_generate

DEFAULT_ENDPOINT = "tcp://127.0.0.1:5555"


@dataclass(frozen=True)
class Result:
    """An answer: its text, token usage, timings in ms and the worker that produced it.
    `finish_reason`: "stop" (an end-of-sequence token), "length" (max_new_tokens) or "cancelled"
    (the text made before a `cancel`)."""

    id: Any
    text: str
    usage: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    worker: dict = field(default_factory=dict)
    finish_reason: str | None = None


@dataclass(frozen=True)
class Chunk:
    """A piece of a streamed answer. The last one has `done` set and the usage, timings, worker
    and `finish_reason` (as in `Result`)."""

    id: Any
    text: str
    done: bool = False
    usage: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)
    worker: dict = field(default_factory=dict)
    finish_reason: str | None = None


class _Stream:
    """Turns a stream's messages into chunks: the reply's text beyond what chunks already gave.
    ZeroMQ drops messages to a peer past its high-water mark, so a client that falls far behind its
    socket can miss a chunk: the reply's text then does not begin with the chunks', and the stream
    ends with `InternalError` rather than with text that disagrees with the answer."""

    def __init__(self) -> None:
        self.received: list[str] = []
        self.done = False  # the reply came: nothing left to cancel

    def chunk(self, reply: dict) -> Chunk:
        text = reply.get("text", "")
        if reply.get("kind") == CHUNK:
            self.received.append(text)
            return Chunk(reply["id"], text)
        self.done = True
        received = "".join(self.received)
        if not text.startswith(received):
            raise InternalError(f"stream {reply['id']!r} lost chunks on the way: the {len(received)} characters "
                                f"received do not begin its answer of {len(text)}", reply["id"])
        return Chunk(reply["id"], text[len(received):], True, reply.get("usage", {}),
                     reply.get("timings", {}), reply.get("worker", {}), reply.get("finish_reason"))


# a reply's fields a client reads, and the types they must have where present
_REPLY_FIELDS = {"ok": (bool,), "kind": (str,), "text": (str,), "usage": (dict,), "timings": (dict,),
                 "worker": (dict,), "finish_reason": (str, type(None))}


def read_reply(parts: Sequence[bytes]) -> dict | None:
    """A message from the frontend as a reply map, or None when it names no call of this client
    (not msgpack, not a map, no string id): nothing can be routed to, so it is dropped. A map
    for a call whose fields have the wrong types becomes an `internal` error reply for that call,
    so the call raises `InternalError` instead of returning a broken answer, and the reader that
    serves every other call goes on."""
    try:
        reply = msgpack.unpackb(parts[0], raw=False)
    except (msgpack.UnpackException, ValueError, IndexError):
        return None
    if not isinstance(reply, dict) or not isinstance(reply.get("id"), str):
        return None
    wrong = sorted(name for name, types in _REPLY_FIELDS.items()
                   if name in reply and not isinstance(reply[name], types))
    if wrong:
        return {"id": reply["id"], "ok": False,
                "error": {"code": "internal", "message": f"malformed reply: wrong type of {', '.join(wrong)}"}}
    return reply


class _Calls:
    """What both clients share: ids, request encoding, reply decoding (`read_reply`)."""

    def __init__(self, endpoint: str, timeout: float, limits: Limits, curve: tuple | None):
        self.endpoint = endpoint
        self.timeout = timeout
        self.limits = limits
        self.curve = curve  # (server public, client public, client secret) keys, as `curve.client_keys` reads them
        self._ids = (f"{uuid.uuid4().hex[:8]}-{n}" for n in itertools.count())

    def _generate_parts(self, messages: Sequence[dict], timeout: float | None,
                        params: dict, stream: bool = False) -> tuple[str, list[bytes]]:
        try:
            gen = GenerationParams.parse(params, self.limits)
        except TypeError as exc:
            raise BadRequest(str(exc)) from None
        timeout_ms = None if timeout is None else timeout * 1000.0
        request = build_generate(next(self._ids), list(messages), gen, timeout_ms, stream)
        try:
            parts = encode(request.header(), request.images)
        except UnicodeEncodeError:  # msgpack writes UTF-8: a lone surrogate is no text
            raise BadRequest("message text must be text: it holds a lone UTF-16 surrogate") from None
        if len(parts[0]) > self.limits.max_header_bytes:  # refused unread, so with no id to answer
            raise BadRequest(f"header of {len(parts[0])} bytes exceeds {self.limits.max_header_bytes}")
        return request.id, parts

    @staticmethod
    def _cancel_parts(request_id: Any) -> list[bytes]:
        return encode(Cancel(request_id).header())

    def _control_parts(self, kind: str, **fields: Any) -> tuple[str, list[bytes]]:
        rid = next(self._ids)
        return rid, encode({"v": PROTOCOL_VERSION, "kind": kind, "id": rid, **fields})

    @staticmethod
    def _result(reply: dict) -> dict:
        if not reply.get("ok"):
            raise error_from_wire(reply.get("error"), reply.get("id"))
        return reply

    @staticmethod
    def _as_result(reply: dict) -> Result:
        if reply.get("kind") == CHUNK:
            raise InternalError("malformed reply: a stream chunk for a call that does not stream", reply["id"])
        return Result(reply["id"], reply.get("text", ""), reply.get("usage", {}),
                      reply.get("timings", {}), reply.get("worker", {}), reply.get("finish_reason"))

    @staticmethod
    def _ask_messages(image: Any, question: str) -> list[dict]:
        return [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": question}]}]

    def _socket(self, ctx: zmq.Context) -> zmq.Socket:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        # a peer sending a larger message is disconnected unread, as the supervisor does; calls waiting on it time out
        sock.setsockopt(zmq.MAXMSGSIZE, self.limits.transport_cap)
        if self.curve:
            sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = self.curve
        sock.connect(self.endpoint)
        return sock


class Client(_Calls):
    """Blocking client. `timeout` (seconds) bounds each call; a call may pass its own."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, timeout: float = 120.0,
                 limits: Limits = DEFAULT_LIMITS, curve: tuple | None = None):
        super().__init__(endpoint, timeout, limits, curve)
        self._ctx = zmq.Context.instance()
        self._sock = self._socket(self._ctx)

    def generate(self, messages: Sequence[dict], *, timeout: float | None = None,
                 deadline: float | None = None, **params: Any) -> Result:
        """Answer chat `messages`. `deadline` (seconds) lets the server refuse it
        (`DeadlineExceeded`) if it has not started by then.
        A call that times out (or is interrupted) cancels its request."""
        rid, parts = self._generate_parts(messages, deadline, params)
        self._send(rid, parts, timeout)
        try:
            return self._as_result(self._await(rid, timeout))
        except (RequestTimeout, KeyboardInterrupt):
            self._abandon(rid)
            raise

    def ask(self, image: Any, question: str, **params: Any) -> Result:
        """One image, one question."""
        return self.generate(self._ask_messages(image, question), **params)

    def stream(self, messages: Sequence[dict], *, timeout: float | None = None,
               deadline: float | None = None, **params: Any) -> Iterator[Chunk]:
        """Answer chat `messages` chunk by chunk; `timeout` bounds the wait for each chunk. A stream
        that times out, or is closed before its last chunk (`break`, `close()`), cancels its request."""
        rid, parts = self._generate_parts(messages, deadline, params, stream=True)
        self._send(rid, parts, timeout)
        stream = _Stream()
        try:
            while True:
                chunk = stream.chunk(self._await(rid, timeout))
                yield chunk
                if chunk.done:
                    return
        except (QvlError, KeyboardInterrupt, GeneratorExit):  # a malformed chunk may leave it running
            if not stream.done:
                self._abandon(rid)
            raise

    def cancel(self, request_id: Any, timeout: float | None = None) -> None:
        """Cancel generate request `request_id` (the `id` of a stream's chunks) and go on reading:
        its last chunk has `finish_reason` "cancelled" and the text made until then (or its usual
        end, if it finished first). No reply of its own; an id that names nothing open is ignored."""
        self._send(request_id, self._cancel_parts(request_id), timeout)

    def status(self, timeout: float | None = None) -> dict:
        return self._call(*self._control_parts(STATUS), timeout)

    def recycle(self, worker: int | None = None, timeout: float | None = None) -> dict:
        return self._call(*self._control_parts(RECYCLE, worker=worker), timeout)

    def ping(self, timeout: float | None = None) -> float:
        """Round-trip time to the supervisor in seconds."""
        t0 = time.perf_counter()
        self._call(*self._control_parts(PING), timeout)
        return time.perf_counter() - t0

    def wait_ready(self, timeout: float = 120.0, workers: int = 1) -> dict:
        """Poll `status` until at least `workers` workers are ready; return that status."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise RequestTimeout(f"fewer than {workers} workers ready after {timeout:.0f}s")
            try:
                status = self.status(timeout=min(left, 2.0))
            except RequestTimeout:
                continue
            slots = status.get("workers")
            if not isinstance(slots, list):
                raise InternalError("malformed status: `workers` is not a list")
            if sum(isinstance(w, dict) and w.get("state") == "ready" for w in slots) >= workers:
                return status
            time.sleep(min(0.1, max(left, 0)))

    def _call(self, rid: str, parts: list[bytes], timeout: float | None) -> dict:
        self._send(rid, parts, timeout)
        return self._await(rid, timeout)

    def _send(self, rid: str, parts: list[bytes], timeout: float | None) -> None:
        """Send within the call's timeout: with no supervisor connected, a send would wait forever."""
        limit = self.timeout if timeout is None else timeout
        self._sock.setsockopt(zmq.SNDTIMEO, max(1, int(limit * 1000)))
        try:
            self._sock.send_multipart(parts, copy=False)
        except zmq.Again:
            raise RequestTimeout(f"could not send within {limit}s: no supervisor is connected", rid) from None

    def _abandon(self, rid: str) -> None:
        """Cancel a call given up on, as far as the socket takes it at once: the service would
        otherwise compute an answer nobody reads."""
        try:
            self._sock.send_multipart(self._cancel_parts(rid), zmq.NOBLOCK)
        except zmq.ZMQError:  # no connection, or the socket is closed: nothing runs for it then
            pass

    def _await(self, rid: str, timeout: float | None) -> dict:
        """The next message for call `rid`; an error reply is raised as its exception."""
        end = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            left_ms = int((end - time.monotonic()) * 1000)
            if left_ms <= 0 or not self._sock.poll(left_ms):
                raise RequestTimeout(f"no reply within {self.timeout if timeout is None else timeout}s", rid)
            reply = read_reply(self._sock.recv_multipart())
            if reply is not None and reply["id"] == rid:
                return self._result(reply)

    def close(self) -> None:
        self._sock.close(0)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Inbox(asyncio.Queue):
    """One call's messages until it reads them, and the bytes of all it was given."""

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize)
        self.bytes = 0


class AsyncClient(_Calls):
    """asyncio client; concurrent calls share one socket and one reader task. A call's messages
    wait in its own inbox until it reads them: at most `limits.max_new_tokens` chunks and its reply
    (all a server sends for a request it accepted), of `limits.max_request_bytes` in all. Past
    either the call ends with `internal`, so a peer that floods a call cannot grow the client
    however slowly the call is read."""

    def __init__(self, endpoint: str = DEFAULT_ENDPOINT, timeout: float = 120.0,
                 limits: Limits = DEFAULT_LIMITS, curve: tuple | None = None):
        super().__init__(endpoint, timeout, limits, curve)
        self._ctx = zmq.asyncio.Context.instance()
        self._sock = self._socket(self._ctx)
        self._pending: dict[str, _Inbox] = {}
        self._reader: asyncio.Task | None = None

    async def generate(self, messages: Sequence[dict], *, timeout: float | None = None,
                       deadline: float | None = None, **params: Any) -> Result:
        """As `Client.generate`; a call that times out or whose task is cancelled cancels its request."""
        rid, parts = self._generate_parts(messages, deadline, params)
        return self._as_result(await self._call(rid, parts, timeout, abandon=True))

    async def ask(self, image: Any, question: str, **params: Any) -> Result:
        return await self.generate(self._ask_messages(image, question), **params)

    async def stream(self, messages: Sequence[dict], *, timeout: float | None = None,
                     deadline: float | None = None, **params: Any) -> AsyncIterator[Chunk]:
        """Answer chat `messages` chunk by chunk; `timeout` bounds the wait for each chunk. A stream
        that times out, whose task is cancelled, or that is closed before its last chunk (`aclose()`,
        or a `break` once the generator is collected) cancels its request."""
        rid, parts = self._generate_parts(messages, deadline, params, stream=True)
        stream = _Stream()
        try:
            inbox = await self._send(rid, parts)
            while True:
                chunk = stream.chunk(await self._next(rid, inbox, timeout))
                yield chunk
                if chunk.done:
                    return
        except (QvlError, asyncio.CancelledError, GeneratorExit):  # a malformed chunk may leave it running
            if not stream.done:
                self._abandon(rid)
            raise
        finally:
            self._pending.pop(rid, None)

    async def cancel(self, request_id: Any) -> None:
        """As `Client.cancel`."""
        try:  # with no supervisor connected, a send would wait forever
            await asyncio.wait_for(self._sock.send_multipart(self._cancel_parts(request_id)), self.timeout)
        except asyncio.TimeoutError:
            raise RequestTimeout(f"could not send within {self.timeout}s: no supervisor is connected",
                                 request_id) from None

    async def status(self, timeout: float | None = None) -> dict:
        return await self._call(*self._control_parts(STATUS), timeout)

    async def recycle(self, worker: int | None = None, timeout: float | None = None) -> dict:
        return await self._call(*self._control_parts(RECYCLE, worker=worker), timeout)

    async def _call(self, rid: str, parts: list[bytes], timeout: float | None, abandon: bool = False) -> dict:
        """Send a call and await its reply; `abandon`: a call given up on cancels its request."""
        try:
            return await self._next(rid, await self._send(rid, parts), timeout)
        except (RequestTimeout, InternalError, asyncio.CancelledError):  # internal: a reply it could not read
            if abandon:
                self._abandon(rid)
            raise
        finally:
            self._pending.pop(rid, None)

    def _abandon(self, rid: str) -> None:
        """Cancel a call given up on, as far as the socket takes it at once (never awaited: the
        task may be being cancelled)."""
        try:
            sent = self._sock.send_multipart(self._cancel_parts(rid), flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            return
        sent.add_done_callback(lambda f: f.cancelled() or f.exception())  # an unsent cancel is no fault

    async def _send(self, rid: str, parts: list[bytes]) -> "_Inbox":
        """Send a call; its messages arrive in the returned queue (the caller removes it when done)."""
        if self._reader is None:
            self._reader = asyncio.ensure_future(self._read_replies())
        inbox = _Inbox(self.limits.max_new_tokens + 1)
        self._pending[rid] = inbox
        try:  # with no supervisor connected, a send would wait forever
            await asyncio.wait_for(self._sock.send_multipart(parts, copy=False), self.timeout)
        except asyncio.TimeoutError:
            self._pending.pop(rid, None)
            raise RequestTimeout(f"could not send within {self.timeout}s: no supervisor is connected", rid) from None
        return inbox

    async def _next(self, rid: str, inbox: "_Inbox", timeout: float | None) -> dict:
        limit = self.timeout if timeout is None else timeout
        try:
            reply = await asyncio.wait_for(inbox.get(), limit)
        except asyncio.TimeoutError:
            raise RequestTimeout(f"no reply within {limit}s", rid) from None
        return self._result(reply)

    async def _read_replies(self) -> None:
        while True:
            parts = await self._sock.recv_multipart()
            reply = read_reply(parts)
            inbox = None if reply is None else self._pending.get(reply["id"])
            if inbox is None:
                continue
            size = sum(len(part) for part in parts)
            if inbox.full() or inbox.bytes + size > self.limits.max_request_bytes:
                # more than any request's answer: the call ends, and nothing more reaches it
                del self._pending[reply["id"]]
                while not inbox.empty():
                    inbox.get_nowait()
                reply = {"id": reply["id"], "ok": False, "error": {
                    "code": "internal", "message": f"malformed reply: more than {inbox.maxsize} messages or "
                                                   f"{self.limits.max_request_bytes} bytes for one call"}}
            inbox.bytes += size
            inbox.put_nowait(reply)

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                pass
        self._sock.close(0)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
