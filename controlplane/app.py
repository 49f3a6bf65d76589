"""The reference runtime API: what a control plane answers behind the metadata proxy.

Every ``/runtime/`` route first verifies ``Authorization: Bearer <token>`` (exactly one such
header) with the app's ``Verifier``::

    GET  /runtime/whoami         {"vm_id": <sub>, "host_id": <X-Metadata-Proxy-Host>, "address": <X-Forwarded-For>}
    GET  /runtime/metadata       the VM's metadata (--vms), long-polled with wait_for_change (controlplane.metadata)

Errors use the proxy's envelope ``{"error": {"code": ..., "message": ...}}``: 401
``invalid_token`` (missing, non-Bearer, malformed, wrongly signed, expired, future-dated),
403 ``unknown_vm``, 400 ``bad_request``, 404 ``not_found``, 405 ``method_not_allowed``.
Nothing here logs; the token only ever appears as its fingerprint.

An integrator mounts ``create_app(...)`` as it is, or builds its own app with
``authenticate`` and ``error_response``. Endpoints that exist only for tests live in
``tests/``, never here.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from controlplane.tokens import Claims, InvalidToken, UnknownVM, Verifier
from controlplane.vms import VmDirectory

__all__ = ["authenticate", "bearer_token", "create_app", "error_response"]

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


async def whoami(request: Request) -> Response:
    claims = authenticate(request)
    return JSONResponse(
        {
            "vm_id": claims.sub,
            "host_id": request.headers.get("x-metadata-proxy-host"),
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


def create_app(verifier: Verifier, *, vms: VmDirectory | None = None, routes: tuple[BaseRoute, ...] = ()) -> Starlette:
    """The reference runtime API, verifying tokens with ``verifier``.

    ``vms``: the ``--vms`` file (scopes and metadata), when the control plane has one.
    ``routes``: more routes of the integrator's own, served beside the runtime API.
    """
    from controlplane import metadata  # here, not at the top: it imports authenticate() from this module

    app = Starlette(
        routes=[Route("/runtime/whoami", whoami, methods=["GET"]), *metadata.routes(), *routes],
        exception_handlers={InvalidToken: _token_error, UnknownVM: _token_error, HTTPException: _http_error},
    )
    # A trailing-slash redirect is not an answer the proxy should pass to a guest: 404 instead.
    app.router.redirect_slashes = False
    app.state.verifier = verifier
    app.state.vms = vms
    return app
