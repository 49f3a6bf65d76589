"""A lean HTTP/1.1 client for the forwarding hot path: asyncio protocols plus httptools' parser.

Why a client of our own (README "Performance" has the numbers): the benchmark bar
is 0.15x haproxy on the same machine, about 4.4k requests/s through one process on two cores.
httpx's async client spends ~1.3 ms of CPU per request (~400 req/s) and aiohttp tops out
around 3k req/s; an ``asyncio.Protocol`` that writes each request with one ``transport.write``
and feeds the answer to ``httptools.HttpResponseParser`` (the llhttp parser uvicorn already
uses for the guest side) does roughly twice aiohttp. Everything else here is the minimum a
proxy needs: keep-alive pooling, timeouts, the retries README "Design choices" describes,
backpressure both ways, TLS. No cookies, no redirects, no environment proxies, no HTTP/2.

Errors (everything the client raises for an upstream failure)::

    UpstreamError
    ├── ConnectError        the connection could not be established: refused, DNS, unreachable
    ├── TLSError            TLS handshake or certificate verification failed (not retried)
    ├── UpstreamTimeout     connect, response head, a body read or a pool slot took > timeout
    ├── ConnectionLost      closed/reset before the response was complete (.reused, .response_started)
    └── ProtocolError       the response could not be parsed

A caller mistake (a header value with CR/LF, a body longer or shorter than the declared
Content-Length) raises ``ValueError`` instead: it is a bug to fix, not an upstream failure.

Design:

- One ``_Connection`` (the protocol) per TCP connection, serving one exchange at a time. The
  parser calls back into it; it fills the current ``Response`` and wakes the one coroutine
  waiting on it through a single future; one timer per connection, re-armed only when it
  fires (deadline.Deadline), keeps each wait's timeout. No tasks, no streams, no per-request allocation beyond
  the response and that future.
- The pool is a LIFO list of idle connections plus a count of slots (open or opening
  connections, at most ``max_connections``). A request that finds no slot waits in a FIFO;
  a released connection, or the slot of a closed one, is handed straight to the first
  waiter, so nobody starves. An idle connection that the server closes is dropped at once
  (``connection_lost``); bytes arriving on an idle connection also close it.
- Retries (README "Design choices", Upstream): a failed connect is retried with exponential backoff and full
  jitter until ``retry_budget`` is spent; a kept-alive connection that closed before any
  response byte (the server's idle timeout racing our request) is retried at once on a
  fresh connection, when the body can be sent again. A timeout is never retried, nor
  anything after a response byte arrived.
- Backpressure: a streamed request body awaits the transport's ``resume_writing``; received
  body bytes that the consumer has not taken pause the transport's reading above
  ``_READ_HIGH_WATER``, so a response of any size streams in bounded memory.
"""

from __future__ import annotations

import asyncio
import random
import socket
import ssl
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any, cast
from urllib.parse import urlsplit

import httptools

from .deadline import Deadline

__all__ = [
    "ConnectError",
    "ConnectionLost",
    "ProtocolError",
    "Response",
    "TLSError",
    "Upstream",
    "UpstreamError",
    "UpstreamTimeout",
]

# Received body bytes the consumer has not taken yet; above this the socket stops being read.
_READ_HIGH_WATER = 256 * 1024
# A response head (status line, headers, 1xx included) larger than this is refused.
_MAX_HEAD = 64 * 1024
# A bytes body up to this size goes out in the same write (one syscall, one segment) as the head.
_COALESCE_BODY = 64 * 1024
# Connect retries: full jitter over min(cap, base * 2**attempt) (the AWS architecture blog's "Full Jitter").
_BACKOFF_BASE = 0.05
_BACKOFF_CAP = 1.0

_METHOD_PREFIXES = {m: m.encode("ascii") + b" " for m in ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")}
_TOKEN_CHARS = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")
# An int: `b" " in target` makes CPython try the bytes as an integer first (a TypeError
# raised and cleared on every request).
_SPACE = ord(" ")


class UpstreamError(Exception):
    """Base class: the upstream call failed."""


class ConnectError(UpstreamError):
    """The connection could not be established (refused, DNS failure, unreachable)."""


class TLSError(UpstreamError):
    """The TLS handshake or the certificate verification failed."""


class UpstreamTimeout(UpstreamError):
    """No (complete) answer within the timeout."""


class ConnectionLost(UpstreamError):
    """The connection closed or was reset before the response was complete."""

    def __init__(self, message: str, *, reused: bool, response_started: bool) -> None:
        super().__init__(message)
        self.reused = reused
        self.response_started = response_started


class ProtocolError(UpstreamError):
    """The upstream's response could not be parsed."""


class _StopAfterHead(Exception):
    """Raised from the parser's headers callback to stop it after a HEAD response.

    httptools gives a callback no way to tell llhttp "this response has no body" (llhttp's
    return value 1), so for HEAD we stop the parser there and replace it with a fresh one.
    """


def _expire(fut: asyncio.Future[Any], timeout: float, what: str) -> None:
    if not fut.done():
        fut.set_exception(UpstreamTimeout(f"{what} within {timeout:g}s"))


def _delimited_by_eof(headers: list[tuple[bytes, bytes]]) -> bool:
    """True when a response body runs until the connection closes (RFC 9112 section 6.3, rule 8)."""
    for name, value in headers:
        lname = name.lower()
        if lname == b"content-length":
            return False
        if lname == b"transfer-encoding" and value.rstrip().lower().endswith(b"chunked"):
            return False
    return True


def _declares_body(headers: list[tuple[bytes, bytes]]) -> bool:
    """True when a head announces a body: a Content-Length other than 0, or a Transfer-Encoding."""
    for name, value in headers:
        lname = name.lower()
        if (lname == b"content-length" and value.strip() != b"0") or lname == b"transfer-encoding":
            return True
    return False


def _head_keep_alive(http_version: str, headers: list[tuple[bytes, bytes]]) -> bool:
    """Keep-alive for a HEAD response, which llhttp judges as if a body followed."""
    tokens: set[bytes] = set()
    for name, value in headers:
        if name.lower() == b"connection":
            tokens.update(t.strip().lower() for t in value.split(b","))
    if b"close" in tokens:
        return False
    return http_version == "1.1" or b"keep-alive" in tokens


class Response:
    """The head of an upstream response; the body streams through `iter_body` or `read`.

    `aclose` must always be called: it returns the connection to the pool when the response
    was received completely and keep-alive holds, and closes it otherwise.
    """

    __slots__ = (
        "status",
        "reason",
        "headers",
        "http_version",
        "_conn",
        "_chunks",
        "_buffered",
        "_started",
        "_head_done",
        "_complete",
        "_head_bytes",
    )

    def __init__(self, conn: _Connection) -> None:
        self.status = 0
        self.reason = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.http_version = "1.1"
        self._conn: _Connection | None = conn
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._started = False  # any byte of the answer arrived
        self._head_done = False  # the final (non-1xx) head arrived
        self._complete = False  # the whole message arrived
        self._head_bytes = 0

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.reason.decode('latin-1')!r}>"

    def _take(self, conn: _Connection) -> bytes:
        chunks = self._chunks
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self._buffered = 0
        if conn._read_paused:
            conn._read_paused = False
            conn._transport.resume_reading()
        return data

    async def iter_body(self) -> AsyncIterator[bytes]:
        """Yield the body as it arrives, de-chunked; nothing for HEAD, 1xx, 204 and 304."""
        while (conn := self._conn) is not None:  # None once released: a late reader gets nothing
            if self._chunks:
                yield self._take(conn)
            elif self._complete:
                self._release()
                return
            elif conn._error is not None:
                raise conn._error
            else:
                await conn._wait("no response body data")

    async def read(self) -> bytes:
        """The whole body (meant for small answers; large ones should use `iter_body`)."""
        conn = self._conn
        if conn is None:
            return b""
        parts: list[bytes] = []
        while True:
            if self._chunks:
                parts.append(self._take(conn))
            if self._complete:
                break
            if conn._error is not None:
                raise conn._error
            await conn._wait("no response body data")
        self._release()
        if not parts:
            return b""
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def _release(self) -> None:
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn._finish(self._complete)

    async def aclose(self) -> None:
        """Give the connection back (complete response, keep-alive) or close it. Idempotent."""
        self._release()


class _Connection(asyncio.Protocol):
    """One upstream connection: the asyncio protocol and the parser's callback target."""

    __slots__ = (
        "_pool",
        "_loop",
        "_timeout",
        "_transport",
        "_parser",
        "_resp",
        "_waiter",
        "_waiting_for",
        "_deadline",
        "_error",
        "_exchanges",
        "_keep_alive",
        "_reusable",
        "_head_only",
        "_interim",
        "_stopped",
        "_read_paused",
        "_write_paused",
        "_body_consumed",
        "_lost",
        "_counted",
        "_closed",
    )

    def __init__(self, pool: Upstream, loop: asyncio.AbstractEventLoop) -> None:
        self._pool = pool
        self._loop = loop
        self._timeout = pool._timeout
        self._transport: asyncio.Transport = cast(asyncio.Transport, None)  # set in connection_made
        # Made with the first answer's first byte: a held long-poll's fresh connection waits
        # minutes for it, and a parser is not small (bench/held_memory.py).
        self._parser: httptools.HttpResponseParser | None = None
        self._resp: Response | None = None  # the exchange in progress
        self._waiter: asyncio.Future[None] | None = None
        self._waiting_for = ""  # what the wait in progress expects, for the timeout's message
        self._deadline = Deadline(loop, self._timed_out)  # the wait in progress's
        self._error: UpstreamError | None = None  # why the exchange in progress failed
        self._exchanges = 0
        self._keep_alive = False
        self._reusable = True  # False once the request was not sent completely
        self._head_only = False
        self._interim = False
        self._stopped = False
        self._read_paused = False
        self._write_paused = False
        self._body_consumed = False
        self._lost = False
        self._counted = False  # holds one of the pool's slots: from a successful connect to connection_lost
        self._closed: asyncio.Future[None] | None = None  # made when aclose waits for it (_when_closed)

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        resp = self._resp
        if resp is None:
            # An answer nobody asked for: the server is confused or closing; never reuse this.
            self._transport.close()
            return
        resp._started = True
        parser = self._parser
        if parser is None:
            parser = self._parser = httptools.HttpResponseParser(self)
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._parse_failed(resp, exc)
            return
        if not resp._head_done:
            # llhttp itself has no limit on the size of a head; this keeps a broken upstream
            # from growing one without end.
            resp._head_bytes += len(data)
            if resp._head_bytes > _MAX_HEAD:
                self._fail(ProtocolError(f"response head larger than {_MAX_HEAD // 1024} KiB"))
                self._transport.abort()

    def eof_received(self) -> bool | None:
        return None  # let the transport close; connection_lost decides what the EOF meant

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._deadline.cancel()
        resp = self._resp
        if resp is not None and not resp._complete:
            if exc is None and resp._head_done and _delimited_by_eof(resp.headers):
                resp._complete = True
                self._keep_alive = False
                self._wake()
            elif isinstance(exc, ssl.SSLError):
                self._fail(TLSError(f"TLS error from upstream: {exc.reason or exc}"))
            else:
                why = f": {exc}" if exc is not None else ""
                if self._exchanges == 1 and not resp._started and self._pool._ssl is not None:
                    # What a TLS 1.3 server that rejects our client certificate looks like when
                    # it does not send its alert (asyncio-based servers, for one).
                    why += " (right after the TLS handshake: was the client certificate refused?)"
                self._fail(
                    ConnectionLost(
                        f"upstream closed the connection before the response was complete{why}",
                        reused=self._exchanges > 1,
                        response_started=resp._started,
                    )
                )
        else:
            self._wake()
        self._pool._connection_lost(self)
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._wake()

    # -- httptools callbacks ------------------------------------------------------------

    def on_message_begin(self) -> None:
        resp = self._resp
        if resp is None or resp._complete:
            raise ProtocolError("upstream sent more than one response")
        resp.reason = b""
        if resp.headers:  # the previous message was a 1xx
            resp.headers = []

    def on_status(self, status: bytes) -> None:
        # llhttp hands the reason phrase over in pieces when it spans two reads.
        resp = self._resp
        assert resp is not None  # data_received feeds the parser only during an exchange
        resp.reason += status

    def on_header(self, name: bytes, value: bytes) -> None:
        resp = self._resp
        assert resp is not None
        if resp._head_done:
            return  # a trailer field (llhttp calls on_header for those too): never a header, dropped
        resp.headers.append((name, value))

    def on_headers_complete(self) -> None:
        resp = self._resp
        assert resp is not None
        parser = self._parser
        assert parser is not None  # it calls us
        status = parser.get_status_code()
        if status < 200:
            if status == 101:
                raise ProtocolError("unexpected 101 Switching Protocols")
            self._interim = True  # 100 Continue, 103 Early Hints: skipped, a final answer follows
            return
        resp.status = status
        resp.http_version = parser.get_http_version()
        resp._head_done = True
        if (self._head_only or status in (204, 304)) and _declares_body(resp.headers):
            # An answer that has no body but announces one: a server that sends that body
            # anyway would have it read as the next exchange's answer, another VM's request
            # failing (502) at random. Never pooled.
            self._reusable = False
        if self._head_only:
            resp._complete = True
            self._keep_alive = _head_keep_alive(resp.http_version, resp.headers)
            self._stopped = True
            self._wake()
            raise _StopAfterHead
        self._keep_alive = parser.should_keep_alive()
        self._wake()

    def on_body(self, body: bytes) -> None:
        resp = self._resp
        assert resp is not None
        resp._chunks.append(body)
        resp._buffered += len(body)
        if resp._buffered > _READ_HIGH_WATER and not self._read_paused:
            self._read_paused = True
            self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._interim:
            self._interim = False
            return
        resp = self._resp
        assert resp is not None
        resp._complete = True
        self._wake()

    # -- the exchange -------------------------------------------------------------------

    def _parse_failed(self, resp: Response, exc: Exception) -> None:
        if self._stopped:
            self._stopped = False
            self._parser = httptools.HttpResponseParser(self)
            return
        self._keep_alive = False
        if resp._complete:
            return  # bytes after a complete response: keep the response, drop the connection
        cause = exc.__context__ if isinstance(exc.__context__, ProtocolError) else exc
        self._fail(ProtocolError(f"unparseable response from upstream: {cause}"))
        self._transport.abort()

    def _fail(self, error: UpstreamError) -> None:
        if self._error is None:
            self._error = error
        self._wake()

    def _wake(self) -> None:
        fut = self._waiter
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _wait(self, what: str) -> asyncio.Future[None]:
        """A future for the next event on this connection, failed with UpstreamTimeout if
        none comes within the timeout.

        Not a coroutine but the future itself, awaited by the caller: one frame less for
        every resumption to pass through. The timeout is the connection's one lazy timer
        (deadline.Deadline), not a call_later and a cancel on every wait (µs a request, bench/).
        """
        fut = self._loop.create_future()
        self._waiter = fut
        self._waiting_for = what
        self._deadline.at(self._loop.time() + self._timeout)
        return fut

    def _set_timeout(self, timeout: float) -> None:
        """Each wait's limit from now on (Deadline re-arms at once for an earlier deadline)."""
        self._timeout = timeout

    def _timed_out(self) -> None:
        fut = self._waiter
        if fut is not None and not fut.done():
            _expire(fut, self._timeout, self._waiting_for)

    async def _exchange(
        self, head: bytes, body: bytes | AsyncIterable[bytes] | None, content_length: int | None, head_only: bool
    ) -> Response:
        """Send one request and return once the final response head has arrived."""
        resp = Response(self)
        self._resp = resp
        self._error = None
        self._head_only = head_only
        self._body_consumed = False
        self._exchanges += 1
        if self._lost:
            # Closed between the connect and now (a server that accepts and drops at once).
            raise ConnectionLost("upstream closed the connection at once", reused=False, response_started=False)
        if body is None or isinstance(body, bytes):
            self._transport.write(head)
            if body:
                self._transport.write(body)
        else:
            await self._send_stream(resp, head, body, content_length)
        while not resp._head_done:
            if self._error is not None:
                raise self._error
            await self._wait("no response from upstream")
        return resp

    async def _send_stream(
        self, resp: Response, head: bytes, body: AsyncIterable[bytes], content_length: int | None
    ) -> None:
        transport = self._transport
        chunked = content_length is None
        sent = 0
        pending: bytes | None = head  # the head rides with the first chunk
        self._body_consumed = True
        async for chunk in body:
            if not chunk:
                continue  # an empty chunk would end a chunked body
            if self._lost or resp._head_done or self._error is not None:
                # The server answered (or went away) before taking the whole body: stop sending,
                # and since the request is cut short this connection cannot carry another one.
                self._reusable = False
                return
            sent += len(chunk)
            if chunked:
                data = b"%x\r\n%b\r\n" % (len(chunk), chunk)
            elif sent > cast(int, content_length):
                self._reusable = False
                raise ValueError(f"request body longer than its Content-Length {content_length}")
            else:
                data = chunk
            if pending is not None:
                data = pending + data
                pending = None
            transport.write(data)
            while self._write_paused and not self._lost and not resp._head_done:
                await self._wait("upstream did not read the request body")
        if not chunked and sent != content_length:
            self._reusable = False
            raise ValueError(f"request body of {sent} bytes, shorter than its Content-Length {content_length}")
        tail = b"0\r\n\r\n" if chunked else b""
        if pending is not None:
            tail = pending + tail
        if tail and not self._lost:
            transport.write(tail)

    def _finish(self, complete: bool) -> None:
        """The response is done with: pool the connection if it is clean, else close it."""
        self._resp = None
        if complete and self._keep_alive and self._reusable and not self._lost:
            if self._read_paused:
                # An idle connection must be read, or the server closing it would go unnoticed.
                self._read_paused = False
                self._transport.resume_reading()
            self._pool._release(self)
        elif complete:
            self._transport.close()
        else:
            self._transport.abort()  # mid-response: no point in a graceful (TLS) shutdown

    def close(self) -> None:
        self._transport.close()

    def _when_closed(self) -> asyncio.Future[None]:
        """Done once the connection is closed; made on demand (only `Upstream.aclose` waits)."""
        if self._closed is None:
            self._closed = self._loop.create_future()
            if self._lost:
                self._closed.set_result(None)
        return self._closed


class Upstream:
    """A keep-alive HTTP/1.1 client for one origin (`url`), used by many concurrent requests."""

    def __init__(
        self,
        url: str,
        *,
        timeout: float,
        retry_budget: float,
        ssl_context: ssl.SSLContext | None = None,
        max_connections: int = 256,
        max_idle: int = 64,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"upstream url must be http://host[:port] or https://host[:port], not {url!r}")
        if parts.username is not None or parts.password is not None:
            raise ValueError("upstream url must not carry credentials")
        if timeout <= 0 or retry_budget < 0 or max_connections < 1 or max_idle < 0:
            raise ValueError("timeout must be > 0, retry_budget >= 0, max_connections >= 1, max_idle >= 0")
        tls = parts.scheme == "https"
        if ssl_context is not None and not tls:
            raise ValueError(f"an ssl_context was given for a plain http:// url {url!r}")
        default_port = 443 if tls else 80
        self._host = parts.hostname
        self._port = parts.port or default_port
        self._ssl: ssl.SSLContext | None = (ssl_context or ssl.create_default_context()) if tls else None
        self._origin = f"{parts.scheme}://{parts.netloc}"
        host = f"[{self._host}]" if ":" in self._host else self._host
        if self._port != default_port:
            host = f"{host}:{self._port}"
        # Everything from the target's end to the first caller header, encoded once.
        host_bytes = host.encode("ascii") if host.isascii() else host.encode("idna")
        self._after_target = b" HTTP/1.1\r\nHost: " + host_bytes + b"\r\n"
        self._timeout = float(timeout)
        self._retry_budget = float(retry_budget)
        self._max_connections = max_connections
        self._max_idle = max_idle
        self._idle: list[_Connection] = []  # LIFO: the most recently used is the warmest
        self._conns: set[_Connection] = set()  # every established connection not yet lost
        self._slots = 0  # connections open or being opened
        self._waiters: deque[asyncio.Future[_Connection | None]] = deque()
        self._created = 0
        self._closing = False

    def __repr__(self) -> str:
        return f"<Upstream {self._origin} open={len(self._conns)} idle={len(self._idle)}>"

    @property
    def connections_open(self) -> int:
        return len(self._conns)

    @property
    def connections_idle(self) -> int:
        return len(self._idle)

    @property
    def connections_created(self) -> int:
        return self._created

    def _encode_head(
        self,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes | AsyncIterable[bytes] | None,
        content_length: int | None,
    ) -> bytes:
        prefix = _METHOD_PREFIXES.get(method)
        if prefix is None:
            raw = method.encode("ascii", "replace")
            if not raw or not _TOKEN_CHARS.issuperset(raw):
                raise ValueError(f"invalid HTTP method {method!r}")
            prefix = raw + b" "
        if content_length is not None and content_length < 0:
            raise ValueError(f"negative content_length {content_length}")
        if not target or _SPACE in target:
            raise ValueError(f"invalid request target {target!r}")
        parts = [prefix, target, self._after_target]
        for name, value in headers:
            parts.append(name)
            parts.append(b": ")
            parts.append(value)
            parts.append(b"\r\n")
        lines = len(headers) + 3  # request line, Host, headers, the blank line
        if isinstance(body, bytes):
            if content_length is not None and content_length != len(body):
                raise ValueError(f"content_length {content_length} but a body of {len(body)} bytes")
            parts.append(b"Content-Length: %d\r\n" % len(body))
            lines += 1
        elif content_length is not None:
            parts.append(b"Content-Length: %d\r\n" % content_length)
            lines += 1
        elif body is not None:
            parts.append(b"Transfer-Encoding: chunked\r\n")
            lines += 1
        parts.append(b"\r\n")
        head = b"".join(parts)
        # One C-speed pass instead of a check per header: a CR or LF inside a name, a value or
        # the target would add to the count and let a caller's bytes split the request.
        if head.count(b"\n") != lines or head.count(b"\r") != lines:
            raise ValueError("CR or LF inside the request target or a header")
        return head

    async def request(
        self,
        method: str,
        target: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes | AsyncIterable[bytes] | None = None,
        *,
        content_length: int | None = None,
        timeout: float | None = None,
    ) -> Response:
        """Send `METHOD target HTTP/1.1` with `headers` (plus Host and framing); return at the response head.

        `timeout`: the limit for each wait of this exchange (the response head, each body
        read), when it differs from the client's (a route's own, e.g. for long-polls);
        connecting and waiting for a pool slot keep the client's.

        Retries follow README "Design choices": connect failures with backoff inside `retry_budget`; a
        kept-alive connection closed before any response byte once, at once, on a fresh
        connection (bytes bodies, or a streamed one not yet consumed). Nothing else: a fresh
        connection lost may have reached the server.
        """
        head = self._encode_head(method, target, headers, body, content_length)
        del headers  # in `head` now: a long-poll, held for minutes, keeps one copy, not two
        if isinstance(body, bytes) and len(body) <= _COALESCE_BODY:
            head += body
            body = None
        head_only = method == "HEAD"
        # A pooled connection's loop is the running one; asyncio.get_running_loop() costs a
        # getpid() system call on Python 3.11.
        loop = self._idle[-1]._loop if self._idle else asyncio.get_running_loop()
        deadline = loop.time() + self._retry_budget
        attempt = 0
        fresh = False
        while True:
            if self._closing:
                raise ConnectError("the upstream client is closed")
            idle = self._idle
            if idle and not fresh:
                conn = idle.pop()
            else:
                try:
                    conn = await self._acquire(loop, fresh)
                except ConnectError:
                    attempt += 1
                    if not await self._backoff(loop, attempt, deadline):
                        raise
                    continue
            conn._set_timeout(self._timeout if timeout is None else timeout)
            try:
                return await conn._exchange(head, body, content_length, head_only)
            except ConnectionLost as exc:
                conn._transport.abort()
                if exc.response_started or (conn._body_consumed and body is not None):
                    raise
                if exc.reused and not fresh:
                    fresh = True  # the keep-alive race: the server closed it as we sent
                    continue
                raise
            except BaseException:
                conn._resp = None
                conn._transport.abort()
                raise

    async def _backoff(self, loop: asyncio.AbstractEventLoop, attempt: int, deadline: float) -> bool:
        """Sleep before the next attempt; False when the retry budget is spent."""
        remaining = deadline - loop.time()
        if remaining <= 0 or self._closing:
            return False
        await asyncio.sleep(min(remaining, random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2**attempt))))
        return True

    async def _acquire(self, loop: asyncio.AbstractEventLoop, fresh: bool) -> _Connection:
        """A pooled connection, or a new one when `fresh` or none is idle (waiting for a free slot)."""
        wait_until = loop.time() + self._timeout
        while True:
            if self._idle and not fresh:
                return self._idle.pop()
            if self._slots < self._max_connections:
                self._slots += 1
                break
            if self._idle:
                self._evict(self._idle.pop(0))  # take the slot of the least recently used
                break
            got = await self._wait_for_slot(loop, wait_until)
            if got is None:
                break  # the slot of a closed connection, handed over
            if got._lost:
                continue  # died on the way to us; its slot went to someone else
            if not fresh:
                return got
            self._evict(got)
            break
        try:
            return await self._connect(loop)
        except BaseException:
            self._release_slot()
            raise

    async def _wait_for_slot(self, loop: asyncio.AbstractEventLoop, wait_until: float) -> _Connection | None:
        fut: asyncio.Future[_Connection | None] = loop.create_future()
        self._waiters.append(fut)
        timer = loop.call_at(wait_until, _expire, fut, self._timeout, "no free upstream connection")
        try:
            return await fut
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                # Handed a connection or a slot just as we gave up: pass it on.
                got = fut.result()
                if got is None:
                    self._release_slot()
                elif not got._lost:
                    self._release(got)
            raise
        finally:
            timer.cancel()

    def _evict(self, conn: _Connection) -> None:
        """Close `conn` and keep its slot for the caller."""
        conn._counted = False
        conn.close()

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        conn = _Connection(self, loop)  # until connected, the slot is the caller's to release
        try:
            async with asyncio.timeout(self._timeout):
                await loop.create_connection(
                    lambda: conn,
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                )
        except TimeoutError:
            raise UpstreamTimeout(f"connecting to {self._origin} took more than {self._timeout:g}s") from None
        except ssl.SSLCertVerificationError as exc:
            raise TLSError(f"certificate verification failed for {self._origin}: {exc.verify_message}") from exc
        except ssl.SSLError as exc:
            raise TLSError(f"TLS handshake with {self._origin} failed: {exc.reason or exc}") from exc
        except socket.gaierror as exc:
            raise ConnectError(f"cannot resolve {self._host}: {exc.strerror}") from exc
        except OSError as exc:
            raise ConnectError(f"cannot connect to {self._origin}: {exc.strerror or exc}") from exc
        self._created += 1
        conn._counted = True
        if conn._lost:
            # Closed before create_connection returned (connection_lost already ran): give the
            # slot back; the request sees the loss as a fresh connection's.
            self._connection_lost(conn)
            return conn
        self._conns.add(conn)
        return conn

    def _release(self, conn: _Connection) -> None:
        """A clean, kept-alive connection is free again: to the first waiter, else the idle list."""
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return
        if self._closing or len(self._idle) >= self._max_idle:
            conn.close()
        else:
            self._idle.append(conn)

    def _release_slot(self) -> None:
        waiters = self._waiters
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self._slots -= 1

    def _connection_lost(self, conn: _Connection) -> None:
        self._conns.discard(conn)
        try:
            self._idle.remove(conn)
        except ValueError:
            pass
        if conn._counted:
            conn._counted = False
            self._release_slot()

    async def aclose(self) -> None:
        """Close every connection (in-flight exchanges included) and refuse further requests."""
        self._closing = True
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_exception(ConnectError("the upstream client is closed"))
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        for conn in list(self._conns):
            if conn._resp is not None:
                conn._transport.abort()
        pending = [conn._when_closed() for conn in self._conns]
        if pending:
            # TLS close waits for the server's close_notify; do not let a silent server hold us.
            _, late = await asyncio.wait(pending, timeout=1.0)
            if late:
                for conn in list(self._conns):
                    conn._transport.abort()
                await asyncio.wait(late, timeout=1.0)
