"""Remote image fetching: private addresses are refused before any connection, redirects are not
followed, the byte limit and the time bound hold. Local http.server threads play the servers;
where a test needs a "public" server, 127.0.0.1 stands in for one through `allowed`, and the
private victim listens on 127.0.0.2. The URLs of one request share one time bound."""

import http.server
import ipaddress
import threading
import time

import pytest

from qvl.protocol.codec import Limits
from qvl.protocol.errors import BadRequest
from qvl.supervisor.image_fetch import fetch_image, is_public, request_fetcher
from qvl.supervisor.openai_chat import parse_chat

PUBLIC_STAND_IN = ipaddress.ip_address("127.0.0.1")


def only_stand_in(address) -> bool:
    return address == PUBLIC_STAND_IN


class Server:
    """An HTTP server in a thread that records each request path and answers with `respond`."""

    def __init__(self, host: str, respond):
        self.paths: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.paths.append(self.path)
                respond(self)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def serve():
    started = []

    def start(respond, host="127.0.0.1") -> Server:
        started.append(Server(host, respond))
        return started[-1]

    yield start
    for server in started:
        server.close()


def body(data: bytes, length: bool = True):
    def respond(handler):
        handler.send_response(200)
        if length:
            handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
    return respond


def redirect(to: str):
    def respond(handler):
        handler.send_response(302)
        handler.send_header("Location", to)
        handler.send_header("Content-Length", "0")
        handler.end_headers()
    return respond


def test_a_public_server_gives_its_bytes(serve):
    server = serve(body(b"image bytes"))
    assert fetch_image(server.url + "/a.png?size=2", 100, allowed=only_stand_in) == b"image bytes"
    assert server.paths == ["/a.png?size=2"]


def test_a_private_address_is_refused_and_never_contacted(serve):
    victim = serve(body(b"secret"))
    with pytest.raises(BadRequest, match="not a public address"):
        fetch_image(victim.url + "/", 100)  # the real policy
    assert victim.paths == []


def test_a_redirect_to_a_private_address_is_not_followed(serve):
    victim = serve(body(b"secret"), host="127.0.0.2")
    redirector = serve(redirect(victim.url + "/latest/meta-data/"))
    with pytest.raises(BadRequest, match="redirects"):
        fetch_image(redirector.url + "/cat.png", 100, allowed=only_stand_in)
    assert redirector.paths == ["/cat.png"] and victim.paths == []
    with pytest.raises(BadRequest, match="not a public address"):  # nor may it be named directly
        fetch_image(victim.url + "/", 100, allowed=only_stand_in)
    assert victim.paths == []


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/", "http://localhost/", "http://[::1]/", "http://2130706433/", "http://0x7f.1/",
    "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/", "http://192.168.1.1/",
    "http://100.64.0.1/", "http://0.0.0.0/", "http://224.0.0.1/", "http://[fc00::1]/", "http://[fe80::1]/",
    "http://[::ffff:127.0.0.1]/", "http://240.0.0.1/",
    "http://[2002:7f00:1::]/", "http://[2002:a9fe:a9fe::1]/",  # 6to4 of 127.0.0.1 and 169.254.169.254
    "http://[2001:0:4136:e378:8000:63bf:3fff:fdd2]/", "http://[fec0::1]/",  # Teredo, site-local
])
def test_private_and_special_addresses_are_refused_before_connecting(url):
    with pytest.raises(BadRequest, match="not a public address"):
        fetch_image(url, 100)


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/a.png", "gopher://x/",
                                 "http://user:pw@example.com/", "http:///nohost", "http://example.com:99999/"])
def test_other_schemes_credentials_and_broken_urls_are_refused(url):
    with pytest.raises(BadRequest):
        fetch_image(url, 100)


def test_the_public_address_check():
    assert is_public(ipaddress.ip_address("93.184.216.34"))
    assert is_public(ipaddress.ip_address("2606:2800:220:1:248:1893:25c8:1946"))
    assert not is_public(ipaddress.ip_address("169.254.169.254"))


@pytest.mark.parametrize("length", [True, False], ids=["declared", "undeclared"])
def test_a_body_over_the_limit_stops_at_the_limit(serve, length):
    server = serve(body(bytes(5000), length=length))
    with pytest.raises(BadRequest, match="4096"):
        fetch_image(server.url + "/", 4096, allowed=only_stand_in)
    assert fetch_image(server.url + "/", 5000, allowed=only_stand_in) == bytes(5000)


def test_a_slow_server_is_cut_at_the_total_time_bound(serve):
    def trickle(handler):
        handler.send_response(200)
        handler.end_headers()
        for _ in range(40):  # a byte every 0.1 s: no single read ever times out
            handler.wfile.write(b"x")
            handler.wfile.flush()
            time.sleep(0.1)

    server = serve(trickle)
    start = time.monotonic()
    with pytest.raises(BadRequest, match="longer than 1s"):
        fetch_image(server.url + "/", 1000, timeout_s=1.0, allowed=only_stand_in)
    assert time.monotonic() - start < 2.0


def test_an_error_status_is_a_bad_request(serve):
    def missing(handler):
        handler.send_error(404)

    with pytest.raises(BadRequest, match="404"):
        fetch_image(serve(missing).url + "/", 100, allowed=only_stand_in)


def test_the_image_urls_of_one_request_share_one_time_bound(serve):
    """Each URL answers inside the bound, so a bound per URL would hold the request eight times as
    long; one bound per request ends it at the bound, before the third URL is asked."""
    def slow(handler):
        time.sleep(0.4)
        body(b"abc")(handler)

    server = serve(slow)
    parts = [{"type": "image_url", "image_url": {"url": f"{server.url}/{i}"}} for i in range(8)]
    fetch = request_fetcher(1 << 20, timeout_s=0.5, allowed=only_stand_in)
    start = time.monotonic()
    with pytest.raises(BadRequest, match="longer than"):
        parse_chat({"messages": [{"role": "user", "content": parts}]}, Limits(), fetch)
    assert time.monotonic() - start < 1.0
    assert "/2" not in server.paths


def test_a_socket_timeout_before_the_watchdog_reads_as_the_time_bound(serve, monkeypatch):
    """The socket's timeout and the watchdog share the bound; whichever fires first, the error
    names the bound (a late watchdog here is one that never fires)."""
    class LateWatchdog:
        def __init__(self, *args):
            pass

        def start(self):
            pass

        def cancel(self):
            pass

    monkeypatch.setattr("qvl.supervisor.image_fetch.threading.Timer", LateWatchdog)

    def silent(handler):
        time.sleep(1.0)

    with pytest.raises(BadRequest, match="longer than 0.3s"):
        fetch_image(serve(silent).url + "/", 100, timeout_s=0.3, allowed=only_stand_in)
