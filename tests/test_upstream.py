"""The upstream HTTP/1.1 client against real servers on loopback sockets.

Most servers here are small asyncio servers written in the test, so that they can misbehave
on cue (close at the wrong moment, stall, send garbage); a uvicorn + Starlette app stands in
for a well-behaved control plane. Every test runs on both the default asyncio loop and uvloop.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
import trustme
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from metadata_proxy import upstream as upstream_module
from metadata_proxy.upstream import (
    ConnectError,
    ConnectionLost,
    ProtocolError,
    TLSError,
    Upstream,
    UpstreamTimeout,
)

pytestmark = pytest.mark.anyio

MiB = 1024 * 1024


@pytest.fixture(
    params=[
        pytest.param(("asyncio", {}), id="asyncio"),
        pytest.param(("asyncio", {"use_uvloop": True}), id="uvloop"),
    ]
)
def anyio_backend(request: pytest.FixtureRequest) -> Any:
    return request.param


# -- a loopback server the test scripts --------------------------------------------------


@dataclass
class Req:
    method: bytes
    target: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    raw_head: bytes

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


@dataclass
class Peer:
    """One accepted connection, as the handler sees it."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    server: Server
    index: int  # 0 for the server's first connection

    async def read_head(self) -> Req | None:
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError:
            return None
        lines = head[:-4].split(b"\r\n")
        method, target, version = lines[0].split(b" ")
        assert version == b"HTTP/1.1"
        headers = [tuple(line.split(b": ", 1)) for line in lines[1:]]
        return Req(method, target, headers, b"", head)  # type: ignore[arg-type]

    async def read_request(self) -> Req | None:
        req = await self.read_head()
        if req is None:
            return None
        length = req.header(b"content-length")
        if length is not None:
            req.body = await self.reader.readexactly(int(length))
        elif req.header(b"transfer-encoding") == b"chunked":
            req.body = b"".join([chunk async for chunk in self.iter_chunked()])
        self.server.requests.append(req)
        return req

    async def iter_chunked(self) -> AsyncIterator[bytes]:
        while True:
            size = int((await self.reader.readline()).strip(), 16)
            if size == 0:
                assert await self.reader.readline() == b"\r\n"
                return
            data = await self.reader.readexactly(size)
            assert await self.reader.readexactly(2) == b"\r\n"
            yield data

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


Handler = Callable[[Peer], Awaitable[None]]


@dataclass
class Server:
    handler: Handler
    port: int = 0
    connections: int = 0
    active: int = 0
    max_active: int = 0
    requests: list[Req] = field(default_factory=list)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    async def on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        peer = Peer(reader, writer, self, self.connections)
        self.connections += 1
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        try:
            await self.handler(peer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        except asyncio.CancelledError:
            pass  # torn down by serve(); ending normally spares asyncio's streams a cancelled task
        finally:
            self.active -= 1
            writer.close()
            try:
                await writer.wait_closed()
            except (ConnectionError, ssl.SSLError):
                pass
            self.tasks.discard(task)


@asynccontextmanager
async def serve(
    handler: Handler, *, ssl_context: ssl.SSLContext | None = None, sock: socket.socket | None = None
) -> AsyncIterator[Server]:
    srv = Server(handler)
    if sock is not None:
        server = await asyncio.start_server(srv.on_connection, sock=sock, ssl=ssl_context)
    else:
        server = await asyncio.start_server(srv.on_connection, "127.0.0.1", 0, ssl=ssl_context)
    srv.port = server.sockets[0].getsockname()[1]
    try:
        yield srv
    finally:
        server.close()
        for task in list(srv.tasks):
            task.cancel()
        await asyncio.gather(*srv.tasks, return_exceptions=True)
        await server.wait_closed()


@asynccontextmanager
async def client(url: str, **kwargs: Any) -> AsyncIterator[Upstream]:
    kwargs.setdefault("timeout", 5.0)
    kwargs.setdefault("retry_budget", 0.0)
    up = Upstream(url, **kwargs)
    try:
        yield up
    finally:
        await up.aclose()


def ok(body: bytes = b"ok", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%b\r\n%b" % (len(body), extra, body)


async def answer_all(peer: Peer) -> None:
    """A well-behaved keep-alive server: answers every request with its method and target."""
    while (req := await peer.read_request()) is not None:
        await peer.send(ok(req.method + b" " + req.target))


async def get(up: Upstream, target: bytes = b"/", **kwargs: Any) -> tuple[int, bytes]:
    resp = await up.request("GET", target, [], **kwargs)
    try:
        return resp.status, await resp.read()
    finally:
        await resp.aclose()


async def eventually(predicate: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.005)


def unused_port() -> socket.socket:
    """A bound, not listening socket: connecting to its port is refused, and the port stays ours."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


# -- a real uvicorn + Starlette control plane ---------------------------------------------


async def _echo(request: Request) -> Response:
    digest = hashlib.sha256()
    size = 0
    async for chunk in request.stream():
        digest.update(chunk)
        size += len(chunk)
    return JSONResponse(
        {
            "size": size,
            "sha256": digest.hexdigest(),
            "transfer_encoding": request.headers.get("transfer-encoding"),
            "content_length": request.headers.get("content-length"),
        }
    )


async def _data(request: Request) -> Response:
    return PlainTextResponse("hello")


async def _no_content(request: Request) -> Response:
    return Response(status_code=204)


async def _not_modified(request: Request) -> Response:
    return Response(status_code=304, headers={"ETag": '"x"'})


async def _stream(request: Request) -> Response:
    async def gen() -> AsyncIterator[bytes]:
        for i in range(5):
            yield b"part%d;" % i

    return StreamingResponse(gen())


APP = Starlette(
    routes=[
        Route("/echo", _echo, methods=["POST", "PUT"]),
        Route("/data", _data, methods=["GET", "HEAD"]),
        Route("/204", _no_content),
        Route("/304", _not_modified),
        Route("/stream", _stream),
    ]
)


@pytest.fixture
async def control_plane() -> AsyncIterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(APP, http="httptools", ws="none", lifespan="off", log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve(sockets=[sock]))
    await eventually(lambda: server.started or task.done())
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task
        sock.close()


# -- keep-alive and the pool ---------------------------------------------------------------


async def test_keep_alive_reuses_one_connection(control_plane: str) -> None:
    async with client(control_plane) as up:
        for _ in range(5):
            assert await get(up, b"/data") == (200, b"hello")
        assert up.connections_created == 1
        assert up.connections_idle == 1
        assert up.connections_open == 1


async def test_request_head_is_sent_as_given() -> None:
    async with serve(answer_all) as srv, client(f"http://127.0.0.1:{srv.port}") as up:
        headers = [(b"X-B", b"2"), (b"x-a", b"1"), (b"X-B", b"3")]
        resp = await up.request("GET", b"/runtime/a%2Fb/c?q=1&r=%20", headers)
        assert await resp.read() == b"GET /runtime/a%2Fb/c?q=1&r=%20"
        await resp.aclose()
    assert srv.requests[0].raw_head == (
        b"GET /runtime/a%2Fb/c?q=1&r=%20 HTTP/1.1\r\n"
        + b"Host: 127.0.0.1:%d\r\nX-B: 2\r\nx-a: 1\r\nX-B: 3\r\n\r\n" % srv.port
    )


async def test_dns_names_resolve_at_connect() -> None:
    async with serve(answer_all) as srv, client(f"http://localhost:{srv.port}/ignored/base") as up:
        assert await get(up, b"/x") == (200, b"GET /x")
    assert srv.requests[0].header(b"host") == b"localhost:%d" % srv.port


async def test_idle_connection_closed_by_server_is_dropped_and_replaced() -> None:
    async def answer_once(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(ok())  # keep-alive by default in HTTP/1.1, and yet the server closes

    async with serve(answer_once) as srv, client(f"http://127.0.0.1:{srv.port}") as up:
        assert await get(up) == (200, b"ok")
        await eventually(lambda: up.connections_open == 0)  # noticed while idle
        assert up.connections_idle == 0
        assert await get(up) == (200, b"ok")
        assert up.connections_created == 2
    assert srv.connections == 2


async def test_keep_alive_race_is_retried_on_a_fresh_connection() -> None:
    async def second_request_unanswered(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(ok(b"first"))
        if peer.index == 0:
            await peer.read_request()  # the server's idle timeout fires just as the request lands
            return
        while (await peer.read_request()) is not None:
            await peer.send(ok(b"again"))

    async with serve(second_request_unanswered) as srv, client(f"http://127.0.0.1:{srv.port}") as up:
        assert await get(up) == (200, b"first")
        assert await up.request("POST", b"/p", [], b"payload") is not None  # returns the retried answer
        assert up.connections_created == 2
    assert [r.body for r in srv.requests] == [b"", b"payload", b"payload"]


async def test_fresh_connection_lost_before_response_is_not_retried() -> None:
    async def drop(peer: Peer) -> None:
        await peer.read_request()

    async with serve(drop) as srv, client(f"http://127.0.0.1:{srv.port}", retry_budget=5) as up:
        with pytest.raises(ConnectionLost) as info:
            await up.request("POST", b"/p", [], b"x")
    assert info.value.reused is False
    assert info.value.response_started is False
    assert len(srv.requests) == 1


async def test_streamed_body_is_not_retried_once_consumed() -> None:
    async def second_request_unanswered(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(ok())
        await peer.read_request()

    async def body() -> AsyncIterator[bytes]:
        yield b"streamed"

    async with serve(second_request_unanswered) as srv, client(f"http://127.0.0.1:{srv.port}", retry_budget=5) as up:
        assert await get(up) == (200, b"ok")
        with pytest.raises(ConnectionLost) as info:
            await up.request("POST", b"/p", [], body())
    assert info.value.reused is True
    assert info.value.response_started is False
    assert srv.connections == 1


async def test_server_closing_mid_body_raises_connection_lost() -> None:
    async def truncate(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")

    async with serve(truncate) as srv, client(f"http://127.0.0.1:{srv.port}", retry_budget=5) as up:
        resp = await up.request("GET", b"/", [])
        try:
            assert resp.status == 200
            with pytest.raises(ConnectionLost) as info:
                await resp.read()
        finally:
            await resp.aclose()
        assert up.connections_idle == 0
    assert info.value.response_started is True
    assert len(srv.requests) == 1


async def test_server_closing_mid_head_on_a_reused_connection_is_not_retried() -> None:
    async def half_head_second_time(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(ok())
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Le")

    async with serve(half_head_second_time) as srv, client(f"http://127.0.0.1:{srv.port}", retry_budget=5) as up:
        assert await get(up) == (200, b"ok")
        with pytest.raises(ConnectionLost) as info:
            await up.request("GET", b"/", [])
    assert info.value.reused is True
    assert info.value.response_started is True
    assert len(srv.requests) == 2


async def test_pool_limit_bounds_connections_at_the_server() -> None:
    async def slow(peer: Peer) -> None:
        while (await peer.read_request()) is not None:
            await asyncio.sleep(0.05)
            await peer.send(ok())

    async with serve(slow) as srv, client(f"http://127.0.0.1:{srv.port}", max_connections=2) as up:
        results = await asyncio.gather(*(get(up) for _ in range(5)))
        assert results == [(200, b"ok")] * 5
        assert up.connections_created == 2
    assert srv.max_active == 2
    assert srv.connections == 2


async def test_waiting_for_a_pool_slot_is_bounded_by_the_timeout() -> None:
    async def stall_body(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
        await asyncio.sleep(10)

    async with serve(stall_body) as srv, client(f"http://127.0.0.1:{srv.port}", max_connections=1, timeout=0.2) as up:
        held = await up.request("GET", b"/", [])
        with pytest.raises(UpstreamTimeout, match="no free upstream connection"):
            await up.request("GET", b"/", [])
        await held.aclose()
    assert srv.connections == 1


async def test_max_idle_bounds_the_idle_list() -> None:
    async def slow(peer: Peer) -> None:
        while (await peer.read_request()) is not None:
            await asyncio.sleep(0.02)
            await peer.send(ok())

    async with serve(slow) as srv, client(f"http://127.0.0.1:{srv.port}", max_idle=2) as up:
        await asyncio.gather(*(get(up) for _ in range(4)))
        assert up.connections_idle == 2
        await eventually(lambda: up.connections_open == 2)
    assert srv.connections == 4


# -- connect failures and the retry budget ---------------------------------------------------


async def test_connection_refused_raises_connect_error_within_the_budget() -> None:
    with unused_port() as sock:
        async with client(f"http://127.0.0.1:{sock.getsockname()[1]}", retry_budget=0.2) as up:
            started = time.monotonic()
            with pytest.raises(ConnectError, match="cannot connect"):
                await get(up)
            assert time.monotonic() - started < 0.2 + 3  # generous: the request's timeout is 5 s
            assert up.connections_open == 0


async def test_server_that_starts_listening_during_the_budget_is_reached() -> None:
    sock = unused_port()
    port = sock.getsockname()[1]
    async with client(f"http://127.0.0.1:{port}", retry_budget=5) as up:
        request = asyncio.ensure_future(get(up))
        await asyncio.sleep(0.2)
        assert not request.done()
        async with serve(answer_all, sock=sock):
            assert await request == (200, b"GET /")


# -- framing: bodies both ways -------------------------------------------------------------


async def test_chunked_response_is_dechunked_and_the_connection_reused() -> None:
    async def chunked(peer: Peer) -> None:
        while (await peer.read_request()) is not None:
            await peer.send(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"5\r\nhello\r\n1;ext=1\r\n,\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n"
            )

    async with serve(chunked) as srv, client(f"http://127.0.0.1:{srv.port}") as up:
        assert await get(up) == (200, b"hello, world")
        resp = await up.request("GET", b"/", [])
        assert b"".join([chunk async for chunk in resp.iter_body()]) == b"hello, world"
        await resp.aclose()
        assert up.connections_created == 1


async def test_trailer_fields_are_never_response_headers() -> None:
    """llhttp calls on_header for a chunked answer's trailer fields too: they were appended to
    the response's headers, which the proxy relays (and caches) once the whole answer is in,
    as it is for any small one: fields the control plane sent after the body, which a client
    would never take for headers, reached the guest as headers of the answer."""

    async def trailer(peer: Peer) -> None:
        while (await peer.read_request()) is not None:
            await peer.send(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Secret\r\n\r\n"
                b"2\r\nok\r\n0\r\nX-Secret: t\r\nX-Cache-Hint: max-age=600\r\n\r\n"
            )

    async with serve(trailer) as srv, client(f"http://127.0.0.1:{srv.port}") as up:
        resp = await up.request("GET", b"/", [])
        try:
            assert await resp.read() == b"ok"
            assert [name.lower() for name, _ in resp.headers] == [b"transfer-encoding", b"trailer"]
        finally:
            await resp.aclose()


async def test_streamed_response_from_starlette(control_plane: str) -> None:
    async with client(control_plane) as up:
        resp = await up.request("GET", b"/stream", [])
        assert (b"transfer-encoding", b"chunked") in resp.headers
        assert await resp.read() == b"part0;part1;part2;part3;part4;"
        await resp.aclose()
        assert up.connections_idle == 1


async def test_request_body_framing() -> None:
    async def parts() -> AsyncIterator[bytes]:
        yield b"ab"
        yield b""  # must not end the chunked body early
        yield b"cd"

    async with serve(answer_all) as srv, client(f"http://127.0.0.1:{srv.port}") as up:
        cases: list[tuple[bytes | AsyncIterator[bytes], int | None]] = [
            (b"bytes body", None),
            (b"", None),
            (parts(), None),
            (parts(), 4),
            (b"x" * MiB, None),
        ]
        for body, length in cases:
            resp = await up.request("POST", b"/", [], body, content_length=length)
            await resp.read()
            await resp.aclose()
        assert up.connections_created == 1
    first, empty, chunked, declared, big = srv.requests
    assert (first.header(b"content-length"), first.body) == (b"10", b"bytes body")
    assert (empty.header(b"content-length"), empty.body) == (b"0", b"")
    assert (chunked.header(b"transfer-encoding"), chunked.header(b"content-length")) == (b"chunked", None)
    assert chunked.body == b"abcd"
    assert (declared.header(b"content-length"), declared.header(b"transfer-encoding")) == (b"4", None)
    assert declared.body == b"abcd"
    assert big.body == b"x" * MiB
    for req in srv.requests:
        assert [name.lower() for name, _ in req.headers].count(b"host") == 1


async def test_no_body_sends_no_framing_header() -> None:
    async with serve(answer_all) as srv, client(f"http://127.0.0.1:{srv.port}") as up:
        await get(up)
    assert srv.requests[0].header(b"content-length") is None
    assert srv.requests[0].header(b"transfer-encoding") is None


async def test_request_bodies_reach_starlette(control_plane: str) -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB

    async def pieces() -> AsyncIterator[bytes]:
        for i in range(0, len(payload), 100_000):
            yield payload[i : i + 100_000]

    expected = hashlib.sha256(payload).hexdigest()
    async with client(control_plane) as up:
        cases: list[tuple[bytes | AsyncIterator[bytes], int | None, tuple[str, str]]] = [
            (payload, None, ("content_length", str(len(payload)))),
            (pieces(), None, ("transfer_encoding", "chunked")),
            (pieces(), len(payload), ("content_length", str(len(payload)))),
        ]
        for body, length, framing in cases:
            headers = [(b"Content-Type", b"application/octet-stream")]
            resp = await up.request("PUT", b"/echo", headers, body, content_length=length)
            answer = json.loads(await resp.read())
            await resp.aclose()
            assert (answer["size"], answer["sha256"]) == (len(payload), expected)
            assert answer[framing[0]] == framing[1]
        assert up.connections_created == 1


async def test_body_not_matching_its_declared_length_is_refused() -> None:
    async def three() -> AsyncIterator[bytes]:
        yield b"abc"

    async with serve(answer_all) as srv, client(f"http://127.0.0.1:{srv.port}") as up:
        with pytest.raises(ValueError, match="longer"):
            await up.request("POST", b"/", [], three(), content_length=2)
        with pytest.raises(ValueError, match="shorter"):
            await up.request("POST", b"/", [], three(), content_length=4)
        with pytest.raises(ValueError):
            await up.request("POST", b"/", [], b"abc", content_length=4)
        await eventually(lambda: up.connections_open == 0)
    assert srv.requests == []


async def test_large_response_streams_in_bounded_memory() -> None:
    size = 64 * MiB
    piece = hashlib.sha256(b"seed").digest() * 32768  # 1 MiB, not all one byte
    sent = 0

    async def big(peer: Peer) -> None:
        nonlocal sent
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size // len(piece)):
            await peer.send(piece)
            sent += len(piece)

    async with serve(big) as srv, client(f"http://127.0.0.1:{srv.port}") as up:
        resp = await up.request("GET", b"/big", [])
        await asyncio.sleep(0.2)  # a consumer that does not read: the server must stall
        assert sent < 24 * MiB
        assert resp._buffered <= upstream_module._READ_HIGH_WATER + MiB
        digest = hashlib.sha256()
        received = 0
        async for chunk in resp.iter_body():
            digest.update(chunk)
            received += len(chunk)
            assert len(chunk) <= upstream_module._READ_HIGH_WATER + MiB
        await resp.aclose()
        assert received == size
        assert digest.digest() == hashlib.sha256(piece * (size // len(piece))).digest()
        assert up.connections_idle == 1


async def test_large_streamed_request_body_waits_for_the_server() -> None:
    size = 64 * MiB
    piece = hashlib.sha256(b"up").digest() * 2048  # 64 KiB
    produced = 0
    produced_when_server_started_reading = -1
    server_digest = hashlib.sha256()

    async def slow_reader(peer: Peer) -> None:
        nonlocal produced_when_server_started_reading
        await peer.read_head()
        await asyncio.sleep(0.2)
        produced_when_server_started_reading = produced
        async for chunk in peer.iter_chunked():
            server_digest.update(chunk)
        await peer.send(ok(b"done"))

    async def body() -> AsyncIterator[bytes]:
        nonlocal produced
        for _ in range(size // len(piece)):
            produced += len(piece)
            yield piece

    async with serve(slow_reader) as srv, client(f"http://127.0.0.1:{srv.port}") as up:
        resp = await up.request("POST", b"/upload", [], body())
        assert await resp.read() == b"done"
        await resp.aclose()
    assert produced == size
    assert 0 < produced_when_server_started_reading < 24 * MiB  # held back by the transport's flow control
    assert server_digest.digest() == hashlib.sha256(piece * (size // len(piece))).digest()


async def test_early_response_stops_the_upload() -> None:
    produced = 0

    async def refuse(peer: Peer) -> None:
        await peer.read_head()
        await peer.send(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 4\r\nConnection: close\r\n\r\nbig!")
        await asyncio.sleep(0.5)

    async def endless() -> AsyncIterator[bytes]:
        nonlocal produced
        while True:
            produced += 65536
            yield b"z" * 65536

    async with serve(refuse) as srv, client(f"http://127.0.0.1:{srv.port}") as up:
        resp = await up.request("POST", b"/", [], endless())
        assert (resp.status, await resp.read()) == (413, b"big!")
        await resp.aclose()
        assert up.connections_idle == 0
    assert produced < 64 * MiB


async def test_head_204_and_304_have_no_body(control_plane: str) -> None:
    async with client(control_plane) as up:
        resp = await up.request("HEAD", b"/data", [])
        assert resp.status == 200
        assert (b"content-length", b"5") in resp.headers
        assert [chunk async for chunk in resp.iter_body()] == []
        await resp.aclose()
        assert await get(up, b"/204") == (204, b"")
        assert await get(up, b"/304") == (304, b"")
        assert await get(up, b"/data") == (200, b"hello")
        # The HEAD answer announced a body (Content-Length: 5): its connection is not pooled,
        # in case the server sends that body anyway; 204 and 304 announced none.
        assert up.connections_created == 2


@pytest.mark.parametrize(
    ("method", "head"),
    [
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"),
        ("GET", b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n"),
        ("GET", b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n"),
    ],
)
async def test_a_body_after_head_204_or_304_never_fails_the_next_request(method: str, head: bytes) -> None:
    """A server that sends a body where none may follow, late: had the connection been pooled,
    those bytes would be read as the next request's answer (another VM's 502). Issue 11."""

    async def broken(peer: Peer) -> None:
        first = True
        while await peer.read_request() is not None:
            if first:
                first = False
                await peer.send(head)
                continue
            # The body of the first answer arrives only now, ahead of this answer.
            await peer.send(b"hello" if b"Content-Length" in head else b"5\r\nhello\r\n0\r\n\r\n")
            await peer.send(ok(b"second"))

    async def fine(peer: Peer) -> None:
        while await peer.read_request() is not None:
            await peer.send(ok(b"second"))

    connections = 0

    async def handler(peer: Peer) -> None:
        nonlocal connections
        connections += 1
        await (broken(peer) if connections == 1 else fine(peer))

    async with serve(handler) as srv, client(f"http://127.0.0.1:{srv.port}") as up:
        resp = await up.request(method, b"/", [])
        assert [chunk async for chunk in resp.iter_body()] == []
        await resp.aclose()
        for _ in range(3):
            assert await get(up) == (200, b"second")
        assert up.connections_created == 2


async def test_head_response_without_content_length_keeps_the_connection() -> None:
    async def head(peer: Peer) -> None:
        while (req := await peer.read_request()) is not None:
            if req.method == b"HEAD":
                await peer.send(b"HTTP/1.1 200 OK\r\nX-Kind: head\r\n\r\n")
            else:
                await peer.send(ok())

    async with serve(head) as srv, client(f"http://127.0.0.1:{srv.port}") as up:
        resp = await up.request("HEAD", b"/", [])
        assert await resp.read() == b""
        await resp.aclose()
        assert await get(up) == (200, b"ok")
        assert up.connections_created == 1


async def test_interim_100_continue_is_skipped() -> None:
    async def continue_first(peer: Peer) -> None:
        while (await peer.read_request()) is not None:
            await peer.send(b"HTTP/1.1 100 Continue\r\nX-Interim: 1\r\n\r\n")
            await peer.send(b"HTTP/1.1 201 Created\r\nX-Final: 1\r\nContent-Length: 2\r\n\r\nok")

    async with serve(continue_first) as srv, client(f"http://127.0.0.1:{srv.port}") as up:
        for _ in range(2):
            resp = await up.request("PUT", b"/", [], b"data")
            assert (resp.status, resp.reason, resp.headers) == (
                201,
                b"Created",
                [(b"X-Final", b"1"), (b"Content-Length", b"2")],
            )
            assert await resp.read() == b"ok"
            await resp.aclose()
        assert up.connections_created == 1


# -- keep-alive signals from the server -----------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        pytest.param(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", id="connection-close"),
        pytest.param(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", id="http-1.0"),
    ],
)
async def test_server_refusing_keep_alive_is_honoured(answer: bytes) -> None:
    async def no_keep_alive(peer: Peer) -> None:
        # Says the connection ends, yet leaves it open: the client must not reuse it.
        while (await peer.read_request()) is not None:
            await peer.send(answer)

    async with serve(no_keep_alive) as srv, client(f"http://127.0.0.1:{srv.port}") as up:
        assert await get(up) == (200, b"ok")
        assert await get(up) == (200, b"ok")
        assert up.connections_created == 2
        assert up.connections_idle == 0
    assert srv.connections == 2


async def test_body_delimited_by_eof() -> None:
    async def until_eof(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")

    async with serve(until_eof) as srv, client(f"http://127.0.0.1:{srv.port}") as up:
        resp = await up.request("GET", b"/", [])
        assert resp.http_version == "1.1"
        assert await resp.read() == b"until the end"
        await resp.aclose()
        assert up.connections_idle == 0
        assert await get(up) == (200, b"until the end")
    assert srv.connections == 2


async def test_repeated_header_names_are_preserved_in_order() -> None:
    async def cookies(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(
            b"HTTP/1.1 200 Fine Thanks\r\nSet-Cookie: a=1\r\nx-other: o\r\nSet-Cookie: b=2\r\n"
            b"SET-COOKIE: c=3\r\nContent-Length: 0\r\n\r\n"
        )

    async with serve(cookies) as srv, client(f"http://127.0.0.1:{srv.port}") as up:
        resp = await up.request("GET", b"/", [])
        await resp.aclose()
    assert (resp.status, resp.reason, resp.http_version) == (200, b"Fine Thanks", "1.1")
    assert resp.headers == [
        (b"Set-Cookie", b"a=1"),
        (b"x-other", b"o"),
        (b"Set-Cookie", b"b=2"),
        (b"SET-COOKIE", b"c=3"),
        (b"Content-Length", b"0"),
    ]


@pytest.mark.parametrize(
    "garbage",
    [
        pytest.param(b"garbage\r\n\r\n", id="not-http"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n", id="bad-length"),
        pytest.param(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n", id="unasked-upgrade"),
    ],
)
async def test_unparseable_response_raises_protocol_error(garbage: bytes) -> None:
    async def nonsense(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(garbage)
        await asyncio.sleep(1)

    async with serve(nonsense) as srv, client(f"http://127.0.0.1:{srv.port}", retry_budget=5) as up:
        with pytest.raises(ProtocolError):
            await up.request("GET", b"/", [])
        await eventually(lambda: up.connections_open == 0)
    assert len(srv.requests) == 1


async def test_endless_response_head_is_refused() -> None:
    async def endless_head(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\n")
        for i in range(10_000):
            await peer.send(b"X-Filler-%d: %b\r\n" % (i, b"f" * 100))

    async with serve(endless_head) as srv, client(f"http://127.0.0.1:{srv.port}") as up:
        with pytest.raises(ProtocolError, match="head larger than"):
            await up.request("GET", b"/", [])


async def test_abandoned_body_closes_the_connection() -> None:
    async def big_then_small(peer: Peer) -> None:
        while (req := await peer.read_request()) is not None:
            await peer.send(ok(b"y" * (4 * MiB) if req.target == b"/big" else b"small"))

    async with serve(big_then_small) as srv, client(f"http://127.0.0.1:{srv.port}") as up:
        resp = await up.request("GET", b"/big", [])
        await resp.iter_body().__anext__()
        await resp.aclose()  # the rest of the body is still on its way: the connection cannot be reused
        await resp.aclose()  # idempotent
        assert await get(up, b"/small") == (200, b"small")
        assert up.connections_created == 2
    assert srv.connections == 2


async def test_header_injection_is_refused_before_sending() -> None:
    async with serve(answer_all) as srv, client(f"http://127.0.0.1:{srv.port}") as up:
        for target, headers in [
            (b"/", [(b"X-A", b"1\r\nX-Injected: 1")]),
            (b"/", [(b"X-A\n", b"1")]),
            (b"/a\r\nX: 1", []),
            (b"/a HTTP/1.1", []),
        ]:
            with pytest.raises(ValueError):
                await up.request("GET", target, headers)
        with pytest.raises(ValueError):
            await up.request("GET /", b"/", [])
    assert srv.connections == 0


# -- timeouts -------------------------------------------------------------------------------


async def test_slow_response_head_times_out() -> None:
    async def silent(peer: Peer) -> None:
        await peer.read_request()
        await asyncio.sleep(10)

    async with serve(silent) as srv, client(f"http://127.0.0.1:{srv.port}", timeout=0.2, retry_budget=5) as up:
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout):
            await up.request("GET", b"/", [])
        assert time.monotonic() - started < 4.0  # generous: the retry budget is 5 s
        await eventually(lambda: up.connections_open == 0)
    assert srv.connections == 1  # never retried


async def test_stalled_body_times_out_between_reads() -> None:
    async def stall(peer: Peer) -> None:
        await peer.read_request()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nfirst")
        await asyncio.sleep(0.05)
        await peer.send(b"second")  # a gap far shorter than the timeout: fine, even on a loaded machine
        await asyncio.sleep(10)

    async with serve(stall) as srv, client(f"http://127.0.0.1:{srv.port}", timeout=1.0) as up:
        resp = await up.request("GET", b"/", [])
        body = resp.iter_body()
        assert await body.__anext__() == b"first"
        assert await body.__anext__() == b"second"
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout):
            await body.__anext__()
        assert time.monotonic() - started < 1.0 + 3  # generous: the server stays silent for 10 s
        await resp.aclose()
        await eventually(lambda: up.connections_open == 0)
    assert srv.connections == 1


async def test_cancelled_request_closes_its_connection() -> None:
    async def silent(peer: Peer) -> None:
        await peer.read_request()
        await asyncio.sleep(10)

    async with serve(silent) as srv, client(f"http://127.0.0.1:{srv.port}") as up:
        request = asyncio.ensure_future(up.request("GET", b"/", []))
        await eventually(lambda: len(srv.requests) == 1)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        await eventually(lambda: up.connections_open == 0)
        assert up.connections_idle == 0


async def test_closed_client_refuses_requests() -> None:
    async with serve(answer_all) as srv:
        up = Upstream(f"http://127.0.0.1:{srv.port}", timeout=5, retry_budget=5)
        assert await get(up) == (200, b"GET /")
        await up.aclose()
        assert (up.connections_open, up.connections_idle) == (0, 0)
        with pytest.raises(ConnectError):
            await get(up)


# -- TLS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_context(
    cert: trustme.LeafCert, client_ca: trustme.CA | None = None, hellos: list[str | None] | None = None
) -> ssl.SSLContext:
    """A server context; `hellos` collects the SNI of every ClientHello (handshakes that fail included)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    if hellos is not None:
        ctx.sni_callback = lambda sock, name, ctx: hellos.append(name)
    if client_ca is not None:
        ctx.verify_mode = ssl.CERT_REQUIRED
        client_ca.configure_trust(ctx)
    return ctx


def client_context(ca: trustme.CA, cert: trustme.LeafCert | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    if cert is not None:
        cert.configure_cert(ctx)
    return ctx


async def test_tls_verified(ca: trustme.CA) -> None:
    server_ctx = server_context(ca.issue_cert("localhost", "127.0.0.1"))
    async with serve(answer_all, ssl_context=server_ctx) as srv:
        for host in ("localhost", "127.0.0.1"):
            async with client(f"https://{host}:{srv.port}", ssl_context=client_context(ca)) as up:
                assert await get(up) == (200, b"GET /")
                assert await get(up) == (200, b"GET /")
                assert up.connections_created == 1
        assert srv.requests[0].header(b"host") == b"localhost:%d" % srv.port


async def test_tls_unknown_ca_is_a_tls_error(ca: trustme.CA) -> None:
    hellos: list[str | None] = []
    server_ctx = server_context(ca.issue_cert("localhost"), hellos=hellos)
    async with serve(answer_all, ssl_context=server_ctx) as srv:
        ctx = client_context(trustme.CA())
        async with client(f"https://localhost:{srv.port}", ssl_context=ctx, retry_budget=5) as up:
            with pytest.raises(TLSError, match="certificate verification failed.*unable to get local issuer"):
                await get(up)
    assert hellos == ["localhost"]  # one handshake: not retried
    assert srv.connections == 0


async def test_tls_hostname_mismatch_is_a_tls_error(ca: trustme.CA) -> None:
    hellos: list[str | None] = []
    server_ctx = server_context(ca.issue_cert("control-plane.example"), hellos=hellos)
    async with serve(answer_all, ssl_context=server_ctx) as srv:
        async with client(f"https://localhost:{srv.port}", ssl_context=client_context(ca), retry_budget=5) as up:
            with pytest.raises(TLSError, match="mismatch"):
                await get(up)
    assert hellos == ["localhost"]
    assert srv.connections == 0


async def test_mutual_tls_with_a_client_certificate(ca: trustme.CA) -> None:
    seen: list[Any] = []

    async def who(peer: Peer) -> None:
        seen.append(peer.writer.get_extra_info("peercert"))
        await answer_all(peer)

    server_ctx = server_context(ca.issue_cert("127.0.0.1"), client_ca=ca)
    async with serve(who, ssl_context=server_ctx) as srv:
        ctx = client_context(ca, ca.issue_cert("host-a.hosts.example"))
        async with client(f"https://127.0.0.1:{srv.port}", ssl_context=ctx) as up:
            assert await get(up) == (200, b"GET /")
    assert seen[0]["subjectAltName"] == (("DNS", "host-a.hosts.example"),)


async def test_mutual_tls_without_a_client_certificate_is_a_tls_error(ca: trustme.CA) -> None:
    # asyncio's own TLS server drops the connection without sending its alert, so the
    # refusing server here is a plain blocking OpenSSL one, as nginx or haproxy would be.
    server_ctx = server_context(ca.issue_cert("127.0.0.1"), client_ca=ca)
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5)
    outcome: list[BaseException] = []

    def refuse() -> None:
        conn, _ = listener.accept()
        tls = server_ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False)
        with tls:
            try:
                tls.do_handshake()
            except ssl.SSLError as exc:
                outcome.append(exc)
                # Read on (raw) until the client hangs up, so that closing does not turn into a
                # reset that could overtake the alert.
                while select.select([tls], [], [], 5)[0] and os.read(tls.fileno(), 65536):
                    pass

    thread = threading.Thread(target=refuse)
    thread.start()
    try:
        url = f"https://127.0.0.1:{listener.getsockname()[1]}"
        async with client(url, ssl_context=client_context(ca), retry_budget=5) as up:
            with pytest.raises(TLSError, match="CERTIFICATE_REQUIRED|certificate required"):
                await get(up)
    finally:
        await asyncio.to_thread(thread.join, 5)
        listener.close()
    assert outcome and "certificate" in str(outcome[0]).lower()


async def test_stalled_tls_handshake_is_a_connect_timeout_and_not_retried(ca: trustme.CA) -> None:
    async def mute(peer: Peer) -> None:
        await asyncio.sleep(10)  # accepts the TCP connection, never answers the ClientHello

    async with serve(mute) as srv:
        url = f"https://127.0.0.1:{srv.port}"
        async with client(url, ssl_context=client_context(ca), timeout=0.2, retry_budget=5) as up:
            started = time.monotonic()
            with pytest.raises(UpstreamTimeout, match="connecting"):
                await get(up)
            assert time.monotonic() - started < 4.0  # generous: the retry budget is 5 s
            assert up.connections_open == 0
    assert srv.connections == 1


async def test_https_without_context_uses_the_system_trust_store(ca: trustme.CA) -> None:
    server_ctx = server_context(ca.issue_cert("127.0.0.1"))
    async with serve(answer_all, ssl_context=server_ctx) as srv:
        async with client(f"https://127.0.0.1:{srv.port}") as up:
            with pytest.raises(TLSError, match="certificate"):
                await get(up)


def test_bad_urls_are_refused() -> None:
    for url in ("ftp://x", "http://", "127.0.0.1:80", "http://user:pw@host"):
        with pytest.raises(ValueError):
            Upstream(url, timeout=1, retry_budget=0)
    with pytest.raises(ValueError, match="ssl_context"):
        Upstream("http://host", timeout=1, retry_budget=0, ssl_context=ssl.create_default_context())


async def test_each_wait_gets_the_whole_timeout() -> None:
    """One timer per connection re-arms itself: gaps each shorter than the timeout never time
    out, however long the answer takes in all; a longer gap does, counted from its own start.
    Each gap is under a third of the timeout, so a loaded machine does not stretch one past it."""
    gap, timeout = 0.3, 1.0

    async def drip(peer: Peer) -> None:
        await peer.read_request()
        await asyncio.sleep(gap)
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        for _ in range(5):
            await asyncio.sleep(gap)
            await peer.send(b"x")
        await asyncio.sleep(10)

    async with serve(drip) as srv, client(f"http://127.0.0.1:{srv.port}", timeout=timeout) as up:
        started = time.monotonic()
        resp = await up.request("GET", b"/", [])
        body = resp.iter_body()
        for _ in range(5):
            assert await body.__anext__() == b"x"
        assert time.monotonic() - started > timeout  # longer than the timeout in all
        started = time.monotonic()
        with pytest.raises(UpstreamTimeout):
            await body.__anext__()
        assert timeout * 0.9 <= time.monotonic() - started < timeout + 3  # from the last byte, not the start
        await resp.aclose()
