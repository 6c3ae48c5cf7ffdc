"""A spare worker process: torch, transformers and the engine imported, nothing loaded, no CUDA context.

Started by the supervisor as `python -m qvl.worker --spare SPEC` (SPEC a `SpareSpec` as JSON) with
its slot's environment, `CUDA_VISIBLE_DEVICES` included, as a worker is. The protocol is small:

    spare -> supervisor   hello {slot, generation: its number, pid, spare: true}   imports done
    supervisor -> spare   load {spec: a WorkerSpec as JSON}                         become that worker

Told to load, the spare closes its socket and runs the spec exactly as a worker started cold does:
hello, ready and heartbeats under its generation's identities. Anything else it is sent, and a
`load` whose spec cannot be read (or names another slot or backend), ends it with `BAD_SPEC`, as an
unreadable command line ends a cold worker: the supervisor already counts it as that worker, and
its exit starts the next one at once. It makes no CUDA call before the load (an import that made a
context ends it with `CUDA_FATAL`); it dies with the supervisor (`parent.py`, and a check every
second while it waits), and on SIGTERM.
"""

from __future__ import annotations

import logging
import os
import time

import torch
import zmq
from qvl.protocol.codec import encode, spare_identity
from qvl.protocol.contract import SpareSpec, WorkerSpec
from qvl.protocol.errors import QvlError
from qvl.protocol.exits import WorkerExit
from qvl.protocol.messages import Hello

from .inbox import read_spare_message
from .parent import orphaned

log = logging.getLogger("qvl.worker")
_PARENT_CHECK_MS = 1000


def import_engine(engine: str) -> None:
    """Import what a worker of `engine` would import first: the service, with the default engine's
    module; vLLM's only for it, as the service does."""
    from . import service  # noqa: F401
    if engine == "vllm":
        from . import vllm_engine  # noqa: F401


def wait_for_load(spare: SpareSpec) -> WorkerSpec | int:
    """Say hello as a spare, then wait for the `load` that makes this process a worker: its spec, or
    the exit code to end with (`ORPHANED` once the supervisor is gone, `BAD_SPEC`)."""
    started = time.monotonic()
    import_engine(spare.engine)
    if torch.cuda.is_initialized():  # an import made a CUDA context: a spare holding device memory is none
        log.error("event=spare_cuda_initialized slot=%d spare=%d", spare.slot, spare.number)
        return WorkerExit.CUDA_FATAL
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTING_ID, spare_identity(spare.slot, spare.number))
    sock.connect(spare.backend)
    try:
        sock.send_multipart(encode(Hello(spare.slot, spare.number, os.getpid(), spare=True).header()))
        log.info("event=spare_waiting slot=%d spare=%d engine_import_s=%.2f", spare.slot, spare.number,
                 time.monotonic() - started)
        while True:
            if not sock.poll(_PARENT_CHECK_MS):
                if orphaned():
                    log.error("event=orphaned slot=%d spare=%d", spare.slot, spare.number)
                    return WorkerExit.ORPHANED
                continue
            try:  # the one message a spare is sent: the supervisor counts it as a worker from now on
                load = read_spare_message(sock.recv_multipart(), spare.limits)
            except QvlError as exc:
                log.error("event=bad_load slot=%d spare=%d code=%s error=%s", spare.slot, spare.number,
                          exc.code, exc.message)
                return WorkerExit.BAD_SPEC
            return _worker_spec(load.spec, spare)
    finally:
        sock.close()


def _worker_spec(text: str, spare: SpareSpec) -> WorkerSpec | int:
    try:
        spec = WorkerSpec.from_json(text)
    except ValueError as exc:
        log.error("event=bad_load slot=%d spare=%d error=%s", spare.slot, spare.number, exc)
        return WorkerExit.BAD_SPEC
    if (spec.slot, spec.backend) != (spare.slot, spare.backend):
        log.error("event=bad_load slot=%d spare=%d error=the spec is for slot %d on %s", spare.slot,
                  spare.number, spec.slot, spec.backend)
        return WorkerExit.BAD_SPEC
    log.info("event=spare_loads slot=%d spare=%d gen=%d", spare.slot, spare.number, spec.generation)
    return spec
