"""The ``controlplane`` command line: serve the reference runtime API, mint a runtime token.

    controlplane serve --listen HOST:PORT --secret-file [KID:]FILE ... [--vms FILE] [--max-age SECONDS]
    controlplane mint VM_ID --secret-file [KID:]FILE ... [--lifetime SECONDS]

Secrets come from files only, never from argv. ``serve`` accepts ``[::1]:PORT`` and port 0
(any free port); the one line it prints on stderr once listening names the real address.
Exit codes: 0 ok, 1 failed (one line on stderr naming the thing and the reason), 2 usage.
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

import uvicorn
from starlette.routing import BaseRoute
from starlette.types import ASGIApp

from controlplane import actions_cache
from controlplane.app import create_app
from controlplane.tokens import Secrets, TokenError, Verifier, mint
from controlplane.vms import VmDirectory, VmFileError

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
# Bounds how long SIGTERM waits for in-flight requests.
GRACEFUL_SHUTDOWN_SECONDS = 5


class Failure(Exception):
    """An expected failure, reported as one stderr line and exit 1."""


def _listen_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT (or [IPV6]:PORT)")
    return host, int(port)


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return int(text)


def _bind(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise Failure(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(socket.SOMAXCONN)
    except OSError as exc:
        sock.close()
        raise Failure(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def build_app(args: argparse.Namespace, routes: tuple[BaseRoute, ...] = ()) -> ASGIApp:
    """The reference runtime API as ``serve``'s arguments describe it, with `routes` of one's own beside it."""
    secrets = Secrets.from_specs(args.secret_file)
    vms = VmDirectory(args.vms) if args.vms else None
    verifier = Verifier(secrets, vm_exists=vms.exists if vms else None, max_age=args.max_age)
    if args.blob_url:
        routes = (*actions_cache.cache_routes(actions_cache.from_args(args)), *routes)
    return create_app(verifier, vms=vms, routes=routes)


def serve(args: argparse.Namespace, app: ASGIApp) -> int:
    """Serve `app` on ``--listen`` until SIGTERM/SIGINT (an integrator may wrap build_app's app)."""
    host, port = args.listen
    sock = _bind(host, port)
    config = uvicorn.Config(
        app,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        proxy_headers=False,  # the reference API reads X-Forwarded-For as data, not as the peer
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    # The socket already listens, so a client that connects after this line is queued and served.
    print(f"controlplane: listening on http://{shown}:{bound_port}", file=sys.stderr, flush=True)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:  # Ctrl-C: a clean stop, not a traceback
        pass
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    return serve(args, build_app(args))


def _mint(args: argparse.Namespace) -> int:
    if not args.vm_id:
        raise Failure("VM_ID must not be empty")
    print(mint(args.vm_id, Secrets.from_specs(args.secret_file), lifetime=args.lifetime), flush=True)
    return EXIT_OK


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="controlplane", allow_abbrev=False, description="Runtime tokens and the reference runtime API."
    )
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    secret_help = "the secret in FILE, named KID when given; repeat for rotation (the first one mints)"

    serve_ = commands.add_parser("serve", allow_abbrev=False, help="serve the reference runtime API")
    serve_.add_argument("--listen", required=True, type=_listen_address, metavar="HOST:PORT")
    serve_.add_argument("--secret-file", required=True, action="append", metavar="[KID:]FILE", help=secret_help)
    serve_.add_argument(
        "--vms",
        type=Path,
        metavar="FILE",
        help='the VMs that exist, one a line: an id or {"vm_id", "scope", "metadata"} (re-read on change)',
    )
    serve_.add_argument("--max-age", type=_positive_int, metavar="SECONDS", help="refuse tokens older than this")
    actions_cache.add_arguments(serve_)
    serve_.set_defaults(run=_serve)

    mint_ = commands.add_parser("mint", allow_abbrev=False, help="print a runtime token for VM_ID on stdout")
    mint_.add_argument("vm_id", metavar="VM_ID")
    mint_.add_argument("--secret-file", required=True, action="append", metavar="[KID:]FILE", help=secret_help)
    mint_.add_argument("--lifetime", type=_positive_int, metavar="SECONDS", help="set exp this many seconds ahead")
    mint_.set_defaults(run=_mint)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage error (or --help)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        code: int = args.run(args)
    except (Failure, TokenError, VmFileError, actions_cache.CacheSetupError) as exc:
        print(f"controlplane: {exc}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    except (OSError, ValueError) as exc:  # e.g. the port is taken: one line, not a traceback
        print(f"controlplane: {exc}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    return code


if __name__ == "__main__":
    sys.exit(main())
