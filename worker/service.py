"""The worker's service loop: the supervisor link on one thread, the model on another.

The main thread owns the DEALER socket to the supervisor: it takes requests, forwards replies and
sends heartbeats on time even while a long `generate` runs. Images are decoded on a small pool
as requests arrive, so decoding overlaps the model's work on earlier batches. The compute thread gathers waiting
requests into batches of equal generation parameters, runs them, and hands replies back over an
inproc socket (ZeroMQ sockets are never shared between threads).
"""

from __future__ import annotations

import collections
import ctypes
import logging
import os
import queue
import signal
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
import zmq

from qvl.protocol.codec import (BYE, CHUNK, GENERATE, HEARTBEAT, HELLO, PROTOCOL_VERSION, READY, REPLY,
                                STOP, decode, encode, error_header)
from qvl.protocol.errors import BadRequest, InternalError, OutOfMemory, QvlError
from qvl.protocol.messages import GenerationParams

from .engine import Engine, ModelOptions, load_engine, prompt_from_request
from .faults import Faults
from .images import decode_image
from .telemetry import Telemetry

log = logging.getLogger("qvl.worker")
_INPROC = "inproc://replies"


@dataclass(frozen=True)
class WorkerOptions:
    backend: str
    slot: int
    generation: int
    model: ModelOptions
    max_batch_size: int = 8
    max_image_pixels: int = 40_000_000
    heartbeat_interval_s: float = 1.0


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


class WorkerService:
    def __init__(self, options: WorkerOptions):
        self.options = options
        self.parent = os.getppid()
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.setsockopt(zmq.ROUTING_ID, f"{options.slot}:{options.generation}".encode())
        self.jobs: queue.Queue = queue.Queue()
        self.replies = self.ctx.socket(zmq.PAIR)
        self.replies.bind(_INPROC)
        self.engine: Engine | None = None
        self.faults = Faults.from_env(options.slot, options.generation)
        self.arrived = 0  # requests received (I/O thread)
        self.done = 0     # requests answered (compute thread)
        self.telemetry: Telemetry | None = None
        self.loaded = threading.Event()
        self.decoder = ThreadPoolExecutor(max_workers=2, thread_name_prefix="decode")

    def read_telemetry(self) -> dict:
        return self.faults.apply(self.telemetry.read(), self.done)

    def _send(self, kind: str, **fields) -> None:
        self.sock.send_multipart(encode({"v": PROTOCOL_VERSION, "kind": kind, **fields}))

    def run(self) -> int:
        opts = self.options
        self.sock.connect(opts.backend)
        self._send(HELLO, slot=opts.slot, generation=opts.generation, pid=os.getpid())
        self.faults.at_start()
        started = time.monotonic()
        compute = threading.Thread(target=self._compute_loop, name="compute", daemon=True)
        compute.start()
        self.loaded.wait()
        load_s = time.monotonic() - started
        self._send(READY, load_s=load_s, device=str(self.engine.device),
                   telemetry=self.read_telemetry())
        log.info("event=ready slot=%d gen=%d load_s=%.2f", opts.slot, opts.generation, load_s)
        self._serve()
        compute.join()
        self._flush_replies()
        self._send(BYE)
        return 0

    def _serve(self) -> None:
        """Relay until the supervisor says stop (or disappears)."""
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.replies, zmq.POLLIN)
        interval = self.options.heartbeat_interval_s
        next_beat = time.monotonic()
        while True:
            now = time.monotonic()
            if now >= next_beat:
                if os.getppid() != self.parent:
                    log.error("event=orphaned slot=%d", self.options.slot)
                    os._exit(1)
                self._send(HEARTBEAT, telemetry=self.read_telemetry())
                next_beat = now + interval
            events = dict(poller.poll(max(0, int((next_beat - now) * 1000))))
            if self.replies in events:
                self._flush_replies()
            if self.sock in events:
                if not self._take_requests():
                    self.jobs.put(None)
                    return

    def _flush_replies(self) -> None:
        while self.replies.poll(0):
            self.sock.send_multipart(self.replies.recv_multipart(copy=False), copy=False)

    def _take_requests(self) -> bool:
        """Queue every waiting request; False once the supervisor asked this worker to stop."""
        while self.sock.poll(0):
            header, frames = decode(self.sock.recv_multipart())
            if header["kind"] == STOP:
                return False
            if header["kind"] == GENERATE:
                self.arrived += 1
                self.faults.on_arrival(self.arrived)
                self.jobs.put(Job(header["id"], header["messages"], GenerationParams(**header["params"]),
                                  self._images(frames), header.get("stream", False)))
        return True

    # --- compute thread -------------------------------------------------------------------

    def _load(self) -> None:
        # Loading and warming up on the thread that generates: compiled CUDA graphs belong to
        # the thread that captured them.
        try:
            self.engine = load_engine(self.options.model)
            self.engine.warm_up()
            self.telemetry = Telemetry(self.engine.device)
        except BaseException:
            log.exception("event=load_failed slot=%d", self.options.slot)
            os._exit(4)
        self.loaded.set()

    def _compute_loop(self) -> None:
        self._load()
        self.out = out = self.ctx.socket(zmq.PAIR)
        out.connect(_INPROC)
        waiting: collections.deque[Job] = collections.deque()
        stopping = False
        while waiting or not stopping:
            stopping = self._gather(waiting, block=not waiting) or stopping
            if not waiting:
                continue
            batch = self._next_batch(waiting)
            for parts in self._run_batch(batch):
                out.send_multipart(parts)
        out.close()

    def _gather(self, waiting: collections.deque, block: bool) -> bool:
        """Move queued jobs into `waiting`; True when the stop sentinel was among them."""
        try:
            job = self.jobs.get(block=block)
            while True:
                if job is None:
                    return True
                waiting.append(job)
                job = self.jobs.get_nowait()
        except queue.Empty:
            return False

    def _next_batch(self, waiting: collections.deque) -> list[Job]:
        """The oldest job and, up to the batch size, later ones with the same parameters."""
        first = waiting.popleft()
        batch, rest = [first], collections.deque()
        while waiting and len(batch) < self.options.max_batch_size:
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
            replies.extend(self._generate(ready))
        return replies

    def _generate(self, ready: list) -> list[list[bytes]]:
        jobs = [job for job, _ in ready]
        try:
            self.faults.before_generate(self.done + 1, self.done + len(jobs))
            progress = self._streamer(jobs) if any(job.stream for job in jobs) else None
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
                log.exception("event=cuda_error slot=%d", self.options.slot)
                os._exit(3)
            if len(ready) > 1:  # find the one request at fault; the others still get answers
                return [parts for item in ready for parts in self._generate([item])]
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

    def _streamer(self, jobs: list[Job]):
        """A progress callback that sends each streaming job's new text as a `chunk`."""
        sent = [""] * len(jobs)

        def progress(rows: list[list[int]]) -> None:
            self.faults.on_progress()
            for i, (job, row) in enumerate(zip(jobs, rows)):
                text = self.engine.detokenize(row) if job.stream and row else ""
                # a half-decoded multi-byte character shows as U+FFFD: wait for the rest of it
                if len(text) > len(sent[i]) and text.startswith(sent[i]) and not text.endswith("\ufffd"):
                    self.out.send_multipart(encode({"v": PROTOCOL_VERSION, "kind": CHUNK, "id": job.key,
                                                    "text": text[len(sent[i]):]}))
                    sent[i] = text
        return progress

    def _images(self, frames: list[bytes]) -> Future:
        if frames:
            return self.decoder.submit(self._decode, frames)
        done = Future()  # text only: no hop through the pool
        done.set_result([])
        return done

    def _decode(self, frames: list[bytes]) -> list:
        return [decode_image(f, self.options.max_image_pixels) for f in frames]

    def _error(self, job: Job, exc: QvlError) -> list[bytes]:
        return encode({**error_header(exc, job.key), "kind": REPLY,
                       "telemetry": self.read_telemetry()})
