"""A hostile guest against the real `metadata-proxy serve` and `controlplane serve`: the
attacks the other hostile suites (test_hostile, test_slow_greedy) did not cover and that
broke something. Raw bytes; each refusal asserts status, code, that nothing reached the
control plane, and that the VM is served after.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from controlplane import tokens
from metadata_proxy.app import ProxyApp
from metadata_proxy.config import parse_config
from metadata_proxy.forward import build_client
from metadata_proxy.logs import AccessLog
from metadata_proxy.owners import OWNER_KEY
from metadata_proxy.protocol import MAX_PIPELINED, Deadlines, GuestProtocol, GuestSide
from metadata_proxy.registry import Registry
from metadata_proxy.server import _uvicorn_config
from tests.harness import ControlPlane, Proxy, run, running
from tests.test_hostile import (
    INSTANCE,
    Answer,
    ClockLoop,
    Conn,
    Fleet,
    RecordingSocket,
    exchange,
    in_flight,
    local_app,
    quietly,
    refused,
    request,
    serves,
)
from tests.test_slow_greedy import rss

ROUTES = """
[limits]
requests_per_second = 500
burst = 1000

[[routes]]
prefix = "/runtime/"

[[routes]]
prefix = "/runtime/echo/priv/"
privileged_port = true

[[routes]]
prefix = "/runtime/echo/session/"
guard = "session"

[[routes]]
prefix = "/runtime/slow/"
timeout = 20
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, cp: ControlPlane) -> Iterator[Fleet]:
    proxy = Proxy(tmp_path_factory.mktemp("attack"), cp.url, ROUTES, 'host_aliases = ["metadata.internal"]').start()
    with running(proxy):
        yield Fleet(proxy, cp, [f"a{i:02d}" for i in range(8)], 160)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


# -- route matching: a narrower route's guard is not bypassed through a wider one -------------


@pytest.mark.parametrize(
    "target",
    [
        # An empty segment: nginx (merge_slashes), Spring and path-cleaning routers read
        # `/runtime/echo/priv/x`; the proxy matched `/runtime/` and skipped the port rule.
        b"/runtime/echo//priv/x",
        b"/runtime//echo/priv/x",
        b"/runtime/echo///priv/",
        # Path parameters: Tomcat, Jetty and Spring drop `;x` from a segment before routing.
        b"/runtime/echo;x/priv/x",
        b"/runtime;x/echo/priv/x",
        b"/runtime/echo/priv;x",  # the route's bare name, with a parameter
        b"/runtime/echo/priv;/x",
        b"/runtime/echo%3bx/priv/x",  # the same, percent-encoded
        # The session route's token check, likewise.
        b"/runtime/echo//session/x",
        b"/runtime/echo/session;x",
        # Another case: Express and ASP.NET Core route case-insensitively by default.
        b"/runtime/echo/PRIV/x",
        b"/runtime/echo/Priv/",
        b"/runtime/Echo/priv/x",
        b"/runtime/echo/Priv",  # the route's bare name
        b"/runtime/echo/PRIV%3bx/y",
        b"/runtime/echo/SESSION/x",
    ],
)
def test_a_narrower_routes_guard_is_not_bypassed_by_how_upstream_reads_the_path(
    fleet: Fleet, cp: ControlPlane, target: bytes
) -> None:
    vm = fleet.vms[0]
    refused(fleet, cp, vm, request(fleet, target), 404, "not_found")


def test_paths_with_parameters_or_empty_segments_inside_one_route_are_forwarded(fleet: Fleet) -> None:
    vm = fleet.vms[1]
    inside = (b"/runtime/echo/a;b", b"/runtime/echo//a", b"/runtime/echo/a;b/c")
    for target in (*inside, b"/runtime/echo/ABC", b"/runtime/echo/Private/x"):  # in any case, still /runtime/'s
        answer = exchange(fleet, vm.address, request(fleet, target))
        assert answer.status == 200, (target, answer)
        assert (answer.json()["raw_path"].encode(), answer.json()["vm_id"]) == (target, vm.vm_id)


# -- headers towards the control plane ------------------------------------------------------

CLIENT_ADDRESS_HEADERS = [
    "Client-IP",
    "True-Client-IP",
    "X-Client-IP",
    "X-Cluster-Client-IP",
    "CF-Connecting-IP",
    "Fastly-Client-IP",
    "X-Original-Forwarded-For",
    "X-Originating-IP",
    "X-Remote-IP",
    "X-Remote-Addr",
    "X-Forwarded",
    "Forwarded-For",
]


def test_client_address_headers_never_reach_the_control_plane(fleet: Fleet) -> None:
    """A framework whose trusted proxies include private ranges (a VM's address is one) skips
    the proxy's X-Forwarded-For and takes the client's address from these (Rails' remote_ip:
    Client-IP): the guest would choose the address the control plane sees."""
    vm = fleet.vms[2]
    answer = exchange(
        fleet, vm.address, request(fleet, "/runtime/echo/x", [(h, "10.9.9.9") for h in CLIENT_ADDRESS_HEADERS])
    )
    assert answer.status == 200, answer
    sent = answer.json()["headers"]
    assert [name for name, value in sent if value == "10.9.9.9"] == []
    assert [value for name, value in sent if name == "x-forwarded-for"] == [vm.address]


def test_weblogic_client_address_header_never_reaches_the_control_plane(fleet: Fleet) -> None:
    """WL-Proxy-Client-IP is the client-address header of WebLogic's proxy plug-in, read as the
    client's address by Java stacks behind it (and by the widespread `getIpAddr()` idiom, after
    X-Forwarded-For and Proxy-Client-IP): like the headers above, the guest must not set it."""
    vm = fleet.vms[2]
    answer = exchange(fleet, vm.address, request(fleet, "/runtime/echo/x", [("WL-Proxy-Client-IP", "10.9.9.9")]))
    assert answer.status == 200, answer
    assert [name for name, value in answer.json()["headers"] if value == "10.9.9.9"] == []


# The client-address headers of CDNs, load balancers and WAFs that the list above misses, each
# documented by its vendor as the client's address and read as such by the stacks behind it
# (npm's request-ip reads DO-Connecting-IP, X-AppEngine-User-IP and CF-Pseudo-IPv4; Azure
# Front Door's X-Azure-ClientIP/SocketIP; Envoy's X-Envoy-External-Address; Imperva's
# Incap-Client-IP; Google's X-ProxyUser-IP): like WL-Proxy-Client-IP, the guest must not set them.
MORE_CLIENT_ADDRESS_HEADERS = [
    "CF-Connecting-IPv6",
    "CF-Pseudo-IPv4",
    "DO-Connecting-IP",
    "X-AppEngine-User-IP",
    "X-Azure-ClientIP",
    "X-Azure-SocketIP",
    "X-Envoy-External-Address",
    "Incap-Client-IP",
    "X-ProxyUser-IP",
    "X-Appengine-Remote-Addr",  # gin's TrustedPlatform for Google App Engine
    "Fly-Client-IP",  # gin's for Fly.io
    "X-ARR-ClientIP",
    "X-Sucuri-ClientIP",
    "CloudFront-Viewer-Address",
    "X-Vercel-Forwarded-For",
    "X-NF-Client-Connection-IP",
]


@pytest.mark.parametrize("name", MORE_CLIENT_ADDRESS_HEADERS)
def test_vendor_client_address_headers_never_reach_the_control_plane(fleet: Fleet, name: str) -> None:
    """Each header above, from the guest, with a public address: the control plane sees only
    the proxy's X-Forwarded-For (the VM's address), never the guest's choice."""
    vm = fleet.vms[2]
    answer = exchange(fleet, vm.address, request(fleet, "/runtime/echo/x", [(name, "203.0.113.9")]))
    assert answer.status == 200, answer
    sent = answer.json()["headers"]
    assert [header for header, value in sent if "203.0.113.9" in value] == []
    assert [value for header, value in sent if header == "x-forwarded-for"] == [vm.address]


# -- bytes read for a request's body: bounded however it is framed ---------------------------

# What a guest may send of each flood below; the proxy must have stopped reading long before.
FLOOD_BYTES = 32 * 1024 * 1024
# The proxy stops reading a body once it is refused, after at most its lingering close
# (protocol.DRAIN_BYTES); what the kernel's buffers took meanwhile comes on top.
READ_BOUND = 8 * 1024 * 1024


@contextlib.contextmanager
def flooding(conn: Conn, piece: bytes = b"z" * 65536) -> Iterator[list[int]]:
    """Send `piece` over and over on `conn` (FLOOD_BYTES at most) from a thread while the body
    of the `with` reads; yields the count of bytes sent so far (`[n]`). On exit the socket is
    shut down (reset already, or not: the pump stops either way) and the thread joined."""
    sent = [0]

    def pump() -> None:
        with contextlib.suppress(OSError):
            while sent[0] < FLOOD_BYTES:
                conn.sock.sendall(piece)
                sent[0] += len(piece)

    thread = threading.Thread(target=pump)
    thread.start()
    try:
        yield sent
    finally:
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_RDWR)
        thread.join()


def flood(fleet: Fleet, source: str, head: bytes, piece: bytes) -> tuple[Answer, int]:
    """Send `head`, then `piece` over and over (FLOOD_BYTES at most) while reading the answer:
    the answer and how many bytes were sent before the proxy closed (or the flood ended)."""
    with Conn(fleet, source, timeout=20) as conn:
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        conn.send(head)
        with flooding(conn, piece) as sent:
            answer = conn.answer()
            assert conn.closed(within=10)
    return answer, sent[0]


def test_chunk_extensions_without_end_are_not_read_without_end(fleet: Fleet, cp: ControlPlane) -> None:
    """A chunk-size line that never ends: `1;aaaa...`. llhttp hands chunk extensions to no
    callback and buffers none of them, so nothing counted them: the proxy read and parsed
    them at wire speed (GBs on loopback, a core busy) until the app's body idle timeout
    (10 s), the body limit (64 KiB here) never reached: no byte of body data ever came.
    (Node's CVE-2024-22019.) Now framing out of proportion to the body is refused."""
    vm = fleet.vms[3]
    head = request(fleet, "/runtime/echo", [("Transfer-Encoding", "chunked")], method="POST") + b"1;"

    def once() -> None:
        answer, sent = flood(fleet, vm.address, head, b"a" * 65536)
        assert (answer.status, answer.code) == (400, "bad_request"), answer
        assert sent < READ_BOUND, sent

    quietly(cp, once)
    serves(fleet, vm)


def test_many_tiny_chunks_are_not_read_without_end(fleet: Fleet, cp: ControlPlane) -> None:
    """The same with every chunk carrying one byte of data and a long extension: the body
    limit counts one byte per chunk, the wire carries 64 KiB."""
    vm = fleet.vms[3]
    head = request(fleet, "/runtime/echo", [("Transfer-Encoding", "chunked")], method="POST")

    def once() -> None:
        answer, sent = flood(fleet, vm.address, head, b"1;" + b"e" * 65530 + b"\r\nx\r\n")
        assert (answer.status, answer.code) == (400, "bad_request"), answer
        assert sent < READ_BOUND, sent

    quietly(cp, once)
    serves(fleet, vm)


@pytest.mark.parametrize("target", ["/runtime/slow/x?seconds=5", "/runtime/slow?seconds=5"])
def test_a_chunked_body_on_a_get_is_not_read_without_end(fleet: Fleet, cp: ControlPlane, target: str) -> None:
    """A GET's body is never forwarded, so nothing counted it against max_body_bytes: a
    declared one is refused by its Content-Length (413), but a chunked one was read and
    dropped for as long as the call took (on a long-poll route the wait for the guest's
    disconnect reads it: minutes of wire-speed reading, a core busy). A GET or HEAD with a
    chunked body is refused, before anything is forwarded."""
    vm = fleet.vms[4]
    head = request(fleet, target, [("Transfer-Encoding", "chunked")])
    piece = b"%x\r\n%b\r\n" % (65536, b"b" * 65536)

    def once() -> None:
        answer, sent = flood(fleet, vm.address, head, piece)
        assert (answer.status, answer.code) == (400, "bad_request"), answer
        assert sent < READ_BOUND, sent

    quietly(cp, once)
    data = request(fleet, target, [("Transfer-Encoding", "chunked")]) + b"0\r\n\r\n"  # even an empty one
    refused(fleet, cp, vm, data, 400, "bad_request")


def test_chunked_bodies_in_proportion_are_forwarded(fleet: Fleet) -> None:
    """Small chunks with extensions, as streaming clients send them, within the proportion."""
    vm = fleet.vms[4]
    body = b"".join(b"%x;name=value\r\n%b\r\n" % (16, b"%016d" % i) for i in range(2000)) + b"0\r\n\r\n"
    head = request(fleet, "/runtime/echo", [("Transfer-Encoding", "chunked")], method="POST")
    answer = exchange(fleet, vm.address, head + body)
    assert answer.status == 200, answer
    assert (answer.json()["body_length"], answer.json()["vm_id"]) == (32000, vm.vm_id)


@pytest.mark.parametrize("stop", ["upgrade", "pipelined"])
def test_nothing_more_is_read_once_parsing_stops(fleet: Fleet, stop: str) -> None:
    """After an Upgrade head, or MAX_PIPELINED requests queued, the protocol parses nothing
    more: the requests read before are answered, then the connection closes. But it went on
    reading, and dropping, whatever the guest sent meanwhile: each answer resumed reading
    for the next queued request, for as long as they took (a long-poll: minutes; here GBs
    read in 3 s). Now it reads no more once stopped."""
    vm = fleet.vms[5]
    held = request(fleet, "/runtime/slow/x?seconds=3")  # a long-poll route: held at the control plane
    if stop == "upgrade":
        last = [request(fleet, "/runtime/echo", [("Connection", "Upgrade"), ("Upgrade", "websocket")])]
    else:
        last = [request(fleet, "/metadata/v1/instance")] * 20
    answers: list[Answer] = []
    with Conn(fleet, vm.address, timeout=20) as conn:
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        conn.send(request(fleet, "/runtime/whoami") + held + b"".join(last))
        with flooding(conn) as sent, contextlib.suppress(ConnectionError):
            while True:
                answers.append(conn.answer())
    statuses = [(a.status, a.code) for a in answers]
    assert statuses[:2] == [(200, None), (200, None)], statuses
    assert answers[1].json() == {"slept": 3.0}
    assert statuses[-1] == ((400, "bad_request") if stop == "upgrade" else (200, None)), statuses
    assert answers[-1].header("connection") == "close"
    assert sent[0] < READ_BOUND, sent[0]
    serves(fleet, vm)


# Once parsing stops: DRAIN_BYTES read and dropped, one read (256 KiB) more, what came before.
STOPPED_READ_BOUND = 2 * 1024 * 1024


def bytes_read(proxy: Proxy) -> int:
    """What the proxy process has read so far, sockets included (/proc/PID/io `rchar`)."""
    assert proxy.process is not None
    io = Path(f"/proc/{proxy.process.pid}/io").read_text()
    return int(next(line.split()[1] for line in io.splitlines() if line.startswith("rchar:")))


def test_queued_requests_with_bodies_do_not_resume_reading_once_parsing_stops(fleet: Fleet) -> None:
    """MAX_PIPELINED requests with a body queued behind a long-poll, then a flood: once past
    DRAIN_BYTES the stopped connection paused reading, but uvicorn's receive() resumes it
    whenever the app reads a body, complete or not: each queued POST let one more read
    (256 KiB) in, twice, ~7 MB read in all where GETs in its place let ~0.7 MB in. Now a
    stopped connection past DRAIN_BYTES reads nothing more, whoever resumes."""
    vm = fleet.vms[6]
    held = request(fleet, "/runtime/slow/x?seconds=1")
    queued = request(fleet, "/runtime/echo", method="POST", body=b"x" * 10) * MAX_PIPELINED
    statuses: list[int] = []
    before = bytes_read(fleet.proxy)
    with Conn(fleet, vm.address, timeout=20) as conn:
        conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 * 1024)
        conn.send(held + queued + request(fleet, "/runtime/whoami"))  # the last: past the cap, never parsed
        # The flood's unread rest: a reset at the close.
        with flooding(conn) as sent, contextlib.suppress(ConnectionError):
            while True:
                statuses.append(conn.answer().status)
    assert statuses[:2] == [200, 200], statuses
    read = bytes_read(fleet.proxy) - before
    assert read < STOPPED_READ_BOUND, (read, sent[0])
    serves(fleet, vm)


def test_nothing_parsed_after_the_stop_reaches_the_control_plane(fleet: Fleet, cp: ControlPlane) -> None:
    """Requests past the pipelining cap, or after an Upgrade head, in the same read or the
    next: the ones before are answered, the connection closes, and the rest is never forwarded."""
    vm = fleet.vms[7]
    after = request(fleet, "/runtime/echo/after-stop", method="POST", body=b"q") * 3
    held = request(fleet, "/runtime/slow/x?seconds=0.5")
    upgrade = request(fleet, "/runtime/echo", [("Connection", "Upgrade"), ("Upgrade", "h2c")])
    for queued, answered in (
        (request(fleet, "/metadata/v1/instance") * MAX_PIPELINED, 1 + MAX_PIPELINED),
        (upgrade, 2),
    ):
        with Conn(fleet, vm.address) as conn:
            conn.send(held + queued + after)
            answers = [conn.answer() for _ in range(answered)]
            with contextlib.suppress(OSError):  # closing already
                conn.send(after)  # nothing parsed, nothing forwarded
            assert conn.closed(within=5)
        assert answers[-1].header("connection") == "close"
    assert cp.requests_seen("/runtime/echo/after-stop") == 0
    serves(fleet, vm)


def test_guests_gone_as_their_long_polls_are_answered_leave_nothing_held(fleet: Fleet) -> None:
    """Guests close or reset their connections around the moment their held requests are
    answered (before, during and after the answer arrives), or long before: every request
    ends at once (none left in flight, no `max_concurrent` slot or upstream wait kept for
    the 15 s of the longer ones) and each VM is served after."""
    vms = fleet.vms[:4]
    for wave in range(2):
        conns = [Conn(fleet, vms[i % len(vms)].address) for i in range(24)]
        for i, conn in enumerate(conns):
            seconds = 15 if i % 3 == 0 else 1  # a third held far longer: gone long before their answer
            conn.send(request(fleet, f"/runtime/slow/gone{i % 5}?seconds={seconds}"))
        began = time.monotonic()
        for i, conn in enumerate(conns):
            time.sleep(max(0.0, began + 0.94 + i * 0.005 - time.monotonic()))
            if wave:
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # a reset
            conn.sock.close()
            conn.reader.close()
    for _ in range(50):
        if in_flight(fleet.proxy) == 0:
            break
        time.sleep(0.1)
    assert in_flight(fleet.proxy) == 0
    for vm in vms:
        serves(fleet, vm)


# -- coalescing: an answer fetched for one VM is never shared with another -------------------


def _sync(cp: ControlPlane, registry: Path, vms: dict[str, tuple[str, str]]) -> None:
    """Make `registry` hold exactly `vms`: name -> (address, vm_id)."""
    secret = cp.secret_file.read_bytes().strip()
    lines = [
        json.dumps({"name": name, "address": address, "token": tokens.mint(vm_id, (None, secret))})
        for name, (address, vm_id) in vms.items()
    ]
    run("hostagent", "--registry", str(registry), "vm", "sync", "-", input="\n".join(lines) + "\n")


class Guest:
    """One request to the app as GuestProtocol hands it over (the connection's owner in the
    scope), from a guest that reads the answer's head and then, until `reading` is set, not
    its body: the proxy's write waits (uvicorn's send blocks while the guest does not read)."""

    def __init__(self, app: ProxyApp, address: str, target: bytes) -> None:
        path, _, query = target.partition(b"?")
        self.scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": path.decode(),
            "raw_path": path,
            "query_string": query,
            "headers": [(b"host", b"169.254.169.254"), (b"metadata", b"true")],
            "client": (address, 40000),
            "server": ("169.254.169.254", 80),
            OWNER_KEY: app.owners.accept(address),
        }
        self.app = app
        self.started = asyncio.Event()
        self.reading = asyncio.Event()
        self.status = 0
        self.body = b""
        self._sent = False

    async def receive(self) -> dict[str, Any]:
        if not self._sent:
            self._sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await asyncio.Event().wait()  # the guest stays connected
        raise AssertionError("unreachable")

    async def send(self, message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.started.set()
        elif message["type"] == "http.response.body":
            await self.reading.wait()
            self.body += message.get("body", b"")

    async def run(self) -> None:
        self.app.owners.input_arrived()
        await self.app(self.scope, self.receive, self.send)


@pytest.mark.anyio
async def test_a_flight_is_not_shared_with_a_new_vm_given_the_old_ones_name(cp: ControlPlane, tmp_path: Path) -> None:
    """VM `web` (vm-old) asks for a cacheable answer and reads it slowly; meanwhile the host
    destroys it and gives its name and address to a new VM (vm-new), whose identical GET
    begins after `hostagent` returned. That GET found the old VM's call in flight under the
    same (name, target) key and was answered with the old VM's answer (fetched with its
    token, naming it), once the old guest read its copy."""
    registry = tmp_path / "registry.sqlite3"
    address = "10.77.0.2"
    _sync(cp, registry, {"web": (address, "vm-old")})
    config = parse_config(
        {
            "host_id": "host-attack",
            "listen": ["169.254.169.254:80"],
            "registry": str(registry),
            "control_plane": {"url": cp.url, "timeout": 5, "retry_budget": 0.5},
            "routes": [{"prefix": "/runtime/"}],
        }
    )
    client = build_client(config.control_plane)
    app = ProxyApp(config, registry=Registry(config.registry), client=client, access_log=AccessLog(io.StringIO()))
    target = b"/runtime/cached?max_age=60&delay=0.2"
    try:
        old = Guest(app, address, target)
        old_call = asyncio.create_task(old.run())
        await asyncio.wait_for(old.started.wait(), 10)  # answered and stored; its body not yet read
        await asyncio.to_thread(_sync, cp, registry, {"web": (address, "vm-new")})
        new = Guest(app, address, target)  # a connection of the new VM, after the change
        new.reading.set()
        new_call = asyncio.create_task(new.run())
        await asyncio.sleep(0.5)  # the new VM's GET has found the old call in flight, if it would
        old.reading.set()
        await asyncio.wait_for(asyncio.gather(old_call, new_call), 15)
        assert json.loads(old.body)["vm_id"] == "vm-old"
        assert new.status == 200, new.body
        assert json.loads(new.body)["vm_id"] == "vm-new"
    finally:
        await client.aclose()


# -- memory: what a guest's own paths leave behind ---------------------------------------------

# A path as long as a request head allows (protocol.MAX_HEAD_BYTES, less the rest of the head).
LONG_PATH_BYTES = 60_000
# How much the proxy's RSS may grow while one VM sends MARKED_PATHS such paths, one at a time,
# each answered 404 by the control plane. Today: about 240 MiB (every path kept whole).
MARKS_RSS_BOUND = 32 * 1024 * 1024
MARKED_PATHS = 4096


def test_uncacheable_marks_do_not_keep_a_guests_long_paths(cp: ControlPlane, tmp_path: Path) -> None:
    """A GET answered uncacheably (any 404) marks its (VM, path) so that identical GETs do not
    wait for each other (cache.Flights.answered): up to MAX_UNCACHEABLE (4096) marks, each
    holding the whole path, which the guest chooses up to ~64 KiB long, and kept until the
    count is reached, however old. One VM sending 4096 distinct 60 KB paths at the default
    rate (50/s: under 90 s) makes the proxy hold ~240 MiB, and it stays after the guest stops."""
    limits = "[limits]\nrequests_per_second = 100000\nburst = 100000\n"
    proxy = Proxy(tmp_path, cp.url, limits, 'host_aliases = ["metadata.internal"]').start()
    with running(proxy):
        fleet = Fleet(proxy, cp, ["marks"], 200)
        vm = fleet.vms[0]
        pid = proxy.process.pid if proxy.process else 0
        serves(fleet, vm)
        before = rss(pid)
        statuses: set[int] = set()
        conn = Conn(fleet, vm.address, timeout=30)
        try:
            for i in range(MARKED_PATHS):
                target = b"/runtime/marks/%05d/" % i + b"a" * LONG_PATH_BYTES
                answer = conn.send(request(fleet, target)).answer()
                statuses.add(answer.status)
                if answer.header("connection") == "close":
                    conn.close()
                    conn = Conn(fleet, vm.address, timeout=30)
        finally:
            conn.close()
        after = rss(pid)
        assert statuses == {404}
        assert after - before < MARKS_RSS_BOUND, f"RSS {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB"
        serves(fleet, vm)


# The response cache's byte bound here, and how far past it the proxy's RSS may grow. Today:
# about 90 MiB for 1 MiB (the targets, keys of the cache, are not counted).
CACHE_MAX_BYTES = 1024 * 1024
CACHE_RSS_BOUND = 16 * 1024 * 1024


def test_the_cache_byte_bound_counts_the_guests_targets(cp: ControlPlane, tmp_path: Path) -> None:
    """`[cache] max_bytes` bounds what the cache holds: an entry counts its body, headers and a
    fixed overhead, but not its target (the key, kept twice: the entry's and the VM's list),
    which the guest chooses up to ~64 KiB long with a query the control plane ignores. Six VMs
    store 256 cacheable answers each (the per-VM count) under 60 KB targets: the cache counts
    about 1 MiB and holds ~90 MiB."""
    limits = f"[limits]\nrequests_per_second = 100000\nburst = 100000\n[cache]\nmax_bytes = {CACHE_MAX_BYTES}\n"
    proxy = Proxy(tmp_path, cp.url, limits, 'host_aliases = ["metadata.internal"]').start()
    with running(proxy):
        fleet = Fleet(proxy, cp, [f"c{i}" for i in range(6)], 210)
        pid = proxy.process.pid if proxy.process else 0
        serves(fleet, fleet.vms[0])
        before = rss(pid)
        for vm in fleet.vms:
            with Conn(fleet, vm.address, timeout=30) as conn:
                for i in range(256):
                    target = b"/runtime/cached?max_age=600&i=%d&x=" % i + b"a" * LONG_PATH_BYTES
                    answer = conn.send(request(fleet, target)).answer()
                    assert answer.status == 200, answer
        after = rss(pid)
        assert after - before < CACHE_RSS_BOUND, f"RSS {before / 2**20:.1f} MiB -> {after / 2**20:.1f} MiB"


# -- limits: a new VM given an old one's name -------------------------------------------------

NAME_REUSE_LIMITS = """
[limits]
requests_per_second = 500
burst = 1000
max_concurrent = 2

[[routes]]
prefix = "/runtime/"

[[routes]]
prefix = "/runtime/slow/"
timeout = 20
"""


def test_a_new_vm_given_a_destroyed_ones_name_does_not_inherit_its_requests_in_flight(
    cp: ControlPlane, tmp_path: Path
) -> None:
    """VM `web` (vm-old) holds `max_concurrent` long-polls; the host destroys it and creates a
    new VM (vm-new, another address) under the same name. The destroyed VM's held requests
    run on to their answers (README "A VM's life"), and the limiter, keyed by the name alone,
    counted them against the new VM: its every request was 429 for as long as they were held
    (up to the route's timeout, minutes for a real long-poll), a lockout the old guest chose.
    Identity elsewhere is the name and the id (connections, coalesced calls)."""
    proxy = Proxy(tmp_path, cp.url, NAME_REUSE_LIMITS, 'host_aliases = ["metadata.internal"]').start()
    old, new = "127.0.0.221", "127.0.0.222"
    with running(proxy):
        fleet = Fleet(proxy, cp, [], 0)
        _sync(cp, proxy.registry, {"web": (old, "vm-old")})
        held = [Conn(fleet, old, timeout=30).send(request(fleet, "/runtime/slow/held?seconds=10")) for _ in range(2)]
        try:
            deadline = time.monotonic() + 5
            while in_flight(proxy) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert in_flight(proxy) == 2
            _sync(cp, proxy.registry, {"web": (new, "vm-new")})
            answer = exchange(fleet, new, request(fleet))
            assert (answer.status, answer.code) == (200, None), answer
            assert answer.json()["vm_id"] == "vm-new"
        finally:
            for conn in held:
                conn.close()


# -- deadlines: a closing connection's timer ------------------------------------------------


def test_a_closing_connection_does_not_spin_on_a_passed_read_deadline(tmp_path: Path) -> None:
    """A read deadline passes (here the accept's first-byte one; likewise a 408 or a refusal)
    and the connection closes, its write buffer still draining (the guest does not read): the
    passed deadline stayed set, so the timer re-armed itself for that past instant and fired on
    every pass of the event loop, a busy loop of the whole process until the close's own
    deadline (2 s) aborted it. On ClockLoop the pass never ends: bounded here to 1000 firings."""

    app = local_app(tmp_path)  # no request arrives
    side = GuestSide(app, Deadlines(header_timeout=5.0))
    config = _uvicorn_config(app, functools.partial(GuestProtocol, side))
    config.load()
    loop = ClockLoop()
    transport = RecordingSocket("127.0.0.151")  # close() leaves it closing: the kernel has not drained it
    protocol = GuestProtocol(side, config, uvicorn.server.ServerState(), {}, _loop=loop)  # type: ignore[arg-type]
    protocol.connection_made(transport)

    firings = 0
    loop.now = 5.0  # the accept's deadline
    while due := sorted((t for t in loop.timers if t.when <= loop.now and not t.cancelled), key=lambda t: t.when):
        loop.timers.remove(due[0])
        due[0].callback(*due[0].args)
        firings += 1
        assert firings < 1000, "the deadline timer keeps firing at the same instant"
    assert transport.closed and transport.written == b""  # closed, nothing said
    pending = [t.when for t in loop.timers if not t.cancelled]
    assert pending and min(pending) > 5.0  # the close's own deadline, not the passed one
    loop.advance(2.0)  # the close did not complete within CLOSE_SECONDS: aborted, the timer gone
    assert not [t for t in loop.timers if not t.cancelled and t.when <= loop.now]
    protocol.connection_lost(None)
    assert not side.open_by_peer


class HalfClosedSocket(RecordingSocket):
    """A guest that half-closed (EOF) and reads nothing: asyncio's transport closes itself
    when the protocol's eof_received() returns a false value, and the close completes only
    once its write buffer drains, which a guest that does not read never lets happen."""

    def __init__(self, peer: str) -> None:
        super().__init__(peer)
        self.aborted = False

    def abort(self) -> None:
        super().abort()
        self.aborted = True


def test_a_half_closed_guest_that_does_not_read_is_cut_off_without_a_busy_loop(tmp_path: Path) -> None:
    """A guest sends a request, half-closes its side (EOF) and never reads the answer, which
    sits in the transport's buffer: the transport closes itself (eof_received returns None,
    as uvicorn's), but not through CoalescingTransport.close, so GuestProtocol never learnt:
    the idle keep-alive deadline passed, found the transport closing and re-armed for the
    same past instant, on every pass of the event loop: the whole proxy at 100% CPU, and the
    connection held, for as long as the guest wished (seen on a real server: the keep-alive's
    5 s, then a core busy until the guest went away). Now the EOF begins the close, with the
    close's own deadline (CLOSE_SECONDS), and no read deadline stays behind it."""
    app = local_app(tmp_path, "127.0.0.152")
    side = GuestSide(app, Deadlines(header_timeout=5.0, keep_alive_seconds=5.0))
    config = _uvicorn_config(app, functools.partial(GuestProtocol, side))
    config.load()
    loop = ClockLoop()
    transport = HalfClosedSocket("127.0.0.152")
    protocol = GuestProtocol(side, config, uvicorn.server.ServerState(), {}, _loop=loop)  # type: ignore[arg-type]
    protocol.connection_made(transport)
    protocol.data_received(INSTANCE)
    loop.advance(0)  # answered; the answer leaves (into the buffer the guest never drains)
    assert transport.written.startswith(b"HTTP/1.1 200 ") and not transport.closed
    loop.advance(1.0)
    protocol.eof_received()  # None: the transport closes itself; its buffer never drains
    transport.closed = True

    firings = 0
    loop.now = 6.0  # past the keep-alive deadline (5 s after the answer)
    while due := sorted((t for t in loop.timers if t.when <= loop.now and not t.cancelled), key=lambda t: t.when):
        loop.timers.remove(due[0])
        due[0].callback(*due[0].args)
        firings += 1
        assert firings < 1000, "the deadline timer keeps firing at the same instant"
    loop.advance(2.0)  # the close did not complete within CLOSE_SECONDS of the EOF: aborted
    assert transport.aborted
    assert not [t for t in loop.timers if not t.cancelled and t.when <= loop.now]
    protocol.connection_lost(None)
    assert not side.open_by_peer
