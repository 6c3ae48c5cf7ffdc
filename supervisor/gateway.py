"""The HTTP gateway: OpenAI-style chat completions, a simple ask form, health and Prometheus metrics.

Its own process (`python -m qvl.supervisor.gateway`, started by `qvl-supervisor start --http`),
and a plain client of the supervisor's frontend: it holds no queue or state of its own. Needs the
`http` extra (FastAPI, uvicorn, prometheus-client, python-multipart).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import os
import secrets
import time
import urllib.request
import uuid
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, File, Form, Request, UploadFile
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from qvl.protocol import AsyncClient, BadRequest, QvlError
from qvl.protocol.curve import client_keys
from qvl.protocol.errors import ERROR_CODES


HTTP_STATUS = {"bad_request": 400, "unsupported_version": 400, "overloaded": 429, "worker_failed": 503,
               "shutting_down": 503, "out_of_memory": 503, "deadline_exceeded": 504, "timeout": 504,
               "internal": 500}
OPEN_PATHS = ("/health", "/metrics")  # for load balancers and scrapers; everything else needs the key


def create_app(frontend: str, api_key: str = "", remote_images: bool = False, model_name: str = "qvl",
               curve_dir: str = "", parent: int = 0, timeout: float = 600.0) -> FastAPI:
    state: dict = {}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        watcher = asyncio.ensure_future(_exit_with_parent(parent)) if parent else None
        yield
        if watcher:
            watcher.cancel()
        if "client" in state:
            await state["client"].close()

    app = FastAPI(title="qvl gateway", lifespan=lifespan)

    def client() -> AsyncClient:
        if "client" not in state:
            state["client"] = AsyncClient(frontend, timeout=timeout, **client_keys(curve_dir))
        return state["client"]

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        given = request.headers.get("authorization", "")
        if api_key and request.url.path not in OPEN_PATHS \
                and not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            return _error(401, "unauthorized", "a valid `Authorization: Bearer <key>` header is required")
        try:
            return await call_next(request)
        except QvlError as exc:
            return _error(HTTP_STATUS.get(exc.code, 500), exc.code, exc.message)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _json(request)
        messages = [await _message(m, remote_images) for m in _field(body, "messages", list)]
        params = _params(body)
        reply_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": reply_id, "created": created, "model": body.get("model") or model_name}
        if body.get("stream"):
            usage = bool((body.get("stream_options") or {}).get("include_usage"))
            stream = client().stream(messages, **params)
            first = await anext(stream)  # errors before any text become an HTTP status
            return StreamingResponse(_events(head, first, stream, params, usage), media_type="text/event-stream")
        result = await client().generate(messages, **params)
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                             "finish_reason": _finish(result.usage, params)}],
                "usage": _usage(result.usage)}

    @app.post("/api/ask")
    async def ask(image: UploadFile = File(...), question: str = Form(...), max_new_tokens: int = Form(128)):
        result = await client().ask(await image.read(), question, max_new_tokens=max_new_tokens)
        return {"answer": result.text, "usage": result.usage, "timings": result.timings, "worker": result.worker}

    @app.get("/api/status")
    async def status():
        return await client().status(timeout=10)

    @app.get("/health")
    async def health():
        try:
            status = await client().status(timeout=5)
        except QvlError as exc:
            return JSONResponse({"status": "unavailable", "reason": exc.message}, status_code=503)
        ready = sum(w["state"] == "ready" for w in status["workers"])
        body = {"status": "ok" if ready else "unavailable", "ready_workers": ready}
        return JSONResponse(body, status_code=200 if ready and not status["shutting_down"] else 503)

    @app.get("/metrics")
    async def metrics():
        registry = CollectorRegistry()
        registry.register(_Snapshot(await client().status(timeout=10)))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    return app


async def _events(head: dict, first, stream, params: dict, usage: bool):
    """Server-sent events in OpenAI's chunk form, ending with `[DONE]`."""
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
                yield event(choice({}, _finish(chunk.usage, params)))
                if usage:
                    yield event([], usage=_usage(chunk.usage))
                break
            chunk = await anext(stream)
    except QvlError as exc:  # headers are sent: the error travels as an event
        yield _sse(_error_body(exc.code, exc.message))
    yield "data: [DONE]\n\n"


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def _json(request: Request) -> dict:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise BadRequest("the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def _field(body: dict, name: str, kind: type):
    value = body.get(name)
    if not isinstance(value, kind):
        raise BadRequest(f"`{name}` must be a {kind.__name__}")
    return value


def _params(body: dict) -> dict:
    params = {"max_new_tokens": body.get("max_completion_tokens") or body.get("max_tokens") or 256}
    if body.get("temperature") is not None:
        params["temperature"] = body["temperature"]
    if body.get("top_p") is not None:
        params["top_p"] = body["top_p"]
    return params


async def _message(message: object, remote_images: bool) -> dict:
    if not isinstance(message, dict):
        raise BadRequest("each message must be an object")
    content = message.get("content")
    if isinstance(content, list):
        content = [await _part(part, remote_images) for part in content]
    return {"role": message.get("role"), "content": content}


async def _part(part: object, remote_images: bool) -> object:
    if not isinstance(part, dict) or part.get("type") != "image_url":
        return part
    url = (part.get("image_url") or {}).get("url", "") if isinstance(part.get("image_url"), dict) else ""
    if url.startswith("data:"):
        try:
            meta, data = url.split(",", 1)
            if not meta.endswith(";base64"):
                raise ValueError
            return {"type": "image", "image": base64.b64decode(data, validate=True)}
        except (ValueError, binascii.Error):
            raise BadRequest("an image data URL must be `data:<type>;base64,<data>`") from None
    if url.startswith(("http://", "https://")):
        if not remote_images:
            raise BadRequest("image URLs over http are refused; send a data URL, or start the gateway "
                             "with http_remote_images = true")
        return {"type": "image", "image": await asyncio.to_thread(_fetch, url)}
    raise BadRequest("an image_url must be a data URL or an http(s) URL")


def _fetch(url: str, limit: int = 20 << 20) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            data = response.read(limit + 1)
    except OSError as exc:
        raise BadRequest(f"cannot fetch {url}: {exc}") from None
    if len(data) > limit:
        raise BadRequest(f"image at {url} exceeds {limit} bytes")
    return data


def _finish(usage: dict, params: dict) -> str:
    return "length" if usage.get("completion_tokens", 0) >= params["max_new_tokens"] else "stop"


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
        for outcome in ("answered", *sorted(ERROR_CODES)):
            requests.add_metric([outcome], s["counters"].get(outcome, 0))
        yield requests
        for name, key, text in (("qvl_request_latency_seconds", "latency_seconds", "acceptance to reply"),
                                ("qvl_queue_time_seconds", "queue_seconds", "acceptance to first dispatch")):
            h = s["metrics"][key]
            yield HistogramMetricFamily(name, text, sum_value=h["sum"],
                                        buckets=[(str(b), c) for b, c in h["buckets"]])
        yield GaugeMetricFamily("qvl_queue_depth", "requests waiting for a worker", value=s["queue_depth"])
        yield GaugeMetricFamily("qvl_inflight", "requests on workers", value=s["inflight"])
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
    ap = argparse.ArgumentParser(prog="python -m qvl.supervisor.gateway", description=__doc__.splitlines()[0])
    ap.add_argument("--frontend", required=True, help="the supervisor's ZeroMQ endpoint")
    ap.add_argument("--listen", default="127.0.0.1:8000", help="host:port to serve HTTP on")
    ap.add_argument("--api-key-file", default="", help="file holding the API key clients must send")
    ap.add_argument("--remote-images", action="store_true", help="fetch image URLs over http(s)")
    ap.add_argument("--curve-dir", default="", help="folder of `qvl-supervisor keygen` keys")
    ap.add_argument("--model-name", default="qvl")
    ap.add_argument("--parent", type=int, default=0, help="exit when this process is gone")
    a = ap.parse_args(argv)
    api_key = open(a.api_key_file).read().strip() if a.api_key_file else ""
    app = create_app(a.frontend, api_key, a.remote_images, a.model_name, a.curve_dir, a.parent)
    host, _, port = a.listen.rpartition(":")
    uvicorn.run(app, host=host or "127.0.0.1", port=int(port), log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
