"""The model: loading a Qwen3-VL checkpoint and generating for a batch of requests.

Owns everything that touches torch and transformers. Requests in one batch share their
generation parameters (the service groups them); prompts are left-padded so every row's new
tokens start at the same column. Two ways to generate: `generate` from transformers with its
dynamic cache (the reference, and the default on CPU), or the static KV pool and CUDA graphs of
`kv_pool.py`. A batch too large for the pool is split in halves. (The default on CUDA is neither:
`continuous.py` runs this engine's model step by step.)
A row's text ends before its first stop string (`stop_strings.py`); the row itself may run on to
the batch's end. Seeded sampling picks tokens with `kv_pool.choose_tokens` on both ways, so a
seed gives the same text whichever way generates it and whatever the batch.

`prepare` turns one request into a `Prompt` and refuses it with `BadRequest`, naming the numbers,
when its tokens exceed the per-request cap or the KV pool: image tokens are counted from image
sizes before the image processor runs, and each frame is processed once however often it is
referenced.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from PIL import Image
from qvl.protocol.contract import ModelOptions, WorkerSpec
from qvl.protocol.errors import BadRequest, InternalError
from qvl.protocol.messages import LENGTH, STOPPED, GenerationParams
from transformers import AutoModelForImageTextToText, AutoProcessor, BatchFeature
from transformers.generation.logits_process import LogitsProcessor, LogitsProcessorList
from transformers.generation.stopping_criteria import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from .image_tokens import ImageTokens
from .kv_pool import STOP_CHECK_EVERY, DecodeStep, KVPool, Progress, choose_tokens
from .prompts import PromptTokenizer
from .vision import prepare_vision
from .stop_strings import cut_at_stop, find_stop, streamable


@dataclass(frozen=True)
class Prompt:
    """One request made ready for the model: its prompt token ids, image placeholders expanded, and
    the pixels of each image reference in prompt order (a frame referenced twice appears twice)."""

    ids: list[int]
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None  # (t, h, w) patches per image reference

    @property
    def images(self) -> int:
        return 0 if self.image_grid_thw is None else len(self.image_grid_thw)


@dataclass(frozen=True)
class ImageInputs:
    """A request's images made ready on the image pool: tokens and pixels per image reference."""

    tokens: tuple[int, ...] = ()
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None


NO_IMAGES = ImageInputs()


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    prefill_ms: float
    decode_ms: float
    finish_reason: str = STOPPED  # STOPPED: the row ended on a stop token; LENGTH: at max_new_tokens
    engine_timings: dict = field(default_factory=dict)  # an engine's own account, sent in the reply's timings


@dataclass(frozen=True)
class StepOutput:
    """What one step of an engine that schedules every step gave one request: its new tokens and
    their text, and its completion once it has ended, or the error that ended it alone."""

    key: int
    text: str
    tokens: int
    completion: Completion | None = None
    error: Exception | None = None


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

    steps = False  # the worker runs this engine batch by batch

    def __init__(self, options: ModelOptions, max_prompt_tokens: int = WorkerSpec.max_prompt_tokens):
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
        prepare_vision(self.model)
        tokenizer = self.processor.tokenizer
        self.eos_ids = set(_as_list(self.model.generation_config.eos_token_id)) | {tokenizer.eos_token_id}
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        mode = options.kv_cache_mode
        compiled = mode == "continuous" and options.compile_decode and self.device.type == "cuda"
        self.decode = DecodeStep(self.model, compiled) if mode in ("static", "continuous") else None
        self.kv_pool = KVPool(self.decode, options.kv_cache_tokens, self.eos_ids, self.pad_id) \
            if mode == "static" else None
        self.max_prompt_tokens = max_prompt_tokens
        self.prompt_tokenizer = PromptTokenizer(self.processor)
        self.image_tokens = ImageTokens.of(self.processor.image_processor)
        self.image_token_id = self.processor.image_token_id
        # transformers 5 computes multimodal RoPE from these; earlier releases take no such input
        self.marks_image_tokens = "mm_token_type_ids" in self.processor.model_input_names

    def _dtype(self) -> torch.dtype:
        if self.options.dtype == "auto":
            return torch.bfloat16 if self.device.type == "cuda" else torch.float32
        return getattr(torch, self.options.dtype)

    def warm_up(self) -> None:
        """One small request, so the first real one does not pay for lazy initialisation."""
        image = Image.new("RGB", (64, 64), (127, 127, 127))
        messages = [{"role": "user", "content": [{"type": "image", "frame": 0}, {"type": "text", "text": "hi"}]}]
        params = GenerationParams(max_new_tokens=2)
        self.generate([self.prepare(messages, [image], params)], params)

    def process_images(self, messages: list, frames: Sequence[Image.Image], params: GenerationParams) -> ImageInputs:
        """The pixels of a request's image references, `frames` being its opened images. Thread-safe:
        runs on the worker's image pool while the model works. Image tokens are counted from width
        and height and checked first, so no pixel of a request too long is ever processed."""
        tokens = self.check_images(messages, [image.size for image in frames], params)
        if not tokens:
            return NO_IMAGES
        references = [part["frame"] for m in messages for part in m["content"] if part["type"] == "image"]
        per_frame = [self.image_tokens.count(*image.size) for image in frames]
        pixels = self.processor.image_processor(images=list(frames), return_tensors="pt")
        grids = pixels["image_grid_thw"]
        patches = grids.prod(dim=1)
        if (patches // self.image_tokens.merge_size ** 2).tolist() != per_frame:
            raise InternalError(f"image token counts {per_frame} differ from the processor's grids {grids.tolist()}")
        # in the model's dtype here, on the pool: the tower converts them anyway, and half the bytes cross to the device
        frame_pixels = pixels["pixel_values"].to(self.model.dtype).split(patches.tolist())
        return ImageInputs(tokens, torch.cat([frame_pixels[f] for f in references]), grids[references])

    def check_images(self, messages: list, sizes: list[tuple[int, int]], params: GenerationParams) -> tuple[int, ...]:
        """The tokens of each image reference, from the frames' (width, height) alone; `BadRequest`
        where they cannot fit. The worker calls it before it decodes a pixel."""
        tokens = self.image_tokens.per_reference(messages, sizes)
        self._check_length(sum(tokens), "image tokens", params)
        return tokens

    def prepare(self, messages: list, frames: Sequence[Image.Image], params: GenerationParams) -> Prompt:
        """The prompt of a request whose image parts are `{"type": "image", "frame": i}` into `frames`."""
        return self.prompt(messages, self.process_images(messages, frames, params), params)

    def prompt(self, messages: list, images: ImageInputs, params: GenerationParams) -> Prompt:
        """The prompt of a request with the pixels `process_images` made of its images. On the main
        thread only: the tokenizer is not thread-safe."""
        ids = self.prompt_tokenizer.ids(messages, list(images.tokens))
        self._check_length(len(ids), "prompt tokens", params)
        return Prompt(ids, images.pixel_values, images.image_grid_thw)

    def _check_length(self, tokens: int, what: str, params: GenerationParams) -> None:
        if tokens > self.max_prompt_tokens:
            raise BadRequest(f"{tokens} {what} exceed the limit of {self.max_prompt_tokens} prompt tokens")
        if self.kv_pool is not None and not self.kv_pool.fits(1, tokens, params.max_new_tokens):
            raise BadRequest(f"{tokens} {what} plus max_new_tokens {params.max_new_tokens} do not fit "
                             f"the KV cache of {self.options.kv_cache_tokens} tokens")

    def sub_batches(self, prompts: list[Prompt], params: GenerationParams) -> list[slice]:
        """`prompts` in runs, in order, each one `generate` call: a batch whose rows times its
        longest prompt exceed `prefill_tokens` (the prefill's memory grows with both), or that does
        not fit the KV pool, is halved, and its halves likewise."""
        def runs(start: int, stop: int) -> list[slice]:
            rows, length = stop - start, max(len(p.ids) for p in prompts[start:stop])
            too_large = rows * length > self.options.prefill_tokens or \
                (self.kv_pool is not None and not self.kv_pool.fits(rows, length, params.max_new_tokens))
            if rows > 1 and too_large:
                return runs(start, start + rows // 2) + runs(start + rows // 2, stop)
            return [slice(start, stop)]
        return runs(0, len(prompts)) if prompts else []

    def generate(self, prompts: list[Prompt], params: GenerationParams,
                 progress: Progress | None = None) -> list[Completion]:
        """A completion per prompt, in order, in one batch (`sub_batches` says which fit one).
        `progress`, if given, gets every row's new tokens every few steps (streaming)."""
        inputs = self.inputs(prompts)
        if self.kv_pool is None:
            tokens, prefill_ms, decode_ms = self._generate(inputs.to(self.device), params, progress)
        else:
            generated = self.kv_pool.generate(inputs.to(self.device), [p.images for p in prompts], params, progress,
                                              self._stopped(params))
            tokens, prefill_ms, decode_ms = generated.tokens, generated.prefill_ms, generated.decode_ms
        return [self.completion(self.until_eos(row), len(p.ids), params.stop, prefill_ms, decode_ms)
                for row, p in zip(tokens, prompts)]

    def completion(self, row: list[int], prompt_tokens: int, stops: tuple[str, ...],
                    prefill_ms: float, decode_ms: float) -> Completion:
        """A row's answer: its text before the first stop string, and the tokens it took to reach
        that string's end (a row keeps computing after it; what follows is not the answer's)."""
        text = self.text_of(row)
        if find_stop(text, stops) is None:
            return Completion(text, prompt_tokens, len(row), prefill_ms, decode_ms,
                              STOPPED if row and row[-1] in self.eos_ids else LENGTH)
        low, high = 1, len(row)  # the fewest tokens whose text holds a stop string
        while low < high:
            middle = (low + high) // 2
            if find_stop(self.text_of(row[:middle]), stops) is None:
                low = middle + 1
            else:
                high = middle
        return Completion(cut_at_stop(text, stops), prompt_tokens, high, prefill_ms, decode_ms, STOPPED)

    def detokenize(self, row: list[int], stops: tuple[str, ...] = ()) -> str:
        """The text of a row of new tokens so far that may be streamed: up to and without its stop
        token, before its first stop string, and short of a tail that could begin one."""
        return streamable(self.text_of(self.until_eos(row)), stops)

    def text_of(self, row: Sequence[int]) -> str:
        """The text of tokens, special tokens left out."""
        return self.processor.tokenizer.decode(row, skip_special_tokens=True)

    def inputs(self, prompts: list[Prompt], pad_left: bool = True) -> BatchFeature:
        """The model's inputs for `prompts`: ids padded to the longest (on the left, as `generate`
        takes them, or on the right), images in row order."""
        width = max(len(p.ids) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            columns = slice(width - len(p.ids), None) if pad_left else slice(0, len(p.ids))
            ids[row, columns] = torch.tensor(p.ids, dtype=torch.long)
            mask[row, columns] = 1
        inputs = {"input_ids": ids, "attention_mask": mask}
        if self.marks_image_tokens:
            inputs["mm_token_type_ids"] = (ids == self.image_token_id).long()
        with_images = [p for p in prompts if p.images]
        if with_images:
            inputs["pixel_values"] = torch.cat([p.pixel_values for p in with_images])
            inputs["image_grid_thw"] = torch.cat([p.image_grid_thw for p in with_images])
        return BatchFeature(inputs)

    @torch.inference_mode()
    def _generate(self, inputs, params: GenerationParams,
                  progress: Progress | None) -> tuple[list[list[int]], float, float]:
        """transformers' `generate`: new tokens per row, prefill and decode milliseconds."""
        clock = _Steps(progress)
        started = time.perf_counter()
        stopped = self._stopped(params)
        criteria = {} if stopped is None else {
            "stopping_criteria": StoppingCriteriaList([_StopStrings(stopped, inputs["input_ids"].shape[1])])}
        output = self.model.generate(**inputs, **_sampling_kwargs(params), pad_token_id=self.pad_id,
                                     streamer=clock, **criteria)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        ended = time.perf_counter()
        first = clock.first_step_at or ended
        prompt_len = inputs["input_ids"].shape[1]
        return output[:, prompt_len:].tolist(), (first - started) * 1000.0, (ended - first) * 1000.0

    def _stopped(self, params: GenerationParams) -> Callable[[list[list[int]]], list[bool]] | None:
        """Which rows of new tokens hold one of the request's stop strings (such a row's answer has
        ended, so it need not run on to `max_new_tokens`); None without stop strings. Called every
        `STOP_CHECK_EVERY` steps, it reads only the tokens where a stop string could newly end: the
        last few and enough before them for the longest stop (a character is at most 4 byte
        tokens), so a check costs the same at any length. One it misses would only run its row on:
        the answer is cut at its stop string all the same."""
        if not params.stop:
            return None
        window = STOP_CHECK_EVERY + 4 * max(len(stop) for stop in params.stop)
        return lambda rows: [find_stop(self.text_of(self.until_eos(row)[-window:]), params.stop) is not None
                             for row in rows]

    def until_eos(self, row: list[int]) -> list[int]:
        for i, token in enumerate(row):
            if token in self.eos_ids:
                return row[:i + 1]
        return row


class _StopStrings(StoppingCriteria):
    """Ends `generate`'s rows whose text holds a stop string, checked every few steps."""

    def __init__(self, stopped: Callable[[list[list[int]]], list[bool]], prompt_len: int):
        self.stopped, self.prompt_len, self.calls = stopped, prompt_len, 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        self.calls += 1
        if self.calls % STOP_CHECK_EVERY:
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        ended = self.stopped(input_ids[:, self.prompt_len:].tolist())
        return torch.tensor(ended, dtype=torch.bool, device=input_ids.device)


class _SeededChoice(LogitsProcessor):
    """Sampling with a request's seed inside `generate`: picks each row's token with `choose_tokens`
    from a generator seeded once per batch, and leaves only that token possible, so that `generate`
    (run greedy) takes it. The tokens are then those the KV pool's loop picks for the same logits."""

    def __init__(self, params: GenerationParams):
        self.params = params
        self.generator: torch.Generator | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.generator is None:
            self.generator = torch.Generator(scores.device).manual_seed(self.params.seed)
        chosen = choose_tokens(scores, self.params, self.generator)
        only = torch.full_like(scores, float("-inf"))
        return only.scatter_(1, chosen[:, None], 0.0)


def _sampling_kwargs(params: GenerationParams) -> dict:
    """`generate`'s arguments for `params`. Greedy decoding and unseeded sampling are transformers'
    own; seeded sampling is `_SeededChoice`, whose generator is new for every call (every batch)."""
    kwargs = {"max_new_tokens": params.max_new_tokens, "min_new_tokens": params.min_new_tokens}
    if params.temperature > 0 and params.seed is not None:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None,
                      logits_processor=LogitsProcessorList([_SeededChoice(params)]))
    elif params.temperature > 0:
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

    steps = False

    def __init__(self, options: ModelOptions, max_prompt_tokens: int):
        self.options = options
        self.device = torch.device("cpu")

    def warm_up(self) -> None:
        pass

    def process_images(self, messages: list, frames: Sequence[Image.Image], params: GenerationParams) -> ImageInputs:
        return NO_IMAGES

    def check_images(self, messages: list, sizes: list[tuple[int, int]], params: GenerationParams) -> tuple[int, ...]:
        return ()

    def prompt(self, messages: list, images: ImageInputs, params: GenerationParams) -> Prompt:
        return Prompt([])

    def sub_batches(self, prompts: list[Prompt], params: GenerationParams) -> list[slice]:
        return [slice(0, len(prompts))] if prompts else []

    def generate(self, prompts: list[Prompt], params: GenerationParams,
                 progress: Progress | None = None) -> list[Completion]:
        return [Completion("", 0, 0, 0.0, 0.0) for _ in prompts]


def image_threads(options: ModelOptions) -> int:
    """Threads of the worker's image pool: two (one decodes while the other processes), or one for
    each of the vLLM engine's render processes, so that all of them render at once."""
    return max(2, options.vllm_render_processes) if options.engine == "vllm" else 2


def load_engine(spec: WorkerSpec):
    """The engine `spec` names: `Engine` (run-to-completion batches), `ContinuousEngine` around it
    (`kv_cache = "continuous"`, or auto on CUDA), `NoopEngine`, or `VllmEngine` (vLLM imported only then)."""
    if spec.model.engine == "vllm":
        from .vllm_engine import VllmEngine
        return VllmEngine(spec.model, spec.max_prompt_tokens, spec.limits.max_images)
    if spec.model.engine == "hf" and spec.model.kv_cache_mode == "continuous":
        from .continuous import ContinuousEngine
        return ContinuousEngine(Engine(spec.model, spec.max_prompt_tokens), spec.max_batch_size)
    return (NoopEngine if spec.model.engine == "noop" else Engine)(spec.model, spec.max_prompt_tokens)
