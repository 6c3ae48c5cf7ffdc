"""The gateway application in-process, with a fake supervisor client: wrong types in any field
answer 400, a fault of our own answers 500 `internal` and the next request is served, bodies over
the limit answer 413 however they arrive, a body that stalls answers 408 at its deadline while
`/health` is answered however busy the gateway is, and only whitelisted content reaches the
supervisor."""

import asyncio
import json
import time
from dataclasses import replace

import pytest
from starlette.testclient import TestClient

from qvl.protocol import Chunk, Result
from qvl.protocol.codec import Limits
from qvl.supervisor.gateway import create_app
from qvl.supervisor.gateway_process import GatewaySpec

SPEC = GatewaySpec("ipc:///nowhere", max_body_bytes=4096, limits=Limits(max_images=2, max_new_tokens=64))
HELLO = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


class FakeSupervisor:
    """Stands in for `AsyncClient`: records what it was asked; `fault` makes the next call raise it."""

    def __init__(self):
        self.asked: list = []
        self.fault: Exception | None = None

    async def generate(self, messages, **params):
        self.asked.append((messages, params))
        if self.fault:
            fault, self.fault = self.fault, None
            raise fault
        return Result("r1", "an answer", {"prompt_tokens": 5, "completion_tokens": 2})

    async def status(self, timeout=None):
        raise RuntimeError("status is not faked")

    async def close(self):
        pass


@pytest.fixture
def gateway():
    fake = FakeSupervisor()
    with TestClient(create_app(SPEC, api_key="k", client=fake), raise_server_exceptions=False,
                    headers={"Authorization": "Bearer k"}) as client:
        yield client, fake


def post(client, body, **kwargs):
    content = json.dumps(body) if isinstance(body, dict) else body
    return client.post("/v1/chat/completions", content=content,
                       headers={"Content-Type": "application/json"}, **kwargs)


def test_a_valid_request_is_answered_with_only_text_reaching_the_supervisor(gateway):
    client, fake = gateway
    response = post(client, HELLO)
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == "an answer"
    assert fake.asked == [([{"role": "user", "content": [{"type": "text", "text": "hello"}]}],
                           {"max_new_tokens": 4, "temperature": 1.0})]  # OpenAI's default temperature


@pytest.mark.parametrize("body", [
    b"{not json", b"", b"\xff", b"[1, 2]", b'"messages"', b"null",
    b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}',
    {"messages": {"role": "user"}},
    {**HELLO, "max_tokens": "10"},
    {**HELLO, "temperature": {}},
    {**HELLO, "top_p": [1]},
    {**HELLO, "stream": "true"},
    {**HELLO, "stream_options": "yes"},
    {**HELLO, "model": {"name": "x"}},
    {"messages": [{"role": "user", "content": [{"type": "image", "image": "/etc/passwd"}]}]},
    {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "/etc/passwd"}}]}]},
])
def test_wrong_types_in_any_field_answer_400(gateway, body):
    client, fake = gateway
    response = post(client, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "bad_request"
    assert fake.asked == []


def test_our_own_fault_answers_500_internal_and_the_server_goes_on(gateway):
    client, fake = gateway
    fake.fault = RuntimeError("a bug of ours")
    response = post(client, HELLO)
    assert response.status_code == 500 and response.json()["error"]["code"] == "internal"
    assert "a bug of ours" not in response.text
    assert client.get("/health").status_code == 500  # the status fake raises too
    assert post(client, HELLO).status_code == 200


def test_a_body_over_the_limit_answers_413_declared_or_streamed(gateway):
    client, fake = gateway
    big = json.dumps({**HELLO, "padding": "x" * 5000}).encode()
    assert post(client, big).status_code == 413

    def chunks():  # no Content-Length: counted as it arrives
        yield big[:3000]
        yield big[3000:]

    response = post(client, chunks())
    assert response.status_code == 413 and response.json()["error"]["code"] == "bad_request"
    assert fake.asked == []
    assert post(client, HELLO).status_code == 200


def test_without_the_key_nothing_is_read(gateway):
    client, fake = gateway
    response = client.post("/v1/chat/completions", content=json.dumps(HELLO), headers={"Authorization": ""})
    assert response.status_code == 401 and fake.asked == []


def test_an_ask_form_with_a_wrong_field_answers_400(gateway):
    client, _ = gateway
    response = client.post("/api/ask", data={"question": "q", "max_new_tokens": "many"},
                           files={"image": ("a.png", b"png")})
    assert response.status_code == 400 and response.json()["error"]["code"] == "bad_request"


class ServingSupervisor(FakeSupervisor):
    """A ready supervisor whose stream pauses `pause_s` between its two chunks."""

    pause_s = 0.0

    async def status(self, timeout=None):
        return {"workers": [{"state": "ready"}], "shutting_down": False}

    async def stream(self, messages, **params):
        yield Chunk("r1", "an ")
        await asyncio.sleep(self.pause_s)
        yield Chunk("r1", "answer", done=True, usage={"prompt_tokens": 5, "completion_tokens": 2})


async def asgi(app, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
    """One request into the ASGI app as uvicorn hands it over (ASGI 2.3); the status and body.
    `None` declares a body and never sends it, as a stalled client does; after a body, `receive`
    waits, as uvicorn's does until the client disconnects."""
    pending = [] if body is None else [{"type": "http.request", "body": body, "more_body": False}]

    async def receive():
        if pending:
            return pending.pop()
        await asyncio.Event().wait()

    sent = []

    async def send(message):
        sent.append(message)

    headers = [(b"authorization", b"Bearer k"), (b"content-type", b"application/json"),
               (b"content-length", str(100 if body is None else len(body)).encode())]
    await app({"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
               "method": method, "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
               "root_path": "", "headers": headers, "server": ("gateway", 80), "client": ("client", 1)},
              receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def test_stalled_bodies_end_in_408_and_never_keep_health_from_answering():
    """Two clients send headers and never the body, at a limit of two in flight: a third request
    gets 429, `/health` is answered, and the stalled ones end with 408 at the body deadline."""
    app = create_app(replace(SPEC, max_concurrent=2), api_key="k", client=ServingSupervisor(), body_timeout_s=0.5)
    chat = "/v1/chat/completions"

    async def scenario():
        stalled = [asyncio.create_task(asgi(app, "POST", chat, None)) for _ in range(2)]
        await asyncio.sleep(0.1)
        assert (await asgi(app, "POST", chat, json.dumps(HELLO).encode()))[0] == 429
        assert (await asgi(app, "GET", "/health", b""))[0] == 200
        assert [status for status, _ in await asyncio.gather(*stalled)] == [408, 408]
        assert (await asgi(app, "POST", chat, json.dumps(HELLO).encode()))[0] == 200

    start = time.monotonic()
    asyncio.run(asyncio.wait_for(scenario(), 10))
    assert time.monotonic() - start < 2.0


def test_a_stream_may_outlast_the_body_deadline():
    """The deadline bounds receiving the body, not the wait for a disconnect while the answer streams."""
    fake = ServingSupervisor()
    fake.pause_s = 1.0
    app = create_app(SPEC, api_key="k", client=fake, body_timeout_s=0.3)
    request = json.dumps({**HELLO, "stream": True}).encode()
    status, text = asyncio.run(asyncio.wait_for(asgi(app, "POST", "/v1/chat/completions", request), 10))
    assert status == 200 and b'"content": "answer"' in text and text.endswith(b"data: [DONE]\n\n")
