"""Faults found in review, each a test that fails on the change under review (b33fccd..HEAD+edits)."""

import functools
import ipaddress
import socket
import threading
import time

import pytest
from qvl.protocol.codec import Limits
from qvl.protocol.messages import GenerationParams
from qvl.supervisor.config import Config, ConfigError
from qvl.supervisor.image_fetch import fetch_image, is_public
from qvl.supervisor.openai_chat import parse_chat


def test_an_integer_temperature_reaches_the_engine_as_a_float():
    """`temperature: 2` (an int, accepted as a number) makes transformers' TemperatureLogitsWarper
    raise ValueError in the worker: the client gets `internal` (dynamic KV cache, CPU default)."""
    params = GenerationParams.parse({"temperature": 2}, Limits())
    assert isinstance(params.temperature, float)


def test_a_tiny_temperature_is_refused_or_sampled_never_internal():
    """temperature 1e-300 passes `0 <= t <= 100`; logits / t are inf, softmax is NaN and
    torch.multinomial raises RuntimeError: the request is answered `internal`."""
    torch = pytest.importorskip("torch")
    from qvl.protocol.errors import BadRequest
    from qvl.worker.kv_pool import choose_tokens
    try:
        params = GenerationParams.parse({"temperature": 1e-300}, Limits())
    except BadRequest:
        return
    choose_tokens(torch.randn(2, 50), params)


@pytest.mark.parametrize("address", ["2002:7f00:1::", "2002:a9fe:a9fe::1"])
def test_6to4_addresses_that_embed_loopback_or_metadata_are_not_public(address):
    assert not is_public(ipaddress.ip_address(address))


def test_a_gateway_on_every_interface_without_an_api_key_is_refused(tmp_path):
    """The ZeroMQ frontend off loopback needs CurveZMQ or `insecure`; the HTTP gateway, a client of that
    frontend, may listen on 0.0.0.0 with no key and no `insecure`, and so opens the service to the network."""
    with pytest.raises(ConfigError):
        Config(model=str(tmp_path), http="0.0.0.0:8000").validate()


def test_remote_images_are_bounded_in_time_per_request_not_per_image():
    """Each image URL gets its own FETCH_TIMEOUT_S: 16 URLs that answer just inside it hold one
    request (and one of the event loop's few default-executor threads) 16 times as long."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(32)
    port = srv.getsockname()[1]

    def answer(c):
        c.recv(4096)
        time.sleep(0.4)
        c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc")
        c.close()

    def serve():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=answer, args=(c,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    bound = 0.5
    fetch = functools.partial(fetch_image, max_bytes=1 << 20, timeout_s=bound, allowed=lambda a: True)
    parts = [{"type": "image_url", "image_url": {"url": f"http://127.0.0.1:{port}/{i}"}} for i in range(8)]
    started = time.monotonic()
    try:
        parse_chat({"messages": [{"role": "user", "content": parts}]}, Limits(), fetch)
    except Exception:
        pass
    finally:
        srv.close()
    assert time.monotonic() - started < 2 * bound
