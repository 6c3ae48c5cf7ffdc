"""Images a hostile or careless client may send, each with what the worker must make of it:
the RGB colour of its top-left pixel once opened, or the `bad_request` message it earns."""

import io

import numpy as np
from PIL import Image


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (40, 30), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _palette_with_transparency() -> bytes:
    image = Image.new("P", (50, 40))  # every pixel is index 0: black, and transparent
    image.putpalette([0, 0, 0, 255, 0, 0] * 128)
    return encoded(image, "PNG", transparency=0)


def _truncated() -> bytes:
    whole = encoded(Image.effect_noise((200, 200), 50).convert("RGB"), "PNG")
    return whole[:len(whole) // 2]


# name: (bytes, top-left RGB once opened or None, `bad_request` match when the model gets it or None)
IMAGE_KINDS = {
    "thin_2x3000": (encoded(Image.new("RGB", (2, 3000), (10, 20, 30)), "PNG"), (10, 20, 30), "too thin"),
    "wide_3000x2": (encoded(Image.new("RGB", (3000, 2), (10, 20, 30)), "PNG"), (10, 20, 30), "too thin"),
    "one_pixel": (encoded(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"), (10, 20, 30), None),
    "animated_gif": (_animated_gif(), (255, 0, 0), None),  # the first frame
    "cmyk_jpeg": (encoded(Image.new("CMYK", (50, 40), (0, 0, 0, 0)), "JPEG"), (255, 255, 255), None),
    "grey_16_bit": (encoded(Image.fromarray(np.full((40, 50), 40000, dtype=np.uint16)), "PNG"), (156, 156, 156),
                    None),  # 40000 / 65535 of white, not clipped to white
    "palette_transparent": (_palette_with_transparency(), (255, 255, 255), None),  # on white, as transformers does
    "rgba_half": (encoded(Image.new("RGBA", (50, 40), (255, 0, 0, 128)), "PNG"), (255, 127, 127), None),
    "grey_alpha": (encoded(Image.new("LA", (50, 40), (100, 255)), "PNG"), (100, 100, 100), None),
    "rgb_colour_key": (encoded(Image.new("RGB", (50, 40), (255, 0, 0)), "PNG", transparency=(255, 0, 0)),
                       (255, 255, 255), None),  # an RGB PNG whose red is its transparent colour (tRNS)
}
REFUSED = {  # name: (bytes, `bad_request` match when opened)
    "truncated": (_truncated(), "could not be read"),
    "bomb": (encoded(Image.new("1", (20000, 20000)), "PNG"), "decompression bomb"),
    "not_an_image": (b"GIF89a not really", "could not be read"),
    "icon": (encoded(Image.new("RGB", (32, 32)), "ICO"), "format ICO is not supported"),
}
