"""What the model's forward would read back from the device, made on the host instead, and the
vision tower's attention with the images' lengths from the host.

transformers' Qwen3-VL forward derives, from the images' grid and the prompts' ids, the vision
tower's position-embedding interpolation, its rotary positions and the images' boundaries, and the
text's multimodal rotary positions. With the grid and the ids on the device, each derivation reads
values back (`tolist`, `repeat_interleave` by counts, boolean indexing), and under SDPA every
vision layer attends image by image after reading the boundaries again: 159 waits for the device
in one add of four prompts (three images) on an H200. At each the device idles while the host
launches what follows.

- `prepare_vision(model)`, once at load: the vision tower attends image by image as under SDPA,
  but with the images' lengths from the host (`IMAGE_BY_IMAGE`, registered as an attention
  implementation of transformers). Flash attention over all images at once would need no lengths,
  but torch's kernel for the tower's 64-wide heads took 9.2 ms an add where SDPA (cuDNN's) took
  6.2 ms (H200). Then a probe on the model's device, two small images through the tower: it must
  take the inputs made on the host (`_tower_inputs`) in place of its own and give its own
  features. A transformers release that names them otherwise, or derives them anyway, fails the
  probe (first under that attention, then under the one asked for), and the tower is left as
  transformers made it, deriving them on the device. A failure of the device itself is raised.
- `host_inputs(model, inputs)`: those values made from `inputs` on the host with transformers' own
  functions, passed to the forward, which takes them instead of deriving them; the grid then stays
  on the host, where the forward only reads its sizes.
"""
from __future__ import annotations

import logging
import weakref

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

try:  # transformers 5: the vision tower takes what `host_inputs` makes
    from transformers import vision_utils
except ImportError:  # earlier releases derive it all themselves
    vision_utils = None

log = logging.getLogger(__name__)

IMAGE_BY_IMAGE = "qvl_sdpa_image_by_image_flash_interface"  # named *flash*: transformers then calls it
# with the images' boundaries instead of reading them back from the device first
_PROBED = weakref.WeakSet()  # the vision towers that passed the probe: they take `_tower_inputs`
_MADE_FOR_THE_TOWER = ("interp_indices", "interp_weights", "position_ids")  # what it must not pass on
FEATURE_TOLERANCE = 0.05  # of the largest feature: bfloat16's rounding under other kernels (3 % on an H200)
_DEVICE_FAILURES = (torch.OutOfMemoryError, getattr(torch, "AcceleratorError", torch.OutOfMemoryError))


def _attend_image_by_image(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                           cu_seq_lens_q=None, lengths=None, **kwargs):
    """transformers' attention interface, 1 x heads x tokens x dim in, 1 x tokens x heads x dim out:
    SDPA over each image's patches, as transformers' SDPA path attends, but `lengths` (the images'
    patches, from `host_inputs`) known on the host."""
    if cu_seq_lens_q is None:  # transformers split the images itself and hands over one at a time
        lengths = [query.shape[2]]
    elif lengths is None:  # the tower run without `host_inputs` (by `generate`): read them from the device
        lengths = (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()
    splits = [x.split(lengths, dim=2) for x in (query, key, value)]
    attended = [F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling) for q, k, v in zip(*splits)]
    return torch.cat(attended, dim=2).transpose(1, 2), None


def prepare_vision(model) -> None:
    """Have the vision tower of `model` attend by `IMAGE_BY_IMAGE` where it was to use SDPA (another
    implementation asked for is kept), and take what `host_inputs` makes if the probe shows it does:
    first with that attention, then, should it fail, with the implementation asked for."""
    visual = getattr(getattr(model, "model", None), "visual", None)
    if visual is None or vision_utils is None:
        return
    asked = visual.config._attn_implementation
    if asked == "sdpa":
        AttentionInterface.register(IMAGE_BY_IMAGE, _attend_image_by_image)
    for implementation in dict.fromkeys((IMAGE_BY_IMAGE if asked == "sdpa" else asked, asked)):
        visual.config._attn_implementation = implementation
        try:
            with torch.inference_mode():
                failure = _probe(model, asked)
        except Exception as error:  # noqa: BLE001 - whatever went wrong, the tower as transformers made it stays
            if isinstance(error, _DEVICE_FAILURES) or str(error).startswith("CUDA error"):
                raise  # the device itself failed (older torch says so only in the message): no fallback serves
            log.warning("the probe of the vision tower under %s raised", implementation, exc_info=True)
            failure = "the probe raised"
        if failure is None:
            _PROBED.add(visual)
            return
        log.warning("the vision tower under %s does not take the inputs made on the host: %s", implementation, failure)
    log.warning("the vision tower derives its inputs on the device (slower)")


def _probe(model, asked: str) -> str | None:
    """Why the tower does not take `_tower_inputs` in place of its own derivations and give the
    features of transformers' `asked` implementation on two small images; None if it does."""
    visual = model.model.visual
    merge = visual.spatial_merge_size
    grid = torch.tensor([[1, 2 * merge, 2 * merge], [1, 2 * merge, 4 * merge]])
    patch = visual.patch_embed.proj.weight[0].numel()
    generator = torch.Generator().manual_seed(0)
    pixels = torch.randn(int(grid.prod(-1).sum()), patch, generator=generator).to(visual.device, visual.dtype)
    made = {name: value.to(visual.device) if isinstance(value, torch.Tensor) else value  # where `decoder_inputs`
            for name, value in _tower_inputs(visual, grid).items()}                     # puts them
    seen: dict = {}
    hook = visual.blocks[0].register_forward_pre_hook(lambda module, args, kwargs: seen.update(kwargs),
                                                      with_kwargs=True)
    try:
        taken = model.model.get_image_features(pixels, grid, **made)
    finally:
        hook.remove()
    if seen.get("cu_seqlens") is not made["image_cu_seqlens"] or seen.get("max_seqlen") != made["image_max_seqlen"]:
        return "it derived the images' boundaries itself"
    if passed_on := [name for name in _MADE_FOR_THE_TOWER if name in seen]:
        return f"it passed {passed_on} on to its layers instead of taking them"
    ours = visual.config._attn_implementation
    visual.config._attn_implementation = asked
    try:
        own = model.model.get_image_features(pixels, grid.to(visual.device))
    finally:
        visual.config._attn_implementation = ours
    for mine, theirs in zip(features(taken), features(own), strict=True):
        error = float((mine.float() - theirs.float()).abs().max() / theirs.float().abs().max().clamp(min=1e-6))
        if not error < FEATURE_TOLERANCE:
            return f"its features differ from its own by {error:.1%}"
    return None


def features(output) -> list[torch.Tensor]:
    """Every image's features and deepstack features in the output of `get_image_features`."""
    return [*output.pooler_output, *[image for layer in output.deepstack_features for image in layer]]


def _tower_inputs(visual, grid: torch.Tensor) -> dict:
    """What the tower would derive from `grid` (on the host), named as `get_image_features` takes
    it: it strips the prefix `image_`, and the tower pops each by its name."""
    indices, weights = vision_utils.get_vision_interpolation_indices_and_weights(
        grid, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
        align_corners=visual.interpolation_align_corners, spatial_merge_size=visual.spatial_merge_size)
    bounds = vision_utils.get_vision_cu_seqlens(grid)
    lengths = (bounds[1:] - bounds[:-1]).tolist()
    return {"image_interp_indices": indices, "image_interp_weights": weights,
            "image_position_ids": vision_utils.get_vision_position_ids(grid, visual.spatial_merge_size),
            "image_cu_seqlens": bounds, "image_max_seqlen": max(lengths), "image_lengths": lengths}


def host_inputs(model, inputs) -> dict:
    """Keyword arguments for `model.model`'s forward over `inputs` (tensors on the host), made on the
    host: the multimodal rotary positions, and where the tower passed the probe its inputs from the
    grid. None for a batch without images: the forward numbers text from its attention mask."""
    grid = inputs.get("image_grid_thw")
    if grid is None:
        return {}
    marks = {"mm_token_type_ids": inputs["mm_token_type_ids"]} if "mm_token_type_ids" in inputs else {}
    positions, _ = model.model.get_rope_index(inputs["input_ids"], image_grid_thw=grid, video_grid_thw=None,
                                              attention_mask=inputs["attention_mask"], **marks)
    made = {"position_ids": positions}
    if model.model.visual in _PROBED:
        made.update(_tower_inputs(model.model.visual, grid))
    return made

