"""The ``controlplane`` command line: serve the reference runtime API, mint a runtime token.

    controlplane serve --listen HOST:PORT --secret-file [KID:]FILE ... [--vms FILE] [--max-age SECONDS]
                       [--tls-cert FILE --tls-key FILE [--client-ca FILE]]
                       [--signing-key [KID:]FILE ... --issuer URL [--identity-lifetime SECONDS]]
    controlplane mint VM_ID --secret-file [KID:]FILE ... [--lifetime SECONDS]
    controlplane keygen --out FILE       (prints the new key's kid)

Secrets come from files only, never from argv. ``serve`` accepts ``[::1]:PORT`` and port 0
(any free port); the one line it prints on stderr once listening names the real address.
Exit codes: 0 ok, 1 failed (one line on stderr naming the thing and the reason), 2 usage.
"""

from __future__ import annotations

import argparse
import socket
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path

import uvicorn
from starlette.routing import BaseRoute
from starlette.types import ASGIApp

from controlplane import actions_cache, identity, tls
from controlplane.app import create_app
from controlplane.tokens import Secrets, TokenError, Verifier, mint
from controlplane.vms import VmDirectory, VmFileError
from metadata_proxy.cli_errors import report_unexpected  # standard library only

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
# Bounds how long SIGTERM waits for in-flight requests.
GRACEFUL_SHUTDOWN_SECONDS = 5


__all__ = ["build_app", "main", "parser", "serve"]


class Failure(Exception):
    """An expected failure, reported as one stderr line and exit 1."""


# What the commands raise for a bad file or value: one stderr line and exit 1, no traceback.
_EXPECTED_FAILURES = (
    Failure,
    TokenError,
    VmFileError,
    identity.SigningKeyError,
    tls.TLSError,
    actions_cache.CacheSetupError,
)


class Usage(Exception):
    """Options that do not go together: one stderr line and exit 2."""


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


def _identity_lifetime(text: str) -> int:
    if not text.isdigit() or not 0 < int(text) <= identity.MAX_LIFETIME:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from 1 to {identity.MAX_LIFETIME}")
    return int(text)


def _issuer(text: str) -> str:
    try:
        return identity.check_issuer(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _check_serve_options(args: argparse.Namespace) -> None:
    """Options that only make sense together: a usage error (exit 2) otherwise."""
    if bool(args.tls_cert) != bool(args.tls_key):
        raise Usage("--tls-cert and --tls-key go together")
    if args.client_ca and not args.tls_cert:
        raise Usage("--client-ca needs --tls-cert and --tls-key")
    if bool(args.signing_key) != bool(args.issuer):
        raise Usage("--signing-key and --issuer go together")
    if args.identity_lifetime is not None and not args.signing_key:
        raise Usage("--identity-lifetime needs --signing-key")


def build_app(args: argparse.Namespace, routes: tuple[BaseRoute, ...] = ()) -> ASGIApp:
    """The reference runtime API as ``serve``'s arguments describe it, with `routes` of one's own beside it."""
    _check_serve_options(args)
    secrets = Secrets.from_specs(args.secret_file)
    vms = VmDirectory(args.vms) if args.vms else None
    verifier = Verifier(secrets, vm_exists=vms.exists if vms else None, max_age=args.max_age)
    issuer = None
    if args.signing_key:
        keys = identity.SigningKeys.from_specs(args.signing_key)
        lifetime = args.identity_lifetime or identity.DEFAULT_LIFETIME
        issuer = identity.IdentityIssuer(keys, args.issuer, lifetime=lifetime)
    if args.blob_url:
        routes = (*actions_cache.cache_routes(actions_cache.from_args(args)), *routes)
    return create_app(
        verifier, vms=vms, routes=routes, identity=issuer, require_client_certificate=bool(args.client_ca)
    )


def serve(args: argparse.Namespace, app: ASGIApp) -> int:
    """Serve `app` on ``--listen`` until SIGTERM/SIGINT (an integrator may wrap build_app's app)."""
    _check_serve_options(args)
    context = None
    if args.tls_cert:
        context = tls.server_context(args.tls_cert, args.tls_key, args.client_ca)
    host, port = args.listen
    sock = _bind(host, port)
    config = uvicorn.Config(
        app,
        loop="uvloop",
        # Over TLS, uvicorn's httptools protocol plus the client certificate in the scope (tls.py).
        http=tls.TLSProtocol if context is not None else "httptools",
        ssl_context_factory=(lambda _config, _default: context) if context is not None else None,
        lifespan="off",
        proxy_headers=False,  # the reference API reads X-Forwarded-For as data, not as the peer
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
    )
    bound_host, bound_port = sock.getsockname()[:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    # The socket already listens, so a client that connects after this line is queued and served.
    scheme = "https" if context is not None else "http"
    print(f"controlplane: listening on {scheme}://{shown}:{bound_port}", file=sys.stderr, flush=True)
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


def _keygen(args: argparse.Namespace) -> int:
    key = identity.keygen(args.out)
    print(key.kid, flush=True)  # the public key's name (its thumbprint): nothing secret
    return EXIT_OK


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="controlplane", allow_abbrev=False, description="Runtime tokens and the reference runtime API."
    )
    top.add_argument("--version", action="version", version=f"controlplane {_version()}")
    top.add_argument("--debug", action="store_true", help="print the traceback of an unexpected error")
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
    serve_.add_argument("--tls-cert", type=Path, metavar="FILE", help="serve HTTPS with this certificate (chain, PEM)")
    serve_.add_argument("--tls-key", type=Path, metavar="FILE", help="the certificate's private key (PEM)")
    serve_.add_argument(
        "--client-ca",
        type=Path,
        metavar="FILE",
        help="require client certificates from this CA; a host is its certificate's CN (or first DNS name)",
    )
    serve_.add_argument(
        "--signing-key",
        action="append",
        metavar="[KID:]FILE",
        help="a P-256 key (controlplane keygen) for identity tokens; repeat to rotate (the first signs, all published)",
    )
    serve_.add_argument(
        "--issuer", type=_issuer, metavar="URL", help="the identity tokens' iss: this server's public URL"
    )
    serve_.add_argument(
        "--identity-lifetime",
        type=_identity_lifetime,
        metavar="SECONDS",
        help=f"identity token lifetime (default {identity.DEFAULT_LIFETIME}, at most {identity.MAX_LIFETIME})",
    )
    actions_cache.add_arguments(serve_)
    serve_.set_defaults(run=_serve)

    mint_ = commands.add_parser("mint", allow_abbrev=False, help="print a runtime token for VM_ID on stdout")
    mint_.add_argument("vm_id", metavar="VM_ID")
    mint_.add_argument("--secret-file", required=True, action="append", metavar="[KID:]FILE", help=secret_help)
    mint_.add_argument("--lifetime", type=_positive_int, metavar="SECONDS", help="set exp this many seconds ahead")
    mint_.set_defaults(run=_mint)

    keygen_ = commands.add_parser(
        "keygen",
        allow_abbrev=False,
        help="write a new P-256 signing key for identity tokens (mode 0600; never overwrites)",
    )
    keygen_.add_argument("--out", required=True, type=Path, metavar="FILE")
    keygen_.set_defaults(run=_keygen)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage error (or --help)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        code: int = args.run(args)
    except Usage as exc:
        print(f"controlplane: {exc}", file=sys.stderr, flush=True)
        return EXIT_USAGE
    except _EXPECTED_FAILURES as exc:
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
