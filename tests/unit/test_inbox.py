"""The worker's request reader trusts nothing: any message gives a request, a stop or a typed error;
so does a spare's: a load or a typed error."""

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qvl.protocol.codec import PROTOCOL_VERSION, Limits
from qvl.protocol.contract import ModelOptions, WorkerSpec
from qvl.protocol.errors import BadRequest, QvlError, UnsupportedVersion
from qvl.protocol.messages import Cancel, GenerateRequest, Load, Stop
from qvl.worker.inbox import read_message, read_spare_message

LIMITS = Limits(max_images=3, max_messages=4, max_text_chars=100, max_new_tokens=50)


def generate(**fields):
    return {"v": PROTOCOL_VERSION, "kind": "generate", "id": 3,
            "messages": [{"role": "user", "content": "hi"}], "params": {"max_new_tokens": 5}, **fields}


def read(header, *frames):
    return read_message([msgpack.packb(header), *frames], LIMITS)


def test_a_valid_request_and_a_stop():
    request = read(generate(stream=True))
    assert isinstance(request, GenerateRequest) and request.id == 3 and request.stream
    assert request.params.max_new_tokens == 5
    assert isinstance(read({"v": PROTOCOL_VERSION, "kind": "stop"}), Stop)


def test_a_cancel_names_a_key():
    assert read({"v": PROTOCOL_VERSION, "kind": "cancel", "id": 7}) == Cancel(7)
    for rid in ("7", None):  # a client's id, or none: refused, and with no key to answer
        with pytest.raises(BadRequest) as raised:
            read({"v": PROTOCOL_VERSION, "kind": "cancel", "id": rid})
        assert raised.value.request_id is None


@pytest.mark.parametrize("parts, error, key", [
    ([b"\xc1garbage"], BadRequest, None),
    ([msgpack.packb(generate(v=99))], UnsupportedVersion, 3),
    ([msgpack.packb(generate(kind="teleport"))], BadRequest, 3),
    ([msgpack.packb(generate(params={"max_new_tokens": "10"}))], BadRequest, 3),
    ([msgpack.packb(generate(params={"max_new_tokens": 51}))], BadRequest, 3),  # over the supervisor's limit
    ([msgpack.packb(generate(messages="hi"))], BadRequest, 3),
    ([msgpack.packb(generate(stream="yes"))], BadRequest, 3),
    ([msgpack.packb(generate(messages=[{"role": "user", "content": [{"type": "image", "frame": 0}]}]))],
     BadRequest, 3),  # a reference to a frame that was not sent
    ([msgpack.packb(generate(id="client-7"))], BadRequest, "client-7"),  # a client's id, not a key
    ([msgpack.packb(generate(id=None))], BadRequest, None),
    ([msgpack.packb(generate()), b"x", b"y", b"z", b"w"], BadRequest, 3),  # more frames than max_images
])
def test_what_cannot_be_read_is_a_typed_error_with_the_key(parts, error, key):
    with pytest.raises(error) as info:
        read_message(parts, LIMITS)
    assert info.value.request_id == key


scalars = st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=20)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=20)
parts_ = st.one_of(st.fixed_dictionaries({"type": st.sampled_from(["text", "image", "video"]) | values},
                                         optional={"text": values, "frame": st.integers(-1, 4) | values}), values)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "robot"]) | values},
                                          optional={"content": st.text(max_size=20) | st.lists(parts_, max_size=4)
                                                    | values}), max_size=5) | values
params = st.dictionaries(st.sampled_from(["max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k",
                                          "beams"]), values | st.integers(-5, 60) | st.floats(), max_size=5) | values
headers = st.fixed_dictionaries(
    {"v": st.just(PROTOCOL_VERSION) | values, "kind": st.sampled_from(["generate", "stop", "ping"]) | values},
    optional={"id": st.integers(0, 2**40) | values, "messages": messages, "params": params,
              "stream": st.booleans() | values, "timeout_ms": values})


@settings(max_examples=400, deadline=None)
@given(header=headers, frames=st.lists(st.binary(max_size=8), max_size=4))
def test_any_header_gives_a_request_a_stop_or_a_typed_error(header, frames):
    try:
        message = read_message([msgpack.packb(header), *frames], LIMITS)
    except QvlError:
        return
    assert isinstance(message, (GenerateRequest, Stop))
    if isinstance(message, GenerateRequest):
        assert type(message.id) is int


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=64), frames=st.lists(st.binary(max_size=8), max_size=2))
def test_any_bytes_give_a_typed_error_or_a_message(raw, frames):
    try:
        read_message([raw, *frames], LIMITS)
    except QvlError:
        pass


# --- what a spare reads: one `load`, its spec read afterwards as a cold worker reads its argument ---

SPEC = WorkerSpec("ipc:///run/backend", 0, 4, ModelOptions("/models/tiny"))
load_headers = st.fixed_dictionaries(
    {"v": st.just(PROTOCOL_VERSION) | values, "kind": st.sampled_from(["load", "stop", "generate"]) | values},
    optional={"spec": st.just(SPEC.to_json()) | st.text(max_size=40) | values, "id": values})


def test_a_spare_reads_a_load_and_its_spec_reads_back_whole():
    load = read_spare_message([msgpack.packb(Load(SPEC.to_json()).header())], LIMITS)
    assert WorkerSpec.from_json(load.spec) == SPEC


@pytest.mark.parametrize("parts", [
    [b"\xc1garbage"],
    [msgpack.packb({"v": PROTOCOL_VERSION, "kind": "stop"})],          # a spare takes only load
    [msgpack.packb({"v": PROTOCOL_VERSION, "kind": "load"})],          # no spec
    [msgpack.packb({"v": PROTOCOL_VERSION, "kind": "load", "spec": {"slot": 0}})],  # not a string
    [msgpack.packb(Load(SPEC.to_json()).header()), b"frame"],
])
def test_what_a_spare_cannot_read_is_a_typed_error(parts):
    with pytest.raises(BadRequest):
        read_spare_message(parts, LIMITS)


@settings(max_examples=400, deadline=None)
@given(header=load_headers, frames=st.lists(st.binary(max_size=8), max_size=2))
def test_any_message_to_a_spare_gives_a_load_or_a_typed_error(header, frames):
    try:
        load = read_spare_message([msgpack.packb(header), *frames], LIMITS)
    except QvlError:
        return
    assert isinstance(load, Load) and isinstance(load.spec, str)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=64), frames=st.lists(st.binary(max_size=8), max_size=2))
def test_any_bytes_to_a_spare_give_a_typed_error_or_a_load(raw, frames):
    try:
        read_spare_message([raw, *frames], LIMITS)
    except QvlError:
        pass
