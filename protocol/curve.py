"""CurveZMQ keys: a supervisor key pair, client key pairs, and the folder layout that holds them.

`qvl-supervisor keygen DIR` writes `server.key` / `server.key_secret` (the supervisor's pair),
`client.key` / `client.key_secret` (a client's pair) and `allowed/client.key` (the public keys
the supervisor lets in). Hand a client the folder with `server.key` and its own pair; add other
clients' public keys to `allowed/`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import zmq.auth


def keygen(directory: str | Path, client_name: str = "client") -> dict[str, Path]:
    """Create the server pair (if missing) and a client pair whose public key is allowed."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    (root / "allowed").mkdir(exist_ok=True, mode=0o700)
    if not (root / "server.key_secret").exists():
        zmq.auth.create_certificates(root, "server")
    public, secret = zmq.auth.create_certificates(root, client_name)
    shutil.copy(public, root / "allowed" / Path(public).name)
    return {"server": root / "server.key", "client_public": Path(public), "client_secret": Path(secret)}


def client_keys(directory: str | Path | None, client_name: str = "client") -> dict:
    """`Client`/`AsyncClient` keyword arguments for a keygen folder; none for an empty path."""
    if not directory:
        return {}
    root = Path(directory)
    server_public, _ = zmq.auth.load_certificate(root / "server.key")
    public, secret = zmq.auth.load_certificate(root / f"{client_name}.key_secret")
    return {"curve": (server_public, public, secret)}


def serve_securely(sock: zmq.Socket, ctx: zmq.Context, directory: str | Path):
    """Make `sock` a CURVE server that admits only the public keys in `directory/allowed`.

    Returns the started authenticator thread; stop it when the socket closes.
    """
    from zmq.auth.thread import ThreadAuthenticator

    root = Path(directory)
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(root / "allowed"))
    public, secret = zmq.auth.load_certificate(root / "server.key_secret")
    sock.curve_publickey, sock.curve_secretkey, sock.curve_server = public, secret, True
    return auth
