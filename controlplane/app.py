"""The reference runtime API: what a control plane answers behind the metadata proxy.

Every ``/runtime/`` route first verifies ``Authorization: Bearer <token>`` (exactly one such
header) with the app's ``Verifier``::

    GET  /runtime/whoami         {"vm_id": <sub>, "host_id": <X-Metadata-Proxy-Host>, "address": <X-Forwarded-For>}
    ANY  /runtime/echo[/...]     the request as received, for the proxy's byte-exact forwarding tests:
                                 method, raw_path, query_string, headers ([name, value] pairs, the
                                 Authorization value shown as "<scheme> <fingerprint>"),
                                 authorization_count, token_fingerprint, vm_id, body_length, body_sha256
    ANY  /runtime/status/{code}  answers with that status (200..599) and {"status": code}
    ANY  /runtime/slow?seconds=N sleeps N seconds (at most 30), then answers {"slept": N}
    GET  /runtime/cached?max_age=N&directive=D&delay=S
                                 for the proxy's cache tests: after S seconds (default 0, at most
                                 30) answers {"vm_id", "token_fingerprint", "served": <answers of
                                 this route so far>} with ``Cache-Control: max-age=N, D, ...``
                                 (each given part; none given: no Cache-Control)
    GET  /_test/requests         {"count": n}: requests to /runtime/ paths received so far,
                                 counted before any check, to prove that
                                 nothing reached the control plane; also ``app.state.requests_seen``;
                                 ``?path=P``: only the requests for path P (the proxy's readiness
                                 probe also calls the control plane)

Errors use the proxy's envelope ``{"error": {"code": ..., "message": ...}}``: 401
``invalid_token`` (missing, non-Bearer, malformed, wrongly signed, expired, future-dated),
403 ``unknown_vm``, 400 ``bad_request``, 404 ``not_found``, 405 ``method_not_allowed``.
Nothing here logs; the token only ever appears as its fingerprint.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Awaitable, Callable

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, request_response
from starlette.types import ASGIApp, Receive, Scope, Send

from controlplane.tokens import Claims, InvalidToken, UnknownVM, Verifier, fingerprint

MAX_SLOW_SECONDS = 30.0
_COUNTER_PATH = "/_test/requests"
_HTTP_ERRORS = {
    400: ("bad_request", "the request is not valid"),
    404: ("not_found", "no such endpoint in the runtime API"),
    405: ("method_not_allowed", "the method is not allowed on this endpoint"),
}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _bearer_token(request: Request) -> str:
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


def _authenticate(request: Request) -> Claims:
    verifier: Verifier = request.app.state.verifier
    return verifier.verify(_bearer_token(request))


async def whoami(request: Request) -> Response:
    claims = _authenticate(request)
    return JSONResponse(
        {
            "vm_id": claims.sub,
            "host_id": request.headers.get("x-metadata-proxy-host"),
            "address": request.headers.get("x-forwarded-for"),
        }
    )


def _shown(name: bytes, value: bytes) -> list[str]:
    if name.lower() != b"authorization":
        return [name.decode("latin-1"), value.decode("latin-1")]
    scheme, _, token = value.decode("latin-1").partition(" ")
    return [name.decode("latin-1"), f"{scheme} {fingerprint(token.strip())}"]


async def echo(request: Request) -> Response:
    claims = _authenticate(request)
    body = await request.body()
    raw_path: bytes = request.scope.get("raw_path") or request.scope["path"].encode()
    return JSONResponse(
        {
            "method": request.method,
            "raw_path": raw_path.decode("latin-1"),
            "query_string": request.scope["query_string"].decode("latin-1"),
            "headers": [_shown(name, value) for name, value in request.headers.raw],
            "authorization_count": len(request.headers.getlist("authorization")),
            "token_fingerprint": fingerprint(_bearer_token(request)),
            "vm_id": claims.sub,
            "body_length": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
        }
    )


async def status(request: Request) -> Response:
    _authenticate(request)
    code: int = request.path_params["code"]
    if not 200 <= code <= 599:
        return error_response(404, "not_found", "status must be between 200 and 599")
    if code in (204, 205, 304):  # statuses that must not carry a body
        return Response(status_code=code)
    return JSONResponse({"status": code}, status_code=code)


def _seconds(request: Request, name: str, default: str) -> float | None:
    """A non-negative number of seconds from the query, capped at MAX_SLOW_SECONDS; None if bad."""
    try:
        seconds = float(request.query_params.get(name, default))
    except ValueError:
        return None
    if not math.isfinite(seconds) or seconds < 0:
        return None
    return min(seconds, MAX_SLOW_SECONDS)


async def slow(request: Request) -> Response:
    _authenticate(request)
    seconds = _seconds(request, "seconds", "1")
    if seconds is None:
        return error_response(400, "bad_request", "seconds must be a non-negative number")
    await anyio.sleep(seconds)
    return JSONResponse({"slept": seconds})


async def cached(request: Request) -> Response:
    claims = _authenticate(request)
    parts = [f"max-age={value}" for value in request.query_params.getlist("max_age")]
    parts += request.query_params.getlist("directive")
    delay = _seconds(request, "delay", "0")
    if delay is None:
        return error_response(400, "bad_request", "delay must be a non-negative number")
    await anyio.sleep(delay)
    request.app.state.cached_served += 1
    body = {
        "vm_id": claims.sub,
        "token_fingerprint": fingerprint(_bearer_token(request)),
        "served": request.app.state.cached_served,
    }
    return JSONResponse(body, headers={"Cache-Control": ", ".join(parts)} if parts else None)


async def requests_seen(request: Request) -> Response:
    path = request.query_params.get("path")
    state = request.app.state
    return JSONResponse({"count": state.requests_seen if path is None else state.requests_by_path[path]})


class _AnyMethod:
    """Wraps a request handler so its route accepts every method, extension methods included.

    Starlette routes a class instance as a raw ASGI app and so applies no method filter.
    """

    def __init__(self, endpoint: Callable[[Request], Awaitable[Response]]) -> None:
        self._app = request_response(endpoint)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)


class _CountRequests:
    """Counts every HTTP request before routing or any check (reads of the counter excluded)."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Only the runtime API counts: the proxy's readiness probe (HEAD /) is not a guest call.
        if scope["type"] == "http" and scope["path"].startswith("/runtime/"):
            scope["app"].state.requests_seen += 1
            scope["app"].state.requests_by_path[scope["path"]] += 1
        await self._app(scope, receive, send)


def _token_error(request: Request, exc: Exception) -> Response:
    if isinstance(exc, UnknownVM):
        return error_response(403, "unknown_vm", str(exc))
    return error_response(401, "invalid_token", str(exc), headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})


def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code, message = _HTTP_ERRORS.get(exc.status_code, ("error", exc.detail))
    return error_response(exc.status_code, code, message, headers=dict(exc.headers or {}))


def create_app(verifier: Verifier) -> Starlette:
    """The reference runtime API, verifying tokens with ``verifier``."""
    app = Starlette(
        routes=[
            Route("/runtime/whoami", whoami, methods=["GET"]),
            Route("/runtime/echo", _AnyMethod(echo)),
            Route("/runtime/echo/{rest:path}", _AnyMethod(echo)),
            Route("/runtime/status/{code:int}", _AnyMethod(status)),
            Route("/runtime/slow", _AnyMethod(slow)),
            Route("/runtime/cached", cached, methods=["GET"]),
            Route(_COUNTER_PATH, requests_seen, methods=["GET"]),
        ],
        middleware=[Middleware(_CountRequests)],
        exception_handlers={InvalidToken: _token_error, UnknownVM: _token_error, HTTPException: _http_error},
    )
    # A trailing-slash redirect is not an answer the proxy should pass to a guest: 404 instead.
    app.router.redirect_slashes = False
    app.state.verifier = verifier
    app.state.requests_seen = 0
    app.state.requests_by_path = Counter[str]()
    app.state.cached_served = 0
    return app
