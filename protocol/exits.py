"""Exit codes of a worker process: part of the protocol, named once for both sides.

The worker exits with one of these; the supervisor reads the code to decide what follows.
`LOAD_FAILED` and `BAD_SPEC` mean no restart can help, so the slot fails at once by name
instead of crash-looping; every other non-zero code is a crash, restarted with backoff.
"""

from __future__ import annotations

import enum


class WorkerExit(enum.IntEnum):
    OK = 0            # asked to stop, drained, said bye
    ORPHANED = 1      # the supervisor is gone
    CUDA_FATAL = 3    # a CUDA error left the context unusable; its requests are retried elsewhere
    LOAD_FAILED = 4   # the model or processor cannot be loaded: restarting cannot help
    BAD_SPEC = 5      # the worker spec it was given cannot be read: restarting cannot help
    SPAWN_FAILED = 6  # the supervisor could not start the process (out of descriptors or memory)
    INJECTED = 7      # a crash injected by QVL_FAULTS, for tests
    ENGINE_FAILED = 8  # a step of a step-scheduled engine raised, or its engine core died: its batch's state is unknown


PERMANENT = frozenset({WorkerExit.LOAD_FAILED, WorkerExit.BAD_SPEC})


def describe(code: int) -> str:
    """`exit code 4 (load_failed)`, `signal 9 (SIGKILL)`: what a return code means."""
    if code < 0:
        import signal
        try:
            return f"signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"signal {-code}"
    try:
        return f"exit code {code} ({WorkerExit(code).name.lower()})"
    except ValueError:
        return f"exit code {code}"


def is_permanent(code: int) -> bool:
    return code in PERMANENT
