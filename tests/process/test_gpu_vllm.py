"""On a CUDA device with vLLM installed: `--engine vllm` serves, streams, cancels, recycles and
survives the death of its worker, or of its engine core or a render process alone, through the
supervisor, as the default engine does; the engine core holds the device and dies with its worker.

Skipped without CUDA or vLLM. `QVL_GPU_MODEL` names the model folder (the `qwen3-vl-4b` preset on a
lent GPU). vLLM's torch.compile is off here to keep the test short (full CUDA graphs for decode
stay on); `scripts/bench_peer.py` measures the default, compiled.
"""

import asyncio
import os
import re
import signal
from pathlib import Path

import pytest
from qvl.protocol import AsyncClient

from harness import SupervisorProcess, alive, png, wait_gone

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.skipif(not os.environ.get("QVL_GPU_MODEL"), reason="needs QVL_GPU_MODEL")]
pytest.importorskip("vllm")


def supervised(folder: Path, *flags: str):
    """A supervisor with one vLLM worker (compile off), stopped afterwards with all its processes gone."""
    sup = SupervisorProcess(folder, Path(os.environ["QVL_GPU_MODEL"]), "--device", "cuda:0", "--engine", "vllm",
                            "--vllm-compile", "off", "--start-timeout-s", "400", "--max-inflight", "64", *flags)
    try:
        sup.wait_ready(timeout=400)
        yield sup
    finally:
        pids = {sup.pid, *sup.worker_pids}
        assert sup.stop(timeout=120) == 0
        assert wait_gone(pids) == set()


@pytest.fixture(scope="module")
def vllm_supervisor(tmp_path_factory):
    yield from supervised(tmp_path_factory.mktemp("vllm"), "--recycle-overlap", "always")


@pytest.mark.timeout(600)
def test_serves_an_image_with_vllm_telemetry(vllm_supervisor):
    with vllm_supervisor.client(timeout=120) as client:
        result = client.ask(png((448, 448)), "What is in this picture?", max_new_tokens=16, min_new_tokens=16)
        status = client.status()
    assert result.usage["completion_tokens"] == 16 and result.usage["prompt_tokens"] > 100
    timings = result.timings  # vLLM's engine core's own account beside the worker's
    assert 0 <= timings["core_arrival_ms"] < timings["prefill_ms"]
    assert timings["core_queue_ms"] >= 0 and 0 < timings["core_prefill_ms"] <= timings["prefill_ms"]
    assert 0 < timings["render_ms"] <= timings["images_ms"]  # made on the image pool, after the JPEG's decode
    telemetry = status["workers"][0]["telemetry"]
    assert 0 <= telemetry["kv_cache_usage"] <= 1
    assert telemetry["reserved_bytes"] > 0 and telemetry["device_used_bytes"] > 0


@pytest.mark.timeout(600)
def test_a_stream_is_the_answer_in_pieces(vllm_supervisor):
    """Chunks carry only new text, and random weights seldom make a token with text (the preset's
    tokenizer knows 8 192 of the model's 151 936 ids): of 2000 greedy tokens, some text comes
    before the last chunk. That the chunks make up the answer the client checks itself (`_Stream`).
    Greedy tokens are not compared with a second request's: vLLM serves the second from its prefix
    cache and is not batch-invariant, so on an H200 the same prompt gave other tokens from the first."""
    messages = [{"role": "user", "content": [{"type": "text", "text": "Count to ten."}]}]
    with vllm_supervisor.client(timeout=120) as client:
        chunks = list(client.stream(messages, max_new_tokens=2000, min_new_tokens=2000))
        whole = client.generate(messages, max_new_tokens=2000, min_new_tokens=2000)
    assert len(chunks) >= 2 and chunks[-1].done and all(c.text for c in chunks[:-1])
    assert chunks[-1].usage["completion_tokens"] == whole.usage["completion_tokens"] == 2000
    assert chunks[-1].finish_reason == whole.finish_reason == "length"
    assert 0 < whole.timings["render_ms"] <= whole.timings["images_ms"]  # text only: made on the image pool too


@pytest.mark.timeout(600)
def test_a_cancelled_stream_leaves_the_batch_at_once(vllm_supervisor):
    """vLLM aborts the row: the cancelled reply comes long before 2000 tokens could be made, and the
    worker serves on."""
    with vllm_supervisor.client(timeout=120) as client:
        chunks = []
        for chunk in client.stream([{"role": "user", "content": [{"type": "text", "text": "Go on."}]}],
                                   max_new_tokens=2000, min_new_tokens=2000):
            chunks.append(chunk)
            if len(chunks) == 3:
                client.cancel(chunk.id)
        after = client.ask(png((224, 224)), "And this?", max_new_tokens=8, min_new_tokens=8)
        status = client.status()
    assert chunks[-1].done and chunks[-1].finish_reason == "cancelled"
    assert chunks[-1].usage["completion_tokens"] < 2000
    assert after.usage["completion_tokens"] == 8 and after.finish_reason == "length"
    assert status["workers"][0]["telemetry"]["running_requests"] == 0


@pytest.mark.timeout(900)
def test_a_recycle_and_a_killed_worker_lose_no_request(vllm_supervisor):
    """16 requests in flight through an operator recycle, then 16 through a SIGKILL of the worker:
    every one is answered."""
    async def load(client, n, tokens=64):
        return await asyncio.gather(*(client.ask(png((224 + 32 * i, 224)), "Describe it.", max_new_tokens=tokens,
                                                 min_new_tokens=tokens) for i in range(n)))

    async def scenario():
        async with AsyncClient(vllm_supervisor.endpoint, timeout=600) as client:
            before = (await client.status())["workers"][0]
            flight = asyncio.ensure_future(load(client, 16))
            await asyncio.sleep(0.5)
            await client.recycle(0)
            recycled = await flight
            while True:  # the old worker serves until its successor is ready
                worker = (await client.status())["workers"][0]
                if worker["generation"] > before["generation"] and worker["state"] == "ready":
                    break
                recycled += await load(client, 2)
            flight = asyncio.ensure_future(load(client, 16, tokens=1024))  # seconds of decoding
            await asyncio.sleep(1.0)
            os.kill(worker["pid"], signal.SIGKILL)
            killed = await flight
            after = (await client.status())["workers"][0]
            return before, recycled, worker, killed, after

    before, recycled, worker, killed, after = asyncio.run(scenario())
    assert all(r.usage["completion_tokens"] == 64 for r in recycled)
    assert all(r.usage["completion_tokens"] == 1024 for r in killed)
    assert worker["generation"] > before["generation"]
    assert after["generation"] > worker["generation"]
    # the killed worker's engine core died with it; the recycled one's went at its orderly exit,
    # which is no engine failure
    assert wait_gone({worker["telemetry"]["engine_core_pid"], before["telemetry"]["engine_core_pid"]}) == set()
    assert exit_reason(vllm_supervisor.log(), before) == "exit code 0 (ok)"


def exit_reason(log: str, worker: dict) -> str:
    """How the supervisor saw `worker` (a status entry) exit."""
    (reason,) = re.findall(rf'gen={worker["generation"]} pid={worker["pid"]} old=\S+ new=exited reason="([^"]+)"', log)
    return reason


@pytest.mark.timeout(900)
def test_the_engine_core_holds_the_device_and_its_death_ends_the_worker(vllm_supervisor):
    """The worker makes no CUDA context: the device memory is its engine core child's. SIGKILLing
    that child alone, 16 requests in flight, ends the worker (engine_failed) and every request is
    answered by its successor."""
    import pynvml

    async def scenario():
        async with AsyncClient(vllm_supervisor.endpoint, timeout=600) as client:
            worker = (await client.status())["workers"][0]
            flight = asyncio.ensure_future(asyncio.gather(*(
                client.ask(png((224, 224 + 32 * i)), "Describe it.", max_new_tokens=512, min_new_tokens=512)
                for i in range(16))))
            await asyncio.sleep(1.0)
            os.kill(worker["telemetry"]["engine_core_pid"], signal.SIGKILL)
            answers = await flight
            return worker, answers, (await client.status())["workers"][0]

    with vllm_supervisor.client(timeout=60) as client:
        before = client.status()["workers"][0]
    core = before["telemetry"]["engine_core_pid"]
    pynvml.nvmlInit()
    try:
        holders = {p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(pynvml.nvmlDeviceGetHandleByIndex(0))}
    finally:
        pynvml.nvmlShutdown()
    assert core in holders and before["pid"] not in holders
    assert before["gpu_bytes"] > 4 << 30  # the 4B weights at least, counted through the worker's tree

    worker, answers, after = asyncio.run(scenario())
    assert all(r.usage["completion_tokens"] == 512 for r in answers)
    assert after["generation"] > worker["generation"] and after["state"] == "ready"
    assert not alive(worker["pid"])
    assert exit_reason(vllm_supervisor.log(), worker) == "crashed (exit code 8 (engine_failed))"


@pytest.fixture(scope="module")
def rendering_supervisor(tmp_path_factory):
    """A supervisor of its own whose worker has 4 render processes (the default has none)."""
    yield from supervised(tmp_path_factory.mktemp("vllm-render"), "--vllm-render-processes", "4")


@pytest.mark.timeout(900)
def test_render_processes_hold_no_device_and_one_dying_ends_the_worker(vllm_supervisor, rendering_supervisor):
    """The worker's render processes make requests' inputs with no CUDA context, and a greedy
    image request's answer through them is the one a worker rendering itself gives. SIGKILLing
    one, 16 image requests in flight, ends the worker (engine_failed) at once, not at its next
    render, and every request is answered by its successor, which has render processes of its
    own; the killed worker's others die with it."""
    import pynvml

    image, question = png((448, 448), (30, 140, 200)), "What is in this picture?"
    answers = []
    for sup in (vllm_supervisor, rendering_supervisor):
        with sup.client(timeout=120) as client:
            answers.append(client.ask(image, question, max_new_tokens=16, min_new_tokens=16))
    assert answers[0].text == answers[1].text
    assert answers[0].usage["prompt_tokens"] == answers[1].usage["prompt_tokens"] > 100

    async def scenario(victim: int):
        async with AsyncClient(rendering_supervisor.endpoint, timeout=600) as client:
            flight = asyncio.ensure_future(asyncio.gather(*(
                client.ask(png((224 + 32 * i, 224)), "Describe it.", max_new_tokens=512, min_new_tokens=512)
                for i in range(16))))
            await asyncio.sleep(1.0)  # rendered and decoding: no render is waiting on the victim
            os.kill(victim, signal.SIGKILL)
            answers = await flight
            return answers, (await client.status())["workers"][0]

    with rendering_supervisor.client(timeout=60) as client:
        before = client.status()["workers"][0]
    renders = render_pids(before)
    assert before["telemetry"]["render_processes"] == len(renders) == 4
    pynvml.nvmlInit()
    try:
        holders = {p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(pynvml.nvmlDeviceGetHandleByIndex(0))}
    finally:
        pynvml.nvmlShutdown()
    assert before["telemetry"]["engine_core_pid"] in holders and not holders & set(renders)

    answers, after = asyncio.run(scenario(renders[0]))
    assert all(r.usage["completion_tokens"] == 512 for r in answers)
    assert after["generation"] > before["generation"] and after["state"] == "ready"
    assert exit_reason(rendering_supervisor.log(), before) == "crashed (exit code 8 (engine_failed))"
    assert wait_gone({before["pid"], *renders}) == set()
    assert len(render_pids(after)) == 4


def render_pids(worker: dict) -> list[int]:
    """The worker's spawned children (multiprocessing's `spawn_main`): its render processes, not its
    engine core (forked) nor multiprocessing's resource tracker."""
    import psutil
    return [p.pid for p in psutil.Process(worker["pid"]).children() if "spawn_main" in " ".join(p.cmdline())]
