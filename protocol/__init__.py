"""qvl's wire protocol and client library: message schema, codec with limits, error codes, clients.

Imports only pyzmq and msgpack, so a client host needs neither torch nor a GPU.
"""

from .client import AsyncClient, Chunk, Client, Result
from .codec import PROTOCOL_VERSION, Limits
from .errors import (BadRequest, DeadlineExceeded, InternalError, OutOfMemory, Overloaded,
                     QvlError, RequestTimeout, ShuttingDown, UnsupportedVersion, WorkerFailed)
from .messages import GenerationParams

__all__ = [
    "AsyncClient", "BadRequest", "Chunk", "Client", "DeadlineExceeded", "GenerationParams", "InternalError",
    "Limits", "OutOfMemory", "Overloaded", "PROTOCOL_VERSION", "QvlError", "RequestTimeout",
    "Result", "ShuttingDown", "UnsupportedVersion", "WorkerFailed",
]
