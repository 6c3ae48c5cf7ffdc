"""Opening request images with limits: formats, bytes, pixel count, decompression bombs.

`open_image` reads the size from the header first and refuses an image over the pixel limit
before reading a pixel (`image_size` stops there, so a request's image tokens can be counted
before any of its images is decoded); then it reads the first frame (of an animated GIF, say) and turns
every mode Pillow reads into 8-bit RGB: CMYK, 16-bit grey, palettes, and
transparency composited onto white as transformers' own `convert_to_rgb` does; the image keeps no
metadata (`info`).
A bad image raises `BadRequest`, which fails only the request that carried it. Never imports torch.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image
from qvl.protocol.errors import BadRequest

SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"})


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """An RGB image from encoded bytes; refuses unsupported formats and images over `max_pixels`."""
    return _read(data, max_pixels, decode=True)


def image_size(data: bytes, max_pixels: int) -> tuple[int, int]:
    """(width, height) from the header alone, with `open_image`'s checks of format and size: what a
    request's image tokens are counted from before any of its images is decoded."""
    return _read(data, max_pixels, decode=False).size


def _read(data: bytes, max_pixels: int, decode: bool) -> Image.Image:
    try:
        with warnings.catch_warnings():
            # Pillow warns (rather than raises) between 1x and 2x its bomb limit: refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if image.format not in SUPPORTED_FORMATS:
                raise BadRequest(f"image format {image.format} is not supported; "
                                 f"use one of {sorted(SUPPORTED_FORMATS)}")
            width, height = image.size
            if width * height > max_pixels:
                raise BadRequest(f"image of {width}x{height} pixels exceeds {max_pixels}")
            if not decode:
                return image
            image.load()
            rgb = to_rgb(image)
            # metadata nothing downstream reads: a small PNG's compressed text chunks alone can
            # decode to 64 MB (Pillow's cap), held while the request waits and copied where it goes
            rgb.info = {}
            return rgb
    except BadRequest:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadRequest(f"image refused as a decompression bomb: {exc}") from None
    except Exception as exc:  # Pillow raises many types for corrupt or truncated data
        raise BadRequest(f"image could not be read: {type(exc).__name__}: {exc}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB" and "transparency" not in image.info:  # an RGB PNG may name a transparent colour
        return image
    if image.mode.startswith("I;16"):  # 16-bit grey: Pillow's own conversion clips at 255
        image = Image.fromarray((np.asarray(image) >> 8).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")
