"""CurveZMQ keys: a supervisor key pair, client key pairs, and the folder layout that holds them.

`qvl-supervisor keygen DIR` writes `server.key` / `server.key_secret` (the supervisor's pair),
`client.key` / `client.key_secret` (a client's pair), `allowed/client.key` (the public keys the
supervisor lets in) and, for an admin client, `admin/client.key` (the public keys whose holders
may send control commands such as `recycle`). Hand a client the folder with `server.key` and its
own pair; add other clients' public keys to `allowed/`. Folders are 0700 and secret key files
0600 whatever the umask or the folder's mode before.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import zmq.auth


def keygen(directory: str | Path, client_name: str = "client", admin: bool | None = None) -> dict:
    """Create the server pair (if missing) and a client pair whose public key is allowed.

    The client is an admin when `admin` says so; by default when no admin exists yet, so a new
    folder's first client is its admin and later ones are plain clients."""
    root = Path(directory)
    for folder in (root, root / "allowed", root / "admin"):  # private before any secret is written into it
        folder.mkdir(parents=True, exist_ok=True)
        os.chmod(folder, 0o700)
    if admin is None:
        admin = not any((root / "admin").glob("*.key"))
    if not (root / "server.key_secret").exists():
        zmq.auth.create_certificates(root, "server")
    public, _ = zmq.auth.create_certificates(root, client_name)
    for secret in root.glob("*.key_secret"):  # create_certificates follows the umask
        os.chmod(secret, 0o600)
    for folder in (root / "allowed", *([root / "admin"] if admin else [])):
        shutil.copy(public, folder / Path(public).name)
    return {"server": root / "server.key", "client_public": Path(public),
            "client_secret": root / f"{client_name}.key_secret", "admin": admin}


def admin_keys(directory: str | Path) -> set[bytes]:
    """The Z85 public keys (40 bytes each) in `directory/admin`: the clients allowed to send control
    commands. A CURVE client's ZAP `User-Id` (`frame.get("User-Id")`, a str) is its Z85 public
    key, so a client is an admin when `user_id.encode() in admin_keys(directory)`. Empty when the
    folder is missing. The supervisor reads it once at start: a new admin key needs a restart."""
    folder = Path(directory) / "admin"
    if not folder.is_dir():
        return set()
    return set(zmq.auth.load_certificates(folder))


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
