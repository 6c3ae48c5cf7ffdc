"""What the model's forward would derive from the images' grid and the ids, made on the host
(`qvl.worker.vision`), with the tiny model on CPU: the forward takes those values instead of
deriving them, and they are its own."""

import pytest
import torch
from PIL import Image

from qvl.protocol.contract import ModelOptions
from qvl.protocol.messages import GenerationParams
from qvl.worker import kv_pool, vision
from qvl.worker.engine import NO_IMAGES, Engine

pytestmark = pytest.mark.skipif(vision.vision_utils is None, reason="transformers takes no made vision inputs")


@pytest.fixture(scope="module")
def engine(tiny_model):
    return Engine(ModelOptions(str(tiny_model), "cpu", kv_cache="continuous", kv_cache_tokens=5120))


def prompts(engine):
    """Images of other sizes and shapes (96 x 64 is a grid of 4 x 6 patches), a text-only prompt
    between them, padded on the right as a joint prefill pads them."""
    params = GenerationParams(max_new_tokens=4)
    made = []
    for size, text in (((96, 64), "What is it?"), (None, "Tell me a story."), ((64, 160), "Colour?"),
                       ((200, 120), "Describe the whole picture.")):
        content = [] if size is None else [{"type": "image", "frame": 0}]
        messages = [{"role": "user", "content": [*content, {"type": "text", "text": text}]}]
        frames = [] if size is None else [Image.effect_noise(size, 40).convert("RGB")]
        images = engine.process_images(messages, frames, params) if frames else NO_IMAGES
        made.append(engine.prompt(messages, images, params))
    return engine.inputs(made, pad_left=False)


def test_the_forward_takes_the_values_made_on_the_host(engine, monkeypatch):
    """The grid handed to the forward is swapped for one of the same sizes transposed (4 x 6 patches
    as 6 x 4) after the values were made from the true one. A forward that derived any of them
    itself (the text's rotary positions, the tower's interpolation, rotary positions or images'
    boundaries) would give other embeddings or positions; it gives the model's own, exactly."""
    inputs = prompts(engine)
    grid = inputs["image_grid_thw"]
    assert (grid[:, 1] != grid[:, 2]).all()
    made = vision.host_inputs(engine.model, inputs)
    assert {"position_ids", "image_cu_seqlens", "image_max_seqlen", "image_position_ids",
            "image_interp_indices", "image_interp_weights"} <= set(made)
    with torch.inference_mode():
        monkeypatch.setattr(kv_pool, "host_inputs", lambda model, inputs: {})
        own = kv_pool.decoder_inputs(engine.model, inputs)
        monkeypatch.setattr(kv_pool, "host_inputs", lambda model, inputs: made)
        swapped = dict(inputs, image_grid_thw=grid[:, [0, 2, 1]])
        taken = kv_pool.decoder_inputs(engine.model, swapped)
        monkeypatch.setattr(kv_pool, "host_inputs", vision.host_inputs)
        derived = kv_pool.decoder_inputs(engine.model, swapped)  # the swap does change what is derived
    for name in ("inputs_embeds", "position_ids", "visual_pos_masks"):
        assert torch.equal(taken[name], own[name]), name
    for mine, theirs in zip(taken["deepstack_visual_embeds"], own["deepstack_visual_embeds"], strict=True):
        assert torch.equal(mine, theirs)
    assert not torch.equal(derived["inputs_embeds"], own["inputs_embeds"])
    assert not torch.equal(derived["position_ids"], own["position_ids"])


def test_a_batch_without_images_needs_nothing_made(engine):
    params = GenerationParams(max_new_tokens=4)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hello there."}]}]
    inputs = engine.inputs([engine.prompt(messages, NO_IMAGES, params)] * 2, pad_left=False)
    assert vision.host_inputs(engine.model, inputs) == {}


def test_the_tower_attending_image_by_image_gives_the_features_of_transformers_sdpa(engine):
    """With the images' lengths from the host, and without them (read back from the device, as in
    `generate`), the tower's features and deepstack features are SDPA's, exactly."""
    visual = engine.model.model.visual
    assert visual.config._attn_implementation == vision.IMAGE_BY_IMAGE
    inputs = prompts(engine)
    made = {name: value for name, value in vision.host_inputs(engine.model, inputs).items()
            if name.startswith("image_")}
    pixels, grid = inputs["pixel_values"], inputs["image_grid_thw"]
    with torch.inference_mode():
        with_lengths = engine.model.model.get_image_features(pixels, grid, **made)
        without = engine.model.model.get_image_features(pixels, grid)
        visual.config._attn_implementation = "sdpa"
        try:
            sdpa = engine.model.model.get_image_features(pixels, grid)
        finally:
            visual.config._attn_implementation = vision.IMAGE_BY_IMAGE
    for features in (with_lengths, without):
        for mine, theirs in zip([*features.pooler_output, *[f for fs in features.deepstack_features for f in fs]],
                                [*sdpa.pooler_output, *[f for fs in sdpa.deepstack_features for f in fs]], strict=True):
            assert torch.equal(mine, theirs)


def test_another_attention_asked_for_is_kept(tiny_model):
    eager = Engine(ModelOptions(str(tiny_model), "cpu", attn_implementation="eager"))
    assert eager.model.model.visual.config._attn_implementation == "eager"
    assert not vision.attend_image_by_image(eager.model)
