"""The proxy's configuration: frozen dataclasses and the one TOML loader that validates them.

Every key of docs/configuration.md is here with its default. Unknown keys and bad values raise
ConfigError with a message that names the key and the value, e.g.::

    config.toml: limits.burst = -1: must be an integer of at least 1
"""

from __future__ import annotations

import grp
import ipaddress
import json
import math
import os
import pwd
import re
import stat
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args
from urllib.parse import urlsplit

DEFAULT_PATH = "/etc/metadata-proxy/config.toml"
Guard = Literal["header", "session", "none"]
GUARDS: tuple[Guard, ...] = get_args(Guard)
DEFAULT_TIMEOUT = 10.0  # [control_plane] timeout, and a route's
DEFAULT_MAX_BODY_BYTES = 10 * 1024 * 1024  # [limits] max_body_bytes, and a route's
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
    timeout: float = DEFAULT_TIMEOUT
    retry_budget: float = 5.0
    ca_file: str = ""
    client_cert: str = ""
    client_key: str = ""


@dataclass(frozen=True, slots=True)
class Limits:
    requests_per_second: float = 50.0
    burst: int = 100
    max_concurrent: int = 16
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


@dataclass(frozen=True, slots=True)
class Cache:
    max_entries_per_vm: int = 256
    max_bytes: int = 64 * 1024 * 1024
    stale_if_error_max: float = 300.0  # seconds an answer's stale-if-error may stretch it; 0: never stale


@dataclass(frozen=True, slots=True)
class Route:
    """A forwarded prefix. The loader fills `max_body_bytes` and `timeout` from [limits] and
    [control_plane] when the route does not set them."""

    prefix: str
    guard: Guard = "header"
    privileged_port: bool = False  # the caller's source port (after the host's NAT) must be < 1024
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    timeout: float = DEFAULT_TIMEOUT


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
    # Count requests per VM name in metadata_proxy_requests. Off: one series per route and
    # status for all VMs together, so the series stay bounded however many VMs a host has.
    per_vm_metrics: bool = True
    source: str = "<defaults>"

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


def listen_problem(text: str) -> str:
    """Why `text` is not a listen address (parse_listen said None), for the error message."""
    host, sep, port = text.rpartition(":")
    if not sep or not port:
        return 'has no port (expected "IP:PORT" or "[IPv6]:PORT")'
    if not port.isdigit() or not 0 < int(port) < 65536:
        return f"port {port!r} is not a number from 1 to 65535"
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        addr = ipaddress.ip_address(host[1:-1] if bracketed else host)
    except ValueError:
        return f"{host!r} is not an IP address (host names are not resolved)"
    if addr.version == 6 and not bracketed:
        return 'an IPv6 address goes in brackets: "[IPv6]:PORT"'
    return 'an IPv4 address goes without brackets: "IP:PORT"'


def _listen(top: _Section) -> tuple[ListenAddress, ...]:
    """The `listen` entries; an error names the bad entry by its index and says why."""
    value = top.get("listen", None, lambda v: v, "")
    if value is None:
        return _DEFAULT.listen
    if not isinstance(value, list) or not value:
        raise top.error("listen", value, 'must be a non-empty list of "IP:PORT" / "[IPv6]:PORT"')
    parsed: list[ListenAddress] = []
    for index, item in enumerate(value):
        entry = parse_listen(item) if isinstance(item, str) else None
        if entry is None:
            why = listen_problem(item) if isinstance(item, str) else "must be a string"
            raise top.error(f"listen[{index}]", item, why)
        if entry in parsed:
            raise top.error(f"listen[{index}]", item, "is listed twice")
        parsed.append(entry)
    return tuple(parsed)


# A Host header value a guest may send: a DNS name or an IP address, optionally with a port.
_DNS_NAME = re.compile(
    r"(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
)


def _alias_problem(alias: str) -> str | None:
    """Why `alias` can never match a Host header, or None when it can."""
    host, port = alias, ""
    if "/" in alias or " " in alias:
        return "must be what a Host header holds: a host name or address, no scheme, path or spaces"
    if alias.startswith("["):
        inside, bracket, rest = alias[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return 'must be a host name, an IP address or "[IPv6]", optionally with ":PORT"'
        host, port = inside, rest[1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return f"{host!r} in brackets is not an IPv6 address"
    elif alias.count(":") == 1:
        host, _, port = alias.partition(":")
    if alias.count(":") > 1 and not alias.startswith("["):
        return 'an IPv6 address goes in brackets: "[IPv6]" or "[IPv6]:PORT"'
    if port and (not port.isdigit() or not 0 < int(port) < 65536):
        return f"port {port!r} is not a number from 1 to 65535"
    if not alias.startswith("[") and not _DNS_NAME.fullmatch(host):
        return "must be a host name or an IP address (no scheme, path, spaces or '_')"
    return None


def _host_aliases(top: _Section) -> tuple[str, ...]:
    value = top.get("host_aliases", None, lambda v: v, "")
    if value is None:
        return _DEFAULT.host_aliases
    if not isinstance(value, list):
        raise top.error("host_aliases", value, "must be a list of host names or addresses")
    for index, item in enumerate(value):
        why = _alias_problem(item) if isinstance(item, str) else "must be a string"
        if why is not None:
            raise top.error(f"host_aliases[{index}]", item, why)
    return tuple(value)


def _boolean(value: Any) -> bool | None:
    return value if isinstance(value, bool) else None


def max_workers() -> int:
    """The most `workers` that make sense here: 4 per CPU (uvicorn and gunicorn advise
    one or two; beyond this they only compete for the same cores)."""
    return (os.cpu_count() or 1) * 4


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
    for guard in GUARDS:
        if value == guard:
            return guard
    return None


# The defaults, each defined once: in the dataclasses above. The loader reads them from
# these instances (the required fields get placeholders that are never used).
_DEFAULT = Config(host_id="", control_plane=ControlPlane(url=""))
_CONTROL_PLANE = _DEFAULT.control_plane
_LIMITS = _DEFAULT.limits
_CACHE = _DEFAULT.cache
_ROUTE = Route("/")


def parse_config(data: Mapping[str, Any], source: str = "<config>") -> Config:
    """Build a Config from parsed TOML, validating every key."""
    top = _Section(data, "", source)
    top.require("host_id")
    host_id = top.get("host_id", "", _host_id, "must be a non-empty string of printable ASCII without spaces")
    listen = _listen(top)
    aliases = _host_aliases(top)
    registry = top.get("registry", _DEFAULT.registry, _nonempty, "must be a file path")
    if not os.path.isabs(registry) or registry.endswith("/"):
        raise top.error("registry", registry, "must be an absolute path to a file")
    if os.path.isdir(registry):
        raise top.error("registry", registry, "is a directory; name the registry file inside it")
    admin = top.get(
        "admin_listen", _DEFAULT.admin_listen, _admin_listen, 'must be a unix socket path or a loopback "IP:PORT"'
    )
    workers = top.get("workers", _DEFAULT.workers, _integer(1), "must be an integer of at least 1")
    most = max_workers()
    if workers > most:
        raise top.error("workers", workers, f"more than 4 per CPU ({most} on this host) only adds contention")
    per_vm_metrics = top.get("per_vm_metrics", _DEFAULT.per_vm_metrics, _boolean, "must be true or false")

    top.require("control_plane")
    cp = _table(top, "control_plane", source)
    cp.require("url")
    control_plane = ControlPlane(
        url=cp.get("url", "", _url, "must be an http:// or https:// URL with a host, no credentials and no query"),
        timeout=cp.get(
            "timeout", _CONTROL_PLANE.timeout, _number(0, above=True), "must be a number of seconds above 0"
        ),
        retry_budget=cp.get(
            "retry_budget", _CONTROL_PLANE.retry_budget, _number(0), "must be a number of seconds, 0 or more"
        ),
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
        requests_per_second=lim.get(
            "requests_per_second", _LIMITS.requests_per_second, _number(0, above=True), "must be a number above 0"
        ),
        burst=lim.get("burst", _LIMITS.burst, _integer(1), "must be an integer of at least 1"),
        max_concurrent=lim.get(
            "max_concurrent", _LIMITS.max_concurrent, _integer(1), "must be an integer of at least 1"
        ),
        max_body_bytes=lim.get("max_body_bytes", _LIMITS.max_body_bytes, _integer(0), "must be an integer, 0 or more"),
    )
    lim.finish()

    cache_table = _table(top, "cache", source)
    cache = Cache(
        max_entries_per_vm=cache_table.get(
            "max_entries_per_vm", _CACHE.max_entries_per_vm, _integer(0), "must be an integer, 0 or more"
        ),
        max_bytes=cache_table.get("max_bytes", _CACHE.max_bytes, _integer(0), "must be an integer, 0 or more"),
        stale_if_error_max=cache_table.get(
            "stale_if_error_max", _CACHE.stale_if_error_max, _number(0), "must be a number of seconds, 0 or more"
        ),
    )
    cache_table.finish()

    routes = _routes(top, source, limits, control_plane)
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
        per_vm_metrics=per_vm_metrics,
        source=source,
    )


def _table(top: _Section, key: str, source: str) -> _Section:
    top.used.add(key)
    value = top.data.get(key, {})
    if not isinstance(value, dict):
        raise top.error(key, value, "must be a table")
    return _Section(value, f"{key}.", source)


def _routes(top: _Section, source: str, limits: Limits, control_plane: ControlPlane) -> tuple[Route, ...]:
    top.used.add("routes")
    if "routes" not in top.data:
        return tuple(
            Route(route.prefix, route.guard, route.privileged_port, limits.max_body_bytes, control_plane.timeout)
            for route in DEFAULT_ROUTES
        )
    value = top.data["routes"]
    if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
        raise top.error("routes", value, "must be an array of tables ([[routes]])")
    routes: list[Route] = []
    for index, item in enumerate(value):
        section = _Section(item, f"routes[{index}].", source)
        section.require("prefix")
        route = Route(
            prefix=section.get("prefix", "", _route_prefix, 'must be a path like "/runtime/" outside /metadata/'),
            guard=section.get("guard", _ROUTE.guard, _guard, "must be one of header, session, none"),
            privileged_port=section.get("privileged_port", _ROUTE.privileged_port, _boolean, "must be true or false"),
            max_body_bytes=section.get(
                "max_body_bytes", limits.max_body_bytes, _integer(0), "must be an integer, 0 or more"
            ),
            timeout=section.get(
                "timeout", control_plane.timeout, _number(0, above=True), "must be a number of seconds above 0"
            ),
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
    except UnicodeDecodeError as exc:  # TOML is UTF-8: say where, not the decoder's traceback
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start} cannot be decoded)") from None
    return parse_config(data, path)


def check_input_files(config: Config, *, user: str | None = None) -> None:
    """Raise ConfigError for the first named input file that cannot be used: missing, not
    readable (by this process, and by `user` when given: the service's user, which is
    not the root running check-config), or TLS material that does not load (a CA bundle
    without a certificate, a certificate or key that is not PEM, a key that does not
    belong to the certificate). The message names the key, the file and the reason."""
    account = _account(user) if user is not None else None
    if account is not None and os.path.isfile(config.source):  # the service reads its config too
        why = unreadable_by(config.source, account)
        if why is not None:
            raise ConfigError(f"{config.source}: {why}")
    for key, path in config.input_files():

        def fail(why: str, key: str = key, path: str = path) -> ConfigError:
            return ConfigError(f'{config.source}: {key} = "{path}": {why}')

        if not os.path.isfile(path):
            raise fail("no such file" if not os.path.exists(path) else "not a regular file")
        if not os.access(path, os.R_OK):
            raise fail("not readable")
        if account is not None and (why := unreadable_by(path, account)) is not None:
            raise fail(why)
    if account is not None and os.path.exists(config.registry):
        why = unreadable_by(config.registry, account)
        if why is not None:
            raise ConfigError(f'{config.source}: registry = "{config.registry}": {why}')
    _check_tls(config)


def _account(user: str) -> tuple[str, int, frozenset[int]]:
    """(name, uid, every gid) of `user`."""
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"user {user}: no such user") from None
    groups = {entry.pw_gid, *(group.gr_gid for group in grp.getgrall() if user in group.gr_mem)}
    return entry.pw_name, entry.pw_uid, frozenset(groups)


def unreadable_by(path: str, account: tuple[str, int, frozenset[int]]) -> str | None:
    """Why `account` cannot read `path` by its permission bits (every directory on the
    way must be searchable), or None. Root reads everything; ACLs are not consulted."""
    name, uid, gids = account
    if uid == 0:
        return None

    def allowed(st: os.stat_result, bit: int) -> bool:  # bit: 4 read, 1 search
        if st.st_uid == uid:
            return bool(st.st_mode >> 6 & bit)
        if st.st_gid in gids:
            return bool(st.st_mode >> 3 & bit)
        return bool(st.st_mode & bit)

    def owner(st: os.stat_result) -> str:
        try:
            who = pwd.getpwuid(st.st_uid).pw_name
        except KeyError:
            who = str(st.st_uid)
        try:
            group = grp.getgrgid(st.st_gid).gr_name
        except KeyError:
            group = str(st.st_gid)
        return f"mode {stat.S_IMODE(st.st_mode):04o}, owner {who}:{group}"

    path = os.path.realpath(path)
    directory = os.path.dirname(path)
    parents = []
    while True:
        parents.append(directory)
        if directory == os.path.dirname(directory):
            break
        directory = os.path.dirname(directory)
    for directory in reversed(parents):
        st = os.stat(directory)
        if not allowed(st, 1):
            return f"the service user {name} cannot enter its directory {directory} ({owner(st)})"
    st = os.stat(path)
    if not allowed(st, 4):
        return f"the service user {name} cannot read it ({owner(st)})"
    return None


def _check_tls(config: Config) -> None:
    """Load the TLS material as the upstream client will, naming the file that fails.
    (Imported here, and cryptography only with a client certificate: hostagent reads configs
    too, and a proxy without one never needs its memory.)"""
    import ssl

    cp = config.control_plane

    def fail(key: str, path: str, why: str) -> ConfigError:
        return ConfigError(f'{config.source}: control_plane.{key} = "{path}": {why}')

    if cp.ca_file:
        try:
            ssl.create_default_context(cafile=cp.ca_file)
        except (ssl.SSLError, ValueError) as exc:
            raise fail("ca_file", cp.ca_file, f"not a PEM CA bundle ({exc.args[-1] if exc.args else exc})") from None
    if not cp.client_cert:
        return
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    with open(cp.client_cert, "rb") as f:
        cert_data = f.read()
    with open(cp.client_key, "rb") as f:
        key_data = f.read()
    try:
        certificate = x509.load_pem_x509_certificate(cert_data)
    except ValueError:
        raise fail("client_cert", cp.client_cert, "not a PEM certificate") from None
    try:
        key = serialization.load_pem_private_key(key_data, password=None)
    except TypeError:
        raise fail(
            "client_key", cp.client_key, "the key is encrypted; the service cannot ask for a passphrase"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise fail("client_key", cp.client_key, "not a PEM private key") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, public) != certificate.public_key().public_bytes(
        serialization.Encoding.DER, public
    ):
        raise fail("client_key", cp.client_key, f"does not belong to the certificate in {cp.client_cert}")
