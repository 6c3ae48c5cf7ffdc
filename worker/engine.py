"""The model: loading a Qwen3-VL checkpoint and generating for a batch of requests.

Owns everything that touches torch and transformers. Requests in one batch share their
generation parameters (the service groups them); prompts are left-padded so every row's new
tokens start at the same column. Two ways to decode: `generate` from transformers with its
dynamic cache (the reference, and the default on CPU), or the static KV pool and CUDA graphs of
`decoding.py` (the default on CUDA). A batch too large for the pool is split in halves.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.generation.streamers import BaseStreamer

from qvl.protocol.contract import ModelOptions
from qvl.protocol.errors import BadRequest
from qvl.protocol.messages import GenerationParams

from .decoding import STOP_CHECK_EVERY, Decoder, Progress


@dataclass(frozen=True)
class Prompt:
    """One request made ready for the model: chat messages in processor form and their images."""

    messages: list
    images: list[Image.Image]


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    prefill_ms: float
    decode_ms: float


def prompt_from_request(messages: list, images: list[Image.Image]) -> Prompt:
    """Processor-form messages: image parts lose their frame index, images follow text order."""
    ordered = []
    chat = []
    for message in messages:
        parts = []
        for part in message["content"]:
            if part["type"] == "image":
                ordered.append(images[part["frame"]])
                parts.append({"type": "image"})
            else:
                parts.append(part)
        chat.append({"role": message["role"], "content": parts})
    return Prompt(chat, ordered)


class _Steps(BaseStreamer):
    """Watches `generate`'s tokens: when the first one came, and every few steps the rows so far."""

    def __init__(self, progress: Progress | None) -> None:
        self.progress = progress
        self.first_step_at: float | None = None
        self.steps: list[torch.Tensor] = []  # each step's new token per row, left where it is
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        if self.first_step_at is None:
            self.first_step_at = time.perf_counter()
        if self.progress is None:
            return
        self.steps.append(value.view(-1, 1))
        if len(self.steps) % STOP_CHECK_EVERY == 0:
            self.progress(lambda: torch.cat(self.steps, dim=1).tolist())

    def end(self) -> None:
        pass


class Engine:
    """A loaded processor and model on one device."""

    def __init__(self, options: ModelOptions):
        self.options = options
        self.device = torch.device(options.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            if options.memory_fraction:
                torch.cuda.set_per_process_memory_fraction(options.memory_fraction, self.device)
        self.processor = AutoProcessor.from_pretrained(options.model)
        self.processor.tokenizer.padding_side = "left"
        self.model = AutoModelForImageTextToText.from_pretrained(
            options.model, dtype=self._dtype(), attn_implementation=options.attn_implementation,
        ).to(self.device).eval()
        tokenizer = self.processor.tokenizer
        self.eos_ids = set(_as_list(self.model.generation_config.eos_token_id)) | {tokenizer.eos_token_id}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        static = options.kv_cache == "static" or (options.kv_cache == "auto" and self.device.type == "cuda")
        self.decoder = Decoder(self.model, options.kv_cache_tokens, self.eos_ids, self.pad_id) if static else None

    def _dtype(self) -> torch.dtype:
        if self.options.dtype == "auto":
            return torch.bfloat16 if self.device.type == "cuda" else torch.float32
        return getattr(torch, self.options.dtype)

    def warm_up(self) -> None:
        """One small request, so the first real one does not pay for lazy initialisation."""
        image = Image.new("RGB", (64, 64), (127, 127, 127))
        prompt = Prompt([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}],
                        [image])
        self.generate([prompt], GenerationParams(max_new_tokens=2))

    def generate(self, prompts: list[Prompt], params: GenerationParams,
                 progress: Progress | None = None) -> list[Completion]:
        """A completion per prompt, in order. `progress`, if given, gets every row's new tokens
        every few steps (streaming); rows are numbered within `prompts`."""
        inputs = self._inputs(prompts)
        n, length = inputs["input_ids"].shape
        if self.decoder is None:
            tokens, prefill_ms, decode_ms = self._generate(inputs.to(self.device), params, progress)
        elif self.decoder.fits(n, length, params.max_new_tokens):
            decoded = self.decoder.decode(inputs.to(self.device), [len(p.images) for p in prompts], params,
                                          progress)
            tokens, prefill_ms, decode_ms = decoded.tokens, decoded.prefill_ms, decoded.decode_ms
        elif n > 1:
            half = n // 2
            later = None if progress is None else lambda rows: progress(lambda: [[]] * half + rows())
            return self.generate(prompts[:half], params, progress) + self.generate(prompts[half:], params, later)
        else:
            raise BadRequest(f"{length} prompt tokens plus max_new_tokens {params.max_new_tokens} do not fit "
                             f"the KV cache of {self.options.kv_cache_tokens} tokens")
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        kept = [self._until_eos(row) for row in tokens]
        return [Completion(self._text(row), int(n_prompt), len(row), prefill_ms, decode_ms)
                for row, n_prompt in zip(kept, prompt_tokens)]

    def detokenize(self, row: list[int]) -> str:
        """The text of a row of new tokens, up to and without its stop token."""
        return self._text(self._until_eos(row))

    def _text(self, row: list[int]) -> str:
        return self.processor.tokenizer.decode(row, skip_special_tokens=True)

    def _inputs(self, prompts: list[Prompt]):
        texts = [self.processor.apply_chat_template(p.messages, tokenize=False, add_generation_prompt=True)
                 for p in prompts]
        images = [image for p in prompts for image in p.images] or None
        return self.processor(text=texts, images=images, padding=True, return_tensors="pt")

    @torch.inference_mode()
    def _generate(self, inputs, params: GenerationParams,
                  progress: Progress | None) -> tuple[list[list[int]], float, float]:
        """transformers' `generate`: new tokens per row, prefill and decode milliseconds."""
        clock = _Steps(progress)
        started = time.perf_counter()
        output = self.model.generate(**inputs, **_sampling_kwargs(params), pad_token_id=self.pad_id,
                                     streamer=clock)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        ended = time.perf_counter()
        first = clock.first_step_at or ended
        prompt_len = inputs["input_ids"].shape[1]
        return output[:, prompt_len:].tolist(), (first - started) * 1000.0, (ended - first) * 1000.0

    def _until_eos(self, row: list[int]) -> list[int]:
        for i, token in enumerate(row):
            if token in self.eos_ids:
                return row[:i + 1]
        return row


def _sampling_kwargs(params: GenerationParams) -> dict:
    kwargs = {"max_new_tokens": params.max_new_tokens, "min_new_tokens": params.min_new_tokens}
    if params.temperature > 0:
        kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p,
                      top_k=params.top_k or None)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    return kwargs


def _as_list(x: object) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


class NoopEngine:
    """Answers every prompt with an empty completion at once; loads nothing.

    For benchmarks of the supervisor path (`scripts/bench_router.py`), never for serving.
    """

    def __init__(self, options: ModelOptions):
        self.options = options
        self.device = torch.device("cpu")

    def warm_up(self) -> None:
        pass

    def generate(self, prompts: list[Prompt], params: GenerationParams,
                 progress: Progress | None = None) -> list[Completion]:
        return [Completion("", 0, 0, 0.0, 0.0) for _ in prompts]


def load_engine(options: ModelOptions) -> Engine | NoopEngine:
    return NoopEngine(options) if options.engine == "noop" else Engine(options)
