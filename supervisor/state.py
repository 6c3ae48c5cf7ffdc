"""Counters that outlive the supervisor: a small JSON file, replaced atomically on each write."""

import json
import os
import tempfile
from pathlib import Path

SLOT_FIELDS = ("generation", "restarts", "recycles", "served_total", "last_reason")


def load_state(path: str) -> dict:
    if not path or not Path(path).exists():
        return {}
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}  # a damaged file costs the history, never the start


def save_state(path: str, slots: list, counters: dict) -> None:
    if not path:
        return
    data = {"slots": {str(s.index): {f: getattr(s, f) for f in SLOT_FIELDS} for s in slots},
            "counters": dict(counters)}
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".qvl-state-")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def restore(state: dict, slots: list, counters) -> None:
    for slot in slots:
        for f, value in state.get("slots", {}).get(str(slot.index), {}).items():
            if f in SLOT_FIELDS:
                setattr(slot, f, value)
    counters.update(state.get("counters", {}))
