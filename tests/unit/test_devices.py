"""The supervisor's readings of a worker's process tree: a worker and its children (with `engine =
vllm`, vLLM's engine core holds the device memory, not the worker)."""

import subprocess
import sys
import time

import psutil
import pytest
from qvl.supervisor.devices import DeviceMonitor

from harness import wait_gone

_PARENT_OF_A_SLEEPER = ("import subprocess, sys, time; "
                        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)")


@pytest.fixture
def parent_and_child():
    parent = subprocess.Popen([sys.executable, "-c", _PARENT_OF_A_SLEEPER])
    try:
        end = time.monotonic() + 20
        while not psutil.Process(parent.pid).children() and time.monotonic() < end:
            time.sleep(0.05)
        (child,) = psutil.Process(parent.pid).children()
        yield parent.pid, child.pid
    finally:
        pids = {parent.pid, *(c.pid for c in psutil.Process(parent.pid).children())}
        for pid in pids:
            psutil.Process(pid).kill()
        parent.wait()
        assert wait_gone(pids) == set()


@pytest.mark.timeout(60)
def test_a_workers_tree_counts_its_children(parent_and_child):
    parent, child = parent_and_child
    assert DeviceMonitor.process_tree(parent) == [parent, child]
    assert DeviceMonitor.process_tree(child) == [child]
    assert DeviceMonitor.tree_gpu_bytes({child: 5 << 30, 1: 7}, parent) == 5 << 30  # only the tree's own
    assert DeviceMonitor.tree_gpu_bytes({parent: 1, child: 2}, parent) == 3
    assert DeviceMonitor.tree_gpu_bytes({1: 7}, parent) is None  # NVML sees none of it: no figure, not 0


@pytest.mark.timeout(60)
def test_a_gone_or_absent_process_has_no_tree():
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    for pid in (done.pid, None, 0):
        assert DeviceMonitor.process_tree(pid) == []
        assert DeviceMonitor.rss(pid) is None
        assert DeviceMonitor.tree_gpu_bytes({done.pid: 9}, pid) is None
