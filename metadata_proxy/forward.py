"""Forwarding a guest request upstream: the header policy both ways, the request body,
and the one table that maps upstream failures to what the guest is told.

Where the runtime token gets attached: `upstream_headers()`, nowhere else.
"""

from __future__ import annotations

import asyncio
import resource
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

from . import upstream
from .config import ControlPlane
from .guards import Refusal

Headers = Sequence[tuple[bytes, bytes]]
Receive = Callable[[], Awaitable[Mapping[str, Any]]]

HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
# Never sent upstream: ours to set (host, authorization, the framing, x-request-id, the
# proxy's identity headers: a guest's own copy would come first, and most frameworks read
# the first), the guest's own credentials (cookie), the proxy's session headers, and what
# frameworks behind a proxy trust to rewrite a request after our checks: the method
# (X-HTTP-Method-Override and kin: the method policy), the path (X-Original-URL,
# X-Rewrite-URL: the path checks and route guards) and, by the prefixes below, the
# X-Forwarded-Host/Proto/Port/Prefix family (URLs built for another origin). And the
# client-address headers beside the three the checks refuse: frameworks take the client's
# address from them when the one in X-Forwarded-For is a private (trusted-proxy) address,
# as a VM's is (Rails' remote_ip reads Client-IP; CDN-aware stacks True-Client-IP,
# CF-Connecting-IP, ...): the guest would name the address the control plane sees.
_CLIENT_ADDRESS = frozenset(
    {
        b"client-ip",
        b"true-client-ip",
        b"x-client-ip",
        b"x-cluster-client-ip",
        b"cf-connecting-ip",
        b"fastly-client-ip",
        b"x-original-forwarded-for",
        b"x-originating-ip",
        b"x-remote-ip",
        b"x-remote-addr",
        b"x-forwarded",
        b"forwarded-for",
        b"wl-proxy-client-ip",  # WebLogic's; Proxy-Client-IP goes with every Proxy-*
        b"cf-connecting-ipv6",
        b"cf-pseudo-ipv4",
        b"do-connecting-ip",
        b"x-appengine-user-ip",
        b"x-azure-clientip",
        b"x-azure-socketip",
        b"x-envoy-external-address",
        b"incap-client-ip",
        b"x-proxyuser-ip",
        b"x-appengine-remote-addr",
        b"fly-client-ip",
        b"x-arr-clientip",
        b"x-sucuri-clientip",
        b"cloudfront-viewer-address",
        b"x-vercel-forwarded-for",
        b"x-nf-client-connection-ip",
    }
)
_REQUEST_DROP = (
    HOP_BY_HOP
    | _CLIENT_ADDRESS
    | {
        b"x-http-method-override",
        b"x-http-method",
        b"x-method-override",
        b"x-original-url",
        b"x-rewrite-url",
        b"host",
        b"authorization",
        b"cookie",
        b"content-length",
        b"expect",
        b"x-request-id",
        b"x-metadata-proxy-host",
        b"x-metadata-token",
        b"x-metadata-token-ttl-seconds",
    }
)
_REQUEST_DROP_PREFIXES = (b"proxy-", b"x-forwarded-")
# `date` too: uvicorn (date_header, on by default) writes its own on every answer, and a
# second Date would make the one field that must be single ambiguous.
_RESPONSE_DROP = HOP_BY_HOP | {b"set-cookie", b"x-request-id", b"date"}

# Upstream failure -> what the guest gets. A subclass maps like its base unless listed.
UPSTREAM_FAILURES: dict[type[upstream.UpstreamError], Refusal] = {
    upstream.TLSError: Refusal(502, "upstream_tls_error", "TLS to the control plane failed."),
    upstream.UpstreamTimeout: Refusal(504, "upstream_timeout", "The control plane did not answer in time."),
    upstream.ConnectError: Refusal(502, "upstream_unavailable", "The control plane could not be reached."),
    upstream.ConnectionLost: Refusal(502, "upstream_unavailable", "The control plane closed the connection."),
    upstream.ProtocolError: Refusal(502, "upstream_unavailable", "The control plane sent an invalid answer."),
    upstream.UpstreamError: Refusal(502, "upstream_unavailable", "The control plane could not be reached."),
}


def refusal_for(exc: upstream.UpstreamError) -> Refusal:
    for kind in type(exc).__mro__:
        refusal = UPSTREAM_FAILURES.get(kind)
        if refusal is not None:
            return refusal
    return UPSTREAM_FAILURES[upstream.UpstreamError]


def _connection_tokens(value: bytes, named: set[bytes]) -> set[bytes]:
    """`named` plus the header names a `Connection` header's value marks as hop-by-hop."""
    named.update(token.strip().lower() for token in value.split(b","))
    return named


def _without(headers: list[tuple[bytes, bytes]], named: set[bytes]) -> list[tuple[bytes, bytes]]:
    return [(name, value) for name, value in headers if name not in named] if named else headers


def upstream_headers(
    guest: Headers, *, token: str, peer: str, host_id: str, request_id: str
) -> list[tuple[bytes, bytes]]:
    """The headers sent to the control plane: the guest's, filtered, plus ours."""
    headers = []
    named: set[bytes] = set()  # what the guest's Connection header names: hop-by-hop too
    for name, value in guest:  # names as uvicorn hands them over: lower case
        if name in _REQUEST_DROP or name.startswith(_REQUEST_DROP_PREFIXES):
            if name == b"connection":
                _connection_tokens(value, named)
        else:
            headers.append((name, value))
    headers = _without(headers, named - _REQUEST_DROP)  # a name dropped above needs no second pass
    headers += [
        (b"authorization", b"Bearer " + token.encode("ascii")),
        (b"x-forwarded-for", peer.encode("ascii")),
        (b"x-metadata-proxy-host", host_id.encode()),
        (b"x-request-id", request_id.encode("ascii")),
    ]
    return headers


def response_headers(received: Headers, request_id: bytes) -> list[tuple[bytes, bytes]]:
    """The headers returned to the guest: upstream's, filtered, plus X-Request-Id."""
    headers = []
    named: set[bytes] = set()  # what upstream's Connection header names: hop-by-hop too
    for name, value in received:
        lower = name.lower()
        if lower in _RESPONSE_DROP:
            if lower == b"connection":
                _connection_tokens(value, named)
        else:
            headers.append((lower, value))
    # A name dropped above already (`Connection: keep-alive`, the usual one) needs no second pass.
    headers = _without(headers, named - _RESPONSE_DROP)
    headers.append((b"x-request-id", request_id))
    return headers


class BodyTooLarge(Exception):
    """The guest's body went past max_body_bytes while it was being read."""


class BodyTimeout(Exception):
    """The guest's body stalled for longer than BODY_IDLE_SECONDS."""


# A guest body that pauses longer than this between two reads is cut off (408): a stalled
# upload must not hold a request slot or, once streaming, an upstream connection (a pool
# every VM shares) for ever. Guests sit on the proxy's own host.
BODY_IDLE_SECONDS = 10.0


class GuestDisconnected(Exception):
    """The guest went away while its body was being read."""


class RequestBody:
    """Reads the guest's body from ASGI `receive`, counting it against a limit.

    `prefetch()` buffers up to a small bound so that most bodies are sent upstream as one
    `bytes` (retryable, one write) and an oversized chunked body is refused before the
    control plane sees anything; larger bodies stream through `chunks()`.
    """

    PREFETCH = 1024 * 1024

    def __init__(self, receive: Receive, limit: int) -> None:
        self._receive = receive
        self._limit = limit
        self._buffer: list[bytes] = []
        self.received = 0
        self.complete = False

    async def _next(self) -> bytes:
        try:
            async with asyncio.timeout(BODY_IDLE_SECONDS):
                message = await self._receive()
        except TimeoutError:
            raise BodyTimeout from None
        if message["type"] == "http.disconnect":
            raise GuestDisconnected
        chunk: bytes = message.get("body", b"")
        self.received += len(chunk)
        if self.received > self._limit:
            raise BodyTooLarge
        if not message.get("more_body", False):
            self.complete = True
        return chunk

    async def prefetch(self) -> bytes | None:
        """The whole body if it fits in the prefetch bound, else None (use chunks())."""
        while not self.complete and self.received <= self.PREFETCH:
            self._buffer.append(await self._next())
        if self.complete:
            body = b"".join(self._buffer)
            self._buffer.clear()
            return body
        return None

    async def chunks(self) -> AsyncIterator[bytes]:
        for chunk in self._buffer:
            yield chunk
        self._buffer.clear()
        while not self.complete:
            chunk = await self._next()
            if chunk:
                yield chunk


# Upstream connections at most. HTTP/1.1 holds one connection per request in flight, and a
# long-poll is in flight for minutes: thousands of guests waiting need thousands of upstream
# connections. Bounded by half the process's file descriptors (the other half serves
# guests), and by this, so that a flood still cannot take the control plane's sockets.
MAX_UPSTREAM_CONNECTIONS = 16384
MIN_UPSTREAM_CONNECTIONS = 256


def upstream_connections() -> int:
    """The upstream pool's size: half the open-file limit, within the bounds above."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_UPSTREAM_CONNECTIONS
    return max(MIN_UPSTREAM_CONNECTIONS, min(MAX_UPSTREAM_CONNECTIONS, soft // 2))


def build_client(config: ControlPlane) -> upstream.Upstream:
    """The long-lived upstream client for `config`: TLS always verified, optional mTLS."""
    context: ssl.SSLContext | None = None
    if config.url.startswith("https://"):
        context = ssl.create_default_context(cafile=config.ca_file or None)
        if config.client_cert:
            context.load_cert_chain(config.client_cert, config.client_key)
    return upstream.Upstream(
        config.url,
        timeout=config.timeout,
        retry_budget=config.retry_budget,
        ssl_context=context,
        max_connections=upstream_connections(),
    )
