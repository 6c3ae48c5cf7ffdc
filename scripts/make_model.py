#!/usr/bin/env python3
"""Write a Qwen3-VL model folder with random weights and a locally trained tokenizer.

No machine of the project reaches a model hub, so tests, the demo and the GPU benchmarks load
folders made here. They load through exactly the code that loads the real checkpoint
(`AutoProcessor` and `AutoModelForImageTextToText`). Presets:

- `tiny`: a few MB, seconds on CPU; for tests and the demo.
- `qwen3-vl-4b`: the architecture of Qwen3-VL-4B-Instruct (4.44 B parameters); for GPU work.

Random weights do not stop on EOS: benchmarks fix the output length.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen3-VL's chat template, reduced to what the worker sends: roles, text, images, videos.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' or 'image' in content -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif content['type'] == 'video' or 'video' in content -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in content -%}{{- content['text'] -}}"
    "{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

PRESETS = {
    "tiny": {
        "tokenizer_vocab": 1024,
        "vocab_size": None,  # the tokenizer's own size
        # initializer_range 0.2 (the real one is 0.02) so that greedy decoding varies with the
        # input: tests that compare answers could not fail on a constant output.
        "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                     max_position_embeddings=4096, initializer_range=0.2,
                     rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                                      "mrope_section": [2, 3, 3], "mrope_interleaved": True}),
        "vision": dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                       out_hidden_size=64, patch_size=16, spatial_merge_size=2,
                       temporal_patch_size=2, num_position_embeddings=64,
                       deepstack_visual_indexes=[0], initializer_range=0.2),
        "tie_word_embeddings": True,
        # Images are resized to at most 8x8 merged patches (64 image tokens) to keep CPU work small.
        "image_pixels": (32 * 32 * 4, 32 * 32 * 64),
        "dtype": "float32",
    },
    "qwen3-vl-4b": {
        "tokenizer_vocab": 8192,
        "vocab_size": 151936,
        "text": dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     max_position_embeddings=262144,
                     rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                                      "mrope_section": [24, 20, 20], "mrope_interleaved": True}),
        "vision": dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16,
                       out_hidden_size=2560, patch_size=16, spatial_merge_size=2,
                       temporal_patch_size=2, num_position_embeddings=2304,
                       deepstack_visual_indexes=[5, 11, 17]),
        "tie_word_embeddings": True,
        "image_pixels": (32 * 32 * 4, 32 * 32 * 16384),
        "dtype": "bfloat16",
    },
}

_WORDS = (
    "the a an image picture photo shows what is this there cat dog red green blue small large "
    "person car tree sky house road water table cup book window door light dark left right top "
    "bottom center number text color shape describe answer question yes no one two three many "
    "inside outside near far on in under over with without and or but because which where who"
).split()


def _corpus(lines: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
        out.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ","]) + " 0123456789")
    return out


def build_tokenizer(vocab: int):
    """A byte-level BPE tokenizer that carries Qwen's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(_corpus(4000), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:], padding_side="left",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_processor(tokenizer, image_pixels: tuple[int, int]):
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    lo, hi = image_pixels
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": lo, "longest_edge": hi}, patch_size=16, merge_size=2,
        temporal_patch_size=2, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    video_processor = Qwen3VLVideoProcessor(patch_size=16, merge_size=2, temporal_patch_size=2)
    return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                            video_processor=video_processor, chat_template=CHAT_TEMPLATE)


def build_config(preset: dict, tokenizer):
    from transformers import Qwen3VLConfig

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(preset["text"], vocab_size=preset["vocab_size"] or len(tokenizer),
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=preset["tie_word_embeddings"])
    return Qwen3VLConfig(
        text_config=text, vision_config=dict(preset["vision"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=preset["tie_word_embeddings"],
    )


def make_model(preset_name: str, out: Path, device: str = "cpu", seed: int = 0) -> Path:
    import torch
    import transformers
    from transformers import AutoModelForImageTextToText, GenerationConfig

    transformers.utils.logging.disable_progress_bar()
    preset = PRESETS[preset_name]
    torch.manual_seed(seed)
    tokenizer = build_tokenizer(preset["tokenizer_vocab"])
    processor = build_processor(tokenizer, preset["image_pixels"])
    config = build_config(preset, tokenizer)
    dtype = getattr(torch, preset["dtype"])
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=config.text_config.bos_token_id, eos_token_id=config.text_config.eos_token_id,
        pad_token_id=config.text_config.pad_token_id, do_sample=False,
    )
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    (out / "qvl_model.json").write_text(json.dumps({"preset": preset_name, "parameters": params}))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--out", type=Path, required=True, help="folder to write")
    ap.add_argument("--device", default="cpu", help="where to build the weights (cuda is faster for 4B)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    t0 = time.monotonic()
    make_model(args.preset, args.out, args.device, args.seed)
    info = json.loads((args.out / "qvl_model.json").read_text())
    print(f"wrote {args.out} preset={args.preset} parameters={info['parameters']:,} "
          f"in {time.monotonic() - t0:.1f}s")


if __name__ == "__main__":
    main()
