"""The worker decodes with exactly the supervisor's limits, and nothing a worker sends can end
the supervisor: each shown through real processes."""

import msgpack
import zmq

from harness import events, png
from qvl.protocol.codec import PROTOCOL_VERSION


def test_limits_above_the_defaults_reach_the_worker(start_supervisor):
    """With `max_images` and `max_image_bytes` above the protocol's defaults, a request using them
    is answered by the first worker (before, the worker decoded with the defaults and crashed)."""
    sup = start_supervisor("--max-images", "20", "--max-image-bytes", str(24 << 20),
                           "--max-request-bytes", str(64 << 20))
    sup.wait_ready()
    big = png((8, 8)) + b"\0" * (21 << 20)  # a valid PNG with trailing bytes: over 20 MiB
    content = [{"type": "image", "image": png((16, 16))} for _ in range(18)]
    with sup.client(timeout=120) as client:
        pid = client.status()["workers"][0]["pid"]
        result = client.generate([{"role": "user", "content": [*content, {"type": "text", "text": "how many?"}]}],
                                 max_new_tokens=2)
        assert result.worker["pid"] == pid
        assert client.ask(big, "and this?", max_new_tokens=2).worker["pid"] == pid
        assert client.status()["workers"][0]["restarts"] == 0


def test_a_header_that_would_grow_past_the_limit_is_refused_at_the_door(shared_supervisor):
    """A header just under the frontend's limit that would exceed it once forwarded to a worker
    is refused with `bad_request`; no worker sees it."""
    def header(chars: int) -> dict:  # string contents grow into text parts when forwarded
        return {"v": PROTOCOL_VERSION, "kind": "generate", "id": "edge",
                "messages": [{"role": "user", "content": "t" * chars}] * 64}
    chars = 16_000
    while len(msgpack.packb(header(chars + 1))) < (1 << 20) - 100:
        chars += 1
    assert len(msgpack.packb(header(chars))) < 1 << 20
    with shared_supervisor.client() as client:
        before = [(w["pid"], w["generation"]) for w in client.status()["workers"]]
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(shared_supervisor.endpoint)
    try:
        sock.send(msgpack.packb(header(chars)))
        assert sock.poll(30_000)
        reply = msgpack.unpackb(sock.recv(), raw=False)
    finally:
        sock.close()
    assert reply["ok"] is False and reply["id"] == "edge"
    assert reply["error"]["code"] == "bad_request" and "as forwarded" in reply["error"]["message"]
    with shared_supervisor.client() as client:
        assert [(w["pid"], w["generation"]) for w in client.status()["workers"]] == before


def test_malformed_worker_messages_are_dropped_and_the_supervisor_serves_on(start_supervisor):
    sup = start_supervisor(env={"QVL_FAULTS": "garble_at=1"})
    sup.wait_ready()
    with sup.client() as client:
        assert client.ask(png(), "first", max_new_tokens=2).usage["completion_tokens"] >= 1
        assert client.ask(png(), "second", max_new_tokens=2).usage["completion_tokens"] >= 1
        status = client.status()
    assert sup.proc.poll() is None
    assert status["counters"]["worker_bad_messages"] == 4
    assert status["workers"][0]["restarts"] == 0
    assert len(events(sup.log(), "worker_bad_message")) == 4
