"""The supervisor's event loop: one thread that owns every request, slot and socket.

Reads like gunicorn's arbiter: `run` polls the frontend (clients), the backend (workers) and a
signal pipe, then calls a few steps with telling names. Signal handlers do nothing; the signal
numbers arrive through the wakeup pipe and the loop acts on them in its own time.
"""

import collections
import errno
import functools
import itertools
import logging
import math
import os
import resource
import shutil
import signal
import tempfile
import time
from typing import Iterator

import zmq

from qvl.protocol.codec import CANCEL, GENERATE, PROTOCOL_VERSION, decode, encode, error_header
from qvl.protocol.curve import admin_keys, serve_securely
from qvl.protocol.errors import (BadRequest, DeadlineExceeded, InternalError, OutOfMemory, Overloaded,
                                 QvlError, ShuttingDown, WorkerFailed)
from qvl.protocol.exits import WorkerExit
from qvl.protocol.messages import (CANCELLED, Cancel, Chunk, ErrorReply, Hello, Load, Ready, Reply, Stop,
                                   parse_generate, parse_worker_message)

from .config import Config, ConfigError
from .control import ADMIN_COMMANDS, COMMANDS
from .devices import DeviceMonitor
from .events import event
from .gateway_process import GatewayProcess
from .launcher import Launcher, become_subreaper, exec_worker, kill_strays, reap_strays
from .metrics import Metrics
from .lifecycle import (Accept, Action, Count, Incarnation, KillSpare, KillWorker, LoadSpare, Log,
                        RecycleStarted, Save, SlotLifecycle, Spawn, SpawnSpare, StopSpare, StopWorker,
                        WorkerState)
from .policy import recycle_verdict, tripped_at_start
from .requests import OpenRequests, Request, RequestQueue
from .slots import Slot, SparePeer, Worker, slot_gpus, telemetry_fields, worker_env
from .state import load_state, restore, save_state
from .systemd import Notifier

_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)
_RESERVED_DESCRIPTORS = 64  # a worker start needs a few, its connections more
_MAX_BATCH_READ = 512  # messages read from one socket before the loop moves on
_FRONTEND_HEARTBEAT_MS = 10_000


class Supervisor:
    def __init__(self, config: Config):
        self.config = config
        self.limits = config.limits
        self.queue = RequestQueue(config.queue_size)
        self.open = OpenRequests(config.queue_bytes)  # accepted and not answered yet: what a cancel can name
        self.devices = DeviceMonitor()
        self.slots = [Slot(i, SlotLifecycle(i, config, time.monotonic()), gpu)
                      for i, gpu in enumerate(slot_gpus(config, self.devices.gpu_count()))]
        if not self.slots:
            raise ConfigError("gpus = all, but NVML sees no GPU")
        self.by_identity: dict[bytes, Worker] = {}
        self.spare_by_identity: dict[bytes, SparePeer] = {}
        self.keys = itertools.count(1)
        self.counters: collections.Counter = collections.Counter()
        restore(load_state(config.state_file), self.slots, self.counters)
        self.metrics = Metrics()
        self.started_at = time.monotonic()
        self.shutting_down = False
        self.shutdown_deadline = 0.0
        self.done = False
        self.gateway = GatewayProcess(config) if config.http else None
        self.launcher: Launcher | None = None  # forks the workers while `config.forks_workers`
        self.child_exited = False  # a SIGCHLD came since the strays were last reaped
        self.notifier = Notifier()

    # --- setup and teardown ---------------------------------------------------------------

    def _open(self) -> None:
        _raise_descriptor_limit()
        self.ctx = zmq.Context()
        self.run_dir = tempfile.mkdtemp(prefix="qvl-")  # private (0700): only our workers connect
        self.backend_endpoint = f"ipc://{self.run_dir}/backend"
        self.frontend = self._router(self.limits.transport_cap, self.config.frontend_hwm)
        # ZMTP heartbeats: a peer whose TCP connection died silently is dropped with its queued replies
        self.frontend.setsockopt(zmq.HEARTBEAT_IVL, _FRONTEND_HEARTBEAT_MS)
        self.frontend.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * _FRONTEND_HEARTBEAT_MS)
        self.auth = serve_securely(self.frontend, self.ctx, self.config.curve_dir) if self.config.curve_dir else None
        self.admins = admin_keys(self.config.curve_dir) if self.config.curve_dir else None
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
        if self.config.forks_workers:
            become_subreaper()  # the launcher's workers are re-parented to this process
            self.launcher = Launcher(worker_env(self.config, None))
            self.poller.register(self.launcher.fileno(), zmq.POLLIN)

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
            self.gateway.stop()
        if self.launcher is not None:
            self.launcher.close()
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
        steps = (self.notifier.watchdog, self.poll, self.reap_workers, self.expire_deadlines,
                 self.dispatch,  # before the rest of the upkeep: it is on every request's path
                 self.check_liveness, self.manage_slots, self.finish_shutdown, self.keep_gateway)
        try:
            while not self.done:
                for step in steps:
                    self.run_step(step)
        finally:
            self._kill_all()
            save_state(self.config.state_file, self.slots, self.counters)
            self._close()
        event("supervisor_exit", answered=self.counters["answered"])
        return 0

    def run_step(self, step) -> None:
        """One step of the loop. A step that fails (out of descriptors or memory, or a fault of
        ours) is logged and the loop goes on: the supervisor holds every accepted request."""
        try:
            step()
        except Exception as exc:
            self.counters["loop_step_failures"] += 1
            event("loop_step_failed", logging.ERROR, exc_info=True, step=step.__name__,
                  error=f"{type(exc).__name__}: {exc}")

    def keep_gateway(self) -> None:
        if self.gateway is not None:
            self.gateway.tick(time.monotonic())

    def workers(self) -> list[Worker]:
        return [w for slot in self.slots for w in slot.workers()]

    def spare_peers(self) -> list[SparePeer]:
        return [p for slot in self.slots for p in slot.spares.values()]

    # --- input ----------------------------------------------------------------------------

    def poll(self) -> None:
        events = dict(self.poller.poll(self._poll_timeout_ms()))
        if self.wakeup_r in events:
            self.handle_signals()
        if self.launcher is not None and self.launcher.usable and self.launcher.fileno() in events:
            self.launcher.read()
        if self.backend in events:
            for parts in self._receive(self.backend):
                self.on_worker_message(parts[0], parts[1:])
        if self.frontend in events:
            if self.admins is None:  # no CurveZMQ: whoever reaches the frontend is trusted
                for parts in self._receive(self.frontend):
                    self.on_client_message(parts[0], parts[1:])
                return
            for frames in self._receive(self.frontend, copy=False):  # frames carry the client's key
                admin = frames[-1].get("User-Id").encode() in self.admins
                self.on_client_message(frames[0].bytes, [f.bytes for f in frames[1:]], admin)

    def _receive(self, sock: zmq.Socket, copy: bool = True) -> Iterator[list]:
        """The messages waiting on `sock`, at most `_MAX_BATCH_READ` before the loop moves on."""
        for _ in range(_MAX_BATCH_READ):
            try:
                parts = sock.recv_multipart(zmq.NOBLOCK, copy=copy)
            except zmq.Again:
                return
            yield parts

    def _poll_timeout_ms(self) -> int:
        now = time.monotonic()
        due = [now + min(self.config.heartbeat_interval_s, 1.0)]
        due += [t for s in self.slots if (t := s.lifecycle.next_due(now)) is not None]
        due += [w.process.stop_deadline for w in self.workers() if w.state is WorkerState.STOPPING]
        due += [p.process.stop_deadline for p in self.spare_peers() if p.stopping]
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
            elif signum == signal.SIGCHLD:
                self.child_exited = True

    def on_client_message(self, client: bytes, parts: list[bytes], admin: bool = True) -> None:
        """Answer or queue what a client sent. Every failure becomes a typed reply: `bad_request`
        and its kin for what the client sent, `internal` (logged once) for our own fault.
        `admin`: the client may send control commands that change the service (`recycle`)."""
        rid = None
        try:
            header, frames = decode(parts, self.limits)
            rid = header.get("id")
            kind = header["kind"]
            if kind == GENERATE:
                self.accept(client, header, frames)
            elif kind == CANCEL:
                self.cancel(client, Cancel.parse(header))
            elif kind in COMMANDS:
                if kind in ADMIN_COMMANDS and not admin:
                    raise BadRequest(f"`{kind}` needs an admin client key (the curve folder's admin/)", rid)
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
        forwarded = request.header()  # with the supervisor's own key; the deadline is set at dispatch
        forwarded["id"] = key
        if request.timeout_ms is not None:
            forwarded["timeout_ms"] = float(request.timeout_ms)
        worker_parts = encode(forwarded, frames)
        if len(worker_parts[0]) > self.limits.max_header_bytes:  # the worker decodes with these limits
            raise BadRequest(f"header of {len(worker_parts[0])} bytes, as forwarded, exceeds "
                             f"{self.limits.max_header_bytes}", request.id)
        now = time.monotonic()
        deadline = now + request.timeout_ms / 1000.0 if request.timeout_ms else None
        queued = Request(key, client, request.id, worker_parts, accepted_at=now, deadline=deadline)
        refusal = self.queue.refusal() or self.open.refusal(queued.size)
        if refusal:
            raise Overloaded(refusal, request.id)
        self.queue.push(queued)
        self.open.add(queued)
        self.counters["accepted"] += 1

    def cancel(self, client: bytes, cancel: Cancel) -> None:
        """A client abandons one of its requests; a cancel has no reply of its own. Still queued,
        the request is answered "cancelled" now; on a worker, the worker is told, and its answer
        (or its death) ends the request. A cancel that names no open request of this client's
        is ignored."""
        found = self.open.cancel(client, cancel.id, self.queue)
        if found is None:
            event("cancel_ignored", logging.DEBUG, id=cancel.id)
            return
        request = found.request
        worker = None if found.queued else self.by_identity.get(request.worker)
        if worker is None or request.key not in worker.inflight:  # nothing else will answer it
            event("request_cancelled", key=request.key, where="queued" if found.queued else "nowhere")
            self.answer_cancelled(request)
            return
        event("request_cancelled", key=request.key, where="worker", worker=worker.slot, gen=worker.generation)
        self.backend.send_multipart([worker.identity, *encode(Cancel(request.key).header())])

    def on_worker_message(self, identity: bytes, parts: list[bytes]) -> None:
        """A worker's message, typed. One that cannot be read is logged and dropped: a worker's
        mistake never ends the supervisor (a worker that stops making sense stops heartbeating)."""
        worker = self.by_identity.get(identity)
        if worker is None:
            if identity in self.spare_by_identity:
                self.on_spare_message(self.spare_by_identity[identity], parts)
            return  # else a former incarnation's last words
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
        if isinstance(message, (Reply, ErrorReply, Chunk)):
            worker.last_answer = worker.last_seen
        try:
            if isinstance(message, (Reply, ErrorReply)):
                self.on_reply(worker, message)
            elif isinstance(message, Chunk):
                self.on_chunk(worker, message)
            elif isinstance(message, Hello):
                slot = self.slots[worker.slot]
                self.apply(slot, slot.lifecycle.hello(worker.generation, time.monotonic()))
            elif isinstance(message, Ready):
                self.on_ready(self.slots[worker.slot], worker, message)
            self.judge(worker)
        except Exception as exc:  # a fault of ours: logged, and the loop goes on
            self.counters[InternalError.code] += 1
            event("worker_message_failed", logging.ERROR, exc_info=True, worker=worker.slot,
                  gen=worker.generation, error=f"{type(exc).__name__}: {exc}")

    def on_spare_message(self, peer: SparePeer, parts: list[bytes]) -> None:
        """A spare says one thing, `hello` once its imports are done; anything else is logged and dropped."""
        try:
            message = parse_worker_message(decode(parts, self.limits)[0])
            if not (isinstance(message, Hello) and message.spare and message.generation == peer.number):
                raise BadRequest(f"a spare sends only its hello, not {type(message).__name__}")
        except QvlError as exc:
            self.counters["worker_bad_messages"] += 1
            event("spare_bad_message", logging.WARNING, worker=peer.slot, spare=peer.number, error=exc.message)
            return
        slot = self.slots[peer.slot]
        self.apply(slot, slot.lifecycle.spare_hello(peer.number, time.monotonic()))

    def on_chunk(self, worker: Worker, chunk: Chunk) -> None:
        request = worker.inflight.get(chunk.id)
        if request is not None:
            request.streamed_text += chunk.text
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
                and not request.streamed and not request.cancelled:
            self.counters["oom_retries"] += 1  # a fresh worker may well have the memory
            request.failed_on = worker.identity
            self.queue.push_front(request)
            return
        if error is not None:
            self.fail(request, error)
            return
        now = time.monotonic()
        self.metrics.latency.observe(now - request.accepted_at)
        self.counters["cancelled" if message.finish_reason == CANCELLED else "answered"] += 1
        timings = {**message.timings, "queue_ms": (request.dispatched_at - request.accepted_at) * 1000,
                   "total_ms": (now - request.accepted_at) * 1000}
        worker_info = {"slot": worker.slot, "generation": worker.generation, "pid": worker.pid}
        self.answer(request, Reply(request.client_id, message.text, message.usage, timings, worker=worker_info,
                                   finish_reason=message.finish_reason).header())

    def fail(self, request: Request, exc: QvlError) -> None:
        """Answer `request` with the error that ended it; a cancelled request ends as cancelled."""
        if request.cancelled:
            self.answer_cancelled(request)
            return
        self.counters[exc.code] += 1
        self.metrics.latency.observe(time.monotonic() - request.accepted_at)
        self.answer(request, error_header(exc, request.client_id))

    def answer_cancelled(self, request: Request) -> None:
        """The supervisor's own answer to a cancelled request: the text it streamed, if any."""
        now = time.monotonic()
        self.counters["cancelled"] += 1
        self.metrics.latency.observe(now - request.accepted_at)
        timings = {"total_ms": (now - request.accepted_at) * 1000}
        self.answer(request, Reply(request.client_id, request.streamed_text, {}, timings,
                                   finish_reason=CANCELLED).header())

    def answer(self, request: Request, header: dict) -> None:
        """Send `request` its one reply."""
        self.open.answered(request)
        self.frontend.send_multipart([request.client, *encode(header)])

    # --- work -----------------------------------------------------------------------------

    def dispatch(self) -> None:
        """Hand queued requests to the least-loaded ready workers with room."""
        if all(s.failed for s in self.slots):
            for request in self.queue.drain():  # nothing will ever take them
                self.fail(request, WorkerFailed("every worker slot has failed", request.client_id))
            return
        while len(self.queue):
            ready = [w for w in self.workers()
                     if w.accepting and len(w.inflight) < self.config.max_inflight]
            if not ready:
                return
            request = self.queue.pop()
            now = time.monotonic()
            if request.expired(now):  # its deadline passed since the last expiry pass
                self.fail(request, DeadlineExceeded("deadline passed while queued", request.client_id))
                continue
            others = [w for w in ready if w.identity != request.failed_on]  # after an OOM: elsewhere
            worker = min(others or ready, key=lambda w: len(w.inflight))
            parts = request.parts_at(now)  # before any state changes: nothing half-dispatched
            request.attempts += 1
            request.dispatched_at = now
            if request.attempts == 1:
                self.metrics.queue_time.observe(request.dispatched_at - request.accepted_at)
            worker.inflight[request.key] = request
            request.worker = worker.identity
            self.backend.send_multipart([worker.identity, *parts], copy=False)

    def expire_deadlines(self) -> None:
        for request in self.queue.remove_expired(time.monotonic()):
            self.fail(request, DeadlineExceeded("deadline passed while queued", request.client_id))

    # --- the slots' lifecycles: events in, actions carried out --------------------------

    def apply(self, slot: Slot, actions: list[Action]) -> None:
        """Carry out what a slot's lifecycle decided."""
        for action in actions:
            match action:
                case Spawn(worker=life):
                    self.spawn(slot, life)
                case Accept(generation=gen, on=on):
                    slot.peers[gen].accepting = on
                case StopWorker(generation=gen, reason=reason):
                    self.stop_worker(slot.peers[gen], reason)
                case KillWorker(generation=gen, reason=reason):
                    self.kill(slot.peers[gen], reason)
                case Log(name=name, fields=fields, level=level):
                    event(name, level, **fields)
                case Count(key=key):
                    self.counters[key] += 1
                case RecycleStarted(reason=reason):
                    self.metrics.recycles[reason] += 1
                case Save():
                    save_state(self.config.state_file, self.slots, self.counters)
                case SpawnSpare(number=number):
                    self.spawn_spare(slot, number)
                case LoadSpare(number=number, worker=life):
                    self.load_spare(slot, number, life)
                case StopSpare(number=number):
                    peer = slot.spares[number]
                    peer.stopping = True
                    peer.process.terminate(time.monotonic(), self.config.kill_grace_s)
                case KillSpare(number=number, reason=reason):
                    peer = slot.spares[number]
                    event("spare_kill", logging.WARNING, worker=slot.index, spare=number, pid=peer.pid,
                          reason=reason)
                    peer.process.kill()

    def judge(self, worker: Worker) -> None:
        """Apply the recycle policy to a worker's latest telemetry; its lifecycle decides what follows."""
        verdict = recycle_verdict(worker.telemetry, worker.served,
                                  time.monotonic() - worker.started_at, self.config,
                                  worker.requests_jitter, ignore=worker.exempt)
        if verdict:
            slot = self.slots[worker.slot]
            self.apply(slot, slot.lifecycle.verdict(worker.generation, verdict, time.monotonic(),
                                                    telemetry_fields(worker.telemetry)))

    def request_recycle(self, slot: Slot, reason: str) -> bool:
        """An operator's recycle (or SIGHUP's); False when the slot cannot recycle now."""
        actions = slot.lifecycle.operator_recycle(reason, time.monotonic())
        self.apply(slot, actions)
        return bool(actions)

    def has_room(self, slot: Slot) -> bool:
        """Whether a second copy of the slot's current worker fits beside it now."""
        mode = self.config.recycle_overlap
        if mode != "auto":
            return mode == "always"
        worker = slot.current
        if worker is None:
            return False
        margin = 1 + self.config.recycle_overlap_margin
        if slot.gpu is None:
            rss = self.devices.rss(worker.pid) or 0
            return self.devices.host_available() >= rss * margin
        memory = self.devices.gpu_memory(slot.gpu)  # the slot's own device
        if memory is None:
            return False
        footprint = self.devices.tree_gpu_bytes(self.devices.gpu_process_memory(slot.gpu), worker.pid) \
            or worker.telemetry.get("reserved_bytes", 0) + (1 << 30)  # + context, if NVML can't see pids
        return memory["free_bytes"] >= footprint * margin

    def on_ready(self, slot: Slot, worker: Worker, message: Ready) -> None:
        self.apply(slot, slot.lifecycle.ready(worker.generation, time.monotonic(), message.load_s))
        tripped = tripped_at_start(worker.telemetry, self.config)
        worker.exempt = tuple(v.reason for v in tripped)
        for v in tripped:  # recycling it would give a worker that trips it again, forever
            event("threshold_at_start", logging.WARNING, worker=slot.index, gen=worker.generation,
                  reason=v.reason, value=v.value, threshold=v.threshold, action="ignored for this worker")
        ready = sum(1 for w in self.workers() if w.accepting)
        self.notifier.ready(f"{ready} of {len(self.slots)} workers ready")

    # --- workers --------------------------------------------------------------------------

    def start_process(self, args: list[str], env: dict):
        """A worker or spare process: forked by the launcher while it serves, else exec'd. `OSError`
        when this process is short of descriptors: libzmq aborts the process when accepting the
        worker's connection finds none (an exec'd start would fail first; a forked one would not)."""
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and _open_descriptors() > soft - _RESERVED_DESCRIPTORS:
            raise OSError(errno.EMFILE, f"fewer than {_RESERVED_DESCRIPTORS} descriptors left of {soft}")
        if self.launcher is not None and self.launcher.usable:
            return self.launcher.launch(args, env)
        return exec_worker(args, env)

    def spawn(self, slot: Slot, life: Incarnation) -> None:
        try:
            worker = slot.spawn(life, self.config, self.backend_endpoint, self.start_process)
        except OSError as exc:  # out of descriptors, memory or processes: a start that failed, backed off
            event("spawn_failed", logging.ERROR, worker=slot.index, gen=life.generation, error=str(exc))
            self.apply(slot, slot.lifecycle.exited(life.generation, WorkerExit.SPAWN_FAILED, time.monotonic()))
            return
        for identity in worker.identities:
            self.by_identity[identity] = worker
        worker.process.when_started(lambda pid: self.apply(slot, slot.lifecycle.spawned(life.generation, pid)))

    def spawn_spare(self, slot: Slot, number: int) -> None:
        try:
            peer = slot.spawn_spare(number, self.config, self.backend_endpoint, self.start_process)
        except OSError as exc:  # a spare that could not start: backed off as one that died
            event("spawn_failed", logging.ERROR, worker=slot.index, spare=number, error=str(exc))
            self.apply(slot, slot.lifecycle.spare_exited(number, WorkerExit.SPAWN_FAILED, time.monotonic()))
            return
        self.spare_by_identity[peer.identity] = peer
        peer.process.when_started(lambda pid: self.apply(slot, slot.lifecycle.spare_spawned(number, pid)))

    def load_spare(self, slot: Slot, number: int, life: Incarnation) -> None:
        """The spare becomes the incarnation `life`: it is sent its spec and connects anew as that worker."""
        peer = slot.spares[number]
        del self.spare_by_identity[peer.identity]
        worker, spec = slot.adopt_spare(number, life, self.config, self.backend_endpoint)
        for identity in worker.identities:
            self.by_identity[identity] = worker
        self.backend.send_multipart([peer.identity, *encode(Load(spec.to_json()).header())])

    def manage_slots(self) -> None:
        """Let each slot's lifecycle act on the clock; escalate stops that overstay their grace."""
        now = time.monotonic()
        for slot in self.slots:
            turn = sum(s.lifecycle.recycling for s in self.slots) < self.config.max_concurrent_recycles
            busy = {w.generation for w in slot.workers() if w.inflight}
            self.apply(slot, slot.lifecycle.tick(now, busy, functools.partial(self.has_room, slot), turn))
            for worker in slot.workers():
                if worker.state is WorkerState.STOPPING:
                    sent = worker.process.escalate(now, self.config.kill_grace_s)
                    if sent:
                        event("worker_signal", worker=slot.index, gen=worker.generation,
                              pid=worker.pid, signal=sent)
            for peer in slot.spares.values():
                if peer.stopping and peer.process.escalate(now, self.config.kill_grace_s):
                    event("spare_signal", worker=slot.index, spare=peer.number, pid=peer.pid, signal="SIGKILL")

    def stop_worker(self, worker: Worker, reason: str) -> None:
        self.backend.send_multipart([worker.identity, *encode(Stop().header())])
        worker.process.begin_stop(time.monotonic(), self.config.kill_grace_s)

    def reap_workers(self) -> None:
        for slot in self.slots:
            for worker in slot.workers():
                code = worker.process.poll()
                if code is not None:
                    self.on_exit(slot, worker, code)
            for peer in list(slot.spares.values()):
                code = peer.process.poll()
                if code is not None:
                    self.spare_by_identity.pop(peer.identity, None)
                    del slot.spares[peer.number]
                    self.apply(slot, slot.lifecycle.spare_exited(peer.number, code, time.monotonic()))
        if self.launcher is not None and (self.child_exited or self.launcher.lost_launches):
            self.child_exited = False  # after the owners above reaped theirs, which would hide the rest
            self.reap_launched()

    def reap_launched(self) -> None:
        """The launcher's end, and the orphans this process inherits as a subreaper (reaped; killed
        where the launcher ended with launches unanswered: their workers are nobody's). Called once a
        child has exited (SIGCHLD): not on every turn of the loop."""
        launcher = self.launcher
        launcher.check()
        if not launcher.usable and launcher.fileno() in self.polled_fds():
            self.poller.unregister(launcher.fileno())  # its closed socket would wake every poll
        owned = {p.pid for p in self.all_processes()}
        if launcher.process.returncode is None:
            owned.add(launcher.pid)
        if self.gateway is not None and self.gateway.process is not None:
            owned.add(self.gateway.process.pid)
        if launcher.lost_launches and launcher.process.returncode is not None:
            # until a look finds none: a middle process may fork between a look and its kill
            launcher.lost_launches = kill_strays(owned) > 0
        reap_strays(owned)

    def polled_fds(self) -> set:
        return {fd for fd, _ in self.poller.sockets}

    def all_processes(self):
        """The OS processes of every worker and spare."""
        return [w.process for w in self.workers()] + [p.process for p in self.spare_peers()]

    def on_exit(self, slot: Slot, worker: Worker, code: int) -> None:
        for identity in worker.identities:
            self.by_identity.pop(identity, None)
        del slot.peers[worker.generation]
        for request in worker.inflight.values():
            self.retry(request, worker)
        worker.inflight.clear()
        self.apply(slot, slot.lifecycle.exited(worker.generation, code, time.monotonic()))

    def retry(self, request: Request, worker: Worker) -> None:
        if request.cancelled:
            self.answer_cancelled(request)  # its client gave it up: never run again
        elif request.streamed:
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
        """Tell each lifecycle of silent workers and of workers that answered none of their
        requests for the hang timeout."""
        now = time.monotonic()
        silence = self.config.heartbeat_interval_s * self.config.heartbeat_liveness
        for slot in self.slots:
            for worker in slot.workers():
                if now - worker.last_seen > silence:
                    self.apply(slot, slot.lifecycle.heartbeat_missed(worker.generation, now - worker.last_seen))
                since = worker.stalled_since()
                if since is not None and now - since > self.config.request_hang_timeout_s:
                    self.apply(slot, slot.lifecycle.hang(worker.generation, now - since))

    def kill(self, worker: Worker, reason: str) -> None:
        event("worker_kill", logging.WARNING, worker=worker.slot, gen=worker.generation,
              pid=worker.pid, reason=reason)
        worker.process.kill()

    # --- shutdown -------------------------------------------------------------------------

    def begin_shutdown(self, reason: str) -> None:
        if self.shutting_down:
            return
        event("shutdown", reason=reason, queued=len(self.queue),
              inflight=sum(len(w.inflight) for w in self.workers()))
        self.shutting_down = True
        self.shutdown_deadline = time.monotonic() + self.config.stop_grace_s
        for slot in self.slots:
            self.apply(slot, slot.lifecycle.shutdown(time.monotonic()))
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
        for slot in self.slots:
            self.apply(slot, slot.lifecycle.stop_all(time.monotonic()))
        self.done = not self.workers() and not self.spare_peers()

    def _kill_all(self) -> None:
        """Last resort on the way out: no worker outlives the supervisor."""
        for process in self.all_processes():
            process.kill()
            process.wait()


def _open_descriptors() -> float:
    """How many descriptors this process holds: infinite when not one is left to read /proc with,
    0 where /proc cannot tell."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError as exc:
        return math.inf if exc.errno in (errno.EMFILE, errno.ENFILE) else 0


def _raise_descriptor_limit(want: int = 65536) -> None:
    """Every client connection holds a descriptor: take the soft limit up to `want` where the hard
    limit allows (systemd's soft default is 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
