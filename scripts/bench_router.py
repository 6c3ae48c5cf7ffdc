#!/usr/bin/env python3
"""The serving path alone: qvl's supervisor with a no-op worker engine, beside the raw pyzmq
floor (a DEALER client and a DEALER echo in another process), in one run.

Prints per-request latency at concurrency 1 (p50/p99), the request rate with many requests
outstanding, and the CPU time the client, the router and the worker each spend per request
during the rate run (their ZeroMQ I/O threads included), for three
paths: the floor; the same two hops qvl makes (ROUTER proxy, DEALER echo worker) written as
bare Python loops with no qvl code, which bounds what any Python supervisor can reach here; and
qvl. Every qvl request must be answered, or the run fails. Runs anywhere (CPU only):

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

import psutil
import zmq

from qvl.protocol import Client
from qvl.protocol.codec import encode
from qvl.protocol.messages import GenerationParams, build_generate

WARM_UP = 200  # requests before measuring


def echo_server(endpoint: str) -> None:
    sock = zmq.Context().socket(zmq.DEALER)
    sock.bind(endpoint)
    while True:
        sock.send_multipart(sock.recv_multipart())


def echo_worker(endpoint: str) -> None:
    """A DEALER that connects to the proxy, says hello and echoes every message."""
    sock = zmq.Context().socket(zmq.DEALER)
    sock.connect(endpoint)
    sock.send(b"hello")
    while True:
        sock.send_multipart(sock.recv_multipart())


def bare_proxy(frontend: str, backend: str) -> None:
    """Clients' requests to the one worker and its replies back: the two hops, nothing else."""
    ctx = zmq.Context()
    front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.ROUTER)
    front.bind(frontend)
    back.bind(backend)
    worker = back.recv_multipart()[0]
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    while True:
        poller.poll()
        try:
            while True:
                back.send_multipart([worker, *front.recv_multipart(zmq.NOBLOCK)])
        except zmq.Again:
            pass
        try:
            while True:
                front.send_multipart(back.recv_multipart(zmq.NOBLOCK)[1:])
        except zmq.Again:
            pass


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


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        times = psutil.Process(pid).cpu_times()
        total += times.user + times.system
    return total


def measure(endpoint: str, n: int, window: int, router: list[int], worker: list[int]) -> dict:
    """Latency and rate through `endpoint`, with the CPU microseconds per request of this
    client, of the `router` processes and of the `worker` processes during the rate run."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    latencies(sock, WARM_UP)
    lat = sorted(latencies(sock, n))
    groups = {"client_us": [psutil.Process().pid], "router_us": router, "worker_us": worker}
    before = {name: cpu_seconds(pids) for name, pids in groups.items()}
    result = {"p50_ms": 1000 * statistics.median(lat), "p99_ms": 1000 * lat[int(0.99 * len(lat))],
              "rate": rate(sock, 5 * n, window), "sent": WARM_UP + 6 * n}
    for name, pids in groups.items():
        result[name] = (cpu_seconds(pids) - before[name]) / (5 * n) * 1e6
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


def measure_in_processes(router: tuple | None, worker: tuple, endpoint: str, args) -> dict:
    """Start the `router` and `worker` (function, args) as processes, measure through
    `endpoint`, stop them."""
    spawn = multiprocessing.get_context("spawn")
    procs = [spawn.Process(target=fn, args=fn_args, daemon=True)
             for fn, fn_args in filter(None, (router, worker))]
    for p in procs:
        p.start()
    try:
        return measure(endpoint, args.requests, args.window, [p.pid for p in procs[:-1]], [procs[-1].pid])
    finally:
        for p in procs:
            p.kill()
            p.join()


def measure_qvl(args, tmp: str) -> dict:
    endpoint = free_tcp_endpoint()
    sup = subprocess.Popen(
        [sys.executable, "-m", "qvl.supervisor.cli", "start", "--frontend", endpoint, "--engine", "noop",
         "--model", "none", "--device", "cpu", "--max-inflight", str(args.window),
         "--max-batch-size", str(args.window), "--queue-size", str(4 * args.window),
         "--log-level", "warning"], stderr=open(f"{tmp}/supervisor.log", "w"))
    try:
        with Client(endpoint, timeout=60) as c:
            c.wait_ready(timeout=120)
        workers = [child.pid for child in psutil.Process(sup.pid).children()]
        served = measure(endpoint, args.requests, args.window, [sup.pid], workers)
        with Client(endpoint, timeout=60) as c:
            check_answered(c, served["sent"])
        return served
    finally:
        sup.terminate()
        sup.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--window", type=int, default=64)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="qvl-bench-")

    echo_ep = free_tcp_endpoint()
    floor = measure_in_processes(None, (echo_server, (echo_ep,)), echo_ep, args)
    front, back = free_tcp_endpoint(), f"ipc://{tmp}/backend"
    bare = measure_in_processes((bare_proxy, (front, back)), (echo_worker, (back,)), front, args)
    served = measure_qvl(args, tmp)

    print(f"{'path':<44} {'p50 ms':>7} {'p99 ms':>7} {'req/s':>8} {'x floor':>7} "
          f"{'CPU us/req: client':>18} {'router':>7} {'worker':>7}")
    for name, r in (("raw pyzmq DEALER echo (floor)", floor),
                    ("bare Python proxy + echo worker (no qvl code)", bare),
                    ("qvl supervisor + no-op worker", served)):
        print(f"{name:<44} {r['p50_ms']:>7.3f} {r['p99_ms']:>7.3f} {r['rate']:>8.0f} "
              f"{r['rate'] / floor['rate']:>7.2f} {r['client_us']:>18.1f} {r['router_us']:>7.1f} {r['worker_us']:>7.1f}")
    print(f"qvl adds {served['p50_ms'] - floor['p50_ms']:.3f} ms p50 over the floor and reaches "
          f"{served['rate'] / floor['rate']:.2f}x its rate ({served['rate'] / bare['rate']:.2f}x the bare "
          f"proxy's); concurrency 1 for latency, {args.window} outstanding for rate, {args.requests} requests")


if __name__ == "__main__":
    main()
