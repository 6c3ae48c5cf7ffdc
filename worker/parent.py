"""A worker's ties: to the supervisor that started it (die with it, and tell when it is gone), and
to the children it cannot serve without (end when one of them dies, `exit_when_any_ends`).

Imports nothing heavy, so the tie is made before the seconds of importing torch in which a
supervisor could die unseen. The supervisor names itself in `QVL_SUPERVISOR_PID`; a process whose
parent is no longer that one (re-parented to init or a subreaper) is an orphan, even one whose
supervisor died before it could ask the kernel to be told.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import select
import signal
import sys
import threading
from typing import Callable, NoReturn, Sequence

from qvl.protocol.contract import SUPERVISOR_PID_ENV

_PARENT_AT_START = os.getppid()


def exit_with_parent() -> None:
    """Have the kernel kill this process when its parent dies (a worker's, the supervisor; vLLM's
    engine core's, its worker), so no orphan holds a GPU."""
    if sys.platform.startswith("linux"):
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _supervisor_pid() -> int:
    """The supervisor's pid as it named it; this process's parent at start where it did not."""
    try:
        return int(os.environ[SUPERVISOR_PID_ENV])
    except (KeyError, ValueError):
        return _PARENT_AT_START


def orphaned() -> bool:
    return os.getppid() != _supervisor_pid()


def exit_when_any_ends(pids: Sequence[int], died: Callable[[int], NoReturn]) -> threading.Event:
    """Call `died(pid)`, which ends this process, as soon as any process of `pids` ends, unless the
    event returned is set first: the worker sets it before it stops them itself (and at interpreter
    exit)."""
    stopping = threading.Event()
    if not pids:
        return stopping
    atexit.register(stopping.set)
    watched = {os.pidfd_open(pid): pid for pid in pids}
    poller = select.poll()
    for fd in watched:
        poller.register(fd, select.POLLIN)

    def watch() -> None:
        ((fd, _), *_) = poller.poll()
        if not stopping.is_set():
            died(watched[fd])

    threading.Thread(target=watch, name="exit-when-any-ends", daemon=True).start()
    return stopping
