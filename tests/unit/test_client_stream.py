"""A stream's chunks against its final reply: the text a caller assembles from the chunks is the
answer, or the stream ends with `InternalError` when a chunk went missing on the way (ZeroMQ drops
messages past a high-water mark); never text that disagrees with the answer."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qvl.protocol import InternalError
from qvl.protocol.client import _Stream


def reply(text):
    return {"kind": "reply", "id": 7, "ok": True, "text": text, "finish_reason": "stop"}


@given(st.text(max_size=40), st.data())
def test_chunks_of_an_answer_assemble_it_with_any_lost(answer, data):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(answer)), max_size=6)))
    pieces = [answer[a:b] for a, b in zip([0, *cuts], [*cuts, len(answer)])][:-1]
    lost = data.draw(st.sets(st.integers(0, max(len(pieces) - 1, 0)), max_size=2)) if pieces else set()
    stream, got = _Stream(), []
    for i, piece in enumerate(pieces):
        if i not in lost:
            got.append(stream.chunk({"kind": "chunk", "id": 7, "text": piece}).text)
    try:
        last = stream.chunk(reply(answer))
    except InternalError as exc:
        assert "lost chunks" in exc.message and not answer.startswith("".join(got))
        return
    assert "".join(got) + last.text == answer and last.done


def test_a_lost_middle_chunk_ends_the_stream_with_an_error():
    stream = _Stream()
    stream.chunk({"kind": "chunk", "id": 7, "text": "The "})
    stream.chunk({"kind": "chunk", "id": 7, "text": "cat."})  # "black " never came
    with pytest.raises(InternalError, match="lost chunks"):
        stream.chunk(reply("The black cat."))
