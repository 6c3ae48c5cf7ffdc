"""Opening request images: every mode Pillow reads becomes 8-bit RGB with its colours kept, and
what cannot be opened is `bad_request`, refused before a pixel is read where its size says so;
the size read from the header alone is the opened image's size."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from image_kinds import IMAGE_KINDS, REFUSED, encoded
from PIL import Image

from qvl.protocol.errors import BadRequest
from qvl.worker.images import image_size, open_image


@pytest.mark.parametrize("name", sorted(IMAGE_KINDS))
def test_opened_as_rgb(name):
    data, pixel, _ = IMAGE_KINDS[name]
    image = open_image(data, 40_000_000)
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == pytest.approx(pixel, abs=2)


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused(name):
    data, message = REFUSED[name]
    with pytest.raises(BadRequest, match=message):
        open_image(data, 40_000_000)


def test_over_the_pixel_limit_is_refused_before_reading_pixels():
    whole = encoded(Image.effect_noise((300, 200), 50).convert("RGB"), "PNG")
    with pytest.raises(BadRequest, match="300x200 pixels exceeds 50000"):
        open_image(whole[:200], 50_000)  # the header alone: had it read pixels, it would say truncated


SEEDS = [IMAGE_KINDS[name][0] for name in sorted(IMAGE_KINDS)]


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=300),
                 st.tuples(st.sampled_from(SEEDS), st.integers(0, 4096), st.binary(min_size=1, max_size=8))
                 .map(lambda t: t[0][:t[1]] + t[2] + t[0][t[1] + len(t[2]):])))
def test_any_bytes_give_an_image_or_bad_request_and_the_header_size_is_its_size(data):
    """Random bytes, and real images of every kind with bytes overwritten anywhere."""
    try:
        size = image_size(data, 40_000_000)
    except BadRequest:
        size = None
    try:
        image = open_image(data, 40_000_000)
    except BadRequest:
        return
    assert image.mode == "RGB" and size == image.size


def test_the_header_size_refuses_what_opening_would_before_any_pixel():
    whole = encoded(Image.effect_noise((300, 200), 50).convert("RGB"), "PNG")
    assert image_size(whole[:200], 10**6) == (300, 200)  # the header alone is enough
    with pytest.raises(BadRequest, match="300x200 pixels exceeds 50000"):
        image_size(whole[:200], 50_000)
    with pytest.raises(BadRequest, match="format"):
        image_size(encoded(Image.new("RGB", (8, 8)), "ICO"), 10**6)


def test_an_opened_image_keeps_none_of_its_metadata():
    """Compressed text chunks: 48 KB of PNG that Pillow decodes into 48 MB of `info`, which a
    request would hold while it waits and carry wherever its image goes."""
    import io
    import zlib

    from PIL import PngImagePlugin

    meta = PngImagePlugin.PngInfo()
    for i in range(48):
        meta.add_text(f"k{i}", "x" * (1 << 20), zip=True)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="PNG", pnginfo=meta)
    data = buf.getvalue()
    assert len(data) < 256 << 10 and len(zlib.compress(b"x" * (1 << 20))) < 2 << 10
    image = open_image(data, 1 << 20)
    assert image.info == {} and image.getpixel((0, 0)) == (1, 2, 3)
