"""The gateway application in-process, with a fake supervisor client: wrong types in any field
answer 400, a fault of our own answers 500 `internal` and the next request is served, bodies over
the limit answer 413 however they arrive, and only whitelisted content reaches the supervisor."""

import json

import pytest
from starlette.testclient import TestClient

from qvl.protocol import Result
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
                           {"max_new_tokens": 4})]


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
