"""Image tokens counted from width and height agree with what Qwen's image processor makes of the
image, for any size and processor configuration; too thin an image is `bad_request` exactly where
the processor refuses it."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from transformers import Qwen2VLImageProcessor

from qvl.protocol.errors import BadRequest
from qvl.worker.image_tokens import ImageTokens

# (patch, merge, min pixels, max pixels): the tiny preset, Qwen2-VL's patch 14, a small max
CONFIGS = [(16, 2, 32 * 32 * 4, 32 * 32 * 64), (14, 2, 56 * 56, 28 * 28 * 1280), (16, 2, 256, 32 * 32 * 8)]
PROCESSORS = [Qwen2VLImageProcessor(size={"shortest_edge": lo, "longest_edge": hi}, patch_size=patch,
                                    merge_size=merge, temporal_patch_size=2) for patch, merge, lo, hi in CONFIGS]


def processor_tokens(processor, width, height):
    grid = processor(images=[Image.new("RGB", (width, height))], return_tensors="pt")["image_grid_thw"][0]
    return int(grid.prod()) // processor.merge_size ** 2


sides = st.integers(1, 1200)


@settings(max_examples=150, deadline=None)
@given(config=st.sampled_from(range(len(CONFIGS))), width=sides, height=sides)
def test_counted_tokens_are_the_processors(config, width, height):
    processor = PROCESSORS[config]
    counter = ImageTokens.of(processor)
    try:
        expected = processor_tokens(processor, width, height)
    except ValueError:  # the processor refuses extreme aspect ratios
        with pytest.raises(BadRequest, match="too thin"):
            counter.count(width, height)
        return
    assert counter.count(width, height) == expected


@pytest.mark.parametrize("width, height, ok", [(1, 1, True), (1, 200, True), (200, 1, True), (1, 201, False),
                                               (2, 3000, False), (3000, 2, False), (15, 3000, True)])
def test_aspect_ratio_boundary(width, height, ok):
    counter = ImageTokens.of(PROCESSORS[0])
    if ok:
        assert counter.count(width, height) == processor_tokens(PROCESSORS[0], width, height)
    else:
        with pytest.raises(BadRequest, match=f"{width}x{height} pixels is too thin"):
            counter.count(width, height)
        with pytest.raises(ValueError, match="aspect ratio"):
            processor_tokens(PROCESSORS[0], width, height)
