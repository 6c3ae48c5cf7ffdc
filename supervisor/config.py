"""The supervisor's one configuration object: every setting with its type, default and help.

CLI flags (`--queue-size`), TOML keys (`queue_size`) and the README's table all come from the
fields of `Config`. `load_config` parses once and validates everything, naming each fault.
"""


import argparse
import dataclasses
import ipaddress
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from qvl.protocol.client import DEFAULT_ENDPOINT
from qvl.protocol.codec import Limits

from .footprint import baseline_faults


class ConfigError(ValueError):
    """The configuration is invalid; the message lists every fault."""


def setting(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Config:
    frontend: str = setting(DEFAULT_ENDPOINT, "ZeroMQ endpoint clients connect to (tcp:// or ipc://)")
    model: str = setting("Qwen/Qwen3-VL-4B-Instruct", "model folder or hub id")
    device: str = setting("cuda:0", "device of the workers: cuda:N or cpu")
    workers: int = setting(1, "number of worker slots")
    gpus: str = setting("", "GPUs to serve on, `0,1,...` or `all` (NVML order): one worker slot per GPU, each worker seeing only its own; overrides `workers` and the index in `device`")
    dtype: str = setting("auto", "model dtype: auto (bfloat16 on CUDA, float32 on CPU), bfloat16, float16, float32")
    attn_implementation: str = setting("sdpa", "attention implementation passed to transformers (sdpa, eager, flash_attention_2): every attention of the dynamic and static engines, the vision tower's (with sdpa, image by image with the images' lengths known on the host, so it never waits for the device, once a probe at load shows the tower takes them) and long prompts' chunks with kv_cache continuous, whose decode steps run torch's SDPA themselves and prefills torch's flash attention (SDPA under a mask on CPU, in float32, below compute capability 8.0 or without flash attention in torch)")
    engine: str = setting("hf", "hf: the model through transformers; vllm: vLLM's engine inside each worker (`pip install qvl[vllm]`, CUDA only); noop: empty answers at once, to measure the serving path alone")
    kv_cache: str = setting("auto", "continuous: a KV pool allocated at load, cut into max_batch_size rows that requests join and leave at every step (continuous batching: requests ready together are prefilled together, packed in one forward), each step replayed as a CUDA graph; static: the same pool, run-to-completion batches of equal parameters; dynamic: transformers' generate; auto: continuous on CUDA, dynamic on CPU")
    prefill_tokens: int = setting(8192, "prompt tokens prefilled in one forward. continuous: requests join a step while theirs fit, and a longer prompt is prefilled in chunks of this many, one per step, while the running rows go on decoding; static and dynamic: a batch whose rows times its longest prompt exceed it is split")
    kv_cache_tokens: int = setting(262144, "size of the KV pool in tokens (continuous or static; 36 GiB for Qwen3-VL-4B in bfloat16). continuous: each of the max_batch_size rows holds kv_cache_tokens / max_batch_size of them (4096 by default), which a request's prompt plus max_new_tokens must fit; static: a batch's rows (to a power of two) times its length (prompt + max_new_tokens, to a multiple of 256) must fit, larger batches are split")
    compile_decode: bool = setting(True, "kv_cache continuous on CUDA: torch.compile each decoder layer's decode step and prefill at warm-up (their norms, rotary embedding and activation fused into a few kernels; faster steps and prefills, and a slower first start while they compile: later starts reuse torch's compile cache); a shape warm-up missed, or a step that fails to compile, runs uncompiled")
    vllm_memory_share: float = setting(0.4, "engine vllm: the share of the device a worker takes at load (vLLM's gpu_memory_utilization); an overlapped recycle needs room for two, so keep it below (1 - recycle_overlap_margin) / 2 of what is free")
    vllm_max_model_len: int = setting(32768, "engine vllm: most prompt plus new tokens in one request (vLLM's max_model_len)")
    vllm_render_processes: int = setting(0, "engine vllm: processes beside each worker that make requests' inputs (vLLM's rendering: image processing, mostly), that many at once (not yet measured on a GPU); 0: the worker makes them itself, one at a time")
    vllm_compile: bool = setting(True, "engine vllm: torch.compile the model (faster steps, about 30 s more at the first start; later starts reuse vLLM's compile cache); off keeps CUDA graphs for decode")
    memory_fraction: float = setting(0.0, "cap on the CUDA memory a worker may use, as a fraction of the device (0: no cap)")
    alloc_conf: str = setting("expandable_segments:True", "PYTORCH_CUDA_ALLOC_CONF given to workers")
    max_batch_size: int = setting(64, "most requests a worker runs at once: the rows of the continuous KV pool (fewer when kv_cache_tokens / 256 is less), or the most in one generate call of the static and dynamic caches")
    max_inflight: int = setting(64, "most requests dispatched to one worker at a time; those beyond its running rows wait in the worker and join as rows free")
    queue_size: int = setting(256, "most requests waiting for a worker; past it requests get `overloaded`")
    max_attempts: int = setting(2, "dispatches of one request before it fails with `worker_failed`")
    max_new_tokens: int = setting(4096, "largest max_new_tokens a request may ask for")
    max_image_bytes: int = setting(20 << 20, "largest encoded image (one frame) in bytes")
    max_images: int = setting(16, "most images in one request")
    max_image_pixels: int = setting(40_000_000, "largest decoded image in pixels (decompression-bomb guard)")
    max_prompt_tokens: int = setting(16384, "most prompt tokens in one request, text and image tokens together; image tokens are counted from width and height before the model sees them")
    max_request_bytes: int = setting(64 << 20, "largest request message in bytes, header and every image frame together")
    queue_bytes: int = setting(1 << 30, "byte budget of every accepted request not yet answered, queued or on a worker (the supervisor keeps each for a retry until its answer); past it requests get `overloaded`")
    frontend_hwm: int = setting(1000, "messages the frontend holds per client in each direction; replies to a client that never reads are dropped past it")
    heartbeat_interval_s: float = setting(1.0, "seconds between worker heartbeats")
    heartbeat_liveness: int = setting(10, "missed heartbeats after which a worker is presumed hung and killed")
    start_timeout_s: float = setting(600.0, "seconds a worker may take from spawn to ready")
    spare_workers: bool = setting(True, "keep one spare process per slot with torch, transformers and the engine imported but nothing loaded and no CUDA context (host memory only, see README); a crash or recycle loads the spare instead of starting a cold process. Spares start once the slot's worker is ready")
    worker_launch: str = setting("auto", "how worker and spare processes start. fork: from a launcher process, one per supervisor, that imported torch, transformers and the engine once (a start skips those seconds of CPU; a spare shares their memory with it); exec: each a fresh interpreter; auto: fork for engines hf and noop on the CPU, exec otherwise (forking is not yet run on a GPU). A launcher that ends leaves exec")
    stop_grace_s: float = setting(30.0, "seconds to finish accepted requests on shutdown")
    kill_grace_s: float = setting(10.0, "seconds between asking a worker to exit, SIGTERM and SIGKILL")
    restart_backoff_s: float = setting(0.5, "first delay before restarting a crashed worker; doubles per crash (0: at once)")
    restart_backoff_max_s: float = setting(30.0, "longest delay between restarts")
    restart_intensity: int = setting(5, "crashes within restart_period_s that mark a slot failed")
    restart_period_s: float = setting(60.0, "window for restart_intensity, in seconds")
    restart_failed_backoff_s: float = setting(10.0, "a failed slot (too many crashes, or a model that cannot load) tries again after this many seconds; doubles per failure in a row")
    restart_failed_backoff_max_s: float = setting(300.0, "longest wait of a failed slot before it tries again")
    request_hang_timeout_s: float = setting(600.0, "seconds a worker holding requests may go without answering or streaming any of them (counted from the oldest one's dispatch or its last answer, whichever is later) before it is presumed hung and killed")
    recycle_fragmentation: float = setting(0.0, "soft: recycle when (reserved - allocated) / reserved reaches this (0: off)")
    recycle_fragmentation_min_reserved_bytes: int = setting(1 << 30, "fragmentation counts only above this reserved size, so an idle worker never trips it (0: at any size)")
    recycle_reserved_bytes: int = setting(0, "soft: recycle when the allocator has reserved this many bytes (0: off); must exceed a fresh worker's weights plus KV pool, checked at start")
    recycle_alloc_retries: int = setting(0, "soft: recycle after this many allocator retries since start (0: off)")
    recycle_rss_bytes: int = setting(0, "soft: recycle when host RSS reaches this many bytes (0: off)")
    recycle_requests: int = setting(0, "soft: recycle after this many requests (0: off)")
    recycle_requests_jitter: int = setting(0, "up to this many extra requests, drawn per worker, so slots never recycle together (0: none)")
    recycle_age_s: float = setting(0.0, "soft: recycle a worker this many seconds old (0: off)")
    recycle_device_used_fraction: float = setting(0.0, "hard: recycle when NVML shows this fraction of device memory used (0: off)")
    recycle_ooms: int = setting(1, "hard: recycle after this many CUDA out-of-memory errors (0: off)")
    recycle_soft_wait_s: float = setting(30.0, "a soft recycle waits this long for the worker to be idle, then drains anyway (0: drains at once)")
    recycle_overlap: str = setting("auto", "start the replacement before retiring the old worker: auto (when memory has room), always, never")
    recycle_overlap_margin: float = setting(0.15, "auto overlap needs free memory of the worker's footprint times (1 + margin)")
    max_concurrent_recycles: int = setting(1, "slots recycling at the same time")
    state_file: str = setting("", "JSON file where per-slot counters survive a supervisor restart (empty: none)")
    log_level: str = setting("info", "log level: debug, info, warning, error")
    log_format: str = setting("text", "log lines as text (`event=... key=value`) or json (one object per line)")
    insecure: bool = setting(False, "allow a tcp:// frontend on a non-loopback address without CurveZMQ, or an HTTP gateway on one without an API key (anyone who reaches the port may send requests)")
    curve_dir: str = setting("", "folder from `qvl-supervisor keygen`: the frontend admits only CurveZMQ clients whose public key is in its allowed/ (empty: no encryption)")
    http: str = setting("", "host:port for the HTTP gateway, its own process (empty: no gateway)")
    http_api_key_file: str = setting("", "file holding the key HTTP clients must send as `Authorization: Bearer KEY` (empty: none)")
    http_remote_images: bool = setting(False, "let the HTTP gateway fetch image URLs over http(s), public addresses only; otherwise only data URLs")
    http_max_body_bytes: int = setting(32 << 20, "largest HTTP request body in bytes; larger ones get 413 (a data URL takes 4/3 of its image's bytes)")
    http_max_concurrent: int = setting(256, "most HTTP requests the gateway handles at once; more get 429")

    @property
    def limits(self) -> Limits:
        return Limits(max_frame_bytes=self.max_image_bytes, max_images=self.max_images,
                      max_new_tokens=self.max_new_tokens, max_request_bytes=self.max_request_bytes)

    @property
    def forks_workers(self) -> bool:
        """Whether workers are forked from a launcher (`worker_launch`, `auto` resolved)."""
        if self.worker_launch == "auto":
            return self.engine != "vllm" and self.device == "cpu"
        return self.worker_launch == "fork"

    def validate(self) -> None:
        faults = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.type in (int, float) and value < 0:
                faults.append(f"{f.name} must not be negative (got {value})")
        if not self.frontend.startswith(("tcp://", "ipc://")):
            faults.append(f"frontend must be a tcp:// or ipc:// endpoint (got {self.frontend!r})")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            faults.append(f"device must be cpu or cuda:N (got {self.device!r})")
        for name in ("workers", "max_batch_size", "max_inflight", "queue_size", "max_attempts",
                     "max_new_tokens", "max_images", "heartbeat_liveness", "restart_intensity",
                     "max_concurrent_recycles", "frontend_hwm", "queue_bytes", "max_request_bytes",
                     "max_prompt_tokens", "vllm_max_model_len", "prefill_tokens"):
            if getattr(self, name) < 1:
                faults.append(f"{name} must be at least 1")
        if not 0 <= self.memory_fraction <= 1:
            faults.append("memory_fraction must be in 0..1")
        if self.dtype not in ("auto", "bfloat16", "float16", "float32"):
            faults.append(f"dtype must be auto, bfloat16, float16 or float32 (got {self.dtype!r})")
        if self.kv_cache not in ("auto", "static", "dynamic", "continuous"):
            faults.append(f"kv_cache must be auto, static, dynamic or continuous (got {self.kv_cache!r})")
        if self.kv_cache_tokens < 256:
            faults.append("kv_cache_tokens must be at least 256 (one length bucket)")
        if self.engine not in ("hf", "vllm", "noop"):
            faults.append(f"engine must be hf, vllm or noop (got {self.engine!r})")
        if self.engine == "vllm" and not self.device.startswith("cuda"):
            faults.append("engine vllm needs a cuda device")
        if self.worker_launch not in ("auto", "fork", "exec"):
            faults.append(f"worker_launch must be auto, fork or exec (got {self.worker_launch!r})")
        if self.worker_launch == "fork" and self.engine == "vllm":
            faults.append("worker_launch fork is for engines hf and noop: vLLM's workers start as fresh processes")
        if self.vllm_render_processes > 64:
            faults.append(f"vllm_render_processes must be at most 64 (got {self.vllm_render_processes})")
        if not 0 < self.vllm_memory_share < 1:
            faults.append(f"vllm_memory_share must be between 0 and 1 (got {self.vllm_memory_share})")
        if self.recycle_overlap not in ("auto", "always", "never"):
            faults.append(f"recycle_overlap must be auto, always or never (got {self.recycle_overlap!r})")
        if not 0 <= self.recycle_device_used_fraction <= 1:
            faults.append("recycle_device_used_fraction must be in 0..1")
        if self.gpus and self.gpus != "all" and not all(p.strip().isdigit() for p in self.gpus.split(",")):
            faults.append(f"gpus must be `all` or comma-separated GPU indices (got {self.gpus!r})")
        if self.gpus and not self.device.startswith("cuda"):
            faults.append("gpus needs a cuda device")
        if self.log_format not in ("text", "json"):
            faults.append(f"log_format must be text or json (got {self.log_format!r})")
        if self.log_level not in ("debug", "info", "warning", "error"):
            faults.append(f"log_level must be debug, info, warning or error (got {self.log_level!r})")
        for name in ("heartbeat_interval_s", "start_timeout_s", "request_hang_timeout_s"):
            if getattr(self, name) <= 0:
                faults.append(f"{name} must be positive (0 is not `off` here)")
        faults += _state_file_faults(self.state_file)
        faults += baseline_faults(self)
        if not (_on_loopback(self.frontend) or self.curve_dir or self.insecure):
            faults.append(f"frontend {self.frontend} can be reached from other hosts without CurveZMQ: set "
                          "curve_dir (see `qvl-supervisor keygen`), or insecure = true to let anyone who "
                          "reaches the port send requests")
        if self.http_api_key_file:
            try:
                if not Path(self.http_api_key_file).read_text().strip():
                    faults.append(f"http_api_key_file {self.http_api_key_file} is empty: HTTP clients would "
                                  "need no key; write a key into it, or leave http_api_key_file unset")
            except (OSError, UnicodeDecodeError) as exc:
                faults.append(f"http_api_key_file cannot be read: {exc}")
        for name in ("http_max_body_bytes", "http_max_concurrent"):
            if getattr(self, name) < 1:
                faults.append(f"{name} must be at least 1")
        if self.http and not self.http.rpartition(":")[2].isdigit():
            faults.append(f"http must be host:port (got {self.http!r})")
        if self.http and not (_on_loopback(f"tcp://{self.http}") or self.http_api_key_file or self.insecure):
            faults.append(f"http {self.http} can be reached from other hosts without an API key: set "
                          "http_api_key_file, or insecure = true to let anyone who reaches the port send requests")
        if faults:
            raise ConfigError("invalid configuration:\n  " + "\n  ".join(faults))


def _on_loopback(endpoint: str) -> bool:
    """Whether only this host can reach `endpoint`: ipc://, or tcp:// on a loopback address."""
    if not endpoint.startswith("tcp://"):
        return True
    host = endpoint[len("tcp://"):].rpartition(":")[0].strip("[]")
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:  # `*`, an interface name, a public host name
        return False


def _state_file_faults(path: str) -> list[str]:
    """The state file is written while the loop runs: its folder must exist and take new files."""
    if not path:
        return []
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return [f"state_file {path!r}: its folder {folder} does not exist"]
    if not os.access(folder, os.W_OK | os.X_OK):
        return [f"state_file {path!r}: its folder {folder} is not writable by this user"]
    if os.path.isdir(path):
        return [f"state_file {path!r} is a folder; name a file"]
    return []


FIELDS = {f.name: f for f in dataclasses.fields(Config)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting (`queue_size` -> `--queue-size`), defaulting to 'not given'."""
    parser.add_argument("--config", type=Path, help="TOML file of settings; flags override it")
    for name, f in FIELDS.items():
        parser.add_argument("--" + name.replace("_", "-"), dest=name, type=_switch if f.type is bool else f.type,
                            default=None, help=f"{f.metadata['help']} (default: {f.default})")


def _switch(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1", "yes", "on")


def load_config(args: argparse.Namespace) -> Config:
    """Defaults, then the TOML file, then flags; validated."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        try:
            values.update(tomllib.loads(Path(args.config).read_text()))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read {args.config}: {exc}") from None
    values.update({k: v for k, v in vars(args).items() if k in FIELDS and v is not None})
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"unknown settings: {', '.join(unknown)}")
    faults = []
    for name, value in values.items():
        want = FIELDS[name].type
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            values[name] = float(value)
        elif not isinstance(value, want) or (isinstance(value, bool) and want is not bool):
            faults.append(f"{name} must be of type {want.__name__} (got {value!r})")
    if faults:
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(faults))
    config = Config(**values)
    config.validate()
    return config
