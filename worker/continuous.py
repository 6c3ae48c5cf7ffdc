"""Continuous batching for the transformers engine: requests join and leave a running batch.

The KV pool (`kv_cache_tokens`) is cut into `rows` slots of equal length. Requests join between
steps, each in the lowest free slot: the worker hands over, in one `add`, the requests ready, in
order, while each has a free row and their prompt tokens stay within `prefill_tokens` (a longer
prompt joins alone). Their prompts are prefilled in one forward: the model's own forward up to its
text decoder over them padded on the right (the vision tower, the image features put in place),
then the decoder's layers over them packed end to end, through the step's functions
(`packed_prefill.py`: one CUDA graph per bucket of tokens on CUDA), writing each row's keys and
values straight into its slot. Every step decodes one
token for every row of the lowest power-of-two bucket of slots (two at least) that holds all running rows, over
the shortest multiple of `LENGTH_BUCKET` that holds the longest row; each row writes at its own
position, with its own mask, rotary position and sampling parameters (temperature, top-k, top-p,
a seed, stop strings, min and max new tokens), so requests with different parameters share the
batch and greedy rows stay exactly greedy. A row leaves the step it ends (a stop token after its
minimum, its maximum, a stop string, an abort) and its slot is free at once. Each row's text is
made incrementally (`detokenizer.py`), so a step's work does not grow with the answers' length.

On CUDA each (rows, length) bucket's step is captured once as a CUDA graph over the slots' state
tensors and replayed; on CPU the same step runs eagerly (how it is tested against `generate`).
Every bucket of the prefill, and every bucket of rows at the shortest and the longest length, is
captured at warm-up (other lengths the first step that needs them); with `compile_decode` (on
CUDA, the default) the step's and the prefill's layer functions are compiled there
(`kv_pool.DecodeStep`), and a shape warm-up missed runs uncompiled.
A prompt longer than `prefill_tokens` joins alone and is prefilled in chunks of that many tokens,
one chunk per step before the running rows decode (`kv_pool.ChunkedPrefill`), so a 10 000-token
image prompt delays each step by one chunk instead of stalling every row for its whole prefill;
one such prompt is prefilled at a time, in a slot reserved for it.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
from qvl.protocol.errors import BadRequest
from qvl.protocol.messages import LENGTH, STOPPED, GenerationParams

from .detokenizer import Detokenizer
from .engine import NO_IMAGES, Completion, Engine, ImageInputs, Prompt, StepOutput
from .kv_pool import (LENGTH_BUCKET, ChunkedPrefill, cuda_graph, decoder_inputs, next_positions, next_power_of_two,
                      round_up, to_device)
from .packed_prefill import PackedPrefill

log = logging.getLogger("qvl.worker")


@dataclass
class _Row:
    key: int
    params: GenerationParams
    prompt_tokens: int
    length: int  # tokens in the slot's cache once the pending token is written
    added_at: float
    first_at: float
    text: Detokenizer
    tokens: list[int] = field(default_factory=list)
    generator: torch.Generator | None = None  # a seeded row's own draws


@dataclass
class _Chunked:
    """A prompt longer than a step's prefill budget, prefilled a chunk per step into its slot."""
    slot: int
    row: _Row
    inputs: object
    images: int
    prefill: ChunkedPrefill


class ContinuousEngine:
    steps = True  # the worker runs this engine step by step

    def __init__(self, engine: Engine, rows: int):
        self.engine = engine
        self.device = engine.device
        self.model = engine.model
        kv_heads, head_dim = engine.decode.kv_heads, engine.decode.head_dim
        self.slots = max(1, min(rows, engine.options.kv_cache_tokens // LENGTH_BUCKET))
        self.slot_length = engine.options.kv_cache_tokens // self.slots // LENGTH_BUCKET * LENGTH_BUCKET
        shape = (self.slots, kv_heads, self.slot_length, head_dim)
        self.kv = [(torch.zeros(shape, dtype=self.model.dtype, device=self.device),
                    torch.zeros(shape, dtype=self.model.dtype, device=self.device))
                   for _ in self.model.model.language_model.layers]
        # every slot's decode state; buckets are views of their first rows
        self.tokens = torch.zeros((self.slots, 1), dtype=torch.long, device=self.device)
        self.positions = torch.zeros((3, self.slots, 1), dtype=torch.long, device=self.device)
        self.write_at = torch.zeros(self.slots, dtype=torch.long, device=self.device)
        self.live = torch.zeros(self.slots, dtype=torch.long, device=self.device)  # 1 for a running row
        self.mask = torch.zeros((self.slots, 1, 1, self.slot_length), dtype=torch.bool, device=self.device)
        self.mask[:, 0, 0, 0] = True  # a free slot attends somewhere: its output is dropped
        self.row_index = torch.arange(self.slots, device=self.device)
        self.eos = torch.tensor(sorted(engine.eos_ids), device=self.device)
        self.rows: dict[int, _Row] = {}  # slot -> its request
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.graph_pool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None
        self.packed = PackedPrefill(engine, self.kv, self.slots, self.slot_length, self.graph_pool)
        self.prefill_forwards = 0  # model forwards that prefilled joining requests
        self.chunked: _Chunked | None = None  # the one long prompt being prefilled a chunk per step
        self.prefill_chunks = 0  # forwards that prefilled a chunk of a long prompt (not in prefill_forwards)
        self.prefill_tokens = engine.options.prefill_tokens  # the step's prefill budget

    @property
    def running(self) -> int:
        return len(self.rows) + (self.chunked is not None)

    def ready_to_step(self) -> bool:
        """Whether the worker should step now: whenever a row runs, as each step computes here."""
        return self.running > 0

    def has_room(self, joining: Sequence[Prompt], prompt: Prompt) -> bool:
        """Whether `prompt` may join at this step beside the prompts `joining`: a free row for it,
        and all of them within the step's prefill budget. A prompt over the budget joins alone, one
        at a time, and is prefilled in chunks."""
        if self.running + len(joining) >= self.slots:
            return False
        if len(prompt.ids) > self.prefill_tokens:
            return not joining and self.chunked is None
        return not joining or sum(len(p.ids) for p in joining) + len(prompt.ids) <= self.prefill_tokens

    def stats(self) -> dict:
        """Figures sent beside the allocator's in every heartbeat and reply."""
        return {"running_requests": self.running, "prefill_forwards": self.prefill_forwards,
                "prefill_chunks": self.prefill_chunks}

    def warm_up(self) -> None:
        """The model's warm-up, then the prefill's buckets captured (`capture_prefill`) and every
        bucket of rows too (`capture_buckets`). With `compile_decode`, the prefill and the step are compiled
        there; should either fail to compile, it runs uncompiled and the other stays compiled.
        After that a shape warm-up did not meet runs uncompiled too, and no request waits for a
        compile."""
        self.engine.warm_up()
        decode = self.engine.decode
        self._or_uncompiled("prefill", decode.prefill_compiled, self.capture_prefill)
        self._or_uncompiled("step", decode.step_compiled, self.capture_buckets)
        if decode.prefill_compiled or decode.step_compiled:
            torch.compiler.set_stance("eager_on_recompile")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the warm-up's blocks outside the graphs' pool: a fresh worker reads unfragmented

    def _or_uncompiled(self, part: str, compiled: bool, run) -> None:
        try:
            run()
        except Exception as exc:
            if not compiled:
                raise
            log.warning("event=compile_failed part=%s error=%s: it runs uncompiled", part, type(exc).__name__,
                        exc_info=True)
            self.engine.decode.uncompile(part)
            run()

    def capture_prefill(self) -> None:
        """The prefill's graph of every bucket of tokens captured on CUDA, its compiled functions
        traced elsewhere (`PackedPrefill.warm_up`). Only before any request joins: this writes into
        a free slot's cache."""
        if self.running:
            raise RuntimeError("the prefill is captured before any request joins")
        self.packed.warm_up()

    @torch.inference_mode()
    def capture_buckets(self) -> None:
        """A step of every row bucket (two rows to all slots) at the shortest and the longest
        length, with every slot free (nothing changes): each graph is captured, and the compiled
        step traced, here rather than at a request's step."""
        self.graphs.clear()
        rows = {min(1 << k, self.slots) for k in range(1, max(2, self.slots).bit_length() + 1)}
        for n in sorted(rows):
            for length in sorted({LENGTH_BUCKET, self.slot_length}):
                self._decode(n, length)

    def process_images(self, messages: list, frames, params: GenerationParams) -> ImageInputs:
        return self.engine.process_images(messages, frames, params)

    def check_images(self, messages: list, sizes: list[tuple[int, int]], params: GenerationParams) -> tuple[int, ...]:
        """The engine's check, and the image tokens with the new ones must fit a row: a request
        too long for one is refused before any pixel is processed."""
        tokens = self.engine.check_images(messages, sizes, params)
        if sum(tokens) + params.max_new_tokens > self.slot_length:
            raise BadRequest(f"{sum(tokens)} image tokens plus max_new_tokens {params.max_new_tokens} "
                             f"exceed a batch row of {self.slot_length} tokens")
        return tokens

    def prompt(self, messages: list, images: ImageInputs | object, params: GenerationParams) -> Prompt:
        """A request's prompt (`images` as `process_images` made them, or anything else for none),
        refused with `BadRequest` when it and its new tokens do not fit a row."""
        if params.max_new_tokens < 1:  # a row holds at least one new token: its last column is the prefill's padding's
            raise BadRequest("max_new_tokens must be at least 1")
        prompt = self.engine.prompt(messages, images if isinstance(images, ImageInputs) else NO_IMAGES, params)
        if len(prompt.ids) + params.max_new_tokens > self.slot_length:
            raise BadRequest(f"{len(prompt.ids)} prompt tokens plus max_new_tokens {params.max_new_tokens} "
                             f"exceed a batch row of {self.slot_length} tokens (kv_cache_tokens "
                             f"{self.engine.options.kv_cache_tokens} over {self.slots} rows)")
        return prompt

    @torch.inference_mode()
    def add(self, requests: Sequence[tuple[int, Prompt, GenerationParams]]) -> None:
        """Prefill (key, prompt, params) requests into the lowest free slots, in one forward; they
        decode from the next step on. All join, or none does: where the prefill fails, the slots
        taken so far are freed and the error raised."""
        free = [slot for slot in range(self.slots)
                if slot not in self.rows and (self.chunked is None or slot != self.chunked.slot)]
        if len(requests) > len(free):
            raise BadRequest("no free batch row")  # the worker adds no more than has_room allows
        if len(requests) == 1 and len(requests[0][1].ids) > self.prefill_tokens:
            self._start_chunked(*requests[0], free[0])
            return
        try:
            self._prefill(requests, free[:len(requests)])
        except BaseException:
            for slot in free[:len(requests)]:  # a prefill that failed while its rows took their slots
                if slot in self.rows:
                    self._free(slot)
            raise

    def _prefill(self, requests: Sequence[tuple[int, Prompt, GenerationParams]], slots: list[int]) -> None:
        """One prefill of every prompt (`PackedPrefill.prefill`), the model's own forward taking them
        padded on the right. A free slot's cache may be written before the prefill ends: only once
        it has are the rows seated."""
        added_at = time.perf_counter()
        prompts = [prompt for _, prompt, _ in requests]
        inputs = self.engine.inputs(prompts, pad_left=False)
        positions = next_positions(self.model, inputs, [prompt.images for prompt in prompts])  # on the host
        width = inputs["input_ids"].shape[1]
        given = decoder_inputs(self.model, inputs)
        logits = self.packed.prefill(given, [prompt.ids for prompt in prompts], width, slots)
        self.prefill_forwards += 1
        rows = [self._new_row(key, len(prompt.ids), params, added_at) for key, prompt, params in requests]
        first = self._choose(logits, rows).tolist()
        for slot, row, position, token in zip(slots, rows, positions, first):
            self._seat(slot, row, position, token)

    def _seat(self, slot: int, row: _Row, position: int, first: int) -> None:
        """Slot `slot`, whose cache holds the row's prompt, takes `row`."""
        n = row.prompt_tokens
        self.mask[slot].zero_()
        self.mask[slot, 0, 0, :n] = True
        self.positions[:, slot, 0] = position
        # one element filled, not assigned: assigning copies a host scalar and waits for the device
        self.write_at[slot].fill_(n)
        self.tokens[slot, 0].fill_(first)
        self.live[slot].fill_(1)
        self.rows[slot] = row
        row.first_at = time.perf_counter()
        row.tokens.append(first)
        row.text.advance(row.tokens)

    def _start_chunked(self, key: int, prompt: Prompt, params: GenerationParams, slot: int) -> None:
        """Reserve `slot` for a prompt over the step's budget and prefill its first chunk (the vision
        tower runs here, whole); the rest follows a chunk per step. A failure here takes no slot."""
        inputs = self.engine.inputs([prompt])
        row = self._new_row(key, len(prompt.ids), params, time.perf_counter())
        chunked = _Chunked(slot, row, inputs, prompt.images, ChunkedPrefill(self.model, inputs))
        chunked.prefill.advance(self.prefill_tokens)
        self.prefill_chunks += 1
        self.chunked = chunked

    def _next_chunk(self) -> StepOutput | None:
        """Prefill the long prompt's next chunk; once its last is in, its row takes its slot. A
        failure ends that request alone, with its error."""
        chunked = self.chunked
        try:
            logits = chunked.prefill.advance(self.prefill_tokens)
            self.prefill_chunks += 1
            if logits is None:
                return None
            self.chunked = None
            first = int(self._choose(logits, [chunked.row])[0])
            position = next_positions(self.model, chunked.inputs, [chunked.images])[0]
            for (keys, values), layer in zip(self.kv, chunked.prefill.cache.layers):
                keys[chunked.slot, :, :chunked.row.prompt_tokens].copy_(layer.keys[0])
                values[chunked.slot, :, :chunked.row.prompt_tokens].copy_(layer.values[0])
            self._seat(chunked.slot, chunked.row, position, first)
        except Exception as exc:
            self.chunked = None
            if chunked.slot in self.rows:
                self._free(chunked.slot)
            return StepOutput(chunked.row.key, "", 0, error=exc)
        return None

    def _new_row(self, key: int, prompt_tokens: int, params: GenerationParams, added_at: float) -> _Row:
        row = _Row(key, params, prompt_tokens, prompt_tokens + 1, added_at, 0.0,
                   Detokenizer(self.engine.text_of, params.stop))
        if params.seed is not None and params.temperature > 0:
            row.generator = torch.Generator(self.device).manual_seed(params.seed)
        return row

    def abort(self, key: int) -> tuple[str, int]:
        """Stop a running request now and free its slot: the text and tokens it had made."""
        if self.chunked is not None and self.chunked.row.key == key:
            self.chunked = None  # still prefilling: nothing made yet, its slot was only reserved
            return "", 0
        slot = next(s for s, row in self.rows.items() if row.key == key)
        row = self._free(slot)
        return row.text.so_far(), len(row.tokens)

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """The long prompt being prefilled takes its next chunk; then every row decodes one token,
        and a row leaves the step its token ends it (a row whose first token, from its prefill,
        already ended it leaves before decoding)."""
        failed = self._next_chunk() if self.chunked is not None else None
        outputs = [failed] if failed else []
        outputs += [self._finish(slot) for slot in [s for s, row in self.rows.items() if self._ended(row)]]
        if self.rows:
            # never one row: torch.compile traces a dimension of size 1 apart from larger ones
            n = min(max(2, next_power_of_two(max(self.rows) + 1)), self.slots)
            length = round_up(max(row.length for row in self.rows.values()), LENGTH_BUCKET)
            logits = self._decode(n, length)
            slots = sorted(self.rows)
            chosen = self._choose(logits[slots], [self.rows[s] for s in slots])
            self.tokens[slots, 0] = chosen
            chosen = chosen.tolist()
            for slot, token in zip(slots, chosen):
                row = self.rows[slot]
                row.tokens.append(token)
                row.length += 1
                row.text.advance(row.tokens)
                outputs.append(self._finish(slot) if self._ended(row) else StepOutput(row.key, row.text.take(), 1))
        return outputs

    def _ended(self, row: _Row) -> bool:
        """A stop token (never chosen before `min_new_tokens`), a stop string, or `max_new_tokens`."""
        return (row.tokens[-1] in self.engine.eos_ids or len(row.tokens) >= row.params.max_new_tokens
                or row.text.stopped)

    def _finish(self, slot: int) -> StepOutput:
        """Free an ended row's slot: its completion, and the text of it not yet given out."""
        row = self._free(slot)
        now = time.perf_counter()
        stopped = row.text.stopped or row.tokens[-1] in self.engine.eos_ids
        answer = row.text.answer()
        completion = Completion(answer, row.prompt_tokens, len(row.tokens), (row.first_at - row.added_at) * 1000.0,
                                (now - row.first_at) * 1000.0, STOPPED if stopped else LENGTH)
        return StepOutput(row.key, answer[row.text.sent:], 0, completion)

    def _free(self, slot: int) -> _Row:
        row = self.rows.pop(slot)
        self.live[slot].zero_()
        self.write_at[slot].zero_()
        self.positions[:, slot].zero_()
        self.mask[slot].zero_()
        self.mask[slot, 0, 0, 0].fill_(True)
        return row

    def _decode(self, n: int, length: int) -> torch.Tensor:
        """One token for the first `n` slots over `length` cache positions: logits per slot."""
        if self.graph_pool is None:
            return self._forward(n, length)
        if (n, length) not in self.graphs:
            self.graphs[(n, length)] = self._capture(n, length)
        graph, logits = self.graphs[(n, length)]
        graph.replay()
        return logits

    def _forward(self, n: int, length: int) -> torch.Tensor:
        live, write_at, rows = self.live[:n], self.write_at[:n], self.row_index[:n]
        mask = self.mask[:n, :, :, :length]
        mask.scatter_(3, write_at.view(n, 1, 1, 1), True)

        def write(cache: torch.Tensor, new: torch.Tensor) -> None:
            cache[rows, :, write_at] = new[:, :, 0]

        kv = [(keys[:n, :, :length], values[:n, :, :length]) for keys, values in self.kv]
        logits = self.engine.decode(self.tokens[:n], self.positions[:, :n], kv, mask, write)
        write_at += live  # a free slot stays at 0
        self.positions[:, :n] += live.view(1, n, 1)
        return logits

    def _capture(self, n: int, length: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        """The graph of one bucket's step. Capturing runs the step for real; the rows' state is put
        back after each run (the keys and values written past a row's end are masked until
        overwritten; a second run from a moved position could write past the bucket's length)."""
        state = (self.tokens, self.positions, self.write_at, self.mask)
        saved = [t.clone() for t in state]

        def restore() -> None:
            for tensor, copy in zip(state, saved):
                tensor.copy_(copy)
        return cuda_graph(lambda: self._forward(n, length), self.graph_pool, self.device, restore)

    def _choose(self, logits: torch.Tensor, rows: list[_Row]) -> torch.Tensor:
        """The next token of each row under its own parameters: argmax at temperature 0, else
        sampling with temperature, top-k and top-p as `generate` does; no stop token before a
        row's `min_new_tokens`."""
        def tensor(values: list) -> torch.Tensor:  # made on the host, copied without a wait for the device
            return to_device(torch.tensor(values), self.device)
        early = tensor([len(r.tokens) < r.params.min_new_tokens for r in rows])
        logits = logits.clone()
        logits[:, self.eos] = logits[:, self.eos].masked_fill(early.view(-1, 1), float("-inf"))
        chosen = logits.argmax(dim=-1)
        sampled = [i for i, r in enumerate(rows) if r.params.temperature > 0]
        if sampled:
            params = [rows[i].params for i in sampled]
            index = tensor(sampled)
            part = logits.index_select(0, index) / tensor([p.temperature for p in params]).view(-1, 1)
            ordered, order = part.sort(dim=-1, descending=True)
            vocab = part.shape[-1]
            top_k = tensor([min(p.top_k, vocab) if p.top_k else vocab for p in params])
            outside_k = torch.arange(vocab, device=self.device).view(1, -1) >= top_k.view(-1, 1)
            probs = ordered.masked_fill(outside_k, float("-inf")).softmax(dim=-1)
            top_p = tensor([p.top_p for p in params]).view(-1, 1)
            outside_p = probs.cumsum(dim=-1) - probs > top_p  # the most likely token always stays
            ordered = ordered.masked_fill(outside_k | outside_p, float("-inf"))
            probs = ordered.softmax(dim=-1)
            picks = torch.multinomial(probs, 1)[:, 0]
            for i, r in enumerate(rows[j] for j in sampled):  # a seeded row draws from its own generator
                if r.generator is not None:
                    picks[i] = torch.multinomial(probs[i], 1, generator=r.generator)[0]
            chosen[index] = order.gather(1, picks.view(-1, 1))[:, 0]
        return chosen

