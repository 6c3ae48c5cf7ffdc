"""Entry point of a worker process: `python -m qvl.worker SPEC`, SPEC being a `WorkerSpec` as JSON;
or `python -m qvl.worker --spare SPEC`, SPEC a `SpareSpec`: a spare that imports everything, waits
for a `load` carrying its `WorkerSpec`, then runs exactly as a worker started cold (`spare.py`).

The supervisor builds the spec (`qvl.protocol.contract`) and starts this with the device already
chosen through `CUDA_VISIBLE_DEVICES`. A spec that cannot be read exits with `BAD_SPEC`.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from qvl.protocol.contract import SpareSpec, WorkerSpec
from qvl.protocol.exits import WorkerExit

from .parent import exit_with_parent, orphaned

_FORMAT = "%(asctime)s qvl.worker[{slot}:{name}] %(message)s"


def main(argv: list[str] | None = None) -> int:
    exit_with_parent()  # before the imports below: a supervisor can die in the seconds they take
    if orphaned():
        return WorkerExit.ORPHANED
    # Ctrl-C reaches the whole process group; only the supervisor decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    args = sys.argv[1:] if argv is None else argv
    spare = args[:1] == ["--spare"]
    try:
        spec = (SpareSpec if spare else WorkerSpec).from_json(args[1 if spare else 0])
    except (IndexError, ValueError) as exc:
        print(f"qvl.worker: usage: python -m qvl.worker [--spare] SPEC_JSON ({type(exc).__name__}: {exc})",
              file=sys.stderr)
        return WorkerExit.BAD_SPEC
    import transformers
    transformers.utils.logging.disable_progress_bar()
    if spare:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                            format=_FORMAT.format(slot=spec.slot, name=f"spare{spec.number}"))
        from .spare import wait_for_load
        spec = wait_for_load(spec)
        if not isinstance(spec, WorkerSpec):
            return spec  # an exit code
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                        format=_FORMAT.format(slot=spec.slot, name=spec.generation))
    from .service import WorkerService
    code = WorkerService(spec).run()
    # All is closed: the engine stopped, the last messages sent. The interpreter's own teardown of
    # torch and transformers would add a second or more to every stop and recycle.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
