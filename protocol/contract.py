"""The worker contract: everything a worker process is told, as one declared object.

The supervisor builds a `WorkerSpec` once from its `Config` and hands it whole to
`python -m qvl.worker SPEC` as JSON; the worker reads it back with `WorkerSpec.from_json` and
decodes every message with exactly `spec.limits`, the supervisor's own limits. Torch-free, so
both sides import it; no second list of worker flags exists anywhere.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from .codec import Limits


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
    kv_cache_tokens: int = 32768  # size of the static KV pool: rows x length of the largest batch
    vllm_memory_share: float = 0.4  # vLLM's gpu_memory_utilization: the device share it takes at load
    vllm_max_model_len: int = 32768  # prompt plus new tokens of one request, for vLLM
    vllm_compile: bool = True  # vLLM's torch.compile (slower start); off keeps full CUDA graphs for decode


@dataclass(frozen=True)
class WorkerSpec:
    """One worker incarnation: where to connect, who it is, what it runs and within what limits."""

    backend: str
    slot: int
    generation: int
    model: ModelOptions
    limits: Limits = field(default_factory=Limits)
    max_batch_size: int = 8
    max_image_pixels: int = 40_000_000
    max_prompt_tokens: int = 16384
    heartbeat_interval_s: float = 1.0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "WorkerSpec":
        """The spec `to_json` wrote; `ValueError` naming the fault for anything else."""
        try:
            raw = json.loads(text)
            return cls(**{**raw, "model": ModelOptions(**raw["model"]), "limits": Limits(**raw["limits"])})
        except (TypeError, KeyError, ValueError) as exc:  # json, a missing part, or a wrong field
            raise ValueError(f"not a worker spec: {type(exc).__name__}: {exc}") from None
