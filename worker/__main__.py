"""Entry point of a worker process: `python -m qvl.worker SPEC`, SPEC being a `WorkerSpec` as JSON.

The supervisor builds the spec (`qvl.protocol.contract`) and starts this with the device already
chosen through `CUDA_VISIBLE_DEVICES`. A spec that cannot be read exits with `BAD_SPEC`.
"""

from __future__ import annotations

import logging
import signal
import sys

from qvl.protocol.contract import WorkerSpec
from qvl.protocol.exits import WorkerExit

from .service import WorkerService, exit_with_parent


def main(argv: list[str] | None = None) -> int:
    exit_with_parent()
    # Ctrl-C reaches the whole process group; only the supervisor decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    args = sys.argv[1:] if argv is None else argv
    try:
        spec = WorkerSpec.from_json(args[0])
    except (IndexError, ValueError) as exc:
        print(f"qvl.worker: usage: python -m qvl.worker SPEC_JSON ({type(exc).__name__}: {exc})",
              file=sys.stderr)
        return WorkerExit.BAD_SPEC
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s qvl.worker[{spec.slot}:{spec.generation}] %(message)s")
    import transformers
    transformers.utils.logging.disable_progress_bar()
    return WorkerService(spec).run()


if __name__ == "__main__":
    sys.exit(main())
