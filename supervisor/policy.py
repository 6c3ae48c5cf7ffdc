"""The recycle policy: a pure function of one worker's telemetry and counters.

Each threshold is a `Config` setting and is off at 0. A verdict is `hard` when the worker must
take no new request at once (it is out of memory, or the device is nearly full); a soft verdict
waits for the worker to be idle, for at most `recycle_soft_wait_s`. A soft threshold that a worker
already trips when it becomes ready (`tripped_at_start`) is ignored for that worker: replacing it
would give a worker that trips it again.
"""

from dataclasses import dataclass

from .config import Config


@dataclass(frozen=True)
class Verdict:
    reason: str
    hard: bool
    value: float
    threshold: float


def recycle_verdict(telemetry: dict, served: int, age_s: float, config: Config,
                    requests_jitter: int = 0, ignore: tuple[str, ...] = ()) -> Verdict | None:
    """Why this worker should be replaced, or None. Hard reasons are checked first; soft reasons
    in `ignore` are not checked."""
    t = telemetry
    total = t.get("device_total_bytes") or 0
    used_fraction = t.get("device_used_bytes", 0) / total if total else 0.0
    frag_applies = t.get("reserved_bytes", 0) >= config.recycle_fragmentation_min_reserved_bytes
    checks = [
        # (reason, hard, value, threshold, applies)
        ("out_of_memory", True, t.get("num_ooms", 0), config.recycle_ooms, True),
        ("device_used", True, used_fraction, config.recycle_device_used_fraction, True),
        ("fragmentation", False, t.get("fragmentation", 0.0), config.recycle_fragmentation, frag_applies),
        ("reserved_bytes", False, t.get("reserved_bytes", 0), config.recycle_reserved_bytes, True),
        ("alloc_retries", False, t.get("num_alloc_retries", 0), config.recycle_alloc_retries, True),
        ("host_rss", False, t.get("rss_bytes", 0), config.recycle_rss_bytes, True),
        ("requests", False, served, config.recycle_requests + requests_jitter
         if config.recycle_requests else 0, True),
        ("age", False, age_s, config.recycle_age_s, True),
    ]
    for reason, hard, value, threshold, applies in checks:
        if threshold and applies and value >= threshold and (hard or reason not in ignore):
            return Verdict(reason, hard, value, threshold)
    return None


def tripped_at_start(telemetry: dict, config: Config) -> list[Verdict]:
    """The soft thresholds a worker trips as it becomes ready, before serving anything."""
    tripped: list[Verdict] = []
    while (verdict := recycle_verdict(telemetry, 0, 0.0, config,
                                      ignore=tuple(v.reason for v in tripped))) and not verdict.hard:
        tripped.append(verdict)
    return tripped
