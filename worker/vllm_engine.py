"""vLLM's engine inside the worker: iteration-level scheduling, qvl's recycling around it.

The worker drives vLLM's `LLMEngine`: its step loop adds a request as soon as its inputs are ready
and calls `step` once the engine core has handed a step back (`ready_to_step`; vLLM's output
thread rings the worker's bell as it queues the step, so the worker sleeps on its socket, not in
`step`, and a request that arrives mid-step reaches the core at once); vLLM schedules every step
(new rows prefill in chunks beside running ones) and a row leaves the batch when it ends. `abort`
is vLLM's abort. vLLM's engine core (scheduler, model, CUDA state) runs in a child process of the
worker, as in vLLM's own server, and dies with it (`vllm_core.py`); in the worker's process its GIL
would be shared with detokenizing, image processing and the socket, which cost a fifth of vLLM's
speed at 32 to 64 requests in flight. The child's allocator and device figures are read over
vLLM's RPC at most every `FIGURES_INTERVAL_S`, between steps, and sent with every reply; its KV
cache usage comes from vLLM's scheduler statistics.

Prompts are built by qvl, not by vLLM's chat rendering (`vllm_inputs.py`). Images and prompts are
made ready on the worker's image pool, text-only requests too; the main thread only adds requests
and steps. The pool's threads hand the rendering to `vllm_render_processes` render processes
(`render_processes.py`: vLLM's rendering is GIL-bound, and a round of requests released together
reaches the core sooner made in parallel), or, with none, render one request at a time themselves
(`_render_lock`). Image tokens are counted from sizes before any pixel is processed, as in the
transformers engine.

Imported only when `engine = "vllm"`: neither the supervisor nor the default engine imports vLLM.
The worker itself makes no CUDA context: the device is the child's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import NoReturn, Sequence

import psutil
import torch
from PIL import Image
from qvl.protocol.contract import ModelOptions
from qvl.protocol.errors import BadRequest, WorkerFailed
from qvl.protocol.exits import WorkerExit
from qvl.protocol.messages import LENGTH, STOPPED, GenerationParams
from transformers import AutoProcessor

from .engine import Completion, StepOutput
from .image_tokens import ImageTokens

os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")

from vllm import EngineArgs, SamplingParams  # noqa: E402  (after the environment above)
from vllm.sampling_params import RequestOutputKind  # noqa: E402
from vllm.usage.usage_lib import UsageContext  # noqa: E402
from vllm.v1.engine.exceptions import EngineDeadError  # noqa: E402
from vllm.v1.engine.llm_engine import LLMEngine  # noqa: E402
from vllm.v1.executor import Executor  # noqa: E402
from vllm.v1.metrics.loggers import StatLoggerBase  # noqa: E402

from .parent import exit_when_any_ends  # noqa: E402
from .render_processes import RenderProcesses, RenderProcessDied  # noqa: E402
from .vllm_core import (  # noqa: E402
    EXTENSION, FIGURES_METHOD, PID_METHOD, engine_core_died, tie_engine_core_to_worker)
from .vllm_inputs import Rendered, VllmInputs  # noqa: E402

FIGURES_INTERVAL_S = 1.0
log = logging.getLogger("qvl.worker")


@dataclass
class _Row:
    added_at: float  # before vLLM's add, on the engine core's clock (time.monotonic), as are all a row's times
    prompt_tokens: int
    render_ms: float
    text: list[str] = field(default_factory=list)
    tokens: int = 0
    first_at: float | None = None


class VllmEngine:
    steps = True  # the worker runs this engine step by step, not batch by batch
    # a text-only request's prompt is made on the image pool too: there it waits for a render
    # process, or for `_render_lock`, which an image's rendering holds for 10-25 ms, while the
    # main thread steps every few ms
    text_prompts_on_pool = True

    def __init__(self, options: ModelOptions, max_prompt_tokens: int, max_images: int):
        self.options = options
        processor = AutoProcessor.from_pretrained(options.model)
        self.image_tokens = ImageTokens.of(processor.image_processor)
        compilation = {} if options.vllm_compile else {"mode": 0, "cudagraph_mode": "FULL_DECODE_ONLY"}
        args = EngineArgs(
            model=options.model, dtype=options.dtype, seed=0,
            gpu_memory_utilization=options.vllm_memory_share, max_model_len=options.vllm_max_model_len,
            limit_mm_per_prompt={"image": max_images, "video": 0},
            mm_processor_cache_gb=0,  # no cache shared between the image pool and the engine
            compilation_config=compilation, worker_extension_cls=EXTENSION)
        self._scheduler_stats = _SchedulerStats()
        config = args.create_engine_config(UsageContext.ENGINE_CONTEXT)
        # started first, they import and build their renderers while the engine core loads
        self._renders = RenderProcesses(options.vllm_render_processes, VllmInputs.of_config, options.model, config,
                                        max_prompt_tokens, options.vllm_max_model_len) \
            if options.vllm_render_processes else None
        tie_engine_core_to_worker()
        self.llm = LLMEngine(config, Executor.get_class(config), log_stats=True, usage_context=UsageContext.ENGINE_CONTEXT,
                             stat_loggers=[self._scheduler_stats.factory], multiprocess_mode=True)
        (self.engine_core_pid,) = self.llm.collective_rpc(PID_METHOD)
        self._outputs = self.llm.engine_core.outputs_queue  # what `step` waits on: the core's steps, queued
        self._stopping_core = exit_when_any_ends([self.engine_core_pid], engine_core_died)
        self.device = torch.device("cuda", 0)  # the child's, under the worker's CUDA_VISIBLE_DEVICES
        self.inputs = VllmInputs(processor, config.model_config, self.llm.renderer, max_prompt_tokens,
                                 options.vllm_max_model_len)
        self._render_lock = threading.Lock()
        if self._renders is not None:
            self._renders.wait_ready()  # one that could not start fails the load (its traceback in the log)
        self._stopping_renders = exit_when_any_ends(self._renders.pids if self._renders else [], render_process_died)
        self._process = psutil.Process(os.getpid())
        self._render_memory = 0  # the render processes' own memory, read with the core's figures
        self._core_figures: dict = {}
        self._core_figures_at = float("-inf")
        self.rows: dict[str, _Row] = {}

    @property
    def running(self) -> int:
        return len(self.rows)

    def ready_to_step(self) -> bool:
        """Whether the engine core has handed back a step (or its failure) that `step` would take
        without waiting; the worker sleeps on its socket, not in `step`, until then."""
        return not self._outputs.empty()

    def ring_on_output(self, bell) -> None:
        """Ring `bell` whenever vLLM's client thread queues what the engine core sent back. The
        thread calls the queue's `put_nowait`; an attribute of the queue itself takes its place."""
        put = self._outputs.put_nowait

        def put_and_ring(item) -> None:
            put(item)
            bell.ring()
        self._outputs.put_nowait = put_and_ring

    def has_room(self, joining: Sequence[Rendered], prompt: Rendered) -> bool:
        return True  # vLLM queues what it cannot schedule yet

    def stats(self) -> dict:
        """vLLM's own figures, sent beside the allocator's in every heartbeat and reply."""
        return {"kv_cache_usage": self._scheduler_stats.kv_cache_usage, "running_requests": len(self.rows),
                "engine_core_pid": self.engine_core_pid, "render_processes": len(self._renders.pids) if self._renders else 0}

    def process_figures(self) -> dict:
        """The engine core's allocator and device figures as last read; `rss_bytes` is this worker's
        RSS plus the engine core's unique set and the render processes' unshared memory. Any thread may call this."""
        figures = dict(self._core_figures)
        figures["rss_bytes"] = figures.get("rss_bytes", 0) + self._process.memory_info().rss + self._render_memory
        return figures

    def _read_core_figures(self) -> None:
        """Ask the engine core for its figures: on the main thread only (vLLM's client socket is not
        thread-safe), and it waits for the step in progress. A reading that fails keeps the last."""
        try:
            with self._core_alive():
                (self._core_figures,) = self.llm.collective_rpc(FIGURES_METHOD)
        except Exception as exc:
            log.warning("event=engine_core_figures_failed error=%s: %s", type(exc).__name__, exc)
        if self._renders is not None:
            self._render_memory = self._renders.memory_bytes()
        self._core_figures_at = time.monotonic()

    def _refresh_core_figures(self) -> None:
        if time.monotonic() - self._core_figures_at >= FIGURES_INTERVAL_S:
            self._read_core_figures()

    def after_step(self) -> None:
        """Called by the worker once a step's replies and chunks are sent: refresh the figures when
        due. Reading them waits for the engine core's step in progress, which neither the step's
        output, already queued, nor its replies need wait for."""
        self._refresh_core_figures()

    def idle(self) -> float:
        """Called by the worker while nothing runs: refresh the figures when due; the seconds until
        they are due again."""
        self._refresh_core_figures()
        return FIGURES_INTERVAL_S

    @contextlib.contextmanager
    def _core_alive(self):
        """vLLM's client raises `EngineDeadError` once its engine core is gone: the worker ends."""
        try:
            yield
        except EngineDeadError:
            engine_core_died(self.engine_core_pid)

    def close(self) -> None:
        """Stop the render processes and the engine core, as the worker stops: its end is then no failure."""
        self._stopping_renders.set()
        if self._renders is not None:
            self._renders.close()
        self._stopping_core.set()
        self.llm.engine_core.shutdown()

    def warm_up(self) -> None:
        """One small request with an image, through the whole path."""
        image = Image.new("RGB", (64, 64), (127, 127, 127))
        messages = [{"role": "user", "content": [{"type": "image", "frame": 0}, {"type": "text", "text": "hi"}]}]
        params = GenerationParams(max_new_tokens=2)
        self.add([(-1, self.process_images(messages, [image], params), params)])
        while self.rows:
            self.step()
        self._read_core_figures()

    def process_images(self, messages: list, frames: Sequence[Image.Image], params: GenerationParams) -> Rendered:
        """The whole engine input of a request: runs on the worker's image pool."""
        references = [part["frame"] for m in messages for part in m["content"] if part["type"] == "image"]
        tokens = self.check_images(messages, [image.size for image in frames], params)
        return self._render(messages, [frames[f] for f in references], sum(tokens), params)

    def check_images(self, messages: list, sizes: list[tuple[int, int]], params: GenerationParams) -> tuple[int, ...]:
        """The tokens of each image reference, from the frames' sizes alone; `BadRequest` where
        they cannot fit. The worker calls it before it decodes a pixel."""
        tokens = self.image_tokens.per_reference(messages, sizes)
        self.inputs.check_length(sum(tokens), "image tokens", params)
        return tokens

    def _render(self, messages: list, images: list[Image.Image], image_tokens: int,
                params: GenerationParams) -> Rendered:
        """In a render process when the worker has them (`render_ms` then the whole wait, the hop
        there and back included), else here, one request at a time."""
        if self._renders is None:
            with self._render_lock:
                return self.inputs.render(messages, images, image_tokens, params)
        started = time.monotonic()
        try:
            rendered = self._renders.render(messages, images, image_tokens, params)
        except RenderProcessDied as exc:  # before the watch on its pid ended the worker
            render_process_died(exc)
        return dataclasses.replace(rendered, render_ms=(time.monotonic() - started) * 1000.0)

    def prompt(self, messages: list, rendered: Rendered, params: GenerationParams) -> Rendered:
        """A request's engine input: what `process_images` made of it on the image pool, text-only
        requests included (`text_prompts_on_pool`)."""
        return rendered

    def add(self, requests: Sequence[tuple[int, Rendered, GenerationParams]]) -> None:
        """Start (key, engine input, params) requests: all start, or none does (those started are
        aborted and the error raised; vLLM's refusal of an input as `BadRequest`)."""
        started: list[int] = []
        try:
            for key, rendered, params in requests:
                row = _Row(time.monotonic(), rendered.prompt_tokens, rendered.render_ms)
                with self._core_alive():
                    self.llm.add_request(str(key), rendered.engine_input, sampling_params(params))
                self.rows[str(key)] = row
                started.append(key)
        except Exception as exc:
            for key in started:
                self.abort(key)
            if isinstance(exc, ValueError):  # vLLM's own refusal of an input
                raise BadRequest(str(exc)) from None
            raise

    def abort(self, key: int) -> tuple[str, int]:
        """Stop a running request now: the text and the number of tokens it had made."""
        row = self.rows.pop(str(key))
        with self._core_alive():
            self.llm.abort_request([str(key)])
        return "".join(row.text), row.tokens

    def step(self) -> list[StepOutput]:
        """One scheduling step: the new text of every request that made some, and the completions
        of those that ended."""
        outputs = []
        with self._core_alive():
            step = self.llm.step()
        for out in step:
            row = self.rows.get(out.request_id)
            if row is None:  # aborted meanwhile
                continue
            piece = out.outputs[0]
            if piece.finish_reason == "abort":  # not by qvl (its aborts left `rows`): the core is stopping
                engine_core_died(self.engine_core_pid)
            if piece.finish_reason == "error":  # vLLM's request-level failure, retryable by its own account
                del self.rows[out.request_id]
                outputs.append(StepOutput(int(out.request_id), "", 0,
                                          error=WorkerFailed("vLLM's engine core failed this request")))
                continue
            now = time.monotonic()
            if row.first_at is None and piece.token_ids:
                row.first_at = now
            row.text.append(piece.text)
            row.tokens += len(piece.token_ids)
            completion = None
            if out.finished:
                del self.rows[out.request_id]
                first = row.first_at or now
                completion = Completion("".join(row.text), row.prompt_tokens, row.tokens,
                                        (first - row.added_at) * 1000.0, (now - first) * 1000.0,
                                        LENGTH if piece.finish_reason == "length" else STOPPED,
                                        {"render_ms": row.render_ms, **core_timings(out.metrics, row.added_at)})
            outputs.append(StepOutput(int(out.request_id), piece.text, len(piece.token_ids), completion))
        return outputs


def render_process_died(which: int | RenderProcessDied) -> NoReturn:
    """The worker's end once a render process is gone (its pid, or the failed render that says so),
    as when its engine core is: the worker's requests are dispatched again by the supervisor."""
    log.error("event=render_process_died which=%s", which)
    os._exit(WorkerExit.ENGINE_FAILED)


class _SchedulerStats(StatLoggerBase):
    """vLLM's statistics logger interface, keeping the latest KV cache usage of its scheduler."""

    def __init__(self, vllm_config=None, engine_index: int = 0):
        self.kv_cache_usage = 0.0

    def factory(self, vllm_config, engine_index: int = 0) -> "_SchedulerStats":
        return self  # vLLM makes its loggers from factories; this one is made already

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
        if scheduler_stats is not None:
            self.kv_cache_usage = float(scheduler_stats.kv_cache_usage)

    def log_engine_initialized(self) -> None:
        pass


def core_timings(stats, added_at: float) -> dict:
    """Where a request's prefill went in vLLM's engine core, from its own timestamps (`RequestStateStats`,
    monotonic): reaching the core after the worker added it, waiting there to be scheduled, and from
    scheduled to its first token. Empty where vLLM kept none."""
    if stats is None or not (stats.queued_ts and stats.scheduled_ts and stats.first_token_ts):
        return {}
    return {"core_arrival_ms": (stats.queued_ts - added_at) * 1000.0,
            "core_queue_ms": (stats.scheduled_ts - stats.queued_ts) * 1000.0,
            "core_prefill_ms": (stats.first_token_ts - stats.scheduled_ts) * 1000.0}


def sampling_params(params: GenerationParams) -> SamplingParams:
    """qvl's generation parameters as vLLM's; every step reports the new text (DELTA)."""
    sampled = params.temperature > 0
    return SamplingParams(
        max_tokens=params.max_new_tokens, min_tokens=params.min_new_tokens,
        temperature=params.temperature, top_p=params.top_p if sampled else 1.0,
        top_k=params.top_k if sampled else 0, seed=params.seed, stop=list(params.stop) or None,
        output_kind=RequestOutputKind.DELTA)
