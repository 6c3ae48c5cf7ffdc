"""Incremental detokenizing, in-process: fed a row token by token, the text streamed and then the
answer equal what decoding the whole row gives, cut at its first stop string, and the row stops at
the fewest tokens whose text holds one. Examples a reader should see (a character split across
tokens, a stop string spanning tokens, one in the first token), a property over random bytes, and
the tiny model's own tokenizer on multi-byte text."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qvl.protocol.contract import ModelOptions
from qvl.worker.detokenizer import HALF_MADE, Detokenizer
from qvl.worker.engine import Engine
from qvl.worker.stop_strings import cut_at_stop, find_stop


def byte_tokens(pieces: list[bytes]):
    """A tokenizer whose token i is the bytes `pieces[i]`, decoded as a byte-level BPE does."""
    return lambda ids: b"".join(pieces[i] for i in ids).decode("utf-8", "replace")


def feed(text_of, count: int, stops=()) -> tuple[Detokenizer, list[str], int]:
    """Feed tokens 0..count-1 one at a time until a stop string: the detokenizer, what each step
    streamed, and the tokens fed."""
    detokenizer, tokens, chunks = Detokenizer(text_of, stops), [], []
    for token in range(count):
        tokens.append(token)
        detokenizer.advance(tokens)
        if detokenizer.stopped:
            break
        chunks.append(detokenizer.take())
    return detokenizer, chunks, len(tokens)


def test_a_character_split_across_tokens_is_streamed_whole_once_its_last_byte_comes():
    snow = "☃".encode()  # three bytes
    _, chunks, _ = feed(byte_tokens([b"a", snow[:1], snow[1:2], snow[2:] + b"b", b"c"]), 5)
    assert chunks == ["a", "", "", "☃b", "c"]


def test_a_stop_string_spanning_tokens_ends_the_row_and_is_never_streamed():
    detokenizer, chunks, fed = feed(byte_tokens([b"Hello ", b"wo", b"rld", b" and more"]), 4, stops=("world",))
    assert (chunks, fed, detokenizer.answer()) == (["Hello ", ""], 3, "Hello ")


def test_a_stop_string_in_the_first_token_leaves_an_empty_answer():
    detokenizer, chunks, fed = feed(byte_tokens([b"STOP here", b"more"]), 2, stops=("STOP",))
    assert (chunks, fed, detokenizer.answer()) == ([], 1, "")


def test_text_that_could_begin_a_stop_string_is_held_until_it_does_not():
    _, chunks, _ = feed(byte_tokens([b"ab", b"c", b"x", b"d"]), 4, stops=("abcd",))
    assert chunks == ["", "", "abcx", "d"]


def test_a_row_stopped_early_never_ends_in_a_half_made_character():
    detokenizer, _, _ = feed(byte_tokens([b"ok", "☃".encode()[:2]]), 2)
    assert detokenizer.so_far() == "ok" and detokenizer.answer() == "ok" + HALF_MADE


STOPS = st.lists(st.text(alphabet="ab☃\ufffd", min_size=1, max_size=3), max_size=3)


@settings(max_examples=400, deadline=None)
@given(pieces=st.lists(st.sampled_from([b"a", b"b", "☃".encode()[:1], "☃".encode()[1:], b"\x80", b"ab", b"\xe2"]),
                       min_size=1, max_size=14), stops=STOPS)
def test_streamed_text_and_answer_equal_the_whole_rows_decoding(pieces, stops):
    text_of = byte_tokens(pieces)
    detokenizer, chunks, fed = feed(text_of, len(pieces), stops)
    answer = detokenizer.answer()
    assert answer == cut_at_stop(text_of(range(fed)), stops)
    if detokenizer.stopped:  # at the fewest tokens whose text holds a stop string
        assert find_stop(text_of(range(fed - 1)), stops) is None
    streamed = "".join(chunks)
    assert answer.startswith(streamed) and not detokenizer.settled.endswith(HALF_MADE)


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return Engine(ModelOptions(str(tiny_model), "cpu", kv_cache="dynamic")).processor.tokenizer


@pytest.mark.parametrize("text", ["naïve café, 世界 👋🏽 ok", "日本語のテキスト", "«ßœ∑» — done"])
def test_the_tiny_models_tokens_of_multi_byte_text_stream_back_to_it(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    decode = lambda row: tokenizer.decode(row, skip_special_tokens=True)  # noqa: E731
    assert any(decode(ids[:n]).endswith(HALF_MADE) for n in range(1, len(ids)))  # characters split across tokens
    detokenizer, chunks = Detokenizer(decode), []
    for n in range(1, len(ids) + 1):
        detokenizer.advance(ids[:n])
        chunks.append(detokenizer.take())
    assert "".join(chunks) == detokenizer.answer() == text
    assert not any(HALF_MADE in chunk for chunk in chunks)
