"""Control commands clients may send besides `generate`: one small handler each.

A handler takes the supervisor and the request header and returns the reply's fields, or raises
a `QvlError`. The registry `COMMANDS` is the whole control surface.
"""

import os
import socket
import time

from qvl.protocol.codec import PING, RECYCLE, STATUS
from qvl.protocol.errors import BadRequest



def status(sup, header: dict) -> dict:
    indices = sorted({s.gpu for s in sup.slots if s.gpu is not None})
    gpus = {str(i): sup.devices.gpu_memory(i) for i in indices}  # NVML per device
    gpu_pids = {i: sup.devices.gpu_process_memory(i) for i in indices}
    workers = []
    for slot in sup.slots:
        info = slot.status(time.monotonic())
        info["host_rss_bytes"] = sup.devices.rss(info["pid"])
        info["gpu_bytes"] = sup.devices.tree_gpu_bytes(gpu_pids.get(slot.gpu, {}), info["pid"])
        info["spare_rss_bytes"] = sup.devices.rss(info["spare_pid"]) if info["spare_pid"] else None
        workers.append(info)
    return {
        "pid": os.getpid(), "host": socket.gethostname(),
        "uptime_s": round(time.monotonic() - sup.started_at, 3),
        "frontend": sup.config.frontend, "model": sup.config.model, "device": sup.config.device,
        "queue_depth": len(sup.queue), "queue_size": sup.config.queue_size,
        "inflight": sum(len(w.inflight) for w in sup.workers()),
        "held_bytes": sup.open.bytes, "queue_bytes": sup.config.queue_bytes,
        "shutting_down": sup.shutting_down, "counters": dict(sup.counters), "gpus": gpus,
        "metrics": sup.metrics.snapshot(),
        "gateway": sup.gateway.status() if sup.gateway else None,
        "launcher": sup.launcher.status() if sup.launcher else None,
        "workers": workers,
    }


def ping(sup, header: dict) -> dict:
    return {"pong": True}


def recycle(sup, header: dict) -> dict:
    worker = slot_named(header.get("worker"), len(sup.slots))
    targets = sup.slots if worker is None else [sup.slots[worker]]
    return {"recycling": [s.index for s in targets if sup.request_recycle(s, "operator")]}


def slot_named(value: object, slots: int) -> int | None:
    """The slot a `recycle` names (None: every slot); `BadRequest` for anything but None or an
    index of one of `slots` slots."""
    if value is not None and not (isinstance(value, int) and not isinstance(value, bool) and 0 <= value < slots):
        raise BadRequest(f"no worker slot {value!r}; slots are 0..{slots - 1}")
    return value


COMMANDS = {STATUS: status, PING: ping, RECYCLE: recycle}
ADMIN_COMMANDS = frozenset({RECYCLE})  # under CurveZMQ, only keys in the admin/ folder may send these
