"""Wire encoding: one msgpack header map followed by raw binary frames, checked against limits.

Owns the protocol version, the message kinds and the size limits. Decoding is defensive:
bounded sizes and counts, strict types, no pickle. A message that fails a check raises a
`QvlError` carrying the request id when one could be read, so the caller can still reply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import msgpack

from .errors import BadRequest, QvlError, UnsupportedVersion

PROTOCOL_VERSION = 1

# Client -> supervisor
GENERATE, STATUS, RECYCLE, PING = "generate", "status", "recycle", "ping"
# Client -> supervisor -> worker: abandon a generate request (no reply of its own; the request's one
# reply comes with finish_reason "cancelled")
CANCEL = "cancel"
CLIENT_KINDS = frozenset({GENERATE, CANCEL, STATUS, RECYCLE, PING})
# Supervisor <-> worker
HELLO, READY, HEARTBEAT, REPLY, BYE, STOP = "hello", "ready", "heartbeat", "reply", "bye", "stop"
# Worker -> supervisor -> client: a piece of a streamed answer's text, before its reply
CHUNK = "chunk"
# Supervisor -> spare: load the model as the worker this spec describes
LOAD = "load"


def worker_identity(slot: int, generation: int, heartbeat: bool = False) -> bytes:
    """A worker's routing id on the supervisor's backend. Its heartbeats come from a socket of
    their own, so they keep their time while the model holds the worker's main thread."""
    return f"{slot}:{generation}{':beat' if heartbeat else ''}".encode()


def spare_identity(slot: int, number: int) -> bytes:
    """A spare's routing id until it is told to load; it then connects anew as its incarnation."""
    return f"{slot}:spare:{number}".encode()


@dataclass(frozen=True)
class Limits:
    """Bounds every decoder enforces. The defaults suit images of up to a few megapixels."""

    max_header_bytes: int = 1 << 20
    max_frame_bytes: int = 20 << 20
    max_request_bytes: int = 64 << 20  # header and every frame of one message together
    max_images: int = 16
    max_messages: int = 64
    max_text_chars: int = 32_768
    max_new_tokens: int = 4096

    @property
    def transport_cap(self) -> int:
        """Largest frame the socket accepts at all; bigger ones drop the connection unread.

        Frames between `max_frame_bytes` and this cap are read and refused with `bad_request`.
        """
        return 4 * max(self.max_frame_bytes, self.max_header_bytes)


DEFAULT_LIMITS = Limits()


def encode(header: dict, frames: Sequence[bytes] = ()) -> list[bytes]:
    """The multipart message for a header map and its binary frames."""
    return [msgpack.packb(header, use_bin_type=True), *frames]


def request_id_of(header: object) -> object:
    """The header's `id` if it has a usable one, else None."""
    if isinstance(header, dict):
        rid = header.get("id")
        if isinstance(rid, (str, int)) and not isinstance(rid, bool):
            return rid
    return None


def decode(parts: Sequence[bytes], limits: Limits = DEFAULT_LIMITS) -> tuple[dict, list[bytes]]:
    """Split a multipart message into its header map and frames, enforcing `limits`.

    Checks the envelope every message shares: a map header with `v`, `kind` and `id`.
    """
    if not parts:
        raise BadRequest("empty message")
    raw, frames = parts[0], list(parts[1:])
    if len(raw) > limits.max_header_bytes:
        raise BadRequest(f"header of {len(raw)} bytes exceeds {limits.max_header_bytes}")
    try:
        header = msgpack.unpackb(
            raw, raw=False, strict_map_key=True, use_list=True,
            max_str_len=limits.max_header_bytes, max_bin_len=0,
            max_array_len=4 * limits.max_messages + 64, max_map_len=256,
        )
    except Exception as exc:  # msgpack raises several unrelated types on bad input
        raise BadRequest(f"header is not valid msgpack: {exc}") from None
    rid = request_id_of(header)
    if not isinstance(header, dict):
        raise BadRequest("header must be a map")
    version = header.get("v")
    if not (isinstance(version, int) and not isinstance(version, bool) and version == PROTOCOL_VERSION):
        raise UnsupportedVersion(
            f"protocol version {header.get('v')!r} is not supported; this server speaks "
            f"{PROTOCOL_VERSION}", rid)
    if not isinstance(header.get("kind"), str):
        raise BadRequest("header needs a string `kind`", rid)
    if "id" in header and rid is None:
        raise BadRequest("`id` must be a string or an integer")
    if len(frames) > limits.max_images:
        raise BadRequest(f"{len(frames)} frames exceed the limit of {limits.max_images}", rid)
    for i, frame in enumerate(frames):
        if len(frame) > limits.max_frame_bytes:
            raise BadRequest(
                f"frame {i} of {len(frame)} bytes exceeds {limits.max_frame_bytes}", rid)
    total = len(raw) + sum(len(f) for f in frames)
    if total > limits.max_request_bytes:
        raise BadRequest(f"message of {total} bytes exceeds {limits.max_request_bytes}", rid)
    return header, frames


def error_header(exc: QvlError, request_id: object = None) -> dict:
    """A reply header that carries `exc` as a typed error."""
    rid = request_id if request_id is not None else exc.request_id
    return {"v": PROTOCOL_VERSION, "id": rid, "ok": False, "error": exc.to_wire()}
