"""A spare is spawned as a worker is: the slot's own environment (its GPU as the only visible
device), `python -m qvl.worker --spare` with a spec that reads back whole; and loading it moves its
process, unchanged, under the new generation."""

import subprocess
import sys

from qvl.protocol.contract import SpareSpec
from qvl.supervisor.config import Config
from qvl.supervisor.lifecycle import Incarnation, SlotLifecycle, WorkerState
from qvl.supervisor.launcher import exec_worker
from qvl.supervisor.slots import Slot


class FakePopen:
    """Stands in for `subprocess.Popen`: the command and environment, no process."""

    def __init__(self, cmd, env, stdin):
        self.cmd, self.env, self.pid = cmd, env, 4242

    def poll(self):
        return None


def test_a_spare_sees_only_its_slots_gpu_and_becomes_the_next_generation(monkeypatch):
    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    config = Config(device="cuda:0", model="/models/m", engine="noop")
    slot = Slot(1, SlotLifecycle(1, config, 0.0), gpu=3)
    peer = slot.spawn_spare(7, config, "ipc:///run/backend", exec_worker)
    popen = peer.process.child
    assert popen.cmd[:4] == [sys.executable, "-m", "qvl.worker", "--spare"]
    assert SpareSpec.from_json(popen.cmd[4]) == SpareSpec("ipc:///run/backend", 1, 7, "noop", config.limits)
    assert popen.env["CUDA_VISIBLE_DEVICES"] == "3" and popen.env["PYTORCH_CUDA_ALLOC_CONF"] == config.alloc_conf
    assert peer.identity == b"1:spare:7"

    life = Incarnation(5, WorkerState.SPAWNING, 0.0, pid=4242)
    worker, spec = slot.adopt_spare(7, life, config, "ipc:///run/backend")
    assert worker.process is peer.process and slot.peers[5] is worker and not slot.spares
    assert (spec.slot, spec.generation, spec.model.device) == (1, 5, "cuda:0")
    assert worker.identity == b"1:5"
