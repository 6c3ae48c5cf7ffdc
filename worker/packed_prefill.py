"""The prefill of the prompts that join the continuous batch together: packed into one sequence,
and on CUDA replayed as a graph.

The prompts of an add are put end to end (`PackedPrefill.prefill`), so one forward of the text decoder
prefills them all whatever their lengths, with no padding between them: attention is causal within
each prompt (flash attention over variable-length sequences in half precision on CUDA, a
block-diagonal mask elsewhere: on CPU, in float32, below compute capability 8.0), each token's
keys and values go straight into its row's slot at
its column, and deepstack's image features are added at the image tokens (`DecodeStep.prefill`).

On CUDA the decoder's forward over the packed tokens is captured at warm-up as one CUDA graph per
bucket of tokens (`token_bucket`), over static buffers the packing fills: a prefill then costs the
device's time for it, not the host's time to launch about 2,000 kernels and to check the compiled
functions' guards, which used to leave the device idle half of an add. The sequence is padded to
its bucket. The padding tokens are a segment of their own, attending only among themselves; they
write their keys and values at the last prompt's slot's last column, which no prompt reaches (a
row holds its prompt and at least one new token) and which a decode step writes before any step
reads it. Prompts of more tokens than the largest bucket (`GRAPHED_TOKENS`) run the same forward
unrecorded. The rounding of a prompt's prefill depends on the bucket its add pads to, so a greedy
request's tokens may differ with the requests that joined beside it.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch

from .kv_pool import LENGTH_BUCKET, cuda_graph, next_power_of_two, round_up, to_device

GRAPHED_TOKENS = 8192  # the largest bucket captured; a larger prefill runs unrecorded


def token_bucket(tokens: int) -> int:
    """The tokens a packed prefill of `tokens` is padded to: a multiple of `LENGTH_BUCKET` and of an
    eighth of the power of two above `tokens`, so the padding is less than a quarter of `tokens`
    (or than `LENGTH_BUCKET`)."""
    return round_up(tokens, max(LENGTH_BUCKET, next_power_of_two(tokens) // 8))


@dataclass
class Packed:
    """An add's prompts end to end, as `DecodeStep.prefill` takes them: T tokens, R prompts. In a
    graph's buffers T is its bucket, the padding is prompt R (`segments`), `starts` has an entry
    for every slot and two more (the padding's segment, then empty ones), `last` one per slot."""
    embeds: torch.Tensor      # 1 x T x hidden: the embeddings, image features in place
    positions: torch.Tensor   # 3 x 1 x T: multimodal rotary positions
    slots: torch.Tensor       # T: each token's slot in the KV pool
    columns: torch.Tensor     # T: its column in that slot
    segments: torch.Tensor    # T: the prompt it belongs to
    starts: torch.Tensor      # int32, R + 1: where each prompt starts, then T (flash attention's cu_seqlens)
    visual: torch.Tensor      # the tokens deepstack adds image features to
    deepstack: torch.Tensor   # deepstack layers x len(visual) x hidden: the features added (0 for padding)
    last: torch.Tensor        # each prompt's last token
    flash: bool               # attention by flash attention over `starts`, else by a mask of `segments`

    @property
    def tokens(self) -> int:
        return self.embeds.shape[1]


class PackedPrefill:
    """Packs an add's prompts and runs their prefill: through a bucket's graph on CUDA, else eagerly."""

    def __init__(self, engine, kv: list, slots: int, slot_length: int, graph_pool):
        self.engine = engine
        self.model = engine.model
        self.kv = kv
        self.slot_length = slot_length
        self.image_token_id = engine.image_token_id
        self.device = self.model.device
        vision = getattr(self.model.config, "vision_config", None)
        self.deep_layers = len(getattr(vision, "deepstack_visual_indexes", None) or ())
        self.hidden = self.model.config.get_text_config().hidden_size
        self.flash = (self.device.type == "cuda" and self.model.dtype in (torch.float16, torch.bfloat16)
                      and torch.cuda.get_device_capability(self.device) >= (8, 0)
                      and torch.backends.cuda.is_flash_attention_available())
        self.graph_pool = graph_pool
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.max_tokens = min(GRAPHED_TOKENS, token_bucket(engine.options.prefill_tokens))
        self.slots = slots
        if graph_pool is not None:
            self.buffers = self.empty_buffers(self.max_tokens)

    def empty_buffers(self, tokens: int) -> Packed:
        """Zeroed buffers for up to `tokens` tokens of up to every slot's prompt, and the padding's
        segment after them: what a graph reads. A new `out` too, so graphs captured before no
        longer write where `prefill` reads, and the indices the padding's deepstack rows take."""
        def zeros(*shape, dtype=torch.long):
            return torch.zeros(shape, dtype=dtype, device=self.device)
        self.out = zeros(self.slots, self.hidden, dtype=self.model.dtype)
        self.counting = torch.arange(tokens, device=self.device)  # the padding's deepstack indices
        return Packed(embeds=zeros(1, tokens, self.hidden, dtype=self.model.dtype), positions=zeros(3, 1, tokens),
                      slots=zeros(tokens), columns=zeros(tokens), segments=zeros(tokens),
                      starts=zeros(self.slots + 2, dtype=torch.int32), visual=zeros(tokens),
                      deepstack=zeros(self.deep_layers, tokens, self.hidden, dtype=self.model.dtype),
                      last=zeros(self.slots), flash=self.flash)

    def prefill(self, given: dict, ids: list[list[int]], width: int, slots: list[int]) -> torch.Tensor:
        """Prefill the prompts `ids` of one add into the slots `slots`, one each, `given` being their
        decoder inputs as `decoder_inputs` took them from the model's forward over the prompts padded
        on the right to `width`: the next-token logits of each prompt."""
        packed = self._pack(given, ids, width, slots)
        bucket = token_bucket(packed.tokens)
        if bucket in self.graphs:
            self.padded(packed, bucket, slots[-1])
            self.graphs[bucket].replay()
            last = self.out[:len(ids)]
        else:
            last = self.engine.decode.prefill(_to(packed, self.device), self.kv)
        return self.model.lm_head(last).float()

    def _pack(self, given: dict, ids: list[list[int]], width: int, slots: list[int]) -> Packed:
        """The prompts packed: what the model made of them taken from its padded batch, on the device;
        the indices made on the host, so nothing here waits for the device's results."""
        lengths = torch.tensor([len(row) for row in ids])
        columns = torch.cat([torch.arange(n) for n in lengths.tolist()])
        taken = to_device(columns + torch.arange(len(ids)).repeat_interleave(lengths) * width, self.device)
        embeds = given["inputs_embeds"].reshape(len(ids) * width, -1).index_select(0, taken)
        if given.get("position_ids") is not None:  # the last three rows: multimodal RoPE's
            positions = given["position_ids"][-3:].reshape(3, -1).index_select(1, taken)
        else:  # text only: each prompt numbered from 0
            positions = columns.expand(3, -1)
        visual = torch.nonzero(torch.tensor([t for row in ids for t in row]) == self.image_token_id)[:, 0]
        deepstack = given.get("deepstack_visual_embeds") or []
        if deepstack and deepstack[0].shape[0] != visual.shape[0]:
            raise RuntimeError(f"{deepstack[0].shape[0]} deepstack features for {visual.shape[0]} image tokens")
        features = torch.stack(deepstack) if deepstack else embeds.new_zeros((self.deep_layers, 0, self.hidden))
        starts = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
        return Packed(embeds=embeds.unsqueeze(0), positions=positions.unsqueeze(1),
                      slots=torch.tensor(slots).repeat_interleave(lengths), columns=columns,
                      segments=torch.arange(len(ids)).repeat_interleave(lengths), starts=starts.int(), visual=visual,
                      deepstack=features, last=starts[1:] - 1, flash=self.flash)

    def padded(self, packed: Packed, bucket: int, last_slot: int) -> Packed:
        """`packed` copied into the buffers, padded to `bucket`: the views `bucket`'s graph reads.
        The indices made on the host go over without a wait for the device."""
        b, total, rows = self.buffers, packed.tokens, packed.last.shape[0]
        packed = _to(packed, self.device)
        b.embeds[:, :total].copy_(packed.embeds)
        b.positions[..., :total].copy_(packed.positions)
        b.positions[..., total:bucket].zero_()
        for name, pad in (("slots", last_slot), ("columns", self.slot_length - 1), ("segments", rows)):
            getattr(b, name)[:total].copy_(getattr(packed, name))
            getattr(b, name)[total:bucket].fill_(pad)
        b.starts[:rows + 1].copy_(packed.starts)
        b.starts[rows + 1:].fill_(bucket)  # the padding's segment, then empty ones
        seen = packed.visual.shape[0]
        b.visual[:seen].copy_(packed.visual)
        b.visual[seen:bucket].copy_(self.counting[seen:bucket])  # distinct among themselves, each adding zeros
        b.deepstack[:, :seen].copy_(packed.deepstack)
        b.deepstack[:, seen:bucket].zero_()
        b.last[:rows].copy_(packed.last)
        b.last[rows:].zero_()
        return self._views(bucket)

    def _views(self, bucket: int) -> Packed:
        b = self.buffers
        return replace(b, embeds=b.embeds[:, :bucket], positions=b.positions[..., :bucket], slots=b.slots[:bucket],
                       columns=b.columns[:bucket], segments=b.segments[:bucket], visual=b.visual[:bucket],
                       deepstack=b.deepstack[:, :bucket])

    @torch.inference_mode()
    def warm_up(self) -> None:
        """On CUDA, every bucket's graph recorded, the largest first (the others reuse its memory);
        elsewhere one prefill run, so a compiled prefill is traced here for prompts of any length.
        Only before any request joins: this writes into slot 0."""
        self.graphs.clear()
        if self.graph_pool is None:
            zeros = torch.zeros((1, 17, self.hidden), dtype=self.model.dtype, device=self.device)
            self.prefill({"inputs_embeds": zeros}, [[0] * 17], 17, [0])
            return
        for bucket in sorted({token_bucket(n) for n in range(1, self.max_tokens + 1)}, reverse=True):
            b = self.buffers
            b.columns[:bucket].copy_(torch.arange(bucket) % self.slot_length)
            b.starts.fill_(bucket)
            b.starts[0] = 0
            views = self._views(bucket)
            self.graphs[bucket], _ = cuda_graph(lambda: self.out.copy_(self.engine.decode.prefill(views, self.kv)),
                                                self.graph_pool, self.device)


def _to(packed: Packed, device: torch.device) -> Packed:
    return replace(packed, **{f.name: to_device(getattr(packed, f.name), device) for f in fields(Packed)
                              if isinstance(getattr(packed, f.name), torch.Tensor)})
