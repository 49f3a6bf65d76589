"""A route's own keys (docs/configuration.md): `privileged_port`, `max_body_bytes`, `timeout`, through the
ASGI app against a real `controlplane serve`; each refusal with its status, its code, and
nothing reaching the control plane."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from metadata_proxy.app import ProxyApp
from metadata_proxy.config import ConfigError, Route, parse_config
from metadata_proxy.forward import build_client
from metadata_proxy.logs import AccessLog
from metadata_proxy.registry import Registry
from tests.harness import ControlPlane
from tests.test_app import as_guest, asgi, code, seen, sync

pytestmark = pytest.mark.anyio

VM = "10.7.0.2"
META = {"Metadata": "true"}
CONFIG = {
    "host_id": "host-routes",
    "listen": ["169.254.169.254:80"],
    "control_plane": {"url": "http://127.0.0.1:9", "timeout": 1},
    "limits": {"max_body_bytes": 1000},
    "routes": [
        {"prefix": "/runtime/"},
        {"prefix": "/runtime/echo/privileged/", "privileged_port": True},
        {"prefix": "/runtime/echo/open-privileged/", "guard": "none", "privileged_port": True},
        {"prefix": "/runtime/echo/small/", "max_body_bytes": 10},
        {"prefix": "/runtime/slow/", "timeout": 5},
    ],
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_route_keys_default_to_limits_and_control_plane() -> None:
    config = parse_config(CONFIG)
    by_prefix = {route.prefix: route for route in config.routes}
    assert by_prefix["/runtime/"] == Route("/runtime/", "header", False, 1000, 1.0)
    assert by_prefix["/runtime/echo/privileged/"].privileged_port is True
    assert by_prefix["/runtime/echo/small/"].max_body_bytes == 10
    assert by_prefix["/runtime/slow/"].timeout == 5.0
    default = parse_config({key: value for key, value in CONFIG.items() if key != "routes"})
    assert default.routes == (Route("/runtime/", "header", False, 1000, 1.0),)
    assert default.cache.stale_if_error_max == 300.0


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ({"privileged_port": "yes"}, 'routes[0].privileged_port = "yes": must be true or false'),
        ({"max_body_bytes": -1}, "routes[0].max_body_bytes = -1: must be an integer, 0 or more"),
        ({"timeout": 0}, "routes[0].timeout = 0: must be a number of seconds above 0"),
        ({"timeout": "long"}, 'routes[0].timeout = "long": must be a number of seconds above 0'),
    ],
)
def test_bad_route_keys_name_key_and_value(route: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config({**CONFIG, "routes": [{"prefix": "/runtime/", **route}]})


def test_bad_stale_if_error_max() -> None:
    with pytest.raises(ConfigError, match=r"cache.stale_if_error_max = -1: must be a number of seconds, 0 or more"):
        parse_config({**CONFIG, "cache": {"stale_if_error_max": -1}})


@pytest.fixture
async def app(cp: ControlPlane, tmp_path: Path) -> AsyncIterator[ProxyApp]:
    registry = tmp_path / "registry.sqlite3"
    sync(cp, registry, {"r": VM})
    config = parse_config({**CONFIG, "registry": str(registry), "control_plane": {"url": cp.url, "timeout": 1}})
    client = build_client(config.control_plane)
    try:
        yield ProxyApp(config, registry=Registry(config.registry), client=client, access_log=AccessLog(io.StringIO()))
    finally:
        await client.aclose()


def guest(app: ProxyApp, port: int) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=as_guest(app, VM), client=(VM, port))
    return httpx.AsyncClient(transport=transport, base_url="http://169.254.169.254", timeout=30)


@pytest.mark.parametrize("path", ["/runtime/echo/privileged/x", "/runtime/echo/open-privileged/x"])
async def test_privileged_port_route(app: ProxyApp, cp: ControlPlane, path: str) -> None:
    async with guest(app, 600) as root_guest:
        answered = await root_guest.get(path, headers=META)
    assert answered.status_code == 200 and answered.json()["raw_path"] == path
    for port in (1024, 40000, 65535):
        before = seen(cp)
        async with guest(app, port) as user_guest:
            response = await user_guest.get(path, headers=META)
        assert (response.status_code, code(response)) == (403, "unprivileged_port")
        assert seen(cp) == before


async def test_guard_comes_before_the_port_rule(app: ProxyApp, cp: ControlPlane) -> None:
    before = seen(cp)
    async with guest(app, 40000) as user_guest:
        response = await user_guest.get("/runtime/echo/privileged/x")
    assert (response.status_code, code(response)) == (400, "missing_metadata_header")
    assert seen(cp) == before


async def test_other_routes_take_any_port(app: ProxyApp) -> None:
    async with guest(app, 40000) as user_guest:
        assert (await user_guest.get("/runtime/echo/x", headers=META)).status_code == 200


async def test_route_body_limit(app: ProxyApp, cp: ControlPlane) -> None:
    async with guest(app, 40000) as vm:
        before = seen(cp)
        refused = await vm.post("/runtime/echo/small/x", headers=META, content=b"x" * 11)
        assert (refused.status_code, code(refused)) == (413, "body_too_large")
        assert seen(cp) == before
        fits = await vm.post("/runtime/echo/small/x", headers=META, content=b"x" * 10)
        assert fits.status_code == 200 and fits.json()["body_length"] == 10
        # The same 11 bytes under the default route: [limits] max_body_bytes (1000) applies.
        other = await vm.post("/runtime/echo/x", headers=META, content=b"x" * 11)
        assert other.status_code == 200 and other.json()["body_length"] == 11


async def test_a_declared_body_over_the_routes_limit_is_refused_before_any_of_it_is_read(
    app: ProxyApp, cp: ControlPlane
) -> None:
    """Under [limits] max_body_bytes (1000) but over the route's 10: refused on its length, as
    a body over the global limit is, before a byte is read (reading would make the server send
    100 Continue, and the guest its body)."""
    headers = [(b"metadata", b"true"), (b"content-length", b"11"), (b"expect", b"100-continue")]
    before = seen(cp)
    exchange = await asgi(app, VM, "POST", b"/runtime/echo/small/x", headers)
    assert (exchange.status, exchange.code) == (413, "body_too_large")
    assert exchange.headers[b"connection"] == b"close"
    assert exchange.receives == 0
    assert seen(cp) == before


async def test_route_timeout(app: ProxyApp) -> None:
    async with guest(app, 40000) as vm:
        # control_plane.timeout = 1: a 1.5 s answer is too slow for /runtime/ (/runtime/slow
        # itself is /runtime/slow/'s own name, so it is that route's: guards.match_route) ...
        late = await vm.get("/runtime/cached", params={"delay": "1.5"}, headers=META)
        assert (late.status_code, code(late)) == (504, "upstream_timeout")
        # ... and within /runtime/slow/'s own 5 s.
        held = await vm.get("/runtime/slow/x", params={"seconds": "1.5"}, headers=META)
        assert held.status_code == 200 and held.json() == {"slept": 1.5}
        # A pooled connection that served the long route keeps the short limit for the next call.
        again = await vm.get("/runtime/cached", params={"delay": "1.5"}, headers=META)
        assert (again.status_code, code(again)) == (504, "upstream_timeout")
