"""On a CUDA device: a model served through the supervisor, with allocator telemetry.

Skipped without CUDA. `QVL_GPU_MODEL` names the model folder (the `qwen3-vl-4b` preset on a lent
GPU); without it the tiny model is used.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness import ROOT, SupervisorProcess, png, wait_gone

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(scope="module")
def gpu_model(tmp_path_factory):
    if os.environ.get("QVL_GPU_MODEL"):
        return Path(os.environ["QVL_GPU_MODEL"])
    out = tmp_path_factory.mktemp("gpu") / "tiny"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_model.py"), "--preset", "tiny",
                    "--out", str(out)], check=True)
    return out


@pytest.mark.timeout(600)
def test_served_on_cuda_with_allocator_telemetry(tmp_path, gpu_model):
    # a later --device overrides the harness's cpu default
    sup = SupervisorProcess(tmp_path, gpu_model, "--device", "cuda:0", "--start-timeout-s", "300")
    try:
        status = sup.wait_ready(timeout=300)
        with sup.client(timeout=120) as client:
            result = client.ask(png((448, 448)), "What is in this picture?",
                                max_new_tokens=16, min_new_tokens=16)
            status = client.status()
        assert result.usage["completion_tokens"] == 16
        telemetry = status["workers"][0]["telemetry"]
        print("answer:", repr(result.text), "timings:", result.timings)
        print("telemetry:", telemetry)
        assert telemetry["allocated_bytes"] > 0
        assert telemetry["reserved_bytes"] >= telemetry["allocated_bytes"]
        assert 0 <= telemetry["fragmentation"] < 1
        assert telemetry["device_total_bytes"] > telemetry["device_used_bytes"] > 0
    finally:
        assert sup.stop(timeout=60) == 0
        assert wait_gone({sup.pid, *sup.worker_pids}) == set()
