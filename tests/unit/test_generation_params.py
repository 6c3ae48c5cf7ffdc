"""`seed` and `stop`: how they are read (types first, then bounds), where stop strings cut an answer
and how much of a growing one may be streamed, and seeded token choice: repeatable, the same for a
row whatever it is batched with, and still a sample of the right distribution."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qvl.protocol.codec import Limits, decode, encode
from qvl.protocol.errors import BadRequest
from qvl.protocol.messages import MAX_SEED, GenerationParams, build_generate, parse_generate
from qvl.worker.stop_strings import cut_at_stop, find_stop, streamable

LIMITS = Limits()


@pytest.mark.parametrize("raw, expected", [
    ({}, GenerationParams()),
    ({"seed": None, "stop": None}, GenerationParams()),
    ({"seed": 0}, GenerationParams(seed=0)),
    ({"seed": MAX_SEED}, GenerationParams(seed=MAX_SEED)),
    ({"stop": []}, GenerationParams()),
    ({"stop": ["\n\n", "END"]}, GenerationParams(stop=("\n\n", "END"))),
    ({"stop": ("a", "b", "c", "d")}, GenerationParams(stop=("a", "b", "c", "d"))),
    ({"stop": ["x" * 256]}, GenerationParams(stop=("x" * 256,))),
])
def test_seed_and_stop_are_read(raw, expected):
    assert GenerationParams.parse(raw, LIMITS) == expected


@pytest.mark.parametrize("raw, fault", [
    ({"seed": "1"}, "seed must be an integer, not str"),
    ({"seed": 1.0}, "seed must be an integer, not float"),
    ({"seed": True}, "seed must be an integer, not bool"),
    ({"seed": [1]}, "seed must be an integer, not list"),
    ({"seed": -1}, "seed must be in 0.."),
    ({"seed": MAX_SEED + 1}, "seed must be in 0.."),
    ({"stop": "END"}, "stop must be a list of strings, not str"),
    ({"stop": {"END": 1}}, "stop must be a list of strings, not dict"),
    ({"stop": ["END", 3]}, "stop must be a list of strings, not list"),
    ({"stop": [b"END"]}, "stop must be a list of strings"),
    ({"stop": [["END"]]}, "stop must be a list of strings"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop holds 5 strings; at most 4"),
    ({"stop": [""]}, r"each stop string must be 1..256 characters"),
    ({"stop": ["x" * 257]}, r"each stop string must be 1..256 characters"),
])
def test_wrong_seed_and_stop_are_named(raw, fault):
    with pytest.raises(BadRequest, match=fault):
        GenerationParams.parse(raw, LIMITS)


def test_seed_and_stop_travel_on_the_wire():
    params = GenerationParams(temperature=0.7, seed=MAX_SEED, stop=("END", "\n"))
    request = build_generate("a", [{"role": "user", "content": "hi"}], params)
    assert parse_generate(*decode(encode(request.header(), request.images), LIMITS), LIMITS).params == params


@pytest.mark.parametrize("text, stops, at", [
    ("hello world", [], None),
    ("hello world", ["xyz"], None),
    ("hello world", ["o"], 4),
    ("hello world", ["world", "lo w"], 3),     # both found: the one complete first ends at 7
    ("xabcd", ["abcd", "bc"], 2),              # "bc" is complete before "abcd" is
    ("xabcd", ["abc", "bc"], 1),               # both complete at once: the one that starts first
    ("END at once", ["END"], 0),
])
def test_find_stop_is_where_a_reader_of_the_growing_text_stops(text, stops, at):
    assert find_stop(text, stops) == at
    assert cut_at_stop(text, stops) == (text if at is None else text[:at])


@pytest.mark.parametrize("text, stops, sent", [
    ("hello wor", ["world"], "hello "),         # "wor" could begin "world"
    ("hello", ["world"], "hello"),
    ("hello w", ["ww", "wx"], "hello "),
    ("hello world and on", ["world"], "hello "),
    ("abab", ["abc"], "ab"),                    # only the tail that could still begin it
    ("aaa", ["aaaa"], ""),
    ("answer\n", ["\n\n"], "answer"),
    ("answer", [], "answer"),
])
def test_streamable_holds_back_a_tail_that_could_begin_a_stop_string(text, stops, sent):
    assert streamable(text, stops) == sent


@settings(max_examples=500, deadline=None)
@given(st.text("ab\n", max_size=30), st.lists(st.text("ab\n", min_size=1, max_size=4), max_size=4),
       st.integers(0, 30))
def test_what_is_streamed_is_never_taken_back(text, stops, cut):
    """Any prefix's streamable text begins the whole text's answer, and holds no stop string."""
    sent = streamable(text[:cut], stops)
    answer = cut_at_stop(text, stops)
    assert answer.startswith(sent)
    assert find_stop(sent, stops) is None
    assert streamable(text, stops).startswith(sent)


torch = pytest.importorskip("torch")
from qvl.worker.kv_pool import choose_tokens  # noqa: E402

SAMPLED = GenerationParams(temperature=0.8, top_p=0.9, seed=7)


def seeded_choices(logits_per_step, params=SAMPLED):
    generator = torch.Generator().manual_seed(params.seed)
    return [choose_tokens(logits, params, generator).tolist() for logits in logits_per_step]


def test_greedy_ignores_the_generator():
    logits = torch.randn(3, 40)
    generator = torch.Generator().manual_seed(1)
    greedy = GenerationParams(seed=1)
    assert choose_tokens(logits, greedy, generator).tolist() == logits.argmax(dim=-1).tolist()


def test_a_seed_repeats_its_choices_and_another_seed_differs():
    steps = [torch.randn(2, 500) for _ in range(20)]
    assert seeded_choices(steps) == seeded_choices(steps)
    assert seeded_choices(steps) != seeded_choices(steps, GenerationParams(temperature=0.8, top_p=0.9, seed=8))


def test_a_rows_choices_do_not_depend_on_its_batch():
    alone = [torch.randn(1, 300) for _ in range(10)]
    batched = [torch.cat([torch.randn(2, 300), row, torch.randn(1, 300)]) for row in alone]
    assert [step[0] for step in seeded_choices(alone)] == [step[2] for step in seeded_choices(batched)]


def test_seeded_choice_samples_the_distribution_and_respects_top_p():
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    params = GenerationParams(temperature=1.0, top_p=0.9, seed=3)
    generator = torch.Generator().manual_seed(params.seed)
    tokens = torch.cat([choose_tokens(logits, params, generator) for _ in range(4000)])
    share = torch.bincount(tokens, minlength=4).float() / len(tokens)
    assert share[3] == 0  # outside top_p
    assert torch.allclose(share, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95, atol=0.03)
