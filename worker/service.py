"""The worker's service loop: one thread takes requests, runs batches and sends replies.

The main thread owns the DEALER socket to the supervisor. It reads every waiting request,
gathers them into batches of equal generation parameters, runs each batch on the model and
replies on the same socket, with no hand-off between threads on the request path. Between
decoding steps it reads requests that arrived meanwhile, so their images decode on a small
pool while the model works. Heartbeats come from a thread with a socket of its own
(ZeroMQ sockets are never shared between threads), so they keep time during a long batch.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch
import zmq

from qvl.protocol.codec import (BYE, CHUNK, GENERATE, HEARTBEAT, HELLO, PROTOCOL_VERSION, READY, REPLY,
                                STOP, decode, encode, error_header, worker_identity)
from qvl.protocol.errors import BadRequest, InternalError, OutOfMemory, QvlError
from qvl.protocol.contract import WorkerSpec
from qvl.protocol.messages import GenerationParams

from .decoding import Progress
from .engine import Engine, load_engine, prompt_from_request
from .faults import Faults
from .images import decode_image
from .telemetry import Telemetry

log = logging.getLogger("qvl.worker")
_NO_IMAGES: Future = Future()
_NO_IMAGES.set_result(())


@dataclass(frozen=True)
class Job:
    key: int
    messages: list
    params: GenerationParams
    images: Future  # decoded on the decode pool while the model runs earlier batches
    stream: bool = False


def exit_with_parent() -> None:
    """Have the kernel kill this process when the supervisor dies, so no orphan holds a GPU."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def send(sock: zmq.Socket, kind: str, **fields) -> None:
    sock.send_multipart(encode({"v": PROTOCOL_VERSION, "kind": kind, **fields}))


class Heartbeat(threading.Thread):
    """Sends this worker's telemetry every interval from its own socket until stopped."""

    def __init__(self, service: "WorkerService"):
        super().__init__(name="heartbeat", daemon=True)
        self.service = service
        self.stopped = threading.Event()

    def run(self) -> None:
        opts = self.service.spec
        sock = self.service.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, worker_identity(opts.slot, opts.generation, heartbeat=True))
        sock.connect(opts.backend)
        while not self.stopped.is_set():
            if os.getppid() != self.service.parent:
                log.error("event=orphaned slot=%d", opts.slot)
                os._exit(1)
            send(sock, HEARTBEAT, telemetry=self.service.read_telemetry())
            self.stopped.wait(opts.heartbeat_interval_s)
        sock.close()


class WorkerService:
    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.parent = os.getppid()
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.setsockopt(zmq.ROUTING_ID, worker_identity(spec.slot, spec.generation))
        self.engine: Engine | None = None
        self.faults = Faults.from_env(spec.slot, spec.generation)
        self.waiting: collections.deque[Job] = collections.deque()
        self.stopping = False  # the supervisor said stop: finish what is waiting, then exit
        self.arrived = 0  # requests received
        self.done = 0     # requests answered
        self.telemetry: Telemetry | None = None
        self.decoder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode")

    def read_telemetry(self) -> dict:
        return self.faults.apply(self.telemetry.read(), self.done)

    def _send(self, kind: str, **fields) -> None:
        send(self.sock, kind, **fields)

    def run(self) -> int:
        opts = self.spec
        self.sock.connect(opts.backend)
        self._send(HELLO, slot=opts.slot, generation=opts.generation, pid=os.getpid())
        self.faults.at_start()
        started = time.monotonic()
        self._load()
        load_s = time.monotonic() - started
        self._send(READY, load_s=load_s, device=str(self.engine.device),
                   telemetry=self.read_telemetry())
        log.info("event=ready slot=%d gen=%d load_s=%.2f", opts.slot, opts.generation, load_s)
        heartbeat = Heartbeat(self)
        heartbeat.start()
        self._serve()
        heartbeat.stopped.set()
        heartbeat.join()
        self._send(BYE)
        return 0

    def _load(self) -> None:
        try:
            self.engine = load_engine(self.spec.model)
            self.engine.warm_up()
            self.telemetry = Telemetry(self.engine.device)
        except BaseException:
            log.exception("event=load_failed slot=%d", self.spec.slot)
            os._exit(4)

    def _serve(self) -> None:
        """Batch and answer until the supervisor says stop and nothing is left waiting."""
        while self.waiting or not self.stopping:
            if not self.waiting:
                self.sock.poll()  # idle: sleep until a request (or stop) comes
            self._take_requests()
            if self.waiting:
                for parts in self._run_batch(self._next_batch()):
                    self.sock.send_multipart(parts)

    def _take_requests(self) -> None:
        """Queue every request waiting on the socket, and start decoding its images."""
        while self.sock.get(zmq.EVENTS) & zmq.POLLIN:  # cheaper than poll(0), which builds a poller
            header, frames = decode(self.sock.recv_multipart(), self.spec.limits)
            if header["kind"] == STOP:
                self.stopping = True
            elif header["kind"] == GENERATE:
                self.arrived += 1
                self.faults.on_arrival(self.arrived)
                self.waiting.append(Job(header["id"], header["messages"], GenerationParams(**header["params"]),
                                        self._images(frames), header.get("stream", False)))

    def _next_batch(self) -> list[Job]:
        """The oldest job and, up to the batch size, later ones with the same parameters."""
        waiting = self.waiting
        first = waiting.popleft()
        batch, rest = [first], collections.deque()
        while waiting and len(batch) < self.spec.max_batch_size:
            job = waiting.popleft()
            (batch if job.params == first.params else rest).append(job)
        waiting.extendleft(reversed(rest))
        return batch

    def _run_batch(self, batch: list[Job]) -> list[list[bytes]]:
        replies, ready = [], []
        for job in batch:
            try:
                ready.append((job, prompt_from_request(job.messages, job.images.result())))
            except BadRequest as exc:
                replies.append(self._error(job, exc))
        if ready:
            replies.extend(self._generate(ready, streamed={}))
        return replies

    def _generate(self, ready: list, streamed: dict[int, str]) -> list[list[bytes]]:
        jobs = [job for job, _ in ready]
        try:
            self.faults.before_generate(self.done + 1, self.done + len(jobs))
            progress = self._between_steps(jobs, streamed)
            completions = self.engine.generate([p for _, p in ready], jobs[0].params, progress)
        except torch.OutOfMemoryError as exc:
            self.telemetry.ooms += 1
            self.done += len(jobs)
            if self.engine.device.type == "cuda":
                torch.cuda.empty_cache()
            return [self._error(job, OutOfMemory(str(exc).splitlines()[0])) for job in jobs]
        except Exception as exc:
            if self.engine.device.type == "cuda" and isinstance(exc, torch.AcceleratorError):
                # The CUDA context is unusable now; the supervisor retries these elsewhere.
                log.exception("event=cuda_error slot=%d", self.spec.slot)
                os._exit(3)
            if len(ready) > 1:  # find the one request at fault; the others still get answers
                return [parts for item in ready for parts in self._generate([item], streamed)]
            if isinstance(exc, QvlError):  # the request's own fault, named by the engine
                return [self._error(jobs[0], exc)]
            log.exception("event=generate_failed key=%s", jobs[0].key)
            return [self._error(jobs[0], InternalError(f"{type(exc).__name__}: {exc}"))]
        self.done += len(jobs)
        telemetry = self.read_telemetry()
        return [encode({
            "v": PROTOCOL_VERSION, "kind": REPLY, "id": job.key, "ok": True, "text": c.text,
            "usage": {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens},
            "timings": {"prefill_ms": c.prefill_ms, "decode_ms": c.decode_ms,
                        "batch_size": len(jobs)},
            "telemetry": telemetry,
        }) for job, c in zip(jobs, completions)]

    def _between_steps(self, jobs: list[Job], streamed: dict[int, str]) -> Progress:
        """What runs every few decoding steps: take the requests that arrived meanwhile (their
        images start decoding), and send each streaming job's new text as a `chunk`.
        `streamed` holds the text sent so far per job, so a batch run again sends no text twice."""
        streaming = any(job.stream for job in jobs)

        def progress(rows: Callable[[], list[list[int]]]) -> None:
            self._take_requests()
            self.faults.on_progress()
            if not streaming:
                return
            for job, row in zip(jobs, rows()):
                if not (job.stream and row):
                    continue
                text, sent = self.engine.detokenize(row), streamed.get(job.key, "")
                # a half-decoded multi-byte character shows as U+FFFD: wait for the rest of it
                if len(text) > len(sent) and text.startswith(sent) and not text.endswith("\ufffd"):
                    self._send(CHUNK, id=job.key, text=text[len(sent):])
                    streamed[job.key] = text
        return progress

    def _images(self, frames: list[bytes]) -> Future:
        if frames:
            return self.decoder.submit(self._decode, frames)
        return _NO_IMAGES  # text only: no hop through the pool

    def _decode(self, frames: list[bytes]) -> list:
        return [decode_image(f, self.spec.max_image_pixels) for f in frames]

    def _error(self, job: Job, exc: QvlError) -> list[bytes]:
        return encode({**error_header(exc, job.key), "kind": REPLY,
                       "telemetry": self.read_telemetry()})
