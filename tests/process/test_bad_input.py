"""Bad input gets a typed error and the service keeps answering."""

import msgpack
import pytest
import zmq

from harness import png
from qvl.protocol import BadRequest, Client, UnsupportedVersion
from qvl.protocol.codec import PROTOCOL_VERSION

GOOD = [{"role": "user", "content": [{"type": "image", "image": png()},
                                      {"type": "text", "text": "What is this?"}]}]


def raw_call(endpoint, parts, timeout_ms=10_000):
    """Send hand-made frames on a bare socket, as a client that skips the library would."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        sock.send_multipart(parts)
        assert sock.poll(timeout_ms), "no reply"
        return msgpack.unpackb(sock.recv_multipart()[0], raw=False)
    finally:
        sock.close()


def assert_still_serving(client):
    assert client.generate(GOOD, max_new_tokens=3).usage["completion_tokens"] >= 1


def test_corrupt_image(shared_supervisor):
    corrupt = bytearray(png((64, 64)))
    corrupt[40:] = b"\x00" * (len(corrupt) - 40)  # a PNG header over zeroed image data
    with Client(shared_supervisor.endpoint, timeout=30) as client:
        with pytest.raises(BadRequest, match="could not be read"):
            client.ask(bytes(corrupt), "What is this?")
        with pytest.raises(BadRequest, match="could not be read"):
            client.ask(b"GIF89a not really", "What is this?")
        assert_still_serving(client)


def test_corrupt_image_fails_only_its_own_request_in_a_batch(shared_supervisor):
    import asyncio
    from qvl.protocol import AsyncClient

    async def run():
        async with AsyncClient(shared_supervisor.endpoint, timeout=30) as c:
            return await asyncio.gather(
                *(c.ask(png(), "fine", max_new_tokens=4) for _ in range(3)),
                c.ask(b"\x89PNG\r\n\x1a\nbroken", "bad", max_new_tokens=4),
                return_exceptions=True)

    results = asyncio.run(run())
    assert [type(r).__name__ for r in results] == ["Result", "Result", "Result", "BadRequest"]


def test_image_over_the_pixel_limit(start_supervisor):
    sup = start_supervisor("--max-image-pixels", "1000")
    sup.wait_ready()
    with sup.client() as client:
        with pytest.raises(BadRequest, match="exceeds 1000"):
            client.ask(png((100, 100)), "big")
        assert client.ask(png((20, 20)), "small", max_new_tokens=2).text is not None


def test_empty_message_list(shared_supervisor):
    with Client(shared_supervisor.endpoint, timeout=30) as client:
        with pytest.raises(BadRequest, match="non-empty list"):
            client.generate([], max_new_tokens=4)
        assert_still_serving(client)


def test_unsupported_version(shared_supervisor):
    reply = raw_call(shared_supervisor.endpoint,
                     [msgpack.packb({"v": 99, "kind": "generate", "id": "old-1", "messages": []})])
    assert reply["ok"] is False and reply["id"] == "old-1"
    assert reply["error"]["code"] == UnsupportedVersion.code
    with Client(shared_supervisor.endpoint, timeout=30) as client:
        assert_still_serving(client)


def test_oversized_frame(shared_supervisor):
    """A frame over max_image_bytes (20 MiB by default) is read and refused with bad_request."""
    header = {"v": PROTOCOL_VERSION, "kind": "generate", "id": "big-1", "params": {},
              "messages": [{"role": "user", "content": [{"type": "image", "frame": 0}]}]}
    reply = raw_call(shared_supervisor.endpoint, [msgpack.packb(header), b"\xff" * (21 << 20)])
    assert reply["ok"] is False and reply["id"] == "big-1"
    assert reply["error"]["code"] == "bad_request" and "exceeds" in reply["error"]["message"]
    with Client(shared_supervisor.endpoint, timeout=30) as client:
        assert_still_serving(client)


@pytest.mark.parametrize("parts, code", [
    ([b"\xc1garbage"], "bad_request"),
    ([msgpack.packb({"v": PROTOCOL_VERSION, "kind": "teleport", "id": 7})], "bad_request"),
    ([msgpack.packb({"v": PROTOCOL_VERSION, "kind": "generate", "id": 8, "messages": "hi"})],
     "bad_request"),
])
def test_malformed_messages(shared_supervisor, parts, code):
    reply = raw_call(shared_supervisor.endpoint, parts)
    assert reply["ok"] is False and reply["error"]["code"] == code


def test_client_refuses_bad_parameters_before_sending(shared_supervisor):
    with Client(shared_supervisor.endpoint, timeout=30) as client:
        with pytest.raises(BadRequest, match="max_new_tokens"):
            client.generate(GOOD, max_new_tokens=0)
        with pytest.raises(BadRequest, match="unknown generation parameters"):
            client.generate(GOOD, beams=4)
