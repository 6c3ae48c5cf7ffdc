"""A doorbell: how another thread wakes the worker's main thread where it sleeps on its socket.

The main thread sleeps in `zmq.Poller.poll` on its DEALER socket and on this pipe together, so a
message, a request's inputs made ready on the image pool, or vLLM's engine core handing back a
step, whichever comes first, wakes it at once; none waits behind another. Any thread may `ring`;
only the sleeper `clear`s, before it looks at what woke it, so a ring that comes after the clear is
kept for its next sleep.
"""

from __future__ import annotations

import os


class Bell:
    def __init__(self):
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)

    def fileno(self) -> int:
        """What `zmq.Poller` waits on."""
        return self._read

    def ring(self) -> None:
        try:
            os.write(self._write, b"\0")
        except BlockingIOError:  # the pipe is full of rings not cleared yet: it rings already
            pass

    def clear(self) -> None:
        try:
            while os.read(self._read, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self._read)
        os.close(self._write)
