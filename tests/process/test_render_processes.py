"""The vLLM worker's render processes (`RenderProcesses`), with a stand-in input maker.

vLLM's renderer cannot be had on these machines (no CUDA build of vLLM), so the processes here hold
`ProcessorInputs`, a stand-in named as such: the tiny Qwen3-VL model's own image processor, a real
tensor-making input maker of the same shape (built once per process, `render(...)` per request).
Everything else is the real pool: spawned processes, tensors pickled back, a process killed to
break it, its parent killed to end it. `test_gpu_vllm.py` runs the pool with vLLM's renderer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from harness import alive, wait_gone
from PIL import Image

from qvl.protocol.errors import BadRequest
from qvl.worker.render_processes import RenderProcessDied, RenderProcesses

pytestmark = pytest.mark.timeout(120)


class ProcessorInputs:
    """Stand-in for `VllmInputs` (vLLM is not installed here): pixels from the tiny model's image
    processor, with the render process's pid and when it ran."""

    def __init__(self, model: str):
        from transformers import AutoProcessor
        self.image_processor = AutoProcessor.from_pretrained(model).image_processor

    def render(self, image: Image.Image, hold_s: float = 0.0, fail: str = ""):
        if fail == "bad_request":
            raise BadRequest("the stand-in refuses this input")
        if fail == "odd":
            raise OddError("made", "here")
        started = time.monotonic()
        pixels = self.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        time.sleep(hold_s)
        return os.getpid(), started, time.monotonic(), pixels


class OddError(Exception):
    """An exception that pickles but cannot be rebuilt from its message alone."""

    def __init__(self, where: str, what: str):
        super().__init__(f"{where} {what}")


class SlowToBuildInputs:
    """An input maker that takes seconds to build in every process but the first to start."""

    def __init__(self, folder: str):
        try:
            os.close(os.open(Path(folder) / "first", os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            time.sleep(3.0)
        (Path(folder) / f"built-{os.getpid()}").touch()


class BrokenInputs:
    """An input maker that cannot be built."""

    def __init__(self):
        raise OSError("no model here")


@pytest.fixture(scope="module")
def pool(tiny_model):
    renders = RenderProcesses(2, ProcessorInputs, str(tiny_model))
    renders.wait_ready()
    yield renders
    renders.close()
    assert not wait_gone(set(renders.pids)), "a render process outlived close()"


def test_a_render_comes_back_as_made_in_the_worker(pool, tiny_model):
    image = Image.new("RGB", (96, 64), (200, 30, 30))
    pid, _, _, pixels = pool.render(image)
    assert pid in pool.pids and pid != os.getpid()
    expected = ProcessorInputs(str(tiny_model)).render(image)[3]
    assert pixels.shape == expected.shape and pixels.equal(expected)


def test_renders_from_two_threads_run_at_once_in_two_processes(pool):
    image = Image.new("RGB", (64, 64), (10, 200, 30))
    results = []
    threads = [threading.Thread(target=lambda: results.append(pool.render(image, 0.5))) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    (pid_a, start_a, end_a, _), (pid_b, start_b, end_b, _) = results
    assert pid_a != pid_b
    assert max(start_a, start_b) < min(end_a, end_b), "the two renders did not overlap"


def test_a_makers_error_comes_back_typed_and_the_pool_serves_on(pool):
    image = Image.new("RGB", (64, 64))
    with pytest.raises(BadRequest, match="refuses"):
        pool.render(image, 0.0, "bad_request")
    with pytest.raises(RuntimeError, match="OddError: made here") as info:
        pool.render(image, 0.0, "odd")
    assert not isinstance(info.value, RenderProcessDied)
    assert pool.render(image)[0] in pool.pids


def test_tensors_come_back_by_value_not_through_shared_memory(pool):
    pixels = pool.render(Image.new("RGB", (96, 96)))[3]
    maps = Path("/proc/self/maps").read_text()
    assert pixels.numel() > 0 and "/dev/shm/torch_" not in maps  # where torch's shared tensors live


def test_the_pool_is_ready_only_once_every_process_has_built_its_maker(tmp_path):
    renders = RenderProcesses(2, SlowToBuildInputs, str(tmp_path))
    try:
        renders.wait_ready()
        built = sorted(int(p.name.split("-")[1]) for p in tmp_path.glob("built-*"))
        assert built == renders.pids, "ready while a render process was still building"
    finally:
        renders.close()
    assert not wait_gone(set(renders.pids))


def test_a_maker_that_cannot_be_built_fails_the_wait_for_the_pool():
    renders = RenderProcesses(1, BrokenInputs)
    try:
        with pytest.raises(RenderProcessDied):
            renders.wait_ready()
    finally:
        renders.close()
    assert not wait_gone(set(renders.pids))


def test_a_killed_render_process_breaks_the_pool_for_every_render(tiny_model):
    renders = RenderProcesses(1, ProcessorInputs, str(tiny_model))
    try:
        renders.wait_ready()
        image = Image.new("RGB", (64, 64))
        waiting = []
        thread = threading.Thread(target=lambda: waiting.append(_raised(renders.render, image, 30.0)))
        thread.start()
        time.sleep(0.5)  # that render is under way
        os.kill(renders.pids[0], signal.SIGKILL)
        thread.join(timeout=20)
        assert not thread.is_alive(), "a render waited on a broken pool"
        assert isinstance(waiting[0], RenderProcessDied)
        assert isinstance(_raised(renders.render, image), RenderProcessDied)
    finally:
        renders.close()
    assert not wait_gone(set(renders.pids))


def _raised(call, *args):
    try:
        call(*args)
    except Exception as exc:
        return exc
    return None


PARENT = """
import os, sys, time
sys.path[:0] = sys.argv[3:]
from qvl.worker.parent import exit_when_any_ends
from qvl.worker.render_processes import RenderProcesses
from test_render_processes import ProcessorInputs
renders = RenderProcesses(1, ProcessorInputs, sys.argv[1])
renders.wait_ready()
stopping = exit_when_any_ends(renders.pids, lambda pid: os._exit(8))
print(*renders.pids, flush=True)
if sys.argv[2] == "close":  # as the worker stops: the watch told first
    stopping.set()
    renders.close()
    time.sleep(1.0)  # time for a watch that was not told to end this process
    os._exit(0)
time.sleep(600)
"""


@contextmanager
def render_parent(tiny_model, mode: str = "wait"):
    """A process holding one render process, ended (exit code 8) by the watch on its pid; with
    mode "close", one that closes its render processes at once, the watch told first."""
    here = Path(__file__).parent
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(tiny_model), mode, str(here), str(here.parent)],
                              stdout=subprocess.PIPE, text=True)
    try:
        (pid,) = (int(p) for p in parent.stdout.readline().split())
        assert alive(pid)
        yield parent, pid
    finally:
        parent.kill()
        parent.wait(timeout=10)


def test_render_processes_die_with_the_process_that_started_them(tiny_model):
    with render_parent(tiny_model) as (parent, pid):
        parent.kill()
        parent.wait(timeout=10)
        assert not wait_gone({pid}), "a render process outlived its parent"


def test_a_render_process_that_dies_ends_the_process_watching_it(tiny_model):
    with render_parent(tiny_model) as (parent, pid):
        os.kill(pid, signal.SIGKILL)
        assert parent.wait(timeout=20) == 8


def test_closing_the_render_processes_is_no_death(tiny_model):
    with render_parent(tiny_model, "close") as (parent, pid):
        assert parent.wait(timeout=20) == 0
        assert not wait_gone({pid})
