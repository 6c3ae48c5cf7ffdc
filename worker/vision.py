"""What the model's forward would read back from the device, made on the host instead, and the
vision tower's attention with the images' lengths from the host.

transformers' Qwen3-VL forward derives, from the images' grid and the prompts' ids, the vision
tower's position-embedding interpolation, its rotary positions and the images' boundaries, and the
text's multimodal rotary positions. With the grid and the ids on the device, each derivation reads
values back (`tolist`, `repeat_interleave` by counts, boolean indexing), and under SDPA every
vision layer attends image by image after reading the boundaries again: 159 waits for the device
in one add of four prompts (three images) on an H200. At each the device idles while the host
launches what follows.

- `host_inputs(model, inputs)`: those values made from `inputs` on the host with transformers' own
  functions, passed to the forward, which takes them instead of deriving them; the grid stays on
  the host, where the forward only reads its sizes.
- `attend_image_by_image(model)`: the vision tower attends image by image as under SDPA, but with
  the images' lengths from the host (`IMAGE_BY_IMAGE`, registered as an attention implementation of
  transformers). Flash attention over all images at once would need no lengths, but torch's kernel
  for the tower's 64-wide heads took 9.2 ms an add where SDPA (cuDNN's) took 6.2 ms (H200).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

try:  # transformers 5: the vision tower takes what `host_inputs` makes
    from transformers import vision_utils
except ImportError:  # earlier releases derive it all themselves
    vision_utils = None

IMAGE_BY_IMAGE = "qvl_sdpa_image_by_image_flash_interface"  # named *flash*: transformers then calls it
# with the images' boundaries instead of reading them back from the device first


def _attend_image_by_image(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                           cu_seq_lens_q=None, lengths=None, **kwargs):
    """transformers' attention interface, 1 x heads x tokens x dim in, 1 x tokens x heads x dim out:
    SDPA over each image's patches, as transformers' SDPA path attends, but `lengths` (the images'
    patches, from `host_inputs`) known on the host."""
    if lengths is None:  # the tower run without `host_inputs` (by `generate`): read them from the device
        lengths = (cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).tolist()
    splits = [x.split(lengths, dim=2) for x in (query, key, value)]
    attended = [F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling) for q, k, v in zip(*splits)]
    return torch.cat(attended, dim=2).transpose(1, 2), None


def attend_image_by_image(model) -> bool:
    """Have the vision tower of `model` attend by `IMAGE_BY_IMAGE` where it was to use SDPA (another
    implementation asked for is kept); whether it does."""
    visual = getattr(getattr(model, "model", None), "visual", None)
    if visual is None or vision_utils is None or visual.config._attn_implementation != "sdpa":
        return False
    AttentionInterface.register(IMAGE_BY_IMAGE, _attend_image_by_image)
    visual.config._attn_implementation = IMAGE_BY_IMAGE
    return True


def host_inputs(model, inputs) -> dict:
    """Keyword arguments for `model.model`'s forward over `inputs` (tensors on the host), made on the
    host: the multimodal rotary positions, and with transformers 5 the vision tower's inputs from the
    grid. None for a batch without images: the forward numbers text from its attention mask."""
    grid = inputs.get("image_grid_thw")
    if grid is None:
        return {}
    marks = {"mm_token_type_ids": inputs["mm_token_type_ids"]} if "mm_token_type_ids" in inputs else {}
    positions, _ = model.model.get_rope_index(inputs["input_ids"], image_grid_thw=grid, video_grid_thw=None,
                                              attention_mask=inputs["attention_mask"], **marks)
    made = {"position_ids": positions}
    if vision_utils is not None:
        visual = model.model.visual
        indices, weights = vision_utils.get_vision_interpolation_indices_and_weights(
            grid, num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
            align_corners=visual.interpolation_align_corners, spatial_merge_size=visual.spatial_merge_size)
        bounds = vision_utils.get_vision_cu_seqlens(grid)
        # `get_image_features` strips the prefix `image_` and the tower pops each by its name
        lengths = (bounds[1:] - bounds[:-1]).tolist()
        made.update(image_interp_indices=indices, image_interp_weights=weights,
                    image_position_ids=vision_utils.get_vision_position_ids(grid, visual.spatial_merge_size),
                    image_cu_seqlens=bounds, image_max_seqlen=max(lengths), image_lengths=lengths)
    return made
