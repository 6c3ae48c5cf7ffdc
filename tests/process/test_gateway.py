"""The HTTP gateway as users meet it: the `openai` package unchanged, the simple ask form, API
keys, status codes, `/health` and `/metrics` scraped while a recycle happens."""

import base64
import json
import socket
import threading
import urllib.error
import urllib.request
import uuid

import openai
import pytest

from harness import events, png, wait_for

KEY = "test-key-1234"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, key: str | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except urllib.error.URLError as exc:  # not listening yet
        return 0, str(exc)


def post(url: str, body: bytes, content_type: str, key: str | None = KEY) -> tuple[int, dict]:
    headers = {"Content-Type": content_type, **({"Authorization": f"Bearer {key}"} if key else {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, body, headers), timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def data_url(image: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(image).decode()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, tiny_model):
    from conftest import _stop_and_check
    from harness import SupervisorProcess

    run_dir = tmp_path_factory.mktemp("gateway")
    (run_dir / "key").write_text(KEY + "\n")
    port = free_port()
    sup = SupervisorProcess(run_dir / "sup", tiny_model, "--http", f"127.0.0.1:{port}",
                            "--http-api-key-file", str(run_dir / "key"))
    sup.wait_ready()
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: get(base + "/health")[0] == 200, timeout=30)
    sup.remember_workers()  # the gateway process too: it must be gone after the stop
    yield sup, base
    _stop_and_check(sup)


def chat(image: bytes) -> list:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                         {"type": "text", "text": "What is in the picture?"}]}]


def test_openai_package_gets_a_completion_and_a_stream(gateway):
    _, base = gateway
    client = openai.OpenAI(base_url=base + "/v1", api_key=KEY)
    image = png((80, 60), (10, 120, 200))
    done = client.chat.completions.create(model="qvl", messages=chat(image), max_tokens=16, temperature=0)
    assert done.choices[0].message.role == "assistant"
    assert done.usage.completion_tokens >= 1 and done.usage.prompt_tokens > 10
    pieces = list(client.chat.completions.create(model="qvl", messages=chat(image), max_tokens=16,
                                                 temperature=0, stream=True))
    text = "".join(p.choices[0].delta.content or "" for p in pieces if p.choices)
    assert text == done.choices[0].message.content
    assert pieces[-1].choices[0].finish_reason in ("stop", "length")


def test_wrong_or_missing_key_is_refused(gateway):
    _, base = gateway
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="wrong").chat.completions.create(
            model="qvl", messages=chat(png()), max_tokens=4)
    assert get(base + "/api/status")[0] == 401
    assert get(base + "/api/status", KEY)[0] == 200


def test_errors_carry_matching_status_codes(gateway):
    _, base = gateway
    remote = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://example.com/a.png"}}]}]
    status, body = post(base + "/v1/chat/completions", json.dumps({"messages": remote}).encode(), "application/json")
    assert status == 400 and body["error"]["code"] == "bad_request" and "refused" in body["error"]["message"]
    status, body = post(base + "/v1/chat/completions", b"{not json", "application/json")
    assert status == 400
    broken = chat(b"not an image at all")
    status, body = post(base + "/v1/chat/completions", json.dumps({"messages": broken}).encode(), "application/json")
    assert status == 400 and body["error"]["code"] == "bad_request"


def test_simple_ask_form(gateway):
    _, base = gateway
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"question\"\r\n\r\nWhat is it?\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"max_new_tokens\"\r\n\r\n6\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + png() + f"\r\n--{boundary}--\r\n".encode()
    status, answer = post(base + "/api/ask", body, f"multipart/form-data; boundary={boundary}")
    assert status == 200 and isinstance(answer["answer"], str)
    assert 1 <= answer["usage"]["completion_tokens"] <= 6 and answer["worker"]["pid"] > 0


def test_metrics_show_a_recycle_under_load(gateway):
    sup, base = gateway
    stop, answered = threading.Event(), []

    def load():
        with sup.client() as c:
            while not stop.is_set():
                answered.append(c.ask(png(), "Go on.", max_new_tokens=4))

    thread = threading.Thread(target=load)
    thread.start()
    try:
        wait_for(lambda: len(answered) >= 3, timeout=30)
        with sup.client() as c:
            assert c.recycle()["recycling"] == [0]
        wait_for(lambda: events(sup.log(), "recycle_done"), timeout=60)
        wait_for(lambda: get(base + "/health")[0] == 200, timeout=30)
        before = len(answered)
        wait_for(lambda: len(answered) >= before + 3, timeout=30)
        seen = len(answered)
        status, text = get(base + "/metrics")  # scraped while the load goes on
    finally:
        stop.set()
        thread.join(30)
    sup.remember_workers()
    assert status == 200
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(lines['qvl_recycles_total{reason="operator"}']) == 1
    assert float(lines["qvl_request_latency_seconds_count"]) >= seen
    assert float(lines['qvl_request_latency_seconds_bucket{le="+Inf"}']) == float(lines["qvl_request_latency_seconds_count"])
    assert float(lines['qvl_requests_total{outcome="answered"}']) >= seen
    assert float(lines['qvl_worker_ready{slot="0"}']) == 1


def test_health_is_503_while_no_worker_is_ready(start_supervisor):
    port = free_port()
    sup = start_supervisor("--http", f"127.0.0.1:{port}", "--restart-intensity", "1",
                           env={"QVL_FAULTS": "crash_at_start=1"})
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: get(base + "/health")[0] in (200, 503), timeout=30)
    status, body = get(base + "/health")
    assert status == 503 and json.loads(body)["ready_workers"] == 0
    wait_for(lambda: events(sup.log(), "slot_failed"), timeout=30)
    status, body = post(base + "/v1/chat/completions", json.dumps({"messages": chat(png())}).encode(),
                        "application/json", key=None)
    assert status == 503 and body["error"]["code"] == "worker_failed"
    sup.remember_workers()


def test_a_full_queue_answers_429(start_supervisor):
    port = free_port()
    sup = start_supervisor("--http", f"127.0.0.1:{port}", "--queue-size", "1", "--max-inflight", "1",
                           env={"QVL_FAULTS": "slow_ms=1500"})
    sup.wait_ready()
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: get(base + "/health")[0] == 200, timeout=30)
    body = json.dumps({"messages": chat(png()), "max_tokens": 2}).encode()
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        post(base + "/v1/chat/completions", body, "application/json", key=None))) for _ in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    codes = sorted(status for status, _ in results)
    assert len(codes) == 5 and 200 in codes and 429 in codes, codes
    assert all(b["error"]["code"] == "overloaded" for status, b in results if status == 429)
    sup.remember_workers()


def readme_block(containing: str) -> str:
    """The README's python example that contains `containing`: the tests run what users copy."""
    from harness import ROOT

    blocks = (ROOT / "README.md").read_text().split("```python\n")[1:]
    return next(b.split("```")[0] for b in blocks if containing in b)


def test_readme_openai_example_runs(gateway, tmp_path, capsys, monkeypatch):
    _, base = gateway
    (tmp_path / "photo.jpg").write_bytes(png())
    code = readme_block("openai.OpenAI(").replace("http://127.0.0.1:8000", base) \
        .replace("my-secret-key", KEY).replace("max_tokens=64", "max_tokens=8")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    assert "completion_tokens=" in capsys.readouterr().out


def test_readme_streaming_example_runs(shared_supervisor, tmp_path, capsys, monkeypatch):
    (tmp_path / "photo.jpg").write_bytes(png())
    code = readme_block("client.stream(").replace("tcp://127.0.0.1:5555", shared_supervisor.endpoint) \
        .replace("max_new_tokens=64", "max_new_tokens=12")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "'completion_tokens': " in out and "'decode_ms': " in out
