"""The guest side's HTTP protocol: uvicorn's httptools protocol plus what an endpoint that
faces untrusted guests needs and uvicorn does not do: a deadline and a size cap for each
request head (slowloris), a cap on open connections per peer address, JSON refusals for
requests the parser rejected (before the app could forward them), and the VM that held
each connection's peer address when it was accepted (app.ConnectionOwner): every request
on the connection must come from that VM, and removing it closes only its own connections.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, cast

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from . import guards
from .app import OWNER_KEY, ConnectionOwner, ProxyApp
from .logs import new_request_id

if TYPE_CHECKING:
    from uvicorn._types import ASGI3Application, ASGIReceiveCallable, ASGISendCallable, Scope

log = logging.getLogger("metadata_proxy")

# Slowloris: uvicorn has no timeout for a request head. A request's line and headers must
# arrive within this long of its first byte (a new connection's first request, of the
# accept); else 408 and close. Guests sit on the same host: a head takes milliseconds.
HEADER_TIMEOUT = 5.0
# llhttp buffers a head of any size, and the app's 32 KiB check runs only once the head
# is complete: past this many bytes the protocol answers 431 itself and closes.
MAX_HEAD_BYTES = 64 * 1024
# Open connections per peer address: max_concurrent requests plus idle keep-alive ones,
# and never so many that one VM could take the process's file descriptors from the rest.
CONNECTIONS_PER_CONCURRENT = 4
MIN_CONNECTIONS_PER_PEER = 32
# uvicorn writes a response's head and its body separately: two system calls, two TCP
# segments. Written to a guest, they leave together at the end of the event-loop pass, with
# whatever else was written to that guest during it; past this many bytes, at once. An
# answer completed while no other request is in flight leaves at once instead
# (GuestProtocol.on_response_complete).
COALESCE_BYTES = 64 * 1024


class CoalescingTransport:
    """A guest connection's transport as uvicorn and GuestProtocol see it: writes are held
    until flush(), which runs at the end of the event-loop pass at the latest; close() sends
    them first, abort() drops them; everything else is the real transport's."""

    __slots__ = ("_transport", "_loop", "_pending", "_size")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._size = 0

    def write(self, data: bytes) -> None:
        pending = self._pending
        if not pending:
            if not data:
                return
            self._loop.call_soon(self.flush)
        pending.append(data)
        self._size += len(data)
        if self._size > COALESCE_BYTES:
            self.flush()

    def flush(self) -> None:
        pending = self._pending
        if pending:
            data = pending[0] if len(pending) == 1 else b"".join(pending)
            pending.clear()
            self._size = 0
            if not self._transport.is_closing():  # closed meanwhile: the guest is gone
                self._transport.write(data)

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class GuestProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, stamped with the VM that held its peer address at accept,
    with the bounds uvicorn lacks: a deadline and a size cap for each request head, and a
    cap on open connections per peer. What it refuses gets the app's JSON envelope."""

    owner: ConnectionOwner | None = None  # who held the peer address at accept time
    proxy_app: ProxyApp | None = None  # set on the per-server subclass
    open_by_peer: Counter[str] = Counter()  # likewise: each server counts its own
    header_timeout = HEADER_TIMEOUT

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        app = self.proxy_app
        if app is not None:
            app.input_reported = app.unchecked_input = True  # see ProxyApp.lookup
            peer = transport.get_extra_info("peername")
            self.owner = app.accept(peer[0] if peer else "")
        # At most one deadline timer per connection rather than one per request: a request
        # head only notes when it began, and the timer, when it fires, re-arms itself for a
        # head that began after it was armed (call_later and cancel on every request cost
        # µs, bench/).
        self._head_timer: asyncio.TimerHandle | None = None
        self._in_head = False  # between a request's first byte and the end of its headers
        self._head_began = 0.0
        self._head_bytes = 0
        self._heads_begun = 0
        self._timer_head = 1  # the head the timer was armed for: the connection's is the first head's
        self._close_after_first = False  # see shutdown
        # uvicorn's self.transport from here on.
        self._writes = CoalescingTransport(cast(asyncio.Transport, transport), self.loop)
        super().connection_made(self._writes)  # type: ignore[arg-type]
        self._peer = self.client[0] if self.client else ""
        self.open_by_peer[self._peer] += 1
        limits = self.proxy_app.config.limits if self.proxy_app is not None else None
        cap = max(MIN_CONNECTIONS_PER_PEER, CONNECTIONS_PER_CONCURRENT * limits.max_concurrent if limits else 0)
        if self.open_by_peer[self._peer] > cap:
            self.refuse(guards.TOO_MANY_CONNECTIONS)
        else:
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self.open_by_peer[self._peer] -= 1
        if self.open_by_peer[self._peer] <= 0:
            del self.open_by_peer[self._peer]
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.proxy_app is not None:
            self.proxy_app.unchecked_input = True  # the registry is checked before the next lookup
        begun = self._heads_begun
        super().data_received(data)
        if self._in_head and not self.transport.is_closing():
            # All of `data` belongs to the head only when the head began before it; one
            # that began inside it is counted from the next read (at most one read short).
            if begun == self._heads_begun:
                self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self.refuse(guards.HEADERS_TOO_LARGE)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_began = self.loop.time()
        self._head_bytes = 0
        self._heads_begun += 1
        if self._head_timer is None:
            self._timer_head = self._heads_begun
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timeout)

    def on_response_complete(self) -> None:
        # The only request in flight: nothing to wait for, out now (one guest at a time:
        # latency). Else at the end of the pass, with the other answers completed in it:
        # the guests' side wakes once for all of them and sends its next requests together,
        # so the proxy's next pass is as large (bench/: a quarter more throughput at 32
        # connections than writing each answer as it completes).
        if self.proxy_app is None or self.proxy_app.in_flight <= 1:
            self._writes.flush()
        super().on_response_complete()

    def on_headers_complete(self) -> None:
        self._in_head = False  # the timer, if it fires before the next head, finds nothing to do
        super().on_headers_complete()
        if self._close_after_first and self.cycle is not None:
            self.cycle.keep_alive = False  # answered, then closed

    def shutdown(self) -> None:
        """The server drains (SIGTERM): uvicorn closes every connection that has no request
        in flight. One that has not begun its first request was accepted a moment before,
        its request possibly already on the way: the guest cannot tell it from a connection
        still in the listening queue, which the next process serves (socket activation:
        a restart or an upgrade), and must not get a close without an answer. So its first
        request is answered and the connection closed after it; one that sends nothing is
        closed by the head deadline, which the drain outlasts."""
        if not self._heads_begun and not self.transport.is_closing():
            self._close_after_first = True
            return
        super().shutdown()

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if not self._in_head:
            if not self._heads_begun:
                self.transport.close()  # connected and never sent a byte: nothing to answer
            return  # every head so far was complete in time; the next one arms a timer again
        if self._timer_head != self._heads_begun:
            # Armed for an earlier head: this one's deadline runs from its own first byte.
            self._timer_head = self._heads_begun
            self._head_timer = self.loop.call_at(self._head_began + self.header_timeout, self._head_timeout)
        elif self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head behind a request still being answered: wait for that answer.
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timeout)
        else:
            self.refuse(guards.REQUEST_TIMEOUT)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to what llhttp cannot parse (smuggling shapes included)."""
        self.refuse(guards.MALFORMED)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        # llhttp rejects some requests only after their headers were complete and the app's
        # task was created (a Transfer-Encoding other than chunked, a malformed chunk): the
        # app must not then forward what the guest was told is malformed. This runs when the
        # task starts, and hands back the app's own coroutine: a coroutine awaiting it would be
        # one more frame for each suspension and resumption of every request to pass through.
        def unless_refused(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> Awaitable[None]:
            scope[OWNER_KEY] = self.owner  # type: ignore[literal-required]
            if cycle.disconnected:
                nothing: asyncio.Future[None] = self.loop.create_future()
                nothing.set_result(None)
                return nothing
            return app(scope, receive, send)

        super()._start_asgi_task(cycle, unless_refused)

    def refuse(self, refusal: guards.Refusal) -> None:
        """Answer for a request the app never saw, then close; counted and logged like the app's."""
        request_id = new_request_id()
        cycle = self.cycle
        answering = cycle is not None and cycle.response_started and not cycle.response_complete
        if cycle is not None and not cycle.response_started:
            cycle.disconnected = True  # the app, if it already runs, sees the guest gone
            cycle.message_event.set()
        if not answering and not self.transport.is_closing():  # never inside another answer
            body = guards.error_body(refusal)
            headers = [
                *self.server_state.default_headers,
                (b"content-type", b"application/json"),
                *refusal.headers,
                (b"content-length", b"%d" % len(body)),
                (b"x-request-id", request_id.encode()),
                (b"connection", b"close"),
            ]
            lines = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
            self.transport.write(STATUS_LINE[refusal.status] + lines + b"\r\n" + body)
        self.transport.close()
        app = self.proxy_app
        if app is not None:
            app.metrics.count(app.metrics.refusals, refusal.code)
            app.access_log.write(
                request_id=request_id,
                peer=self._peer,
                vm=None,
                vm_id=None,
                method=None,
                path=None,
                route=None,
                status=refusal.status,
                code=refusal.code,
                duration_ms=None,
                upstream_status=None,
                cache=None,
            )
