"""What the model's forward would derive from the images' grid and the ids, made on the host
(`qvl.worker.vision`), with the tiny model on CPU: the forward takes those values instead of
deriving them, and they are its own; a tower that would not take them fails the probe at load and
is left deriving its own."""

import logging

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AttentionInterface, AutoModelForImageTextToText

from qvl.protocol.contract import ModelOptions
from qvl.protocol.messages import GenerationParams
from qvl.worker import kv_pool, vision
from qvl.worker.engine import NO_IMAGES, Engine

needs_tower_inputs = pytest.mark.skipif(vision.vision_utils is None,
                                        reason="this transformers release's vision tower takes no made inputs")


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


def test_the_forward_takes_the_rotary_positions_made_on_the_host(engine, monkeypatch):
    """Made from the true grid, handed to a forward given the grid transposed (4 x 6 patches as
    6 x 4): a forward that numbered the text's multimodal rotary positions itself would number
    them otherwise; it takes the model's own, exactly."""
    inputs = prompts(engine)
    made = {"position_ids": vision.host_inputs(engine.model, inputs)["position_ids"]}
    swapped = dict(inputs, image_grid_thw=inputs["image_grid_thw"][:, [0, 2, 1]])
    with torch.inference_mode():
        monkeypatch.setattr(kv_pool, "host_inputs", lambda model, inputs: {})
        own = kv_pool.decoder_inputs(engine.model, inputs)
        derived = kv_pool.decoder_inputs(engine.model, swapped)  # the swap does change what is derived
        monkeypatch.setattr(kv_pool, "host_inputs", lambda model, inputs: made)
        taken = kv_pool.decoder_inputs(engine.model, swapped)
    assert torch.equal(taken["position_ids"], own["position_ids"])
    assert not torch.equal(derived["position_ids"], own["position_ids"])


@needs_tower_inputs
def test_the_forward_takes_the_values_made_on_the_host(engine, monkeypatch):
    """The grid handed to the forward is swapped for one of the same sizes transposed (4 x 6 patches
    as 6 x 4) after the values were made from the true one. A forward that derived any of them
    itself (the text's rotary positions, the tower's interpolation, rotary positions or images'
    boundaries) would give other embeddings or positions; it gives the model's own, exactly, and
    what was made for the tower is not kept with the decoder's inputs."""
    inputs = prompts(engine)
    grid = inputs["image_grid_thw"]
    assert (grid[:, 1] != grid[:, 2]).all()
    made = vision.host_inputs(engine.model, inputs)
    assert {"position_ids", "image_cu_seqlens", "image_max_seqlen", "image_position_ids", "image_lengths",
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
    assert not [name for name in taken if name.startswith("image_")]


def test_a_batch_without_images_needs_nothing_made(engine):
    params = GenerationParams(max_new_tokens=4)
    messages = [{"role": "user", "content": [{"type": "text", "text": "Hello there."}]}]
    inputs = engine.inputs([engine.prompt(messages, NO_IMAGES, params)] * 2, pad_left=False)
    assert vision.host_inputs(engine.model, inputs) == {}


@needs_tower_inputs
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
    for output in (with_lengths, without):
        for mine, theirs in zip(vision.features(output), vision.features(sdpa), strict=True):
            assert torch.equal(mine, theirs)


def test_another_attention_asked_for_is_kept_and_takes_the_inputs_made_on_the_host(tiny_model):
    eager = Engine(ModelOptions(str(tiny_model), "cpu", attn_implementation="eager"))
    assert eager.model.model.visual.config._attn_implementation == "eager"
    assert "image_cu_seqlens" in vision.host_inputs(eager.model, prompts(eager))


def _model(tiny_model):
    return AutoModelForImageTextToText.from_pretrained(str(tiny_model), attn_implementation="sdpa").eval()


def _deriving_anyway(function, taking=()):
    """A stand-in for a transformers release whose tower derives a value itself: `function` called
    without the keyword arguments it would take the value from, after popping the names `taking`
    from them (a release that takes them and ignores them)."""
    def derive(*args, kwargs=None, **rest):
        for name in taking:
            (kwargs or {}).pop(name, None)
        return function(*args, **rest)
    return derive


def _left_as_it_was(engine, model, caplog, why):
    """The probe failed for `why` (twice: under each attention), the tower keeps transformers'
    SDPA, nothing is made for it, and an add's features are still the model's own."""
    assert caplog.text.count(why) == 2, caplog.text
    assert "derives its inputs on the device" in caplog.text
    assert model.model.visual.config._attn_implementation == "sdpa"
    inputs = prompts(engine)  # made by the engine's processor, for the model probed here
    assert set(vision.host_inputs(model, inputs)) == {"position_ids"}
    with torch.inference_mode():
        given = kv_pool.decoder_inputs(model, inputs)
        own = model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
    assert torch.equal(given["inputs_embeds"][given["visual_pos_masks"]], torch.cat(own.pooler_output))


@needs_tower_inputs
@pytest.mark.parametrize("derived, taking, why", [
    ("get_vision_attention_seqlens", ("cu_seqlens", "max_seqlen"), "derived the images' boundaries"),
    ("get_vision_attention_seqlens", (), "multiple values for keyword argument"),
    ("get_vision_position_ids", (), "passed ['position_ids'] on")])
def test_a_tower_that_derives_its_inputs_anyway_fails_the_probe_and_is_left_as_it_was(
        engine, tiny_model, monkeypatch, caplog, derived, taking, why):
    """The tower's module made to derive the images' boundaries (taking the made ones or leaving
    them to clash with its own) or its rotary positions itself."""
    import transformers.models.qwen3_vl.modeling_qwen3_vl as modeling

    model = _model(tiny_model)
    monkeypatch.setattr(modeling, derived, _deriving_anyway(getattr(modeling, derived), taking))
    with caplog.at_level(logging.WARNING, logger=vision.__name__):
        vision.prepare_vision(model)
    _left_as_it_was(engine, model, caplog, why)


@needs_tower_inputs
def test_a_tower_that_takes_wrong_inputs_fails_the_probe_by_its_features(engine, tiny_model, monkeypatch, caplog):
    """Inputs taken but not the tower's own (interpolation weights a thousand times too large): its
    features differ."""
    model = _model(tiny_model)
    tower_inputs = vision._tower_inputs
    monkeypatch.setattr(vision, "_tower_inputs", lambda visual, grid: {
        **tower_inputs(visual, grid), "image_interp_weights": tower_inputs(visual, grid)["image_interp_weights"] * 1000})
    with caplog.at_level(logging.WARNING, logger=vision.__name__):
        vision.prepare_vision(model)
    monkeypatch.undo()
    _left_as_it_was(engine, model, caplog, "features differ")


@needs_tower_inputs
def test_an_attention_that_gives_other_features_fails_the_probe_and_the_one_asked_for_is_probed_next(
        engine, tiny_model, monkeypatch, caplog):
    """The image-by-image attention made wrong (twice its output): the probe compares it with the
    tower under SDPA and fails it, then passes under SDPA, which takes the inputs made on the host."""
    model = _model(tiny_model)
    attend = vision._attend_image_by_image
    monkeypatch.setattr(vision, "_attend_image_by_image", lambda *args, **kwargs: (attend(*args, **kwargs)[0] * 2, None))
    try:
        with caplog.at_level(logging.WARNING, logger=vision.__name__):
            vision.prepare_vision(model)
    finally:  # the registry is transformers' and global: the true attention back for the other tests
        AttentionInterface.register(vision.IMAGE_BY_IMAGE, attend)
    assert caplog.text.count("features differ") == 1, caplog.text
    assert "derives its inputs on the device" not in caplog.text
    assert model.model.visual.config._attn_implementation == "sdpa"
    assert "image_cu_seqlens" in vision.host_inputs(model, prompts(engine))


@needs_tower_inputs
@pytest.mark.parametrize("failure", [torch.OutOfMemoryError("CUDA out of memory"),
                                     RuntimeError("CUDA error: an illegal memory access was encountered")])
def test_a_failure_of_the_device_during_the_probe_is_raised_not_hidden(tiny_model, monkeypatch, failure):
    model = _model(tiny_model)

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(model.model, "get_image_features", fail)
    with pytest.raises(type(failure), match="CUDA"):
        vision.prepare_vision(model)


@needs_tower_inputs
def test_the_probe_passes_for_the_tower_as_transformers_ships_it(engine, tiny_model):
    model = _model(tiny_model)
    vision.prepare_vision(model)
    assert model.model.visual.config._attn_implementation == vision.IMAGE_BY_IMAGE
    assert "image_cu_seqlens" in vision.host_inputs(model, prompts(engine))


def test_handed_one_image_at_a_time_the_attention_attends_over_all_it_is_handed():
    """Should transformers split the images itself (no boundaries handed over), each call's patches
    are one image, whatever lengths came along in the keyword arguments."""
    generator = torch.Generator().manual_seed(1)
    query, key, value = (torch.randn(1, 2, 10, 8, generator=generator) for _ in range(3))
    attended, _ = vision._attend_image_by_image(None, query, key, value, scaling=0.3, lengths=[4, 6])
    assert torch.equal(attended, F.scaled_dot_product_attention(query, key, value, scale=0.3).transpose(1, 2))
