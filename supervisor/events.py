"""Structured event logging: `event=recycle worker=1 gen=3 reason=fragmentation frag=0.41`.

Every state change in the supervisor goes through `event`, so a person can read the log and a
program can parse it (`parse_event`).
"""

import json
import logging

log = logging.getLogger("qvl.supervisor")


def _fmt(value: object) -> str:
    if isinstance(value, float):
        value = f"{value:.4g}"
    text = str(value)
    return f'"{text}"' if (" " in text or not text) else text


def event(name: str, level: int = logging.INFO, exc_info: bool = False, **fields: object) -> None:
    """Log one event; `exc_info` adds the traceback of the exception being handled."""
    log.log(level, "event=%s %s", name, " ".join(f"{k}={_fmt(v)}" for k, v in fields.items()),
            extra={"qvl_event": name, "qvl_fields": fields}, exc_info=exc_info)


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


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, then the event and its fields, or the message."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name}
        if hasattr(record, "qvl_event"):
            line.update(event=record.qvl_event, **record.qvl_fields)
        else:
            line["message"] = record.getMessage()
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup_logging(level: str, fmt: str = "text") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json"
                         else logging.Formatter("%(asctime)s %(name)s %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])
