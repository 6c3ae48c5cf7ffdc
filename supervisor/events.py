"""Structured event logging: `event=recycle worker=1 gen=3 reason=fragmentation frag=0.41`.

Every state change in the supervisor goes through `event`, so a person can read the log and a
program can parse it (`parse_event`).
"""

import logging

log = logging.getLogger("qvl.supervisor")


def _fmt(value: object) -> str:
    if isinstance(value, float):
        value = f"{value:.4g}"
    text = str(value)
    return f'"{text}"' if (" " in text or not text) else text


def event(name: str, level: int = logging.INFO, **fields: object) -> None:
    log.log(level, "event=%s %s", name, " ".join(f"{k}={_fmt(v)}" for k, v in fields.items()))


def parse_event(line: str) -> dict:
    """The fields of one logged event line (what follows the log prefix)."""
    out = {}
    rest = line[line.find("event="):]
    while rest:
        key, _, rest = rest.partition("=")
        if rest.startswith('"'):
            value, _, rest = rest[1:].partition('"')
        else:
            value, _, rest = rest.partition(" ")
        out[key.strip()] = value
        rest = rest.lstrip()
    return out


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(name)s %(message)s")
