"""The `generate` request: chat messages whose images refer to binary frames, and its parameters.

`build_generate` turns a caller's messages (images as bytes, paths or PIL images) into a header
and frames; `parse_generate` checks a received header against the limits and returns a frozen
`GenerateRequest`. Both sides of every hop use these two functions, so the schema lives here only.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

from .codec import GENERATE, PROTOCOL_VERSION, Limits
from .errors import BadRequest

ROLES = frozenset({"system", "user", "assistant"})


@dataclass(frozen=True)
class GenerationParams:
    """Decoding parameters. `temperature` 0 means greedy decoding."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    @classmethod
    def parse(cls, raw: object, limits: Limits) -> "GenerationParams":
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise BadRequest("`params` must be a map")
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise BadRequest(f"unknown generation parameters: {sorted(unknown)}")
        params = cls(**raw)
        checks = [
            (_is_int(params.max_new_tokens) and 1 <= params.max_new_tokens <= limits.max_new_tokens,
             f"max_new_tokens must be an integer in 1..{limits.max_new_tokens}"),
            (_is_int(params.min_new_tokens) and 0 <= params.min_new_tokens <= params.max_new_tokens,
             "min_new_tokens must be an integer in 0..max_new_tokens"),
            (_is_number(params.temperature) and 0 <= params.temperature <= 100,
             "temperature must be a number in 0..100"),
            (_is_number(params.top_p) and 0 < params.top_p <= 1, "top_p must be in (0, 1]"),
            (_is_int(params.top_k) and params.top_k >= 0, "top_k must be a non-negative integer"),
        ]
        for ok, message in checks:
            if not ok:
                raise BadRequest(message)
        return params


@dataclass(frozen=True)
class GenerateRequest:
    """A validated generation request. Image parts are `{"type": "image", "frame": i}`."""

    id: Any
    messages: list
    params: GenerationParams = field(default_factory=GenerationParams)
    timeout_ms: float | None = None  # relative deadline, counted from when the supervisor accepts it
    images: tuple[bytes, ...] = ()
    stream: bool = False  # send the text in `chunk` messages as it is generated, then the reply

    def header(self) -> dict:
        header = {"v": PROTOCOL_VERSION, "kind": GENERATE, "id": self.id,
                  "messages": self.messages, "params": dict(vars(self.params))}
        if self.timeout_ms is not None:
            header["timeout_ms"] = self.timeout_ms
        if self.stream:
            header["stream"] = True
        return header


def parse_generate(header: dict, frames: Sequence[bytes], limits: Limits) -> GenerateRequest:
    """Check a `generate` header and its frames; raise `BadRequest` naming the first fault."""
    rid = header.get("id")
    try:
        messages = _parse_messages(header.get("messages"), len(frames), limits)
        params = GenerationParams.parse(header.get("params"), limits)
        timeout_ms = header.get("timeout_ms")
        if timeout_ms is not None and not (_is_number(timeout_ms) and timeout_ms > 0):
            raise BadRequest("timeout_ms must be a positive number")
        stream = header.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("stream must be true or false")
    except BadRequest as exc:
        raise BadRequest(exc.message, rid) from None
    return GenerateRequest(rid, messages, params, timeout_ms, tuple(frames), stream)


def _parse_messages(messages: object, n_frames: int, limits: Limits) -> list:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("`messages` must be a non-empty list")
    if len(messages) > limits.max_messages:
        raise BadRequest(f"{len(messages)} messages exceed the limit of {limits.max_messages}")
    used = set()
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise BadRequest(f"message {i} needs a role among {sorted(ROLES)}")
        content = message.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        if not isinstance(content, list) or not content:
            raise BadRequest(f"message {i} needs content: a string or a non-empty list of parts")
        parts = []
        for part in content:
            parts.append(_parse_part(part, i, n_frames, limits))
            if parts[-1]["type"] == "image":
                used.add(parts[-1]["frame"])
        out.append({"role": message["role"], "content": parts})
    if len(used) != n_frames:
        raise BadRequest(f"{n_frames} image frames sent but {len(used)} referenced")
    return out


def _parse_part(part: object, i: int, n_frames: int, limits: Limits) -> dict:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        text = part.get("text")
        if not isinstance(text, str):
            raise BadRequest(f"message {i}: a text part needs a string `text`")
        if len(text) > limits.max_text_chars:
            raise BadRequest(f"message {i}: text of {len(text)} characters exceeds "
                             f"{limits.max_text_chars}")
        return {"type": "text", "text": text}
    if kind == "image":
        frame = part.get("frame")
        if not (_is_int(frame) and 0 <= frame < n_frames):
            raise BadRequest(f"message {i}: an image part must name a frame in 0..{n_frames - 1}")
        return {"type": "image", "frame": frame}
    raise BadRequest(f"message {i}: parts must be of type text or image")


def build_generate(request_id: Any, messages: Sequence[dict], params: GenerationParams,
                   timeout_ms: float | None = None, stream: bool = False) -> GenerateRequest:
    """A request from a caller's messages, whose image parts hold bytes, paths or PIL images."""
    frames: list[bytes] = []
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = [_frame_ref(part, frames) for part in content]
        out.append({**message, "content": content})
    return GenerateRequest(request_id, out, params, timeout_ms, tuple(frames), stream)


def _frame_ref(part: Any, frames: list[bytes]) -> Any:
    if isinstance(part, dict) and part.get("type") == "image" and "frame" not in part:
        frames.append(image_bytes(part.get("image")))
        return {"type": "image", "frame": len(frames) - 1}
    return part


def image_bytes(image: Any) -> bytes:
    """Encoded image bytes from bytes, a file path, or a PIL image (saved as PNG)."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, (str, os.PathLike)):
        with open(image, "rb") as f:
            return f.read()
    if hasattr(image, "save"):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(f"an image must be bytes, a path or a PIL image, not {type(image).__name__}")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)
