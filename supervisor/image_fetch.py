"""Fetching a client's image URL for the gateway, without letting the client reach our network.

Only http and https; the host is resolved once, every address it resolves to must be public
(no loopback, private, link-local, multicast, reserved or unspecified address, nor a 6to4,
Teredo or site-local IPv6 one), and the connection goes to that checked address (the name is not
looked up again, so DNS rebinding cannot swap it). Redirects are refused, not followed. The whole
fetch, from connect to the last byte, is bounded in time by a watchdog that cuts the socket, and
the body is read in chunks that stop at the byte limit; `request_fetcher` gives all the URLs of
one request a single deadline. Standard library only; no environment proxies are used.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
import threading
import time
import urllib.parse
from typing import Callable

from qvl.protocol.errors import BadRequest

FETCH_TIMEOUT_S = 10.0  # for all the image URLs of one request together
_CHUNK = 64 << 10
# IPv6 prefixes whose packets may be tunnelled on to an IPv4 address they embed (6to4 2002:7f00:1::
# is 127.0.0.1; Teredo), and deprecated site-local addresses; no public image server needs them.
_REFUSED = tuple(ipaddress.ip_network(n) for n in ("2002::/16", "2001::/32", "fec0::/10"))
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def is_public(address: Address) -> bool:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return address.is_global and not (address.is_multicast or address.is_reserved
                                      or address.is_unspecified or address.is_loopback
                                      or address.is_link_local or address.is_private
                                      or any(address in network for network in _REFUSED))


def request_fetcher(max_bytes: int, timeout_s: float = FETCH_TIMEOUT_S,
                    allowed: Callable[[Address], bool] = is_public) -> Callable[[str], bytes]:
    """`fetch_image` for the URLs of one request, one after another, all within `timeout_s` from now."""
    deadline = time.monotonic() + timeout_s

    def fetch(url: str) -> bytes:
        left = deadline - time.monotonic()
        if left <= 0:
            raise BadRequest(f"the image URLs of this request took longer than {timeout_s:g}s")
        return fetch_image(url, max_bytes, left, allowed)

    return fetch


def fetch_image(url: str, max_bytes: int, timeout_s: float = FETCH_TIMEOUT_S,
                allowed: Callable[[Address], bool] = is_public) -> bytes:
    """The body of a 200 answer to GET `url`, at most `max_bytes`; `BadRequest` for anything else.

    `allowed` decides which addresses may be contacted (tests stand a local server in for a
    public one)."""
    target = urllib.parse.urlsplit(url)
    try:
        port = target.port or (443 if target.scheme == "https" else 80)
    except ValueError:
        raise BadRequest(f"image URL {url!r} has an invalid port") from None
    if target.scheme not in ("http", "https") or not target.hostname or target.username is not None:
        raise BadRequest("an image URL must be http(s)://host/path, without credentials")
    address = _checked_address(target.hostname, port, allowed)
    connection = _pinned_connection(target.scheme, target.hostname, port, address, timeout_s)
    timed_out = threading.Event()
    watchdog = threading.Timer(timeout_s, _cut, (connection, timed_out))
    watchdog.start()
    try:
        connection.request("GET", urllib.parse.urlunsplit(("", "", target.path or "/", target.query, "")),
                           headers={"Accept": "image/*", "User-Agent": "qvl-gateway"})
        response = connection.getresponse()
        if 300 <= response.status < 400:
            raise BadRequest(f"image URL {url} redirects; redirects are not followed")
        if response.status != 200:
            raise BadRequest(f"image URL {url} answered HTTP {response.status}")
        image = _read_capped(response, max_bytes, url)
    except (OSError, ValueError, http.client.HTTPException) as exc:
        if isinstance(exc, TimeoutError):  # the socket's own timeout can beat the watchdog to it
            timed_out.set()
        if not timed_out.is_set():
            raise BadRequest(f"cannot fetch image URL {url}: {exc}") from None
    finally:
        watchdog.cancel()
        connection.close()
    if timed_out.is_set():  # a cut socket may also read as a short, clean end of the body
        raise BadRequest(f"image URL {url} took longer than {timeout_s:g}s")
    return image


def _checked_address(host: str, port: int, allowed: Callable[[Address], bool]) -> str:
    """The address to connect to; every address the name resolves to must be allowed."""
    try:
        found = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise BadRequest(f"cannot resolve image host {host!r}: {exc}") from None
    addresses = [ipaddress.ip_address(info[4][0].split("%")[0]) for info in found]
    refused = [a for a in addresses if not allowed(a)]
    if refused or not addresses:
        raise BadRequest(f"image host {host!r} is not a public address ({refused[0] if refused else 'none'})")
    return str(addresses[0])


def _pinned_connection(scheme: str, host: str, port: int, address: str,
                       timeout_s: float) -> http.client.HTTPConnection:
    """A connection to `address` that names `host` in its Host header and, for https, in TLS."""
    base = http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection

    class Pinned(base):
        opened: socket.socket | None = None  # kept: `sock` is dropped once a response owns the socket

        def connect(self) -> None:
            sock = socket.create_connection((address, port), timeout_s)
            self.sock = self.opened = tls.wrap_socket(sock, server_hostname=host) if scheme == "https" else sock

    tls = ssl.create_default_context()
    extra = {"context": tls} if scheme == "https" else {}
    return Pinned(host, port, timeout=timeout_s, **extra)


def _cut(connection: http.client.HTTPConnection, timed_out: threading.Event) -> None:
    """The watchdog: end whatever the fetching thread is blocked on."""
    timed_out.set()
    sock = connection.opened
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


def _read_capped(response: http.client.HTTPResponse, max_bytes: int, url: str) -> bytes:
    declared = response.getheader("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise BadRequest(f"image at {url} is {declared} bytes, over the limit of {max_bytes}")
    data = bytearray()
    while chunk := response.read(min(_CHUNK, max_bytes + 1 - len(data))):
        data += chunk
        if len(data) > max_bytes:
            raise BadRequest(f"image at {url} exceeds {max_bytes} bytes")
    return bytes(data)
