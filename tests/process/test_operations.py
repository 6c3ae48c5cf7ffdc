"""Running qvl as a service: CurveZMQ lets only known clients in, the ipc frontend is the owner's
alone, systemd hears readiness, watchdog pings and stopping, and logs can be JSON lines."""

import configparser
import json
import os
import socket
import stat

import pytest
import zmq.auth

from harness import ROOT, png
from qvl.protocol import BadRequest, Client, RequestTimeout
from qvl.protocol.curve import client_keys, keygen


def test_only_clients_with_an_allowed_key_get_through(start_supervisor, tmp_path):
    keys, stranger = tmp_path / "keys", tmp_path / "stranger"
    keygen(keys)  # the first client: an admin
    keygen(keys, "plain")  # allowed in, not an admin
    keygen(stranger)  # a valid key pair the supervisor was never told about
    sup = start_supervisor("--curve-dir", str(keys))
    with Client(sup.endpoint, timeout=30, **client_keys(keys)) as known, \
            Client(sup.endpoint, timeout=30, **client_keys(keys, "plain")) as plain:
        known.wait_ready(timeout=60)
        assert known.ask(png(), "Hello?", max_new_tokens=3).usage["completion_tokens"] >= 1
        assert plain.ask(png(), "Hello?", max_new_tokens=3).usage["completion_tokens"] >= 1
        with pytest.raises(BadRequest, match="admin"):
            plain.recycle(0)
        assert plain.status()["workers"][0]["recycling"] is None
        assert known.recycle(0)["recycling"] == [0]
    server_public, _ = zmq.auth.load_certificate(keys / "server.key")
    unknown = (server_public, *zmq.auth.load_certificate(stranger / "client.key_secret"))
    for curve in (None, unknown):
        with Client(sup.endpoint, timeout=2, curve=curve) as client, pytest.raises(RequestTimeout):
            client.ping()
    from test_gateway import readme_block  # the README's example, as users copy it
    exec(readme_block("client_keys(").replace("tcp://127.0.0.1:5555", sup.endpoint)
         .replace('"keys/"', repr(str(keys))), {})
    sup.remember_workers()


def test_ipc_frontend_is_the_owners_alone(shared_supervisor):
    path = shared_supervisor.endpoint[len("ipc://"):]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_systemd_hears_ready_watchdog_and_stopping(start_supervisor, tmp_path):
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify"))
    listener.settimeout(30)
    sup = start_supervisor("--log-format", "json",
                           env={"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "400000"})

    def until(line: str) -> list[str]:
        heard = []
        while line not in heard:
            heard += listener.recv(4096).decode().splitlines()
        return heard

    ready = until("READY=1")
    assert f"MAINPID={sup.pid}" in ready and "STATUS=1 of 1 workers ready" in ready
    assert sup.client().ping() > 0  # ready means serving
    until("WATCHDOG=1")
    until("WATCHDOG=1")
    sup.remember_workers()
    assert sup.stop() == 0
    until("STOPPING=1")
    listener.close()
    lines = [json.loads(line) for line in sup.log().splitlines() if line.startswith("{")]
    states = [line for line in lines if line.get("event") == "worker_state"]
    assert any(line["new"] == "ready" for line in states) and all(line["logger"] == "qvl.supervisor" for line in states)


def test_systemd_unit_waits_for_readiness_and_restarts_on_failure():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.read(ROOT / "scripts" / "qvl-supervisor.service")
    service = unit["Service"]
    assert service["Type"] == "notify" and service["Restart"] == "on-failure"
    assert service["KillMode"] == "mixed"  # SIGTERM to the supervisor alone: it drains its workers
    assert service["ExecStart"].split()[1:3] == ["start", "--config"] and int(service["WatchdogSec"]) > 0


def test_a_notify_listener_that_stops_reading_never_stalls_the_supervisor(start_supervisor, tmp_path):
    """Watchdog pings go to a datagram socket whose queue holds a handful: a blocking send to a
    listener that no longer reads would stall the loop, and SIGTERM would never be acted on."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify"))
    sup = start_supervisor(env={"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "20000"})
    try:
        sup.wait_ready()  # pings every 10 ms, never read: the listener's queue is long full
        with sup.client() as client:
            assert client.ping() < 5
        sup.remember_workers()
        assert sup.stop(timeout=30) == 0
    finally:
        listener.close()
