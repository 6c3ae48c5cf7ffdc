"""Secrets at rest and at start: key files 0600 and folders 0700 whatever was there before, the
admin key set as ZAP reports it, an empty API key file, an open frontend and an open gateway
without a key refused at start."""

import os
import stat
import sys
import types

import pytest
import zmq

from qvl.protocol.curve import admin_keys, client_keys, serve_securely
from qvl.supervisor import cli


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def open_umask():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_keygen_writes_private_files_into_an_open_existing_folder(tmp_path, open_umask):
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o755)
    os.chmod(keys, 0o755)
    (keys / "allowed").mkdir(mode=0o777)
    os.chmod(keys / "allowed", 0o777)
    assert cli.main(["keygen", str(keys)]) == 0
    assert cli.main(["keygen", str(keys), "--client", "bob"]) == 0
    secrets = sorted(p.name for p in keys.glob("*.key_secret"))
    assert secrets == ["bob.key_secret", "client.key_secret", "server.key_secret"]
    assert all(mode(keys / name) == 0o600 for name in secrets)
    assert [mode(keys / d) for d in ("", "allowed", "admin")] == [0o700] * 3


def test_an_old_world_readable_secret_is_made_private(tmp_path, open_umask):
    keys = tmp_path / "keys"
    cli.main(["keygen", str(keys)])
    os.chmod(keys / "server.key_secret", 0o644)
    cli.main(["keygen", str(keys), "--client", "bob"])
    assert mode(keys / "server.key_secret") == 0o600


def test_the_first_client_is_the_admin_later_ones_are_not_unless_asked(tmp_path):
    keys = tmp_path / "keys"
    for argv in ([], ["--client", "bob"], ["--client", "carol", "--admin"], ["--client", "dave", "--no-admin"]):
        assert cli.main(["keygen", str(keys), *argv]) == 0
    assert sorted(p.name for p in (keys / "allowed").iterdir()) == ["bob.key", "carol.key", "client.key", "dave.key"]
    assert sorted(p.name for p in (keys / "admin").iterdir()) == ["carol.key", "client.key"]
    assert admin_keys(keys) == {_public(keys, "client"), _public(keys, "carol")}
    assert admin_keys(tmp_path / "no-such-folder") == set()


def _public(keys, name: str) -> bytes:
    return zmq.auth.load_certificate(keys / f"{name}.key")[0]


def test_admin_keys_match_the_user_id_zap_reports(tmp_path):
    """The contract the supervisor relies on: a message's `User-Id`, encoded, is in `admin_keys`
    exactly when its sender holds an admin key."""
    keys = tmp_path / "keys"
    cli.main(["keygen", str(keys)])
    cli.main(["keygen", str(keys), "--client", "bob"])
    ctx = zmq.Context()
    server = ctx.socket(zmq.ROUTER)
    auth = serve_securely(server, ctx, keys)
    endpoint = f"ipc://{tmp_path}/frontend"
    server.bind(endpoint)
    users = {}
    try:
        for name in ("client", "bob"):
            dealer = ctx.socket(zmq.DEALER)
            dealer.curve_serverkey, dealer.curve_publickey, dealer.curve_secretkey = \
                client_keys(keys, name)["curve"]
            dealer.connect(endpoint)
            dealer.send(b"hello")
            assert server.poll(5000)
            _, message = server.recv_multipart(copy=False)
            users[name] = message.get("User-Id").encode()
            dealer.close(0)
    finally:
        server.close(0)
        auth.stop()
        ctx.term()
    assert users["client"] in admin_keys(keys) and users["bob"] not in admin_keys(keys)
    assert users["bob"] == _public(keys, "bob")


@pytest.fixture
def start(monkeypatch, capsys):
    """`qvl-supervisor start ARGS`: its exit code and stderr; a supervisor that would really
    start fails the test at once instead."""
    def started(config):
        pytest.fail(f"the supervisor started with {config}")

    monkeypatch.setitem(sys.modules, "qvl.supervisor.supervisor", types.SimpleNamespace(Supervisor=started))

    def run(*argv: str) -> tuple[int, str]:
        code = cli.main(["start", "--model", "m", *argv])
        return code, capsys.readouterr().err

    return run


@pytest.mark.parametrize("content", ["", "\n", "  \t\n"])
def test_an_empty_api_key_file_is_refused_at_start(start, tmp_path, content):
    key = tmp_path / "api.key"
    key.write_text(content)
    code, err = start("--http", "127.0.0.1:8000", "--http-api-key-file", str(key))
    assert code == 2 and f"http_api_key_file {key} is empty" in err


def test_a_missing_api_key_file_is_refused_at_start(start, tmp_path):
    code, err = start("--http", "127.0.0.1:8000", "--http-api-key-file", str(tmp_path / "nope"))
    assert code == 2 and "http_api_key_file cannot be read" in err


@pytest.mark.parametrize("frontend", ["tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://10.1.2.3:5555",
                                      "tcp://eth0:5555", "tcp://[::]:5555", "tcp://example.com:5555"])
def test_an_open_frontend_without_curve_is_refused_unless_insecure(start, tmp_path, frontend):
    code, err = start("--frontend", frontend)
    assert code == 2 and f"frontend {frontend} can be reached from other hosts" in err
    for allowed in (["--insecure", "true"], ["--curve-dir", str(tmp_path)]):
        with pytest.raises(pytest.fail.Exception, match="the supervisor started"):
            start("--frontend", frontend, *allowed)


@pytest.mark.parametrize("frontend", ["tcp://127.0.0.1:5555", "tcp://127.0.0.2:5555", "tcp://localhost:5555",
                                      "tcp://[::1]:5555", "ipc:///tmp/qvl.sock"])
def test_a_local_frontend_needs_no_curve(start, frontend):
    with pytest.raises(pytest.fail.Exception, match="the supervisor started"):
        start("--frontend", frontend)


@pytest.mark.parametrize("http", ["0.0.0.0:8000", "[::]:8000", "10.1.2.3:8000", "example.com:8000"])
def test_an_open_gateway_without_an_api_key_is_refused_unless_insecure(start, tmp_path, http):
    code, err = start("--http", http)
    assert code == 2 and f"http {http} can be reached from other hosts without an API key" in err
    key = tmp_path / "api.key"
    key.write_text("k")
    for allowed in (["--insecure", "true"], ["--http-api-key-file", str(key)]):
        with pytest.raises(pytest.fail.Exception, match="the supervisor started"):
            start("--http", http, *allowed)


@pytest.mark.parametrize("http", ["127.0.0.1:8000", "localhost:8000", "[::1]:8000"])
def test_a_local_gateway_needs_no_api_key(start, http):
    with pytest.raises(pytest.fail.Exception, match="the supervisor started"):
        start("--http", http)
