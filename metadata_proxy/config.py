"""The proxy's configuration: frozen dataclasses and the one TOML loader that validates them.

Every key of SPEC section 6 is here with its default. Unknown keys and bad values raise
ConfigError with a message that names the key and the value, e.g.::

    config.toml: limits.burst = -1: must be an integer of at least 1
"""

from __future__ import annotations

import ipaddress
import json
import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, cast
from urllib.parse import urlsplit

DEFAULT_PATH = "/etc/metadata-proxy/config.toml"
GUARDS = ("header", "session", "none")
LOCAL_PREFIX = "/metadata/"  # the proxy's own endpoints; no route may shadow them


class ConfigError(Exception):
    """The config cannot be used; the message names the key and the value."""


@dataclass(frozen=True, slots=True)
class ListenAddress:
    host: str  # an IP address, IPv6 without brackets
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ControlPlane:
    url: str
    timeout: float = 10.0
    retry_budget: float = 5.0
    ca_file: str = ""
    client_cert: str = ""
    client_key: str = ""


@dataclass(frozen=True, slots=True)
class Limits:
    requests_per_second: float = 50.0
    burst: int = 100
    max_concurrent: int = 16
    max_body_bytes: int = 10 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Cache:
    max_entries_per_vm: int = 256
    max_bytes: int = 64 * 1024 * 1024


Guard = Literal["header", "session", "none"]  # see GUARDS


@dataclass(frozen=True, slots=True)
class Route:
    prefix: str
    guard: Guard = "header"


DEFAULT_LISTEN: tuple[ListenAddress, ...] = (ListenAddress("169.254.169.254", 80), ListenAddress("fd00:a9fe::254", 80))
DEFAULT_REGISTRY = "/var/lib/metadata-proxy/registry.sqlite3"
DEFAULT_ADMIN = "/run/metadata-proxy/admin.sock"
DEFAULT_ROUTES: tuple[Route, ...] = (Route("/runtime/"),)


@dataclass(frozen=True, slots=True)
class Config:
    host_id: str
    control_plane: ControlPlane
    listen: tuple[ListenAddress, ...] = DEFAULT_LISTEN
    host_aliases: tuple[str, ...] = ()
    registry: str = DEFAULT_REGISTRY
    admin_listen: str = DEFAULT_ADMIN
    workers: int = 1
    limits: Limits = field(default_factory=Limits)
    cache: Cache = field(default_factory=Cache)
    routes: tuple[Route, ...] = DEFAULT_ROUTES
    source: str = "<defaults>"

    @property
    def metadata_addresses(self) -> tuple[str, ...]:
        """The hosts of the `listen` entries: where guests find the proxy."""
        return tuple(dict.fromkeys(entry.host for entry in self.listen))

    def input_files(self) -> list[tuple[str, str]]:
        """(key, path) of every file the config names, for check-config and start-up."""
        cp = self.control_plane
        keys = (("ca_file", cp.ca_file), ("client_cert", cp.client_cert), ("client_key", cp.client_key))
        return [(f"control_plane.{key}", path) for key, path in keys if path]


# -- parsing --------------------------------------------------------------------------------

T = TypeVar("T")


class _Section:
    """One TOML table being read: tracks which keys were used, names keys in errors."""

    def __init__(self, data: Mapping[str, Any], prefix: str, source: str) -> None:
        self.data = data
        self.prefix = prefix
        self.source = source
        self.used: set[str] = set()

    def error(self, key: str, value: object, why: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self.prefix}{key} = {_show(value)}: {why}")

    def get(self, key: str, default: T, check: Callable[[Any], T | None], why: str) -> T:
        """The value of `key` passed through `check` (None means invalid), or `default`."""
        self.used.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        result = check(value)
        if result is None:
            raise self.error(key, value, why)
        return result

    def require(self, key: str) -> None:
        if key not in self.data:
            raise ConfigError(f"{self.source}: {self.prefix}{key} is required")

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            key = unknown[0]
            raise self.error(key, self.data[key], "unknown key")


def _show(value: object) -> str:
    """A value as TOML would spell it, for error messages."""
    if isinstance(value, dict):
        return "{...}"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | list):
        return json.dumps(value)
    return str(value)


def _string(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _nonempty(value: Any) -> str | None:
    return value if isinstance(value, str) and value.strip() else None


def _host_id(value: Any) -> str | None:
    """Sent in a header on every forward: printable ASCII, no spaces."""
    if not isinstance(value, str) or not value or not value.isascii() or not value.isprintable() or " " in value:
        return None
    return value


def _number(minimum: float, *, above: bool = False) -> Callable[[Any], float | None]:
    def check(value: Any) -> float | None:
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return None
        if value < minimum or (above and value == minimum):
            return None
        return float(value)

    return check


def _integer(minimum: int) -> Callable[[Any], int | None]:
    def check(value: Any) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            return None
        return value

    return check


def _string_list(value: Any) -> tuple[str, ...] | None:
    if not isinstance(value, list) or not all(isinstance(item, str) and item for item in value):
        return None
    return tuple(value)


def parse_listen(text: str) -> ListenAddress | None:
    """ "169.254.169.254:80" or "[fd00:a9fe::254]:80" -> ListenAddress, None if malformed."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        version = 6
    else:
        version = 4
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return None
    if addr.version != version:
        return None
    return ListenAddress(str(addr), int(port))


def _listen_list(value: Any) -> tuple[ListenAddress, ...] | None:
    if not isinstance(value, list) or not value or not all(isinstance(item, str) for item in value):
        return None
    parsed = [parse_listen(item) for item in value]
    if any(item is None for item in parsed):
        return None
    return tuple(item for item in parsed if item is not None)


def _admin_listen(value: Any) -> str | None:
    """A unix socket path, or a loopback host:port (never a guest-facing address)."""
    if not isinstance(value, str) or not value:
        return None
    if value.startswith("/"):
        return value
    parsed = parse_listen(value)
    if parsed is None or not ipaddress.ip_address(parsed.host).is_loopback:
        return None
    return value


def _url(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        return None
    # A path is a prefix for every forwarded target; credentials belong in client_cert.
    if parts.username is not None or not (parts.path.isascii() and parts.path.isprintable()) or " " in parts.path:
        return None
    try:
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return None
    return value.rstrip("/")


def _route_prefix(value: Any) -> str | None:
    if not isinstance(value, str) or not value.startswith("/") or not value.endswith("/") or len(value) < 3:
        return None
    if value.startswith(LOCAL_PREFIX) or "//" in value or "%" in value:
        return None
    if any(segment in (".", "..") for segment in value.split("/")) or not value.isascii() or not value.isprintable():
        return None
    return value


def _guard(value: Any) -> Guard | None:
    return cast(Guard, value) if value in GUARDS else None


def parse_config(data: Mapping[str, Any], source: str = "<config>") -> Config:
    """Build a Config from parsed TOML, validating every key."""
    top = _Section(data, "", source)
    top.require("host_id")
    host_id = top.get("host_id", "", _host_id, "must be a non-empty string of printable ASCII without spaces")
    listen = top.get("listen", DEFAULT_LISTEN, _listen_list, 'must be a non-empty list of "IP:PORT" / "[IPv6]:PORT"')
    aliases: tuple[str, ...] = top.get("host_aliases", (), _string_list, "must be a list of non-empty strings")
    registry = top.get("registry", DEFAULT_REGISTRY, _nonempty, "must be a file path")
    admin = top.get("admin_listen", DEFAULT_ADMIN, _admin_listen, 'must be a unix socket path or a loopback "IP:PORT"')
    workers = top.get("workers", 1, _integer(1), "must be an integer of at least 1")

    top.require("control_plane")
    cp = _table(top, "control_plane", source)
    cp.require("url")
    control_plane = ControlPlane(
        url=cp.get("url", "", _url, "must be an http:// or https:// URL with a host, no credentials and no query"),
        timeout=cp.get("timeout", 10.0, _number(0, above=True), "must be a number of seconds above 0"),
        retry_budget=cp.get("retry_budget", 5.0, _number(0), "must be a number of seconds, 0 or more"),
        ca_file=cp.get("ca_file", "", _string, "must be a file path or empty"),
        client_cert=cp.get("client_cert", "", _string, "must be a file path or empty"),
        client_key=cp.get("client_key", "", _string, "must be a file path or empty"),
    )
    cp.finish()
    if bool(control_plane.client_cert) != bool(control_plane.client_key):
        key = "client_key" if control_plane.client_cert else "client_cert"
        raise ConfigError(f"{source}: control_plane.{key} is required with control_plane.client_cert/client_key")
    if control_plane.url.startswith("http://") and (control_plane.ca_file or control_plane.client_cert):
        raise ConfigError(f'{source}: control_plane.url = "{control_plane.url}": ca_file/client_cert need https://')

    lim = _table(top, "limits", source)
    limits = Limits(
        requests_per_second=lim.get("requests_per_second", 50.0, _number(0, above=True), "must be a number above 0"),
        burst=lim.get("burst", 100, _integer(1), "must be an integer of at least 1"),
        max_concurrent=lim.get("max_concurrent", 16, _integer(1), "must be an integer of at least 1"),
        max_body_bytes=lim.get("max_body_bytes", 10 * 1024 * 1024, _integer(0), "must be an integer, 0 or more"),
    )
    lim.finish()

    cache_table = _table(top, "cache", source)
    cache = Cache(
        max_entries_per_vm=cache_table.get("max_entries_per_vm", 256, _integer(0), "must be an integer, 0 or more"),
        max_bytes=cache_table.get("max_bytes", 64 * 1024 * 1024, _integer(0), "must be an integer, 0 or more"),
    )
    cache_table.finish()

    routes = _routes(top, source)
    top.finish()
    return Config(
        host_id=host_id,
        control_plane=control_plane,
        listen=listen,
        host_aliases=aliases,
        registry=registry,
        admin_listen=admin,
        workers=workers,
        limits=limits,
        cache=cache,
        routes=routes,
        source=source,
    )


def _table(top: _Section, key: str, source: str) -> _Section:
    top.used.add(key)
    value = top.data.get(key, {})
    if not isinstance(value, dict):
        raise top.error(key, value, "must be a table")
    return _Section(value, f"{key}.", source)


def _routes(top: _Section, source: str) -> tuple[Route, ...]:
    top.used.add("routes")
    if "routes" not in top.data:
        return DEFAULT_ROUTES
    value = top.data["routes"]
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise top.error("routes", value, "must be an array of tables ([[routes]])")
    routes: list[Route] = []
    for index, item in enumerate(value):
        section = _Section(item, f"routes[{index}].", source)
        section.require("prefix")
        route = Route(
            prefix=section.get("prefix", "", _route_prefix, 'must be a path like "/runtime/" outside /metadata/'),
            guard=section.get("guard", "header", _guard, "must be one of header, session, none"),
        )
        section.finish()
        if any(existing.prefix == route.prefix for existing in routes):
            raise section.error("prefix", route.prefix, "is configured twice")
        routes.append(route)
    return tuple(routes)


def load_config(path: str) -> Config:
    """Read and validate the TOML file at `path`."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return parse_config(data, path)


def check_input_files(config: Config) -> None:
    """Raise ConfigError for the first named input file that cannot be read."""
    for key, path in config.input_files():
        if not os.path.isfile(path):
            raise ConfigError(f'{config.source}: {key} = "{path}": no such file')
        if not os.access(path, os.R_OK):
            raise ConfigError(f'{config.source}: {key} = "{path}": not readable')
