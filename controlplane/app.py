"""The reference runtime API: what a control plane answers behind the metadata proxy.

Every ``/runtime/`` route first verifies ``Authorization: Bearer <token>`` (exactly one such
header) with the app's ``Verifier``::

    GET  /runtime/whoami         {"vm_id": <sub>, "host_id": <X-Metadata-Proxy-Host>, "address": <X-Forwarded-For>}
    GET  /runtime/identity       identity tokens, with the public /.well-known/ documents (identity.py)
    GET  /runtime/metadata       the VM's metadata (--vms), long-polled with wait_for_change (controlplane.metadata)

Errors use the proxy's envelope ``{"error": {"code": ..., "message": ...}}``: 401
``invalid_token`` (missing, non-Bearer, malformed, wrongly signed, expired, future-dated),
403 ``unknown_vm``, 403 ``host_mismatch`` (``HostBinding``), 400 ``bad_request``, 404
``not_found``, 405 ``method_not_allowed``.
Nothing here logs; the token only ever appears as its fingerprint.

An integrator mounts ``create_app(...)`` as it is, or builds its own app with
``authenticate`` and ``error_response``. Endpoints that exist only for tests live in
``tests/``, never here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from controlplane.tls import HOST_HEADER, client_identity
from controlplane.tokens import Claims, InvalidToken, UnknownVM, Verifier
from controlplane.vms import VmDirectory

if TYPE_CHECKING:
    from controlplane.identity import IdentityIssuer

__all__ = ["HostBinding", "authenticate", "bearer_token", "create_app", "error_response", "host_id"]

_HTTP_ERRORS = {
    400: ("bad_request", "the request is not valid"),
    404: ("not_found", "no such endpoint in the runtime API"),
    405: ("method_not_allowed", "the method is not allowed on this endpoint"),
}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The proxy's error envelope: ``{"error": {"code": code, "message": message}}``."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def bearer_token(request: Request) -> str:
    """The one Bearer credential of the request; InvalidToken if absent, doubled or not Bearer."""
    values = request.headers.getlist("authorization")
    if not values:
        raise InvalidToken("no Authorization header")
    if len(values) > 1:
        # Two credentials are ambiguous: refuse rather than pick one.
        raise InvalidToken("more than one Authorization header")
    scheme, _, token = values[0].partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise InvalidToken("Authorization is not a Bearer token")
    return token


def authenticate(request: Request) -> Claims:
    """The verified claims of the request's runtime token; InvalidToken or UnknownVM otherwise
    (the app's exception handlers turn them into 401 ``invalid_token`` / 403 ``unknown_vm``)."""
    verifier: Verifier = request.app.state.verifier
    return verifier.verify(bearer_token(request))


def host_id(request: Request) -> str | None:
    """The calling host: proven by its client certificate when it has one (``HostBinding`` has
    checked the header against it), else what ``X-Metadata-Proxy-Host`` says (informational)."""
    return client_identity(request.scope) or request.headers.get("x-metadata-proxy-host")


async def whoami(request: Request) -> Response:
    claims = authenticate(request)
    return JSONResponse(
        {
            "vm_id": claims.sub,
            "host_id": host_id(request),
            "address": request.headers.get("x-forwarded-for"),
        }
    )


def _token_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, UnknownVM):
        return error_response(403, "unknown_vm", str(exc))
    return error_response(401, "invalid_token", str(exc), headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code, message = _HTTP_ERRORS.get(exc.status_code, ("error", exc.detail))
    return error_response(exc.status_code, code, message, headers=dict(exc.headers or {}))


class HostBinding:
    """ASGI middleware: on a connection whose host proved itself with a client certificate
    (``controlplane.tls``), a request whose ``X-Metadata-Proxy-Host`` names another host is
    refused, 403 ``host_mismatch``, whatever its path. With ``require_certificate`` (the server
    was given ``--client-ca``), a request that arrives without the certificate's identity is
    refused with 500: the server did not pass the certificate on, and an unverified host must
    not pass for a verified one."""

    def __init__(self, app: ASGIApp, *, require_certificate: bool = False) -> None:
        self.app = app
        self.require_certificate = require_certificate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            host = client_identity(scope)
            refusal = None
            if host is None and self.require_certificate:
                refusal = error_response(500, "internal_error", "the server did not pass on the client certificate")
            elif host is not None:
                named = [value.decode("latin-1") for name, value in scope["headers"] if name.lower() == HOST_HEADER]
                if any(value != host for value in named):
                    refusal = error_response(
                        403, "host_mismatch", "X-Metadata-Proxy-Host does not name the host of the client certificate"
                    )
            if refusal is not None:
                return await refusal(scope, receive, send)
        await self.app(scope, receive, send)


def create_app(
    verifier: Verifier,
    *,
    vms: VmDirectory | None = None,
    routes: tuple[BaseRoute, ...] = (),
    identity: IdentityIssuer | None = None,
    require_client_certificate: bool = False,
) -> Starlette:
    """The reference runtime API, verifying tokens with ``verifier``.

    ``vms``: the ``--vms`` file (scopes and metadata), when the control plane has one.
    ``routes``: more routes of the integrator's own, served beside the runtime API.
    ``identity``: serve identity tokens and their public keys (identity.py).
    ``require_client_certificate``: every request must come with a client certificate's
    identity (the server verifies certificates; see ``HostBinding``).
    """
    # Here, not at the top: they build on this module's authenticate().
    from controlplane import metadata
    from controlplane.identity import identity_routes

    app = Starlette(
        routes=[
            Route("/runtime/whoami", whoami, methods=["GET"]),
            *metadata.routes(),
            *(identity_routes() if identity is not None else ()),
            *routes,
        ],
        middleware=[Middleware(HostBinding, require_certificate=require_client_certificate)],
        exception_handlers={InvalidToken: _token_error, UnknownVM: _token_error, HTTPException: _http_error},
    )
    # A trailing-slash redirect is not an answer the proxy should pass to a guest: 404 instead.
    app.router.redirect_slashes = False
    app.state.verifier = verifier
    app.state.vms = vms
    app.state.identity = identity
    return app
