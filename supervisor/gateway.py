"""The HTTP gateway: OpenAI-style chat completions, a simple ask form, health and Prometheus metrics.

Its own process (`python -m qvl.supervisor.gateway SPEC`, started and restarted by the supervisor
with a `GatewaySpec`), and a plain client of the supervisor's frontend: it holds no queue or state
of its own. Every request passes one guard first (in-flight limit 429, outside which `/health` and
`/metrics` stay; API key 401; body size 413; body deadline 408); chat bodies become messages only
through `openai_chat.parse_chat`'s whitelist, and remote images are fetched on threads of their
own; any failure in a handler becomes a typed JSON error and the server goes on. An HTTP client
that goes away before its answer (a stream closed early too) has its request cancelled: the
supervisor client's call is cancelled, and it sends `cancel`. Needs the `http` extra (FastAPI,
uvicorn, prometheus-client, python-multipart).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from starlette.exceptions import HTTPException

from qvl.protocol import AsyncClient, QvlError
from qvl.protocol.curve import client_keys
from qvl.protocol.errors import ERROR_CODES

from .gateway_process import GatewaySpec
from .image_fetch import request_fetcher
from .openai_chat import parse_chat, parse_json

HTTP_STATUS = {"bad_request": 400, "unsupported_version": 400, "overloaded": 429, "worker_failed": 503,
               "shutting_down": 503, "out_of_memory": 503, "deadline_exceeded": 504, "timeout": 504,
               "internal": 500}
OPEN_PATHS = ("/health", "/metrics")  # for load balancers and scrapers; everything else needs the key
BODY_TIMEOUT_S = 30.0  # to receive a whole body; a client that stalls in it gets 408 and frees its slot
CLIENT_GONE = 499  # no one reads it: the status nginx logs for a client that closed its request
FETCH_THREADS = 16  # remote images fetched at once, for all requests together
log = logging.getLogger("qvl.gateway")


def create_app(spec: GatewaySpec, api_key: str = "", client: AsyncClient | None = None,
               timeout: float = 600.0, body_timeout_s: float = BODY_TIMEOUT_S) -> FastAPI:
    """The application; `client` stands in for the supervisor connection (made on first use)."""
    state: dict = {} if client is None else {"client": client}
    # with remote images on, chat bodies are checked on these threads: slow image servers hold
    # none of the event loop's default ones
    fetching = ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="qvl-image-fetch") if spec.remote_images else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        watcher = asyncio.ensure_future(_exit_with_parent(spec.parent)) if spec.parent else None
        yield
        if watcher:
            watcher.cancel()
        if fetching:
            fetching.shutdown(wait=False, cancel_futures=True)
        if "client" in state:
            await state["client"].close()

    app = FastAPI(title="qvl gateway", lifespan=lifespan)
    app.add_middleware(_Guard, api_key=api_key, max_body_bytes=spec.max_body_bytes,
                       max_concurrent=spec.max_concurrent, body_timeout_s=body_timeout_s)

    def supervisor() -> AsyncClient:
        if "client" not in state:
            state["client"] = AsyncClient(spec.frontend, timeout=timeout, limits=spec.limits,
                                          **client_keys(spec.curve_dir))
        return state["client"]

    @app.exception_handler(QvlError)
    async def qvl_error(request: Request, exc: QvlError):
        return _error(HTTP_STATUS.get(exc.code, 500), exc.code, exc.message)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):
        return _error(exc.status_code, "bad_request" if exc.status_code < 500 else "internal", str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid_form(request: Request, exc: RequestValidationError):
        fields = ", ".join(".".join(map(str, e.get("loc", ()))) for e in exc.errors())
        return _error(400, "bad_request", f"invalid or missing fields: {fields}")

    @app.exception_handler(Exception)
    async def our_fault(request: Request, exc: Exception):
        log.error("event=gateway_error path=%s error=%r", request.url.path, exc)
        return _error(500, "internal", "the gateway failed on this request; it is logged")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await asyncio.to_thread(parse_json, await request.body())
        fetch = request_fetcher(spec.limits.max_frame_bytes) if fetching else None  # its deadline runs from now
        chat = await asyncio.get_running_loop().run_in_executor(fetching, parse_chat, body, spec.limits, fetch)
        params = chat.params
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": reply_id, "created": created, "model": chat.model or spec.model_name}
        if chat.stream:
            stream = supervisor().stream(chat.messages, **params)
            try:  # errors before any text become an HTTP status
                first = await _unless_gone(request, anext(stream))
            except _ClientGone:
                return Response(status_code=CLIENT_GONE)
            return StreamingResponse(_events(head, first, stream, params, chat.include_usage),
                                     media_type="text/event-stream")
        try:
            result = await _unless_gone(request, supervisor().generate(chat.messages, **params))
        except _ClientGone:
            return Response(status_code=CLIENT_GONE)
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": _finish(result, params)}],
                "usage": _usage(result.usage)}

    @app.post("/api/ask")
    async def ask(request: Request, image: UploadFile = File(...), question: str = Form(...),
                  max_new_tokens: int = Form(128)):
        try:
            result = await _unless_gone(request, supervisor().ask(await image.read(), question,
                                                                  max_new_tokens=max_new_tokens))
        except _ClientGone:
            return Response(status_code=CLIENT_GONE)
        return {"answer": result.text, "usage": result.usage, "timings": result.timings, "worker": result.worker}

    @app.get("/api/status")
    async def status():
        return await supervisor().status(timeout=10)

    @app.get("/health")
    async def health():
        try:
            status = await supervisor().status(timeout=5)
        except QvlError as exc:
            return JSONResponse({"status": "unavailable", "reason": exc.message}, status_code=503)
        ready = sum(w["state"] == "ready" for w in status["workers"])
        failed = [{"slot": w["slot"], **w["failed"]} for w in status["workers"] if w.get("failed")]
        body = {"status": "ok" if ready else "unavailable", "ready_workers": ready, "failed_slots": failed,
                "gateway": status.get("gateway")}
        return JSONResponse(body, status_code=200 if ready and not status["shutting_down"] else 503)

    @app.get("/metrics")
    async def metrics():
        registry = CollectorRegistry()
        registry.register(_Snapshot(await supervisor().status(timeout=10)))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


class _Guard:
    """Before any route: at most `max_concurrent` requests in flight (429; `OPEN_PATHS` take no slot,
    so a busy gateway still answers them), the API key (401), and a body of at most `max_body_bytes`
    (413), by its Content-Length and by the bytes that arrive, all of it within `body_timeout_s` (408)."""

    def __init__(self, app, api_key: str, max_body_bytes: int, max_concurrent: int, body_timeout_s: float):
        self.app, self.api_key = app, api_key
        self.max_body_bytes, self.max_concurrent = max_body_bytes, max_concurrent
        self.body_timeout_s = body_timeout_s
        self.inflight = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = self._refusal(scope)
        if refusal is not None:
            return await refusal(scope, receive, send)
        counted = scope["path"] not in OPEN_PATHS  # health checks and scrapes take no slot
        self.inflight += counted
        try:
            await self.app(scope, self._limited(receive), send)
        finally:
            self.inflight -= counted

    def _refusal(self, scope) -> JSONResponse | None:
        if self.inflight >= self.max_concurrent and scope["path"] not in OPEN_PATHS:
            return _error(429, "overloaded", f"the gateway already handles {self.max_concurrent} requests")
        headers = dict(scope["headers"])
        given = headers.get(b"authorization", b"")
        if self.api_key and scope["path"] not in OPEN_PATHS \
                and not secrets.compare_digest(given, f"Bearer {self.api_key}".encode()):
            return _error(401, "unauthorized", "a valid `Authorization: Bearer <key>` header is required")
        declared = headers.get(b"content-length", b"0")
        if not declared.isdigit():
            return _error(400, "bad_request", "Content-Length must be a number")
        if int(declared) > self.max_body_bytes:
            return _error(413, "bad_request", f"the body exceeds {self.max_body_bytes} bytes")
        return None

    def _limited(self, receive):
        received, whole = 0, False
        deadline = asyncio.get_running_loop().time() + self.body_timeout_s

        async def limited_receive():
            nonlocal received, whole
            if whole:  # after the body only a disconnect can come, whenever it comes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except TimeoutError:
                raise HTTPException(408, f"the body did not arrive within {self.body_timeout_s:g}s") from None
            received += len(message.get("body", b""))
            if received > self.max_body_bytes:
                raise HTTPException(413, f"the body exceeds {self.max_body_bytes} bytes")
            whole = not message.get("more_body", False)
            return message

        return limited_receive


class _ClientGone(Exception):
    """The HTTP client disconnected before its answer."""


async def _unless_gone(request: Request, call):
    """The result of `call`, a supervisor client's coroutine; if the HTTP client disconnects first,
    `call` is cancelled (which cancels its request) and `_ClientGone` raised. The body is read by
    now, so only a disconnect can come from `receive`."""
    answer = asyncio.ensure_future(call)
    gone = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not answer.done():  # the client went, or this handler itself is being cancelled
            answer.cancel()
    if not answer.done():
        await asyncio.wait({answer})  # as its cancellation unwinds, the client sends `cancel`
        raise _ClientGone()
    return answer.result()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _events(head: dict, first, stream, params: dict, usage: bool):
    """Server-sent events in OpenAI's chunk form, ending with `[DONE]`. Closed early (the HTTP client
    went away), it closes the supervisor stream, which cancels its request."""
    def event(choices: list, **extra) -> str:
        return _sse({**head, "object": "chat.completion.chunk", "choices": choices, **extra})

    def choice(delta: dict, finish: str | None = None) -> list:
        return [{"index": 0, "delta": delta, "finish_reason": finish}]

    yield event(choice({"role": "assistant", "content": ""}))
    chunk = first
    try:
        while True:
            if chunk.text:
                yield event(choice({"content": chunk.text}))
            if chunk.done:
                yield event(choice({}, _finish(chunk, params)))
                if usage:
                    yield event([], usage=_usage(chunk.usage))
                break
            chunk = await anext(stream)
    except QvlError as exc:  # headers are sent: the error travels as an event
        yield _sse(_error_body(exc.code, exc.message))
    except Exception as exc:
        log.error("event=gateway_error path=stream error=%r", exc)
        yield _sse(_error_body("internal", "the gateway failed on this stream; it is logged"))
    finally:
        await stream.aclose()  # at its end a no-op; before it, the request is cancelled
    yield "data: [DONE]\n\n"


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _finish(answer, params: dict) -> str:
    """OpenAI's finish_reason: the answer's own (a `Result` or last `Chunk`), else guessed from usage."""
    if answer.finish_reason:
        return answer.finish_reason
    return "length" if answer.usage.get("completion_tokens", 0) >= params["max_new_tokens"] else "stop"


def _usage(usage: dict) -> dict:
    prompt, completion = usage.get("prompt_tokens", 0), usage.get("completion_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse(_error_body(code, message), status_code=status)


def _error_body(code: str, message: str) -> dict:
    return {"error": {"message": message, "type": code, "code": code}}


class _Snapshot:
    """A Prometheus collector over one `status` reply."""

    def __init__(self, status: dict):
        self.status = status

    def collect(self):
        s = self.status
        requests = CounterMetricFamily("qvl_requests", "requests answered, by outcome", labels=["outcome"])
        for outcome in ("answered", "cancelled", *sorted(ERROR_CODES)):
            requests.add_metric([outcome], s["counters"].get(outcome, 0))
        yield requests
        for name, key, text in (("qvl_request_latency_seconds", "latency_seconds", "acceptance to reply"),
                                ("qvl_queue_time_seconds", "queue_seconds", "acceptance to first dispatch")):
            h = s["metrics"][key]
            yield HistogramMetricFamily(name, text, sum_value=h["sum"],
                                        buckets=[(str(b), c) for b, c in h["buckets"]])
        yield GaugeMetricFamily("qvl_queue_depth", "requests waiting for a worker", value=s["queue_depth"])
        yield GaugeMetricFamily("qvl_inflight", "requests on workers", value=s["inflight"])
        yield GaugeMetricFamily("qvl_held_bytes", "bytes of the requests accepted and not yet answered",
                                value=s["held_bytes"])
        recycles = CounterMetricFamily("qvl_recycles", "worker recycles started, by reason", labels=["reason"])
        for reason, count in sorted(s["metrics"]["recycles"].items()):
            recycles.add_metric([reason], count)
        yield recycles
        per_worker = {
            "qvl_worker_ready": ("1 when the slot's worker is ready", lambda w: float(w["state"] == "ready")),
            "qvl_worker_reserved_bytes": ("CUDA allocator reserved bytes",
                                          lambda w: w["telemetry"].get("reserved_bytes", 0)),
            "qvl_worker_allocated_bytes": ("CUDA allocator allocated bytes",
                                           lambda w: w["telemetry"].get("allocated_bytes", 0)),
            "qvl_worker_fragmentation": ("(reserved - allocated) / reserved",
                                         lambda w: w["telemetry"].get("fragmentation", 0.0)),
            "qvl_worker_rss_bytes": ("worker host RSS", lambda w: w["telemetry"].get("rss_bytes", 0)),
        }
        for name, (text, read) in per_worker.items():
            family = GaugeMetricFamily(name, text, labels=["slot"])
            for w in s["workers"]:
                family.add_metric([str(w["slot"])], read(w))
            yield family
        for name, key, text in (("qvl_worker_restarts", "restarts", "crash restarts per slot"),
                                ("qvl_worker_served", "served_total", "requests served per slot")):
            family = CounterMetricFamily(name, text, labels=["slot"])
            for w in s["workers"]:
                family.add_metric([str(w["slot"])], w[key])
            yield family


async def _exit_with_parent(parent: int) -> None:
    """The supervisor started this process; it does not outlive it."""
    while os.getppid() == parent:
        await asyncio.sleep(1.0)
    os._exit(1)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        spec = GatewaySpec.from_json(args[0])
        api_key = open(spec.api_key_file).read().strip() if spec.api_key_file else ""
    except (IndexError, ValueError, TypeError, OSError) as exc:
        print(f"qvl.gateway: usage: python -m qvl.supervisor.gateway SPEC_JSON ({type(exc).__name__}: {exc})",
              file=sys.stderr)
        return 2
    if spec.api_key_file and not api_key:
        print(f"qvl.gateway: the API key file {spec.api_key_file} is empty; refusing to serve without a key",
              file=sys.stderr)
        return 2
    host, _, port = spec.listen.rpartition(":")
    uvicorn.run(create_app(spec, api_key), host=host.strip("[]") or "127.0.0.1", port=int(port),
                log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
