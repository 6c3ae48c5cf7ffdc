"""An OpenAI chat-completions body, checked and turned into qvl messages and parameters.

The gateway's only way from client JSON to a request: a whitelist of roles and part types
(`text`; `image_url` as a data URL, or as an http(s) URL when the gateway fetches remote
images), with every field's type checked before its value. Image parts come out as bytes,
never as a string, so a client's text can never name a file the protocol client would open.
Anything else raises `BadRequest`. Pure apart from the `fetch` it is given; no HTTP framework.

Parameters read: `max_completion_tokens` (or the deprecated `max_tokens`; the first wins when both
are given), `temperature` (OpenAI's default 1.0 when absent, so an omitted temperature samples as
it does at OpenAI; send 0 for greedy decoding), `top_p`, `seed`, `stop` (a string or a list of up
to 4), and `n`, which must be 1. Other OpenAI fields are ignored, as before.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from dataclasses import dataclass
from typing import Callable

from qvl.protocol.codec import Limits
from qvl.protocol.errors import BadRequest
from qvl.protocol.messages import ROLES

DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMPERATURE = 1.0  # OpenAI's default when a body names none: sampling (qvl's own default is greedy)
# `{`, `[`, `,` and `:` in one body. A chat request has a few per message and part (prompt text
# rarely more than one per token, and tokens are limited); a body of empty objects `[{},{},...]`
# would otherwise become millions of Python objects, 1.5 GiB parsed from 64 MiB.
MAX_STRUCTURAL_BYTES = 100_000
Fetch = Callable[[str], bytes]  # an http(s) URL to image bytes, or BadRequest


@dataclass(frozen=True)
class ChatRequest:
    messages: list  # [{"role", "content": [{"type": "text", "text": str} | {"type": "image", "image": bytes}]}]
    params: dict  # keyword arguments of `AsyncClient.generate`
    stream: bool = False
    include_usage: bool = False
    model: str | None = None


SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse_json(body: bytes) -> object:
    """The body as JSON; NaN, infinities, invalid text (lone surrogates too), absurd nesting and a body of more than
    `MAX_STRUCTURAL_BYTES` structural bytes (counted before parsing) are `BadRequest`."""
    if sum(body.count(byte) for byte in b"{[,:") > MAX_STRUCTURAL_BYTES:
        raise BadRequest(f"the body holds more than {MAX_STRUCTURAL_BYTES} of the bytes `{{[,:`; "
                         "no chat request needs that many")
    try:
        value = json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise BadRequest("the body must be JSON") from None
    if SURROGATE_ESCAPE.search(body):  # a pair is a character; a lone half is no text anywhere after
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest("the body's strings must be text: it escapes a lone UTF-16 surrogate") from None
    return value


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def parse_chat(body: object, limits: Limits, fetch: Fetch | None = None) -> ChatRequest:
    """Check a chat-completions body. Without `fetch`, http(s) image URLs are refused."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("`messages` must be a non-empty list")
    if len(messages) > limits.max_messages:
        raise BadRequest(f"{len(messages)} messages exceed the limit of {limits.max_messages}")
    images = _ImageCount(limits.max_images)
    converted = [_message(i, m, limits, fetch, images) for i, m in enumerate(messages)]
    stream_options = _optional(body, "stream_options", dict) or {}
    return ChatRequest(converted, _params(body, limits), bool(_optional(body, "stream", bool)),
                       bool(_optional(stream_options, "include_usage", bool)),
                       _optional(body, "model", str))


class _ImageCount:
    def __init__(self, limit: int):
        self.limit, self.seen = limit, 0

    def add(self) -> None:
        self.seen += 1
        if self.seen > self.limit:
            raise BadRequest(f"more than {self.limit} images in one request")


def _message(i: int, message: object, limits: Limits, fetch: Fetch | None, images: _ImageCount) -> dict:
    if not isinstance(message, dict):
        raise BadRequest(f"message {i} must be an object")
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise BadRequest(f"message {i}: `role` must be one of {sorted(ROLES)}")
    content = message.get("content")
    if isinstance(content, str):
        return {"role": role, "content": [{"type": "text", "text": content}]}
    if not isinstance(content, list) or not content:
        raise BadRequest(f"message {i}: `content` must be a string or a non-empty list of parts")
    return {"role": role, "content": [_part(i, part, limits, fetch, images) for part in content]}


def _part(i: int, part: object, limits: Limits, fetch: Fetch | None, images: _ImageCount) -> dict:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise BadRequest(f"message {i}: a text part needs a string `text`")
        return {"type": "text", "text": text}
    if kind == "image_url":
        image_url = part.get("image_url")
        url = image_url.get("url") if isinstance(image_url, dict) else None
        if not isinstance(url, str):
            raise BadRequest(f"message {i}: an image_url part needs `image_url: {{\"url\": ...}}`")
        images.add()
        return {"type": "image", "image": _image(url, limits.max_frame_bytes, fetch)}
    raise BadRequest(f"message {i}: parts must be of type text or image_url")


def _image(url: str, max_bytes: int, fetch: Fetch | None) -> bytes:
    if url.startswith("data:"):
        return _data_url(url, max_bytes)
    if url.startswith(("http://", "https://")):
        if fetch is None:
            raise BadRequest("image URLs over http are refused; send a data URL, or start the "
                             "gateway with http_remote_images = true")
        return fetch(url)
    raise BadRequest("an image_url must be a data URL or an http(s) URL")


def _data_url(url: str, max_bytes: int) -> bytes:
    meta, comma, data = url.partition(",")
    if not comma or not meta.endswith(";base64"):
        raise BadRequest("an image data URL must be `data:<type>;base64,<data>`")
    if len(data) > 4 * (max_bytes // 3 + 1):  # before decoding: the decoded size is 3/4 of this
        raise BadRequest(f"an image exceeds {max_bytes} bytes")
    try:
        image = base64.b64decode(data, validate=True)
    except (ValueError, binascii.Error):
        raise BadRequest("an image data URL holds invalid base64") from None
    if len(image) > max_bytes:
        raise BadRequest(f"an image exceeds {max_bytes} bytes")
    return image


def _params(body: dict, limits: Limits) -> dict:
    """The generation parameters of a body. Types are checked here; the ranges of `seed` and of the
    `stop` strings (`GenerationParams.parse`) when the client builds the request, also a 400."""
    n = _optional(body, "n", int)
    if n is not None and n != 1:
        raise BadRequest("`n` must be 1: qvl answers with one choice per request")
    max_tokens = _optional(body, "max_completion_tokens", int)  # OpenAI's name now; `max_tokens` is deprecated
    if max_tokens is None:
        max_tokens = _optional(body, "max_tokens", int)
    if max_tokens is None:
        max_tokens = min(DEFAULT_MAX_TOKENS, limits.max_new_tokens)
    if not 1 <= max_tokens <= limits.max_new_tokens:
        raise BadRequest(f"max_tokens must be in 1..{limits.max_new_tokens}")
    temperature = _optional(body, "temperature", float)
    params = {"max_new_tokens": max_tokens,
              "temperature": DEFAULT_TEMPERATURE if temperature is None else temperature}
    top_p = _optional(body, "top_p", float)
    if top_p is not None:
        params["top_p"] = top_p
    seed = _optional(body, "seed", int)
    if seed is not None:
        params["seed"] = seed
    stop = _stop(body.get("stop"))
    if stop:
        params["stop"] = stop
    return params


def _stop(stop: object) -> list[str]:
    """OpenAI's `stop`: null, one string, or a list of strings."""
    if stop is None:
        return []
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return stop
    raise BadRequest("`stop` must be a string or a list of strings")


def _optional(body: dict, name: str, kind: type):
    """`body[name]` when present and not null, checked to be a `kind`; None otherwise.

    Booleans are not numbers here, an integer is a float, and a float must be finite."""
    value = body.get(name)
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value) if abs(value) < 1 << 1000 else math.inf
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool)) \
        and (kind is not float or math.isfinite(value))
    if not ok:
        raise BadRequest(f"`{name}` must be {'a finite number' if kind is float else 'a ' + kind.__name__}")
    return value
