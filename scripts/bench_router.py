#!/usr/bin/env python3
"""The serving path alone: qvl's supervisor with a no-op worker engine, beside the raw pyzmq
floor (a DEALER client and a DEALER echo in another process), in one run.

Prints per-request latency at concurrency 1 (p50/p99) and the request rate with many requests
outstanding, for both, and what qvl adds. Runs anywhere (CPU only):

    python scripts/bench_router.py [--requests 3000] [--window 64]
"""

import argparse
import multiprocessing
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import zmq

from qvl.protocol import Client
from qvl.protocol.codec import encode
from qvl.protocol.messages import GenerationParams, build_generate

WARM_UP = 200  # requests before measuring


def echo_server(endpoint: str) -> None:
    sock = zmq.Context().socket(zmq.DEALER)
    sock.bind(endpoint)
    while True:
        parts = sock.recv_multipart(copy=False)
        if len(parts[0]) == 0:
            return
        sock.send_multipart(parts, copy=False)


def request(i: int) -> list[bytes]:
    req = build_generate(i, [{"role": "user", "content": "What is in the picture?"}],
                         GenerationParams(max_new_tokens=1))
    return encode(req.header())


def latencies(sock: zmq.Socket, n: int) -> list[float]:
    out = []
    for i in range(n):
        parts = request(i)
        t0 = time.perf_counter()
        sock.send_multipart(parts)
        sock.recv_multipart()
        out.append(time.perf_counter() - t0)
    return out


def rate(sock: zmq.Socket, n: int, window: int) -> float:
    """Requests per second with `window` requests kept outstanding."""
    msgs = [request(i) for i in range(n)]
    t0 = time.perf_counter()
    sent = done = 0
    while done < n:
        while sent < n and sent - done < window:
            sock.send_multipart(msgs[sent])
            sent += 1
        sock.recv_multipart()
        done += 1
    return n / (time.perf_counter() - t0)


def measure(endpoint: str, n: int, window: int) -> dict:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    latencies(sock, WARM_UP)
    lat = sorted(latencies(sock, n))
    result = {"p50_ms": 1000 * statistics.median(lat), "p99_ms": 1000 * lat[int(0.99 * len(lat))],
              "rate": rate(sock, 5 * n, window), "sent": WARM_UP + 6 * n}
    sock.close()
    return result


def check_answered(client: Client, sent: int) -> None:
    """Figures of a broken path mean nothing: every request must have been answered, none failed."""
    counters = client.status()["counters"]
    if counters.get("answered") != sent:
        sys.exit(f"qvl answered {counters.get('answered')} of {sent} requests: {counters}")


def free_tcp_endpoint() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--window", type=int, default=64)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="qvl-bench-")

    echo_ep = free_tcp_endpoint()
    echo = multiprocessing.get_context("spawn").Process(target=echo_server, args=(echo_ep,), daemon=True)
    echo.start()
    floor = measure(echo_ep, args.requests, args.window)
    stopper = zmq.Context.instance().socket(zmq.DEALER)
    stopper.connect(echo_ep)
    stopper.send(b"")
    echo.join(5)

    qvl_ep = free_tcp_endpoint()
    sup = subprocess.Popen(
        [sys.executable, "-m", "qvl.supervisor.cli", "start", "--frontend", qvl_ep, "--engine", "noop",
         "--model", "none", "--device", "cpu", "--max-inflight", str(args.window),
         "--max-batch-size", str(args.window), "--queue-size", str(4 * args.window),
         "--log-level", "warning"], stderr=open(f"{tmp}/supervisor.log", "w"))
    try:
        with Client(qvl_ep, timeout=60) as c:
            c.wait_ready(timeout=120)
        served = measure(qvl_ep, args.requests, args.window)
        with Client(qvl_ep, timeout=60) as c:
            check_answered(c, served["sent"])
    finally:
        sup.terminate()
        sup.wait(30)

    print(f"{'path':<34} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>10}")
    print(f"{'raw pyzmq DEALER echo (floor)':<34} {floor['p50_ms']:>8.3f} {floor['p99_ms']:>8.3f} {floor['rate']:>10.0f}")
    print(f"{'qvl supervisor + no-op worker':<34} {served['p50_ms']:>8.3f} {served['p99_ms']:>8.3f} {served['rate']:>10.0f}")
    print(f"added p50 {served['p50_ms'] - floor['p50_ms']:.3f} ms; rate {served['rate'] / floor['rate']:.2f}x the floor "
          f"(concurrency 1 for latency, {args.window} outstanding for rate, {args.requests} requests)")


if __name__ == "__main__":
    main()
