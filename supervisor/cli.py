"""The `qvl-supervisor` command: start | status | recycle | stop | ask | keygen.

`start` runs the supervisor in the foreground (for a terminal, a process manager or systemd);
the other commands are clients of a running one.
"""

import argparse
import json
import os
import signal
import socket
import sys
import time

import psutil

from qvl.protocol.client import DEFAULT_ENDPOINT, Client
from qvl.protocol.curve import client_keys, keygen
from qvl.protocol.errors import QvlError

from .config import ConfigError, add_arguments, load_config
from .events import setup_logging


def cmd_start(args: argparse.Namespace) -> int:
    try:
        config = load_config(args)
    except ConfigError as exc:
        print(f"qvl-supervisor: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.log_level, config.log_format)
    from .supervisor import Supervisor
    return Supervisor(config).run()


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.status()
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def cmd_recycle(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.recycle(args.worker)
    print(f"recycling workers: {result['recycling'] or 'none (no ready worker matched)'}")
    return 0


def cmd_stop(args: argparse.Namespace) -> int:
    """SIGTERM the supervisor behind the endpoint (it drains, then exits) and wait until it has."""
    with _client(args) as client:
        status = client.status()
    if status["host"] != socket.gethostname():
        print(f"qvl-supervisor: the supervisor runs on {status['host']}; stop it there",
              file=sys.stderr)
        return 1
    pid = status["pid"]
    os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + args.wait
    while _running(pid):
        if time.monotonic() > end:
            print(f"qvl-supervisor: pid {pid} still running after {args.wait:g}s", file=sys.stderr)
            return 1
        time.sleep(0.05)
    print(f"stopped supervisor pid {pid}")
    return 0


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def cmd_ask(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.ask(args.image, args.question, max_new_tokens=args.max_new_tokens)
    if args.json:
        print(json.dumps(result.__dict__, indent=2))
    else:
        print(result.text)
    return 0


def format_status(status: dict) -> str:
    lines = [
        f"supervisor pid {status['pid']} on {status['host']}, up {status['uptime_s']:.0f}s, "
        f"frontend {status['frontend']}",
        f"model {status['model']} on {status['device']}; queue {status['queue_depth']}/"
        f"{status['queue_size']}, in flight {status['inflight']}"
        + (", shutting down" if status["shutting_down"] else ""),
        "",
        f"{'slot':>4} {'state':<9} {'pid':>7} {'gen':>4} {'served':>7} {'infl':>4} {'restarts':>8} "
        f"{'recycles':>8} {'alloc MiB':>9} {'resv MiB':>9} {'frag':>5} {'rss MiB':>8}  last reason",
    ]
    for w in status["workers"]:
        t = w["telemetry"]
        frag = t.get("fragmentation")
        lines.append(
            f"{w['slot']:>4} {w['state']:<9} {w['pid'] or '-':>7} {w['generation']:>4} "
            f"{w['served']:>7} {w['inflight']:>4} {w['restarts']:>8} {w['recycles']:>8} "
            f"{_mib(t.get('allocated_bytes')):>9} {_mib(t.get('reserved_bytes')):>9} "
            f"{'-' if frag is None else f'{frag:.2f}':>5} "
            f"{_mib(w.get('host_rss_bytes') or t.get('rss_bytes')):>8}  {w['last_reason']}"
            + (f" (retry in {w['failed']['retry_in_s']:.0f}s)" if w.get("failed") else "")
            + (f" (at start above: {', '.join(w['thresholds_at_start'])})" if w.get("thresholds_at_start") else "")
            + (f" [spare {w['spare_pid']} {w['spare_state']}, {_mib(w.get('spare_rss_bytes'))} MiB]"
               if w.get("spare_pid") else ""))
    return "\n".join(lines)


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


def cmd_keygen(args: argparse.Namespace) -> int:
    paths = keygen(args.directory, args.client, args.admin)
    folders = "allowed/ and admin/" if paths["admin"] else "allowed/"
    print(f"server public key: {paths['server']}\nclient key pair: {paths['client_secret']} "
          f"(public key {paths['client_public'].name} in {args.directory}/{folders})")
    return 0


def _client(args: argparse.Namespace) -> Client:
    return Client(args.endpoint, timeout=args.timeout, **client_keys(args.curve_dir))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="qvl-supervisor", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="run a supervisor in the foreground")
    add_arguments(start)
    start.set_defaults(func=cmd_start)

    def client_command(name: str, func, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--endpoint", default=DEFAULT_ENDPOINT, help="the supervisor's frontend")
        p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for a reply")
        p.add_argument("--curve-dir", default="", help="`keygen` folder, for a supervisor that requires CurveZMQ")
        p.set_defaults(func=func)
        return p

    client_command("status", cmd_status, "show workers and queue").add_argument(
        "--json", action="store_true", help="print the status as JSON")
    client_command("recycle", cmd_recycle, "replace workers cleanly").add_argument(
        "--worker", type=int, default=None, help="slot to recycle (default: every slot)")
    client_command("stop", cmd_stop, "drain and stop the supervisor").add_argument(
        "--wait", type=float, default=60.0, help="seconds to wait for it to exit")
    ask = client_command("ask", cmd_ask, "ask one question about one image")
    ask.add_argument("image", help="image file")
    ask.add_argument("question")
    ask.add_argument("--max-new-tokens", type=int, default=64)
    ask.add_argument("--json", action="store_true", help="print the whole result as JSON")
    ask.set_defaults(timeout=120.0)
    keys = sub.add_parser("keygen", help="write CurveZMQ key pairs for a supervisor and its clients")
    keys.add_argument("directory")
    keys.add_argument("--client", default="client", help="name of the client key pair to add")
    keys.add_argument("--admin", action=argparse.BooleanOptionalAction, default=None,
                      help="let this client send control commands such as recycle (default: only "
                           "the folder's first client); --no-admin adds a plain client")
    keys.set_defaults(func=cmd_keygen)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except QvlError as exc:
        print(f"qvl-supervisor: {exc.code}: {exc.message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
