"""vLLM's engine core process as the worker's child: it dies with the worker and reports its memory.

With `engine = vllm` the worker runs vLLM's engine core in a process of its own, as vLLM's own
server does, so scheduling and the GPU never wait on the worker's GIL (detokenizing, image
processing, its socket). The CUDA state the supervisor recycles is then the child's; three things
keep the worker the unit the supervisor sees:

- `tie_engine_core_to_worker` has vLLM start its engine core through `_run_engine_core`, which asks
  the kernel to SIGKILL the child when the worker dies, however it dies, before vLLM loads
  anything: a killed or recycled worker leaves no process holding device memory. (vLLM's engine
  core watches nothing of its parent; killed alone, the parent leaves it running.)
- the worker exits with `ENGINE_FAILED` the moment its engine core dies other than when the worker
  stops it (`exit_when_any_ends` with `engine_core_died`), and as soon as vLLM's client says the
  core is dead. (vLLM marks its client dead then, but a `step` already waiting for the child's
  output would wait for ever, and an idle worker would refuse request after request instead of
  being replaced.)
- `EngineCoreCalls`, mixed into vLLM's GPU worker (`worker_extension_cls`), reads the child's
  pid, allocator, device memory and RSS, which the worker reports as its own.

Imported by the worker before vLLM starts its engine core, and by the engine core process itself.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

import psutil
import torch
from qvl.protocol.exits import WorkerExit
from vllm.v1.engine.core import EngineCoreProc

from .parent import exit_with_parent
from .telemetry import ModelProcessFigures

log = logging.getLogger("qvl.worker")

_WORKER_PID_ENV = "QVL_ENGINE_CORE_PARENT"
PYTHON_SWITCH_INTERVAL_S = 0.005
_run_vllm_engine_core = EngineCoreProc.run_engine_core  # vLLM's own, before it is replaced below
FIGURES_METHOD, PID_METHOD = "qvl_engine_core_figures", "qvl_engine_core_pid"
EXTENSION = f"{__name__}.EngineCoreCalls"


def tie_engine_core_to_worker() -> None:
    """Have vLLM start its engine core processes through `_run_engine_core` from now on."""
    os.environ[_WORKER_PID_ENV] = str(os.getpid())
    EngineCoreProc.run_engine_core = staticmethod(_run_engine_core)


def _run_engine_core(*args, **kwargs) -> None:
    exit_with_parent()
    if os.getppid() != int(os.environ[_WORKER_PID_ENV]):  # the worker died before the tie was made
        os._exit(1)
    # forked from the worker, the core would keep the worker's short switch interval (`WorkerService.run`),
    # made for its image pool: vLLM's own engine core runs with Python's default
    sys.setswitchinterval(PYTHON_SWITCH_INTERVAL_S)
    _run_vllm_engine_core(*args, **kwargs)


def engine_core_died(pid: int | None = None) -> NoReturn:
    """The worker's end once its engine core is gone: its rows' state is unknown, and the
    supervisor dispatches its requests again."""
    log.error("event=engine_core_died pid=%s", pid)
    os._exit(WorkerExit.ENGINE_FAILED)


class EngineCoreCalls:
    """Methods vLLM adds to its GPU worker in the engine core, called over `collective_rpc`."""

    def qvl_engine_core_pid(self) -> int:
        return os.getpid()

    def qvl_engine_core_figures(self) -> dict:
        """The child's figures, its RSS as its unique set: the rest of its resident pages are the
        worker's, shared since the fork, and the worker counts those itself."""
        figures = getattr(self, "_qvl_figures", None)
        if figures is None:
            figures = self._qvl_figures = ModelProcessFigures(torch.device("cuda", torch.cuda.current_device()))
        return {**figures.read(), "rss_bytes": psutil.Process().memory_full_info().uss}
