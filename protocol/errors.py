"""The closed set of protocol error codes and one exception class for each.

A server error travels as `{"code": ..., "message": ...}` and becomes the same exception class in
the client, so callers can `except Overloaded:` and tests can `pytest.raises(BadRequest)`.
"""

from __future__ import annotations

import reprlib


class QvlError(Exception):
    """Base of every error qvl reports; `code` is the wire code."""

    code = "internal"

    def __init__(self, message: str = "", request_id: object = None):
        super().__init__(message or self.code)
        self.message = message or self.code
        self.request_id = request_id

    def to_wire(self) -> dict:
        return {"code": self.code, "message": self.message}


class BadRequest(QvlError):
    code = "bad_request"


class UnsupportedVersion(QvlError):
    code = "unsupported_version"


class Overloaded(QvlError):
    code = "overloaded"


class DeadlineExceeded(QvlError):
    code = "deadline_exceeded"


class OutOfMemory(QvlError):
    code = "out_of_memory"


class WorkerFailed(QvlError):
    code = "worker_failed"


class ShuttingDown(QvlError):
    code = "shutting_down"


class InternalError(QvlError):
    code = "internal"


class RequestTimeout(QvlError, TimeoutError):
    """Raised by a client when no reply came within the call's timeout (never sent on the wire)."""

    code = "timeout"


ERROR_CLASSES: dict[str, type[QvlError]] = {
    cls.code: cls
    for cls in (BadRequest, UnsupportedVersion, Overloaded, DeadlineExceeded, OutOfMemory,
                WorkerFailed, ShuttingDown, InternalError)
}
ERROR_CODES = frozenset(ERROR_CLASSES)


def error_from_wire(error: object, request_id: object = None) -> QvlError:
    """The exception for a reply's `error` map; an unknown code becomes `InternalError`."""
    if not isinstance(error, dict):
        return InternalError(f"malformed error: {reprlib.repr(error)}", request_id)
    code = error.get("code")
    cls = ERROR_CLASSES.get(code, InternalError) if isinstance(code, str) else InternalError
    message = error.get("message", "")
    if not isinstance(message, str):  # reprlib: a peer's nesting cannot exhaust the stack
        return InternalError(f"malformed error message: {reprlib.repr(message)}", request_id)
    return cls(message, request_id)
