"""Property-based tests of every parser on the wire: any bytes and any msgpack value give a
valid message or a `QvlError`, never another exception; what parses keeps its promises."""

import dataclasses
import json
import math

import msgpack
import pytest
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

from qvl.protocol.codec import PROTOCOL_VERSION, Limits, decode, encode
from qvl.protocol.contract import ModelOptions, SpareSpec, WorkerSpec
from qvl.protocol.errors import BadRequest, QvlError
from qvl.protocol.messages import (FINISH_REASONS, ROLES, Cancel, GenerationParams, build_generate,
                                   parse_generate, parse_worker_message)

LIMITS = Limits(max_header_bytes=4096, max_frame_bytes=256, max_images=3, max_messages=4,
                max_text_chars=64, max_new_tokens=100, max_request_bytes=1024)
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

scalars = (st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=20)
# Values that look like the real thing, with any field swapped for any value
params = st.dictionaries(st.sampled_from(["max_new_tokens", "min_new_tokens", "temperature", "top_p",
                                          "top_k", "seed", "stop", "unknown"]),
                         values | st.integers(-5, 200) | st.integers(-(1 << 64), 1 << 64)
                         | st.lists(st.text(max_size=300) | values, max_size=6), max_size=6)
parts = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": values | st.text(max_size=80)}),
    st.fixed_dictionaries({"type": st.just("image"), "frame": values | st.integers(-2, 5)}),
    st.dictionaries(st.text(max_size=8), values, max_size=3),
    values,
)
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(sorted(ROLES)) | values,
                                           "content": st.lists(parts, max_size=5) | values}), max_size=5)
generate_headers = st.fixed_dictionaries(
    {"v": st.just(PROTOCOL_VERSION), "kind": st.just("generate"), "id": st.text(max_size=8) | values},
    optional={"messages": messages | values, "params": params | values, "timeout_ms": values,
              "stream": values})
frames = st.lists(st.binary(max_size=300), max_size=5)


def _pack(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


@SETTINGS
@given(st.lists(st.binary(max_size=600), max_size=6))
def test_decode_any_bytes(parts):
    try:
        header, _ = decode(parts, LIMITS)
    except QvlError:
        return
    assert isinstance(header, dict) and header["v"] == PROTOCOL_VERSION and isinstance(header["kind"], str)


@SETTINGS
@given(values, frames)
def test_decode_any_msgpack_value(value, extra):
    try:
        header, got = decode([_pack(value), *extra], LIMITS)
    except QvlError:
        return
    assert isinstance(header, dict) and len(got) <= LIMITS.max_images


@SETTINGS
@given(params | values)
def test_generation_params_any_value(raw):
    try:
        p = GenerationParams.parse(raw, LIMITS)
    except BadRequest:
        return
    assert 1 <= p.max_new_tokens <= LIMITS.max_new_tokens and 0 <= p.min_new_tokens <= p.max_new_tokens
    assert math.isfinite(p.temperature) and 0 <= p.temperature <= 100 and 0 < p.top_p <= 1
    assert all(not isinstance(getattr(p, f), bool) for f in ("max_new_tokens", "min_new_tokens", "top_k"))
    assert p.seed is None or (type(p.seed) is int and 0 <= p.seed < 1 << 63)
    assert isinstance(p.stop, tuple) and len(p.stop) <= 4
    assert all(type(s) is str and 1 <= len(s) <= 256 for s in p.stop)
    assert GenerationParams.parse(dict(vars(p)), LIMITS) == p  # what was accepted reads back the same


@SETTINGS
@given(generate_headers, frames)
def test_parse_generate_any_header(header, images):
    """Through the codec, as the supervisor reads a message: a request or a typed error."""
    try:
        wire = encode(header, images)
    except OverflowError:  # an integer msgpack cannot hold never reaches the wire
        reject()
    try:
        decoded, got = decode(wire, LIMITS)
        request = parse_generate(decoded, got, LIMITS)
    except QvlError:
        return
    references = [p["frame"] for m in request.messages for p in m["content"] if p["type"] == "image"]
    assert len(references) <= LIMITS.max_images
    assert set(references) == set(range(len(request.images)))
    assert all(m["role"] in ROLES for m in request.messages)
    # what was accepted encodes again and reads back the same
    again = parse_generate(*decode(encode(request.header(), request.images), LIMITS), LIMITS)
    assert again == request


@SETTINGS
@given(st.fixed_dictionaries({"v": st.just(PROTOCOL_VERSION),
                              "kind": st.sampled_from(["hello", "ready", "heartbeat", "chunk", "reply",
                                                       "bye", "stop", "generate"]) | values},
                             optional={"id": values, "ok": values, "text": values, "usage": values,
                                       "timings": values, "telemetry": values, "error": values,
                                       "finish_reason": st.sampled_from(sorted(FINISH_REASONS)) | values,
                                       "slot": values, "generation": values, "pid": values,
                                       "load_s": values, "device": values, "spare": values}))
def test_parse_worker_message_any_header(header):
    try:
        message = parse_worker_message(header)
    except BadRequest:
        return
    assert parse_worker_message(message.header()) == message


@SETTINGS
@given(st.fixed_dictionaries({"v": values | st.just(PROTOCOL_VERSION), "kind": st.just("cancel") | values},
                             optional={"id": values | st.text(max_size=8), "extra": values}), frames)
def test_parse_cancel_any_header(header, extra):
    """As the supervisor reads a cancel: through the codec, then its parser, a cancel naming a
    string or integer id, or a typed error that carries the id when it could be read."""
    try:
        decoded, _ = decode(encode(header, extra), LIMITS)
        cancel = Cancel.parse(decoded)
    except QvlError as exc:
        rid = header.get("id") if isinstance(header, dict) else None
        assert exc.request_id is None or exc.request_id == rid
        return
    assert isinstance(cancel.id, (str, int)) and not isinstance(cancel.id, bool)
    assert Cancel.parse(decode(encode(cancel.header()), LIMITS)[0]) == cancel


@SETTINGS
@given(values, st.integers(1, 8))
def test_a_recycle_names_a_slot_or_every_slot_or_is_a_bad_request(value, slots):
    """The `worker` field of a `recycle` control command, any msgpack value against 1..8 slots."""
    from qvl.supervisor.control import slot_named
    try:
        slot = slot_named(value, slots)
    except BadRequest as exc:
        assert "no worker slot" in exc.message
        assert value is not None
        return
    assert slot is None or (type(slot) is int and 0 <= slot < slots)


@pytest.mark.parametrize("header", [
    {"v": PROTOCOL_VERSION, "kind": "cancel"},
    {"v": PROTOCOL_VERSION, "kind": "cancel", "id": None},
])
def test_a_cancel_without_an_id_is_a_bad_request(header):
    with pytest.raises(BadRequest, match="id"):
        Cancel.parse(decode(encode(header), LIMITS)[0])


@SETTINGS
@given(st.text(max_size=200) | values.map(lambda v: __import__("json").dumps(v, default=str)))
def test_worker_spec_any_text(text):
    for spec in (WorkerSpec, SpareSpec):
        try:
            spec.from_json(text)
        except ValueError:
            pass


SPEC = WorkerSpec("ipc:///run/backend", 1, 7, ModelOptions("/models/tiny"), heartbeat_interval_s=0.5)
SPARE = SpareSpec("ipc:///run/backend", 1, 3, "hf", LIMITS)


def _swapped(spec, path: tuple[str, ...], value) -> str:
    raw = dataclasses.asdict(spec)
    inner = raw
    for name in path[:-1]:
        inner = inner[name]
    inner[path[-1]] = value
    return json.dumps(raw, default=str)


def _fields(spec) -> list[tuple[str, ...]]:
    paths = []
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if dataclasses.is_dataclass(value):
            paths += [(f.name, g.name) for g in dataclasses.fields(value)] + [(f.name,)]
        else:
            paths.append((f.name,))
    return paths + [("unknown",)]


def _well_typed(spec) -> bool:
    """Every field holds a value of its declared type (bool is no int, int is no float)."""
    kinds = {"str": (str,), "int": (int,), "float": (float,), "bool": (bool,), "None": (type(None),)}
    for f in dataclasses.fields(spec):
        value = getattr(spec, f.name)
        if dataclasses.is_dataclass(value):
            if not _well_typed(value):
                return False
            continue
        allowed = tuple(t for part in f.type.split("|") for t in kinds[part.strip()])
        if type(value) not in allowed:
            return False
    return True


@SETTINGS
@given(st.sampled_from([SPEC, SPARE]), st.data(), values)
def test_a_spec_with_any_field_swapped_reads_back_well_typed_or_fails_by_name(spec, data, value):
    """What a spare is sent (and a worker is given): any field of a real spec replaced by any value
    gives a spec whose every field has its declared type, or a ValueError."""
    path = data.draw(st.sampled_from(_fields(spec)))
    try:
        got = type(spec).from_json(_swapped(spec, path, value))
    except ValueError:
        return
    assert _well_typed(got)


def test_a_spec_with_an_integer_no_float_can_hold_fails_by_name():
    with pytest.raises(ValueError):
        WorkerSpec.from_json(SPEC.to_json().replace('"heartbeat_interval_s": 0.5',
                                                    '"heartbeat_interval_s": 1' + "0" * 400))


def test_a_spec_nested_too_deep_for_the_parser_fails_by_name():
    with pytest.raises(ValueError):
        WorkerSpec.from_json("[" * 100_000 + "]" * 100_000)


def test_generate_round_trip_keeps_every_field():
    request = build_generate("a", [{"role": "user", "content": [{"type": "image", "image": b"x"},
                                                                {"type": "text", "text": "hi"}]}],
                             GenerationParams(max_new_tokens=5), timeout_ms=10.0, stream=True)
    assert parse_generate(*decode(encode(request.header(), request.images), LIMITS), LIMITS) == request


def test_a_reply_names_how_it_finished():
    reply = {"v": PROTOCOL_VERSION, "kind": "reply", "id": 3, "ok": True, "text": "a", "usage": {},
             "timings": {}}
    for reason in sorted(FINISH_REASONS):
        assert parse_worker_message({**reply, "finish_reason": reason}).finish_reason == reason
    for wrong in (None, "eos", 1):
        with pytest.raises(BadRequest, match="finish_reason"):
            parse_worker_message({**reply, "finish_reason": wrong})
