"""A client call is bounded by its timeout even when no supervisor can take its message (a
DEALER socket with no live connection would otherwise wait in `send` forever), and what cannot be
sent at all is refused before sending."""

import asyncio
import time

import pytest
import zmq

from qvl.protocol import AsyncClient, Client, RequestTimeout


@pytest.fixture
def refusing_endpoint(tmp_path):
    """A CURVE server that a plain client can never finish a handshake with."""
    server = zmq.Context.instance().socket(zmq.ROUTER)
    server.curve_publickey, server.curve_secretkey = zmq.curve_keypair()
    server.curve_server = True
    endpoint = f"ipc://{tmp_path}/server"
    server.bind(endpoint)
    yield endpoint
    server.close(0)


def test_sync_calls_time_out_when_nothing_can_take_them(refusing_endpoint):
    with Client(refusing_endpoint, timeout=0.5) as client:
        for _ in range(4):  # the first sends may queue on a pipe the failed handshake then drops
            started = time.monotonic()
            with pytest.raises(RequestTimeout):
                client.ping()
            assert time.monotonic() - started < 2


def test_async_calls_time_out_when_nothing_can_take_them(refusing_endpoint):
    async def calls():
        async with AsyncClient(refusing_endpoint, timeout=0.5) as client:
            for _ in range(4):
                started = time.monotonic()
                with pytest.raises(RequestTimeout):
                    await client.status()
                assert time.monotonic() - started < 2
    asyncio.run(asyncio.wait_for(calls(), 30))


def test_text_that_is_not_text_is_refused_before_it_is_sent(refusing_endpoint):
    """A lone UTF-16 surrogate cannot be written as UTF-8: `BadRequest` at once, not a codec error."""
    from qvl.protocol import BadRequest
    with Client(refusing_endpoint, timeout=5) as client:
        started = time.monotonic()
        with pytest.raises(BadRequest, match="surrogate"):
            client.generate([{"role": "user", "content": [{"type": "text", "text": "hi \ud800"}]}])
        assert time.monotonic() - started < 1  # refused before any wait for a reply
