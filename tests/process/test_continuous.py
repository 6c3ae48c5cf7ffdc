"""Continuous batching on CPU with the tiny model: requests that join a running batch at
different steps, with images of different sizes, text only, and other sampling parameters beside
them, give the greedy tokens transformers' `generate` gives each alone; an aborted row frees its
slot for a waiting request; a short request leaves before long ones end. Then through real
processes with `--kv-cache continuous`."""

import concurrent.futures

import pytest
import torch
from PIL import Image

from qvl.protocol.contract import ModelOptions
from qvl.protocol.errors import BadRequest
from qvl.protocol.messages import GenerationParams
from qvl.worker.continuous import ContinuousEngine
from qvl.worker.detokenizer import Detokenizer
from qvl.worker.engine import NO_IMAGES, Engine
from qvl.worker.kv_pool import ChunkedPrefill, DecodeStep

from harness import events, png, wait_gone


def image_request(size, question, seed):
    image = Image.effect_noise(size, 30 + seed).convert("RGB")
    return [{"role": "user", "content": [{"type": "image", "frame": 0}, {"type": "text", "text": question}]}], [image]


def text_request(question):
    return [{"role": "user", "content": [{"type": "text", "text": question}]}], []


REQUESTS = [image_request((96, 64), "What is it?", 1), text_request("Tell me a story."),
            image_request((200, 120), "Describe the whole picture.", 2), image_request((64, 300), "Colour?", 3)]


@pytest.fixture(scope="module")
def reference(tiny_model):
    return Engine(ModelOptions(str(tiny_model), "cpu", kv_cache="dynamic"))


@pytest.fixture
def continuous(tiny_model):
    return ContinuousEngine(Engine(ModelOptions(str(tiny_model), "cpu", kv_cache="continuous",
                                                kv_cache_tokens=5120)), rows=5)


def alone(engine, request, params):
    messages, images = request
    return engine.generate([engine.prepare(messages, images, params)], params)[0]


def add(engine, key, request, params):
    messages, images = request
    inputs = engine.process_images(messages, images, params) if images else NO_IMAGES
    engine.add([(key, engine.prompt(messages, inputs, params), params)])


def run(engine, joins: dict[int, list], steps_limit=500) -> dict:
    """Step until every request ended; `joins[step]` lists (key, request, params) added before that
    step. Returns each key's completion and the texts streamed for it."""
    done, streamed = {}, {}
    for step in range(steps_limit):
        for key, request, params in joins.get(step, []):
            add(engine, key, request, params)
        if not engine.running and step > max(joins):
            return {"done": done, "streamed": streamed}
        for out in engine.step():
            streamed[out.key] = streamed.get(out.key, "") + out.text
            if out.completion is not None:
                done[out.key] = out.completion
    raise AssertionError("requests did not end")


def test_rows_joining_at_different_steps_give_their_greedy_tokens_alone(reference, continuous):
    lengths = [12, 20, 7, 16]
    params = [GenerationParams(max_new_tokens=n, min_new_tokens=n) for n in lengths]
    sampled = GenerationParams(max_new_tokens=10, min_new_tokens=10, temperature=0.9, top_p=0.8, top_k=20)
    joins = {0: [(0, REQUESTS[0], params[0]), (1, REQUESTS[1], params[1])],
             3: [(2, REQUESTS[2], params[2]), (9, REQUESTS[1], sampled)],
             5: [(3, REQUESTS[3], params[3])]}
    result = run(continuous, joins)
    for key in range(4):
        expected = alone(reference, REQUESTS[key], params[key])
        got = result["done"][key]
        assert got.text == expected.text, key
        assert got.completion_tokens == expected.completion_tokens == lengths[key]
        assert got.finish_reason == "length"
        assert result["streamed"][key] == got.text
    assert result["done"][9].completion_tokens == 10  # the sampled row shared the batch
    assert not continuous.running


@pytest.mark.timeout(600)
def test_the_compiled_step_and_prefill_give_the_eager_tokens_and_compile_only_at_warm_up(reference, tiny_model):
    """`compile_decode`'s step and prefill (on CUDA by default; built here on CPU): rows joining at
    different steps, alone and four together, up to every slot, give their greedy tokens alone,
    and the prompts and buckets they reach need no compile after warm-up traced them."""
    from torch._dynamo.utils import counters

    engine = Engine(ModelOptions(str(tiny_model), "cpu", kv_cache="continuous", kv_cache_tokens=4096))
    engine.decode = DecodeStep(engine.model, compiled=True)
    continuous = ContinuousEngine(engine, rows=8)
    continuous.capture_prefill()  # what warm_up does after the model's warm-up, before it seals
    continuous.capture_buckets()
    compiled = counters["stats"]["unique_graphs"]
    assert compiled >= 2  # both halves of a layer, at least
    lengths = [12, 20, 7, 16, 9, 14]
    params = [GenerationParams(max_new_tokens=n, min_new_tokens=n) for n in lengths]
    requests = REQUESTS + REQUESTS[:2]
    result = run(continuous, {0: [(0, requests[0], params[0])], 3: [(1, requests[1], params[1])],
                              4: [(k, requests[k], params[k]) for k in range(2, 6)]})
    for key in range(6):
        assert result["done"][key].text == alone(reference, requests[key], params[key]).text, key
    assert counters["stats"]["unique_graphs"] == compiled


def test_a_prefill_padded_to_its_bucket_gives_the_unpadded_logits_and_writes_padding_nowhere_but_its_column(
        continuous):
    """What a graph of the prefill reads, run eagerly here: prompts with and without images packed
    and padded to a 256-token bucket (the padding's embeddings rubbish) give the logits and the
    keys and values of the same prompts unpadded; the padding writes only the last prompt's slot's
    last column, and a slot not in the add is untouched."""
    from qvl.worker.kv_pool import decoder_inputs
    from qvl.worker.packed_prefill import _to

    params = GenerationParams(max_new_tokens=4)
    requests = [REQUESTS[0], text_request("Tell me a story " * 6), REQUESTS[3]]
    prompts = [continuous.prompt(m, continuous.process_images(m, i, params) if i else NO_IMAGES, params)
               for m, i in requests]
    packed_prefill, kv = continuous.packed, continuous.kv
    inputs = continuous.engine.inputs(prompts, pad_left=False)
    with torch.inference_mode():
        packed = packed_prefill._pack(decoder_inputs(continuous.model, inputs), [p.ids for p in prompts],
                                      inputs["input_ids"].shape[1], [0, 1, 2])
        assert packed.visual.numel() and packed.tokens < 256
        plain = continuous.model.lm_head(continuous.engine.decode.prefill(_to(packed, continuous.device), kv))
        before = [(keys.clone(), values.clone()) for keys, values in kv]
        packed_prefill.buffers = packed_prefill.empty_buffers(256)
        packed_prefill.buffers.embeds.normal_()  # what earlier adds left in the padding
        views = packed_prefill.padded(packed, 256, 2)
        padded = continuous.model.lm_head(continuous.engine.decode.prefill(views, kv))
    assert torch.allclose(padded[:3], plain, atol=1e-4)
    total, seen = packed.tokens, packed.visual.numel()
    ends = torch.tensor([len(p.ids) for p in prompts]).cumsum(0).tolist()
    assert views.starts.tolist() == [0, *ends, 256, 256, 256]  # the padding's segment, then the two slots' empty ones
    assert views.segments[total:].eq(3).all() and views.visual[seen:].tolist() == list(range(seen, 256))
    assert views.last.tolist() == [end - 1 for end in ends] + [0, 0]
    last = continuous.slot_length - 1
    for (keys, values), (old_keys, old_values) in zip(kv, before):
        for new, old in ((keys, old_keys), (values, old_values)):
            for slot, prompt in enumerate(prompts):
                assert torch.allclose(new[slot, :, :len(prompt.ids)], old[slot, :, :len(prompt.ids)], atol=1e-4)
            assert torch.equal(new[:2, :, last], old[:2, :, last]) and torch.equal(new[3:], old[3:])
            assert not torch.equal(new[2, :, last], old[2, :, last])  # the padding's column
            assert torch.equal(new[2, :, len(prompts[2].ids):last], old[2, :, len(prompts[2].ids):last])


def test_a_prefill_filling_its_bucket_in_every_slot_leaves_the_padding_segment_empty(continuous):
    """Every slot's prompt, their tokens exactly a bucket: the padding's segment is empty and the
    last prompt ends at the bucket."""
    from qvl.worker.packed_prefill import Packed

    packed_prefill, lengths = continuous.packed, [40, 60, 50, 56, 50]  # 256 tokens in 5 slots
    packed_prefill.buffers = packed_prefill.empty_buffers(256)
    starts = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()])
    hidden = packed_prefill.hidden
    packed = Packed(embeds=torch.zeros(1, 256, hidden), positions=torch.zeros(3, 1, 256, dtype=torch.long),
                    slots=torch.arange(5).repeat_interleave(torch.tensor(lengths)),
                    columns=torch.cat([torch.arange(n) for n in lengths]),
                    segments=torch.arange(5).repeat_interleave(torch.tensor(lengths)), starts=starts.int(),
                    visual=torch.zeros(0, dtype=torch.long), deepstack=torch.zeros(packed_prefill.deep_layers, 0, hidden),
                    last=starts[1:] - 1, flash=False)
    views = packed_prefill.padded(packed, 256, 4)
    assert views.starts.tolist() == [0, 40, 100, 150, 206, 256, 256]
    assert views.last.tolist() == [39, 99, 149, 205, 255] and views.segments.tolist() == packed.segments.tolist()


def test_max_new_tokens_below_one_is_refused(continuous):
    with pytest.raises(BadRequest, match="at least 1"):
        continuous.prompt(*text_request("Why?"), GenerationParams(max_new_tokens=0))


def test_a_request_too_long_for_a_row_is_refused_before_its_pixels_are_made(continuous):
    params = GenerationParams(max_new_tokens=1000)  # a row is 1024 tokens
    messages, images = image_request((448, 448), "What is it?", 5)
    with pytest.raises(BadRequest, match="exceed a batch row of 1024 tokens"):
        continuous.check_images(messages, [image.size for image in images], params)


def test_stop_tokens_end_a_row_as_generate_does(reference, continuous):
    params = GenerationParams(max_new_tokens=40)  # no minimum: the random model may stop early
    result = run(continuous, {0: [(k, r, params) for k, r in enumerate(REQUESTS)]})
    for key, request in enumerate(REQUESTS):
        expected = alone(reference, request, params)
        assert (result["done"][key].text, result["done"][key].completion_tokens) == \
            (expected.text, expected.completion_tokens)


def test_requests_prefilled_together_give_their_tokens_alone(reference, continuous):
    """Prompts of different lengths, images and text only, join in one call: they share one prefill
    forward, packed end to end, and each gives its greedy tokens alone."""
    requests = [*REQUESTS[:3], text_request("Why? " * 80), text_request("Why? " * 100)]
    params = [GenerationParams(max_new_tokens=n, min_new_tokens=n) for n in (9, 14, 6, 11, 8)]
    prompts = [continuous.prompt(m, continuous.process_images(m, i, p) if i else NO_IMAGES, p)
               for (m, i), p in zip(requests, params)]
    assert len({len(p.ids) for p in prompts}) == 5 and min(len(p.ids) for p in prompts[3:]) > 256
    continuous.add([(key, prompt, p) for key, (prompt, p) in enumerate(zip(prompts, params))])
    assert continuous.stats() == {"running_requests": 5, "prefill_forwards": 1, "prefill_chunks": 0}
    result = run(continuous, {0: []})
    for key, (request, p) in enumerate(zip(requests, params)):
        assert result["done"][key].text == alone(reference, request, p).text, key
        assert result["streamed"][key] == result["done"][key].text


def test_rows_join_while_there_are_free_rows_and_the_step_prefill_budget_lasts(continuous, monkeypatch):
    params = GenerationParams(max_new_tokens=4)
    prompt = continuous.prompt(*text_request("Tell me a story."), params)
    long = continuous.prompt(*text_request("Tell me a story " * 80), params)
    assert continuous.has_room([prompt] * 4, prompt)  # 5 rows
    assert not continuous.has_room([prompt] * 5, prompt)
    continuous.prefill_tokens = 2 * len(prompt.ids)
    assert continuous.has_room([prompt], prompt) and not continuous.has_room([prompt] * 2, prompt)
    assert not continuous.has_room([prompt], long)  # the one that would go over the budget waits
    assert continuous.has_room([], long)  # and joins alone: a prompt over the budget never starves


LONG = image_request((200, 120), "Look closely and describe the whole picture, every part of it.", 4)


def test_a_prompt_over_the_budget_is_prefilled_a_chunk_per_step_while_the_others_decode(
        reference, continuous, monkeypatch):
    """With a budget the size of a short text prompt, an image prompt several times longer (its
    image tokens cut by the chunks) takes a chunk at each step, the running row makes a token at
    each of them, and every row gives its greedy tokens alone."""
    params = GenerationParams(max_new_tokens=12, min_new_tokens=12)
    story = continuous.prompt(*REQUESTS[1], params)
    long = continuous.prompt(LONG[0], continuous.process_images(*LONG, params), params)
    budget = len(story.ids)
    chunks = -(-len(long.ids) // budget)
    assert chunks >= 3, (len(story.ids), len(long.ids))
    continuous.prefill_tokens = budget
    continuous.add([(0, story, params)])
    for _ in range(2):
        continuous.step()
    assert continuous.has_room([], long)
    continuous.add([(1, long, params)])
    assert continuous.running == 2 and continuous.stats()["prefill_chunks"] == 1
    assert not continuous.has_room([], long)  # one long prompt at a time
    assert continuous.has_room([], story)  # short ones still join beside it
    made, early = [], ""
    for _ in range(chunks - 1):
        outs = continuous.step()
        made.append(sum(o.tokens for o in outs if o.key == 0))
        early += "".join(o.text for o in outs if o.key == 1)
    assert continuous.stats()["prefill_chunks"] == chunks
    assert made == [1] * (chunks - 1)  # the running row made a token at every chunk's step
    assert {row.key for row in continuous.rows.values()} == {0, 1}
    result = run(continuous, {0: []})
    assert result["done"][1].text == alone(reference, LONG, params).text
    assert result["done"][0].text == alone(reference, REQUESTS[1], params).text
    assert early + result["streamed"][1] == result["done"][1].text


def test_a_long_prompt_cancelled_or_failing_while_prefilled_frees_its_slot(reference, continuous, monkeypatch):
    params = GenerationParams(max_new_tokens=6, min_new_tokens=6)
    story = continuous.prompt(*REQUESTS[1], params)
    long = continuous.prompt(LONG[0], continuous.process_images(*LONG, params), params)
    continuous.prefill_tokens = len(story.ids)
    continuous.add([(1, long, params)])
    continuous.step()
    assert continuous.abort(1) == ("", 0) and continuous.running == 0
    continuous.add([(0, story, params)])
    continuous.add([(2, long, params)])

    def fail(self, tokens):
        raise torch.OutOfMemoryError("injected")
    monkeypatch.setattr(ChunkedPrefill, "advance", fail)  # its second chunk fails
    outs = continuous.step()
    (failed,) = [o for o in outs if o.error is not None]
    assert failed.key == 2 and isinstance(failed.error, torch.OutOfMemoryError)
    assert continuous.running == 1 and continuous.chunked is None
    result = run(continuous, {0: []})
    assert result["done"][0].text == alone(reference, REQUESTS[1], params).text


def test_a_failed_joint_prefill_takes_no_slot(continuous, monkeypatch):
    params = GenerationParams(max_new_tokens=4)
    prompt = continuous.prompt(*text_request("Tell me a story."), params)
    long = continuous.prompt(*text_request("Tell me a story " * 80), params)
    forward = continuous.engine.decode.prefill_output

    def fail_midway(*args, **kwargs):  # its last layer fails, after the others wrote into the free slots
        if fail_midway.calls == len(continuous.engine.decode.layers) - 1:
            raise RuntimeError("injected")
        fail_midway.calls += 1
        return forward(*args, **kwargs)
    fail_midway.calls = 0
    monkeypatch.setattr(continuous.engine.decode, "prefill_output", fail_midway)
    with pytest.raises(RuntimeError, match="injected"):
        continuous.add([(0, prompt, params), (1, long, params)])
    assert continuous.running == 0 and continuous.has_room([prompt] * 4, prompt)
    monkeypatch.undo()
    continuous.add([(0, prompt, params), (1, long, params)])  # the slots are free again
    assert continuous.running == 2


def test_a_prefill_failing_after_it_wrote_into_free_slots_leaves_the_running_row_as_it_was(
        reference, continuous, monkeypatch):
    """The prefill writes each layer's keys and values into the free slots as it goes: one that
    fails in its last layer has written into them, and the row running beside them still gives
    its greedy tokens alone; the slots are free for the next request."""
    params = GenerationParams(max_new_tokens=12, min_new_tokens=12)
    add(continuous, 0, REQUESTS[0], params)
    done = {}

    def step():
        done.update((out.key, out.completion) for out in continuous.step() if out.completion is not None)
    for _ in range(3):
        step()
    rest, calls = continuous.engine.decode.prefill_output, []

    def fail_in_the_last_layer(*args, **kwargs):
        calls.append(1)
        if len(calls) == len(continuous.engine.decode.layers):
            raise RuntimeError("injected")
        return rest(*args, **kwargs)
    monkeypatch.setattr(continuous.engine.decode, "prefill_output", fail_in_the_last_layer)
    with pytest.raises(RuntimeError, match="injected"):
        add(continuous, 1, REQUESTS[2], params)
    monkeypatch.undo()
    assert continuous.running == 1
    add(continuous, 2, REQUESTS[3], params)
    while continuous.running:
        step()
    assert done[0].text == alone(reference, REQUESTS[0], params).text
    assert done[2].text == alone(reference, REQUESTS[3], params).text


def test_a_prefill_that_cannot_compile_runs_uncompiled_and_leaves_the_step_compiled(
        reference, tiny_model, caplog):
    """A compile that fails on the machine (here a compiled prefill that raises when called; the
    step's eager functions stand in for compiled ones, so nothing compiles) costs the prefill alone."""
    import logging
    from qvl.worker import kv_pool

    engine = Engine(ModelOptions(str(tiny_model), "cpu", kv_cache="continuous", kv_cache_tokens=4096))
    decode = engine.decode = DecodeStep(engine.model, compiled=False)
    decode.step_compiled = decode.prefill_compiled = True

    def no_compiler(*args, **kwargs):
        raise RuntimeError("injected: the compiler fails here")
    decode.prefill_inputs = no_compiler
    continuous = ContinuousEngine(engine, rows=4)
    try:
        with caplog.at_level(logging.WARNING, logger="qvl.worker"):
            continuous.warm_up()
    finally:
        torch.compiler.set_stance("default")
    assert "event=compile_failed part=prefill" in caplog.text and "part=step" not in caplog.text
    assert not decode.prefill_compiled and decode.prefill_inputs is kv_pool._qkv
    assert decode.step_compiled
    params = GenerationParams(max_new_tokens=6, min_new_tokens=6)
    assert run(continuous, {0: [(0, REQUESTS[0], params)]})["done"][0].text == alone(reference, REQUESTS[0], params).text


def test_a_joint_prefill_that_fails_after_its_forward_takes_no_slot(continuous, monkeypatch):
    """A failure while the rows of a group take their slots (here the second row's first text)."""
    params = GenerationParams(max_new_tokens=4)
    prompts = [continuous.prompt(*text_request(f"Tell me story {i}."), params) for i in range(2)]
    advance, calls = Detokenizer.advance, []

    def fail_second(self, tokens):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected")
        return advance(self, tokens)
    monkeypatch.setattr(Detokenizer, "advance", fail_second)
    with pytest.raises(RuntimeError, match="injected"):
        continuous.add([(0, prompts[0], params), (1, prompts[1], params)])
    assert continuous.running == 0 and continuous.has_room([prompts[0]] * 4, prompts[0])


def test_stop_strings_end_rows_where_the_static_engine_ends_them(reference, continuous):
    """A stop string spanning two tokens, one inside the first token, one further on: the answer,
    its token count and its finish reason are the static engine's, and the text streamed is the answer."""
    def greedy(n, stop=()):
        return GenerationParams(max_new_tokens=n, min_new_tokens=n, stop=stop)
    one, two = (alone(reference, REQUESTS[1], greedy(n)).text for n in (1, 2))
    far = alone(reference, REQUESTS[2], greedy(20)).text
    assert len(one) >= 2 and len(two) > len(one) and len(far) > 12  # the tiny model's tokens suit the cases
    cases = [(REQUESTS[1], greedy(20, (one[-1] + two[len(one)],))),
             (REQUESTS[1], greedy(20, (one[1:],))),
             (REQUESTS[2], greedy(20, ("never", far[9:12])))]
    result = run(continuous, {0: [(key, request, params) for key, (request, params) in enumerate(cases)]})
    for key, (request, params) in enumerate(cases):
        expected, got = alone(reference, request, params), result["done"][key]
        assert (got.text, got.completion_tokens, got.finish_reason) == \
            (expected.text, expected.completion_tokens, "stop"), key
        assert expected.completion_tokens < 20 and result["streamed"][key] == got.text
    assert result["done"][1].completion_tokens == 1


def test_each_step_detokenizes_only_the_new_tokens(continuous, monkeypatch):
    """Detokenizing is linear in the answer's length: the tokens decoded per step do not grow with it."""
    tokenizer, decoded = continuous.engine.processor.tokenizer, []
    decode = tokenizer.decode
    monkeypatch.setattr(tokenizer, "decode", lambda ids, **kw: decoded.append(len(ids)) or decode(ids, **kw))
    params = GenerationParams(max_new_tokens=60, min_new_tokens=60, stop=("never said",))
    result = run(continuous, {0: [(0, REQUESTS[1], params)]})
    assert result["done"][0].completion_tokens == 60 and result["streamed"][0] == result["done"][0].text
    assert sum(decoded) < 8 * 60


def test_an_aborted_row_never_ends_in_a_half_made_character(continuous, monkeypatch):
    """The row's tokens are chosen for it: a word, then the first byte of a character that would
    need more tokens; it is cancelled then."""
    tokenizer, text_of = continuous.engine.processor.tokenizer, continuous.engine.text_of
    word = tokenizer.encode(" cat", add_special_tokens=False)
    half = next(t for t in range(len(tokenizer)) if text_of([t]) == "\ufffd")
    chosen = iter([*word, half])
    monkeypatch.setattr(continuous, "_choose", lambda logits, rows: torch.tensor([next(chosen) for _ in rows]))
    params = GenerationParams(max_new_tokens=20, min_new_tokens=20)
    add(continuous, 0, REQUESTS[0], params)
    streamed = "".join(out.text for _ in word for out in continuous.step())
    (row,) = continuous.rows.values()
    assert row.tokens == [*word, half] and text_of(row.tokens).endswith("\ufffd")
    text, tokens = continuous.abort(0)
    assert tokens == len(word) + 1 and text == " cat" and text.startswith(streamed)


def test_an_aborted_row_frees_its_slot_and_the_others_are_unaffected(reference, continuous):
    long = GenerationParams(max_new_tokens=30, min_new_tokens=30)
    for key in range(5):
        add(continuous, key, REQUESTS[key % 4], long)
    one = continuous.prompt(*text_request("Hi."), long)
    assert not continuous.has_room([], one)
    for _ in range(5):
        continuous.step()
    text, tokens = continuous.abort(2)
    assert tokens == 6 and continuous.has_room([], one)
    add(continuous, 7, REQUESTS[2], long)  # takes the freed slot
    result = run(continuous, {0: []})
    for key, request in ((0, 0), (1, 1), (3, 3), (4, 0), (7, 2)):
        assert result["done"][key].text == alone(reference, REQUESTS[request], long).text


def test_a_short_request_leaves_before_long_ones_end(continuous):
    long, short = GenerationParams(max_new_tokens=60, min_new_tokens=60), GenerationParams(max_new_tokens=3,
                                                                                         min_new_tokens=3)
    add(continuous, 0, REQUESTS[0], long)
    add(continuous, 1, REQUESTS[2], long)
    for _ in range(4):
        continuous.step()
    add(continuous, 2, REQUESTS[1], short)
    ended_at = None
    for step in range(100):
        if any(o.completion is not None and o.key == 2 for o in continuous.step()):
            ended_at = step
            break
    assert ended_at is not None and ended_at <= 3
    assert continuous.running == 2  # the long ones run on


def test_a_request_longer_than_a_row_is_refused(continuous):
    with pytest.raises(BadRequest, match="exceed a batch row"):
        add(continuous, 0, REQUESTS[1], GenerationParams(max_new_tokens=2000))


@pytest.mark.timeout(120)
def test_served_with_kv_cache_continuous(start_supervisor):
    sup = start_supervisor("--kv-cache", "continuous", "--max-batch-size", "4", "--max-inflight", "8")
    sup.wait_ready()
    messages = [{"role": "user", "content": [{"type": "image", "image": png((96, 64))},
                                             {"type": "text", "text": "What is it?"}]}]
    with sup.client(timeout=60) as client:
        whole = client.generate(messages, max_new_tokens=24, min_new_tokens=24)
        chunks = list(client.stream(messages, max_new_tokens=24, min_new_tokens=24))

    def ask(n):
        with sup.client(timeout=60) as c:
            return c.ask(png((64 + 16 * n, 64)), "Describe it.", max_new_tokens=4 + 6 * n, min_new_tokens=4 + 6 * n)
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(ask, range(6)))
    assert "".join(c.text for c in chunks) == whole.text and chunks[-1].done
    assert [r.usage["completion_tokens"] for r in results] == [4 + 6 * n for n in range(6)]
    for r in [whole, *results]:  # in the worker, each waited for its images at least, and then joined
        assert 0 < r.timings["images_ms"] <= r.timings["wait_ms"] < r.timings["total_ms"]
    pids = {sup.pid, *sup.remember_workers()}
    assert sup.stop() == 0
    assert wait_gone(pids) == set()


@pytest.mark.timeout(120)
def test_requests_waiting_for_room_join_when_every_row_ends_in_one_step(start_supervisor):
    """One row, four requests at once: three wait, ready, for room; when the running row ends no
    row is left, and the worker must admit the next then, not sleep until another message comes."""
    sup = start_supervisor("--kv-cache", "continuous", "--max-batch-size", "1", "--max-inflight", "4")
    sup.wait_ready()

    def ask(n):
        with sup.client(timeout=30) as c:
            return c.generate(text_request(f"Count to {n}.")[0], max_new_tokens=8, min_new_tokens=8)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(ask, range(4)))
    assert [r.usage["completion_tokens"] for r in results] == [8] * 4


@pytest.mark.timeout(120)
def test_a_worker_prefills_a_long_prompt_in_chunks_and_answers_it_as_generate_does(start_supervisor,
                                                                                   shared_supervisor):
    """`--prefill-tokens 16`: an image prompt of about 90 tokens goes in chunks while short requests
    run beside it; its greedy answer is the one `generate` gives (the shared supervisor's workers)."""
    sup = start_supervisor("--kv-cache", "continuous", "--prefill-tokens", "16", "--max-inflight", "8")
    sup.wait_ready()
    image = png((200, 120), (40, 90, 160))
    question = "Look closely and describe the whole picture, every part of it."

    def ask(endpoint_sup, n=0):
        with endpoint_sup.client(timeout=60) as c:
            if n:
                return c.ask(png((64, 64)), "Hi?", max_new_tokens=n, min_new_tokens=n)
            return c.ask(image, question, max_new_tokens=10, min_new_tokens=10)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        short = [pool.submit(ask, sup, n) for n in (30, 20, 25)]
        long = pool.submit(ask, sup).result()
        assert [f.result().usage["completion_tokens"] for f in short] == [30, 20, 25]
    assert long.usage["prompt_tokens"] > 16 * 3
    assert long.text == ask(shared_supervisor).text
    with sup.client() as c:
        telemetry = c.status()["workers"][0]["telemetry"]
    assert telemetry["prefill_chunks"] >= -(-long.usage["prompt_tokens"] // 16), telemetry


@pytest.mark.timeout(120)
def test_a_failed_step_ends_the_worker_by_name_and_its_rows_are_answered_by_the_next(start_supervisor):
    """A step that raises leaves the running rows in an unknown state: the worker exits
    `engine_failed` and the supervisor answers all three requests from the next worker."""
    sup = start_supervisor("--kv-cache", "continuous", "--restart-backoff-s", "0.1",
                           env={"QVL_FAULTS": "step_fail_at=3,generation=1"})
    sup.wait_ready()

    def ask(n):
        with sup.client(timeout=90) as c:
            return c.ask(png((64 + 16 * n, 64)), "Describe it.", max_new_tokens=6, min_new_tokens=6)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(ask, range(3)))
    assert [r.usage["completion_tokens"] for r in results] == [6, 6, 6]
    assert {r.worker["generation"] for r in results} == {2}
    exits = [e for e in events(sup.log(), "worker_state") if e["gen"] == "1" and e["new"] == "exited"]
    assert len(exits) == 1 and "exit code 8 (engine_failed)" in exits[0]["reason"], exits
    sup.remember_workers()


@pytest.mark.timeout(120)
def test_an_out_of_memory_error_while_joining_is_blamed_on_its_request(start_supervisor):
    """A request whose prefill runs out of memory (injected) is answered `out_of_memory` by the
    worker, counted towards recycling and retried elsewhere, not failed as `internal`."""
    sup = start_supervisor("--kv-cache", "continuous", env={"QVL_FAULTS": "oom_at=1,generation=1"})
    sup.wait_ready()
    with sup.client(timeout=60) as client:
        answer = client.ask(png((64, 64)), "What is it?", max_new_tokens=4, min_new_tokens=4)
        status = client.status()
    assert answer.usage["completion_tokens"] == 4
    log = sup.log()
    assert log.count("event=out_of_memory") == 1 and "event=request_failed" not in log
    assert [e["reason"] for e in events(log, "recycle_wanted")] == ["out_of_memory"]
    assert status["counters"]["oom_retries"] == 1
    pids = {sup.pid, *sup.remember_workers()}
    assert sup.stop() == 0
    assert wait_gone(pids) == set()


def ask_together(sup, questions: list[tuple[str, int]]) -> list:
    """Send text-only questions (question, max_new_tokens) at once: their answers, or the errors raised."""
    def ask(question):
        text, tokens = question
        with sup.client(timeout=60) as client:
            try:
                return client.generate(text_request(text)[0], max_new_tokens=tokens, min_new_tokens=min(tokens, 8))
            except Exception as exc:
                return exc
    with concurrent.futures.ThreadPoolExecutor(len(questions)) as pool:
        return list(pool.map(ask, questions))


QUESTIONS = [("Tell me a story.", 8), ("Why?", 8), ("What is the colour of the sky at noon in May?", 8),
             ("Name three birds.", 8)]


@pytest.mark.timeout(120)
def test_requests_waiting_together_are_prefilled_in_one_forward(start_supervisor):
    """While the worker joins the first request (slowed by 400 ms), the others wait; the next step
    hands them all to the engine in one call and they share one prefill forward. One whose prompt
    does not fit a row is refused alone."""
    sup = start_supervisor("--kv-cache", "continuous", env={"QVL_FAULTS": "slow_ms=400"})
    sup.wait_ready()
    alone_answers = [ask_together(sup, [question])[0].text for question in QUESTIONS]
    with sup.client() as client:
        before = client.status()["workers"][0]["telemetry"]["prefill_forwards"]
    results = ask_together(sup, QUESTIONS + [("too long for a row", 4096)])
    with sup.client() as client:
        forwards = client.status()["workers"][0]["telemetry"]["prefill_forwards"] - before
    assert [r.text for r in results[:4]] == alone_answers
    assert isinstance(results[4], BadRequest) and "exceed a batch row" in str(results[4])
    assert forwards <= 2


@pytest.mark.timeout(120)
def test_a_joint_prefill_out_of_memory_splits_until_each_request_joins(start_supervisor):
    """Every join of more than one request runs out of memory (injected): the requests are split
    and join one by one, and none is answered with an error or counted towards recycling."""
    sup = start_supervisor("--kv-cache", "continuous", env={"QVL_FAULTS": "slow_ms=400,oom_rows_over=1"})
    sup.wait_ready()
    results = ask_together(sup, QUESTIONS)
    with sup.client() as client:
        telemetry = client.status()["workers"][0]["telemetry"]
    assert [r.usage["completion_tokens"] for r in results] == [8] * 4
    log = sup.log()
    assert "event=batch_split" in log and "event=out_of_memory" not in log
    assert telemetry["prefill_forwards"] == 4  # each alone
