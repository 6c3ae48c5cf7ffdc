"""What a client does with whatever comes back on its socket: `read_reply` drops a message that names
no call and turns a malformed one for a call into an `internal` error reply, so a caller sees an
answer or a `QvlError`, never a `KeyError` or a dead reader. The peer here is a hostile frontend
(a real ROUTER socket in this test, standing in for a broken or foreign server)."""

import asyncio
import threading
import time

import msgpack
import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st

from qvl.protocol import AsyncClient, BadRequest, Client, InternalError, QvlError, RequestTimeout
from qvl.protocol.codec import Limits
from qvl.protocol.client import Result, _Calls, _Stream, read_reply

MESSAGES = [{"role": "user", "content": "hi"}]

scalars = st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=8) \
    | st.binary(max_size=8)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
replies = st.fixed_dictionaries({"id": st.text(max_size=4) | values},
                                optional={name: values for name in ("ok", "kind", "text", "usage", "timings",
                                                                    "worker", "finish_reason", "error")})


def handled(reply):
    """What a caller gets from `reply`, by each way of reading it: a value or a `QvlError`."""
    outcomes = []
    for read in (lambda r: _Calls._as_result(_Calls._result(r)), lambda r: _Stream().chunk(_Calls._result(r))):
        try:
            outcomes.append(read(reply))
        except QvlError as exc:
            outcomes.append(exc)
    return outcomes


def check(parts):
    reply = read_reply(parts)
    if reply is None:
        return
    assert isinstance(reply["id"], str)
    for outcome in handled(reply):
        if not isinstance(outcome, QvlError):
            assert isinstance(outcome.text, str) and isinstance(outcome.usage, dict)


@given(st.lists(st.binary(max_size=64), max_size=3))
def test_any_bytes_are_dropped_or_read_to_an_answer_or_a_typed_error(parts):
    check(parts)


@given(values | replies)
def test_any_msgpack_value_is_dropped_or_read_to_an_answer_or_a_typed_error(value):
    check([msgpack.packb(value)])


def test_a_reply_with_a_field_of_the_wrong_type_is_an_internal_error_for_its_call():
    reply = read_reply([msgpack.packb({"id": "a-1", "ok": True, "text": 5, "usage": []})])
    assert reply["id"] == "a-1" and reply["ok"] is False
    with pytest.raises(InternalError, match="text, usage"):
        _Calls._result(reply)


def test_a_good_reply_is_read_unchanged():
    good = {"id": "a-1", "ok": True, "kind": "reply", "text": "fine", "usage": {"completion_tokens": 1},
            "finish_reason": "stop", "extra": [1]}
    assert read_reply([msgpack.packb(good)]) == good


JUNK = [b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"id": [1]}), msgpack.packb({"id": 3}), b""]


def nested(depth):
    value = "x"
    for _ in range(depth):
        value = [value]
    return value


def good(rid, text="fine", kind="reply"):
    return {"kind": kind, "id": rid, "ok": True, "text": text, "finish_reason": "stop"}


class HostileFrontend:
    """A ROUTER that answers each request (cancels aside, which it records) with junk, then with
    what `script(n, request)` returns for the n-th request: the replies to send for it."""

    def __init__(self, endpoint: str, script):
        self.script = script
        self.cancels: list = []
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(endpoint)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self):
        answered = 0
        while not self.stopping.is_set():
            if not self.sock.poll(50):
                continue
            identity, header, *_ = self.sock.recv_multipart()
            request = msgpack.unpackb(header, raw=False)
            if request.get("kind") == "cancel":
                self.cancels.append(request["id"])
                continue
            for part in [*JUNK, *map(msgpack.packb, self.script(answered, request))]:
                self.sock.send_multipart([identity, part])
            answered += 1

    def close(self):
        self.stopping.set()
        self.thread.join(5)
        self.sock.close(0)


@pytest.fixture
def frontend(tmp_path):
    servers = []

    def start(script):
        servers.append(HostileFrontend(f"ipc://{tmp_path}/frontend", script))
        return f"ipc://{tmp_path}/frontend", servers[-1]
    yield start
    for server in servers:
        server.close()
        assert not server.thread.is_alive()


def first_text_is_a_number(n, request):
    return [good(request["id"], 5 if n == 0 else "fine")]


@pytest.mark.timeout(30)
def test_a_blocking_client_reads_past_junk_and_raises_on_a_malformed_reply(frontend):
    endpoint, _ = frontend(first_text_is_a_number)
    with Client(endpoint, timeout=5) as client:
        with pytest.raises(InternalError, match="malformed reply: wrong type of text"):
            client.generate(MESSAGES, max_new_tokens=4)
        assert client.generate(MESSAGES, max_new_tokens=4).text == "fine"


@pytest.mark.timeout(30)
def test_an_async_clients_reader_survives_junk_and_serves_the_next_call(frontend):
    endpoint, _ = frontend(first_text_is_a_number)

    async def run():
        async with AsyncClient(endpoint, timeout=5) as client:
            with pytest.raises(InternalError, match="malformed reply"):
                await client.generate(MESSAGES, max_new_tokens=4)
            first = await client.generate(MESSAGES, max_new_tokens=4)
            chunks = [c async for c in client.stream(MESSAGES, max_new_tokens=4)]
            return first, chunks
    first, chunks = asyncio.run(run())
    assert isinstance(first, Result) and first.text == "fine"
    assert "".join(c.text for c in chunks) == "fine" and chunks[-1].done


@pytest.mark.timeout(30)
def test_an_error_nested_past_the_stack_is_an_internal_error(frontend):
    endpoint, _ = frontend(lambda n, r: [{"id": r["id"], "ok": False,
                                          "error": {"code": "overloaded", "message": nested(1000)}}
                                         if n == 0 else {"id": r["id"], "ok": False, "error": nested(1000)}])
    with Client(endpoint, timeout=5) as client:
        for _ in range(2):
            with pytest.raises(InternalError, match="malformed error"):
                client.generate(MESSAGES, max_new_tokens=4)


@pytest.mark.timeout(30)
def test_a_chunk_answering_a_call_that_does_not_stream_is_an_internal_error(frontend):
    endpoint, _ = frontend(lambda n, r: [good(r["id"], "part", kind="chunk")])
    with Client(endpoint, timeout=5) as client:
        with pytest.raises(InternalError, match="does not stream"):
            client.generate(MESSAGES, max_new_tokens=4)


@pytest.mark.timeout(30)
def test_a_stream_ended_by_a_malformed_chunk_cancels_its_request(frontend):
    endpoint, server = frontend(lambda n, r: [good(r["id"], "a", kind="chunk"), good(r["id"], 7, kind="chunk")])
    with Client(endpoint, timeout=5) as client:
        chunks = []
        with pytest.raises(InternalError, match="malformed reply"):
            for chunk in client.stream(MESSAGES, max_new_tokens=4):
                chunks.append(chunk.text)
        assert chunks == ["a"]
        assert wait_for(lambda: len(server.cancels) == 1)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("status", [{}, {"workers": 3}, {"workers": ["a", {}, {"state": []}]}])
def test_wait_ready_on_a_malformed_status_is_an_internal_error_or_waits(frontend, status):
    endpoint, _ = frontend(lambda n, r: [{"id": r["id"], "ok": True, **status}])
    with Client(endpoint, timeout=5) as client:
        if isinstance(status.get("workers"), list):  # no ready worker among them: it waits its time out
            with pytest.raises(RequestTimeout):
                client.wait_ready(timeout=1)
        else:
            with pytest.raises(InternalError, match="malformed status"):
                client.wait_ready(timeout=5)


@pytest.mark.timeout(30)
def test_a_call_flooded_past_any_answer_ends_internal_however_slowly_it_is_read(frontend):
    """100 chunks for a stream that may have 16 tokens: its inbox holds 17 messages at most, then the
    call ends with `internal` and is cancelled; the client serves the next call."""
    endpoint, server = frontend(lambda n, r: [good(r["id"], "x", kind="chunk")] * 100 + [good(r["id"])]
                                if n == 0 else [good(r["id"])])

    async def run():
        async with AsyncClient(endpoint, timeout=5, limits=Limits(max_new_tokens=16)) as client:
            texts = []
            with pytest.raises(InternalError, match="more than 17 messages or"):
                async for chunk in client.stream(MESSAGES, max_new_tokens=16):
                    texts.append(chunk.text)
                    await asyncio.sleep(0.05)  # read slowly: the reader takes everything meanwhile
                    assert all(inbox.qsize() <= 17 for inbox in client._pending.values())
            return texts, await client.generate(MESSAGES, max_new_tokens=4)
    texts, after = asyncio.run(run())
    assert len(texts) <= 17 and after.text == "fine"
    assert wait_for(lambda: len(server.cancels) == 1)


@pytest.mark.timeout(30)
@pytest.mark.timeout(30)
def test_a_call_given_more_bytes_than_any_request_ends_internal(frontend):
    """Few messages, but more bytes in all than `max_request_bytes`: the call ends with `internal`."""
    endpoint, _ = frontend(lambda n, r: [good(r["id"], "z" * 3000, kind="chunk")] * 4 + [good(r["id"])])

    async def run():
        async with AsyncClient(endpoint, timeout=5, limits=Limits(max_request_bytes=10_000)) as client:
            with pytest.raises(InternalError, match="10000 bytes"):
                async for _ in client.stream(MESSAGES, max_new_tokens=4):
                    await asyncio.sleep(0.05)
    asyncio.run(run())


@pytest.mark.timeout(30)
def test_a_message_over_the_transport_cap_is_never_read(frontend):
    """A reply larger than the client's transport cap (4 x its largest frame) drops the connection
    unread: the call times out instead of taking the bytes in."""
    endpoint, _ = frontend(lambda n, r: [good(r["id"], "y" * 20_000)])
    with Client(endpoint, timeout=1, limits=Limits(max_header_bytes=1024, max_frame_bytes=1024)) as client:
        with pytest.raises(RequestTimeout):
            client.generate(MESSAGES, max_new_tokens=4)


def test_a_header_the_server_would_refuse_unread_is_refused_before_sending():
    client = Client("ipc:///nonexistent/qvl-test", timeout=1, limits=Limits(max_header_bytes=1024))
    try:
        with pytest.raises(BadRequest, match="header of .* bytes exceeds 1024"):
            client.generate([{"role": "user", "content": "x" * 2000}], max_new_tokens=4)
    finally:
        client.close()


def wait_for(condition, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.02)
    return False
