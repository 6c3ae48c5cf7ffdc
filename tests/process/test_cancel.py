"""Cancellation with real processes: a cancelled request gets its one reply, `finish_reason`
"cancelled", whether it waited in the supervisor's queue, in the worker's, or was being generated;
a client that gives up cancels; the gateway cancels for an HTTP client that went away; a cancel
that names nothing is ignored; and a worker that dies holding a cancelled request does not get it
run again. Requests go over bare DEALER sockets where a test must see every message per id."""

import http.client
import io
import json
import os
import signal
import socket
import time

import msgpack
import pytest
import zmq

from harness import events, png, wait_for
from qvl.protocol import RequestTimeout
from qvl.protocol.codec import encode
from qvl.protocol.messages import Cancel, GenerationParams, build_generate

IMAGE = png((64, 48))


def messages(text: str = "Tell me about it.") -> list:
    return [{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": text}]}]


class Raw:
    """A bare DEALER: sends requests and cancels, and keeps every message it receives, per id."""

    def __init__(self, endpoint: str):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.got: dict[object, list[dict]] = {}

    def generate(self, rid: str, tokens: int, stream: bool = False) -> None:
        request = build_generate(rid, messages(), GenerationParams(max_new_tokens=tokens, min_new_tokens=tokens),
                                 stream=stream)
        self.sock.send_multipart(encode(request.header(), request.images))

    def cancel(self, rid: object) -> None:
        self.sock.send_multipart(encode(Cancel(rid).header()))

    def read(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0 and self.sock.poll(int(left * 1000) + 1):
            message = msgpack.unpackb(self.sock.recv_multipart()[0], raw=False)
            self.got.setdefault(message.get("id"), []).append(message)

    def replies(self, rid: object) -> list[dict]:
        return [m for m in self.got.get(rid, []) if m.get("kind") != "chunk"]

    def chunks(self, rid: object) -> list[str]:
        return [m["text"] for m in self.got.get(rid, []) if m.get("kind") == "chunk"]

    def reply(self, rid: object, timeout: float) -> dict | None:
        """The reply of `rid`, waiting at most `timeout` seconds for it."""
        end = time.monotonic() + timeout
        while not self.replies(rid) and time.monotonic() < end:
            self.read(min(0.05, end - time.monotonic()))
        return (self.replies(rid) or [None])[0]

    def close(self) -> None:
        self.sock.close(0)


def status_when(sup, check, timeout: float = 10.0) -> dict:
    def satisfied():
        status = client.status()
        return status if check(status) else None

    with sup.client() as client:
        found = wait_for(satisfied, timeout)
    assert found, f"status never satisfied the test\n{sup.log()[-3000:]}"
    return found


def assert_cancelled(reply: dict | None, text: str = "") -> None:
    assert reply is not None and reply["ok"] is True and reply["finish_reason"] == "cancelled", reply
    assert reply["text"] == text


def test_a_waiting_request_is_cancelled_at_once_and_others_are_unaffected(start_supervisor):
    """With two in flight per worker: `slow` runs, `on_worker` waits in the worker (other
    parameters, so another batch), `queued` waits in the supervisor. Both waiting ones are cancelled."""
    sup = start_supervisor("--max-inflight", "2", env={"QVL_FAULTS": "step_ms=50"})
    sup.wait_ready()
    raw = Raw(sup.endpoint)
    try:
        raw.generate("slow", 160)
        status_when(sup, lambda s: s["inflight"] == 1)
        raw.generate("on_worker", 8)
        raw.generate("queued", 8)
        status_when(sup, lambda s: s["inflight"] == 2 and s["queue_depth"] == 1)
        raw.cancel("queued")
        assert_cancelled(raw.reply("queued", timeout=5))
        raw.cancel("on_worker")
        assert_cancelled(raw.reply("on_worker", timeout=5))
        assert not raw.replies("slow")  # both answered while `slow` still runs
        slow = raw.reply("slow", timeout=60)
        assert slow["ok"] and slow["finish_reason"] == "length" and slow["usage"]["completion_tokens"] == 160
        raw.read(0.5)
        assert [len(raw.replies(r)) for r in ("slow", "on_worker", "queued")] == [1, 1, 1]
    finally:
        raw.close()
    counters = status_when(sup, lambda s: s["inflight"] == 0)["counters"]
    assert counters["cancelled"] == 2 and counters["answered"] == 1
    where = {e["key"]: e["where"] for e in events(sup.log(), "request_cancelled")}
    assert sorted(where.values()) == ["queued", "worker"]
    assert "event=cancelled key=" in sup.log() and "where=waiting" in sup.log()  # the worker's own log


def test_cancelling_a_stream_midway_gives_one_reply_that_extends_its_chunks(start_supervisor):
    sup = start_supervisor(env={"QVL_FAULTS": "step_ms=100"})
    sup.wait_ready()
    with sup.client(timeout=60) as client:
        whole = client.generate(messages(), max_new_tokens=60, min_new_tokens=60)
    assert whole.finish_reason == "length"
    raw = Raw(sup.endpoint)
    try:
        raw.generate("s", 60, stream=True)
        assert wait_for(lambda: raw.read(0.05) or len(raw.chunks("s")) >= 2, timeout=30)
        raw.cancel("s")
        reply = raw.reply("s", timeout=5)
        raw.read(1.0)  # a second reply would come by now
        assert len(raw.replies("s")) == 1
    finally:
        raw.close()
    streamed = "".join(raw.chunks("s"))
    assert reply["ok"] and reply["finish_reason"] == "cancelled"
    assert reply["text"].startswith(streamed) and whole.text.startswith(reply["text"])
    assert 0 < reply["usage"]["completion_tokens"] < 60 and len(reply["text"]) < len(whole.text)


def test_a_row_cancelled_after_its_stop_string_is_answered_cut_there(start_supervisor):
    """`a` and `b` share a batch; `a`'s stop string comes early, `b` runs on, so `a`'s row computes
    past its stop. Cancelled then, `a` is answered as it had ended: cut at the stop, "stop", never
    with the text after it (which the row went on making)."""
    sup = start_supervisor(env={"QVL_FAULTS": "step_ms=100"})
    sup.wait_ready()
    questions = {"a": "Tell me about it.", "b": "What colour is the middle?"}
    with sup.client(timeout=60) as client:
        whole = {k: client.generate(messages(q), max_new_tokens=60, min_new_tokens=60).text
                 for k, q in questions.items()}
    stop = next((whole["a"][i:i + 2] for i in range(4, 20) if whole["a"][i:i + 2] not in whole["b"]
                 and "\ufffd" not in whole["a"][i:i + 2]), None)
    assert stop, whole  # the tiny model's two answers differ early
    cut = whole["a"][:whole["a"].find(stop)]
    params = GenerationParams(max_new_tokens=60, min_new_tokens=60, stop=(stop,))
    raw = Raw(sup.endpoint)
    try:
        raw.generate("blocker", 8)  # while it runs, `a` and `b` wait in the worker for one batch
        status_when(sup, lambda s: s["inflight"] == 1)
        for rid, question in questions.items():
            request = build_generate(rid, messages(question), params, stream=True)
            raw.sock.send_multipart(encode(request.header(), request.images))
        assert wait_for(lambda: raw.read(0.05) or "".join(raw.chunks("a")) == cut and raw.chunks("b"), timeout=60)
        raw.read(0.6)  # a few more steps: `a`'s row is past its stop string now
        assert not raw.replies("a") and not raw.replies("b")
        raw.cancel("a")
        reply = raw.reply("a", timeout=5)
        assert not raw.replies("b")  # `b` still runs: `a` was answered by its cancel
        assert raw.reply("b", timeout=60)["finish_reason"] == "length"
    finally:
        raw.close()
    assert reply["ok"] and reply["text"] == cut and reply["finish_reason"] == "stop", (reply, cut)
    assert reply["usage"]["completion_tokens"] < 60


def test_a_sync_stream_cancelled_by_id_ends_with_a_cancelled_chunk(shared_supervisor):
    with shared_supervisor.client(timeout=30) as client:
        chunks = []
        for chunk in client.stream(messages(), max_new_tokens=400, min_new_tokens=400):
            chunks.append(chunk)
            if len(chunks) == 2:
                client.cancel(chunk.id)
    assert chunks[-1].done and chunks[-1].finish_reason == "cancelled"
    assert chunks[-1].usage["completion_tokens"] < 400


def test_a_client_that_times_out_cancels_and_its_worker_lets_go(start_supervisor):
    sup = start_supervisor(env={"QVL_FAULTS": "step_ms=100"})
    sup.wait_ready()
    with sup.client(timeout=0.8) as client:
        with pytest.raises(RequestTimeout):
            client.generate(messages(), max_new_tokens=200, min_new_tokens=200)  # 5 s of steps at least
    status = status_when(sup, lambda s: s["inflight"] == 0 and s["counters"].get("cancelled") == 1, timeout=30)
    assert "answered" not in status["counters"]  # it was let go, not run to its end
    assert [e["where"] for e in events(sup.log(), "request_cancelled")] == ["worker"]
    assert "where=running" in sup.log()  # the worker answered it at its next step


def test_cancels_that_name_nothing_are_ignored(shared_supervisor):
    raw = Raw(shared_supervisor.endpoint)
    try:
        raw.cancel("never-sent")
        raw.cancel(12345)
        raw.generate("done", 2)
        assert raw.reply("done", timeout=30)["finish_reason"] in ("stop", "length")
        raw.cancel("done")  # answered already
        raw.read(0.5)
        assert set(raw.got) == {"done"} and len(raw.replies("done")) == 1  # no reply to any cancel
        raw.sock.send_multipart([msgpack.packb({"v": 1, "kind": "cancel"})])  # no id: malformed
        raw.read(2.0)
        assert raw.got[None][0]["error"]["code"] == "bad_request"
        raw.generate("after", 2)
        assert raw.reply("after", timeout=30)["ok"]
    finally:
        raw.close()
    other = Raw(shared_supervisor.endpoint)  # another client cannot cancel this one's request
    mine = Raw(shared_supervisor.endpoint)
    try:
        mine.generate("x", 8)
        other.cancel("x")
        assert mine.reply("x", timeout=30)["finish_reason"] != "cancelled"
    finally:
        other.close()
        mine.close()


def test_a_worker_dying_with_a_cancelled_request_answers_it_cancelled_not_retried(start_supervisor):
    sup = start_supervisor(env={"QVL_FAULTS": "hang_at=1,generation=1"})  # never reads the cancel
    sup.wait_ready()
    raw = Raw(sup.endpoint)
    try:
        raw.generate("h", 8)
        status = status_when(sup, lambda s: s["inflight"] == 1)
        # an idle worker takes a request within milliseconds; a cancel that came with it would
        # find it still waiting and answer it there, which is not what this test is about
        time.sleep(1.0)
        raw.cancel("h")
        assert wait_for(lambda: events(sup.log(), "request_cancelled"), timeout=5)
        raw.read(0.3)
        assert not raw.replies("h")  # the worker holds it
        os.kill(status["workers"][0]["pid"], signal.SIGKILL)
        assert_cancelled(raw.reply("h", timeout=10))
        raw.read(1.0)
        assert len(raw.replies("h")) == 1
    finally:
        raw.close()
    status = status_when(sup, lambda s: s["workers"][0]["state"] == "ready", timeout=60)
    assert status["counters"].get("retried", 0) == 0 and status["counters"]["cancelled"] == 1
    with sup.client() as client:  # the replacement serves
        assert client.generate(messages(), max_new_tokens=2).worker["generation"] == 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_gateway_cancels_for_an_http_client_that_goes_away(start_supervisor):
    port = free_port()
    sup = start_supervisor("--http", f"127.0.0.1:{port}", env={"QVL_FAULTS": "step_ms=100"})
    sup.wait_ready()
    assert wait_for(lambda: _health(port) == 200, timeout=30)
    sup.remember_workers()  # the gateway too: it must be gone after the stop
    body = {"messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": 300}
    for n, stream in enumerate((False, True), start=1):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": stream}),
                     {"Content-Type": "application/json"})
        status_when(sup, lambda s: s["inflight"] == 1)
        if stream:
            response = conn.getresponse()
            assert response.status == 200 and response.read(6) == b"data: "  # the first event came
        time.sleep(0.5)
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        status_when(sup, lambda s, n=n: s["inflight"] == 0 and s["counters"].get("cancelled") == n, timeout=10)


def _health(port: int) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status
    except OSError:
        return 0
    finally:
        conn.close()


@pytest.mark.timeout(120)
def test_a_request_cancelled_while_an_earlier_part_of_its_batch_runs_never_starts(start_supervisor, tiny_model):
    """Four requests make one batch, split in two parts by `prefill_tokens`; the last is cancelled
    while the first part runs: it is answered cancelled with no tokens before its part runs, and
    the other three are answered as usual."""
    from PIL import Image as PILImage
    from qvl.protocol.contract import ModelOptions
    from qvl.worker.engine import Engine

    params = GenerationParams(max_new_tokens=4, min_new_tokens=4)
    engine_messages = [{"role": "user", "content": [{"type": "image", "frame": 0},
                                                    {"type": "text", "text": "Tell me about it."}]}]
    length = len(Engine(ModelOptions(str(tiny_model), "cpu")).prepare(
        engine_messages, [PILImage.open(io.BytesIO(IMAGE)).convert("RGB")], params).ids)
    sup = start_supervisor("--prefill-tokens", str(3 * length), "--max-batch-size", "4",
                           env={"QVL_FAULTS": "slow_ms=700"})
    sup.wait_ready()
    raw = Raw(sup.endpoint)
    try:
        raw.generate("first", 4)
        time.sleep(0.2)  # the worker is in the first request's generate
        for rid in "abcd":
            raw.generate(rid, 4)
        raw.reply("first", 30)
        time.sleep(0.3)  # the batch's first part, a and b, runs
        raw.cancel("d")
        for rid in "abcd":
            assert raw.reply(rid, 30) is not None, rid
    finally:
        raw.close()
    cancelled = raw.replies("d")[0]
    assert cancelled["finish_reason"] == "cancelled" and cancelled["usage"]["completion_tokens"] == 0, cancelled
    assert [raw.replies(rid)[0]["finish_reason"] for rid in "abc"] == ["length"] * 3
