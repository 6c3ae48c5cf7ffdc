"""The recycle policy and the restart backoff, as tables of cases."""

import dataclasses

import pytest

from qvl.supervisor.config import Config
from qvl.supervisor.policy import recycle_verdict
from qvl.supervisor.slots import restart_delay

GIB = 1 << 30
ALL_ON = dataclasses.replace(
    Config(), recycle_fragmentation=0.4, recycle_reserved_bytes=20 * GIB,
    recycle_alloc_retries=3, recycle_rss_bytes=8 * GIB, recycle_requests=1000,
    recycle_age_s=3600, recycle_device_used_fraction=0.95, recycle_ooms=1)
HEALTHY = {"reserved_bytes": 10 * GIB, "allocated_bytes": 9 * GIB, "fragmentation": 0.1,
           "num_alloc_retries": 0, "num_ooms": 0, "rss_bytes": 2 * GIB,
           "device_used_bytes": 11 * GIB, "device_total_bytes": 80 * GIB}


@pytest.mark.parametrize("telemetry, served, age, reason, hard", [
    ({}, 0, 0, None, None),
    (HEALTHY, 10, 60, None, None),
    ({**HEALTHY, "fragmentation": 0.5}, 10, 60, "fragmentation", False),
    # an idle worker with little reserved memory never trips fragmentation
    ({**HEALTHY, "fragmentation": 0.9, "reserved_bytes": GIB // 2}, 10, 60, None, None),
    ({**HEALTHY, "reserved_bytes": 21 * GIB}, 10, 60, "reserved_bytes", False),
    ({**HEALTHY, "num_alloc_retries": 3}, 10, 60, "alloc_retries", False),
    ({**HEALTHY, "rss_bytes": 9 * GIB}, 10, 60, "host_rss", False),
    (HEALTHY, 1000, 60, "requests", False),
    (HEALTHY, 10, 3600, "age", False),
    ({**HEALTHY, "num_ooms": 1}, 10, 60, "out_of_memory", True),
    ({**HEALTHY, "device_used_bytes": 77 * GIB}, 10, 60, "device_used", True),
    # hard reasons win over soft ones
    ({**HEALTHY, "num_ooms": 2, "fragmentation": 0.9}, 5000, 1e6, "out_of_memory", True),
])
def test_verdicts(telemetry, served, age, reason, hard):
    verdict = recycle_verdict(telemetry, served, age, ALL_ON)
    assert (verdict.reason if verdict else None) == reason
    if verdict:
        assert verdict.hard is hard


def test_every_threshold_is_off_at_zero():
    off = dataclasses.replace(Config(), recycle_ooms=0)
    worst = {**HEALTHY, "fragmentation": 0.99, "num_ooms": 9, "num_alloc_retries": 99,
             "device_used_bytes": 80 * GIB, "reserved_bytes": 79 * GIB, "rss_bytes": 99 * GIB}
    assert recycle_verdict(worst, 10**6, 10**7, off) is None


def test_requests_threshold_takes_the_jitter():
    config = dataclasses.replace(Config(), recycle_requests=100)
    assert recycle_verdict({}, 104, 0, config, requests_jitter=5) is None
    assert recycle_verdict({}, 105, 0, config, requests_jitter=5).reason == "requests"


@pytest.mark.parametrize("crashes, delay", [(0, 0), (1, 0.5), (2, 1.0), (3, 2.0), (10, 30.0)])
def test_restart_backoff_doubles_up_to_the_cap(crashes, delay):
    assert restart_delay(crashes, Config()) == delay
