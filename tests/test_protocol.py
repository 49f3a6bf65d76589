"""The seam with uvicorn and httptools (issue 16): every name and signature GuestProtocol
relies on, pinned, so that an upgrade that renames one fails here, not in production; the
guest protocol's transport has no catch-all; a broken seam fails closed.

scripts/check-uvicorn-latest runs this file (and the protocol's other tests) against the
newest uvicorn in a throwaway venv.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import io
import json
import re
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httptools
import pytest
import uvicorn
from uvicorn.protocols.http import flow_control, httptools_impl

from controlplane import tokens
from metadata_proxy.app import ProxyApp
from metadata_proxy.config import ListenAddress, parse_config
from metadata_proxy.forward import build_client
from metadata_proxy.logs import AccessLog
from metadata_proxy.protocol import CoalescingTransport, Deadlines, GuestProtocol, GuestSide
from metadata_proxy.registry import Registry
from metadata_proxy.server import _uvicorn_config, bind_listen
from tests.harness import ControlPlane, free_port, run
from tests.test_hostile import INSTANCE, ClockLoop, RecordingSocket, local_app

# uvicorn's HttpToolsProtocol methods GuestProtocol overrides and calls, with their parameters.
OVERRIDDEN = {
    "__init__": ["self", "config", "server_state", "app_state", "_loop"],  # GuestSide bound before them
    "connection_made": ["self", "transport"],
    "connection_lost": ["self", "exc"],
    "eof_received": ["self"],
    "on_message_begin": ["self"],
    "on_header": ["self", "name", "value"],
    "on_headers_complete": ["self"],
    "on_body": ["self", "body"],
    "on_message_complete": ["self"],
    "on_response_complete": ["self"],
    "pause_writing": ["self"],
    "resume_writing": ["self"],
    "send_400_response": ["self", "msg"],
}
# Attributes of a connected HttpToolsProtocol that GuestProtocol reads or sets.
# uvicorn's HttpToolsProtocol.on_response_complete, statements only (comments and blank lines
# dropped), as GuestProtocol.on_response_complete re-does its non-pipelined branch.
UVICORN_ON_RESPONSE_COMPLETE = [
    "def on_response_complete(self) -> None:",
    "self.server_state.total_requests += 1",
    "if self.transport.is_closing():",
    "return",
    "self._unset_keepalive_if_required()",
    "self.flow.resume_reading()",
    "if self.pipeline:",
    "cycle, app = self.pipeline.pop()",
    "self._start_asgi_task(cycle, app)",
    "else:",
    "self.timeout_keep_alive_task = self.loop.call_later(",
    "self.timeout_keep_alive, self.timeout_keep_alive_handler",
    ")",
]
PROTOCOL_ATTRIBUTES = [
    "parser",
    "cycle",
    "pipeline",
    "scope",
    "headers",
    "transport",
    "flow",
    "client",
    "loop",
    "server_state",
    "timeout_keep_alive_task",
    "expect_100_continue",
]
# RequestResponseCycle's, set in its __init__.
CYCLE_ATTRIBUTES = ["response_started", "response_complete", "disconnected", "keep_alive", "message_event"]


def test_uvicorn_protocol_methods_are_where_the_seam_expects_them() -> None:
    for name, parameters in OVERRIDDEN.items():
        method = getattr(httptools_impl.HttpToolsProtocol, name, None)
        assert callable(method), f"uvicorn's HttpToolsProtocol has no {name}()"
        assert list(inspect.signature(method).parameters) == parameters, name
        assert name in vars(GuestProtocol), f"GuestProtocol no longer overrides {name}"
    assert not hasattr(GuestProtocol, "_start_asgi_task") or "_start_asgi_task" not in vars(GuestProtocol)
    assert set(httptools_impl.STATUS_LINE) >= {400, 408, 429, 431}


def test_uvicorn_attributes_the_seam_reads_exist() -> None:
    init = inspect.getsource(httptools_impl.HttpToolsProtocol.__init__)
    for name in PROTOCOL_ATTRIBUTES:
        assert f"self.{name}" in init or f"self.{name} =" in inspect.getsource(httptools_impl.HttpToolsProtocol), name
    cycle = inspect.getsource(httptools_impl.RequestResponseCycle.__init__)
    for name in CYCLE_ATTRIBUTES:
        assert f"self.{name} =" in cycle, name
    assert "self.read_paused" in inspect.getsource(flow_control.FlowControl.__init__)
    # GuestProtocol.on_response_complete does uvicorn's part itself when nothing is queued
    # (without uvicorn's keep-alive timer): the request count and resuming reads.
    assert "self.total_requests" in inspect.getsource(uvicorn.server.ServerState.__init__)
    # ...and that is all uvicorn's does then, besides the timer: pinned as written, so that an
    # upgrade that adds to it fails here rather than being skipped for every request.
    lines = inspect.getsource(httptools_impl.HttpToolsProtocol.on_response_complete).splitlines()
    code = [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]
    assert code == UVICORN_ON_RESPONSE_COMPLETE, code
    assert list(inspect.signature(flow_control.FlowControl.resume_reading).parameters) == ["self"]
    assert list(inspect.signature(uvicorn.Config).parameters)[:1] == ["app"]
    for option in ("http", "ws", "proxy_headers", "timeout_keep_alive", "server_header", "lifespan"):
        assert option in inspect.signature(uvicorn.Config).parameters, option


def test_uvicorn_builds_each_connection_through_the_factory_it_is_given(tmp_path: Path) -> None:
    """server.py hands uvicorn `functools.partial(GuestProtocol, side)` as its `http`: uvicorn
    keeps a non-string `http` as is and calls it with these keyword arguments."""
    app = local_app(tmp_path)
    factory = functools.partial(GuestProtocol, GuestSide(app))
    config = _uvicorn_config(app, factory)
    config.load()
    kept: object = config.http_protocol_class
    assert kept is factory
    startup = inspect.getsource(uvicorn.Server.startup)
    assert "config.http_protocol_class(" in startup
    for keyword in ("config=config", "server_state=self.server_state", "app_state=self.lifespan.state", "_loop=_loop"):
        assert keyword in startup, keyword


def test_the_idle_keep_alive_has_one_owner(tmp_path: Path) -> None:
    """uvicorn arms its own keep-alive timer (timeout_keep_alive: 5 s) whenever an answer
    completes; GuestProtocol never lets it arm it, so an idle connection closes at its own
    deadline, here 30 s, and never at uvicorn's. Driven on ClockLoop, built as uvicorn builds it."""
    app = local_app(tmp_path, "127.0.0.152")
    side = GuestSide(app, Deadlines(keep_alive_seconds=30.0))
    config = _uvicorn_config(app, functools.partial(GuestProtocol, side))
    config.load()
    assert config.timeout_keep_alive == 5
    loop = ClockLoop()
    protocol = config.http_protocol_class(  # type: ignore[call-arg]
        config=config, server_state=uvicorn.server.ServerState(), app_state={}, _loop=loop
    )
    assert isinstance(protocol, GuestProtocol)
    transport = RecordingSocket("127.0.0.152")
    protocol.connection_made(transport)
    protocol.data_received(INSTANCE)
    loop.advance(0)
    assert transport.written.startswith(b"HTTP/1.1 200 ")
    assert protocol.timeout_keep_alive_task is None  # uvicorn's, never armed
    loop.advance(30 - 0.001)
    assert not transport.closed  # uvicorn's timer would have closed it at 5 s
    protocol.data_received(INSTANCE)  # the next request on the kept connection: idle anew after it
    loop.advance(30 - 0.001)
    assert not transport.closed and transport.written.count(b"HTTP/1.1 200 ") == 2
    loop.advance(0.001)
    assert transport.closed and transport.written.count(b"HTTP/1.1 ") == 2  # closed, nothing more said
    protocol.connection_lost(None)
    assert not side.open_by_peer


def test_the_guest_protocol_keeps_its_own_state_in_slots() -> None:
    """Every attribute GuestProtocol sets on a connection that uvicorn's protocol does not is
    one of its __slots__: on top of uvicorn's, they would give every connection a dict of its
    own (bench/held_memory.py measures what that costs a held long-poll)."""

    def assigned(cls: type) -> set[str]:
        return set(re.findall(r"self\.(\w+)(?:: [^=\n]+)? = ", inspect.getsource(cls)))

    ours = assigned(GuestProtocol) - assigned(httptools_impl.HttpToolsProtocol)
    assert ours and ours <= set(GuestProtocol.__slots__), sorted(ours - set(GuestProtocol.__slots__))


def test_httptools_calls_the_callbacks_by_these_names() -> None:
    calls: list[str] = []

    class Recorder:
        def on_message_begin(self) -> None:
            calls.append("on_message_begin")

        def on_header(self, name: bytes, value: bytes) -> None:
            calls.append("on_header")

        def on_headers_complete(self) -> None:
            calls.append("on_headers_complete")

        def on_chunk_header(self) -> None:
            calls.append("on_chunk_header")

        def on_body(self, body: bytes) -> None:
            calls.append("on_body")

        def on_message_complete(self) -> None:
            calls.append("on_message_complete")

    parser = httptools.HttpRequestParser(Recorder())
    parser.feed_data(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nT: 1\r\n\r\n")
    assert calls == [
        "on_message_begin",
        "on_header",
        "on_header",
        "on_headers_complete",
        "on_chunk_header",
        "on_body",
        "on_chunk_header",
        "on_header",  # the trailer field: after on_headers_complete, which is how it is told apart
        "on_message_complete",
    ]
    upgrade = httptools.HttpRequestParser(Recorder())
    with pytest.raises(httptools.HttpParserUpgrade):
        upgrade.feed_data(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nUpgrade: x\r\n\r\nrest")
    assert upgrade.should_upgrade()
    assert issubclass(httptools.HttpParserCallbackError, httptools.HttpParserError)


def test_the_guest_transport_is_a_transport_with_every_method_its_own() -> None:
    assert issubclass(CoalescingTransport, asyncio.Transport)
    assert "__getattr__" not in vars(CoalescingTransport)
    public = {
        name
        for klass in asyncio.Transport.__mro__
        for name, value in vars(klass).items()
        if not name.startswith("_") and callable(value)
    }
    missing = public - set(vars(CoalescingTransport))
    assert not missing, f"asyncio.Transport methods not spelled out: {missing}"


class Recording(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
async def test_writelines_goes_through_the_buffer_in_order() -> None:
    real = Recording()
    guest = CoalescingTransport(real, asyncio.get_running_loop())
    guest.write(b"a")
    guest.writelines([b"b", bytearray(b"c"), memoryview(b"d")])
    guest.write(b"e")
    assert real.writes == []
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert real.writes == [b"abcde"]
    assert guest.get_write_buffer_size() == 0
    with pytest.raises(RuntimeError):
        guest.set_protocol(asyncio.Protocol())  # a guest connection never switches protocol


# -- a broken seam fails closed ---------------------------------------------------------------


class NoOwner(GuestProtocol):
    """The seam broken as an upgrade of uvicorn could break it: the owner never set."""

    def on_message_begin(self) -> None:
        httptools_impl.HttpToolsProtocol.on_message_begin(self)


@asynccontextmanager
async def served(cp: ControlPlane, tmp_path: Path, protocol: type[GuestProtocol]) -> AsyncIterator[bytes]:
    port = free_port()
    registry = tmp_path / "registry.sqlite3"
    tmp_path.mkdir(exist_ok=True)  # as `hostagent host setup` makes the registry's directory
    config = parse_config(
        {
            "host_id": "host-seam",
            "listen": [f"127.0.0.1:{port}"],
            "registry": str(registry),
            "control_plane": {"url": cp.url, "timeout": 3, "retry_budget": 0.5},
        }
    )
    secret = cp.secret_file.read_bytes().strip()
    vm = json.dumps({"name": "s", "address": "127.0.0.180", "token": tokens.mint("vm-s", (None, secret))})
    run("hostagent", "--registry", str(registry), "vm", "sync", "-", input=vm + "\n")
    client = build_client(config.control_plane)
    app = ProxyApp(config, registry=Registry(config.registry), client=client, access_log=AccessLog(io.StringIO()))
    server = uvicorn.Server(_uvicorn_config(app, functools.partial(protocol, GuestSide(app))))
    server.config.load()
    server.lifespan = server.config.lifespan_class(server.config)
    await server.startup(sockets=[bind_listen(ListenAddress("127.0.0.1", port))])
    try:
        yield (
            b"GET /runtime/whoami HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nMetadata: true\r\nConnection: close\r\n\r\n" % port
        )
    finally:
        server.should_exit = True
        await server.shutdown()
        await client.aclose()


async def connect(request: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection from the registered guest (127.0.0.180) to the server `request` names."""
    port = int(request.split(b"127.0.0.1:")[1].split(b"\r\n")[0])
    sock = socket.socket()
    sock.bind(("127.0.0.180", 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    return await asyncio.open_connection(sock=sock)


async def ask(request: bytes) -> tuple[int, bytes]:
    reader, writer = await connect(request)
    writer.write(request)
    received = await reader.read()
    writer.close()
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


@pytest.mark.anyio
async def test_the_seam_works_and_a_broken_one_fails_closed(cp: ControlPlane, tmp_path: Path) -> None:
    async with served(cp, tmp_path, GuestProtocol) as request:
        status, body = await ask(request)
        assert status == 200 and json.loads(body)["vm_id"] == "vm-s"
    before = cp.requests_seen("/runtime/whoami")
    async with served(cp, tmp_path / "broken", NoOwner) as request:
        status, body = await ask(request)
    assert (status, json.loads(body)["error"]["code"]) == (500, "internal_error")
    assert cp.requests_seen("/runtime/whoami") == before


class Remembered(GuestProtocol):
    """GuestProtocol that keeps its connections, for the test to look at."""

    made: list[GuestProtocol] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        Remembered.made.append(self)
        super().connection_made(transport)


@pytest.mark.anyio
async def test_an_answer_arms_no_uvicorn_keep_alive_timer_and_the_connection_serves_on(
    cp: ControlPlane, tmp_path: Path
) -> None:
    """With nothing queued, GuestProtocol does uvicorn's on_response_complete part itself
    (the request count, resuming reads) without uvicorn's keep-alive timer, a call_later
    and a cancel per request: its own deadline keeps the idle connection."""
    Remembered.made.clear()
    async with served(cp, tmp_path, Remembered) as request:
        keep_alive = request.replace(b"Connection: close\r\n", b"")
        reader, writer = await connect(request)
        try:
            for n in (1, 2):
                writer.write(keep_alive)
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                body = await reader.readexactly(length)
                assert head.startswith(b"HTTP/1.1 200") and json.loads(body)["vm_id"] == "vm-s"
                (protocol,) = Remembered.made
                await asyncio.sleep(0.05)  # the request's task ends
                assert protocol.server_state.total_requests == n
                assert protocol.timeout_keep_alive_task is None
                assert not protocol.transport.is_closing()
        finally:
            writer.close()
