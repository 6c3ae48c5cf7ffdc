"""The KV pool: generation from a cache preallocated at load, each step replayed as a CUDA graph.

Hugging Face `generate` launches about 2,000 kernels per token of the 4B model, so eager generation
is bound by the CPU, not the GPU. Here (`kv_cache = static`) the prompt is prefilled by the model's
own forward (vision tower and all); its keys and values are copied into one KV pool allocated at
load, and every later token is one replay of a CUDA graph captured per bucket of (rows, length).
The continuous engine (`continuous.py`) prefills through `DecodeStep.prefill` instead, straight
into its pool, and long prompts a chunk at a time (`ChunkedPrefill`). Rows round up to a
power of two and length to a multiple of `LENGTH_BUCKET`, so a worker captures a few dozen graphs
at most, each in a fraction of a second, and they share one memory pool. Generation then allocates
nothing: the pool is the cache whatever the traffic, which also keeps the allocator from
fragmenting.

The step is written against the modules of the Qwen3-VL text decoder (projections, norms, MLP,
rotary embedding), not transformers' cache classes, whose interfaces change between releases.
On CPU the same step runs eagerly, which is how its tokens are tested against `generate`.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from qvl.protocol.messages import GenerationParams
from transformers import DynamicCache

from .vision import host_inputs

LENGTH_BUCKET = 256
STOP_CHECK_EVERY = 4  # steps between checks that every row has ended (each check waits for the GPU)

# Called every few generation steps with a function that returns every row's new tokens so far;
# they are copied from the device only if it is called (for streaming).
Progress = Callable[[Callable[[], list[list[int]]]], None]


def next_power_of_two(n: int) -> int:
    return 1 << (n - 1).bit_length()


def round_up(n: int, step: int) -> int:
    return -(-n // step) * step


@dataclass
class Generated:
    tokens: list[list[int]]  # per prompt row, the new tokens (rows end at the first stop token or the limit)
    prefill_ms: float
    decode_ms: float


class _Bucket:
    """The static inputs of one (rows, length) shape, its cache views and, on CUDA, its graph."""

    def __init__(self, kv: list[tuple[torch.Tensor, torch.Tensor]], rows: int, length: int, device):
        self.kv = kv
        self.tokens = torch.zeros((rows, 1), dtype=torch.long, device=device)
        self.positions = torch.zeros((3, rows, 1), dtype=torch.long, device=device)
        self.write_at = torch.zeros(1, dtype=torch.long, device=device)
        self.mask = torch.zeros((rows, 1, 1, length), dtype=torch.bool, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None


class KVPool:
    """Prefill with the model's forward, then generate step by step from the pool."""

    def __init__(self, decode: "DecodeStep", kv_tokens: int, eos_ids: set[int], pad_id: int):
        self.decode = decode
        self.model = model = decode.model
        self.text = model.model.language_model
        self.kv_heads, self.head_dim = decode.kv_heads, decode.head_dim
        self.kv_tokens = kv_tokens
        self.device = model.device
        self.pool = torch.zeros((len(self.text.layers), 2, kv_tokens * self.kv_heads * self.head_dim),
                                dtype=model.dtype, device=self.device)
        self.eos = torch.tensor(sorted(eos_ids), device=self.device)
        self.pad_id = pad_id
        self.buckets: dict[tuple[int, int], _Bucket] = {}
        self.graph_pool = torch.cuda.graph_pool_handle() if self.device.type == "cuda" else None
        self.cache_arg = cache_argument(model)

    def fits(self, rows: int, prompt_len: int, max_new_tokens: int) -> bool:
        return next_power_of_two(rows) * round_up(prompt_len + max_new_tokens, LENGTH_BUCKET) <= self.kv_tokens

    @torch.inference_mode()
    def generate(self, inputs, images_per_row: list[int], params: GenerationParams,
                 progress: Progress | None = None,
                 stopped: Callable[[list[list[int]]], list[bool]] | None = None) -> Generated:
        """Prefill `inputs` (the engine's batch, left-padded) and generate up to `params.max_new_tokens`,
        telling `progress` the tokens so far every `STOP_CHECK_EVERY` steps; there too `stopped`, if
        given, names the rows whose text has ended (a stop string), which then count as finished."""
        n, prompt_len = inputs["input_ids"].shape
        bucket = self._bucket(next_power_of_two(n), round_up(prompt_len + params.max_new_tokens, LENGTH_BUCKET))
        started = time.perf_counter()
        logits, cache = prefill(self.model, inputs, self.cache_arg)
        self._load_bucket(bucket, cache, inputs["attention_mask"], next_positions(self.model, inputs, images_per_row))
        generated = torch.full((n, params.max_new_tokens), self.pad_id, dtype=torch.long, device=self.device)
        finished = torch.zeros(n, dtype=torch.bool, device=self.device)
        del cache
        # one generator per batch: its rows share their parameters, the seed among them
        seeded = params.temperature > 0 and params.seed is not None
        generator = torch.Generator(self.device).manual_seed(params.seed) if seeded else None
        first_at = None
        for t in range(params.max_new_tokens):
            if t:
                if t % STOP_CHECK_EVERY == 0:
                    if progress is not None:
                        progress(lambda: generated[:, :t].tolist())
                    if stopped is not None:
                        finished |= torch.tensor(stopped(generated[:, :t].tolist()), device=self.device)
                    if bool(finished.all()):
                        break
                logits = self._step(bucket)[:n]
            if t < params.min_new_tokens:
                logits[:, self.eos] = float("-inf")
            chosen = choose_tokens(logits, params, generator)
            generated[:, t] = chosen
            bucket.tokens[:n, 0] = chosen
            finished |= torch.isin(chosen, self.eos)
            if first_at is None:
                first_at = _synchronized_now(self.device)
        ended = _synchronized_now(self.device)
        return Generated(generated.tolist(), (first_at - started) * 1000.0, (ended - first_at) * 1000.0)

    def _load_bucket(self, bucket: _Bucket, cache, attention_mask: torch.Tensor, positions: list[int]) -> None:
        """Copy the prefilled keys and values into the bucket's views and set its inputs for step one."""
        n, prompt_len = attention_mask.shape
        for (keys, values), layer in zip(bucket.kv, cache.layers):
            keys[:n, :, :prompt_len].copy_(layer.keys)
            values[:n, :, :prompt_len].copy_(layer.values)
        bucket.mask.zero_()
        bucket.mask[:n, 0, 0, :prompt_len] = attention_mask.bool()
        bucket.mask[n:, 0, 0, :prompt_len] = True  # padding rows: any valid attention, their output is dropped
        bucket.positions.fill_(0)
        bucket.positions[:, :n, 0] = torch.tensor(positions, device=self.device)
        bucket.write_at.fill_(prompt_len)
        bucket.tokens.fill_(self.pad_id)

    def _bucket(self, rows: int, length: int) -> _Bucket:
        key = (rows, length)
        if key not in self.buckets:
            size = rows * self.kv_heads * length * self.head_dim
            kv = [(layer[0, :size].view(rows, self.kv_heads, length, self.head_dim),
                   layer[1, :size].view(rows, self.kv_heads, length, self.head_dim)) for layer in self.pool]
            bucket = _Bucket(kv, rows, length, self.device)
            if self.graph_pool is not None:
                self._capture(bucket)
            self.buckets[key] = bucket
        return self.buckets[key]

    def _capture(self, bucket: _Bucket) -> None:
        bucket.graph, bucket.logits = cuda_graph(lambda: self._forward(bucket), self.graph_pool, self.device)

    def _step(self, bucket: _Bucket) -> torch.Tensor:
        if bucket.graph is None:
            return self._forward(bucket)
        bucket.graph.replay()
        return bucket.logits

    def _forward(self, bucket: _Bucket) -> torch.Tensor:
        """One token per row: write its keys and values at `write_at`, return next-token logits."""
        bucket.mask.index_fill_(3, bucket.write_at, True)
        logits = self.decode(bucket.tokens, bucket.positions, bucket.kv, bucket.mask,
                             lambda cache, new: cache.index_copy_(2, bucket.write_at, new))
        bucket.write_at += 1
        bucket.positions += 1
        return logits


def cuda_graph(run: Callable[[], object], pool, device, reset: Callable[[], None] = lambda: None):
    """`run` recorded as a CUDA graph in the memory pool `pool`, after two runs on a side stream
    that initialise its kernels and workspaces outside the graph (`reset` after each, where a run
    moves state the next must start from): the graph, and what the recorded run returned."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
            reset()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    # thread_local: the worker's heartbeat thread reads memory telemetry while this one captures
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        out = run()
    return graph, out


def cache_argument(model) -> str:
    """The name of the forward's cache argument: transformers renamed `past_key_values` to `cache`
    (the old name warns in newer releases)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def prefill(model, inputs, cache_arg: str) -> tuple[torch.Tensor, DynamicCache]:
    """The model's own forward over left-padded prompts: each row's next-token logits, and the
    cache. Every row's tokens are numbered from 0 after its padding, as `next_positions` goes on:
    transformers numbers the rows of a batch without images from its first column, padding included."""
    positions = {}
    if inputs.get("image_grid_thw") is None:
        positions["position_ids"] = (inputs["attention_mask"].cumsum(-1) - 1).clamp_min(0)
    cache = DynamicCache()
    out = model(**inputs, **positions, **{cache_arg: cache}, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1].float(), cache


class _Captured(Exception):
    """Raised by the hook that takes the text decoder's inputs, to end the forward there."""


def decoder_inputs(model, inputs) -> dict:
    """What the model's own forward hands its text decoder for `inputs` (on the host): the
    embeddings with the image features in place, the rotary positions (numbered past padding by
    `attention_mask`), and the visual positions and features that deepstack adds in the first
    layers. The inputs go to the device without a wait, with what `host_inputs` made of them there
    (the images' grid stays on the host where the tower takes those). The forward stops at the
    decoder: it runs later, in chunks (`ChunkedPrefill`) or as `DecodeStep.prefill`."""
    text = model.model.language_model
    made = host_inputs(model, inputs)
    on_host = {"image_grid_thw"} if "image_cu_seqlens" in made else set()  # the tower then reads only its sizes
    arguments = {name: to_device(value, model.device) if isinstance(value, torch.Tensor) and name not in on_host
                 else value for name, value in {**inputs, **made}.items()}
    captured: dict = {}

    def take(module, args, kwargs):
        captured.update(kwargs)
        raise _Captured

    hook = text.register_forward_pre_hook(take, with_kwargs=True)
    try:
        model.model(**arguments)
    except _Captured:
        pass
    finally:
        hook.remove()
    return {name: value for name, value in captured.items() if not name.startswith("image_")}  # the tower's only


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`tensor`, made on the host, on `device` without waiting for the work queued there: on CUDA
    through pinned memory, since a copy from pageable memory waits for the stream."""
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.contiguous().pin_memory().to(device, non_blocking=True)  # an expanded view cannot be pinned


class ChunkedPrefill:
    """One prompt prefilled a chunk at a time, so a long prompt does not stall the rows that decode
    meanwhile. The vision tower runs once, at the start (`decoder_inputs`); then each `advance`
    runs the text decoder over the next tokens with the cache of those before, slicing the rotary
    positions and the deepstack features to the chunk. The keys and values and the logits are
    those of one whole forward, up to the arithmetic's rounding."""

    def __init__(self, model, inputs):
        self.model = model
        self.text = model.model.language_model
        self.cache_arg = cache_argument(self.text)
        self.given = decoder_inputs(model, inputs)
        self.length = self.given["inputs_embeds"].shape[1]
        self.done = 0
        self.cache = DynamicCache()

    @property
    def left(self) -> int:
        return self.length - self.done

    @torch.inference_mode()
    def advance(self, tokens: int) -> torch.Tensor | None:
        """Prefill the next `tokens` prompt tokens; the next-token logits once the last is in."""
        start, end = self.done, min(self.length, self.done + tokens)
        given = self.given
        chunk = {"inputs_embeds": given["inputs_embeds"][:, start:end],
                 "position_ids": given["position_ids"][..., start:end] if given.get("position_ids") is not None
                 else None,
                 self.cache_arg: self.cache, "use_cache": True}
        visual = given.get("visual_pos_masks")
        if visual is not None and bool(visual[:, start:end].any()):
            before, inside = int(visual[:, :start].sum()), int(visual[:, start:end].sum())
            chunk["visual_pos_masks"] = visual[:, start:end]
            chunk["deepstack_visual_embeds"] = [embeds[before:before + inside]
                                                for embeds in given["deepstack_visual_embeds"]]
        hidden = self.text(**chunk).last_hidden_state
        self.done = end
        if self.left:
            return None
        return self.model.lm_head(hidden[:, -1]).float()


class DecodeStep:
    """One new token per row through the Qwen3-VL text decoder's weights.

    Each layer's step is two functions of tensors: the attention inputs (norm, q, k and v in one
    matrix product, q/k norms, rotary embedding) and, after the new keys and values are written
    into the cache, the rest (attention over the cache, output projection, norm, MLP with gate
    and up in one product). They take every layer's weights as arguments, so with `compiled`
    torch.compile traces each once for all layers and fuses its norms, rotations and activation
    into a few kernels: about 12 kernels a layer where the modules launch about 50. Building one
    stacks each layer's q, k and v weights (and gate and up) in one matrix and makes the modules'
    weights views of it, so the model's own forward (the static pool's prefill, the vision side)
    reads the same memory. `prefill` runs prompts packed end to end through the same weights
    (`packed_prefill.py`), compiled for any number of tokens, with attention causal within each
    prompt instead of over the cache.
    """

    def __init__(self, model, compiled: bool):
        self.model = model
        self.text = model.model.language_model
        config = self.text.config
        if config.hidden_act != "silu":
            raise ValueError(f"the decode step runs silu MLPs, not {config.hidden_act}")
        self.eps = config.rms_norm_eps
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.split = (config.num_attention_heads * self.head_dim, self.kv_heads * self.head_dim,
                      self.kv_heads * self.head_dim)
        self.layers = [_LayerWeights.of(layer) for layer in self.text.layers]
        if model.device.type == "cuda":
            torch.cuda.empty_cache()  # the blocks the unstacked weights held
        self.step_compiled = self.prefill_compiled = compiled
        self.attention_inputs = torch.compile(_attention_inputs) if compiled else _attention_inputs
        self.attention_rest = torch.compile(_attention_rest) if compiled else _attention_rest
        # prompts differ in length: their functions are traced with the tokens a dimension of any size
        self.prefill_inputs = torch.compile(_qkv, dynamic=True) if compiled else _qkv
        self.prefill_output = torch.compile(_output, dynamic=True) if compiled else _output

    def uncompile(self, part: str) -> None:
        """Run `part`, "step" or "prefill", uncompiled from now on; the other stays as it is."""
        if part == "step":
            self.step_compiled = False
            self.attention_inputs, self.attention_rest = _attention_inputs, _attention_rest
        else:
            self.prefill_compiled = False
            self.prefill_inputs, self.prefill_output = _qkv, _output

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, kv: list, mask: torch.Tensor,
                 write: Callable[[torch.Tensor, torch.Tensor], object]) -> torch.Tensor:
        """Each layer's new keys and values go into the cache by `write(cache, new)`; attention reads
        the cache under `mask` (rows x 1 x 1 x length). The next-token logits per row."""
        hidden = self.text.embed_tokens(tokens)
        cos, sin = self.text.rotary_emb(hidden, positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        for w, (keys, values) in zip(self.layers, kv):
            q, k, v = self.attention_inputs(hidden, cos, sin, w.input_norm, w.qkv, w.qkv_bias, w.q_norm,
                                            w.k_norm, self.split, self.head_dim, self.eps)
            write(keys, k)
            write(values, v)
            hidden = self.attention_rest(hidden, q, keys, values, mask, w.scaling, w.o, w.o_bias, w.post_norm,
                                         w.gate_up, w.down, self.eps)
        return self.model.lm_head(self.text.norm(hidden)[:, 0]).float()

    def prefill(self, packed, kv: list) -> torch.Tensor:
        """The text decoder over `packed` (`packed_prefill.Packed`): prompts end to end, attention
        causal within each. Each layer writes every token's keys and values into its slot at its
        column, and deepstack's features are added at the image tokens after the first layers, as
        the model adds them. The final (normed) hidden state of each prompt's last token."""
        hidden = packed.embeds
        cos, sin = self.text.rotary_emb(hidden, packed.positions)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        mask = None if packed.flash else _segment_mask(packed.segments)
        for index, (w, (keys, values)) in enumerate(zip(self.layers, kv)):
            q, k, v = self.prefill_inputs(hidden, cos, sin, w.input_norm, w.qkv, w.qkv_bias, w.q_norm, w.k_norm,
                                          self.split, self.head_dim, self.eps)
            keys[packed.slots, :, packed.columns] = k[0].transpose(0, 1)
            values[packed.slots, :, packed.columns] = v[0].transpose(0, 1)
            attended = _packed_attention(q, k, v, packed.starts, mask, w.scaling)
            hidden = self.prefill_output(hidden, attended, w.o, w.o_bias, w.post_norm, w.gate_up, w.down, self.eps)
            if index < packed.deepstack.shape[0]:
                hidden[0].index_add_(0, packed.visual, packed.deepstack[index].to(hidden.dtype))
        return self.text.norm(hidden[0, packed.last])


@dataclass(frozen=True)
class _LayerWeights:
    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    scaling: float
    o: torch.Tensor
    o_bias: torch.Tensor | None
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor

    @classmethod
    def of(cls, layer) -> "_LayerWeights":
        attn, mlp = layer.self_attn, layer.mlp
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        return cls(layer.input_layernorm.weight, _stacked(projections, "weight"), _stacked(projections, "bias"),
                   attn.q_norm.weight, attn.k_norm.weight, attn.scaling, attn.o_proj.weight, attn.o_proj.bias,
                   layer.post_attention_layernorm.weight, _stacked((mlp.gate_proj, mlp.up_proj), "weight"),
                   mlp.down_proj.weight)


def _stacked(linears, name: str) -> torch.Tensor | None:
    """The `name` tensors (weight or bias) of `linears` in one, first dimension stacked; each
    module's becomes a view of it, so the model holds them once."""
    if getattr(linears[0], name) is None:
        return None
    whole = torch.cat([getattr(m, name).data for m in linears])
    start = 0
    for m in linears:
        size = getattr(m, name).shape[0]
        setattr(m, name, torch.nn.Parameter(whole[start:start + size], requires_grad=False))
        start += size
    return whole


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen3's RMSNorm, computed as its module computes it (in float32, weight applied after)."""
    wide = x.float()
    return weight * (wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _qkv(hidden, cos, sin, input_norm, qkv, qkv_bias, q_norm, k_norm, split, head_dim, eps):
    """One layer's queries (rows x heads x tokens x head dim), and its new keys and values (rows x
    kv heads x tokens x head dim), of `hidden` (rows x tokens x hidden size)."""
    rows, tokens = hidden.shape[:2]
    q, k, v = F.linear(_rms_norm(hidden, input_norm, eps), qkv, qkv_bias).split(split, dim=-1)
    q = _rotate(_rms_norm(q.view(rows, tokens, -1, head_dim), q_norm, eps).transpose(1, 2), cos, sin)
    k = _rotate(_rms_norm(k.view(rows, tokens, -1, head_dim), k_norm, eps).transpose(1, 2), cos, sin)
    return q, k, v.view(rows, tokens, -1, head_dim).transpose(1, 2)


def _attention_inputs(hidden, cos, sin, input_norm, qkv, qkv_bias, q_norm, k_norm, split, head_dim, eps):
    """A decode step's `_qkv`, the query as (rows x kv heads x the query heads sharing each x head dim)."""
    q, k, v = _qkv(hidden, cos, sin, input_norm, qkv, qkv_bias, q_norm, k_norm, split, head_dim, eps)
    # the query heads sharing a key head become its query rows: grouped attention, no copies
    return q.reshape(hidden.shape[0], k.shape[1], -1, head_dim), k, v


def _attention_rest(hidden, q, keys, values, mask, scaling, o, o_bias, post_norm, gate_up, down, eps):
    """A decode step's layer output: attention over the cache under `mask`, then `_output`."""
    attended = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scaling)
    return _output(hidden, attended.reshape(hidden.shape[0], 1, -1), o, o_bias, post_norm, gate_up, down, eps)


def _segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """1 x 1 x T x T: token i attends to token j when both are of one prompt and j is not after i."""
    tokens = segments.shape[0]
    causal = torch.ones((tokens, tokens), dtype=torch.bool, device=segments.device).tril()
    return (causal & (segments.view(-1, 1) == segments.view(1, -1))).view(1, 1, tokens, tokens)


def _packed_attention(q, k, v, starts, mask, scaling):
    """Causal attention within each prompt of a packed sequence, q (1 x heads x T x head dim) over
    k and v (1 x kv heads x T x head dim): by flash attention over the prompts starting at `starts`
    where `mask` is None, else under `mask`. 1 x T x (heads x head dim)."""
    tokens = q.shape[2]
    if mask is None:  # flash attention takes grouped keys as they are
        attended = torch.ops.aten._flash_attention_forward(
            q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), starts, starts, tokens, tokens,
            0.0, True, False, scale=scaling)[0]
        return attended.reshape(1, tokens, -1)
    # under a mask, SDPA may take grouped keys only in the kernel that builds heads x tokens² weights,
    # so each key head is repeated
    k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
    attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)
    return attended.transpose(1, 2).reshape(1, tokens, -1)


def _output(hidden, attended, o, o_bias, post_norm, gate_up, down, eps):
    """The output projection and the MLP, each with its residual."""
    hidden = hidden + F.linear(attended, o, o_bias)
    gate, up = F.linear(_rms_norm(hidden, post_norm, eps), gate_up).chunk(2, dim=-1)
    return hidden + F.linear(F.silu(gate) * up, down)


def next_positions(model, inputs, images_per_row: list[int]) -> list[int]:
    """Each row's rotary position for its first new token.

    Multimodal RoPE gives an image of t x h x w merged patches the positions of a t x h x w grid,
    so it advances the position by max(t, h, w), not by its token count. Computed here, not read
    from the model, because transformers has changed where and how it keeps these offsets.
    """
    merge = model.config.vision_config.spatial_merge_size
    grids = inputs["image_grid_thw"].tolist() if inputs.get("image_grid_thw") is not None else []
    positions = []
    for length, count in zip(inputs["attention_mask"].sum(dim=1).tolist(), images_per_row):
        for t, h, w in grids[:count]:
            h, w = h // merge, w // merge
            length += max(t, h, w) - t * h * w
        grids = grids[count:]
        positions.append(length)
    return positions


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def choose_tokens(logits: torch.Tensor, params: GenerationParams,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Greedy at temperature 0, else sampling with temperature, top-k and top-p as `generate` does.

    With a `generator` (seeded from the request's seed) the draw is the exponential race: the token
    with the largest p / E, each E drawn from Exp(1), which is sampling from p exactly. The rows of
    a batch share one draw of E per step (they share the seed too), so a row's tokens depend on its
    own probabilities and the seed only: a seeded request gives the same text alone or in any batch.
    """
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k:
        kth = logits.topk(min(params.top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs > params.top_p  # the most likely token always stays
        logits = logits.scatter(1, order, ordered.masked_fill(outside, float("-inf")))
    probs = logits.softmax(dim=-1)
    if generator is None:
        return torch.multinomial(probs, 1)[:, 0]
    race = torch.empty(probs.shape[-1], dtype=probs.dtype, device=probs.device).exponential_(generator=generator)
    return (probs / race.clamp_min_(torch.finfo(probs.dtype).tiny)).argmax(dim=-1)


def _synchronized_now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
