"""The recycle policy, the restart backoff and a failed slot's backoff, as tables of cases."""

import dataclasses

import pytest
from qvl.supervisor.config import Config
from qvl.supervisor.lifecycle import failed_delay, restart_delay
from qvl.supervisor.policy import recycle_verdict, tripped_at_start

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


@pytest.mark.parametrize("failures, delay", [(1, 10.0), (2, 20.0), (3, 40.0), (5, 160.0), (6, 300.0), (20, 300.0)])
def test_failed_slot_backoff_doubles_up_to_five_minutes(failures, delay):
    assert failed_delay(failures, Config()) == delay


def test_ignored_soft_reasons_let_the_next_one_through_but_never_a_hard_one():
    telemetry = {**HEALTHY, "reserved_bytes": 21 * GIB, "rss_bytes": 9 * GIB}
    assert recycle_verdict(telemetry, 10, 60, ALL_ON).reason == "reserved_bytes"
    assert recycle_verdict(telemetry, 10, 60, ALL_ON, ignore=("reserved_bytes",)).reason == "host_rss"
    assert recycle_verdict(telemetry, 10, 60, ALL_ON, ignore=("reserved_bytes", "host_rss")) is None
    oom = {**telemetry, "num_ooms": 1}
    assert recycle_verdict(oom, 10, 60, ALL_ON, ignore=("out_of_memory",)).reason == "out_of_memory"


@pytest.mark.parametrize("telemetry, tripped", [
    (HEALTHY, []),
    ({**HEALTHY, "reserved_bytes": 21 * GIB}, ["reserved_bytes"]),
    ({**HEALTHY, "reserved_bytes": 21 * GIB, "rss_bytes": 9 * GIB}, ["reserved_bytes", "host_rss"]),
    # a hard reason at start is not a baseline to live with: it stops the list
    ({**HEALTHY, "num_ooms": 1, "rss_bytes": 9 * GIB}, []),
])
def test_thresholds_a_fresh_worker_trips(telemetry, tripped):
    assert [v.reason for v in tripped_at_start(telemetry, ALL_ON)] == tripped
