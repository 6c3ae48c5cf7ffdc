"""Streaming over ZeroMQ: chunks as tokens are generated, sync and async, and a stream whose
worker dies after sending text ends with `worker_failed` instead of being run again."""

import asyncio
import os
import signal

import pytest

from harness import png
from qvl.protocol import AsyncClient, WorkerFailed

MESSAGES = [{"role": "user", "content": [{"type": "image", "image": png((120, 80), (30, 160, 60))},
                                          {"type": "text", "text": "Tell me about it."}]}]
PARAMS = {"max_new_tokens": 40, "min_new_tokens": 40}


def check_stream(chunks, answer):
    *pieces, last = chunks
    assert len(pieces) >= 3 and all(c.text and not c.done for c in pieces)  # text arrived in parts
    assert last.done and last.usage["completion_tokens"] == answer.usage["completion_tokens"]
    assert last.timings["decode_ms"] >= 0 and last.worker["pid"] > 0
    assert "".join(c.text for c in chunks) == answer.text


def test_sync_stream_gives_the_answer_in_parts(shared_supervisor):
    with shared_supervisor.client() as client:
        answer = client.generate(MESSAGES, **PARAMS)
        check_stream(list(client.stream(MESSAGES, **PARAMS)), answer)


async def test_async_streams_interleave_with_calls(shared_supervisor):
    async with AsyncClient(shared_supervisor.endpoint, timeout=30) as client:
        answer = await client.generate(MESSAGES, **PARAMS)
        chunks = [c async for c in client.stream(MESSAGES, **PARAMS)]
        check_stream(chunks, answer)


def test_worker_dying_mid_stream_ends_it_with_worker_failed(start_supervisor):
    sup = start_supervisor(env={"QVL_FAULTS": "step_ms=300,generation=1"})
    sup.wait_ready()
    with sup.client() as client:
        stream = client.stream(MESSAGES, max_new_tokens=200, min_new_tokens=200)
        first = next(stream)
        assert first.text and not first.done
        os.kill(client.status()["workers"][0]["pid"], signal.SIGKILL)
        with pytest.raises(WorkerFailed, match="after streaming part of this answer"):
            for _ in stream:
                pass
        assert client.generate(MESSAGES, max_new_tokens=4).usage["completion_tokens"] >= 1  # replacement serves
        counters = client.status()["counters"]
    assert counters.get("retried", 0) == 0 and counters["worker_failed"] == 1


async def test_a_batch_that_fails_after_streaming_never_sends_a_changed_answer(start_supervisor):
    """A batch of two streams runs out of memory after text went out; its rows run again alone.
    Greedy rows repeat themselves and finish their answers; sampled rows would not, so each such
    stream ends with `worker_failed` rather than an answer that disagrees with its chunks."""
    sup = start_supervisor(env={"QVL_FAULTS": "oom_batch_step=3,step_ms=10"})
    sup.wait_ready()
    params = {"max_new_tokens": 24, "min_new_tokens": 24}

    async def streams(client, **extra) -> list:
        async def one():
            chunks = []
            try:
                async for chunk in client.stream(MESSAGES, **params, **extra):
                    chunks.append(chunk)
            except WorkerFailed as exc:
                return chunks, exc
            return chunks, None
        blocker = asyncio.ensure_future(client.generate(MESSAGES, max_new_tokens=120, min_new_tokens=120))
        await asyncio.sleep(0.3)  # the two streams wait behind it, then share one batch
        results = await asyncio.gather(one(), one())
        await blocker
        return results

    async with AsyncClient(sup.endpoint, timeout=60) as client:
        answer = await client.generate(MESSAGES, **params)
        for chunks, error in await streams(client):
            assert error is None and "".join(c.text for c in chunks) == answer.text
        # nearly uniform draws: a row run again repeats its first 8 tokens with no chance worth naming
        sampled = await streams(client, temperature=5.0)
        for chunks, error in sampled:
            assert chunks and not chunks[0].done  # text went out before the batch failed
        assert any(error is not None and "changed" in error.message for _, error in sampled)
        status = await client.status()
    assert status["workers"][0]["generation"] == 1  # the batch's OOM is nobody's alone: no recycle
    assert "batch_split" in sup.log()
