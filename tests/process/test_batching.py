"""Batched answers equal unbatched ones for greedy decoding, images of different sizes in one
batch, with both ways to generate; the static KV pool's own step gives `generate`'s tokens."""

import pytest
from PIL import Image

from qvl.protocol.contract import ModelOptions
from qvl.protocol.errors import BadRequest
from qvl.protocol.messages import GenerationParams
from qvl.worker.engine import Engine

PARAMS = GenerationParams(max_new_tokens=24)


def image_request(size, question, seed):
    image = Image.effect_noise(size, 30 + seed).convert("RGB")
    return [{"role": "user", "content": [{"type": "image", "frame": 0}, {"type": "text", "text": question}]}], [image]


def text_request(question):
    return [{"role": "user", "content": [{"type": "text", "text": question}]}], []


REQUESTS = [image_request((96, 64), "What is it?", 1), image_request((200, 120), "Describe the whole picture.", 2),
            image_request((64, 300), "Colour?", 3)]


@pytest.fixture(scope="module")
def engines(tiny_model):
    return {kind: Engine(ModelOptions(str(tiny_model), "cpu", kv_cache=kind)) for kind in ("dynamic", "static")}


def prompts(engine, requests=REQUESTS):
    return [engine.prepare(messages, images, PARAMS) for messages, images in requests]


@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
def test_batched_equals_unbatched(engines, kv_cache):
    engine = engines[kv_cache]
    params = GenerationParams(max_new_tokens=10)
    batched = engine.generate(prompts(engine), params)
    alone = [engine.generate([p], params)[0] for p in prompts(engine)]
    assert [c.text for c in batched] == [c.text for c in alone]
    assert [c.prompt_tokens for c in batched] == [c.prompt_tokens for c in alone]
    assert len({c.text for c in alone}) == 3  # different inputs, different answers: the check can fail
    assert all(1 <= c.completion_tokens <= 10 for c in batched)


def test_static_decoder_gives_the_tokens_of_generate(engines):
    requests = REQUESTS + [text_request("A question without any image, longer than the others are.")]
    params = GenerationParams(max_new_tokens=24, min_new_tokens=4)
    static = engines["static"].generate(prompts(engines["static"], requests), params)
    reference = engines["dynamic"].generate(prompts(engines["dynamic"], requests), params)
    assert [c.text for c in static] == [c.text for c in reference]
    assert [c.completion_tokens for c in static] == [c.completion_tokens for c in reference]
    assert all(c.completion_tokens >= 4 for c in static)


@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
def test_text_only_prompts_padded_in_a_batch_give_their_tokens_alone(engines, kv_cache):
    """Without images transformers numbers a padded row's tokens from the batch's first column; the
    static decoder must go on from the row's own numbering."""
    engine, params = engines[kv_cache], GenerationParams(max_new_tokens=8, min_new_tokens=8)
    requests = [text_request("Why?"), text_request("What is the colour of the sky at noon in May?")]
    batched = engine.generate(prompts(engine, requests), params)
    alone = [engines["dynamic"].generate(prompts(engines["dynamic"], [r]), params)[0] for r in requests]
    assert [c.text for c in batched] == [c.text for c in alone]


def test_batch_larger_than_the_pool_is_split(tiny_model, engines):
    small = Engine(ModelOptions(str(tiny_model), "cpu", kv_cache="static", kv_cache_tokens=512))
    params = GenerationParams(max_new_tokens=10)
    assert not small.kv_pool.fits(len(REQUESTS), 100, params.max_new_tokens)
    batch = prompts(small)
    parts = small.sub_batches(batch, params)
    assert len(parts) > 1 and [i for part in parts for i in range(len(batch))[part]] == [0, 1, 2]
    assert [c.text for part in parts for c in small.generate(batch[part], params)] == \
        [c.text for c in engines["static"].generate(prompts(engines["static"]), params)]
    messages, images = REQUESTS[0]
    with pytest.raises(BadRequest, match=r"^\d+ prompt tokens plus max_new_tokens 500 do not fit the KV cache of 512"):
        small.prepare(messages, images, GenerationParams(max_new_tokens=500))


@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
def test_progress_reports_what_the_answer_begins_with(engines, kv_cache):
    engine, seen = engines[kv_cache], []
    answers = engine.generate(prompts(engine)[:2], GenerationParams(max_new_tokens=12, min_new_tokens=12),
                              lambda rows: seen.append(rows()))
    lengths = [len(rows[0]) for rows in seen]
    assert lengths[:2] == [4, 8] and all(n % 4 == 0 for n in lengths)  # every STOP_CHECK_EVERY steps
    for rows in seen:
        assert all(c.text.startswith(engine.detokenize(row)) for row, c in zip(rows, answers))


def test_seeded_sampling_is_the_same_alone_batched_and_in_both_ways_to_generate(engines):
    params = GenerationParams(max_new_tokens=12, min_new_tokens=12, temperature=0.9, top_p=0.95, seed=11)
    texts = {}
    for kind, engine in engines.items():
        batched = [c.text for c in engine.generate(prompts(engine), params)]
        assert batched == [engine.generate([p], params)[0].text for p in prompts(engine)]
        texts[kind] = batched
    assert texts["dynamic"] == texts["static"]
    other = engines["static"].generate(prompts(engines["static"]), GenerationParams(**{**vars(params), "seed": 12}))
    assert [c.text for c in other] != texts["static"]


@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
def test_a_stop_string_ends_the_text_and_progress_never_passes_it(engines, kv_cache):
    engine, seen = engines[kv_cache], []
    length = GenerationParams(max_new_tokens=16, min_new_tokens=16)
    whole = engine.generate(prompts(engine)[:1], length)[0]
    stop = next(whole.text[k:k + 2] for k in range(len(whole.text) // 2, len(whole.text) - 1)
                if "\ufffd" not in whole.text[k:k + 2] and whole.text.find(whole.text[k:k + 2]) > 0)
    params = GenerationParams(**{**vars(length), "stop": (stop,)})
    cut = engine.generate(prompts(engine)[:1], params, lambda rows: seen.append(rows()[0]))[0]
    assert cut.text == whole.text[:whole.text.find(stop)]
    assert cut.completion_tokens <= whole.completion_tokens
    assert all(cut.text.startswith(engine.detokenize(row, params.stop)) for row in seen)


@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
def test_rows_end_at_their_stop_string_not_at_max_new_tokens(engines, kv_cache, monkeypatch):
    """A batch whose rows have all met the stop string ends within a few steps of it; its answers
    are those cut from the whole run."""
    engine = engines[kv_cache]
    whole = engine.generate(prompts(engine), GenerationParams(max_new_tokens=60, min_new_tokens=60))
    stop = whole[0].text[8:10]
    assert all(stop in c.text for c in whole), [c.text for c in whole]  # the tiny model repeats itself
    steps = []
    if kv_cache == "static":
        step = engine.kv_pool._step
        monkeypatch.setattr(engine.kv_pool, "_step", lambda bucket: steps.append(1) or step(bucket))
    else:
        generate = engine.model.generate
        monkeypatch.setattr(engine.model, "generate", lambda **kw: steps.extend([1] * (
            (out := generate(**kw)).shape[1] - kw["input_ids"].shape[1])) or out)
    params = GenerationParams(max_new_tokens=400, min_new_tokens=400, stop=(stop,))
    cut = engine.generate(prompts(engine), params)
    assert [c.text for c in cut] == [c.text[:c.text.find(stop)] for c in whole]
    assert len(steps) < max(c.completion_tokens for c in cut) + 8 < 400, len(steps)


@pytest.mark.timeout(120)
def test_a_split_batch_answers_each_part_as_it_ends(start_supervisor, tiny_model):
    """Four text requests wait together behind a first one, so they make one batch; `prefill_tokens`
    of three prompts' tokens splits it in two parts of two. Each part is answered when it ends: the
    second part's replies come at least 0.4 s (of its injected 1 s) after the first part's, and its
    requests' `wait_ms` counts that time (each part's wait ends when the part starts)."""
    import asyncio
    import time

    from qvl.protocol import AsyncClient
    from qvl.worker.engine import NO_IMAGES

    messages = [{"role": "user", "content": [{"type": "text", "text": "Tell me about the sea."}]}]
    params = GenerationParams(max_new_tokens=4, min_new_tokens=4)
    length = len(Engine(ModelOptions(str(tiny_model), "cpu")).prompt(messages, NO_IMAGES, params).ids)
    sup = start_supervisor("--prefill-tokens", str(3 * length), "--max-batch-size", "4",
                           env={"QVL_FAULTS": "slow_ms=1000"})  # a wide window for the four to arrive, on a busy machine
    sup.wait_ready()

    async def run():
        async with AsyncClient(sup.endpoint, timeout=60) as client:
            async def timed(i):
                result = await client.generate(messages, max_new_tokens=4, min_new_tokens=4)
                return time.monotonic(), result
            first = asyncio.ensure_future(timed(-1))
            await asyncio.sleep(0.2)  # the worker is in the first request's generate
            rest = asyncio.gather(*(timed(i) for i in range(4)))  # sent now, before the first is answered
            return await first, await rest
    _, batch = asyncio.run(run())
    arrivals = sorted(at for at, _ in batch)
    assert [result.timings["batch_size"] for _, result in batch] == [2, 2, 2, 2]
    assert arrivals[2] - arrivals[1] >= 0.4, arrivals  # the second part ran (1 s injected) after the first's replies
    # each part's wait ends when it starts: the second part's includes the first part's run
    waits = [result.timings["wait_ms"] for _, result in sorted(batch, key=lambda pair: pair[0])]
    assert min(waits[2:]) - max(waits[:2]) >= 400, waits
