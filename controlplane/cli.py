"""The ``controlplane`` command line: serve the reference runtime API, mint a runtime token.

    controlplane serve --listen HOST:PORT --secret-file [KID:]FILE ... [--vms FILE] [--max-age SECONDS]
    controlplane mint VM_ID --secret-file [KID:]FILE ... [--lifetime SECONDS]

Secrets come from files only, never from argv. ``serve`` accepts ``[::1]:PORT`` and port 0
(any free port); the one line it prints on stderr once listening names the real address.
Exit codes: 0 ok, 1 failed (one line on stderr naming the thing and the reason), 2 usage.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import uvicorn

from controlplane.app import create_app
from controlplane.tokens import Secrets, TokenError, Verifier, mint
from metadata_proxy.cli_errors import report_unexpected  # standard library only

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
# Bounds how long SIGTERM waits for in-flight requests (a /runtime/slow call may take 30 s).
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


class VmList:
    """The ``--vms`` file as a ``vm_exists`` callback: VM ids one per line (blank lines and ``#`` comments skipped).

    Re-read whenever the file's stat changes, so a VM removed from the file is gone for the
    next request. Unreadable at start: Failure. Unreadable later: no VM exists (fail closed).
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stamp: tuple[int, int, int] | None = None
        self._ids: frozenset[str] = frozenset()
        try:
            self._refresh()
        except (OSError, UnicodeDecodeError) as exc:
            raise Failure(f"cannot read VM list {path}: {getattr(exc, 'strerror', None) or exc}") from None

    def _refresh(self) -> None:
        st = os.stat(self._path)
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self._stamp:
            lines = (line.strip() for line in self._path.read_text(encoding="utf-8").splitlines())
            self._ids = frozenset(line for line in lines if line and not line.startswith("#"))
            self._stamp = stamp

    def __call__(self, vm_id: str) -> bool:
        try:
            self._refresh()
        except (OSError, UnicodeDecodeError):
            return False
        return vm_id in self._ids


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


def _serve(args: argparse.Namespace) -> int:
    secrets = Secrets.from_specs(args.secret_file)
    verifier = Verifier(secrets, vm_exists=VmList(args.vms) if args.vms else None, max_age=args.max_age)
    host, port = args.listen
    sock = _bind(host, port)
    config = uvicorn.Config(
        create_app(verifier),
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


def _mint(args: argparse.Namespace) -> int:
    if not args.vm_id:
        raise Failure("VM_ID must not be empty")
    print(mint(args.vm_id, Secrets.from_specs(args.secret_file), lifetime=args.lifetime), flush=True)
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="controlplane", allow_abbrev=False, description="Runtime tokens and the reference runtime API."
    )
    parser.add_argument("--version", action="version", version=f"controlplane {_version()}")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an unexpected error")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    secret_help = "the secret in FILE, named KID when given; repeat for rotation (the first one mints)"

    serve = commands.add_parser("serve", allow_abbrev=False, help="serve the reference runtime API")
    serve.add_argument("--listen", required=True, type=_listen_address, metavar="HOST:PORT")
    serve.add_argument("--secret-file", required=True, action="append", metavar="[KID:]FILE", help=secret_help)
    serve.add_argument("--vms", type=Path, metavar="FILE", help="only the VM ids listed here exist (re-read on change)")
    serve.add_argument("--max-age", type=_positive_int, metavar="SECONDS", help="refuse tokens older than this")
    serve.set_defaults(run=_serve)

    mint_ = commands.add_parser("mint", allow_abbrev=False, help="print a runtime token for VM_ID on stdout")
    mint_.add_argument("vm_id", metavar="VM_ID")
    mint_.add_argument("--secret-file", required=True, action="append", metavar="[KID:]FILE", help=secret_help)
    mint_.add_argument("--lifetime", type=_positive_int, metavar="SECONDS", help="set exp this many seconds ahead")
    mint_.set_defaults(run=_mint)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage error (or --help)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        code: int = args.run(args)
    except (Failure, TokenError) as exc:
        print(f"controlplane: {exc}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    except (OSError, ValueError) as exc:  # e.g. the port is taken: one line, not a traceback
        print(f"controlplane: {exc}", file=sys.stderr, flush=True)
        return EXIT_FAILED
    except Exception as exc:  # a bug: one line, and the traceback kept (pipx's habit)
        return report_unexpected("controlplane", exc, debug=args.debug or args.command == "serve")
    return code


def _version() -> str:
    # The distribution's version, read here rather than from metadata_proxy: an integrator
    # may import controlplane alone.
    try:
        return metadata.version("metadata-proxy")
    except metadata.PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
