"""Several workers: one slot per GPU with its own CUDA_VISIBLE_DEVICES, routing that spreads load
over every worker, and a recycle of one slot while the others keep serving (CPU workers here)."""

import os

import pytest

from harness import RawLoad, events, wait_for
from qvl.supervisor.config import Config, ConfigError
from qvl.supervisor.slots import slot_gpus, worker_env


def test_one_slot_per_listed_gpu_each_seeing_only_its_own():
    assert slot_gpus(Config(gpus="0,3"), gpu_count=4) == [0, 3]
    assert slot_gpus(Config(gpus="all"), gpu_count=2) == [0, 1]
    assert slot_gpus(Config(device="cuda:2", workers=2), gpu_count=4) == [2, 2]
    assert slot_gpus(Config(device="cpu", workers=2), gpu_count=0) == [None, None]
    assert worker_env(Config(gpus="0,3"), 3)["CUDA_VISIBLE_DEVICES"] == "3"
    cpu_env = worker_env(Config(device="cpu"), None)  # left as the supervisor's own
    assert cpu_env.get("CUDA_VISIBLE_DEVICES") == os.environ.get("CUDA_VISIBLE_DEVICES")


@pytest.mark.parametrize("gpus, device, message", [("0,x", "cuda:0", "comma-separated"),
                                                   ("0,1", "cpu", "needs a cuda device")])
def test_bad_gpu_lists_are_refused(gpus, device, message):
    with pytest.raises(ConfigError, match=message):
        Config(gpus=gpus, device=device).validate()


@pytest.mark.timeout(120)
def test_load_spreads_over_every_worker_and_one_recycles_while_the_others_serve(start_supervisor):
    sup = start_supervisor("--max-inflight", "2", workers=3)
    sup.wait_ready(workers=3)
    load = RawLoad(sup.endpoint, sockets=6)
    try:
        load.send(30)
        with sup.client() as client:
            assert client.recycle(worker=1)["recycling"] == [1]
        load.send(30)
        load.receive(timeout=90)
        wait_for(lambda: events(sup.log(), "recycle_done"), timeout=60)
        with sup.client() as client:
            workers = client.status()["workers"]
    finally:
        load.close()
    assert load.pending() == 0 and load.outcomes() == {"ok": 60}
    assert all(len(replies) == 1 for replies in load.replies.values())
    served = [w["served_total"] for w in workers]
    assert all(n > 0 for n in served) and sum(served) == 60, served  # every worker took a share
    assert [(w["generation"], w["recycles"]) for w in workers] == [(1, 0), (2, 1), (1, 0)]
    recycled = {e["worker"] for e in events(sup.log(), "recycle")}
    assert recycled == {"1"}
    sup.remember_workers()
