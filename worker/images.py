"""Decoding of request images with limits: formats, bytes, pixel count, decompression bombs.

A bad image raises `BadRequest`, which fails only the request that carried it.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image

from qvl.protocol.errors import BadRequest

SUPPORTED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"})


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """An RGB image from encoded bytes; refuses unsupported formats and images over `max_pixels`."""
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
            return image.convert("RGB")
    except BadRequest:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadRequest(f"image refused as a decompression bomb: {exc}") from None
    except Exception as exc:  # Pillow raises many types for corrupt or truncated data
        raise BadRequest(f"image could not be decoded: {type(exc).__name__}: {exc}") from None
