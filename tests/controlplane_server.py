"""The reference control plane as the tests run it: the real runtime API plus test-only endpoints.

    python -m tests.controlplane_server serve --listen HOST:PORT --secret-file FILE ...

Any `controlplane serve` option works. The real app comes from ``controlplane.cli.build_app``
with these routes beside it (what an integrator would do with routes of its own), and a
counter wraps it::

    ANY  /runtime/echo[/...]     the request as received, for the proxy's byte-exact forwarding tests:
                                 method, raw_path, query_string, headers ([name, value] pairs, the
                                 Authorization value shown as "<scheme> <fingerprint>"),
                                 authorization_count, token_fingerprint, vm_id, body_length, body_sha256
    ANY  /runtime/status/{code}  answers with that status (200..599) and {"status": code}
    ANY  /runtime/slow[/...]?seconds=N  sleeps N seconds (at most 30), then answers {"slept": N}
    GET  /runtime/cached?max_age=N&directive=D&delay=S&status=C
                                 for the proxy's cache tests: after S seconds (default 0, at most
                                 30) answers {"vm_id", "token_fingerprint", "served": <answers of
                                 this route so far>} with ``Cache-Control: max-age=N, D, ...``
                                 (each given part; none given: no Cache-Control), status C (default 200)
    GET  /_test/cached_status?status=C
                                 from now on /runtime/cached answers status C whatever its query
                                 says (0: as the query says), for the proxy's stale-if-error tests
    GET  /_test/requests         {"count": n}: requests to /runtime/ paths received so far,
                                 counted before any check, to prove that nothing reached the
                                 control plane; ``?path=P``: only the requests for path P

None of this is in the ``controlplane`` package: a control plane must never mount it.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import sys
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route, request_response
from starlette.types import ASGIApp, Receive, Scope, Send

from controlplane import cli
from controlplane.app import authenticate, bearer_token, error_response
from controlplane.tokens import fingerprint

MAX_SLOW_SECONDS = 30.0
COUNTER_PATH = "/_test/requests"
CACHED_STATUS_PATH = "/_test/cached_status"
# Set through CACHED_STATUS_PATH: the status every /runtime/cached answer takes (0: its query's).
_forced_status = [0]


def _shown(name: bytes, value: bytes) -> list[str]:
    if name.lower() != b"authorization":
        return [name.decode("latin-1"), value.decode("latin-1")]
    scheme, _, token = value.decode("latin-1").partition(" ")
    return [name.decode("latin-1"), f"{scheme} {fingerprint(token.strip())}"]


async def echo(request: Request) -> Response:
    claims = authenticate(request)
    body = await request.body()
    raw_path: bytes = request.scope.get("raw_path") or request.scope["path"].encode()
    return JSONResponse(
        {
            "method": request.method,
            "raw_path": raw_path.decode("latin-1"),
            "query_string": request.scope["query_string"].decode("latin-1"),
            "headers": [_shown(name, value) for name, value in request.headers.raw],
            "authorization_count": len(request.headers.getlist("authorization")),
            "token_fingerprint": fingerprint(bearer_token(request)),
            "vm_id": claims.sub,
            "body_length": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
        }
    )


async def status(request: Request) -> Response:
    authenticate(request)
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
    authenticate(request)
    seconds = _seconds(request, "seconds", "1")
    if seconds is None:
        return error_response(400, "bad_request", "seconds must be a non-negative number")
    await anyio.sleep(seconds)
    return JSONResponse({"slept": seconds})


def cached_endpoint() -> Callable[[Request], Awaitable[Response]]:
    """GET /runtime/cached: an answer whose caching headers and status the query chooses."""
    served = itertools.count(1)

    async def cached(request: Request) -> Response:
        claims = authenticate(request)
        parts = [f"max-age={value}" for value in request.query_params.getlist("max_age")]
        parts += request.query_params.getlist("directive")
        delay = _seconds(request, "delay", "0")
        code = request.query_params.get("status", "200")
        if delay is None or not code.isdigit() or not 200 <= int(code) <= 599:
            return error_response(400, "bad_request", "delay must be a non-negative number, status 200..599")
        await anyio.sleep(delay)
        body = {"vm_id": claims.sub, "token_fingerprint": fingerprint(bearer_token(request)), "served": next(served)}
        if _forced_status[0]:
            code = str(_forced_status[0])
        return JSONResponse(body, status_code=int(code), headers={"Cache-Control": ", ".join(parts)} if parts else None)

    return cached


class _AnyMethod:
    """Wraps a request handler so its route accepts every method, extension methods included.

    Starlette routes a class instance as a raw ASGI app and so applies no method filter.
    """

    def __init__(self, endpoint: Callable[[Request], Awaitable[Response]]) -> None:
        self._app = request_response(endpoint)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)


def extra_routes() -> tuple[BaseRoute, ...]:
    return (
        Route("/runtime/echo", _AnyMethod(echo)),
        Route("/runtime/echo/{rest:path}", _AnyMethod(echo)),
        Route("/runtime/status/{code:int}", _AnyMethod(status)),
        Route("/runtime/slow", _AnyMethod(slow)),
        Route("/runtime/slow/{rest:path}", _AnyMethod(slow)),
        Route("/runtime/cached", cached_endpoint(), methods=["GET"]),
    )


class CountRequests:
    """Counts every request to a /runtime/ path before routing or any check, and answers
    GET /_test/requests with the count (the proxy's readiness probe is not a guest call)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.seen = 0
        self.by_path = Counter[str]()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == COUNTER_PATH:
            path = Request(scope).query_params.get("path")
            count = self.seen if path is None else self.by_path[path]
            return await JSONResponse({"count": count})(scope, receive, send)
        if scope["type"] == "http" and scope["path"] == CACHED_STATUS_PATH:
            _forced_status[0] = int(Request(scope).query_params.get("status", "0"))
            return await JSONResponse({"status": _forced_status[0]})(scope, receive, send)
        if scope["type"] == "http" and scope["path"].startswith("/runtime/"):
            self.seen += 1
            self.by_path[scope["path"]] += 1
        await self.app(scope, receive, send)


def counted(app: ASGIApp) -> CountRequests:
    """`app` (built with extra_routes() beside the runtime API) behind the request counter."""
    return CountRequests(app)


def main(argv: Sequence[str]) -> int:
    args = cli.parser().parse_args(argv)
    return cli.serve(args, counted(cli.build_app(args, routes=extra_routes())))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
