"""A client call given up on sends `cancel` for its request: a timeout, a cancelled task, a stream
closed before its end. A call answered in full sends none. Against a bare ROUTER on a thread of its
own that records what it is sent: it answers a stream with one chunk, and a request whose text is
"finish" with its reply; every other request, never."""

import asyncio
import threading
import time

import msgpack
import pytest
import zmq

from qvl.protocol import AsyncClient, Client, RequestTimeout

WAIT = [{"role": "user", "content": "wait"}]
FINISH = [{"role": "user", "content": "finish"}]


class FakeSupervisor(threading.Thread):
    def __init__(self, endpoint: str):
        super().__init__(daemon=True)
        self.endpoint = endpoint
        self.seen: list[dict] = []
        self.stopped = threading.Event()
        self.bound = threading.Event()

    def run(self) -> None:
        sock = zmq.Context.instance().socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(self.endpoint)
        self.bound.set()
        while not self.stopped.is_set():
            if not sock.poll(20):
                continue
            peer, raw, *_ = sock.recv_multipart()
            header = msgpack.unpackb(raw, raw=False)
            self.seen.append(header)
            for reply in self.answers(header):
                sock.send_multipart([peer, msgpack.packb({"v": 1, "id": header["id"], "ok": True, **reply})])
        sock.close(0)

    @staticmethod
    def answers(header: dict) -> list[dict]:
        if header["kind"] != "generate":
            return []
        if header["messages"][0]["content"] == "finish":
            return [{"kind": "reply", "text": "done", "usage": {}, "timings": {}, "finish_reason": "length"}]
        return [{"kind": "chunk", "text": "a"}] if header.get("stream") else []

    def kinds(self, settle: float = 0.3) -> list[str]:
        time.sleep(settle)  # any late message has arrived by then
        return [h["kind"] for h in self.seen]

    def cancels_name_their_requests(self) -> bool:
        """Each cancel but the explicit one names a request the client sent."""
        generated = [h["id"] for h in self.seen if h["kind"] == "generate"]
        return all(h["id"] in generated for h in self.seen if h["kind"] == "cancel" and h["id"] != "abc")


@pytest.fixture
def server(tmp_path):
    fake = FakeSupervisor(f"ipc://{tmp_path}/frontend")
    fake.start()
    fake.bound.wait(5)
    yield fake
    fake.stopped.set()
    fake.join(5)


def test_sync_calls_given_up_on_cancel_their_requests(server):
    with Client(server.endpoint, timeout=0.3) as client:
        with pytest.raises(RequestTimeout):
            client.generate(WAIT)
        stream = client.stream(WAIT, timeout=5)
        assert next(stream).text == "a"
        stream.close()
        for _ in client.stream(WAIT, timeout=5):
            break  # the generator is collected at once: closed
        assert client.generate(FINISH).finish_reason == "length"
        assert [c.finish_reason for c in client.stream(FINISH)] == ["length"]
        client.cancel("abc")
    assert server.kinds() == ["generate", "cancel", "generate", "cancel", "generate", "cancel",
                              "generate", "generate", "cancel"]
    assert server.seen[-1]["id"] == "abc" and server.cancels_name_their_requests()


def test_async_calls_given_up_on_cancel_their_requests(server):
    async def calls():
        async with AsyncClient(server.endpoint, timeout=0.3) as client:
            with pytest.raises(RequestTimeout):
                await client.generate(WAIT)
            task = asyncio.ensure_future(client.generate(WAIT, timeout=30))
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            stream = client.stream(WAIT, timeout=5)
            assert (await anext(stream)).text == "a"
            await stream.aclose()
            assert (await client.generate(FINISH)).finish_reason == "length"
            assert [c.finish_reason async for c in client.stream(FINISH)] == ["length"]
            await client.cancel("abc")
            await asyncio.sleep(0.1)

    asyncio.run(asyncio.wait_for(calls(), 30))
    assert server.kinds() == ["generate", "cancel", "generate", "cancel", "generate", "cancel",
                              "generate", "generate", "cancel"]
    assert server.cancels_name_their_requests()
