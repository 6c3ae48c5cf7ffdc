"""A request's input for vLLM's engine: qvl's prompt tokens, then vLLM's renderer.

`VllmInputs` tokenizes what users wrote as plain text (special tokens cannot open a turn,
`PromptTokenizer`) with one image placeholder per image, which vLLM's multimodal processor expands
as it processes the images' pixels (`render_cmpl`), and checks the lengths. The vLLM worker runs it
in its render processes (`render_processes.py`, built there by `of_config`), or itself under a lock
when it has none: neither the tokenizer nor vLLM's input processing is made for concurrent use.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from PIL import Image
from qvl.protocol.errors import BadRequest
from qvl.protocol.messages import GenerationParams
from transformers import AutoProcessor
from vllm.renderers import renderer_from_config
from vllm.renderers.inputs.preprocess import parse_model_prompt

from .prompts import PromptTokenizer


@dataclass(frozen=True)
class Rendered:
    """A request made ready for vLLM: its engine input, its prompt length, and the time making them
    took (qvl's prompt tokens, then vLLM's input processing: its images' pixels, mostly)."""

    engine_input: dict
    prompt_tokens: int
    render_ms: float


class VllmInputs:
    def __init__(self, processor, model_config, renderer, max_prompt_tokens: int, max_model_len: int):
        self.prompt_tokenizer = PromptTokenizer(processor)
        self.model_config = model_config
        self.renderer = renderer
        self.max_prompt_tokens = max_prompt_tokens
        self.max_model_len = max_model_len

    @classmethod
    def of_config(cls, model: str, vllm_config, max_prompt_tokens: int, max_model_len: int) -> "VllmInputs":
        """One with a renderer of its own, built from the engine's config (no device): a render process's."""
        return cls(AutoProcessor.from_pretrained(model), vllm_config.model_config, renderer_from_config(vllm_config),
                   max_prompt_tokens, max_model_len)

    def render(self, messages: list, images: list[Image.Image], image_tokens: int, params: GenerationParams) -> Rendered:
        """The engine input of `messages` with `images` (their `image_tokens` counted already)."""
        started = time.monotonic()
        ids = self.prompt_tokenizer.ids(messages, [1] * len(images))  # vLLM expands each placeholder
        prompt_tokens = len(ids) - len(images) + image_tokens
        self.check_length(prompt_tokens, "prompt tokens", params)
        prompt = {"prompt_token_ids": ids}
        if images:
            prompt["multi_modal_data"] = {"image": images}
        parsed = parse_model_prompt(self.model_config, prompt)
        try:
            (engine_input,) = self.renderer.render_cmpl([parsed])
        except ValueError as exc:  # vLLM's own refusal of an input
            raise BadRequest(str(exc)) from None
        return Rendered(engine_input, len(engine_input.get("prompt_token_ids") or ()) or prompt_tokens,
                        (time.monotonic() - started) * 1000.0)

    def check_length(self, tokens: int, what: str, params: GenerationParams) -> None:
        if tokens > self.max_prompt_tokens:
            raise BadRequest(f"{tokens} {what} exceed the limit of {self.max_prompt_tokens} prompt tokens")
        if tokens + params.max_new_tokens > self.max_model_len:
            raise BadRequest(f"{tokens} {what} plus max_new_tokens {params.max_new_tokens} exceed "
                             f"vllm_max_model_len {self.max_model_len}")
