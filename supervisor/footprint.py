"""What a fresh worker holds before its first request, read torch-free from the model folder.

The weights (the safetensors files' size on disk) and the KV pool where `kv_cache` resolves to
static or continuous (from `config.json`: layers x kv heads x head dim x 2 x `kv_cache_tokens` x
dtype bytes). `Config.validate` uses it to refuse a soft recycle threshold that a fresh worker
would already trip, which would recycle it forever. A hub id or a folder it cannot read gives no figure, and no check: never a guess.
Never imports torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qvl.protocol.contract import ModelOptions

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Footprint:
    weights_bytes: int
    kv_pool_bytes: int  # 0 without a static KV pool
    kv_formula: str     # how kv_pool_bytes was computed, for the message

    @property
    def total(self) -> int:
        return self.weights_bytes + self.kv_pool_bytes


def fresh_worker_footprint(model: str, device: str, kv_cache: str, kv_cache_tokens: int,
                           dtype: str) -> Footprint | None:
    folder = Path(model)
    try:
        raw = json.loads((folder / "config.json").read_text())
        weights = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    except (OSError, ValueError):
        return None
    cuda = device.startswith("cuda")
    if ModelOptions(model, device, kv_cache=kv_cache).kv_cache_mode not in ("static", "continuous"):
        return Footprint(weights, 0, "no static KV pool")
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw
    try:
        layers, kv_heads = int(text["num_hidden_layers"]), int(text["num_key_value_heads"])
        head_dim = int(text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"])
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
    name = dtype if dtype != "auto" else ("bfloat16" if cuda else "float32")
    size = _DTYPE_BYTES.get(name, 2)
    kv = layers * kv_heads * head_dim * 2 * kv_cache_tokens * size
    formula = (f"{layers} layers x {kv_heads} kv heads x {head_dim} head dim x 2 x "
               f"{kv_cache_tokens} tokens x {size} bytes")
    return Footprint(weights, kv, formula)


def baseline_faults(config) -> list[str]:
    """The soft memory thresholds of `config` that a freshly loaded worker already trips."""
    fp = fresh_worker_footprint(config.model, config.device, config.kv_cache,
                                config.kv_cache_tokens, config.dtype)
    if fp is None:
        return []
    faults = []
    what = f"weights {_gib(fp.weights_bytes)} + static KV pool {_gib(fp.kv_pool_bytes)} ({fp.kv_formula})"
    if config.recycle_reserved_bytes and config.recycle_reserved_bytes <= fp.total:
        faults.append(f"recycle_reserved_bytes = {config.recycle_reserved_bytes} ({_gib(config.recycle_reserved_bytes)}) "
                      f"is below what a fresh worker reserves: {what} = {fp.total} bytes ({_gib(fp.total)}); "
                      f"every worker would recycle at once, forever. Raise it above that, or 0 (off)")
    if not config.device.startswith("cuda") and config.recycle_rss_bytes \
            and config.recycle_rss_bytes <= fp.weights_bytes:
        faults.append(f"recycle_rss_bytes = {config.recycle_rss_bytes} is below the weights a CPU worker holds "
                      f"in host memory ({fp.weights_bytes} bytes, {_gib(fp.weights_bytes)}); "
                      f"raise it above that, or 0 (off)")
    return faults


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB" if n >= 1 << 30 else f"{n / (1 << 20):.1f} MiB"
