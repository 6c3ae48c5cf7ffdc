"""Answers through real supervisor and worker processes over real sockets, with the tiny model."""

import asyncio
import threading

import pytest

from harness import png
from qvl.protocol import AsyncClient, Client

RED, BLUE = png((96, 64), (200, 30, 30)), png((64, 160), (20, 40, 220))
SINGLE = [{"role": "user", "content": [{"type": "image", "image": RED},
                                        {"type": "text", "text": "What is this?"}]}]
MULTI_IMAGE = [{"role": "user", "content": [
    {"type": "image", "image": RED}, {"type": "image", "image": BLUE},
    {"type": "text", "text": "Compare the two pictures."}]}]
MULTI_TURN = [
    {"role": "system", "content": "You describe pictures."},
    {"role": "user", "content": [{"type": "image", "image": BLUE},
                                 {"type": "text", "text": "Describe it."}]},
    {"role": "assistant", "content": "A blue rectangle."},
    {"role": "user", "content": "Which color again?"},
]
CASES = {"single": SINGLE, "multi_image": MULTI_IMAGE, "multi_turn": MULTI_TURN}


def check(result, messages):
    images = sum(p.get("type") == "image" for m in messages if isinstance(m["content"], list)
                 for p in m["content"])
    assert isinstance(result.text, str)
    assert result.usage["completion_tokens"] >= 1
    # every image adds its merged patches to the prompt, so more images mean a longer prompt
    assert result.usage["prompt_tokens"] > 10 + 4 * images
    assert result.worker["slot"] in (0, 1) and result.worker["pid"] > 0
    for key in ("queue_ms", "wait_ms", "images_ms", "prefill_ms", "decode_ms", "total_ms"):
        assert result.timings[key] >= 0
    # the worker's wait holds its images' making; the whole holds every part
    assert result.timings["images_ms"] <= result.timings["wait_ms"]
    assert (result.timings["images_ms"] > 0) == (images > 0)
    assert result.timings["queue_ms"] + result.timings["wait_ms"] + result.timings["prefill_ms"] \
        <= result.timings["total_ms"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_sync_client(shared_supervisor, case):
    with Client(shared_supervisor.endpoint, timeout=30) as client:
        result = client.generate(CASES[case], max_new_tokens=8)
    check(result, CASES[case])
    assert result.usage["completion_tokens"] <= 8


@pytest.mark.parametrize("case", sorted(CASES))
async def test_async_client(shared_supervisor, case):
    async with AsyncClient(shared_supervisor.endpoint, timeout=30) as client:
        result = await client.generate(CASES[case], max_new_tokens=8)
    check(result, CASES[case])


def test_prompt_grows_with_images(shared_supervisor):
    with Client(shared_supervisor.endpoint, timeout=30) as client:
        one = client.generate(SINGLE, max_new_tokens=1)
        two = client.generate(MULTI_IMAGE, max_new_tokens=1)
    assert two.usage["prompt_tokens"] > one.usage["prompt_tokens"]


def test_ask_takes_bytes_paths_and_pil(shared_supervisor, tmp_path):
    from PIL import Image
    path = tmp_path / "red.png"
    path.write_bytes(RED)
    with Client(shared_supervisor.endpoint, timeout=30) as client:
        answers = [client.ask(img, "What is this?", max_new_tokens=6).text
                   for img in (RED, str(path), Image.open(path))]
    assert answers[0] == answers[1] == answers[2]  # greedy decoding of the same pixels


def test_twenty_concurrent_requests_from_several_clients(shared_supervisor):
    """Sync clients on threads and async tasks at once: each gets exactly its own reply."""
    prompts = [f"Question number {i}: what is in the picture?" for i in range(20)]
    images = [png((48 + 8 * i, 64), (10 * i, 255 - 10 * i, 90)) for i in range(20)]
    with Client(shared_supervisor.endpoint, timeout=60) as client:  # reference answers, one at a time
        alone = [client.ask(images[i], prompts[i], max_new_tokens=6).text for i in range(20)]

    got: dict[int, list] = {i: [] for i in range(20)}

    def sync_worker(indices):
        with Client(shared_supervisor.endpoint, timeout=60) as c:
            for i in indices:
                got[i].append(c.ask(images[i], prompts[i], max_new_tokens=6))

    async def async_part(indices):
        async with AsyncClient(shared_supervisor.endpoint, timeout=60) as c:
            results = await asyncio.gather(*(c.ask(images[i], prompts[i], max_new_tokens=6)
                                             for i in indices))
        for i, r in zip(indices, results):
            got[i].append(r)

    threads = [threading.Thread(target=sync_worker, args=(range(k, 10, 3),)) for k in range(3)]
    for t in threads:
        t.start()
    asyncio.run(async_part(list(range(10, 20))))
    for t in threads:
        t.join(timeout=60)
    assert all(len(v) == 1 for v in got.values()), {i: len(v) for i, v in got.items()}
    # answers match their own request: the same text as when asked alone (greedy decoding)
    assert [got[i][0].text for i in range(20)] == alone
    assert len({r[0].id for r in got.values()}) == 20
    assert max(r[0].timings["batch_size"] for r in got.values()) > 1  # some really were batched
