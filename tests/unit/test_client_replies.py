"""What a client does with whatever comes back on its socket: `read_reply` drops a message that names
no call and turns a malformed one for a call into an `internal` error reply, so a caller sees an
answer or a `QvlError`, never a `KeyError` or a dead reader. The peer here is a hostile frontend
(a real ROUTER socket in this test, standing in for a broken or foreign server)."""

import asyncio
import threading

import msgpack
import pytest
import zmq
from hypothesis import given
from hypothesis import strategies as st

from qvl.protocol import AsyncClient, Client, InternalError, QvlError
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


class HostileFrontend:
    """Answers each request with junk first, then: the first request a reply whose text is a
    number, every later one a good reply."""

    def __init__(self, endpoint: str):
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
                continue
            for junk in JUNK:
                self.sock.send_multipart([identity, junk])
            text = 5 if answered == 0 else "fine"
            self.sock.send_multipart([identity, msgpack.packb(
                {"kind": "reply", "id": request["id"], "ok": True, "text": text, "finish_reason": "stop"})])
            answered += 1

    def close(self):
        self.stopping.set()
        self.thread.join(5)
        self.sock.close(0)


@pytest.fixture
def frontend(tmp_path):
    endpoint = f"ipc://{tmp_path}/frontend"
    server = HostileFrontend(endpoint)
    yield endpoint
    server.close()
    assert not server.thread.is_alive()


@pytest.mark.timeout(30)
def test_a_blocking_client_reads_past_junk_and_raises_on_a_malformed_reply(frontend):
    with Client(frontend, timeout=5) as client:
        with pytest.raises(InternalError, match="malformed reply: wrong type of text"):
            client.generate(MESSAGES, max_new_tokens=4)
        assert client.generate(MESSAGES, max_new_tokens=4).text == "fine"


@pytest.mark.timeout(30)
def test_an_async_clients_reader_survives_junk_and_serves_the_next_call(frontend):
    async def run():
        async with AsyncClient(frontend, timeout=5) as client:
            with pytest.raises(InternalError, match="malformed reply"):
                await client.generate(MESSAGES, max_new_tokens=4)
            first = await client.generate(MESSAGES, max_new_tokens=4)
            chunks = [c async for c in client.stream(MESSAGES, max_new_tokens=4)]
            return first, chunks
    first, chunks = asyncio.run(run())
    assert isinstance(first, Result) and first.text == "fine"
    assert "".join(c.text for c in chunks) == "fine" and chunks[-1].done
