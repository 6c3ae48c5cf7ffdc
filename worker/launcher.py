"""The worker launcher: one process per supervisor that imports what every worker imports first
(torch, transformers, the service and the default engine: seconds of CPU) once, then forks the
supervisor's workers and spares from itself, each starting with those imports done.

Started by the supervisor as `python -m qvl.worker.launcher FD`, FD its end of a socket pair. Lines
of JSON both ways:

    launcher -> supervisor   {"ready": true}                     imports done, launches taken
    supervisor -> launcher   {"args": [...], "env": {...}}       a worker's argument list and environment
    launcher -> supervisor   {"pid": N}, or {"error": "..."}     for each launch, in order

A launch forks twice: the middle process forks the worker and exits at once, so the worker is
re-parented to the supervisor, a child subreaper: it waits on the worker, signals it and reads its
exit code as for a worker it started itself, and the launcher's end ends none of them. The worker
sets its environment, waits to be re-parented, then runs `qvl.worker.__main__.main` with its
arguments as a worker started by `python -m qvl.worker` would: tied to the supervisor, orphaned
(exit `ORPHANED`) where its parent is not it.

What a fork copies is imported modules only: the launcher makes no CUDA call (an import that made a
context ends it with `CUDA_FATAL` before it takes a launch), starts no thread of its own (torch's
import leaves OpenBLAS's idle thread server, which has fork handlers) and no ZeroMQ context, and
configures no logging. It dies with the supervisor, and ends when the supervisor closes its end.
A forked worker keeps the launcher's command line (`ps` shows `qvl.worker.launcher` for it).
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import sys
import time
import traceback

from qvl.protocol.exits import WorkerExit

from .parent import exit_with_parent, orphaned

_REPARENT_WAIT_S = 5.0


def main(argv: list[str]) -> int:
    exit_with_parent()
    if orphaned():
        return WorkerExit.ORPHANED
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the supervisor's to act on
    try:
        channel = socket.socket(fileno=int(argv[0]))
    except (IndexError, ValueError, OSError) as exc:
        print(f"qvl.worker.launcher: usage: python -m qvl.worker.launcher FD ({exc})", file=sys.stderr)
        return WorkerExit.BAD_SPEC
    import torch
    import transformers
    transformers.utils.logging.disable_progress_bar()
    from .spare import import_engine
    import_engine("hf")
    if torch.cuda.is_initialized():
        print("qvl.worker.launcher: an import made a CUDA context; workers cannot be forked", file=sys.stderr)
        return WorkerExit.CUDA_FATAL
    from .faults import Faults
    dies_at = Faults.launcher_fault()
    gc.freeze()  # what is imported stays in pages the workers share: their collections do not touch it
    channel.sendall(b'{"ready": true}\n')
    with channel, channel.makefile("rb") as requests:
        for count, line in enumerate(requests, 1):
            answer = _launch(line, channel)
            if count == dies_at:
                os._exit(WorkerExit.INJECTED)
            channel.sendall(json.dumps(answer).encode() + b"\n")
    return WorkerExit.OK


def read_launch(line: bytes) -> tuple[list[str], dict[str, str]]:
    """The arguments and environment a launch line asks for; `ValueError` for anything else."""
    try:
        request = json.loads(line)
        args, env = request["args"], request["env"]
    except (ValueError, KeyError, TypeError, IndexError, RecursionError) as exc:
        raise ValueError(f"unreadable launch: {type(exc).__name__}: {exc}") from None
    if not (isinstance(args, list) and all(isinstance(a, str) for a in args)
            and isinstance(env, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in env.items())):
        raise ValueError("args must be a list of strings and env a map of strings")
    return args, env


def _launch(line: bytes, channel: socket.socket) -> dict:
    """Fork the worker `line` asks for; its pid, or why there is none."""
    try:
        args, env = read_launch(line)
    except ValueError as exc:
        return {"error": str(exc)}
    told, tell = os.pipe()
    try:
        middle = os.fork()
    except OSError as exc:
        os.close(told)
        os.close(tell)
        return {"error": f"fork: {exc}"}
    if middle == 0:
        try:
            os.close(told)
            worker = os.fork()
            if worker == 0:
                os.close(tell)
                _become_worker(args, env, channel)
            os.write(tell, str(worker).encode())
        finally:
            os._exit(0)
    os.close(tell)
    with os.fdopen(told, "rb") as reply:
        said = reply.read()
    os.waitpid(middle, 0)
    return {"pid": int(said)} if said.isdigit() else {"error": "the middle process could not fork"}


def _become_worker(args: list[str], env: dict[str, str], channel: socket.socket) -> None:
    """In the forked worker: never returns into the launcher's loop."""
    code = 1
    try:
        os.close(channel.detach())  # the launcher's end: no worker holds it open
        middle, given_up = os.getppid(), time.monotonic() + _REPARENT_WAIT_S
        while os.getppid() == middle and time.monotonic() < given_up:
            time.sleep(0.001)
        os.environ.clear()
        os.environ.update(env)
        from .__main__ import main as worker_main
        code = worker_main(args)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
