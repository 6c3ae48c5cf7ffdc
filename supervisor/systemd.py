"""systemd's notify protocol, without libsystemd: readiness, status, watchdog pings, stopping.

Under a `Type=notify` unit systemd sets `NOTIFY_SOCKET` (a datagram socket path, `@` for the
abstract namespace) and, with `WatchdogSec=`, `WATCHDOG_USEC`. Elsewhere every call is a no-op.
"""

import os
import socket
import time


class Notifier:
    def __init__(self, environ=os.environ):
        path = environ.get("NOTIFY_SOCKET", "")
        self.address = "\0" + path[1:] if path.startswith("@") else path
        usec = int(environ.get("WATCHDOG_USEC", "0") or 0)
        self.watchdog_interval = usec / 2e6 if usec else None  # ping at twice the rate systemd expects
        self.next_ping = 0.0
        self.ready_sent = False

    def send(self, *lines: str) -> None:
        if not self.address:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)  # a listener that stops reading must never stall the loop
            try:
                sock.sendto("\n".join(lines).encode(), self.address)
            except OSError:
                pass  # systemd gone, not listening or not reading: nothing to tell

    def ready(self, status: str) -> None:
        """READY=1 the first time; later calls only update STATUS."""
        if self.ready_sent:
            self.send(f"STATUS={status}")
        else:
            self.ready_sent = True
            self.send("READY=1", f"STATUS={status}", f"MAINPID={os.getpid()}")

    def watchdog(self) -> None:
        now = time.monotonic()
        if self.watchdog_interval and now >= self.next_ping:
            self.send("WATCHDOG=1")
            self.next_ping = now + self.watchdog_interval

    def seconds_to_ping(self) -> float | None:
        if not self.watchdog_interval:
            return None
        return max(0.0, self.next_ping - time.monotonic())

    def stopping(self) -> None:
        self.send("STOPPING=1")
