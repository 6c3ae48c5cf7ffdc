"""Opening request images: every mode Pillow reads becomes 8-bit RGB with its colours kept, and
what cannot be opened is `bad_request`, refused before a pixel is read where its size says so."""

import pytest
from image_kinds import IMAGE_KINDS, REFUSED, encoded
from PIL import Image

from qvl.protocol.errors import BadRequest
from qvl.worker.images import open_image


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
