"""The checks of README "How a request flows", each a small pure function returning a Refusal or None.

`app.ProxyApp.handle` calls them in the order README "How a request flows" gives; this module only knows how
to tell a good request from a bad one. Header names arrive lowercased (ASGI).
"""

from __future__ import annotations

import ipaddress
import json
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from urllib.parse import unquote_to_bytes

from .config import ListenAddress, Route

Headers = Sequence[tuple[bytes, bytes]]

MAX_HEADER_BYTES = 32 * 1024
FORWARDED_HEADERS = frozenset({b"x-forwarded-for", b"forwarded", b"x-real-ip"})
LOCAL_INSTANCE = b"/metadata/v1/instance"
LOCAL_TOKEN = b"/metadata/v1/token"
LOCAL_ENDPOINTS = {LOCAL_INSTANCE: "GET", LOCAL_TOKEN: "PUT"}
# Percent-decoding rounds before a path counts as deliberately obfuscated.
_MAX_DECODES = 3
# The longest session a guest may ask for (X-Metadata-Token-TTL-Seconds), as AWS IMDSv2.
MAX_SESSION_TTL = 21600
# A path with none of the bytes that the full check looks for ('%' to decode, '.' of a dot
# segment, '\', C0 controls, DEL, anything non-ASCII) cannot fail it: nearly every real path.
_PLAIN_PATH = re.compile(rb"/[^%.\\\x00-\x1f\x7f-\xff]*")
# C0, DEL and C1 controls (U+0080..U+009F: NEL and friends end lines in some parsers), and '\'.
_UNSAFE_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\\]")
# What many servers drop before routing: a segment's path parameters (`;x`: Tomcat, Jetty,
# Spring) and empty segments (`//`: nginx's merge_slashes, Spring, Go routers that clean).
_PATH_PARAMETERS = re.compile(rb";[^/]*")
_EMPTY_SEGMENTS = re.compile(rb"//+")
# Single bytes looked for with `in` as ints: `b"_" in name` makes CPython try the bytes as an
# integer first, raising and clearing a TypeError every time; an int is a plain byte search.
_UNDERSCORE, _SEMICOLON, _PERCENT = ord("_"), ord(";"), ord("%")


@dataclass(frozen=True, slots=True)
class Refusal:
    """A guest-facing error: status, the stable code and one sentence."""

    status: int
    code: str
    message: str
    headers: tuple[tuple[bytes, bytes], ...] = ()


def error_body(refusal: Refusal) -> bytes:
    """The JSON body of every refusal, whoever answers it (the app or the guest protocol):
    ``{"error": {"code": ..., "message": ...}}``."""
    return json.dumps({"error": {"code": refusal.code, "message": refusal.message}}).encode()


UNKNOWN_VM = Refusal(403, "unknown_vm", "This address is not registered as a VM on this host.")
BAD_HOST = Refusal(403, "bad_host", "The Host header does not name the metadata service.")
FORWARDED = Refusal(400, "forwarded_request", "Requests relayed through a proxy are refused.")
HEADERS_TOO_LARGE = Refusal(431, "headers_too_large", "The request headers exceed 32 KiB.")
BAD_FRAMING = Refusal(400, "bad_request", "The request has conflicting or repeated length headers.")
BAD_PATH = Refusal(400, "bad_path", "The request path is not allowed.")
NOT_FOUND = Refusal(404, "not_found", "No metadata endpoint or route has this path.")
MISSING_METADATA = Refusal(400, "missing_metadata_header", "The request needs the header 'Metadata: true'.")
INVALID_SESSION = Refusal(401, "invalid_session_token", "A valid X-Metadata-Token header is required.")
UNPRIVILEGED_PORT = Refusal(
    403, "unprivileged_port", "This path answers only connections from a privileged source port (below 1024)."
)
# Ports a guest process needs root (or CAP_NET_BIND_SERVICE) to bind; the host's NAT keeps
# ports below this below it, so the proxy sees the guest's own choice.
PRIVILEGED_PORTS = 1024
INVALID_TTL = Refusal(
    400, "invalid_ttl", f"X-Metadata-Token-TTL-Seconds must be an integer from 1 to {MAX_SESSION_TTL}."
)
BODY_TOO_LARGE = Refusal(413, "body_too_large", "The request body is larger than this service accepts.")
# Answered by the guest protocol (protocol.GuestProtocol) before the app sees a request.
MALFORMED = Refusal(400, "bad_request", "The request is not valid HTTP/1.1.")
CHUNK_FRAMING = Refusal(400, "bad_request", "The request's chunked framing is out of proportion to its body.")
REQUEST_TIMEOUT = Refusal(408, "request_timeout", "The request did not arrive in time.")
TOO_MANY_CONNECTIONS = Refusal(
    429, "rate_limited", "Too many open connections from this VM; retry later.", ((b"retry-after", b"1"),)
)
# A header name with '_': CGI/WSGI gateways read `X_Forwarded_For` and `X-Forwarded-For`
# alike (HTTP_X_FORWARDED_FOR), so a look-alike would pass beside the header the proxy sets.
UNDERSCORE_HEADER = Refusal(400, "bad_request", "Header names containing '_' are not accepted.")
# A GET or HEAD body is never forwarded, so it is never counted against max_body_bytes as
# it is read: a declared one is refused by its length (413), a chunked one, of no known
# length, here (else it is read and dropped for as long as the call takes: minutes, on a
# long-poll route).
BODILESS_METHODS = frozenset({"GET", "HEAD"})
CHUNKED_WITHOUT_BODY = Refusal(400, "bad_request", "A GET or HEAD request cannot carry a chunked body.")
# Answered for a request that asks to switch protocols (Connection: upgrade with Upgrade, or
# CONNECT): the parser hands everything after its head to the other protocol, so the
# connection's framing ends there (protocol.GuestProtocol).
UPGRADE = Refusal(400, "bad_request", "Protocol upgrades and CONNECT are not supported.")
# The scope key under which GuestProtocol hands the app a Refusal for the request as a whole.
REFUSAL_KEY = "metadata_proxy.refusal"
# The methods a route forwards; any other gets 405 with this Allow. Not TRACE/TRACK (they
# echo the request, and so the Authorization header the proxy attached, back to the guest),
# not CONNECT, nor WebDAV/cache-control extensions (PROPFIND, PURGE, ...) that a control
# plane behind a framework might act on with the VM's token.
FORWARDED_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
ALLOW_FORWARDED = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"


def method_not_allowed(allowed: str) -> Refusal:
    return Refusal(405, "method_not_allowed", f"This endpoint accepts {allowed} only.", ((b"allow", allowed.encode()),))


def rate_limited(retry_after: int) -> Refusal:
    return Refusal(
        429, "rate_limited", "Too many requests from this VM; retry later.", ((b"retry-after", b"%d" % retry_after),)
    )


# -- 2. Host --------------------------------------------------------------------------------


def allowed_hosts(listen: Iterable[ListenAddress], aliases: Iterable[str]) -> frozenset[str]:
    """Every Host value accepted: each listen address with and without its port, each alias
    without a port or with a listen port (`http://metadata.internal:80/` sends the port)."""
    allowed: set[str] = set()
    ports = set()
    for entry in listen:
        bare = f"[{entry.host}]" if ":" in entry.host else entry.host
        allowed.update((bare, f"{bare}:{entry.port}"))
        ports.add(entry.port)
    for alias in aliases:
        allowed.add(alias.lower())
        allowed.update(f"{alias.lower()}:{port}" for port in ports)
    return frozenset(allowed)


def check_host(host: bytes | None, allowed: frozenset[str]) -> Refusal | None:
    """DNS-rebinding defence: the Host header must name the metadata service itself."""
    if host is None:
        return BAD_HOST
    text = host.decode("latin-1").lower()
    if text in allowed or _canonical_host(text) in allowed:
        return None
    return BAD_HOST


def _canonical_host(text: str) -> str | None:
    """ "[FD00:a9fe:0::254]:80" -> "[fd00:a9fe::254]:80"; None when not an IP literal."""
    if text.startswith("["):
        literal, closed, rest = text[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            return None
        port = rest[1:] if rest else None
    else:
        literal, colon, port_text = text.partition(":")
        port = port_text if colon else None
    try:
        addr = ipaddress.ip_address(literal)
    except ValueError:
        return None
    if addr.version == 6 and not text.startswith("["):
        return None
    bare = f"[{addr}]" if addr.version == 6 else str(addr)
    return bare if port is None else f"{bare}:{port}"


# -- 3 and 4. Headers -----------------------------------------------------------------------


def check_headers(headers: Headers, method: str = "") -> Refusal | None:
    """Forwarded-request signature, names with '_', total header size and request framing
    (of a request with `method`)."""
    size = 0
    lengths = 0
    chunked = False
    for name, value in headers:
        if name in FORWARDED_HEADERS:
            return FORWARDED
        if _UNDERSCORE in name:
            return UNDERSCORE_HEADER
        size += len(name) + len(value) + 4
        if name == b"content-length":
            lengths += 1
        elif name == b"transfer-encoding":
            chunked = True
    if size > MAX_HEADER_BYTES:
        return HEADERS_TOO_LARGE
    if lengths > 1 or (lengths and chunked):
        return BAD_FRAMING  # a request-smuggling shape; the server's parser may not catch all of them
    if chunked and method in BODILESS_METHODS:
        return CHUNKED_WITHOUT_BODY
    return None


# -- 4. Path --------------------------------------------------------------------------------


def check_path(raw_path: bytes) -> Refusal | None:
    """Refuse dot segments, encoded slashes, control characters and invalid UTF-8.

    Each is checked on the path as sent and after each round of percent-decoding, so
    ``%2e%2e``, ``%252e%252e`` and ``%2F`` cannot climb out of a route prefix.
    """
    if _PLAIN_PATH.fullmatch(raw_path):
        return None  # one C-speed scan; check_path_fully costs several µs a request (bench/)
    return check_path_fully(raw_path)


def check_path_fully(raw_path: bytes) -> Refusal | None:
    """check_path without its fast path, which must never disagree with this (tests/test_guards.py)."""
    current = raw_path
    for _ in range(_MAX_DECODES + 1):
        try:
            text = current.decode("utf-8")
        except UnicodeDecodeError:
            return BAD_PATH
        if not text.startswith("/") or _UNSAFE_CHARS.search(text):
            return BAD_PATH
        if _climbs(text):
            return BAD_PATH
        if "%" not in text:
            return None
        decoded = unquote_to_bytes(text)
        if decoded == current:
            return None  # a lone '%' that decodes to nothing else
        if decoded.count(b"/") != current.count(b"/"):
            return BAD_PATH  # an encoded slash
        current = decoded
    return BAD_PATH


def _climbs(text: str) -> bool:
    """Dot segments, also as an upstream may read them: with path parameters (`..;x`, which
    Tomcat-style servers treat as `..`), or as Unicode look-alikes that NFKC folds to dots,
    slashes or backslashes (`．．／`)."""
    if not text.isascii():
        folded = unicodedata.normalize("NFKC", text)
        if folded.count("/") != text.count("/") or "\\" in folded:
            return True
        text = folded
    return any(segment.split(";", 1)[0] in (".", "..") for segment in text.split("/"))


def match_route(raw_path: bytes, routes: Sequence[Route], *, fold: bool = False) -> Route | None:
    """The configured route with the longest prefix of `raw_path` (`fold`: compared in lower case).

    Two rules keep a narrower route's guards from being bypassed through a wider one
    (``/runtime/identity/`` with ``privileged_port`` inside ``/runtime/``): a narrower
    route's own name, its prefix without the trailing slash (``/runtime/identity``), is that
    route's and not the wider one's; and a path that falls under one route as sent and under
    another once percent-decoded, or without its path parameters and empty segments, or in
    another case, as the control plane may read it (``/runtime/%69dentity``,
    ``/runtime//identity/``, ``/runtime/identity;x``, ``/runtime/IDENTITY/``), is under none (404).
    """
    best: Route | None = None
    size = 0
    named: Route | None = None  # the route whose prefix is `raw_path` plus "/"
    # Another route a path could fold into (below): with one route, none.
    several = not fold and len(routes) > 1
    mixed_case = False  # a prefix with upper-case letters: a lower-case path may fold into it
    for route in routes:
        prefix = route.prefix.encode()
        if fold:
            prefix = prefix.lower()
        elif several and not mixed_case and not prefix.islower():
            mixed_case = prefix.lower() != prefix  # islower() is False too for a prefix with no letters
        if raw_path.startswith(prefix):
            if len(prefix) > size:
                best, size = route, len(prefix)
        elif len(prefix) == len(raw_path) + 1 and prefix.startswith(raw_path):
            named = route
    if best is None:
        return None  # a bare name no route covers stays unmatched ("/runtime" is not_found)
    if named is not None:
        return named
    # As a server that drops path parameters and empty segments reads it: the same route,
    # else under none (`/runtime//identity/`, `/runtime/identity;x` are the identity route's).
    if _SEMICOLON in raw_path or raw_path.find(b"//") >= 0:
        read = _EMPTY_SEGMENTS.sub(b"/", _PATH_PARAMETERS.sub(b"", raw_path))
        if match_route(read, routes, fold=fold) is not best:
            return None
    if _PERCENT in raw_path:
        # Each round of decoding must stay under the same route (check_path bounds the rounds).
        decoded = unquote_to_bytes(raw_path)
        if decoded != raw_path and match_route(decoded, routes, fold=fold) is not best:
            return None
    if several:
        # As a case-insensitive router reads it (Express's and ASP.NET Core's default): the
        # same route, else under none (`/runtime/IDENTITY/x` is the identity route's there).
        lowered = raw_path.lower()
        if (mixed_case or lowered != raw_path) and match_route(lowered, routes, fold=True) is not best:
            return None
    return best


# -- 5. Guards ------------------------------------------------------------------------------


def single_header(headers: Headers, wanted: bytes) -> bytes | None:
    """The value of header `wanted` if it appears exactly once, else None."""
    found: bytes | None = None
    for name, value in headers:
        if name == wanted:
            if found is not None:
                return None
            found = value
    return found


def check_metadata_header(headers: Headers) -> Refusal | None:
    value = single_header(headers, b"metadata")
    return None if value is not None and value.strip().lower() == b"true" else MISSING_METADATA


def parse_ttl(value: bytes | None) -> int | None:
    """X-Metadata-Token-TTL-Seconds: a plain integer 1..MAX_SESSION_TTL, else None."""
    if value is None or not value.isdigit() or len(value) > 6:
        return None
    ttl = int(value)
    return ttl if 1 <= ttl <= MAX_SESSION_TTL else None


def declared_length(headers: Headers) -> int | None:
    value = single_header(headers, b"content-length")
    return int(value) if value is not None and value.isdigit() else None
