"""The worker contract: everything a worker process is told, as one declared object.

The supervisor builds a `WorkerSpec` once from its `Config` and hands it whole to
`python -m qvl.worker SPEC` as JSON (or to a spare, in its `load` message); the worker reads it back
with `WorkerSpec.from_json`, every field checked for its declared type, and decodes every message
with exactly `spec.limits`, the supervisor's own limits. A spare starts from a `SpareSpec`. Its
environment names the supervisor's pid. Torch-free, so both sides import it; no second list of
worker flags exists anywhere.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from .codec import Limits

SUPERVISOR_PID_ENV = "QVL_SUPERVISOR_PID"  # in a worker's environment: the supervisor that started it


@dataclass(frozen=True)
class ModelOptions:
    """How the engine loads and runs the model."""

    model: str
    device: str = "cpu"
    dtype: str = "auto"
    attn_implementation: str = "sdpa"
    memory_fraction: float | None = None
    engine: str = "hf"  # "vllm": vLLM's engine in the worker; "noop" answers without a model (benchmarks)
    kv_cache: str = "auto"  # static (KV pool, CUDA graphs), continuous (the pool in rows), dynamic, auto
    kv_cache_tokens: int = 262144  # size of the KV pool in tokens
    vllm_memory_share: float = 0.4  # vLLM's gpu_memory_utilization: the device share it takes at load
    vllm_max_model_len: int = 32768  # prompt plus new tokens of one request, for vLLM
    vllm_compile: bool = True  # vLLM's torch.compile (slower start); off keeps full CUDA graphs for decode
    prefill_tokens: int = 8192  # continuous batching: prompt tokens a step prefills; longer prompts go in chunks
    compile_decode: bool = True  # continuous batching on CUDA: torch.compile each decoder layer's step
    vllm_render_processes: int = 0  # processes making vLLM's inputs beside the worker; 0: the worker itself

    @property
    def kv_cache_mode(self) -> str:
        """`kv_cache` with auto resolved: continuous batching on CUDA, transformers' generate on CPU."""
        if self.kv_cache != "auto":
            return self.kv_cache
        return "continuous" if self.device.startswith("cuda") else "dynamic"


@dataclass(frozen=True)
class WorkerSpec:
    """One worker incarnation: where to connect, who it is, what it runs and within what limits."""

    backend: str
    slot: int
    generation: int
    model: ModelOptions
    limits: Limits = field(default_factory=Limits)
    max_batch_size: int = 64
    max_image_pixels: int = 40_000_000
    max_prompt_tokens: int = 16384
    heartbeat_interval_s: float = 1.0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "WorkerSpec":
        """The spec `to_json` wrote; `ValueError` naming the fault for anything else."""
        return _from_json(cls, text, "a worker spec")


@dataclass(frozen=True)
class SpareSpec:
    """A spare process of a slot (`python -m qvl.worker --spare SPEC`): where to connect, its number
    among the slot's spares (its routing identity), the engine whose module it imports ahead, and
    the limits it reads its one message with. Which worker it becomes comes later, as a whole
    `WorkerSpec` in a `load` message."""

    backend: str
    slot: int
    number: int
    engine: str = "hf"
    limits: Limits = field(default_factory=Limits)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "SpareSpec":
        return _from_json(cls, text, "a spare spec")


def _from_json(cls: type, text: str, what: str):
    try:
        return _build(cls, json.loads(text))
    except (TypeError, KeyError, ValueError, RecursionError, ArithmeticError) as exc:  # json, a missing
        # part, a wrong field, an integer no float can hold
        raise ValueError(f"not {what}: {type(exc).__name__}: {exc}") from None


_NESTED = {"ModelOptions": ModelOptions, "Limits": Limits}
_SCALARS = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,), "None": (type(None),)}


def _build(cls: type, raw: object):
    """An instance of the dataclass `cls` from a JSON map: known fields only, each of its declared
    type (checked before any value is used), nested specs built the same way."""
    if not isinstance(raw, dict):
        raise ValueError(f"{cls.__name__} must be a map, not {type(raw).__name__}")
    fields = {f.name: f.type for f in dataclasses.fields(cls)}
    unknown = raw.keys() - fields.keys()
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {sorted(map(str, unknown))}")
    values = {}
    for name, value in raw.items():
        kind = fields[name]
        if kind in _NESTED:
            values[name] = _build(_NESTED[kind], value)
            continue
        allowed = tuple(t for part in kind.split("|") for t in _SCALARS[part.strip()])
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise ValueError(f"{cls.__name__}.{name} must be {kind}, not {type(value).__name__}")
        values[name] = float(value) if "float" in kind and type(value) is int else value
    return cls(**values)  # a missing field: TypeError
