"""Issue 11: hostile guests that smuggle headers in a trailer, switch protocols, dress up
headers with '_', use odd methods, send without end or stop in the middle.

Raw bytes against the real `metadata-proxy serve` and `controlplane serve` processes, each
defect in one write and split in two reads at every byte boundary; the deadlines of every
connection state observed in process, with GuestProtocol's deadlines shortened.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvicorn

from controlplane import tokens
from metadata_proxy.app import ProxyApp
from metadata_proxy.config import ListenAddress, parse_config
from metadata_proxy.forward import build_client
from metadata_proxy.logs import AccessLog
from metadata_proxy.protocol import DRAIN_BYTES, MAX_PIPELINED, Deadlines, GuestProtocol, GuestSide
from metadata_proxy.registry import Registry
from metadata_proxy.server import _uvicorn_config, bind_listen
from tests.harness import ControlPlane, Proxy, free_port, run, running
from tests.test_hostile import Answer, read_answer

ROUTES = """
[limits]
requests_per_second = 100000
burst = 100000
max_concurrent = 8
max_body_bytes = 65536

[[routes]]
prefix = "/runtime/"

[[routes]]
prefix = "/runtime/echo/session/"
guard = "session"
"""


@dataclass
class Greedy:
    proxy: Proxy
    cp: ControlPlane
    addresses: list[str]

    @property
    def host(self) -> bytes:
        return b"127.0.0.1:%d" % self.proxy.port


@pytest.fixture(scope="module")
def greedy(tmp_path_factory: pytest.TempPathFactory, cp: ControlPlane) -> Iterator[Greedy]:
    proxy = Proxy(tmp_path_factory.mktemp("greedy"), cp.url, ROUTES).start()
    secret = cp.secret_file.read_bytes().strip()
    addresses = [f"127.0.0.{60 + i}" for i in range(8)]
    lines = [
        json.dumps({"name": f"g{i}", "address": a, "token": tokens.mint(f"vm-g{i}", (None, secret))})
        for i, a in enumerate(addresses)
    ]
    proxy.hostagent("vm", "sync", "-", input="\n".join(lines) + "\n")
    with running(proxy):
        yield Greedy(proxy, cp, addresses)


def splits(data: bytes) -> Iterator[list[bytes]]:
    """`data` in one write, then in two at every byte boundary."""
    yield [data]
    for i in range(1, len(data)):
        yield [data[:i], data[i:]]


def talk(greedy: Greedy, source: str, parts: list[bytes], timeout: float = 5) -> tuple[list[Answer], bool]:
    """Send `parts` as separate reads, then every answer until the proxy closes (True) or
    goes quiet for `timeout` (False)."""
    sock = socket.create_connection(("127.0.0.1", greedy.proxy.port), source_address=(source, 0), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    answers: list[Answer] = []
    closed = False
    with sock, sock.makefile("rb") as reader:
        for i, part in enumerate(parts):
            if i:
                time.sleep(0.002)  # a read of its own
            try:
                sock.sendall(part)
            except (BrokenPipeError, ConnectionResetError):
                break
        try:
            while True:
                answers.append(read_answer(reader))
        except ConnectionError:  # "closed without an answer" (EOF) or reset
            closed = True
        except TimeoutError:
            pass
    return answers, closed


def reached(greedy: Greedy, path: str) -> int:
    return greedy.cp.requests_seen(path)


# -- 1. trailer fields are never headers ------------------------------------------------------


def chunked(method: bytes, target: bytes, head: list[bytes], trailer: list[bytes]) -> bytes:
    lines = [method + b" " + target + b" HTTP/1.1", *head, b"Transfer-Encoding: chunked", b"Connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n5\r\nhello\r\n0\r\n" + b"".join(t + b"\r\n" for t in trailer) + b"\r\n"


@pytest.mark.parametrize(
    "case", ["metadata", "host", "session-token", "ttl", "injected"], ids=lambda case: f"{case}-in-trailer"
)
def test_trailer_fields_are_never_headers(greedy: Greedy, case: str) -> None:
    """Issue 11, defect 1, byte for byte: each field only in the trailer, at every split."""
    host = b"Host: " + greedy.host
    source = greedy.addresses[0]
    if case == "metadata":
        data, path, expected = chunked(b"POST", b"/runtime/echo", [host], [b"Metadata: true"]), "/runtime/echo", 400
        code: str | None = "missing_metadata_header"
    elif case == "host":
        data = chunked(b"POST", b"/runtime/echo", [b"Metadata: true"], [host])
        path, expected, code = "/runtime/echo", 403, "bad_host"
    elif case == "session-token":
        token_request = b"PUT /metadata/v1/token HTTP/1.1\r\n%b\r\nMetadata: true\r\n" % host
        token_request += b"X-Metadata-Token-TTL-Seconds: 600\r\nConnection: close\r\n\r\n"
        (answer,), _ = talk(greedy, source, [token_request])
        token = answer.body
        data = chunked(b"POST", b"/runtime/echo/session/x", [host], [b"X-Metadata-Token: " + token])
        path, expected, code = "/runtime/echo/session/x", 401, "invalid_session_token"
    elif case == "ttl":
        data = chunked(b"PUT", b"/metadata/v1/token", [host, b"Metadata: true"], [b"X-Metadata-Token-TTL-Seconds: 60"])
        path, expected, code = "/metadata/v1/token", 400, "invalid_ttl"
    else:
        data = chunked(b"POST", b"/runtime/echo", [host, b"Metadata: true"], [b"X-Injected: 1", b"Metadata: false"])
        path, expected, code = "/runtime/echo", 200, None
    before = reached(greedy, path)
    for parts in splits(data):
        answers, closed = talk(greedy, source, parts)
        assert [(a.status, a.code) for a in answers] == [(expected, code)], (parts, answers)
        assert closed, parts
        if expected == 200:
            echo = answers[0].json()
            names = {name.lower() for name, _ in echo["headers"]}
            assert "x-injected" not in names and echo["body_length"] == 5, parts
            assert [value for name, value in echo["headers"] if name.lower() == "metadata"] == ["true"]
    assert reached(greedy, path) - before == (len(data) if expected == 200 else 0)


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


# The proxy's resident memory may grow by at most this much across the floods below (today's
# code: about 120 MB for one). What does grow is the allocator's high-water mark for the
# reads in flight, not what the guests sent.
FLOOD_RSS_BOUND = 16 * 1024 * 1024


def test_a_trailer_flood_is_bounded_in_memory_and_time(greedy: Greedy) -> None:
    """Issue 11, defect 2: 5 MB of trailer fields that never end, on 8 connections at once:
    each connection is closed (431 or, once answered, just closed) well before the flood is
    sent, and the proxy's RSS stays within FLOOD_RSS_BOUND."""
    pid = greedy.proxy.process.pid if greedy.proxy.process else 0
    warm, _ = talk(greedy, greedy.addresses[1], [b"GET /runtime/whoami HTTP/1.1\r\nHost: %b\r\n\r\n" % greedy.host])
    before = rss(pid)
    # A POST: the app reads its body, so the trailer's own bound must end it (a GET with a
    # chunked body is refused at its head, and its drain bounds the rest).
    head = b"POST /runtime/echo HTTP/1.1\r\nHost: %b\r\nMetadata: true\r\nTransfer-Encoding: chunked\r\n\r\n"
    flood = head % greedy.host + b"5\r\nhello\r\n0\r\n" + b"a:b\r\n" * 1_000_000  # never the final CRLF
    outcomes: list[tuple[list[Answer], bool, float]] = []

    def one(source: str) -> None:
        started = time.monotonic()
        answers, closed = talk(greedy, source, [flood], timeout=20)
        outcomes.append((answers, closed, time.monotonic() - started))

    threads = [threading.Thread(target=one, args=(greedy.addresses[i % 8],)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    after = rss(pid)
    assert len(outcomes) == 8
    for answers, closed, _ in outcomes:
        assert closed, answers
        assert all((a.status, a.code) in ((200, None), (431, "headers_too_large")) for a in answers), answers
    assert after - before < FLOOD_RSS_BOUND, f"RSS {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB"
    print(f"RSS before {before / 2**20:.1f} MiB, after 8 floods of 5 MB {after / 2**20:.1f} MiB")


# -- 3. Upgrade never changes framing ---------------------------------------------------------


SMUGGLED = b"GET /runtime/smuggled HTTP/1.1\r\nHost: %b\r\nMetadata: true\r\n\r\n"


def test_an_upgrade_request_with_a_body_is_refused_and_closed(greedy: Greedy) -> None:
    head = b"POST /runtime/echo HTTP/1.1\r\nHost: %b\r\nMetadata: true\r\nConnection: Upgrade\r\nUpgrade: foo\r\n"
    data = head % greedy.host + b"Content-Length: 5\r\n\r\nhello"
    before = reached(greedy, "/runtime/echo")
    for parts in splits(data):
        answers, closed = talk(greedy, greedy.addresses[2], parts)
        assert [(a.status, a.code, a.header("connection")) for a in answers] == [(400, "bad_request", "close")]
        assert closed
    assert reached(greedy, "/runtime/echo") == before


def test_a_body_after_an_upgrade_head_is_never_a_request(greedy: Greedy) -> None:
    """Defect 3's smuggle: a refused POST (no Metadata) whose body is a GET."""
    smuggled = SMUGGLED % greedy.host
    head = b"POST /runtime/echo HTTP/1.1\r\nHost: %b\r\nConnection: Upgrade\r\nUpgrade: foo\r\n" % greedy.host
    data = head + b"Content-Length: %d\r\n\r\n" % len(smuggled) + smuggled
    before = reached(greedy, "/runtime/smuggled")
    for parts in splits(data):
        answers, closed = talk(greedy, greedy.addresses[2], parts)
        assert len(answers) == 1 and answers[0].status == 400, (parts, answers)
        assert closed
    assert reached(greedy, "/runtime/smuggled") == before


def test_requests_pipelined_around_an_upgrade_are_answered_or_closed(greedy: Greedy) -> None:
    plain = b"GET /runtime/whoami HTTP/1.1\r\nHost: %b\r\nMetadata: true\r\n\r\n" % greedy.host
    upgrade = plain.replace(b"\r\n\r\n", b"\r\nConnection: upgrade\r\nUpgrade: h2c\r\n\r\n")
    before = reached(greedy, "/runtime/whoami")
    for parts in splits(plain + upgrade + plain):
        answers, closed = talk(greedy, greedy.addresses[3], parts)
        # The first answered, the upgrade refused, the one behind it never read: closed.
        assert [(a.status, a.code) for a in answers] == [(200, None), (400, "bad_request")], (parts, answers)
        assert closed
    assert reached(greedy, "/runtime/whoami") - before == len(plain + upgrade + plain)


# -- 4. header names with '_', methods, override headers --------------------------------------


@pytest.mark.parametrize("header", [b"X_Forwarded_For: 6.6.6.6", b"X_Metadata_Proxy_Host: evil", b"Metadata_: x"])
def test_underscore_header_names_are_refused(greedy: Greedy, header: bytes) -> None:
    head = b"GET /runtime/echo HTTP/1.1\r\nHost: %b\r\nMetadata: true\r\nConnection: close\r\n" % greedy.host
    data = head + header + b"\r\n\r\n"
    before = reached(greedy, "/runtime/echo")
    for parts in splits(data):
        answers, _ = talk(greedy, greedy.addresses[4], parts)
        assert [(a.status, a.code) for a in answers] == [(400, "bad_request")], parts
    assert reached(greedy, "/runtime/echo") == before


@pytest.mark.parametrize("method", [b"PROPFIND", b"PURGE", b"M-SEARCH", b"TRACE", b"MKCOL", b"LINK"])
def test_only_the_allowed_methods_are_forwarded(greedy: Greedy, method: bytes) -> None:
    data = method + b" /runtime/echo HTTP/1.1\r\nHost: %b\r\nMetadata: true\r\nConnection: close\r\n\r\n" % greedy.host
    before = reached(greedy, "/runtime/echo")
    answers, _ = talk(greedy, greedy.addresses[4], [data])
    assert [(a.status, a.code) for a in answers] == [(405, "method_not_allowed")]
    assert answers[0].header("allow") == "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
    assert reached(greedy, "/runtime/echo") == before


def test_override_headers_are_stripped(greedy: Greedy) -> None:
    overrides = [
        b"X-HTTP-Method-Override: DELETE",
        b"X-HTTP-Method: DELETE",
        b"X-Method-Override: DELETE",
        b"X-Original-URL: /admin",
        b"X-Rewrite-URL: /admin",
        b"X-Forwarded-Host: evil.example",
        b"X-Forwarded-Proto: https",
        b"X-Forwarded-Port: 443",
        b"X-Forwarded-Prefix: /evil",
    ]
    head = b"GET /runtime/echo HTTP/1.1\r\nHost: %b\r\nMetadata: true\r\nConnection: close\r\n" % greedy.host
    answers, _ = talk(greedy, greedy.addresses[4], [head + b"\r\n".join(overrides) + b"\r\n\r\n"])
    echo = answers[0].json()
    names = {name.lower() for name, _ in echo["headers"]}
    assert echo["method"] == "GET" and echo["raw_path"] == "/runtime/echo"
    assert not names & {line.split(b":")[0].decode().lower() for line in overrides}
    assert [value for name, value in echo["headers"] if name.lower() == "x-forwarded-for"] == ["127.0.0.64"]


def test_pipelining_is_bounded(greedy: Greedy) -> None:
    """Thousands of requests in one read: the queue stops at MAX_PIPELINED, those read are
    answered (the last with Connection: close) and the connection closes."""
    one = b"GET /metadata/v1/instance HTTP/1.1\r\nHost: %b\r\nMetadata: true\r\n\r\n" % greedy.host
    answers, closed = talk(greedy, greedy.addresses[5], [one * 3000])
    assert closed
    assert 1 < len(answers) <= MAX_PIPELINED + 2, len(answers)
    assert all(a.status == 200 for a in answers)
    assert answers[-1].header("connection") == "close"


# -- 2. a deadline in every state, in process with short ones ---------------------------------

SHORT = Deadlines(header_timeout=0.5, body_timeout=1.0, drain_seconds=0.5, keep_alive_seconds=0.6)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@contextlib.asynccontextmanager
async def short_deadlines(cp: ControlPlane, tmp_path: Path) -> AsyncIterator[tuple[int, bytes]]:
    port = free_port()
    registry = tmp_path / "registry.sqlite3"
    config = parse_config(
        {
            "host_id": "host-deadlines",
            "listen": [f"127.0.0.1:{port}"],
            "registry": str(registry),
            "control_plane": {"url": cp.url, "timeout": 3, "retry_budget": 0.5},
            "routes": [{"prefix": "/runtime/"}],
        }
    )
    secret = cp.secret_file.read_bytes().strip()
    vm = json.dumps({"name": "d", "address": "127.0.0.170", "token": tokens.mint("vm-d", (None, secret))})
    run("hostagent", "--registry", str(registry), "vm", "sync", "-", input=vm + "\n")
    client = build_client(config.control_plane)
    app = ProxyApp(config, registry=Registry(config.registry), client=client, access_log=AccessLog(io.StringIO()))
    server = uvicorn.Server(_uvicorn_config(app, functools.partial(GuestProtocol, GuestSide(app, SHORT))))
    server.config.load()
    server.lifespan = server.config.lifespan_class(server.config)
    listener = bind_listen(ListenAddress("127.0.0.1", port))
    # Small kernel buffers, inherited by each accepted socket: what the guest got to send is
    # then close to what the proxy read.
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    await server.startup(sockets=[listener])
    try:
        yield port, f"127.0.0.1:{port}".encode()
    finally:
        server.should_exit = True
        await server.shutdown()
        await client.aclose()


async def closed_after(port: int, parts: list[tuple[bytes, float]]) -> tuple[float, bytes, int]:
    """Connect from the VM, send each part after its pause (until the proxy closes), then
    read until it closes: (seconds from the last part sent to the close, everything
    received, how many parts were sent)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.170", 0))
    loop = asyncio.get_running_loop()
    received = b""
    count = 0
    try:
        for data, pause in parts:
            await asyncio.sleep(pause)
            if reader.at_eof() or writer.is_closing():
                break
            try:
                writer.write(data)
                await writer.drain()
            except ConnectionError:
                break
            count += 1
            try:  # what has come so far, without waiting
                async with asyncio.timeout(0.001):
                    received += await reader.read(65536)
            except TimeoutError:
                pass
            except ConnectionError:  # reset: closed with our bytes unread, which is a close too
                break
        sent = loop.time()
        with contextlib.suppress(ConnectionError):
            async with asyncio.timeout(10):  # generous: the point is that it closes at all
                while chunk := await reader.read(65536):
                    received += chunk
        return loop.time() - sent, received, count
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def status_code(received: bytes) -> tuple[int, str | None]:
    head, _, body = received.partition(b"\r\n\r\n")
    status = int(head.split()[1])
    return status, json.loads(body)["error"]["code"] if b"application/json" in head and status >= 400 else None


@pytest.mark.anyio
async def test_every_connection_state_has_a_deadline(cp: ControlPlane, tmp_path: Path) -> None:
    margin = 1.5  # generous: time is the point, but the machine is shared
    async with short_deadlines(cp, tmp_path) as (port, host):
        get = b"GET /runtime/whoami HTTP/1.1\r\nHost: %b\r\nMetadata: true\r\n\r\n" % host
        post = b"POST /runtime/echo HTTP/1.1\r\nHost: %b\r\nMetadata: true\r\nContent-Length: 100\r\n\r\n" % host
        refused = post.replace(b"Metadata: true\r\n", b"")
        chunked = (
            b"POST /runtime/echo HTTP/1.1\r\nHost: %b\r\nMetadata: true\r\nTransfer-Encoding: chunked\r\n\r\n" % host
        )

        # Connected, nothing sent: a silent close at the first-byte deadline.
        waited, received, _ = await closed_after(port, [])
        assert received == b"" and SHORT.header_timeout - 0.1 <= waited < SHORT.header_timeout + margin

        # A head that never ends: 408.
        waited, received, _ = await closed_after(port, [(get[:20], 0)])
        assert status_code(received) == (408, "request_timeout")
        assert waited < SHORT.header_timeout + margin

        # A body that never ends, the app reading it: 408 at the body deadline.
        waited, received, _ = await closed_after(port, [(post + b"x" * 10, 0)])
        assert status_code(received) == (408, "request_timeout")
        assert SHORT.body_timeout - 0.1 <= waited < SHORT.body_timeout + margin

        # A trailer that never ends, dripped within the body's idle timeout: 408.
        drip = [(chunked + b"5\r\nhello\r\n0\r\n", 0)] + [(b"a:b\r\n", 0.2)] * 15
        waited, received, sent = await closed_after(port, drip)
        assert status_code(received) == (408, "request_timeout") and sent < len(drip)

        # The rest of a body answered early, dripped: closed at the drain deadline.
        drip = [(refused + b"x" * 10, 0)] + [(b"x", 0.1)] * 30
        waited, received, sent = await closed_after(port, drip)
        assert status_code(received) == (400, "missing_metadata_header")
        assert received.count(b"HTTP/1.1") == 1
        assert sent < len(drip)  # closed while the guest was still dripping (3 s of drips)

        # An idle kept-alive connection after a complete exchange: closed at its deadline.
        waited, received, _ = await closed_after(port, [(get, 0)])
        assert status_code(received) == (200, None)
        assert waited < SHORT.keep_alive_seconds + 3 + margin  # the upstream call, then the deadline

        # The rest of a body answered early, sent in time: the connection serves the next request.
        waited, received, _ = await closed_after(port, [(refused + b"x" * 10, 0), (b"x" * 90, 0.1), (get, 0.05)])
        assert received.count(b"HTTP/1.1 400") == 1 and received.count(b"HTTP/1.1 200") == 1


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("header", "answered"),
    [(b"", b"HTTP/1.1 400"), (b"Metadata: true\r\n", b"HTTP/1.1 413")],
    ids=["refused", "too-large"],
)
async def test_the_drain_after_an_early_answer_is_bounded_in_bytes(
    cp: ControlPlane, tmp_path: Path, header: bytes, answered: bytes
) -> None:
    async with short_deadlines(cp, tmp_path) as (port, host):
        head = b"POST /runtime/echo HTTP/1.1\r\nHost: %b\r\n%bContent-Length: 100000000\r\n\r\n" % (host, header)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        sock.bind(("127.0.0.170", 0))
        sock.connect(("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=sock)
        try:
            writer.write(head)
            answer = await reader.readuntil(b"}}")
            assert answer.startswith(answered), answer
            sent = 0
            with contextlib.suppress(ConnectionError):
                async with asyncio.timeout(5):
                    while sent < 16 * 1024 * 1024:  # bounded: 16 MiB at most
                        writer.write(b"x" * 65536)
                        await writer.drain()
                        sent += 65536
            # Closed after the protocol's lingering close (DRAIN_BYTES), plus what the small
            # buffers held: one drain, whoever refused (the app's 413 has no second one).
            assert sent < DRAIN_BYTES + 1024 * 1024
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
