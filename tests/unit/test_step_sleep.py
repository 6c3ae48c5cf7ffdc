"""How long the worker's step loop sleeps with nothing to step (`WorkerService._sleep_ms`): never a
timeout that ZeroMQ cuts to 0 ms while a waiting job's deadline is still ahead (the loop would spin
until it passed), 0 once it has passed, and with nothing at all to do, until the engine's `idle`
is due; and never while a job whose inputs are ready waits (nothing would ring for it). The engine
here is a stand-in: only its `running` count is read."""

import time
from concurrent.futures import Future
from types import SimpleNamespace

from hypothesis import given, settings
from hypothesis import strategies as st
from qvl.protocol.contract import ModelOptions, WorkerSpec
from qvl.protocol.messages import GenerationParams
from qvl.worker.service import _NO_IMAGES, Job, WorkerService

SPEC = WorkerSpec("ipc:///run/backend", 0, 1, ModelOptions("/models/tiny"))


def _service(running: int = 0) -> WorkerService:
    service = WorkerService(SPEC)
    service.engine = SimpleNamespace(running=running)
    return service


def _close(service: WorkerService) -> None:
    service.sock.close(0)
    service.bell.close()
    service.image_pool.shutdown()


def _job(deadline: float | None, images: Future | None = None) -> Job:
    """A job waiting on its images (a future not done), or with `images` given."""
    return Job(1, 1, [], GenerationParams(), images or Future(), deadline=deadline)


@settings(max_examples=200, deadline=None)
@given(ahead_s=st.floats(min_value=1e-6, max_value=10.0), running=st.integers(0, 3))
def test_a_deadline_ahead_is_never_slept_as_zero(ahead_s, running):
    service = _service(running)
    try:
        service.waiting.append(_job(time.monotonic() + ahead_s))
        timeout = service._sleep_ms(lambda: 1.0)
        left_ms = 1000.0 * ahead_s
        assert int(timeout) >= 1 or time.monotonic() >= service.waiting[0].deadline
        assert timeout <= left_ms + 1.0  # it wakes by the deadline, give or take the millisecond
    finally:
        _close(service)


def test_a_passed_deadline_is_slept_as_zero_and_idle_sets_the_rest():
    service = _service()
    try:
        assert service._sleep_ms(lambda: 0.25) == 250.0  # nothing to do: until idle is due
        assert service._sleep_ms(None) is None  # nothing due at all: until a ring or a message
        service.waiting.append(_job(None))
        assert service._sleep_ms(lambda: 0.25) is None  # waiting on its images: until the ring
        service.waiting.append(_job(time.monotonic() - 1.0))
        assert service._sleep_ms(lambda: 0.25) == 0
    finally:
        _close(service)


def test_a_job_ready_but_left_waiting_for_room_is_never_slept_on():
    """The continuous engine leaves a ready job waiting while its rows are full; when every row
    then ends in one step, nothing rings for that job: the loop must not sleep until a message."""
    service = _service()
    try:
        service.waiting.append(_job(None))
        service.waiting.append(_job(None, images=_NO_IMAGES))  # text only, or its images made already
        assert service._sleep_ms(None) == 0
        assert service._sleep_ms(lambda: 0.25) == 0
    finally:
        _close(service)
