"""Processes beside the worker that make requests' engine inputs, as many at once as there are.

Making a request's input for vLLM (qvl's prompt tokens, then vLLM's renderer: its images' pixels,
mostly) is Python under the GIL: on the worker's image pool threads it runs one request at a time,
10-25 ms for a 448² image, so eight requests released together reach the engine core over 120 ms
and in several groups, each waiting for the core's step in progress. `RenderProcesses` keeps
`count` spawned processes (fresh interpreters: the worker's threads and vLLM's state are not
forked), each holding one input maker built once by `make(*args)`; `render(*args)` runs the
maker's `render` in one of them and waits, the GIL released, so the image pool's threads render in
parallel. What a render makes comes back by value (pickled whole, tensors included: no shared
memory, which containers often keep small, and nothing left behind when a process is killed); what
it raises comes back as qvl's own error, or as a `RuntimeError` naming it (an exception that cannot
be rebuilt on this side would break the pool).

A render process dies with the worker (the kernel's parent-death signal, tied to the thread that
started it: the pool starts every process at once, on the thread that builds it). One that dies
breaks the pool: every render waiting on it raises `RenderProcessDied`; the vLLM worker ends then
as it does when its engine core dies (its requests are dispatched again).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import pickle
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

import psutil
from qvl.protocol.errors import QvlError

from .parent import exit_with_parent

log = logging.getLogger("qvl.worker")

_maker: Any = None  # the input maker of this render process
_all_built: Any = None  # a barrier the pool's processes pass once each has built its maker


class RenderProcessDied(RuntimeError):
    """A render process ended while the worker ran."""


def _start(parent: int, make: Callable[..., Any], args: tuple, threads: int, all_built) -> None:
    exit_with_parent()
    if os.getppid() != parent:  # the worker died before the tie was made
        os._exit(1)
    import torch
    torch.set_num_threads(threads)
    global _maker, _all_built
    _maker = make(*args)
    _all_built = all_built


def _render(*args) -> bytes:
    try:
        return pickle.dumps(_maker.render(*args), protocol=pickle.HIGHEST_PROTOCOL)
    except QvlError:
        raise
    except Exception as exc:
        log.exception("event=render_failed")
        raise RuntimeError(f"{type(exc).__name__}: {exc}") from None


def _ready() -> int:
    # A process that has built its maker takes the next `_ready` at once: without the barrier one
    # fast process could answer them all while another still builds. Held here, each answers one.
    _all_built.wait()
    return os.getpid()


@contextlib.contextmanager
def _pool_alive():
    """The pool's own word for a process that ended, as `RenderProcessDied`."""
    try:
        yield
    except BrokenProcessPool as exc:
        raise RenderProcessDied(f"a render process ended: {exc}") from None


class RenderProcesses:
    def __init__(self, count: int, make: Callable[..., Any], *args):
        # each process's tensor ops get a share of this worker's cores: several processes render at once
        threads = max(1, len(os.sched_getaffinity(0)) // (2 * count))
        spawn = multiprocessing.get_context("spawn")
        self._all_built = spawn.Barrier(count)
        self._pool = ProcessPoolExecutor(count, mp_context=spawn, initializer=_start,
                                         initargs=(os.getpid(), make, args, threads, self._all_built))
        # the pool starts a process for each task submitted while none is idle: all start now, on
        # this thread, so none is started later by another thread (whose end would kill it)
        self._starting = [self._pool.submit(_ready) for _ in range(count)]
        self.pids = sorted(self._pool._processes)  # the pool's own table of its processes, by pid
        if len(self.pids) != count:
            raise RuntimeError(f"{len(self.pids)} of {count} render processes started")

    def wait_ready(self) -> None:
        """Wait until every process has built its input maker; `RenderProcessDied` where one could not
        (its traceback is in the worker's log)."""
        with _pool_alive():
            for started in self._starting:
                started.result()

    def render(self, *args):
        """The input `render(*args)` makes in a render process; its exceptions are raised here."""
        with _pool_alive():  # broken before the submit, or while it waited
            return pickle.loads(self._pool.submit(_render, *args).result())

    def memory_bytes(self) -> int:
        """The render processes' resident memory less its file-backed shared pages (the libraries
        they share with each other and the worker, counted in the worker's RSS already). From
        `statm`, cheap: the unique set would walk every page table, on the thread that steps vLLM."""
        total = 0
        for pid in self.pids:
            try:
                memory = psutil.Process(pid).memory_info()
                total += memory.rss - memory.shared
            except psutil.Error:  # gone: the pool is broken, and the next render says so
                pass
        return total

    def close(self) -> None:
        """Stop the render processes: the render in progress in each ends first."""
        self._all_built.abort()  # none waits for a process that will not build
        self._pool.shutdown(wait=True, cancel_futures=True)
