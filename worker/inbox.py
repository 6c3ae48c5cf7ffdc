"""What the worker reads from its socket: a `generate` request, a `cancel`, a `stop`, or a typed
error; and what a spare reads from its own: a `load`.

The worker trusts nothing it is sent. Every message goes through the codec with the supervisor's
own limits and `parse_generate`, exactly as a client's message does at the frontend, so anything
the supervisor forwards that does not fit fails as `QvlError` carrying the request's key where it
could be read, and the service answers it (or drops it) without touching any other request.
Never imports torch.
"""

from __future__ import annotations

from typing import Sequence

from qvl.protocol.codec import CANCEL, GENERATE, LOAD, STOP, Limits, decode
from qvl.protocol.errors import BadRequest
from qvl.protocol.messages import Cancel, GenerateRequest, Load, Stop, parse_generate


def read_message(parts: Sequence[bytes], limits: Limits) -> GenerateRequest | Cancel | Stop:
    """The message in `parts`; `QvlError` (with the key when readable) for anything else."""
    header, frames = decode(parts, limits)
    kind = header["kind"]
    if kind == STOP:
        return Stop()
    if kind == CANCEL:
        cancel = Cancel.parse(header)
        if type(cancel.id) is not int:  # a key the supervisor gave, as in generate
            raise BadRequest("a cancel header needs an integer `id`")
        return cancel
    if kind != GENERATE:
        raise BadRequest(f"a worker does not take {kind!r}", header.get("id"))
    request = parse_generate(header, frames, limits)
    if type(request.id) is not int:  # the supervisor's key, never a client's id
        raise BadRequest("a generate header needs an integer `id`", request.id)
    return request


def read_spare_message(parts: Sequence[bytes], limits: Limits) -> Load:
    """What a spare reads: a `load` and nothing else; `QvlError` for anything else. The spec it
    carries is read afterwards with `WorkerSpec.from_json`, as a cold worker reads its argument."""
    header, frames = decode(parts, limits)
    if header["kind"] != LOAD:
        raise BadRequest(f"a spare takes only {LOAD!r}, not {header['kind']!r}")
    if frames:
        raise BadRequest("a load message has no frames")
    return Load.parse(header)
