"""Counters that outlive the supervisor: a small JSON file, replaced atomically on each write.

A save happens inside the event loop (after a crash, a recycle, a start), so it never raises: a
full disk or a removed folder is logged and the loop goes on. The folder is checked at start
(`Config.validate`).
"""

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path

from .events import event


def load_state(path: str) -> dict:
    if not path or not Path(path).exists():
        return {}
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}  # a damaged file costs the history, never the start
    return data if isinstance(data, dict) else {}


def save_state(path: str, slots: list, counters: dict) -> bool:
    """Write the slots' and the supervisor's counters; False (and a logged event) if it failed."""
    if not path:
        return True
    data = {"slots": {str(s.index): s.saved() for s in slots}, "counters": dict(counters)}
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".qvl-state-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return True
    except OSError as exc:
        event("state_save_failed", logging.ERROR, path=path, error=str(exc))
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        return False


def restore(state: dict, slots: list, counters) -> None:
    saved = state.get("slots")
    for slot in slots:
        entry = saved.get(str(slot.index)) if isinstance(saved, dict) else None
        if isinstance(entry, dict):
            slot.restore(entry)
    if isinstance(state.get("counters"), dict):
        counters.update({k: v for k, v in state["counters"].items() if isinstance(v, int)})
