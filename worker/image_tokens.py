"""How many prompt tokens an image becomes, from its width and height alone.

Qwen-VL's image processor resizes every image with `smart_resize` (sides rounded to multiples of
patch size x merge size, pixel count kept within the processor's min and max) and spends one
token per merged patch. The same arithmetic runs here before the processor does, so a request
whose images would overflow the token cap is refused without processing a pixel, and the
processor's own `ValueError` on extreme aspect ratios becomes the client's `bad_request`.
Never imports torch; the numbers come from the loaded image processor's configuration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from qvl.protocol.errors import BadRequest

MAX_ASPECT_RATIO = 200  # the processor refuses anything longer and thinner than this


@dataclass(frozen=True)
class ImageTokens:
    patch_size: int
    merge_size: int
    min_pixels: int
    max_pixels: int

    @classmethod
    def of(cls, image_processor) -> "ImageTokens":
        size = image_processor.size
        return cls(image_processor.patch_size, image_processor.merge_size,
                   size["shortest_edge"], size["longest_edge"])

    def resized(self, width: int, height: int) -> tuple[int, int]:
        """The (height, width) the processor resizes a `width` x `height` image to."""
        if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
            raise BadRequest(f"an image of {width}x{height} pixels is too thin: the longer side may be "
                             f"at most {MAX_ASPECT_RATIO} times the shorter")
        factor = self.patch_size * self.merge_size
        h, w = round(height / factor) * factor, round(width / factor) * factor
        if h * w > self.max_pixels:
            beta = math.sqrt(height * width / self.max_pixels)
            h = max(factor, math.floor(height / beta / factor) * factor)
            w = max(factor, math.floor(width / beta / factor) * factor)
        elif h * w < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            h = math.ceil(height * beta / factor) * factor
            w = math.ceil(width * beta / factor) * factor
        return h, w

    def count(self, width: int, height: int) -> int:
        """The prompt tokens of one `width` x `height` image."""
        h, w = self.resized(width, height)
        return (h // self.patch_size) * (w // self.patch_size) // self.merge_size ** 2

    def per_reference(self, messages: list, sizes: list[tuple[int, int]]) -> tuple[int, ...]:
        """The tokens of each image reference of `messages`, in order; `sizes` are the (width,
        height) of the request's frames, which a part `{"type": "image", "frame": i}` names."""
        per_frame = [self.count(*size) for size in sizes]
        return tuple(per_frame[part["frame"]] for m in messages for part in m["content"] if part["type"] == "image")
