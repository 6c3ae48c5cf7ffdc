"""Every message on the wire, declared once: its fields, how it is built and how it is read.

Client to supervisor: the `generate` request (chat messages whose images refer to binary frames,
and its parameters). `build_generate` turns a caller's messages (images as bytes, paths or PIL
images) into a header and frames; `parse_generate` checks a received header against the limits
and returns a frozen `GenerateRequest`, types first and values after, so no comparison of mixed
types can happen. Supervisor and worker: `Hello`, `Ready`, `Heartbeat`, `Chunk`, `Reply`,
`ErrorReply`, `Stop`, `Bye`, and to a spare `Load`, each with `header()` and `parse()`; no dict literal elsewhere
builds one of these. `Cancel` travels both legs: a client names its own request's id, the supervisor
forwards it to the worker with its own key. (Error replies to clients come from `codec.error_header`; control commands
and their replies are small maps built by the client and by `supervisor.control`.)
"""

from __future__ import annotations

import dataclasses
import io
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from .codec import BYE, CANCEL, CHUNK, GENERATE, HEARTBEAT, HELLO, LOAD, PROTOCOL_VERSION, READY, REPLY, STOP, Limits
from .errors import ERROR_CODES, BadRequest, QvlError, error_from_wire

ROLES = frozenset({"system", "user", "assistant"})
MIN_TEMPERATURE = 1e-3  # below it sampling is greedy decoding, and the division would overflow
MAX_TIMEOUT_MS = 7 * 24 * 3600 * 1000  # a week: longer deadlines are surely a mistake
# Why an answer ended: an end-of-sequence token, max_new_tokens, or a `cancel` from its client
STOPPED, LENGTH, CANCELLED = "stop", "length", "cancelled"
FINISH_REASONS = frozenset({STOPPED, LENGTH, CANCELLED})
MAX_SEED = (1 << 63) - 1  # fits a signed 64-bit integer, as msgpack and torch's generators take
MAX_STOP_STRINGS = 4  # as OpenAI allows
MAX_STOP_CHARS = 256


@dataclass(frozen=True)
class GenerationParams:
    """Decoding parameters. `temperature` 0 (or below `MIN_TEMPERATURE`) means greedy decoding.

    `seed` makes sampling repeatable: the same request with the same seed gives the same text
    (greedy decoding ignores it). `stop` holds strings that end the answer: its text ends before
    the first of them to appear, which is not included."""

    max_new_tokens: int = 128
    min_new_tokens: int = 0
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()

    @classmethod
    def parse(cls, raw: object, limits: Limits) -> "GenerationParams":
        """Check every field's type first, then its value against the others and `limits`."""
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise BadRequest("`params` must be a map")
        unknown = raw.keys() - _PARAM_KINDS.keys()
        if unknown:
            raise BadRequest(f"unknown generation parameters: {sorted(map(str, unknown))}")
        values = {}
        for name, value in raw.items():
            kind = _PARAM_KINDS[name]
            if value is None and name in _ABSENT_AS_NONE:
                continue
            if kind is int:
                if not _is_int(value):
                    raise BadRequest(f"{name} must be an integer, not {type(value).__name__}")
                values[name] = value
            elif kind is float:
                if not _is_number(value):
                    raise BadRequest(f"{name} must be a number, not {type(value).__name__}")
                values[name] = float(value)  # an int here would reach torch as an int
            else:  # strings: a list of them
                if not (isinstance(value, (list, tuple)) and all(isinstance(s, str) for s in value)):
                    raise BadRequest(f"{name} must be a list of strings, not {type(value).__name__}")
                values[name] = tuple(value)
        params = cls(**values)
        # NaN fails every comparison, so it is refused here too
        if not 1 <= params.max_new_tokens <= limits.max_new_tokens:
            raise BadRequest(f"max_new_tokens must be in 1..{limits.max_new_tokens}")
        if not 0 <= params.min_new_tokens <= params.max_new_tokens:
            raise BadRequest("min_new_tokens must be in 0..max_new_tokens")
        if not 0 <= params.temperature <= 100:
            raise BadRequest("temperature must be in 0..100")
        if not 0 < params.top_p <= 1:
            raise BadRequest("top_p must be in (0, 1]")
        if not 0 <= params.top_k <= 1 << 31:
            raise BadRequest("top_k must be in 0..2^31")
        if params.seed is not None and not 0 <= params.seed <= MAX_SEED:
            raise BadRequest(f"seed must be in 0..{MAX_SEED}")
        if len(params.stop) > MAX_STOP_STRINGS:
            raise BadRequest(f"stop holds {len(params.stop)} strings; at most {MAX_STOP_STRINGS}")
        if not all(1 <= len(s) <= MAX_STOP_CHARS for s in params.stop):
            raise BadRequest(f"each stop string must be 1..{MAX_STOP_CHARS} characters")
        if 0 < params.temperature < MIN_TEMPERATURE:  # logits / 1e-300 overflow: decode as its limit does
            params = dataclasses.replace(params, temperature=0.0)
        return params


# The type each parameter is read as, checked before any value is: int, float, or `list` (of strings).
_PARAM_KINDS: dict[str, type] = {"max_new_tokens": int, "min_new_tokens": int, "temperature": float,
                                 "top_p": float, "top_k": int, "seed": int, "stop": list}
_ABSENT_AS_NONE = frozenset({"seed", "stop"})  # None reads as the default: no seed, no stop strings
assert _PARAM_KINDS.keys() == {f.name for f in dataclasses.fields(GenerationParams)}


@dataclass(frozen=True)
class GenerateRequest:
    """A validated generation request. Image parts are `{"type": "image", "frame": i}`."""

    id: Any
    messages: list
    params: GenerationParams = field(default_factory=GenerationParams)
    timeout_ms: float | None = None  # relative deadline: from a client, counted from when the supervisor
    # accepts it; from the supervisor to a worker, the time left, counted from when the worker reads it
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
        if timeout_ms is not None and not (_is_number(timeout_ms) and 0 < timeout_ms <= MAX_TIMEOUT_MS):
            raise BadRequest(f"timeout_ms must be a number in (0, {MAX_TIMEOUT_MS}]")
        stream = header.get("stream", False)
        if not isinstance(stream, bool):
            raise BadRequest("stream must be true or false")
    except BadRequest as exc:
        raise BadRequest(exc.message, rid) from None
    return GenerateRequest(rid, messages, params, timeout_ms, tuple(frames), stream)


@dataclass(frozen=True)
class Cancel:
    """Abandon generate request `id`: from a client its own id, from the supervisor to a worker its key.
    It has no reply of its own; the request gets its one reply, `finish_reason` "cancelled"."""

    id: Any

    def header(self) -> dict:
        return _header(CANCEL, id=self.id)

    @classmethod
    def parse(cls, header: dict) -> "Cancel":
        return cls(_field(header, "id", _is_id, "a string or an integer: the id of a generate request"))


def _parse_messages(messages: object, n_frames: int, limits: Limits) -> list:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("`messages` must be a non-empty list")
    if len(messages) > limits.max_messages:
        raise BadRequest(f"{len(messages)} messages exceed the limit of {limits.max_messages}")
    used = set()
    references = 0
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not _is_role(message.get("role")):
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
                references += 1
                if references > limits.max_images:  # each reference is processed: all of them count
                    raise BadRequest(f"more than {limits.max_images} image references")
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


def _is_role(x: object) -> bool:
    return isinstance(x, str) and x in ROLES


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# --- between the supervisor and its workers ---------------------------------------------------
# Each message is a frozen dataclass with `header()` to build it and `parse(header)` to read it
# back, raising `BadRequest` for a header that does not fit. The supervisor reads what a worker
# sends through `parse_worker_message`, so a worker's mistake is a typed error, never a crash.

MAX_TELEMETRY_KEYS = 64


@dataclass(frozen=True)
class Hello:
    """A worker connected (before it loads the model); or, with `spare`, a spare finished its
    imports and waits for `Load` (its `generation` is then its spare number)."""

    slot: int
    generation: int
    pid: int
    spare: bool = False

    def header(self) -> dict:
        header = _header(HELLO, slot=self.slot, generation=self.generation, pid=self.pid)
        if self.spare:
            header["spare"] = True
        return header

    @classmethod
    def parse(cls, header: dict) -> "Hello":
        numbers = (_field(header, name, _is_int, "an integer") for name in ("slot", "generation", "pid"))
        return cls(*numbers, spare=_field(header, "spare", lambda x: x is None or isinstance(x, bool),
                                          "true or false") or False)


@dataclass(frozen=True)
class Ready:
    """A worker loaded its model and takes requests."""

    load_s: float
    device: str
    telemetry: dict

    def header(self) -> dict:
        return _header(READY, load_s=self.load_s, device=self.device, telemetry=self.telemetry)

    @classmethod
    def parse(cls, header: dict) -> "Ready":
        return cls(_field(header, "load_s", _is_number, "a number"),
                   _field(header, "device", lambda x: isinstance(x, str), "a string"),
                   parse_telemetry(header.get("telemetry")))


@dataclass(frozen=True)
class Heartbeat:
    """A worker is alive; its latest memory telemetry."""

    telemetry: dict

    def header(self) -> dict:
        return _header(HEARTBEAT, telemetry=self.telemetry)

    @classmethod
    def parse(cls, header: dict) -> "Heartbeat":
        return cls(parse_telemetry(header.get("telemetry")))


@dataclass(frozen=True)
class Chunk:
    """A piece of a streamed answer's text, sent before its reply (worker -> supervisor -> client)."""

    id: Any
    text: str

    def header(self) -> dict:
        return {**_header(CHUNK, id=self.id, text=self.text), "ok": True}

    @classmethod
    def parse(cls, header: dict) -> "Chunk":
        return cls(_field(header, "id", _is_id, "a string or an integer"),
                   _field(header, "text", lambda x: isinstance(x, str), "a string"))


@dataclass(frozen=True)
class Reply:
    """The answer to one request. `worker` (slot, generation, pid) is added by the supervisor.
    `finish_reason`: one of `FINISH_REASONS`; a cancelled answer holds the text made until then."""

    id: Any
    text: str
    usage: dict
    timings: dict
    telemetry: dict | None = None
    worker: dict | None = None
    finish_reason: str = STOPPED

    def header(self) -> dict:
        header = _header(REPLY, id=self.id, ok=True, text=self.text, usage=self.usage, timings=self.timings,
                         finish_reason=self.finish_reason)
        for name in ("telemetry", "worker"):
            if getattr(self, name) is not None:
                header[name] = getattr(self, name)
        return header

    @classmethod
    def parse(cls, header: dict) -> "Reply":
        return cls(_field(header, "id", _is_id, "a string or an integer"),
                   _field(header, "text", lambda x: isinstance(x, str), "a string"),
                   _numbers(header.get("usage"), "usage"), _numbers(header.get("timings"), "timings"),
                   parse_telemetry(header.get("telemetry")) if "telemetry" in header else None,
                   finish_reason=_field(header, "finish_reason", _is_finish_reason,
                                        f"one of {sorted(FINISH_REASONS)}"))


@dataclass(frozen=True)
class ErrorReply:
    """A request that ended in a typed error; `error` is the `QvlError` it carries."""

    id: Any
    error: QvlError
    telemetry: dict | None = None

    def header(self) -> dict:
        header = _header(REPLY, id=self.id, ok=False, error=self.error.to_wire())
        if self.telemetry is not None:
            header["telemetry"] = self.telemetry
        return header

    @classmethod
    def parse(cls, header: dict) -> "ErrorReply":
        error = header.get("error")
        if not (isinstance(error, dict) and isinstance(error.get("code"), str)
                and error["code"] in ERROR_CODES and isinstance(error.get("message"), str)):
            raise BadRequest(f"an error reply needs an error with a code among {sorted(ERROR_CODES)}")
        rid = _field(header, "id", _is_id, "a string or an integer")
        return cls(rid, error_from_wire(error, rid),
                   parse_telemetry(header.get("telemetry")) if "telemetry" in header else None)


@dataclass(frozen=True)
class Stop:
    """The supervisor asks a worker to finish what it holds and exit."""

    def header(self) -> dict:
        return _header(STOP)

    @classmethod
    def parse(cls, header: dict) -> "Stop":
        return cls()


@dataclass(frozen=True)
class Load:
    """The supervisor tells a spare which worker to become: `spec` is a `WorkerSpec` as JSON, read
    by the spare exactly as a cold worker reads its command line."""

    spec: str

    def header(self) -> dict:
        return _header(LOAD, spec=self.spec)

    @classmethod
    def parse(cls, header: dict) -> "Load":
        return cls(_field(header, "spec", lambda x: isinstance(x, str), "a string"))


@dataclass(frozen=True)
class Bye:
    """A worker's last message before it exits cleanly."""

    def header(self) -> dict:
        return _header(BYE)

    @classmethod
    def parse(cls, header: dict) -> "Bye":
        return cls()


WorkerMessage = Hello | Ready | Heartbeat | Chunk | Reply | ErrorReply | Bye


def parse_worker_message(header: dict) -> "WorkerMessage":
    """What a worker sent, typed; `BadRequest` for anything that is not one of its messages."""
    kind = header.get("kind")
    if not isinstance(kind, str):
        raise BadRequest("a worker message needs a string `kind`")
    if kind == REPLY:
        return (Reply if header.get("ok") is True else ErrorReply).parse(header)
    parser = {HELLO: Hello, READY: Ready, HEARTBEAT: Heartbeat, CHUNK: Chunk, BYE: Bye}.get(kind)
    if parser is None:
        raise BadRequest(f"a worker does not send {kind!r}")
    return parser.parse(header)


def parse_telemetry(raw: object) -> dict:
    """A telemetry map: at most `MAX_TELEMETRY_KEYS` string keys with number values."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or len(raw) > MAX_TELEMETRY_KEYS:
        raise BadRequest(f"telemetry must be a map of at most {MAX_TELEMETRY_KEYS} entries")
    return _numbers(raw, "telemetry")


def _numbers(raw: object, name: str) -> dict:
    if isinstance(raw, dict):  # on every reply and heartbeat: exact types, no generator
        for key, value in raw.items():
            if type(key) is not str or type(value) not in (int, float):
                break
        else:
            return raw
    raise BadRequest(f"{name} must be a map of names to numbers")


def _header(kind: str, **fields: Any) -> dict:
    return {"v": PROTOCOL_VERSION, "kind": kind, **fields}


def _field(header: dict, name: str, valid: Callable[[object], bool], what: str) -> Any:
    value = header.get(name)
    if not valid(value):
        raise BadRequest(f"`{name}` must be {what}")
    return value


def _is_finish_reason(x: object) -> bool:
    return isinstance(x, str) and x in FINISH_REASONS


def _is_id(x: object) -> bool:
    return isinstance(x, str) or _is_int(x)
