"""The worker's bell: a ring from any thread wakes a `zmq.Poller` that waits on it beside a socket,
a clear takes every ring so far and none after, and ringing never blocks however long nobody clears."""

import threading
import time

import pytest
import zmq
from qvl.worker.bell import Bell


@pytest.fixture
def bell_beside_a_socket():
    """A bell and a poller waiting on it beside a (silent) socket, as the step loop waits."""
    sock = zmq.Context.instance().socket(zmq.PULL)
    bell = Bell()
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(bell, zmq.POLLIN)
    yield bell, poller
    sock.close(0)
    bell.close()


def test_a_ring_from_another_thread_wakes_a_poll_beside_a_socket(bell_beside_a_socket):
    bell, poller = bell_beside_a_socket
    assert poller.poll(0) == []
    threading.Timer(0.05, bell.ring).start()
    started = time.monotonic()
    woke = dict(poller.poll(5000))
    assert time.monotonic() - started < 4.0
    assert woke == {bell.fileno(): zmq.POLLIN}


def test_a_clear_takes_the_rings_before_it_and_keeps_those_after(bell_beside_a_socket):
    bell, poller = bell_beside_a_socket
    for _ in range(3):
        bell.ring()
    bell.clear()
    assert poller.poll(0) == []
    bell.ring()
    assert dict(poller.poll(0)) == {bell.fileno(): zmq.POLLIN}
    bell.clear()
    bell.clear()  # clearing a silent bell neither blocks nor fails
    assert poller.poll(0) == []


def test_rings_never_cleared_do_not_block_the_ringer():
    bell = Bell()
    try:
        started = time.monotonic()
        for _ in range(200_000):  # far past a pipe's buffer
            bell.ring()
        assert time.monotonic() - started < 30
        bell.clear()
        poller = zmq.Poller()
        poller.register(bell, zmq.POLLIN)
        assert poller.poll(0) == []
    finally:
        bell.close()
