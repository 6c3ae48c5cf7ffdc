"""The worker's service loop: one thread takes requests, runs the engine and sends replies.

The main thread owns the DEALER socket to the supervisor. It reads every waiting request,
gathers them into batches of equal generation parameters, runs each batch on the model and
replies on the same socket, with no hand-off between threads on the request path. Between
generation steps it reads requests that arrived meanwhile, so their images open on a small
pool while the model works. An engine that schedules every step itself (vLLM) is driven step by
step instead: requests join its batch when their inputs are ready and leave when they end.
Heartbeats come from a thread with a socket of its own
(ZeroMQ sockets are never shared between threads), so they keep time during a long batch.
A `cancel` answers its request with finish_reason "cancelled": at once while it waits, at the next
generation step while its batch runs (`WorkerService.cancel`).
A request whose deadline (`timeout_ms`, the time left when the supervisor sent it) passes while
it still waits here (with vLLM: until vLLM has it) is answered `deadline_exceeded`; one that has
started runs to its end.

No request ends the worker: a message that cannot be read is answered `bad_request` (or dropped
when it names no key), a request that fails is answered with its own error, and a batch that
fails is split until the failing row is found, so the other rows still get answers. Only a
CUDA error that leaves the context unusable ends the process (`WorkerExit.CUDA_FATAL`), and a
failed step of a step-scheduled engine, whose running rows are then in an unknown state, or the
death of vLLM's engine core (`WorkerExit.ENGINE_FAILED`); either way the supervisor retries
their requests elsewhere.
"""

from __future__ import annotations

import collections
import itertools
import logging
import math
import os
import sys
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import torch
import zmq
from qvl.protocol.codec import encode, worker_identity
from qvl.protocol.contract import WorkerSpec
from qvl.protocol.errors import DeadlineExceeded, InternalError, OutOfMemory, QvlError, WorkerFailed
from qvl.protocol.exits import WorkerExit
from qvl.protocol.messages import (CANCELLED, STOPPED, Bye, Cancel, Chunk, ErrorReply, GenerateRequest, GenerationParams,
                                   Heartbeat, Hello, Ready, Reply, Stop)

from .bell import Bell
from .engine import NO_IMAGES, Completion, Engine, ImageInputs, Prompt, image_threads, load_engine
from .faults import Faults
from .images import image_size, open_image
from .inbox import read_message
from .kv_pool import Progress
from .parent import orphaned
from .stop_strings import find_stop
from .telemetry import ModelProcessFigures, Telemetry

log = logging.getLogger("qvl.worker")
_NO_IMAGES: Future = Future()
_NO_IMAGES.set_result(NO_IMAGES)


@dataclass(eq=False)
class Job:
    """A request this worker took: waiting for its images and its turn, then running."""

    key: int
    number: int  # the how-many-th request this worker received (fault injection names requests by it)
    messages: list
    params: GenerationParams
    images: Future  # its ImageInputs, made on the image pool while the model runs earlier batches
    stream: bool = False
    prompt: object = None  # a step engine's input, made once its images are ready
    deadline: float | None = None  # monotonic time after which it must not start
    arrived_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None  # when the engine took it
    images_ms: float = 0.0  # the image pool's time opening and processing its images (or making its prompt)

    def timings(self) -> dict:
        """Where its time before the prefill went, sent in its reply: waiting in this worker (for
        its images, then for room in the engine) and, of that, making its images."""
        waited = (self.started_at or time.perf_counter()) - self.arrived_at
        return {"wait_ms": waited * 1000.0, "images_ms": self.images_ms}


class HeartbeatSender(threading.Thread):
    """Sends this worker's telemetry every interval from its own socket until stopped."""

    def __init__(self, service: "WorkerService"):
        super().__init__(name="heartbeat", daemon=True)
        self.service = service
        self.stopped = threading.Event()

    def run(self) -> None:
        spec = self.service.spec
        sock = self.service.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTING_ID, worker_identity(spec.slot, spec.generation, heartbeat=True))
        sock.connect(spec.backend)
        while not self.stopped.is_set():
            if orphaned():
                log.error("event=orphaned slot=%d", spec.slot)
                os._exit(WorkerExit.ORPHANED)
            sock.send_multipart(encode(Heartbeat(self.service.read_telemetry()).header()))
            self.stopped.wait(spec.heartbeat_interval_s)
        sock.close()


class WorkerService:
    def __init__(self, spec: WorkerSpec):
        self.spec = spec
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 2000)
        self.sock.setsockopt(zmq.ROUTING_ID, worker_identity(spec.slot, spec.generation))
        self.engine: Engine | None = None
        self.faults = Faults.from_env(spec.slot, spec.generation)
        self.waiting: collections.deque[Job] = collections.deque()
        self.running: dict[int, Job] = {}  # the jobs in the engine not answered yet, by key
        self.cancelling: set[int] = set()  # keys in `running` to answer "cancelled" at the next step
        self.stopping = False  # the supervisor said stop: finish what is waiting, then exit
        self.arrived = 0  # requests received
        self.done = 0     # requests answered
        self.telemetry: Telemetry | None = None
        self.image_pool = ThreadPoolExecutor(max_workers=image_threads(spec.model), thread_name_prefix="images")
        self.bell = Bell()  # rung by the image pool and vLLM's engine core (`_serve_steps`)

    def read_telemetry(self) -> dict:
        return self.faults.apply(self.telemetry.read(), self.done)

    def _send(self, header: dict) -> None:
        self.sock.send_multipart(encode(header))

    def run(self) -> int:
        spec = self.spec
        # The image pool's threads hold the GIL while they process pixels; the main thread, back from
        # a step's wait on the device (or vLLM's engine core), would wait up to the default 5 ms for
        # it each time. 0.5 ms bounds that wait.
        sys.setswitchinterval(0.0005)
        self.sock.connect(spec.backend)
        self._send(Hello(spec.slot, spec.generation, os.getpid()).header())
        self.faults.at_start()
        started = time.monotonic()
        self._load()
        load_s = time.monotonic() - started
        self._send(Ready(load_s, str(self.engine.device), self.read_telemetry()).header())
        log.info("event=ready slot=%d gen=%d load_s=%.2f", spec.slot, spec.generation, load_s)
        heartbeat = HeartbeatSender(self)
        heartbeat.start()
        self._serve()
        heartbeat.stopped.set()
        heartbeat.join()
        if hasattr(self.engine, "close"):  # vLLM's engine core: stopped, its device memory freed, before bye
            self.engine.close()
        self._send(Bye().header())
        self.ctx.destroy(linger=2000)  # returns once the replies and the bye are sent (or 2 s passed)
        return WorkerExit.OK

    def _load(self) -> None:
        try:
            self.engine = load_engine(self.spec)
            self.engine.warm_up()
            # an engine whose model lives in another process (vLLM's engine core) reads its figures itself
            figures = getattr(self.engine, "process_figures", None) or ModelProcessFigures(self.engine.device).read
            self.telemetry = Telemetry(figures, getattr(self.engine, "stats", dict))
        except BaseException:
            log.exception("event=load_failed slot=%d", self.spec.slot)
            os._exit(WorkerExit.LOAD_FAILED)

    def _serve(self) -> None:
        """Answer until the supervisor says stop and nothing is left waiting."""
        if self.engine.steps:
            self._serve_steps()
            return
        while self.waiting or not self.stopping:
            if not self.waiting:
                self.sock.poll()  # idle: sleep until a request (or stop) comes
            self._take_requests()
            self._expire()
            if self.waiting:
                self._run_batch(self._next_batch())

    def _serve_steps(self) -> None:
        """For an engine that schedules every step (vLLM): a request joins the running batch as soon
        as its inputs are ready, and its answer goes out the step it ends. Between steps the loop
        sleeps on its socket and the bell together (`bell.py`): vLLM's engine core steps in a
        process of its own and rings when a step comes back, the image pool rings when a request's
        inputs are ready, so a request is read, and added, while the core works."""
        engine = self.engine
        idle = getattr(engine, "idle", None)  # vLLM's: its engine core's figures, read while idle too
        after_step = getattr(engine, "after_step", None)  # and after a step's replies are sent
        ring_on_output = getattr(engine, "ring_on_output", None)
        if ring_on_output is not None:
            ring_on_output(self.bell)
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.bell, zmq.POLLIN)
        while self.waiting or engine.running or not self.stopping:
            if not engine.ready_to_step():
                poller.poll(self._sleep_ms(idle))
                self.bell.clear()
            self._take_requests()
            self._expire()
            self._admit()
            if engine.ready_to_step():
                self._step()
                if after_step is not None:
                    after_step()

    def _sleep_ms(self, idle: Callable[[], float] | None) -> float | None:
        """How long the step loop may sleep with nothing to step: until a ring or a message, the
        earliest deadline of a waiting job, or, with nothing at all to do, when `idle` is due again.
        Not at all while a job whose inputs are ready waits: the engine had no room for it at this
        pass, and nothing will ring for it (with no row left, the next pass admits it)."""
        if any(job.images.done() for job in self.waiting):
            return 0
        timeout = 1000.0 * idle() if idle and not (self.waiting or self.engine.running) else None
        deadlines = [job.deadline for job in self.waiting if job.deadline is not None]
        if deadlines:
            due = math.ceil(max(0.0, 1000.0 * (min(deadlines) - time.monotonic())))  # zmq cuts to whole ms
            timeout = due if timeout is None else min(timeout, due)
        return timeout

    def _admit(self) -> None:
        """Hand the engine, in one call, the waiting jobs whose inputs are ready, as many as it has
        room for at this step; answer those whose prompt it refuses."""
        joining: list[tuple[Job, object]] = []
        for job in [job for job in self.waiting if job.images.done()]:
            try:
                if job.prompt is None:
                    job.prompt = self.engine.prompt(job.messages, job.images.result(), job.params)
            except Exception as exc:
                self.waiting.remove(job)
                self.sock.send_multipart(self._row_failed(job, exc))
                continue
            if not self.engine.has_room([prompt for _, prompt in joining], job.prompt):
                break  # in order: it joins first at a later step
            self.waiting.remove(job)
            joining.append((job, job.prompt))
        if joining:
            self._join(joining)

    def _join(self, joining: list[tuple[Job, object]]) -> None:
        """Add jobs with their prompts to the engine together. Where that fails, as in `_generate`,
        the jobs are split in halves and each half added again, down to the job at fault: only a job
        that fails alone is answered with the error."""
        jobs = [job for job, _ in joining]
        started = time.perf_counter()
        try:
            self.faults.before_generate([job.number for job in jobs])
            self.engine.add([(job.key, prompt, job.params) for job, prompt in joining])
        except Exception as exc:
            if len(joining) == 1:
                self.sock.send_multipart(self._row_failed(jobs[0], exc))
                return
            self._device_error(exc)
            log.warning("event=batch_split rows=%d error=%s", len(joining), type(exc).__name__)
            half = len(joining) // 2
            self._join(joining[:half])
            self._join(joining[half:])
        else:
            self.running.update((job.key, job) for job in jobs)
            for job in jobs:
                job.started_at = started  # the engine has what it needs: the pixels need not live as long as the row
                job.prompt, job.images = None, _NO_IMAGES

    def _step(self) -> None:
        try:
            self.faults.on_step()
            outputs = self.engine.step()
        except Exception as exc:
            # the engine's state is unknown now; the supervisor retries its requests elsewhere
            log.exception("event=engine_failed slot=%d", self.spec.slot)
            os._exit(WorkerExit.CUDA_FATAL if isinstance(exc, torch.AcceleratorError) else WorkerExit.ENGINE_FAILED)
        for out in outputs:
            job = self.running.get(out.key)
            if job is None:
                continue
            if out.error is not None:
                del self.running[out.key]
                self.sock.send_multipart(self._row_failed(job, out.error))
            elif out.completion is not None:
                del self.running[out.key]
                self.sock.send_multipart(self._reply(job, out.completion, self.engine.running + 1, "",
                                                     self.read_telemetry()))
            elif job.stream and out.text:  # text held back (a half-made character, a stop's start) waits
                self._send(Chunk(job.key, out.text).header())

    def _take_requests(self) -> None:
        """Queue every request waiting on the socket, and start opening its images."""
        while self.sock.get(zmq.EVENTS) & zmq.POLLIN:  # cheaper than poll(0), which builds a poller
            self._take(self.sock.recv_multipart())

    def _take(self, parts: list[bytes]) -> None:
        try:
            message = read_message(parts, self.spec.limits)
        except Exception as exc:  # also called mid-batch: what fails here must not reach the batch
            self._refuse(exc)
            return
        if isinstance(message, Stop):
            self.stopping = True
            return
        if isinstance(message, Cancel):
            self.cancel(message.id)
            return
        self.arrived += 1
        self.faults.on_arrival(self.arrived)
        for garbage in self.faults.garbage(self.arrived):
            self.sock.send_multipart(garbage)
        deadline = None if message.timeout_ms is None else time.monotonic() + message.timeout_ms / 1000.0
        job = Job(message.id, self.arrived, message.messages, message.params, _NO_IMAGES, message.stream,
                  deadline=deadline)
        job.images = self._images(job, message)
        self.waiting.append(job)

    def _expire(self) -> None:
        """Answer `deadline_exceeded` for each waiting job whose deadline passed before it started."""
        now = time.monotonic()
        for job in [job for job in self.waiting if job.deadline is not None and now >= job.deadline]:
            self.waiting.remove(job)
            job.images.cancel()
            self.sock.send_multipart(self._failed(job, DeadlineExceeded("deadline passed while waiting in the worker")))
            log.info("event=deadline_exceeded key=%d", job.key)

    def cancel(self, key: int) -> None:
        """Abandon request `key`; it is answered with finish_reason "cancelled" and the text made so
        far. A job still waiting is answered at once and dropped. An engine that schedules every
        step aborts a running job's row at once. In a batch of the transformers engine the job is
        answered at the batch's next progress point (`_between_steps`) and its reply from the batch
        is dropped; its row computes on until the batch ends, as `generate` runs a batch to
        completion. A key never seen or already answered is ignored."""
        job = next((job for job in self.waiting if job.key == key), None)
        if job is not None:
            self.waiting.remove(job)
            job.images.cancel()  # its images, if not begun, are never opened
            self.done += 1
            self._send(self._cancelled(job, "", 0))
            log.info("event=cancelled key=%d where=waiting", key)
        elif key in self.running and self.engine.steps:  # the engine aborts the row now
            job = self.running.pop(key)
            self.done += 1
            self._send(self._cancelled(job, *self.engine.abort(key)))
            log.info("event=cancelled key=%d where=running", key)
        elif key in self.running:
            self.cancelling.add(key)
        else:
            log.debug("event=cancel_ignored key=%d", key)

    def _cancelled(self, job: Job, text: str, tokens: int, finish_reason: str = CANCELLED) -> dict:
        return Reply(job.key, text, {"completion_tokens": tokens}, {}, self.read_telemetry(),
                     finish_reason=finish_reason).header()

    def _refuse(self, exc: Exception) -> None:
        """Answer a message that could not be read, or drop it when it names no key."""
        error = exc if isinstance(exc, QvlError) else InternalError(f"{type(exc).__name__}: {exc}")
        log.warning("event=bad_message key=%s code=%s error=%s", error.request_id, error.code, error.message,
                    exc_info=not isinstance(exc, QvlError))
        if error.request_id is not None:
            self._send(ErrorReply(error.request_id, error, self.read_telemetry()).header())

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

    def _run_batch(self, batch: list[Job]) -> None:
        """Answer a batch's jobs, each part the engine runs at once (`Engine.sub_batches`) as soon as
        it ends, but for jobs a cancel already answered while it ran."""
        self.running = {job.key: job for job in batch}
        ready = []
        for job in batch:
            try:
                ready.append((job, self.engine.prompt(job.messages, job.images.result(), job.params)))
            except Exception as exc:
                self._answer(job, self._failed(job, exc))
        if ready:
            for part in self.engine.sub_batches([prompt for _, prompt in ready], batch[0].params):
                self._take_requests()  # cancels that came while the part before ran
                for job, _ in ready[part]:
                    if job.key in self.cancelling:  # cancelled while an earlier part ran: it never starts
                        self._answer_cancelled(job, [], "")
                        self.done += 1  # no reply of this batch will count it
                todo = [(job, prompt) for job, prompt in ready[part] if job.key in self.running]
                started = time.perf_counter()  # until now each waited for the batch's images and the parts before
                for job, _ in todo:
                    job.started_at = started
                for job, parts in self._generate(todo, streamed={}) if todo else []:
                    self._answer(job, parts)
        self.running, self.cancelling = {}, set()

    def _answer(self, job: Job, parts: list[bytes]) -> None:
        """Send a running job's reply, unless a cancel answered it already."""
        if self.running.pop(job.key, None) is not None:
            self.sock.send_multipart(parts)

    def _generate(self, ready: list[tuple[Job, Prompt]],
                  streamed: dict[int, str]) -> list[tuple[Job, list[bytes]]]:
        """Replies for a batch. One that fails is split in halves and each run again, down to the
        row at fault: only a row that fails alone is answered with the error, so only such an
        out-of-memory error counts towards recycling."""
        jobs = [job for job, _ in ready]
        try:
            self.faults.before_generate([job.number for job in jobs])
            progress = self._between_steps(jobs, streamed)
            completions = self.engine.generate([prompt for _, prompt in ready], jobs[0].params, progress)
        except Exception as exc:
            if len(ready) > 1:
                self._device_error(exc)
                log.warning("event=batch_split rows=%d error=%s", len(ready), type(exc).__name__)
                half = len(ready) // 2
                return self._generate(ready[:half], streamed) + self._generate(ready[half:], streamed)
            return [(jobs[0], self._row_failed(jobs[0], exc))]
        telemetry = self.read_telemetry()
        return [(job, self._reply(job, c, len(jobs), streamed.get(job.key, ""), telemetry))
                for job, c in zip(jobs, completions)]

    def _reply(self, job: Job, c: Completion, batch_size: int, sent: str, telemetry: dict) -> list[bytes]:
        """The answer, unless a row run again (after its batch failed) no longer extends the text it
        already streamed: sampling does not repeat itself, and the client holds that text."""
        if not c.text.startswith(sent):
            return self._failed(job, WorkerFailed("the answer changed when its batch ran again after "
                                                  "part of it was streamed; not sent"))
        self.done += 1
        return encode(Reply(job.key, c.text,
                            {"prompt_tokens": c.prompt_tokens, "completion_tokens": c.completion_tokens},
                            {**job.timings(), "prefill_ms": c.prefill_ms, "decode_ms": c.decode_ms,
                             "batch_size": batch_size, **c.engine_timings},
                            telemetry, finish_reason=c.finish_reason).header())

    def _device_error(self, exc: Exception) -> None:
        """End the process on an error that leaves the CUDA context unusable (the supervisor retries
        its requests elsewhere); after an out-of-memory error, give cached blocks back."""
        if self.engine.device.type != "cuda":
            return
        if isinstance(exc, torch.AcceleratorError):
            log.exception("event=cuda_error slot=%d", self.spec.slot)
            os._exit(WorkerExit.CUDA_FATAL)
        if isinstance(exc, torch.OutOfMemoryError):
            torch.cuda.empty_cache()

    def _row_failed(self, job: Job, exc: Exception) -> list[bytes]:
        """The error reply of one request that failed alone; its out-of-memory error counts towards
        recycling and is answered `out_of_memory`, so the supervisor may retry it elsewhere."""
        self._device_error(exc)
        if isinstance(exc, torch.OutOfMemoryError):
            self.telemetry.ooms += 1
            log.warning("event=out_of_memory key=%d slot=%d", job.key, self.spec.slot)
            exc = OutOfMemory(str(exc).splitlines()[0])
        return self._failed(job, exc)

    def _failed(self, job: Job, exc: Exception) -> list[bytes]:
        """The error reply of a request: its own `QvlError`, or `internal` (logged) for ours."""
        if not isinstance(exc, QvlError):
            log.error("event=request_failed key=%d error=%s", job.key, type(exc).__name__, exc_info=exc)
            exc = InternalError(f"{type(exc).__name__}: {exc}")
        self.done += 1
        return encode(ErrorReply(job.key, exc, self.read_telemetry()).header())

    def _between_steps(self, jobs: list[Job], streamed: dict[int, str]) -> Progress:
        """What runs every few generation steps: take the requests that arrived meanwhile (their
        images start opening), answer the jobs cancelled meanwhile with their text so far, and send
        each streaming job's new text as a `chunk`.
        `streamed` holds the text sent so far per job, so a batch run again sends no text twice."""
        streaming = any(job.stream for job in jobs)

        steps = itertools.count(1)

        def progress(rows: Callable[[], list[list[int]]]) -> None:
            self._take_requests()
            self._expire()
            self.faults.on_progress(next(steps), len(jobs))
            if not (streaming or any(job.key in self.cancelling for job in jobs)):
                return
            for job, row in zip(jobs, rows()):
                if job.key in self.cancelling:
                    self._answer_cancelled(job, row, streamed.get(job.key, ""))
                if not (job.stream and row and job.key in self.running):
                    continue
                text, sent = self.engine.detokenize(row, job.params.stop), streamed.get(job.key, "")
                # a half-detokenized multi-byte character shows as U+FFFD: wait for the rest of it
                if len(text) > len(sent) and text.startswith(sent) and not text.endswith("\ufffd"):
                    self._send(Chunk(job.key, text[len(sent):]).header())
                    streamed[job.key] = text
        return progress

    def _answer_cancelled(self, job: Job, row: list[int], sent: str) -> None:
        """Answer a running job cancelled: the text of its tokens so far, which extends what it
        streamed (a half-made character at the end waits for no one). A row whose text already
        holds a stop string had ended before the cancel: its answer is cut there, finish_reason
        "stop", as its batch's reply would have been. Its batch's reply is dropped."""
        tokens = self.engine.until_eos(row)
        text = self.engine.text_of(tokens)
        if find_stop(text, job.params.stop) is not None:
            ended = self.engine.completion(tokens, 0, job.params.stop, 0.0, 0.0)
            text, count, finish = ended.text, ended.completion_tokens, STOPPED
        else:
            text, count, finish = text.rstrip("\ufffd"), len(row), CANCELLED
        self._send(self._cancelled(job, text if text.startswith(sent) else sent, count, finish))
        self.cancelling.discard(job.key)
        del self.running[job.key]
        log.info("event=cancelled key=%d where=running tokens=%d", job.key, len(row))

    def _images(self, job: Job, request: GenerateRequest) -> Future:
        """A request's images, opened and processed on the image pool while the model works; for an
        engine whose text-only prompts are made there too (`text_prompts_on_pool`), its prompt."""
        if request.images or getattr(self.engine, "text_prompts_on_pool", False):
            images = self.image_pool.submit(self._process_images, job, request)
            if self.engine.steps:  # the step loop sleeps until they are ready
                images.add_done_callback(lambda _: self.bell.ring())
            return images
        return _NO_IMAGES  # text only: no hop through the pool

    def _process_images(self, job: Job, request: GenerateRequest) -> ImageInputs:
        """Image tokens counted from the headers first: a request too long decodes no pixel."""
        started = time.perf_counter()
        try:
            self.engine.check_images(request.messages,
                                     [image_size(f, self.spec.max_image_pixels) for f in request.images], request.params)
            frames = [open_image(f, self.spec.max_image_pixels) for f in request.images]
            return self.engine.process_images(request.messages, frames, request.params)
        finally:
            job.images_ms = (time.perf_counter() - started) * 1000.0
