"""`stop` and `seed` through real processes and the tiny model: a stop string ends the answer,
streamed or not, and no chunk ever carries text past it; the same seed gives the same sampled
text, alone or batched with its twin, and another seed gives another."""

import asyncio

from harness import a_stop_string, png

from qvl.protocol import AsyncClient

LENGTH = {"max_new_tokens": 24, "min_new_tokens": 24}  # random weights never stop by themselves


def question(image: bytes) -> list:
    return [{"role": "user", "content": [{"type": "image", "image": image},
                                         {"type": "text", "text": "Describe the picture."}]}]


def test_a_stop_string_cuts_the_answer_streamed_or_not(shared_supervisor):
    messages = question(png((80, 64), (30, 160, 90)))
    with shared_supervisor.client() as client:
        whole = client.generate(messages, **LENGTH).text
        stop = a_stop_string(whole)
        expected = whole[:whole.find(stop)]
        cut = client.generate(messages, **LENGTH, stop=[stop, "never in it \x00"])
        assert cut.text == expected
        assert cut.usage["completion_tokens"] < LENGTH["max_new_tokens"] or whole.endswith(stop)
        chunks = list(client.stream(messages, **LENGTH, stop=[stop]))
    sent = "".join(c.text for c in chunks[:-1])  # what the worker streamed before its reply
    assert expected.startswith(sent)
    assert "".join(c.text for c in chunks) == expected
    assert chunks[-1].done


def test_the_same_seed_gives_the_same_sampled_text(shared_supervisor):
    messages = question(png((96, 64), (200, 200, 40)))
    sampled = {**LENGTH, "temperature": 1.0, "top_p": 0.95}

    async def run() -> tuple[list[str], str, str]:
        async with AsyncClient(shared_supervisor.endpoint, timeout=60) as client:
            twins = await asyncio.gather(*(client.generate(messages, **sampled, seed=1234) for _ in range(2)))
            later = await client.generate(messages, **sampled, seed=1234)
            other = await client.generate(messages, **sampled, seed=99)
            return [r.text for r in twins], later.text, other.text

    twins, later, other = asyncio.run(run())
    assert twins[0] == twins[1] == later  # batched together or alone, on either worker
    assert other != later
