"""The supervisor's event loop: one thread that owns every request, slot and socket.

Reads like gunicorn's arbiter: `run` polls the frontend (clients), the backend (workers) and a
signal pipe, then calls a few steps with telling names. Signal handlers do nothing; the signal
numbers arrive through the wakeup pipe and the loop acts on them in its own time.
"""

import collections
import dataclasses
import itertools
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time

import zmq

from qvl.protocol.codec import GENERATE, PROTOCOL_VERSION, decode, encode, error_header
from qvl.protocol.curve import serve_securely
from qvl.protocol.errors import (BadRequest, DeadlineExceeded, InternalError, OutOfMemory, Overloaded,
                                 QvlError, ShuttingDown, WorkerFailed)
from qvl.protocol.messages import (Chunk, ErrorReply, Hello, Ready, Reply, Stop, parse_generate,
                                   parse_worker_message)

from .config import Config, ConfigError
from .control import COMMANDS
from .devices import DeviceMonitor
from .events import event
from .metrics import Metrics
from .policy import Verdict, recycle_verdict
from .requests import Request, RequestQueue
from .slots import STARTING, Slot, Worker, WorkerState, gateway_command, restart_delay, slot_gpus
from .state import load_state, restore, save_state
from .systemd import Notifier

_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
_MAX_BATCH_READ = 512  # messages read from one socket before the loop moves on
_ALIVE = (WorkerState.READY, WorkerState.DRAINING)
_FRONTEND_HEARTBEAT_MS = 10_000


class Supervisor:
    def __init__(self, config: Config):
        self.config = config
        self.limits = config.limits
        self.queue = RequestQueue(config.queue_size, config.queue_bytes)
        self.devices = DeviceMonitor()
        self.slots = [Slot(i, gpu) for i, gpu in enumerate(slot_gpus(config, self.devices.gpu_count()))]
        if not self.slots:
            raise ConfigError("gpus = all, but NVML sees no GPU")
        self.by_identity: dict[bytes, Worker] = {}
        self.keys = itertools.count(1)
        self.counters: collections.Counter = collections.Counter()
        restore(load_state(config.state_file), self.slots, self.counters)
        self.metrics = Metrics()
        self.started_at = time.monotonic()
        self.shutting_down = False
        self.shutdown_deadline = 0.0
        self.done = False
        self.gateway: subprocess.Popen | None = None
        self.notifier = Notifier()

    # --- setup and teardown ---------------------------------------------------------------

    def _open(self) -> None:
        self.ctx = zmq.Context()
        self.run_dir = tempfile.mkdtemp(prefix="qvl-")  # private (0700): only our workers connect
        self.backend_endpoint = f"ipc://{self.run_dir}/backend"
        self.frontend = self._router(self.limits.transport_cap, self.config.frontend_hwm)
        # ZMTP heartbeats: a peer whose TCP connection died silently is dropped with its queued replies
        self.frontend.setsockopt(zmq.HEARTBEAT_IVL, _FRONTEND_HEARTBEAT_MS)
        self.frontend.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * _FRONTEND_HEARTBEAT_MS)
        self.auth = serve_securely(self.frontend, self.ctx, self.config.curve_dir) if self.config.curve_dir else None
        self.frontend.bind(self.config.frontend)
        if self.config.frontend.startswith("ipc://"):
            os.chmod(self.config.frontend[len("ipc://"):], 0o600)  # only this user's clients
        self.backend = self._router(-1, 0)  # our own workers, which read what they are sent
        self.backend.bind(self.backend_endpoint)
        self.wakeup_r, wakeup_w = os.pipe()
        os.set_blocking(self.wakeup_r, False)
        os.set_blocking(wakeup_w, False)
        signal.set_wakeup_fd(wakeup_w)
        for signum in _SIGNALS:
            signal.signal(signum, lambda *_: None)  # the wakeup pipe carries the number
        self.poller = zmq.Poller()
        for sock in (self.frontend, self.backend):
            self.poller.register(sock, zmq.POLLIN)
        self.poller.register(self.wakeup_r, zmq.POLLIN)

    def _router(self, max_msg_size: int, hwm: int) -> zmq.Socket:
        """A ROUTER socket; past `hwm` messages for one peer (0: no bound) replies to it are dropped."""
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.MAXMSGSIZE, max_msg_size)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
        return sock

    def _close(self) -> None:
        if self.gateway is not None:
            self.gateway.terminate()
            self.gateway.wait()
        if self.auth is not None:
            self.auth.stop()
        self.frontend.close()
        self.backend.close()
        self.ctx.term()
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if self.config.frontend.startswith("ipc://"):
            try:
                os.unlink(self.config.frontend[len("ipc://"):])
            except OSError:
                pass

    def run(self) -> int:
        self._open()
        event("supervisor_start", pid=os.getpid(), frontend=self.config.frontend,
              workers=self.config.workers, model=self.config.model, device=self.config.device)
        if self.config.http:
            self.gateway = subprocess.Popen(gateway_command(self.config), stdin=subprocess.DEVNULL)
            event("gateway_start", pid=self.gateway.pid, listen=self.config.http)
        try:
            while not self.done:
                self.notifier.watchdog()
                self.poll()
                self.reap_workers()
                self.expire_deadlines()
                self.dispatch()  # before the rest of the upkeep: it is on every request's path
                self.check_liveness()
                self.manage_slots()
                self.finish_shutdown()
        finally:
            self._kill_all()
            save_state(self.config.state_file, self.slots, self.counters)
            self._close()
        event("supervisor_exit", answered=self.counters["answered"])
        return 0

    def workers(self) -> list[Worker]:
        return [w for slot in self.slots for w in slot.workers()]

    # --- input ----------------------------------------------------------------------------

    def poll(self) -> None:
        events = dict(self.poller.poll(self._poll_timeout_ms()))
        if self.wakeup_r in events:
            self.handle_signals()
        for sock, handler in ((self.backend, self.on_worker_message),
                              (self.frontend, self.on_client_message)):
            if sock not in events:
                continue
            for _ in range(_MAX_BATCH_READ):
                try:
                    parts = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                handler(parts[0], parts[1:])

    def _poll_timeout_ms(self) -> int:
        now = time.monotonic()
        due = [now + min(self.config.heartbeat_interval_s, 1.0)]
        due += [s.respawn_at for s in self.slots if s.current is None and not s.failed]
        due += [w.stop_deadline for w in self.workers() if w.state is WorkerState.STOPPING]
        deadline = self.queue.next_deadline()
        if deadline is not None:
            due.append(deadline)
        if self.shutting_down:
            due.append(self.shutdown_deadline)
        ping = self.notifier.seconds_to_ping()
        if ping is not None:
            due.append(now + ping)
        return max(0, int((min(due) - now) * 1000) + 1)

    def handle_signals(self) -> None:
        try:
            received = os.read(self.wakeup_r, 64)
        except BlockingIOError:
            return
        for signum in received:
            if signum in (signal.SIGTERM, signal.SIGINT):
                self.begin_shutdown(signal.Signals(signum).name)
            elif signum == signal.SIGHUP:
                for slot in self.slots:
                    self.request_recycle(slot, "sighup")

    def on_client_message(self, client: bytes, parts: list[bytes]) -> None:
        """Answer or queue what a client sent. Every failure becomes a typed reply: `bad_request`
        and its kin for what the client sent, `internal` (logged once) for our own fault."""
        rid = None
        try:
            header, frames = decode(parts, self.limits)
            rid = header.get("id")
            kind = header["kind"]
            if kind == GENERATE:
                self.accept(client, header, frames)
            elif kind in COMMANDS:
                reply = {"v": PROTOCOL_VERSION, "id": rid, "ok": True}
                reply.update(COMMANDS[kind](self, header))
                self.frontend.send_multipart([client, *encode(reply)])
            else:
                raise BadRequest(f"unknown kind {kind!r}", rid)
        except QvlError as exc:
            self.counters[exc.code] += 1
            self.frontend.send_multipart([client, *encode(error_header(exc, rid))])
        except Exception as exc:
            event("client_message_failed", logging.ERROR, exc_info=True, id=rid,
                  error=f"{type(exc).__name__}: {exc}")
            self.counters[InternalError.code] += 1
            self.frontend.send_multipart([client, *encode(error_header(InternalError(
                "the supervisor failed on this message; it is logged", rid)))])

    def accept(self, client: bytes, header: dict, frames: list[bytes]) -> None:
        if self.shutting_down:
            raise ShuttingDown("the supervisor is shutting down", header.get("id"))
        if all(s.failed for s in self.slots):
            raise WorkerFailed("every worker slot has failed; see `qvl-supervisor status`",
                               header.get("id"))
        request = parse_generate(header, frames, self.limits)
        key = next(self.keys)
        forwarded = dataclasses.replace(request, id=key, timeout_ms=None)
        worker_parts = encode(forwarded.header(), frames)
        if len(worker_parts[0]) > self.limits.max_header_bytes:  # the worker decodes with these limits
            raise BadRequest(f"header of {len(worker_parts[0])} bytes, as forwarded, exceeds "
                             f"{self.limits.max_header_bytes}", request.id)
        now = time.monotonic()
        deadline = now + request.timeout_ms / 1000.0 if request.timeout_ms else None
        queued = Request(key, client, request.id, worker_parts, accepted_at=now, deadline=deadline)
        refusal = self.queue.refusal(queued.size)
        if refusal:
            raise Overloaded(refusal, request.id)
        self.queue.push(queued)
        self.counters["accepted"] += 1

    def on_worker_message(self, identity: bytes, parts: list[bytes]) -> None:
        """A worker's message, typed. One that cannot be read is logged and dropped: a worker's
        mistake never ends the supervisor (a worker that stops making sense stops heartbeating)."""
        worker = self.by_identity.get(identity)
        if worker is None:
            return  # a former incarnation's last words
        try:
            header, _ = decode(parts, self.limits)
            message = parse_worker_message(header)
        except QvlError as exc:
            self.counters["worker_bad_messages"] += 1
            event("worker_bad_message", logging.WARNING, worker=worker.slot, gen=worker.generation,
                  error=exc.message)
            return
        worker.last_seen = time.monotonic()
        if getattr(message, "telemetry", None) is not None:
            worker.telemetry = message.telemetry
        if isinstance(message, (Reply, ErrorReply)):
            self.on_reply(worker, message)
        elif isinstance(message, Chunk):
            self.on_chunk(worker, message)
        elif isinstance(message, Hello) and worker.state is WorkerState.SPAWNING:
            worker.set_state(WorkerState.LOADING, "hello")
        elif isinstance(message, Ready) and worker.state in STARTING:
            worker.set_state(WorkerState.READY, "loaded", load_s=message.load_s)
            self.on_ready(self.slots[worker.slot], worker)
        self.judge(worker)

    def on_chunk(self, worker: Worker, chunk: Chunk) -> None:
        request = worker.inflight.get(chunk.id)
        if request is not None:
            request.streamed = True
            self.frontend.send_multipart([request.client, *encode(Chunk(request.client_id, chunk.text).header())])

    def on_reply(self, worker: Worker, message: Reply | ErrorReply) -> None:
        request = worker.inflight.pop(message.id, None)
        if request is None:
            return
        slot = self.slots[worker.slot]
        worker.served += 1
        slot.served_total += 1
        error = message.error if isinstance(message, ErrorReply) else None
        if isinstance(error, OutOfMemory) and request.attempts < self.config.max_attempts \
                and not request.streamed:
            self.counters["oom_retries"] += 1  # a fresh worker may well have the memory
            self.queue.push_front(request)
            return
        now = time.monotonic()
        self.metrics.latency.observe(now - request.accepted_at)
        if error is not None:
            self.counters[error.code] += 1
            self.frontend.send_multipart([request.client, *encode(error_header(error, request.client_id))])
            return
        self.counters["answered"] += 1
        timings = {**message.timings, "queue_ms": (request.dispatched_at - request.accepted_at) * 1000,
                   "total_ms": (now - request.accepted_at) * 1000}
        worker_info = {"slot": worker.slot, "generation": worker.generation, "pid": worker.pid}
        reply = Reply(request.client_id, message.text, message.usage, timings, worker=worker_info)
        self.frontend.send_multipart([request.client, *encode(reply.header())])

    def fail(self, request: Request, exc: QvlError) -> None:
        self.counters[exc.code] += 1
        self.metrics.latency.observe(time.monotonic() - request.accepted_at)
        self.frontend.send_multipart([request.client, *encode(error_header(exc, request.client_id))])

    # --- work -----------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Hand queued requests to the least-loaded ready workers with room."""
        if all(s.failed for s in self.slots):
            for request in self.queue.drain():  # nothing will ever take them
                self.fail(request, WorkerFailed("every worker slot has failed", request.client_id))
            return
        while len(self.queue):
            ready = [s.current for s in self.slots
                     if s.current and s.current.state is WorkerState.READY
                     and len(s.current.inflight) < self.config.max_inflight]
            if not ready:
                return
            worker = min(ready, key=lambda w: len(w.inflight))
            request = self.queue.pop()
            request.attempts += 1
            request.dispatched_at = time.monotonic()
            if request.attempts == 1:
                self.metrics.queue_time.observe(request.dispatched_at - request.accepted_at)
            worker.inflight[request.key] = request
            self.backend.send_multipart([worker.identity, *request.worker_parts], copy=False)

    def expire_deadlines(self) -> None:
        for request in self.queue.remove_expired(time.monotonic()):
            self.fail(request, DeadlineExceeded("deadline passed while queued", request.client_id))

    # --- recycling ------------------------------------------------------------------------

    def judge(self, worker: Worker) -> None:
        """Apply the recycle policy to the latest telemetry of a slot's serving worker."""
        slot = self.slots[worker.slot]
        if worker is not slot.current or worker.state is not WorkerState.READY or slot.recycle:
            return
        verdict = recycle_verdict(worker.telemetry, worker.served,
                                  time.monotonic() - worker.started_at, self.config,
                                  worker.requests_jitter)
        if verdict and slot.ask_recycle(verdict, wait_idle=True):
            self.counters[f"recycle_{verdict.reason}"] += 1

    def request_recycle(self, slot: Slot, reason: str) -> bool:
        if self.shutting_down or slot.current is None or slot.current.state is not WorkerState.READY:
            return False
        if slot.ask_recycle(Verdict(reason, hard=False, value=1, threshold=1), wait_idle=False):
            self.counters[f"recycle_{reason}"] += 1
            return True
        return False

    def advance_recycle(self, slot: Slot, now: float) -> None:
        """Start a wanted recycle when its turn has come: overlapped when memory has room."""
        r, current = slot.recycle, slot.current
        if r is None or r.started or current is None or current.state is not WorkerState.READY:
            return
        if now < slot.respawn_at:
            return
        if sum(1 for s in self.slots if s.recycle and s.recycle.started) >= self.config.max_concurrent_recycles:
            return
        if r.wait_idle and current.inflight and now - r.since < self.config.recycle_soft_wait_s:
            return
        r.started, r.started_at, r.overlap = True, now, self.has_room(current)
        event("recycle", worker=slot.index, gen=current.generation, reason=r.reason, hard=r.hard,
              overlap=r.overlap)
        self.metrics.recycles[r.reason] += 1
        slot.last_reason = f"recycle: {r.reason}"
        if r.overlap and not r.hard:
            slot.successor = self.spawn(slot)  # the old worker serves until this one is ready
            return
        self.retire(slot, current, f"recycle: {r.reason}")
        slot.current = self.spawn(slot) if r.overlap else None  # else: once the old one is gone

    def has_room(self, worker: Worker) -> bool:
        """Whether a second copy of this worker fits beside it now."""
        mode = self.config.recycle_overlap
        if mode != "auto":
            return mode == "always"
        margin = 1 + self.config.recycle_overlap_margin
        gpu = self.slots[worker.slot].gpu
        if gpu is None:
            rss = self.devices.rss(worker.pid) or 0
            return self.devices.host_available() >= rss * margin
        memory = self.devices.gpu_memory(gpu)  # the slot's own device
        if memory is None:
            return False
        footprint = self.devices.gpu_process_memory(gpu).get(worker.pid) \
            or worker.telemetry.get("reserved_bytes", 0) + (1 << 30)  # + context, if NVML can't see pids
        return memory["free_bytes"] >= footprint * margin

    def on_ready(self, slot: Slot, worker: Worker) -> None:
        ready = sum(1 for s in self.slots if s.current and s.current.state is WorkerState.READY)
        self.notifier.ready(f"{ready} of {len(self.slots)} workers ready")
        if worker is slot.successor:
            self.retire(slot, slot.current, f"replaced by gen {worker.generation}")
            slot.current, slot.successor = worker, None
        if worker is slot.current and slot.recycle and slot.recycle.started:
            r = slot.recycle
            slot.recycles += 1
            event("recycle_done", worker=slot.index, gen=worker.generation, reason=r.reason,
                  overlap=r.overlap, waited_s=r.started_at - r.since,
                  took_s=time.monotonic() - r.started_at)
            slot.recycle = None
            save_state(self.config.state_file, self.slots, self.counters)

    def retire(self, slot: Slot, worker: Worker, reason: str) -> None:
        worker.set_state(WorkerState.DRAINING, reason)
        slot.retiring.append(worker)

    # --- workers --------------------------------------------------------------------------

    def spawn(self, slot: Slot) -> Worker:
        worker = slot.spawn(self.config, self.backend_endpoint)
        for identity in worker.identities:
            self.by_identity[identity] = worker
        return worker

    def manage_slots(self) -> None:
        """Fill empty slots whose backoff has passed, advance recycles, stop drained workers."""
        now = time.monotonic()
        for slot in self.slots:
            if (slot.current is None and not slot.failed and not self.shutting_down
                    and not slot.retiring and now >= slot.respawn_at):
                slot.current = self.spawn(slot)
            if not self.shutting_down:
                self.advance_recycle(slot, now)
            for worker in slot.retiring:
                if worker.state is WorkerState.DRAINING and not worker.inflight:
                    self.stop_worker(worker, "drained")
                elif worker.state is WorkerState.STOPPING:
                    worker.escalate(now, self.config.kill_grace_s)

    def stop_worker(self, worker: Worker, reason: str) -> None:
        self.backend.send_multipart([worker.identity, *encode(Stop().header())])
        worker.signals_sent = 0
        worker.stop_deadline = time.monotonic() + self.config.kill_grace_s
        worker.set_state(WorkerState.STOPPING, reason)

    def reap_workers(self) -> None:
        for slot in self.slots:
            for worker in slot.workers():
                if worker.process.poll() is not None:
                    self.on_exit(slot, worker, worker.process.returncode)

    def on_exit(self, slot: Slot, worker: Worker, code: int) -> None:
        expected = worker.state is WorkerState.STOPPING
        for identity in worker.identities:
            self.by_identity.pop(identity, None)
        for request in worker.inflight.values():
            self.retry(request, worker)
        worker.inflight.clear()
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        worker.set_state(WorkerState.EXITED, how if expected else f"crashed ({how})")
        if worker in slot.retiring:
            slot.retiring.remove(worker)
        elif worker is slot.successor:
            slot.successor = None
            if slot.recycle:
                slot.recycle.started = False  # try again after the backoff
        elif worker is slot.current:
            slot.current = None
            slot.recycle = None  # the replacement that follows is fresh anyway
        if not expected:
            self.on_crash(slot, f"crashed ({how})")

    def on_crash(self, slot: Slot, reason: str) -> None:
        now = time.monotonic()
        slot.crashes.append(now)
        while slot.crashes and slot.crashes[0] < now - self.config.restart_period_s:
            slot.crashes.popleft()
        self.counters["worker_crashes"] += 1
        slot.last_reason = reason
        if len(slot.crashes) >= self.config.restart_intensity:
            slot.failed = True
            slot.recycle = None
            event("slot_failed", logging.ERROR, worker=slot.index, reason=reason,
                  crashes=len(slot.crashes), period_s=self.config.restart_period_s)
        else:
            slot.restarts += 1
            delay = restart_delay(len(slot.crashes), self.config)
            slot.respawn_at = now + delay
            event("worker_restart", logging.WARNING, worker=slot.index, reason=reason,
                  backoff_s=delay, crashes=len(slot.crashes))
        save_state(self.config.state_file, self.slots, self.counters)

    def retry(self, request: Request, worker: Worker) -> None:
        if request.streamed:
            self.fail(request, WorkerFailed(
                f"worker {worker.slot} died after streaming part of this answer; not run again",
                request.client_id))
        elif request.attempts >= self.config.max_attempts:
            self.fail(request, WorkerFailed(
                f"worker {worker.slot} died with this request, after {request.attempts} attempts",
                request.client_id))
        else:
            self.counters["retried"] += 1
            self.queue.push_front(request)

    def check_liveness(self) -> None:
        now = time.monotonic()
        silence = self.config.heartbeat_interval_s * self.config.heartbeat_liveness
        for worker in self.workers():
            oldest = worker.oldest_dispatch()
            if worker.state in STARTING and now - worker.state_since > self.config.start_timeout_s:
                self.kill(worker, "start timeout")
            elif worker.state in _ALIVE and now - worker.last_seen > silence:
                self.kill(worker, f"no heartbeat for {now - worker.last_seen:.1f}s")
            elif oldest is not None and now - oldest > self.config.request_hang_timeout_s:
                self.kill(worker, f"request running for {now - oldest:.1f}s")

    def kill(self, worker: Worker, reason: str) -> None:
        if worker.signals_sent >= 2:
            return  # already killed; reaping follows the exit
        event("worker_kill", logging.WARNING, worker=worker.slot, gen=worker.generation,
              pid=worker.pid, reason=reason)
        worker.signal(signal.SIGKILL)
        worker.signals_sent = 2

    # --- shutdown -------------------------------------------------------------------------

    def begin_shutdown(self, reason: str) -> None:
        if self.shutting_down:
            return
        event("shutdown", reason=reason, queued=len(self.queue),
              inflight=sum(len(w.inflight) for w in self.workers()))
        self.shutting_down = True
        self.shutdown_deadline = time.monotonic() + self.config.stop_grace_s
        self.notifier.stopping()

    def finish_shutdown(self) -> None:
        """Once accepted work is done (or the grace period is over), stop workers and end."""
        if not self.shutting_down:
            return
        busy = len(self.queue) or any(w.inflight for w in self.workers())
        if busy and time.monotonic() < self.shutdown_deadline:
            return
        for request in self.queue.drain():
            self.fail(request, ShuttingDown("shut down before a worker took it", request.client_id))
        for worker in self.workers():
            for request in worker.inflight.values():
                self.fail(request, ShuttingDown("shut down before it finished", request.client_id))
            worker.inflight.clear()
            if worker.state is not WorkerState.STOPPING:
                self.stop_worker(worker, "shutdown")
            else:
                worker.escalate(time.monotonic(), self.config.kill_grace_s)
        self.done = not self.workers()

    def _kill_all(self) -> None:
        """Last resort on the way out: no worker outlives the supervisor."""
        for worker in self.workers():
            worker.signal(signal.SIGKILL)
            worker.process.wait()
