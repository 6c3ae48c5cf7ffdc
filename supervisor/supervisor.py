"""The supervisor's event loop: one thread that owns every request, slot and socket.

Reads like gunicorn's arbiter: `run` polls the frontend (clients), the backend (workers) and a
signal pipe, then calls a few steps with telling names. Signal handlers do nothing; the signal
numbers arrive through the wakeup pipe and the loop acts on them in its own time.
"""

import collections
import itertools
import logging
import os
import shutil
import signal
import tempfile
import time

import zmq

from qvl.protocol.codec import (BYE, GENERATE, HEARTBEAT, HELLO, PROTOCOL_VERSION, READY, REPLY,
                                STOP, decode, encode, error_header)
from qvl.protocol.errors import (BadRequest, DeadlineExceeded, Overloaded, QvlError,
                                 ShuttingDown, WorkerFailed)
from qvl.protocol.messages import parse_generate

from .config import Config
from .control import COMMANDS
from .events import event
from .requests import Request, RequestQueue
from .slots import LIVE, SlotState, WorkerSlot, restart_delay

_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
_MAX_BATCH_READ = 512  # messages read from one socket before the loop moves on


class Supervisor:
    def __init__(self, config: Config):
        self.config = config
        self.limits = config.limits
        self.queue = RequestQueue(config.queue_size)
        self.slots = [WorkerSlot(i) for i in range(config.workers)]
        self.by_identity: dict[bytes, WorkerSlot] = {}
        self.keys = itertools.count(1)
        self.counters: collections.Counter = collections.Counter()
        self.started_at = time.monotonic()
        self.shutting_down = False
        self.shutdown_deadline = 0.0
        self.done = False

    # --- setup and teardown ---------------------------------------------------------------

    def _open(self) -> None:
        self.ctx = zmq.Context()
        self.run_dir = tempfile.mkdtemp(prefix="qvl-")  # private (0700): only our workers connect
        self.backend_endpoint = f"ipc://{self.run_dir}/backend"
        self.frontend = self._router(self.limits.transport_cap)
        self.frontend.bind(self.config.frontend)
        self.backend = self._router(-1)
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

    def _router(self, max_msg_size: int) -> zmq.Socket:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.MAXMSGSIZE, max_msg_size)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        sock.setsockopt(zmq.SNDHWM, 0)
        sock.setsockopt(zmq.RCVHWM, 0)
        return sock

    def _close(self) -> None:
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
        try:
            while not self.done:
                self.poll()
                self.reap_workers()
                self.check_liveness()
                self.expire_deadlines()
                self.dispatch()
                self.manage_slots()
                self.finish_shutdown()
        finally:
            self._kill_all()
            self._close()
        event("supervisor_exit", served=self.counters["answered"])
        return 0

    # --- input ----------------------------------------------------------------------------

    def poll(self) -> None:
        events = dict(self.poller.poll(self._poll_timeout_ms()))
        if self.wakeup_r in events:
            self.handle_signals()
        if self.backend in events:
            for _ in range(_MAX_BATCH_READ):
                try:
                    parts = self.backend.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self.on_worker_message(parts[0], parts[1:])
        if self.frontend in events:
            for _ in range(_MAX_BATCH_READ):
                try:
                    parts = self.frontend.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self.on_client_message(parts[0], parts[1:])

    def _poll_timeout_ms(self) -> int:
        now = time.monotonic()
        due = [now + self.config.heartbeat_interval_s]
        due += [s.respawn_at for s in self.slots if s.state is SlotState.EXITED]
        due += [s.stop_deadline for s in self.slots if s.state is SlotState.STOPPING]
        if self.queue.next_deadline() is not None:
            due.append(self.queue.next_deadline())
        if self.shutting_down:
            due.append(self.shutdown_deadline)
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
        try:
            header, frames = decode(parts, self.limits)
            kind = header["kind"]
            if kind == GENERATE:
                self.accept(client, header, frames)
            elif kind in COMMANDS:
                reply = {"v": PROTOCOL_VERSION, "id": header.get("id"), "ok": True}
                reply.update(COMMANDS[kind](self, header))
                self.frontend.send_multipart([client, *encode(reply)])
            else:
                raise BadRequest(f"unknown kind {kind!r}", header.get("id"))
        except QvlError as exc:
            self.counters[exc.code] += 1
            self.frontend.send_multipart([client, *encode(error_header(exc))])

    def accept(self, client: bytes, header: dict, frames: list[bytes]) -> None:
        if self.shutting_down:
            raise ShuttingDown("the supervisor is shutting down", header.get("id"))
        request = parse_generate(header, frames, self.limits)
        if self.queue.full:
            raise Overloaded(f"queue is full ({self.queue.capacity} waiting)", request.id)
        key = next(self.keys)
        worker_header = {"v": PROTOCOL_VERSION, "kind": GENERATE, "id": key,
                         "messages": request.messages, "params": request.header()["params"]}
        now = time.monotonic()
        deadline = now + request.timeout_ms / 1000.0 if request.timeout_ms else None
        self.queue.push(Request(key, client, request.id, encode(worker_header, frames),
                                accepted_at=now, deadline=deadline))
        self.counters["accepted"] += 1

    def on_worker_message(self, identity: bytes, parts: list[bytes]) -> None:
        slot = self.by_identity.get(identity)
        if slot is None:
            return  # a former incarnation's last words
        header, _ = decode(parts)
        slot.last_seen = time.monotonic()
        kind = header["kind"]
        if "telemetry" in header:
            slot.telemetry = header["telemetry"]
        if kind == REPLY:
            self.on_reply(slot, header)
        elif kind == HELLO and slot.state is SlotState.SPAWNING:
            slot.set_state(SlotState.LOADING, "hello")
        elif kind == READY and slot.state in (SlotState.SPAWNING, SlotState.LOADING):
            slot.set_state(SlotState.READY, "loaded", load_s=header.get("load_s"))
        elif kind not in (HEARTBEAT, BYE, HELLO, READY):
            event("worker_protocol_error", logging.WARNING, worker=slot.index, kind=kind)

    def on_reply(self, slot: WorkerSlot, header: dict) -> None:
        request = slot.inflight.pop(header["id"], None)
        if request is None:
            return
        slot.served += 1
        slot.served_total += 1
        now = time.monotonic()
        if header.get("ok"):
            reply = {"v": PROTOCOL_VERSION, "id": request.client_id, "ok": True,
                     "text": header["text"], "usage": header["usage"],
                     "timings": {**header["timings"],
                                 "queue_ms": (request.dispatched_at - request.accepted_at) * 1000,
                                 "total_ms": (now - request.accepted_at) * 1000},
                     "worker": {"slot": slot.index, "generation": slot.generation, "pid": slot.pid}}
            self.counters["answered"] += 1
        else:
            reply = {"v": PROTOCOL_VERSION, "id": request.client_id, "ok": False,
                     "error": header["error"]}
            self.counters[header["error"].get("code", "internal")] += 1
        self.frontend.send_multipart([request.client, *encode(reply)])

    def fail(self, request: Request, exc: QvlError) -> None:
        self.counters[exc.code] += 1
        self.frontend.send_multipart([request.client, *encode(error_header(exc, request.client_id))])

    # --- work -----------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Hand queued requests to the least-loaded ready workers with room."""
        while len(self.queue):
            slot = min((s for s in self.slots if s.state is SlotState.READY
                        and len(s.inflight) < self.config.max_inflight),
                       key=lambda s: len(s.inflight), default=None)
            if slot is None:
                return
            request = self.queue.pop()
            request.attempts += 1
            request.dispatched_at = time.monotonic()
            slot.inflight[request.key] = request
            self.backend.send_multipart([slot.identity, *request.worker_parts], copy=False)

    def expire_deadlines(self) -> None:
        for request in self.queue.remove_expired(time.monotonic()):
            self.fail(request, DeadlineExceeded("deadline passed while queued", request.client_id))

    # --- workers --------------------------------------------------------------------------

    def manage_slots(self) -> None:
        """Fill empty slots whose backoff has passed; stop drained ones."""
        now = time.monotonic()
        for slot in self.slots:
            if slot.state is SlotState.EXITED and not self.shutting_down and now >= slot.respawn_at:
                slot.spawn(self.config, self.backend_endpoint)
                self.by_identity[slot.identity] = slot
            elif slot.state is SlotState.DRAINING and not slot.inflight:
                self.stop_worker(slot, slot.last_reason)
            elif slot.state is SlotState.STOPPING:
                slot.escalate(now, self.config.kill_grace_s)

    def request_recycle(self, slot: WorkerSlot, reason: str) -> bool:
        if slot.state is not SlotState.READY or self.shutting_down:
            return False
        event("recycle", worker=slot.index, gen=slot.generation, reason=reason)
        slot.set_state(SlotState.DRAINING, reason)
        return True

    def stop_worker(self, slot: WorkerSlot, reason: str) -> None:
        self.backend.send_multipart([slot.identity, *encode({"v": PROTOCOL_VERSION, "kind": STOP})])
        slot.signals_sent = 0
        slot.stop_deadline = time.monotonic() + self.config.kill_grace_s
        slot.set_state(SlotState.STOPPING, reason)

    def reap_workers(self) -> None:
        for slot in self.slots:
            if slot.process is None or slot.process.poll() is None:
                continue
            code = slot.process.returncode
            expected = slot.state is SlotState.STOPPING
            del self.by_identity[slot.identity]
            for request in slot.inflight.values():
                self.retry(request, slot)
            slot.inflight.clear()
            slot.process = None
            if expected:
                if not self.shutting_down:
                    slot.recycles += 1
                slot.respawn_at = 0.0
                slot.set_state(SlotState.EXITED, f"exit code {code}")
            else:
                self.on_crash(slot, code)

    def on_crash(self, slot: WorkerSlot, code: int) -> None:
        now = time.monotonic()
        slot.crashes.append(now)
        while slot.crashes and slot.crashes[0] < now - self.config.restart_period_s:
            slot.crashes.popleft()
        self.counters["worker_crashes"] += 1
        reason = f"crashed (signal {-code})" if code < 0 else f"crashed (exit code {code})"
        if len(slot.crashes) >= self.config.restart_intensity:
            slot.set_state(SlotState.FAILED, f"{reason}; {len(slot.crashes)} crashes within "
                                             f"{self.config.restart_period_s:g}s")
            return
        slot.restarts += 1
        delay = restart_delay(len(slot.crashes), self.config)
        slot.respawn_at = now + delay
        slot.set_state(SlotState.EXITED, reason, backoff_s=delay)

    def retry(self, request: Request, slot: WorkerSlot) -> None:
        if request.attempts >= self.config.max_attempts:
            self.fail(request, WorkerFailed(
                f"worker {slot.index} died with this request, after {request.attempts} attempts",
                request.client_id))
        else:
            self.queue.push_front(request)

    def check_liveness(self) -> None:
        now = time.monotonic()
        silence = self.config.heartbeat_interval_s * self.config.heartbeat_liveness
        for slot in self.slots:
            starting = slot.state in (SlotState.SPAWNING, SlotState.LOADING)
            if starting and now - slot.state_since > self.config.start_timeout_s:
                self.kill(slot, "start timeout")
            elif slot.state in (SlotState.READY, SlotState.DRAINING) and now - slot.last_seen > silence:
                self.kill(slot, f"no heartbeat for {now - slot.last_seen:.1f}s")

    def kill(self, slot: WorkerSlot, reason: str) -> None:
        event("worker_kill", logging.WARNING, worker=slot.index, gen=slot.generation,
              pid=slot.pid, reason=reason)
        slot.signal(signal.SIGKILL)
        slot.last_seen = time.monotonic()  # one kill per silence; reaping follows the exit

    # --- shutdown -------------------------------------------------------------------------

    def begin_shutdown(self, reason: str) -> None:
        if self.shutting_down:
            return
        event("shutdown", reason=reason, queued=len(self.queue),
              inflight=sum(len(s.inflight) for s in self.slots))
        self.shutting_down = True
        self.shutdown_deadline = time.monotonic() + self.config.stop_grace_s

    def finish_shutdown(self) -> None:
        """Once accepted work is done (or the grace period is over), stop workers and end."""
        if not self.shutting_down:
            return
        busy = len(self.queue) or any(s.inflight for s in self.slots)
        overdue = time.monotonic() >= self.shutdown_deadline
        if busy and not overdue:
            return
        for request in self.queue.drain():
            self.fail(request, ShuttingDown("shut down before a worker took it", request.client_id))
        for slot in self.slots:
            for request in slot.inflight.values():
                self.fail(request, ShuttingDown("shut down before it finished", request.client_id))
            slot.inflight.clear()
            if slot.state in LIVE and slot.state is not SlotState.STOPPING:
                self.stop_worker(slot, "shutdown")
        self.done = not any(s.state in LIVE for s in self.slots)

    def _kill_all(self) -> None:
        """Last resort on the way out: no worker outlives the supervisor."""
        for slot in self.slots:
            if slot.process and slot.process.poll() is None:
                slot.signal(signal.SIGKILL)
                slot.process.wait()

