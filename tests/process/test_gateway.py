"""The HTTP gateway as users meet it: the `openai` package unchanged, the simple ask form, API
keys, status codes, `/health` and `/metrics` scraped while a recycle happens; and as an attacker
meets it: file paths, big bodies, many images, private image URLs, too many requests at once, and
a gateway killed outright, which the supervisor restarts."""

import base64
import http.server
import json
import os
import signal
import socket
import subprocess
import threading
import urllib.error
import urllib.request
import uuid

import openai
import pytest

from harness import a_stop_string, alive, events, png, wait_for, wait_gone

KEY = "test-key-1234"
MAX_BODY, MAX_IMAGES, MAX_IMAGE_BYTES = 1_000_000, 4, 100_000


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
    except (urllib.error.URLError, ConnectionError) as exc:  # not listening yet, or gone mid-answer
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
                            "--http-api-key-file", str(run_dir / "key"), "--http-max-body-bytes", str(MAX_BODY),
                            "--max-images", str(MAX_IMAGES), "--max-image-bytes", str(MAX_IMAGE_BYTES))
    sup.wait_ready()
    base = f"http://127.0.0.1:{port}"
    wait_for(lambda: get(base + "/health")[0] == 200, timeout=30)
    sup.remember_workers()  # the gateway process too: it must be gone after the stop
    yield sup, base
    _stop_and_check(sup)


def chat(image: bytes) -> list:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(image)}},
                                         {"type": "text", "text": "What is in the picture?"}]}]


def completion(base: str, *parts: dict, key: str | None = KEY) -> tuple[int, dict]:
    body = {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": "What is it?"}]}],
            "max_tokens": 2}
    return post(base + "/v1/chat/completions", json.dumps(body).encode(), "application/json", key)


def image_url(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


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


def test_stop_seed_and_n_through_the_openai_package(gateway):
    _, base = gateway
    client = openai.OpenAI(base_url=base + "/v1", api_key=KEY)
    messages = chat(png((72, 56), (90, 20, 160)))
    whole = client.chat.completions.create(model="qvl", messages=messages, max_completion_tokens=16,
                                           temperature=0).choices[0].message.content
    stop = a_stop_string(whole)
    expected = whole[:whole.find(stop)]
    cut = client.chat.completions.create(model="qvl", messages=messages, max_completion_tokens=16,
                                         temperature=0, stop=stop)
    assert cut.choices[0].message.content == expected
    pieces = list(client.chat.completions.create(model="qvl", messages=messages, max_completion_tokens=16,
                                                 temperature=0, stop=[stop], stream=True))
    assert "".join(p.choices[0].delta.content or "" for p in pieces if p.choices) == expected
    # no temperature: OpenAI's default 1.0 samples, and the seed makes it repeat
    seeded = [client.chat.completions.create(model="qvl", messages=messages, max_completion_tokens=16,
                                             seed=seed).choices[0].message.content for seed in (7, 7, 8)]
    assert seeded[0] == seeded[1] != seeded[2]
    with pytest.raises(openai.BadRequestError, match="`n` must be 1"):
        client.chat.completions.create(model="qvl", messages=messages, max_completion_tokens=4, n=2)
    with pytest.raises(openai.BadRequestError, match="at most 4"):
        client.chat.completions.create(model="qvl", messages=messages, max_completion_tokens=4,
                                       stop=["a", "b", "c", "d", "e"])


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
    lone = [{"messages": [{"role": "user", "content": "hi \ud800"}]},
            {"messages": [{"role": "user", "content": "hi"}], "stop": ["\udfff"]},
            {"messages": [{"role": "user", "content": "hi"}], "model": "\ud800", "max_tokens": 2}]
    for case in lone:  # JSON escapes half a UTF-16 pair: no text the model or the reply can carry
        status, body = post(base + "/v1/chat/completions", json.dumps(case).encode(), "application/json")
        assert status == 400 and "surrogate" in body["error"]["message"], (case, body)
    pair = {"messages": [{"role": "user", "content": "hi \ud83d\ude00"}], "max_tokens": 2}
    assert post(base + "/v1/chat/completions", json.dumps(pair).encode(), "application/json")[0] == 200


def test_file_paths_are_refused_and_never_read(gateway, tmp_path):
    _, base = gateway
    picture = tmp_path / "picture.png"  # a valid image: had the gateway read it, the answer would be 200
    picture.write_bytes(png())
    for path in (str(picture), "/etc/passwd"):
        for part in ({"type": "image", "image": path}, image_url(path), image_url(f"file://{path}")):
            status, body = completion(base, part)
            assert status == 400 and body["error"]["code"] == "bad_request", (part, body)
    assert completion(base, image_url(data_url(picture.read_bytes())))[0] == 200


def post_early_answered(base: str, body: bytes, chunked: bool) -> tuple[int, dict]:
    """POST `body`, and read the answer even when the server gives it before the body is all sent."""
    import http.client

    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("POST", "/v1/chat/completions")
    for name, value in (("Authorization", f"Bearer {KEY}"), ("Content-Type", "application/json"),
                        ("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(len(body)))):
        conn.putheader(name, value)
    conn.endheaders()
    try:
        for start in range(0, len(body), 65536):
            piece = body[start:start + 65536]
            conn.send(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
        conn.send(b"0\r\n\r\n" if chunked else b"")
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered early and stopped reading
    response = conn.getresponse()
    try:
        return response.status, json.loads(response.read())
    finally:
        conn.close()


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
def test_a_body_over_the_limit_answers_413(gateway, chunked):
    _, base = gateway
    body = json.dumps({"messages": [{"role": "user", "content": "x" * MAX_BODY}]}).encode()
    status, answer = post_early_answered(base, body, chunked)
    assert status == 413 and answer["error"]["code"] == "bad_request"
    assert completion(base, image_url(data_url(png())))[0] == 200


def test_too_many_or_too_big_images_answer_400(gateway):
    _, base = gateway
    status, body = completion(base, *[image_url(data_url(png()))] * (MAX_IMAGES + 1))
    assert status == 400 and f"more than {MAX_IMAGES} images" in body["error"]["message"]
    big = data_url(png()) + base64.b64encode(bytes(MAX_IMAGE_BYTES)).decode()
    status, body = completion(base, image_url(big))
    assert status == 400 and f"exceeds {MAX_IMAGE_BYTES} bytes" in body["error"]["message"]
    assert completion(base, *[image_url(data_url(png()))] * MAX_IMAGES)[0] == 200


@pytest.fixture
def remote_gateway(shared_supervisor, tmp_path):
    """A gateway that fetches remote images, started on its own as a client of the shared supervisor."""
    from qvl.supervisor.gateway_process import GatewaySpec, gateway_command

    port = free_port()
    spec = GatewaySpec(shared_supervisor.endpoint, f"127.0.0.1:{port}", remote_images=True)
    with open(tmp_path / "gateway.log", "w") as log:
        proc = subprocess.Popen(gateway_command(spec), stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: get(base + "/health")[0] == 200, timeout=30), (tmp_path / "gateway.log").read_text()
        yield base
    finally:
        proc.terminate()
        proc.wait(10)
    assert not wait_gone({proc.pid})


@pytest.fixture
def local_server():
    """An HTTP server on 127.0.0.1 that serves a PNG and records every request it gets."""
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            image = png()
            self.send_response(200)
            self.send_header("Content-Length", str(len(image)))
            self.end_headers()
            self.wfile.write(image)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], hits
    server.shutdown()
    server.server_close()


def test_image_urls_to_private_addresses_are_refused_and_never_contacted(remote_gateway, local_server):
    port, hits = local_server
    for url in (f"http://127.0.0.1:{port}/a.png", f"http://localhost:{port}/a.png", f"http://[::1]:{port}/a.png",
                f"http://2130706433:{port}/a.png", "http://169.254.169.254/latest/meta-data/",
                "http://10.0.0.1/a.png", f"https://127.0.0.1:{port}/a.png"):
        status, body = completion(remote_gateway, image_url(url), key=None)
        assert status == 400 and "not a public address" in body["error"]["message"], (url, body)
    assert hits == []
    assert completion(remote_gateway, image_url(data_url(png())), key=None)[0] == 200


def test_a_killed_gateway_is_restarted_and_health_says_so(start_supervisor):
    port = free_port()
    sup = start_supervisor("--http", f"127.0.0.1:{port}")
    sup.wait_ready()
    base = f"http://127.0.0.1:{port}"
    assert wait_for(lambda: get(base + "/health")[0] == 200, timeout=30)
    first = json.loads(get(base + "/health")[1])["gateway"]
    assert first["restarts"] == 0 and first["last_exit"] is None and alive(first["pid"])
    os.kill(first["pid"], signal.SIGKILL)

    def restarted():
        status, text = get(base + "/health")
        return status == 200 and json.loads(text)["gateway"]

    now = wait_for(restarted, timeout=30)
    assert now and now["restarts"] == 1 and now["last_exit"] == "signal 9" and now["pid"] != first["pid"]
    assert not alive(first["pid"])
    assert [e["how"] for e in events(sup.log(), "gateway_exit")] == ["signal 9"]
    assert completion(base, image_url(data_url(png())), key=None)[0] == 200
    sup.remember_workers()  # the new gateway too: it must be gone after the stop


def test_requests_over_the_concurrency_limit_answer_429(start_supervisor):
    port = free_port()
    sup = start_supervisor("--http", f"127.0.0.1:{port}", "--http-max-concurrent", "2",
                           env={"QVL_FAULTS": "slow_ms=2000"})
    sup.wait_ready()
    base = f"http://127.0.0.1:{port}"
    assert wait_for(lambda: get(base + "/health")[0] == 200, timeout=30)
    results = {}

    def ask(name: str):
        results[name] = completion(base, image_url(data_url(png())), key=None)

    slow = [threading.Thread(target=ask, args=(f"slow{i}",)) for i in range(2)]
    for t in slow:
        t.start()
    with sup.client() as c:  # both are in flight on the slow worker
        assert wait_for(lambda: c.status()["inflight"] == 2, timeout=10)
    for i in range(3):
        ask(f"extra{i}")
    for t in slow:
        t.join(60)
    assert [results[f"slow{i}"][0] for i in range(2)] == [200, 200]
    for i in range(3):
        status, body = results[f"extra{i}"]
        assert status == 429 and body["error"]["code"] == "overloaded", body
    assert completion(base, image_url(data_url(png())), key=None)[0] == 200
    sup.remember_workers()


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
    status, body = get(base + "/health")
    failed = json.loads(body)["failed_slots"]
    assert status == 503 and [f["slot"] for f in failed] == [0] and "crash" in failed[0]["reason"], failed
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
