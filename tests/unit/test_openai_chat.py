"""The gateway's chat-body whitelist: tables of what a reader should see, and a property test that
any JSON value becomes a valid message list or a `BadRequest`, never another exception."""

import base64
import json
import resource
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qvl.protocol.codec import Limits
from qvl.protocol.errors import BadRequest
from qvl.protocol.messages import ROLES, GenerationParams, build_generate
from qvl.supervisor.openai_chat import MAX_STRUCTURAL_BYTES, parse_chat, parse_json

LIMITS = Limits(max_frame_bytes=1000, max_images=2, max_new_tokens=64)
IMAGE = b"\x89PNG not really"
DATA_URL = "data:image/png;base64," + base64.b64encode(IMAGE).decode()


def body(*parts, **fields) -> dict:
    return {"messages": [{"role": "user", "content": list(parts)}], **fields}


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def test_text_and_data_url_become_text_and_bytes():
    chat = parse_chat(body({"type": "text", "text": "hi"}, image_part(DATA_URL), max_tokens=8,
                           temperature=0, stream=True, stream_options={"include_usage": True}), LIMITS)
    assert chat.messages == [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                          {"type": "image", "image": IMAGE}]}]
    assert chat.params == {"max_new_tokens": 8, "temperature": 0.0}
    assert chat.stream and chat.include_usage


@pytest.mark.parametrize("fields, params", [
    ({}, {"max_new_tokens": 64, "temperature": 1.0}),  # OpenAI's default temperature: sampling
    ({"temperature": 0}, {"max_new_tokens": 64, "temperature": 0.0}),
    ({"temperature": None, "n": 1}, {"max_new_tokens": 64, "temperature": 1.0}),
    ({"max_tokens": 9, "max_completion_tokens": 5}, {"max_new_tokens": 5, "temperature": 1.0}),
    ({"max_tokens": 9}, {"max_new_tokens": 9, "temperature": 1.0}),
    ({"seed": 42, "top_p": 0.5}, {"max_new_tokens": 64, "temperature": 1.0, "top_p": 0.5, "seed": 42}),
    ({"stop": "END"}, {"max_new_tokens": 64, "temperature": 1.0, "stop": ["END"]}),
    ({"stop": ["a", "\n"]}, {"max_new_tokens": 64, "temperature": 1.0, "stop": ["a", "\n"]}),
    ({"stop": []}, {"max_new_tokens": 64, "temperature": 1.0}),
    ({"stop": None, "seed": None}, {"max_new_tokens": 64, "temperature": 1.0}),
    ({"frequency_penalty": 1, "logprobs": True}, {"max_new_tokens": 64, "temperature": 1.0}),  # ignored, as before
])
def test_generation_fields_become_parameters(fields, params):
    chat = parse_chat(body({"type": "text", "text": "hi"}, **fields), LIMITS)
    assert chat.params == params
    GenerationParams.parse(chat.params, LIMITS)  # which the client reads without complaint


@pytest.mark.parametrize("fields, fault", [
    ({"seed": -1}, "seed must be in"),
    ({"seed": 1 << 63}, "seed must be in"),
    ({"stop": ""}, "each stop string must be 1..256"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "at most 4"),
    ({"stop": "x" * 257}, "each stop string must be 1..256"),
])
def test_out_of_range_seed_and_stop_are_refused_by_the_client(fields, fault):
    """The gateway checks types; the values' bounds are the protocol's, a 400 all the same."""
    chat = parse_chat(body({"type": "text", "text": "hi"}, **fields), LIMITS)
    with pytest.raises(BadRequest, match=fault):
        GenerationParams.parse(chat.params, LIMITS)


def test_string_content_stays_text_even_when_it_names_a_file():
    chat = parse_chat({"messages": [{"role": "system", "content": "/etc/passwd"}]}, LIMITS)
    assert chat.messages == [{"role": "system", "content": [{"type": "text", "text": "/etc/passwd"}]}]


@pytest.mark.parametrize("part", [
    {"type": "image", "image": "/etc/passwd"},                      # the protocol client's own form
    {"type": "image", "frame": 0},
    image_part("/etc/passwd"),
    image_part("file:///etc/passwd"),
    image_part("ftp://example.com/a.png"),
    image_part("http://example.com/a.png"),                         # remote images are off
    {"type": "image_url", "image_url": "data:image/png;base64,AAAA"},  # not OpenAI's shape
    {"type": "input_audio", "input_audio": {}},
    "just a string",
])
def test_anything_but_the_whitelist_is_refused(part):
    with pytest.raises(BadRequest):
        parse_chat(body(part), LIMITS)


@pytest.mark.parametrize("bad, fault", [
    ({"messages": "hi"}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "role"),
    ({"messages": [{"role": ["user"], "content": "x"}]}, "role"),
    ({"messages": [{"role": "user", "content": 3}]}, "content"),
    (body({"type": "text", "text": 3}), "text"),
    (body({"type": "text", "text": "x"}, max_tokens="10"), "max_tokens"),
    (body({"type": "text", "text": "x"}, max_tokens=True), "max_tokens"),
    (body({"type": "text", "text": "x"}, max_tokens=0), "max_tokens"),
    (body({"type": "text", "text": "x"}, max_tokens=65), "max_tokens"),
    (body({"type": "text", "text": "x"}, temperature={}), "temperature"),
    (body({"type": "text", "text": "x"}, top_p=10 ** 400), "top_p"),
    (body({"type": "text", "text": "x"}, stream="yes"), "stream"),
    (body({"type": "text", "text": "x"}, stream_options=[]), "stream_options"),
    (body({"type": "text", "text": "x"}, model=1), "model"),
    (body({"type": "text", "text": "x"}, n=2), "`n` must be 1"),
    (body({"type": "text", "text": "x"}, n=0), "`n` must be 1"),
    (body({"type": "text", "text": "x"}, n="1"), "`n` must be"),
    (body({"type": "text", "text": "x"}, seed="7"), "seed"),
    (body({"type": "text", "text": "x"}, seed=1.5), "seed"),
    (body({"type": "text", "text": "x"}, stop=3), "stop"),
    (body({"type": "text", "text": "x"}, stop=["a", None]), "stop"),
    (body({"type": "text", "text": "x"}, stop={"a": 1}), "stop"),
    (body({"type": "text", "text": "x"}, max_completion_tokens="8"), "max_completion_tokens"),
    (body(*[image_part(DATA_URL)] * 3), "more than 2 images"),
    (body(image_part("data:image/png;base64," + base64.b64encode(bytes(1001)).decode())), "exceeds 1000"),
    (body(image_part("data:image/png;base64,@@@@")), "base64"),
    (body(image_part("data:image/png,raw")), "data URL"),
])
def test_wrong_types_and_values_are_named(bad, fault):
    with pytest.raises(BadRequest, match=fault):
        parse_chat(bad, LIMITS)


@pytest.mark.parametrize("text", [b"{not json", b"\xff\xfe", b'{"temperature": NaN}', b"[Infinity]",
                                  b"[" * 100_000 + b"]" * 100_000])
def test_json_that_is_not_json_is_a_bad_request(text):
    with pytest.raises(BadRequest):
        parse_json(text)


@pytest.mark.parametrize("text", [b'{"messages": [{"role": "user", "content": "\\ud800"}]}',
                                  b'{"model": "\\udfff x"}', b'["\\ud83d"]', b'{"\\uDC00": 1}'])
def test_a_lone_surrogate_is_no_text(text):
    with pytest.raises(BadRequest, match="surrogate"):
        parse_json(text)


escapes = st.lists(st.one_of(st.text(max_size=4), st.integers(0, 0xFFFF).map(lambda n: f"\\u{n:04x}"),
                             st.sampled_from(["\\ud800", "\\uDFFF", "\\ud83d\\ude00", '\\"', "\\\\"])),
                   max_size=6).map(lambda parts: ('{"model": "' + "".join(parts) + '"}').encode("utf-8", "surrogatepass"))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=64), escapes))
def test_any_bytes_give_json_that_is_text_or_bad_request(body):
    """What `parse_json` accepts can be written as UTF-8 again (msgpack and the reply need that)."""
    try:
        value = parse_json(body)
    except BadRequest:
        return
    json.dumps(value, ensure_ascii=False).encode("utf-8")


def test_a_surrogate_pair_is_a_character():
    assert parse_json(b'["\\ud83d\\ude00"]') == ["\U0001f600"]


def test_remote_images_go_through_the_given_fetch_only():
    fetched = []
    chat = parse_chat(body(image_part("https://example.com/a.png")), LIMITS,
                      fetch=lambda url: fetched.append(url) or IMAGE)
    assert fetched == ["https://example.com/a.png"]
    assert chat.messages[0]["content"] == [{"type": "image", "image": IMAGE}]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=30)


def mostly(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Valid values seven times in eight, so that examples reach past the first check."""
    return st.sampled_from([valid] * 7 + [json_values]).flatmap(lambda chosen: chosen)


urls = st.sampled_from([DATA_URL] * 4 + ["/etc/passwd", "file:///etc/passwd", "http://127.0.0.1/", "data:,x"])
part = mostly(st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": mostly(st.text(max_size=20))}),
    st.fixed_dictionaries({"type": st.just("image_url"),
                           "image_url": mostly(st.fixed_dictionaries({"url": mostly(urls)}))}),
    st.fixed_dictionaries({"type": st.sampled_from(["image", "input_audio", "file"]),
                           "image": st.just("/etc/passwd")})))
message = mostly(st.fixed_dictionaries({
    "role": mostly(st.sampled_from(sorted(ROLES) + ["tool"])),
    "content": mostly(st.text(max_size=10) | st.lists(part, min_size=1, max_size=3))}))
chat_body = st.fixed_dictionaries(
    {"messages": mostly(st.lists(message, min_size=1, max_size=3))},
    optional={"max_tokens": mostly(st.integers(0, 70)), "max_completion_tokens": mostly(st.integers(0, 70)),
              "temperature": mostly(st.floats(0, 2)), "top_p": mostly(st.floats(0, 1)),
              "seed": mostly(st.integers(-1, 1 << 64)), "n": mostly(st.integers(0, 2)),
              "stop": mostly(st.text(max_size=5) | st.lists(mostly(st.text(max_size=5)), max_size=5)),
              "stream": mostly(st.booleans()), "model": mostly(st.text(max_size=8)),
              "stream_options": mostly(st.fixed_dictionaries({}, optional={"include_usage": mostly(st.booleans())}))})


@settings(max_examples=400, deadline=None)
@given(st.one_of(chat_body, json_values))
def test_any_json_value_gives_valid_messages_or_bad_request(value):
    json.dumps(value)  # it is a JSON value
    try:
        chat = parse_chat(value, LIMITS)
    except BadRequest:
        return
    images = 0
    for m in chat.messages:
        assert m["role"] in ROLES and m["content"]
        for p in m["content"]:
            assert (p["type"] == "text" and isinstance(p["text"], str)) or \
                (p["type"] == "image" and isinstance(p["image"], bytes) and len(p["image"]) <= 1000)
            images += p["type"] == "image"
    assert images <= LIMITS.max_images
    build_generate("id", chat.messages, GenerationParams())  # no image is a path to open
    try:  # the client checks the parameters' ranges next: types are already right
        GenerationParams.parse(chat.params, LIMITS)
    except BadRequest:
        pass


def test_a_body_of_millions_of_empty_objects_is_refused_unparsed():
    """30 MB of `{},` would parse into some 700 MiB of Python objects, for a second and more."""
    body = b'{"messages": [' + b"{}," * 10_000_000 + b"{}]}"
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.monotonic()
    with pytest.raises(BadRequest, match="no chat request needs"):
        parse_json(body)
    assert time.monotonic() - start < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_kib < 100 << 10


def test_the_structural_bound_is_counted_exactly():
    at_bound = b"[" + b"0," * (MAX_STRUCTURAL_BYTES - 1) + b"0]"
    assert len(parse_json(at_bound)) == MAX_STRUCTURAL_BYTES
    with pytest.raises(BadRequest, match="no chat request needs"):
        parse_json(b"[" + at_bound)
