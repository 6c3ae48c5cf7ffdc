"""The codec and schema on their own: limits, versions, strict types, image references."""

import msgpack
import pytest
from PIL import Image

from harness import png
from qvl.protocol import BadRequest, GenerationParams, Limits, UnsupportedVersion
from qvl.protocol.codec import PROTOCOL_VERSION, decode, encode
from qvl.protocol.errors import ERROR_CODES, error_from_wire
from qvl.protocol.messages import build_generate, image_bytes, parse_generate

LIMITS = Limits(max_frame_bytes=1000, max_images=2, max_messages=3, max_text_chars=50,
                max_new_tokens=200)


def header(**fields):
    return {"v": PROTOCOL_VERSION, "kind": "generate", "id": "r1", **fields}


def user(*parts):
    return [{"role": "user", "content": list(parts)}]


def test_round_trip_keeps_images_as_frames():
    img = png()
    req = build_generate("a", user({"type": "image", "image": img}, {"type": "text", "text": "hi"}),
                         GenerationParams(max_new_tokens=5))
    parts = encode(req.header(), req.images)
    assert parts[1] == img and img not in parts[0]
    h, frames = decode(parts, LIMITS)
    parsed = parse_generate(h, frames, LIMITS)
    assert parsed.messages[0]["content"][0] == {"type": "image", "frame": 0}
    assert parsed.params.max_new_tokens == 5 and parsed.images == (img,)


@pytest.mark.parametrize("parts, message", [
    ([], "empty message"),
    ([b"\xc1\x00garbage"], "not valid msgpack"),
    ([msgpack.packb([1, 2])], "must be a map"),
    ([msgpack.packb({"v": 1, "id": "x"})], "`kind`"),
    ([msgpack.packb({"v": 1, "kind": "generate", "id": 1.5})], "`id`"),
    ([msgpack.packb(header()), b"a", b"b", b"c"], "3 frames"),
    ([msgpack.packb(header()), b"x" * 1001], "frame 0 of 1001 bytes"),
    ([b"\x80" + b"x" * (1 << 20)], "header of"),
])
def test_decode_refuses(parts, message):
    with pytest.raises(BadRequest, match=message):
        decode(parts, LIMITS)


def test_decode_refuses_other_versions_with_the_id():
    with pytest.raises(UnsupportedVersion) as info:
        decode([msgpack.packb({"v": 99, "kind": "ping", "id": "q"})], LIMITS)
    assert info.value.request_id == "q"


@pytest.mark.parametrize("fields, message", [
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
    ({"messages": user({"type": "text", "text": "x" * 51})}, "51 characters"),
    ({"messages": user({"type": "image", "frame": 1})}, "frame in 0..0"),
    ({"messages": user({"type": "audio"})}, "text or image"),
    ({"messages": [{"role": "user", "content": "x"}] * 4}, "4 messages"),
    ({"messages": user({"type": "text", "text": "x"})}, "1 image frames sent but 0"),
    ({"messages": user({"type": "image", "frame": 0}), "params": {"max_new_tokens": 201}}, "max_new_tokens"),
    ({"messages": user({"type": "image", "frame": 0}), "params": {"temperature": -1}}, "temperature"),
    ({"messages": user({"type": "image", "frame": 0}), "params": {"beams": 3}}, "unknown"),
    ({"messages": user({"type": "image", "frame": 0}), "timeout_ms": 0}, "timeout_ms"),
])
def test_parse_generate_refuses(fields, message):
    with pytest.raises(BadRequest, match=message) as info:
        parse_generate(header(**fields), [b"img"], LIMITS)
    assert info.value.request_id == "r1"


def test_image_bytes_accepts_bytes_paths_and_pil(tmp_path):
    data = png()
    path = tmp_path / "a.png"
    path.write_bytes(data)
    assert image_bytes(data) == data
    assert image_bytes(str(path)) == data == image_bytes(path)
    assert Image.open(__import__("io").BytesIO(image_bytes(Image.new("RGB", (4, 4))))).size == (4, 4)
    with pytest.raises(TypeError):
        image_bytes(42)


def test_every_wire_code_has_its_exception():
    assert ERROR_CODES == {"bad_request", "unsupported_version", "overloaded", "deadline_exceeded",
                           "out_of_memory", "worker_failed", "shutting_down", "internal"}
    for code in ERROR_CODES:
        assert error_from_wire({"code": code, "message": "m"}).code == code
    assert error_from_wire({"code": "nonsense"}).code == "internal"


def test_an_integer_temperature_is_read_as_a_float():
    """transformers refuses an int temperature (`has to be a strictly positive float`)."""
    params = GenerationParams.parse({"temperature": 2, "top_p": 1}, Limits())
    assert isinstance(params.temperature, float) and isinstance(params.top_p, float)


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 0.0009])
def test_a_temperature_too_small_to_divide_by_decodes_greedily(temperature):
    torch = pytest.importorskip("torch")
    from qvl.worker.kv_pool import choose_tokens
    params = GenerationParams.parse({"temperature": temperature}, Limits())
    assert params.temperature == 0.0
    logits = torch.randn(2, 50)
    assert choose_tokens(logits, params).tolist() == logits.argmax(dim=-1).tolist()
