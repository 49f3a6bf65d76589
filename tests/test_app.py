"""The guest-facing ASGI app in process, playing VMs through `httpx.ASGITransport(client=(ip, port))`
(or a hand-built ASGI scope where httpx would normalise the path), against a real
`controlplane serve` process. Every refusal: status, code, nothing reached the control plane.
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest

from controlplane import tokens
from metadata_proxy import app as app_module
from metadata_proxy import forward
from metadata_proxy.app import ProxyApp
from metadata_proxy.config import Config, Limits, ListenAddress, parse_config
from metadata_proxy.forward import build_client
from metadata_proxy.limits import Limiter
from metadata_proxy.logs import AccessLog
from metadata_proxy.owners import OWNER_KEY
from metadata_proxy.registry import Registry
from metadata_proxy.sessions import SessionTokens
from tests.harness import ControlPlane, run

pytestmark = pytest.mark.anyio

META = {"Metadata": "true"}
A, B, C = "10.1.0.2", "10.1.0.3", "fd00:1::4"  # VMs a, b and c (IPv6)
STRANGER = "10.1.0.200"
MAX_BODY = 32 * 1024


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def sync(cp: ControlPlane, registry: Path, vms: dict[str, str]) -> None:
    """Make `registry` hold exactly `vms` (name -> address), each VM's id "vm-<name>"."""
    secret = cp.secret_file.read_bytes().strip()
    lines = [
        json.dumps({"name": name, "address": address, "token": tokens.mint(f"vm-{name}", (None, secret))})
        for name, address in vms.items()
    ]
    run("hostagent", "--registry", str(registry), "vm", "sync", "-", input="\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, cp: ControlPlane) -> Path:
    path = tmp_path_factory.mktemp("registry-app") / "registry.sqlite3"
    sync(cp, path, {"a": A, "b": B, "c": C})
    return path


def seen(cp: ControlPlane) -> int:
    """The control plane's request counter, over a plain socket (cheap enough to call around every request)."""
    with socket.create_connection(("127.0.0.1", cp.port), timeout=5) as sock, sock.makefile("rb") as reader:
        sock.sendall(b"GET /_test/requests HTTP/1.1\r\nHost: cp\r\nConnection: close\r\n\r\n")
        head = reader.read().partition(b"\r\n\r\n")
        count: int = json.loads(head[2])["count"]
        return count


def make_config(cp: ControlPlane, registry: Path, **limits: float) -> Config:
    return parse_config(
        {
            "host_id": "host-app",
            "listen": ["169.254.169.254:80", "[fd00:a9fe::254]:80"],
            "host_aliases": ["metadata.internal"],
            "registry": str(registry),
            "control_plane": {"url": cp.url, "timeout": 3, "retry_budget": 0.5},
            "limits": {"max_body_bytes": MAX_BODY, **limits},
            "routes": [
                {"prefix": "/runtime/"},
                {"prefix": "/runtime/echo/session/", "guard": "session"},
                {"prefix": "/runtime/echo/open/", "guard": "none"},
            ],
        }
    )


@asynccontextmanager
async def proxy_app(
    cp: ControlPlane, registry: Path, sessions: SessionTokens | None = None, **limits: float
) -> AsyncIterator[ProxyApp]:
    config = make_config(cp, registry, **limits)
    client = build_client(config.control_plane)
    app = ProxyApp(
        config,
        registry=Registry(config.registry),
        client=client,
        sessions=sessions,
        access_log=AccessLog(io.StringIO()),
        extra_listen=[ListenAddress("10.9.9.9", 8080)],  # as if systemd passed such a socket
    )
    try:
        yield app
    finally:
        await client.aclose()


@pytest.fixture
async def app(cp: ControlPlane, registry: Path) -> AsyncIterator[ProxyApp]:
    async with proxy_app(cp, registry) as made:
        yield made


def as_guest(app: ProxyApp, address: str) -> Callable[[Any, Any, Any], Awaitable[None]]:
    """The app as GuestProtocol serves it to one connection from `address`: every request
    carries the connection's owner, and its bytes are guest input (owners.input_arrived)."""
    owner = app.owners.accept(address)

    async def served(scope: Any, receive: Any, send: Any) -> None:
        app.owners.input_arrived()
        scope[OWNER_KEY] = owner
        await app(scope, receive, send)

    return served


def guest(app: ProxyApp, address: str) -> httpx.AsyncClient:
    """A VM at `address` calling the app, Host 169.254.169.254 unless a request says otherwise."""
    transport = httpx.ASGITransport(app=as_guest(app, address), client=(address, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://169.254.169.254")


def code(response: httpx.Response) -> str | None:
    if response.headers.get("content-type") != "application/json":
        return None
    error = response.json().get("error")
    return error["code"] if isinstance(error, dict) else None


async def refused(
    cp: ControlPlane,
    call: Callable[[], Awaitable[httpx.Response]],
    status: int,
    error: str,
) -> httpx.Response:
    """`call` answers status/error and the control plane received nothing meanwhile (no probe runs here)."""
    before = seen(cp)
    response = await call()
    assert (response.status_code, code(response)) == (status, error), response.text
    assert response.headers["x-request-id"]
    assert "eyJ" not in response.text  # no runtime token (a JWT) in any error body
    assert seen(cp) == before
    return response


# -- a hand-built ASGI call, for paths httpx would normalise --------------------------------


class Exchange:
    def __init__(self) -> None:
        self.messages: list[dict[str, Any]] = []
        self.times: list[float] = []
        self.receives = 0

    @property
    def status(self) -> int:
        status: int = self.messages[0]["status"]
        return status

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.messages[0]["headers"])

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages[1:])

    @property
    def code(self) -> str:
        error: str = json.loads(self.body)["error"]["code"]
        return error


async def asgi(
    app: ProxyApp,
    peer: str,
    method: str,
    raw_path: bytes,
    headers: list[tuple[bytes, bytes]],
    receive: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    host: bytes | None = b"169.254.169.254",
) -> Exchange:
    """Call the app with exactly this request: `host` None adds no Host header."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": unquote(raw_path.decode("latin-1")),
        "raw_path": raw_path,
        "query_string": b"",
        "headers": ([(b"host", host)] if host else []) + headers,
        "client": (peer, 40000),
        "server": ("169.254.169.254", 80),
        "root_path": "",
    }
    exchange = Exchange()

    async def no_body() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def counting_receive() -> dict[str, Any]:
        exchange.receives += 1
        return await (receive or no_body)()

    async def send(message: MutableMapping[str, Any]) -> None:
        exchange.messages.append(dict(message))
        exchange.times.append(time.monotonic())

    await as_guest(app, peer)(scope, counting_receive, send)
    return exchange


# -- the order of the checks ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "path", "headers", "status", "error"),
    [
        # Each row satisfies every check before the one it fails, and fails all that follow.
        (STRANGER, "/runtime/%2e%2e/x", {"Host": "evil", "X-Forwarded-For": A}, 403, "unknown_vm"),
        (A, "/runtime/%2e%2e/x", {"Host": "evil", "X-Forwarded-For": A}, 403, "bad_host"),
        (A, "/runtime/%2e%2e/x", {"X-Forwarded-For": A, "X-Big": "a" * 33000}, 400, "forwarded_request"),
        (A, "/runtime/%2e%2e/x", {"X-Big": "a" * 33000}, 431, "headers_too_large"),
        (A, "/runtime/%2e%2e/x", {}, 400, "bad_path"),
        (A, "/nowhere", {}, 404, "not_found"),
        (A, "/runtime/whoami", {}, 400, "missing_metadata_header"),
        (A, "/runtime/echo/session/x", META, 401, "invalid_session_token"),
        (C, "/runtime/%2e%2e/x", {"Host": "[fd00:a9fe::254]", "Forwarded": "for=x"}, 400, "forwarded_request"),
    ],
)
async def test_checks_run_in_spec_order(
    app: ProxyApp, cp: ControlPlane, peer: str, path: str, headers: dict[str, str], status: int, error: str
) -> None:
    async with guest(app, peer) as vm:
        await refused(cp, lambda: vm.get(path, headers=headers), status, error)
        if peer != STRANGER:
            assert (await vm.get("/runtime/whoami", headers=META)).status_code == 200  # served after


async def test_rate_limit_comes_after_the_guard(cp: ControlPlane, registry: Path) -> None:
    async with proxy_app(cp, registry, burst=1, requests_per_second=0.5) as app, guest(app, A) as vm:
        assert (await vm.get("/metadata/v1/instance", headers=META)).status_code == 200
        await refused(cp, lambda: vm.get("/runtime/whoami"), 400, "missing_metadata_header")
        await refused(cp, lambda: vm.get("/runtime/%2e%2e/"), 400, "bad_path")
        response = await refused(cp, lambda: vm.get("/runtime/whoami", headers=META), 429, "rate_limited")
        assert response.headers["retry-after"] == "2"  # one token at 0.5 per second
        # The body limit comes after the rate limit.
        await refused(
            cp, lambda: vm.post("/runtime/echo", content=b"x" * (MAX_BODY + 1), headers=META), 429, "rate_limited"
        )


# -- Host and forwarded headers -------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "169.254.169.254",
        "169.254.169.254:80",
        "[fd00:a9fe::254]",
        "[fd00:a9fe::254]:80",
        "[FD00:A9FE:0:0::254]:80",
        "metadata.internal",
        "Metadata.Internal:80",
        "10.9.9.9:8080",  # a socket systemd passed
    ],
)
async def test_host_accepted(app: ProxyApp, host: str) -> None:
    async with guest(app, A) as vm:
        response = await vm.get("/runtime/whoami", headers={**META, "Host": host})
    assert response.status_code == 200, response.text
    assert response.json()["vm_id"] == "vm-a"


@pytest.mark.parametrize(
    "host",
    [
        "",
        "evil.example",
        "169.254.169.254:8080",
        "169.254.169.254.",
        "169.254.169.254.evil.example",
        "evil.example:80",
        "fd00:a9fe::254",
        "[fd00:a9fe::254]:8080",
        "[fd00:a9fe::254%eth0]",
        "[::ffff:169.254.169.254]",
        "0xa9fea9fe",
        "2852039166",
        "169.254.43518",
        "metadata.internal:8081",
        "metadata.internal.evil",
        "10.9.9.9:80",  # a passed socket's address with another listen port
        "localhost",
    ],
)
async def test_host_refused(app: ProxyApp, cp: ControlPlane, host: str) -> None:
    async with guest(app, A) as vm:
        await refused(cp, lambda: vm.get("/runtime/whoami", headers={**META, "Host": host}), 403, "bad_host")


@pytest.mark.parametrize(
    "hosts", [[], [b"169.254.169.254", b"evil.example"], [b"169.254.169.254", b"169.254.169.254"]], ids=repr
)
async def test_missing_or_repeated_host_is_refused(app: ProxyApp, cp: ControlPlane, hosts: list[bytes]) -> None:
    before = seen(cp)
    headers = [(b"host", value) for value in hosts] + [(b"metadata", b"true")]
    exchange = await asgi(app, A, "GET", b"/runtime/whoami", headers, host=None)
    assert (exchange.status, exchange.code) == (403, "bad_host")
    assert seen(cp) == before


@pytest.mark.parametrize("name", ["X-Forwarded-For", "x-forwarded-for", "X-FORWARDED-FOR", "Forwarded", "X-Real-IP"])
@pytest.mark.parametrize("value", ["10.1.0.3", "", "for=10.1.0.3", "unknown"])
async def test_forwarded_headers_refused(app: ProxyApp, cp: ControlPlane, name: str, value: str) -> None:
    async with guest(app, A) as vm:
        await refused(cp, lambda: vm.get("/runtime/whoami", headers={**META, name: value}), 400, "forwarded_request")
        put = vm.put("/metadata/v1/token", headers={**META, name: value, "X-Metadata-Token-TTL-Seconds": "60"})
        response = await refused(cp, lambda: put, 400, "forwarded_request")
        assert "x-metadata-token-ttl-seconds" not in response.headers  # no token handed out


async def test_identity_headers_come_from_the_proxy(app: ProxyApp) -> None:
    async with guest(app, B) as vm:
        response = await vm.get(
            "/runtime/echo",
            headers={**META, "X-Metadata-Proxy-Host": "evil", "X-Request-Id": "forged", "Authorization": "Bearer x"},
        )
    assert response.status_code == 200, response.text
    sent = [(name.lower(), value) for name, value in response.json()["headers"]]
    assert [value for name, value in sent if name == "x-metadata-proxy-host"] == ["host-app"]
    assert [value for name, value in sent if name == "x-request-id"] == [response.headers["x-request-id"]]
    assert [value for name, value in sent if name == "x-forwarded-for"] == [B]
    assert response.json()["authorization_count"] == 1 and response.json()["vm_id"] == "vm-b"


async def test_hop_by_hop_headers_stay_on_the_guests_hop(app: ProxyApp) -> None:
    """RFC 9110 7.6.1: each hop-by-hop field, and what the guest's Connection names, is for the
    guest's connection only (`TE: gzip` upstream would ask for a coding the proxy cannot read)."""
    hop = {"TE": "trailers, gzip", "Keep-Alive": "timeout=5", "Proxy-Connection": "keep-alive", "Trailer": "X-After"}
    async with guest(app, A) as vm:
        response = await vm.get("/runtime/echo", headers={**META, **hop, "Connection": "X-Hop", "X-Hop": "1"})
    assert response.status_code == 200, response.text
    names = {name.lower() for name, _ in response.json()["headers"]}
    assert not names & {"te", "keep-alive", "proxy-connection", "trailer", "connection", "x-hop"}, names


async def test_expect_and_the_session_headers_stay_with_the_proxy(app: ProxyApp) -> None:
    """`Expect: 100-continue` was the guest's to ask of the proxy, which has read the body before
    it calls (an interim 100 from the control plane would serve nobody); the session TTL header
    is for the proxy's own token endpoint."""
    headers = {**META, "Expect": "100-continue", "X-Metadata-Token-TTL-Seconds": "60"}
    async with guest(app, A) as vm:
        response = await vm.post("/runtime/echo", content=b"body", headers=headers)
    assert response.status_code == 200, response.text
    assert response.json()["body_length"] == 4
    names = {name.lower() for name, _ in response.json()["headers"]}
    assert not {"expect", "x-metadata-token-ttl-seconds"} & names, names


async def test_proxy_prefixed_headers_never_reach_the_control_plane(app: ProxyApp) -> None:
    """`Proxy-*` is a proxy's to set: Proxy-Client-IP (WebLogic, and Java stacks reading it as
    the client's address), Proxy-Authorization and any other a framework may trust."""
    forged = {"Proxy-Client-IP": "10.1.0.3", "Proxy-Token": "x"}
    async with guest(app, A) as vm:
        response = await vm.get("/runtime/echo", headers={**META, **forged, "Proxy-Authorization": "Basic eA=="})
    assert response.status_code == 200, response.text
    names = {name.lower() for name, _ in response.json()["headers"]}
    assert not {"proxy-client-ip", "proxy-token", "proxy-authorization"} & names, names


# -- paths ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw_path",
    [
        b"/runtime/../metadata/v1/instance",
        b"/runtime/./whoami",
        b"/runtime/%2e%2e/x",
        b"/runtime/%252e%252e/x",
        b"/runtime/a%2Fb",
        b"/runtime/a%5cb",
        b"/runtime/a\\b",
        b"/runtime/..;/x",
        b"/runtime/%ef%bc%8e%ef%bc%8e/x",
        b"/runtime/%e2%80%a5/x",  # two-dot leader
        b"/runtime/%00",
        b"/runtime/\x00",
        b"/runtime/%0a",
        b"/runtime/%c2%85",
        b"/runtime/%c0%ae",
        b"/runtime/%ff",
        b"/runtime/\xff",
        b"runtime/whoami",
        b"",
    ],
)
async def test_bad_paths(app: ProxyApp, cp: ControlPlane, raw_path: bytes) -> None:
    before = seen(cp)
    exchange = await asgi(app, A, "GET", raw_path, [(b"metadata", b"true")])
    assert (exchange.status, exchange.code) == (400, "bad_path")
    assert seen(cp) == before


@pytest.mark.parametrize(
    ("raw_path", "forwarded"),
    [
        (b"/runtime/echo/a%20b", b"/runtime/echo/a%20b"),
        (b"/runtime/echo/caf%C3%A9", b"/runtime/echo/caf%C3%A9"),
        (b"/runtime/echo/x;v=1", b"/runtime/echo/x;v=1"),
        (b"/runtime/echo/...", b"/runtime/echo/..."),
        (b"/runtime/echo/%25", b"/runtime/echo/%25"),
        (b"/runtime/echo//x", b"/runtime/echo//x"),
    ],
)
async def test_odd_but_clean_paths_pass_byte_exact(app: ProxyApp, raw_path: bytes, forwarded: bytes) -> None:
    exchange = await asgi(app, A, "GET", raw_path, [(b"metadata", b"true")])
    assert exchange.status == 200, exchange.body
    assert json.loads(exchange.body)["raw_path"] == forwarded.decode()


async def test_methods(app: ProxyApp, cp: ControlPlane) -> None:
    async with guest(app, A) as vm:
        response = await refused(
            cp, lambda: vm.request("TRACE", "/runtime/echo", headers=META), 405, "method_not_allowed"
        )
        assert "TRACE" not in response.headers["allow"]
        response = await refused(cp, lambda: vm.post("/metadata/v1/instance", headers=META), 405, "method_not_allowed")
        assert response.headers["allow"] == "GET"
        for method in ("PATCH", "DELETE", "OPTIONS"):
            echo = await vm.request(method, "/runtime/echo", headers=META)
            assert echo.status_code == 200 and echo.json()["method"] == method
        # Only the methods `Allow` names are forwarded (issue 11's method policy).
        for method in ("PROPFIND", "PURGE", "M-SEARCH", "MKCOL", "TRACK", "LOCK", "SEARCH"):
            response = await refused(
                cp, functools.partial(vm.request, method, "/runtime/echo", headers=META), 405, "method_not_allowed"
            )
            assert response.headers["allow"] == "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"


async def test_a_request_without_a_connection_owner_fails_closed(app: ProxyApp, cp: ControlPlane) -> None:
    """Served other than through GuestProtocol (its seam with uvicorn broken): nothing is
    forwarded, whoever the peer is, and the connection is closed."""
    transport = httpx.ASGITransport(app=app, client=(A, 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://169.254.169.254") as bare:
        for path in ("/runtime/whoami", "/metadata/v1/instance", "/runtime/echo/open/x"):
            response = await refused(cp, functools.partial(bare.get, path, headers=META), 500, "internal_error")
            assert response.headers["connection"] == "close"


# -- session tokens -------------------------------------------------------------------------


async def put_token(vm: httpx.AsyncClient, *ttl: str) -> httpx.Response:
    headers = [("Metadata", "true"), *[("X-Metadata-Token-TTL-Seconds", value) for value in ttl]]
    return await vm.put("/metadata/v1/token", headers=headers)


@pytest.mark.parametrize(
    "ttl", [("0",), ("21601",), ("-5",), ("x",), ("60s",), (" ",), ("99999999999",), (), ("1", "1")]
)
async def test_ttl_refused(app: ProxyApp, cp: ControlPlane, ttl: tuple[str, ...]) -> None:
    async with guest(app, A) as vm:
        response = await refused(cp, lambda: put_token(vm, *ttl), 400, "invalid_ttl")
        assert "x-metadata-token-ttl-seconds" not in response.headers


async def test_session_token_lifetime_and_binding(cp: ControlPlane, registry: Path) -> None:
    now = [1_000.9]
    sessions = SessionTokens(clock=lambda: now[0])
    async with proxy_app(cp, registry, sessions=sessions) as app, guest(app, A) as a, guest(app, B) as b:
        response = await put_token(a, "1")
        assert response.status_code == 200 and response.headers["x-metadata-token-ttl-seconds"] == "1"
        assert response.headers["content-type"].startswith("text/plain")
        token = response.text
        use = {"X-Metadata-Token": token}
        now[0] += 0.99  # a TTL of 1 is one second, whatever the fraction of a second at issue
        assert (await a.get("/runtime/echo/session/x", headers=use)).status_code == 200
        await refused(cp, lambda: b.get("/runtime/echo/session/x", headers=use), 401, "invalid_session_token")
        now[0] += 0.01
        await refused(cp, lambda: a.get("/runtime/echo/session/x", headers=use), 401, "invalid_session_token")

        issued = now[0]
        long = (await put_token(a, "21600")).text
        now[0] = issued + 21599.99
        assert (await a.get("/runtime/echo/session/x", headers={"X-Metadata-Token": long})).status_code == 200
        now[0] = issued + 21600
        await refused(
            cp,
            lambda: a.get("/runtime/echo/session/x", headers={"X-Metadata-Token": long}),
            401,
            "invalid_session_token",
        )

    # A restart draws a new key: earlier tokens are void.
    async with proxy_app(cp, registry) as app, guest(app, A) as a:
        fresh = (await put_token(a, "60")).text
        assert (await a.get("/runtime/echo/session/x", headers={"X-Metadata-Token": fresh})).status_code == 200
    async with proxy_app(cp, registry) as app, guest(app, A) as a:
        await refused(
            cp,
            lambda: a.get("/runtime/echo/session/x", headers={"X-Metadata-Token": fresh}),
            401,
            "invalid_session_token",
        )


async def test_session_token_does_not_pass_to_the_next_holder_of_an_address(cp: ControlPlane, tmp_path: Path) -> None:
    registry = tmp_path / "registry.sqlite3"
    sync(cp, registry, {"old": A})
    async with proxy_app(cp, registry) as app, guest(app, A) as vm:
        token = (await put_token(vm, "600")).text
        assert (await vm.get("/runtime/echo/session/x", headers={"X-Metadata-Token": token})).status_code == 200
        sync(cp, registry, {"new": A})  # the address is handed to another VM
        # On the old holder's connection: not the new holder's to use.
        await refused(
            cp, lambda: vm.get("/runtime/echo/session/x", headers={"X-Metadata-Token": token}), 403, "unknown_vm"
        )
        async with guest(app, A) as new:  # the new holder's connection, the old holder's token
            await refused(
                cp,
                lambda: new.get("/runtime/echo/session/x", headers={"X-Metadata-Token": token}),
                401,
                "invalid_session_token",
            )


async def test_session_route_and_none_route(app: ProxyApp, cp: ControlPlane) -> None:
    async with guest(app, C) as vm:
        token = (await put_token(vm, "60")).text
        echo = await vm.get("/runtime/echo/session/x", headers={"X-Metadata-Token": token})  # no Metadata header
        assert echo.status_code == 200 and echo.json()["vm_id"] == "vm-c"
        assert "x-metadata-token" not in {name.lower() for name, _ in echo.json()["headers"]}
        headers = [("X-Metadata-Token", token), ("X-Metadata-Token", token)]
        await refused(cp, lambda: vm.get("/runtime/echo/session/x", headers=headers), 401, "invalid_session_token")
        assert (await vm.get("/runtime/echo/open/x")).json()["vm_id"] == "vm-c"
        await refused(cp, lambda: vm.get("/runtime/echo/open/x", headers={"Host": "evil"}), 403, "bad_host")


# -- limits ---------------------------------------------------------------------------------


async def test_burst_then_429_and_other_vms_unaffected(cp: ControlPlane, registry: Path) -> None:
    async with proxy_app(cp, registry, burst=5, requests_per_second=2) as app, guest(app, A) as a, guest(app, B) as b:
        statuses = [(await a.get("/metadata/v1/instance", headers=META)).status_code for _ in range(5)]
        assert statuses == [200] * 5
        response = await refused(cp, lambda: a.get("/runtime/whoami", headers=META), 429, "rate_limited")
        assert response.headers["retry-after"] == "1"
        assert (await b.get("/runtime/whoami", headers=META)).json()["vm_id"] == "vm-b"
        await asyncio.sleep(0.55)  # one token back at 2 per second
        assert (await a.get("/runtime/whoami", headers=META)).status_code == 200


async def test_max_concurrent_and_other_vms_unaffected(cp: ControlPlane, registry: Path) -> None:
    async with proxy_app(cp, registry, max_concurrent=2) as app, guest(app, A) as a, guest(app, B) as b:
        before = seen(cp)
        # Two different targets: identical GETs would share one call (forward_get).
        slow = [asyncio.create_task(a.get(f"/runtime/slow?seconds=2&n={n}", headers=META)) for n in range(2)]
        while seen(cp) < before + 2:  # both reached the control plane
            await asyncio.sleep(0.01)
        response = await refused(cp, lambda: a.get("/runtime/whoami", headers=META), 429, "rate_limited")
        assert response.headers["retry-after"] == "1"
        assert (await b.get("/runtime/whoami", headers=META)).status_code == 200
        assert not any(task.done() for task in slow)  # served while A's requests held both its slots
        assert [r.status_code for r in await asyncio.gather(*slow)] == [200, 200]
        assert (await a.get("/runtime/whoami", headers=META)).status_code == 200  # slots released


async def test_limiter_state_of_quiet_vms_is_evicted() -> None:
    now = [0.0]
    limiter = Limiter(Limits(requests_per_second=1, burst=2, max_concurrent=1), clock=lambda: now[0])
    for i in range(5000):
        assert limiter.acquire(f"vm-{i}") is None
        limiter.release(f"vm-{i}")
    assert len(limiter) == 5000
    now[0] += 301  # quiet for longer than the idle TTL
    assert limiter.acquire("vm-new") is None
    assert len(limiter) == 1
    limiter.release("vm-0")  # a release for evicted state is harmless
    assert limiter.acquire("vm-0") is None  # and it starts again with a full bucket


# -- request bodies -------------------------------------------------------------------------


async def test_body_limits(app: ProxyApp, cp: ControlPlane) -> None:
    async with guest(app, A) as vm:
        at_limit = await vm.post("/runtime/echo", content=b"x" * MAX_BODY, headers=META)
        assert at_limit.json()["body_length"] == MAX_BODY

        async def chunks(total: int) -> AsyncIterator[bytes]:
            for _ in range(total // 1024):
                yield b"y" * 1024

        streamed = await vm.put("/runtime/echo", content=chunks(MAX_BODY), headers=META)
        assert streamed.json()["body_length"] == MAX_BODY
        for call in (
            lambda: vm.post("/runtime/echo", content=b"x" * (MAX_BODY + 1), headers=META),
            lambda: vm.put("/runtime/echo", content=chunks(MAX_BODY + 1024), headers=META),
            lambda: vm.put(
                "/metadata/v1/token",
                content=b"x" * (MAX_BODY + 1),
                headers={**META, "X-Metadata-Token-TTL-Seconds": "5"},
            ),
        ):
            response = await refused(cp, call, 413, "body_too_large")
            assert response.headers["connection"] == "close"
        assert (await vm.get("/runtime/whoami", headers=META)).status_code == 200


async def test_413_is_answered_whole_and_at_once_reading_nothing_more(app: ProxyApp, cp: ControlPlane) -> None:
    """The app answers and closes; reading the rest of the body (bounded, so the guest reads
    the answer, not a reset) is the guest protocol's lingering close, over real sockets in
    test_hostile.py (test_body_too_large) and test_slow_greedy.py."""
    declared = [(b"metadata", b"true"), (b"content-length", b"%d" % (MAX_BODY * 100))]

    async def stalled() -> dict[str, Any]:  # a guest that declared a body and sends nothing
        await asyncio.sleep(3600)
        raise AssertionError("unreachable")

    before = seen(cp)
    exchange = await asyncio.wait_for(asgi(app, A, "POST", b"/runtime/echo", declared, stalled), 10)
    assert (exchange.status, exchange.code) == (413, "body_too_large")
    assert len(exchange.messages) == 2 and not exchange.messages[1].get("more_body")  # the whole answer, ended
    assert exchange.headers[b"connection"] == b"close"
    assert exchange.receives == 0  # declared too large: nothing of it read

    async def endless() -> dict[str, Any]:  # a guest that never stops sending
        return {"type": "http.request", "body": b"z" * 65536, "more_body": True}

    chunked = [(b"metadata", b"true"), (b"transfer-encoding", b"chunked")]
    exchange = await asyncio.wait_for(asgi(app, A, "POST", b"/runtime/echo", chunked, endless), 10)
    assert (exchange.status, exchange.code) == (413, "body_too_large")
    assert exchange.headers[b"connection"] == b"close"
    assert exchange.receives == MAX_BODY // 65536 + 1  # up to the limit and one past it, no more
    assert seen(cp) == before


async def test_413_with_expect_continue_reads_nothing(app: ProxyApp, cp: ControlPlane) -> None:
    headers = [(b"metadata", b"true"), (b"content-length", b"%d" % (MAX_BODY + 1)), (b"expect", b"100-continue")]
    before = seen(cp)
    exchange = await asgi(app, A, "POST", b"/runtime/echo", headers)
    assert (exchange.status, exchange.code) == (413, "body_too_large")
    assert exchange.receives == 0  # reading would make the server send 100 Continue
    assert seen(cp) == before


async def test_stalled_body_is_cut_off(cp: ControlPlane, registry: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(forward, "BODY_IDLE_SECONDS", 0.2)
    sent = [0]

    def stalls_after(total: int) -> Callable[[], Awaitable[dict[str, Any]]]:
        async def receive() -> dict[str, Any]:
            if sent[0] >= total:
                await asyncio.sleep(3600)
            sent[0] += 65536
            return {"type": "http.request", "body": b"s" * 65536, "more_body": True}

        return receive

    async with proxy_app(cp, registry, max_body_bytes=8 * 1024 * 1024) as app:
        headers = [(b"metadata", b"true"), (b"transfer-encoding", b"chunked")]
        # Within the prefetch: nothing was sent upstream yet.
        before = seen(cp)
        exchange = await asgi(app, A, "POST", b"/runtime/echo", headers, stalls_after(65536))
        assert (exchange.status, exchange.code) == (408, "request_timeout")
        assert exchange.headers[b"connection"] == b"close"
        assert seen(cp) == before
        # Past it, streaming: the upstream call is cut off, its connection given up.
        sent[0] = 0
        exchange = await asgi(app, A, "POST", b"/runtime/echo", headers, stalls_after(2 * 1024 * 1024))
        assert (exchange.status, exchange.code) == (408, "request_timeout")
        async with guest(app, A) as vm:
            assert (await vm.post("/runtime/echo", content=b"fine", headers=META)).json()["body_length"] == 4


# -- refusals are counted -------------------------------------------------------------------


async def test_refusals_are_counted_by_code(app: ProxyApp) -> None:
    async with guest(app, A) as vm, guest(app, STRANGER) as stranger:
        await stranger.get("/runtime/whoami", headers=META)
        await vm.get("/runtime/whoami", headers={**META, "Host": "evil"})
        await vm.get("/runtime/whoami", headers={**META, "Host": "evil"})
        await vm.get("/runtime/whoami", headers={**META, "X-Real-IP": "1.1.1.1"})
        await vm.get("/runtime/%2e%2e/x", headers=META)
        await vm.get("/runtime/whoami")
        await put_token(vm, "0")
        await vm.get("/runtime/whoami", headers=META)  # not a refusal
    text = app.metrics.render().decode()
    counts = dict(re.findall(r'^metadata_proxy_refusals_total\{code="(\w+)"\} (\S+)$', text, re.M))
    assert counts == {
        "unknown_vm": "1.0",
        "bad_host": "2.0",
        "forwarded_request": "1.0",
        "bad_path": "1.0",
        "missing_metadata_header": "1.0",
        "invalid_ttl": "1.0",
    }


async def test_a_guest_that_stops_reading_releases_the_upstream_connection(
    cp: ControlPlane, registry: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A streamed answer the guest never reads is cut off after GUEST_WRITE_TIMEOUT, so the
    pooled upstream connection goes back instead of being held for ever."""
    monkeypatch.setattr(app_module, "GUEST_WRITE_TIMEOUT", 0.3)
    chunk = b"x" * 65536

    async def big_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        try:
            for _ in range(64):  # 4 MiB, bounded
                writer.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(big_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = parse_config(
        {"host_id": "h", "listen": ["169.254.169.254:80"], "registry": str(registry),
         "control_plane": {"url": f"http://127.0.0.1:{port}", "timeout": 3, "retry_budget": 0}}
    )  # fmt: skip
    client = build_client(config.control_plane)
    app = ProxyApp(config, registry=Registry(config.registry), client=client, access_log=AccessLog(io.StringIO()))
    scope = {
        "type": "http", "method": "GET", "path": "/runtime/big", "raw_path": b"/runtime/big", "query_string": b"",
        "headers": [(b"host", b"169.254.169.254"), (b"metadata", b"true")], "client": (A, 40000),
        "http_version": "1.1", "scheme": "http",
    }  # fmt: skip
    sent: list[str] = []
    stalled = asyncio.Event()

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message["type"])
        if message["type"] == "http.response.body":
            await stalled.wait()  # the guest never reads: its socket buffer stays full

    try:
        started = time.monotonic()
        await asyncio.wait_for(as_guest(app, A)(scope, receive, send), timeout=5)
        assert time.monotonic() - started < 3
        assert sent[0] == "http.response.start"
        assert client.connections_open == 0  # cut off, not pooled half-read, not held
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()


@asynccontextmanager
async def guest_of_raw_upstream(
    registry: Path, handle: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]], path: str = ""
) -> AsyncIterator[httpx.AsyncClient]:
    """VM A, as a guest of an app whose control plane is `handle` on a loopback socket
    (`path` prefixes the control plane's URL): for answers no real server would give."""
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    config = parse_config(
        {"host_id": "h", "listen": ["169.254.169.254:80"], "registry": str(registry),
         "control_plane": {"url": f"http://127.0.0.1:{port}{path}", "retry_budget": 0}}
    )  # fmt: skip
    client = build_client(config.control_plane)
    app = ProxyApp(config, registry=Registry(config.registry), client=client, access_log=AccessLog(io.StringIO()))
    try:
        transport = httpx.ASGITransport(app=as_guest(app, A), client=(A, 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://169.254.169.254") as guest:
            yield guest
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()


async def test_a_path_in_the_control_plane_url_prefixes_every_target(registry: Path) -> None:
    """README "How a request flows": `METHOD /runtime/x?q` goes to `{control_plane.url}/runtime/x?q`."""
    seen: list[bytes] = []

    async def capture(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append((await reader.readuntil(b"\r\n")).split(b" ")[1])
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
        await writer.drain()
        writer.close()

    async with guest_of_raw_upstream(registry, capture, "/api/v1/") as guest:
        response = await guest.get("/runtime/x/y?q=1&q=%2F", headers=META)
    assert response.status_code == 200
    assert seen == [b"/api/v1/runtime/x/y?q=1&q=%2F"]


async def test_the_answers_hop_by_hop_fields_and_cookies_stay_with_the_proxy(registry: Path) -> None:
    """Upstream's hop-by-hop fields, those its Connection names, and Set-Cookie (a session with
    the control plane is the proxy's, made with the VM's token, never the guest's) are dropped;
    X-Request-Id is the proxy's own, once."""
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive, X-Upstream-Hop\r\n"
        b"X-Upstream-Hop: secret\r\nKeep-Alive: timeout=5\r\nSet-Cookie: session=abc\r\n"
        b"Proxy-Authenticate: Basic\r\nX-Request-Id: upstream\r\nX-Kept: yes\r\n\r\n{}"
    )

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    async with guest_of_raw_upstream(registry, upstream) as vm:
        response = await vm.get("/runtime/x", headers=META)
    assert (response.status_code, response.text, response.headers["x-kept"]) == (200, "{}", "yes")
    names = [name.decode().lower() for name, _ in response.headers.raw]
    assert not {"x-upstream-hop", "keep-alive", "set-cookie", "proxy-authenticate", "connection"} & set(names)
    assert names.count("x-request-id") == 1 and response.headers["x-request-id"] != "upstream"


async def test_an_invalid_answer_from_the_control_plane_is_502_upstream_unavailable(registry: Path) -> None:
    """Not HTTP at all: the guest gets the JSON error of the failure table (502, not a timeout's 504)."""

    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
        await writer.drain()
        writer.close()

    async with guest_of_raw_upstream(registry, garbage) as vm:
        response = await vm.get("/runtime/x", headers=META)
    assert (response.status_code, code(response)) == (502, "upstream_unavailable"), response.text


async def test_a_registry_named_by_a_reload_is_read_before_its_first_lookup(
    cp: ControlPlane, registry: Path, tmp_path: Path
) -> None:
    """Served by GuestProtocol, the app checks the file only after new guest input; a reload
    that names another file must not let a request already read (queued behind another on
    its connection) be looked up in a registry never read: it would be refused, and every
    connection closed as if every VM had gone."""
    async with proxy_app(cp, registry) as app:
        closed: list[object] = []

        def close_connections(gone: object) -> int:
            closed.append(gone)
            return 0

        app.owners.close_connections = close_connections
        app.owners.input_arrived()
        assert (vm := app.owners.lookup(A)) is not None and vm.name == "a"
        # No guest input from here on: the next lookup does not check the file.
        copy = tmp_path / "copy.sqlite3"
        copy.write_bytes(registry.read_bytes())  # the same VMs under another path
        app.registry = Registry(str(copy))  # as a reload that names another file does
        again = app.owners.lookup(A)
    assert again is not None and again.name == "a"
    assert closed == []
