"""The guest side's HTTP protocol: uvicorn's httptools protocol plus what an endpoint that
faces untrusted guests needs and uvicorn does not do.

- A deadline in every state of a connection, kept by one lazy timer (deadline.Deadline):
  the first byte, each request head, each body with its trailer, the unread rest of a body
  after an early answer, the idle keep-alive, an answer the guest does not read, a close
  that does not complete. The numbers are below and in the README ("Slow and greedy guests").
- Bounded memory whatever the guest sends: a request head, a trailer section, the queue of
  pipelined requests and the rest of a body after its answer each have a byte or count cap.
- A request's headers are its head: trailer fields are read, counted and dropped.
- An `Upgrade` (or CONNECT) request is answered 400 and the connection closes; its framing
  is not ours to guess.
- A cap on open connections per peer address; JSON refusals for what the parser rejects.
- The VM that held each connection's peer address when it was accepted
  (owners.ConnectionOwner), handed to the app with every request: the app refuses a request
  that arrives without one, so a seam with uvicorn that stopped working fails closed.

What the connections of one server share (the app, their count per peer, the deadlines) is
a `GuestSide`; uvicorn builds each connection's protocol through the factory it is given
(`uvicorn.Config(http=functools.partial(GuestProtocol, side))`). The seam with uvicorn is
that factory call, httptools' parser callbacks (on_message_begin, on_header,
on_headers_complete, on_body, on_message_complete: the parser calls them by these names)
and asyncio's protocol methods, overridden here and calling uvicorn's own (by its class, not
super(): they run for every request); one callback, on_response_complete, does uvicorn's own
work itself when nothing is pipelined, less its idle keep-alive timer. Besides those,
uvicorn's public attributes and the source of that one callback are pinned by
tests/test_protocol.py.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httptools
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from . import guards
from .deadline import Deadline
from .logs import new_request_id
from .owners import OWNER_KEY, ConnectionOwner

if TYPE_CHECKING:
    from .app import ProxyApp

log = logging.getLogger("metadata_proxy")

# A new connection's first byte, and each request head (line and headers) from its first
# byte, must arrive within this long; else a silent close (nothing came) or 408 and close.
# Guests sit on the same host: a head takes milliseconds.
HEADER_TIMEOUT = 5.0
# llhttp buffers a head of any size, and the app's 32 KiB check runs only once the head is
# complete: past this many bytes the protocol answers 431 itself and closes.
MAX_HEAD_BYTES = 64 * 1024
# A request's body and its trailer must be complete within this long of the request's first
# byte (the app also cuts off a body that stalls for forward.BODY_IDLE_SECONDS); else 408,
# or a close when the answer has begun. Time while the proxy itself does not read (the
# control plane is slow to take a streamed body) does not count.
BODY_TIMEOUT = 60.0
# A trailer section (the fields after a chunked body's last chunk) is bounded like a head:
# past this many bytes, 431 (or a close when the answer has begun). Its fields are dropped.
MAX_TRAILER_BYTES = 32 * 1024
# A chunked body's framing (chunk-size lines with their extensions, CRLFs, the trailer): at
# most as many bytes as the body's data, plus this many. llhttp hands chunk extensions to no
# callback and buffers none of them, so a chunk-size line without end (`1;aaaa...`), or one
# byte of data per long line, was read at wire speed with no body limit ever reached (Node's
# CVE-2024-22019). Clients chunk at kilobytes; one byte per chunk costs 5 bytes of framing.
MAX_CHUNK_FRAMING = 64 * 1024
# The rest of a body that the answer did not wait for (a refusal, a GET with a body) is read
# and dropped: at most this many bytes for at most this long, then the connection closes.
# If it ends within both, the connection is kept for the next request.
DRAIN_BYTES = 1024 * 1024
DRAIN_SECONDS = 2.0
# An idle kept-alive connection (an answer complete, no next request begun) closes after this.
KEEP_ALIVE_SECONDS = 5.0
# A guest that does not read what the proxy wrote to it for this long is cut off (abort):
# an answer held in our buffers, or a close waiting for them to drain.
WRITE_STALL_SECONDS = 10.0
CLOSE_SECONDS = 2.0
# Requests read and queued behind the one being answered (pipelining). One read can hold
# thousands of small requests; past this many, nothing more is read: those queued are
# answered, the last with `Connection: close`, and the connection closes.
MAX_PIPELINED = 16
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

# What the connection is reading (GuestProtocol._reading).
_BETWEEN = 0  # no request begun since the last one's end (or since the accept)
_HEAD = 1  # a request's line and headers
_BODY = 2  # its body and trailer


class CoalescingTransport(asyncio.Transport):
    """A guest connection's transport as uvicorn and GuestProtocol see it: writes are held
    until flush(), which runs at the end of the event-loop pass at the latest; close() and
    write_eof() send them first, abort() drops them. Every method of asyncio.Transport is
    spelled out (no catch-all): a write path added to uvicorn must go through the buffer,
    or fail, never overtake bytes held here."""

    __slots__ = ("_transport", "_loop", "_pending", "_size", "_on_close", "_held")

    def __init__(
        self,
        transport: asyncio.Transport,
        loop: asyncio.AbstractEventLoop,
        on_close: Callable[[], bool] = lambda: False,
    ) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._size = 0
        # The protocol's: True to put the close off (a lingering close: the rest of a body
        # is read first); else the close has begun, and must complete within a deadline.
        self._on_close = on_close
        self._held = False  # reading paused for good (hold_reading): no resume lifts it

    def write(self, data: bytes | bytearray | memoryview) -> None:
        pending = self._pending
        if not pending:
            if not data:
                return
            self._loop.call_soon(self.flush)
        pending.append(bytes(data) if not isinstance(data, bytes) else data)
        self._size += len(data)
        if self._size > COALESCE_BYTES:
            self.flush()

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        for data in list_of_data:
            self.write(data)

    def flush(self) -> None:
        pending = self._pending
        if pending:
            data = pending[0] if len(pending) == 1 else b"".join(pending)
            pending.clear()
            self._size = 0
            if not self._transport.is_closing():  # closed meanwhile: the guest is gone
                self._transport.write(data)

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def close(self) -> None:
        if not self._transport.is_closing():
            self.flush()
            if not self._on_close():
                self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._size = 0
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        if not self._held:
            self._transport.resume_reading()

    def hold_reading(self) -> None:
        """Pause reading for the rest of the connection: uvicorn resumes it after each answer
        and whenever the app reads a body (complete or not), which must read nothing more."""
        self._held = True
        self._transport.pause_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        raise RuntimeError("a guest connection never changes protocol")  # no Upgrade, ever

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._size + self._transport.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()


@dataclass(frozen=True)
class Deadlines:
    """A guest connection's deadlines, in seconds: the constants above (tests shorten them)."""

    header_timeout: float = HEADER_TIMEOUT
    body_timeout: float = BODY_TIMEOUT
    drain_seconds: float = DRAIN_SECONDS
    keep_alive_seconds: float = KEEP_ALIVE_SECONDS
    write_stall_seconds: float = WRITE_STALL_SECONDS


@dataclass(frozen=True)
class GuestSide:
    """What the connections of one guest server share: the app they serve (its connection
    owners, limits, in-flight count, metrics and log), their deadlines, and the count of
    open connections per peer address."""

    app: ProxyApp
    deadlines: Deadlines = Deadlines()
    open_by_peer: Counter[str] = field(default_factory=Counter)


class _Stopped(Exception):
    """Raised from a parser callback to stop parsing a connection's input."""


class GuestProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline in every state, bounded memory, trailer
    fields dropped, no Upgrade, a cap on connections per peer, and each connection's owner.
    What it refuses gets the app's JSON envelope.

    uvicorn calls it with its own keyword arguments (config, server_state, app_state, _loop)
    for each connection, `side` bound first (functools.partial)."""

    # Its own state in slots: uvicorn's attributes alone fit an instance's inline values, and
    # ours on top would turn them into a dict per connection (bench/held_memory.py measures it).
    # An attribute added here belongs in this list.
    __slots__ = (
        "proxy_app",
        "open_by_peer",
        "header_timeout",
        "body_timeout",
        "drain_seconds",
        "keep_alive_seconds",
        "write_stall_seconds",
        "owners",
        "owner",
        "_deadline",
        "_read_deadline",
        "_reading",
        "_requests",
        "_stopped",
        "_dropped",
        "_close_after_body",
        "_closing_at",
        "_write_stalled_at",
        "_head_began",
        "_head_bytes",
        "_close_after_first",
        "_drain_began",
        "_drained",
        "_after_chunk_header",
        "_body_seen",
        "_trailer_bytes",
        "_body_bytes",
        "_framing",
        "_writes",
        "_peer",
    )

    def __init__(
        self,
        side: GuestSide,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        # Read once per connection; the per-request callbacks use these.
        self.proxy_app = side.app
        self.open_by_peer = side.open_by_peer
        deadlines = side.deadlines
        self.header_timeout = deadlines.header_timeout
        self.body_timeout = deadlines.body_timeout
        self.drain_seconds = deadlines.drain_seconds
        self.keep_alive_seconds = deadlines.keep_alive_seconds
        self.write_stall_seconds = deadlines.write_stall_seconds

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        app = self.proxy_app
        self.owners = app.owners
        peer = transport.get_extra_info("peername")
        self.owner: ConnectionOwner = self.owners.accept(peer[0] if peer else "")
        self._deadline = Deadline(self.loop, self._deadline_passed)
        self._read_deadline: float | None = None  # of what is being read (or the idle keep-alive)
        self._reading = _BETWEEN
        self._requests = 0  # heads begun on this connection
        self._stopped = False  # nothing more is parsed (after an Upgrade, MAX_PIPELINED, a close)
        self._dropped = 0  # bytes read and dropped since (DRAIN_BYTES at most)
        self._close_after_body = False  # a lingering close: see _closing
        self._closing_at: float | None = None
        self._write_stalled_at: float | None = None
        self._head_began = 0.0
        self._head_bytes = 0
        self._close_after_first = False  # see shutdown
        self._drain_began: float | None = None  # the answer was complete before the body
        self._drained = 0
        self._after_chunk_header = False  # trailer bytes are counted from a chunk header with no data
        self._body_seen = False  # a byte of the body being read arrived
        self._trailer_bytes = 0
        # The body being read: its data (on_body) and, of the reads wholly inside it, the
        # bytes that were not data (chunk framing, see MAX_CHUNK_FRAMING).
        self._body_bytes = 0
        self._framing = 0
        # uvicorn's self.transport from here on.
        self._writes = CoalescingTransport(transport, self.loop, self._closing)  # type: ignore[arg-type]
        super().connection_made(self._writes)
        self._peer = self.client[0] if self.client else ""
        self.open_by_peer[self._peer] += 1
        cap = max(MIN_CONNECTIONS_PER_PEER, CONNECTIONS_PER_CONCURRENT * app.config.limits.max_concurrent)
        if self.open_by_peer[self._peer] > cap:
            self.refuse(guards.TOO_MANY_CONNECTIONS)
        else:
            self._set_deadline(self.loop.time() + self.header_timeout)  # for the first byte

    def connection_lost(self, exc: Exception | None) -> None:
        self._deadline.cancel()
        self.owner.connection_ended()
        self.open_by_peer[self._peer] -= 1
        if self.open_by_peer[self._peer] <= 0:
            del self.open_by_peer[self._peer]
        super().connection_lost(exc)
        self.owner.hang_up()  # a request the app holds (a long-poll) ends now, not at its timeout

    def data_received(self, data: bytes) -> None:
        if self._stopped:
            # Nothing more is parsed: what comes is read and dropped, DRAIN_BYTES at most (a
            # few requests past the pipelining cap, sent before the guest saw the close: read,
            # they leave no unread bytes to turn the close into a reset that could destroy the
            # answers before the guest reads them); past that nothing more is read, for good:
            # uvicorn resumes reading after each answer queued before and whenever the app
            # reads a queued request's body (a resume per POST, twice, let 256 KiB in each:
            # megabytes), and would have the proxy read at wire speed for as long as they take
            # (a long-poll: minutes). The close comes after the last answer.
            self._dropped += len(data)
            if self._dropped > DRAIN_BYTES:
                self.flow.pause_reading()
                self._writes.hold_reading()
            return
        self.owners.input_arrived()
        begun = self._requests
        before = self._reading
        body_before = self._body_bytes
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # The rest belongs to the other protocol: never parsed. The upgrade request is
            # answered 400 by the app in its turn (on_headers_complete), then closed.
            self._stop()
            return
        except httptools.HttpParserError:
            if self._stopped:
                return  # _Stopped: nothing more is parsed
            self.refuse(guards.MALFORMED)
            return
        if self.transport.is_closing():
            return
        reading = self._reading
        if reading == _HEAD:
            # All of `data` belongs to the head only when the head began before it; one
            # that began inside it is counted from the next read (at most one read short).
            if begun == self._requests:
                self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self.refuse(guards.HEADERS_TOO_LARGE)
        elif reading == _BODY:
            if before == _BODY and begun == self._requests:  # a read wholly inside this body
                self._framing += len(data) - (self._body_bytes - body_before)
                if self._framing > MAX_CHUNK_FRAMING + self._body_bytes:
                    self.refuse(guards.CHUNK_FRAMING)
                    return
            if self._after_chunk_header:
                self._trailer_bytes += len(data)  # no chunk data since the last chunk header
                if self._trailer_bytes > MAX_TRAILER_BYTES:
                    self.refuse(guards.HEADERS_TOO_LARGE)
                    return
            if self._drain_began is not None:
                self._drained += len(data)
                if self._drained > DRAIN_BYTES:
                    self._abandon()

    # -- httptools' callbacks -------------------------------------------------------------
    # uvicorn's own are called by their class, not through super(): these run several times
    # for every request, and on Python 3.11 each super() call builds a proxy object (bench/).

    def on_message_begin(self) -> None:
        if self._stopped:
            raise _Stopped  # bytes after the last request this connection reads
        HttpToolsProtocol.on_message_begin(self)
        self.scope[OWNER_KEY] = self.owner  # type: ignore[literal-required]
        self._reading = _HEAD
        self._requests += 1
        self._head_bytes = 0
        self._head_began = now = self.loop.time()
        deadline = self._read_deadline
        if deadline is None or deadline > now + self.header_timeout:
            self._set_deadline(now + self.header_timeout)
        # Else the deadline set (the idle keep-alive's, the accept's first byte's) passes no
        # later than this head's: should it pass first, _deadline_passed moves it on to this
        # head's. One deadline move fewer for nearly every request.

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._reading == _HEAD:
            HttpToolsProtocol.on_header(self, name, value)
        # else a trailer field: never a header of the request, never checked, never
        # forwarded (dropped); its bytes are counted in data_received.

    def on_headers_complete(self) -> None:
        if self.pipeline and len(self.pipeline) >= MAX_PIPELINED:
            # Enough queued: the last of them ends the connection; nothing more is read.
            self.cycle.keep_alive = False
            self._stop()
            raise _Stopped
        self._reading = _BODY
        self._body_seen = False
        self._after_chunk_header = False
        self._trailer_bytes = 0
        self._body_bytes = self._framing = 0
        self._drain_began = None
        self._drained = 0
        upgrade = self.parser.should_upgrade()
        if upgrade:
            self.scope[guards.REFUSAL_KEY] = guards.UPGRADE  # type: ignore[literal-required]
        HttpToolsProtocol.on_headers_complete(self)
        if upgrade or self._close_after_first:
            self.cycle.keep_alive = False  # answered, then closed
        # The head's deadline stays set: should it pass with the body still being read,
        # _deadline_passed moves it on to the body's. Nearly every request has no body, and
        # is complete before the head's deadline could pass: one deadline move fewer each.

    def on_chunk_header(self) -> None:
        self._after_chunk_header = True

    def on_body(self, body: bytes) -> None:
        self._after_chunk_header = False
        self._trailer_bytes = 0
        self._body_seen = True
        self._body_bytes += len(body)
        HttpToolsProtocol.on_body(self, body)

    def on_message_complete(self) -> None:
        HttpToolsProtocol.on_message_complete(self)
        self._reading = _BETWEEN
        self._drain_began = None
        if self._close_after_body:
            self._stopped = True
            self._writes.close()  # the lingering close's end: the body was read
            return
        if self.cycle.response_complete and not self.pipeline:
            self._set_deadline(self.loop.time() + self.keep_alive_seconds)
        # Else being answered: the app's timers hold (upstream, guest writes). The deadline
        # left from the head, should it pass first, finds the request in flight and is
        # dropped then (_deadline_passed): not worth a move on every request.

    # -- uvicorn's callbacks --------------------------------------------------------------

    def on_response_complete(self) -> None:
        # The only request in flight: nothing to wait for, out now (one guest at a time:
        # latency). Else at the end of the pass, with the other answers completed in it:
        # the guests' side wakes once for all of them and sends its next requests together,
        # so the proxy's next pass is as large (bench/ measures it against writing each
        # answer as it completes).
        if self.proxy_app.in_flight <= 1:
            self._writes.flush()
        if self.pipeline:
            super().on_response_complete()  # uvicorn starts the next request queued behind this one
            return
        # With nothing queued, what uvicorn's on_response_complete does, less its idle
        # keep-alive timer (it has no switch to leave it off; a call_later and a cancel for
        # every request, bench/): the idle keep-alive is this protocol's deadline, below.
        self.server_state.total_requests += 1
        if self.transport.is_closing() or not self.cycle.response_complete:
            return  # closing (its own deadline), or the next request is being answered
        self.flow.resume_reading()
        if self._reading == _BETWEEN:
            self._set_deadline(self.loop.time() + self.keep_alive_seconds)
        elif self._reading == _BODY and self._drain_began is None:
            # Answered before its body was read: drain a bounded rest, then go on or close.
            self._drain_began = now = self.loop.time()
            self._drained = 0
            self._set_deadline(now + self.drain_seconds)

    def shutdown(self) -> None:
        """The server drains (SIGTERM): uvicorn closes every connection that has no request
        in flight. One whose first request head is not complete yet (none of it, or only
        part of it, has arrived) was accepted a moment before, its request on the way: the
        guest cannot tell it from a connection still in the listening queue, which the next
        process serves (socket activation: a restart or an upgrade), and must not get a close
        without an answer. So its first request is answered and the connection closed after
        it; one that sends nothing (or never completes its head) is closed by its accept or
        head deadline, which the drain outlasts."""
        if self.cycle is None and not self.transport.is_closing():
            self._close_after_first = True
            return
        super().shutdown()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._write_stalled_at = self.loop.time()
        self._arm()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._write_stalled_at = None

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to what llhttp cannot parse (smuggling shapes included)."""
        self.refuse(guards.MALFORMED)

    # -- ownership ------------------------------------------------------------------------

    def owner_lost(self) -> bool:
        """The VM that opened this connection no longer holds its address. A request begun
        on it is answered, then the connection closes (one not admitted before the change
        gets 403 `unknown_vm`); an idle one is left to its keep-alive deadline, and its next
        request, if one comes first, is answered 403 `unknown_vm` with `Connection: close`:
        closing it now would race that request and leave it without any answer. True when
        a request was in progress."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            cycle.keep_alive = False
            return True
        return False

    # -- deadlines ------------------------------------------------------------------------

    def _set_deadline(self, when: float | None) -> None:
        self._read_deadline = when
        if self._write_stalled_at is None and self._closing_at is None:  # nearly always
            if when is None:
                self._deadline.clear()
            else:
                self._deadline.at(when)
        else:
            self._arm()

    def _arm(self) -> None:
        candidates = [
            when
            for when in (
                self._read_deadline,
                None if self._write_stalled_at is None else self._write_stalled_at + self.write_stall_seconds,
                self._closing_at,
            )
            if when is not None
        ]
        if candidates:
            self._deadline.at(min(candidates))
        else:
            self._deadline.clear()

    def _closing(self) -> bool:
        """The transport is asked to close. After an answer that did not wait for its
        request's body (a refusal with `Connection: close`, the app's 413 included: this is
        the proxy's one lingering close), first read the rest of that body, bounded by
        DRAIN_BYTES and DRAIN_SECONDS: closing with unread bytes sends a reset, which can
        destroy the answer before the guest read it. Else the close begins; it waits for the
        write buffer to drain, so it gets a deadline (a guest that does not read would hold
        the connection for ever)."""
        cycle = self.cycle
        if (
            self._reading == _BODY
            and not self._stopped
            and not self._close_after_body
            and cycle is not None
            and cycle.response_complete
            # A guest waiting for `100 Continue` was answered instead: it sends no body.
            and (self._body_seen or not self.expect_100_continue)
        ):
            self._close_after_body = True
            self.owner.connection_ended()
            return True  # on_response_complete starts the drain
        self._begin_close()
        return False

    def _begin_close(self) -> None:
        """The close has begun (ours, or the transport's own after the guest's EOF): it
        completes once the write buffer drains, within CLOSE_SECONDS, else an abort."""
        self._stopped = True
        self.owner.connection_ended()
        # Nothing more is read: a read deadline left behind would have the timer fire for it,
        # find the transport closing and re-arm for it, once per loop pass until the close
        # completes (a busy loop for as long as a guest that does not read holds it open).
        self._read_deadline = None
        self._closing_at = self.loop.time() + CLOSE_SECONDS
        self._arm()

    def eof_received(self) -> None:
        """The guest half-closed its side. As uvicorn's, this returns None: the transport
        closes itself once what it holds for the guest is written, which a guest that does
        not read never lets happen; that close never passes through CoalescingTransport.close,
        so what the buffer holds is handed over first (a close skips it) and the close's
        deadline is set here."""
        self._writes.flush()
        super().eof_received()
        if not self._writes.is_closing():
            self._begin_close()

    def _deadline_passed(self) -> None:
        now = self.loop.time()
        transport = self._writes
        if self._closing_at is not None and now >= self._closing_at:
            transport.abort()
            return
        if self._write_stalled_at is not None and now >= self._write_stalled_at + self.write_stall_seconds:
            log.info("%s did not read for %.0f s: cut off", self._peer, self.write_stall_seconds)
            transport.abort()
            return
        when = self._read_deadline
        if when is None or now < when:
            self._arm()
            return
        if transport.is_closing():
            # Closing, its read deadline not dropped (_begin_close not run: a path by which
            # the transport closed without us knowing): never re-armed for a passed instant
            # (a busy loop); the close gets its own deadline.
            if self._closing_at is None:
                self._begin_close()
            else:
                self._set_deadline(None)
            return
        cycle = self.cycle
        reading = self._reading
        if reading == _BETWEEN:
            if cycle is None or (cycle.response_complete and not self.pipeline):
                transport.close()  # nothing came (the accept's first byte) or idle keep-alive
            else:
                self._set_deadline(None)
        elif reading == _HEAD and now < self._head_began + self.header_timeout:
            self._set_deadline(self._head_began + self.header_timeout)  # an earlier one passed: this head's
        elif reading == _HEAD:
            in_flight = (cycle is not None and not cycle.response_complete) or self.pipeline
            if in_flight or self.flow.read_paused:
                # Behind a request still being answered (pipelined): uvicorn does not read
                # while it is queued; this head's deadline runs again from now.
                self._set_deadline(now + self.header_timeout)
            else:
                self.refuse(guards.REQUEST_TIMEOUT)
        elif self._drain_began is not None:
            self._abandon()  # the rest of a body answered early: not in time
        elif now < self._head_began + self.body_timeout:
            self._set_deadline(self._head_began + self.body_timeout)  # the head's passed: the body's
        elif self.flow.read_paused and not cycle.response_started:
            # The proxy is not reading (the app has not taken what it has): its own timers
            # hold (the control plane's timeout); the guest's clock restarts when it reads.
            self._set_deadline(now + self.body_timeout)
        else:
            self.refuse(guards.REQUEST_TIMEOUT)

    # -- ending a connection --------------------------------------------------------------

    def _stop(self) -> None:
        """Parse nothing more: what is queued is answered, then the connection closes."""
        self._stopped = True
        if self.cycle is None or (self.cycle.response_complete and not self.pipeline):
            self.transport.close()

    def _abandon(self) -> None:
        """The rest of a body answered early went past DRAIN_BYTES or DRAIN_SECONDS: close."""
        self._stopped = True
        self.transport.close()

    def _may_answer(self) -> bool:
        """True when a refusal written now is the only answer to the request being read."""
        if self.pipeline:
            return False  # requests queued before it are still to be answered: never inside them
        cycle = self.cycle
        if cycle is None:
            return True
        if self._reading == _HEAD:
            return bool(cycle.response_complete)  # the previous request's answer is out
        return not cycle.response_started

    def refuse(self, refusal: guards.Refusal) -> None:
        """Answer for a request the app never saw, then close; counted and logged like the app's.
        Inside or after another answer to the same request, only close."""
        request_id = new_request_id()
        self.owner.connection_ended()  # the app acts on no request of this connection it has not begun
        cycle = self.cycle
        answer = self._may_answer() and not self.transport.is_closing()
        if cycle is not None and not cycle.response_started:
            cycle.disconnected = True  # the app, if it already runs, sees the guest gone
            cycle.message_event.set()
        if answer:
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
        self._stopped = True
        self.transport.close()
        app = self.proxy_app
        app.metrics.count(app.metrics.refusals, refusal.code)
        app.access_log.write(
            request_id=request_id,
            peer=self._peer,
            vm=None,
            vm_id=None,
            method=None,
            path=None,
            route=None,
            status=refusal.status if answer else 0,
            code=refusal.code,
            duration_ms=None,
            upstream_status=None,
            cache=None,
        )
