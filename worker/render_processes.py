"""Processes beside the worker that make requests' engine inputs, as many at once as there are.

Making a request's input for vLLM (qvl's prompt tokens, then vLLM's renderer: its images' pixels,
mostly) is Python under the GIL: on the worker's image pool threads it runs one request at a time,
10-25 ms for a 448² image, so eight requests released together reach the engine core over 120 ms
and in several groups, each waiting for the core's step in progress. `RenderProcesses` keeps
`count` spawned processes (fresh interpreters: the worker's threads and vLLM's state are not
forked), each holding one input maker built once by `make(*args)`; `render(*args)` runs the
maker's `render` in one of them and waits, the GIL released, so the image pool's threads render in
parallel.

A render process dies with the worker (the kernel's parent-death signal, tied to the thread that
started it: the pool starts every process at once, on the thread that builds it). One that dies
while the worker runs breaks the pool: every render waiting on it raises `RenderProcessDied`, and
the worker ends as it does when its engine core dies (its requests are dispatched again).
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

import psutil

from .parent import exit_with_parent

_maker: Any = None  # the input maker of this render process


class RenderProcessDied(RuntimeError):
    """A render process ended while the worker ran."""


def _start(parent: int, make: Callable[..., Any], args: tuple, threads: int) -> None:
    exit_with_parent()
    if os.getppid() != parent:  # the worker died before the tie was made
        os._exit(1)
    import torch
    torch.set_num_threads(threads)
    global _maker
    _maker = make(*args)


def _render(*args):
    return _maker.render(*args)


def _ready() -> int:
    return os.getpid()


class RenderProcesses:
    def __init__(self, count: int, make: Callable[..., Any], *args):
        # each process's tensor ops get a share of the cores: several processes render at once
        threads = max(1, (os.cpu_count() or 1) // (2 * count))
        self._pool = ProcessPoolExecutor(count, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_start, initargs=(os.getpid(), make, args, threads))
        # the pool starts a process for each task submitted while none is idle: all start now, on
        # this thread, so none is started later by another thread (whose end would kill it)
        self._starting = [self._pool.submit(_ready) for _ in range(count)]
        self.pids = sorted(self._pool._processes)  # the pool's own table of its processes, by pid
        assert len(self.pids) == count, "the pool did not start all its processes at once"

    def wait_ready(self) -> None:
        """Wait until every process has built its input maker; `RenderProcessDied` where one could not
        (its traceback is in the worker's log)."""
        for started in self._starting:
            self._result(started)

    def render(self, *args):
        """The input `render(*args)` makes in a render process; its exceptions are raised here."""
        try:
            future = self._pool.submit(_render, *args)
        except BrokenProcessPool as exc:  # broken before
            raise RenderProcessDied(f"a render process ended: {exc}") from None
        return self._result(future)

    def _result(self, future: Future):
        try:
            return future.result()
        except BrokenProcessPool as exc:
            raise RenderProcessDied(f"a render process ended: {exc}") from None

    def rss_bytes(self) -> int:
        """The resident memory of the render processes (spawned: they share no pages with the worker)."""
        total = 0
        for pid in self.pids:
            try:
                total += psutil.Process(pid).memory_info().rss
            except psutil.Error:  # gone: the pool is broken, and the next render says so
                pass
        return total

    def close(self) -> None:
        """Stop the render processes: the render in progress in each ends first."""
        self._pool.shutdown(wait=True, cancel_futures=True)
