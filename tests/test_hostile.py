"""Hostile guests against the real `metadata-proxy serve` and `controlplane serve` processes.

Raw sockets wherever an HTTP client would normalise the input: duplicated headers, dot
segments, absolute-form targets, framing. Every refusal asserts the status, the error code,
that nothing reached the control plane, and that the proxy then serves that VM normally.
The cases follow what AWS IMDSv2, GCP metadata, Azure IMDS, Firecracker MMDS, the EKS Pod
Identity Agent and Google's k8s-metadata-proxy test.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import httpx
import pytest
import uvicorn

from controlplane import tokens
from metadata_proxy.app import ProxyApp
from metadata_proxy.config import ListenAddress, parse_config
from metadata_proxy.forward import build_client
from metadata_proxy.logs import AccessLog
from metadata_proxy.protocol import Deadlines, GuestProtocol, GuestSide
from metadata_proxy.registry import Registry
from metadata_proxy.server import _uvicorn_config, bind_listen
from tests.harness import ControlPlane, Proxy, free_port, run, running

T = TypeVar("T")

ROUTES = """
[[routes]]
prefix = "/runtime/"

[[routes]]
prefix = "/runtime/echo/session/"
guard = "session"

[[routes]]
prefix = "/runtime/echo/open/"
guard = "none"
"""
MAX_BODY = 64 * 1024
MAX_CONCURRENT = 4
# GuestProtocol's cap for MAX_CONCURRENT: max(32, 4 * MAX_CONCURRENT).
CONNECTION_CAP = 32
UNKNOWN = "127.0.0.250"


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


IPV6 = _has_ipv6_loopback()


@dataclass(frozen=True)
class VM:
    name: str
    address: str
    vm_id: str


class Fleet:
    """A proxy with its VMs: registered at once with `hostagent vm sync`, handed out one per use."""

    def __init__(self, proxy: Proxy, cp: ControlPlane, names: list[str], first_octet: int, port6: int = 0) -> None:
        self.proxy = proxy
        self.port6 = port6  # the proxy's [::1] listen port, when it has one
        secret = cp.secret_file.read_bytes().strip()
        self.vms = [VM(name, f"127.0.0.{first_octet + i}", f"vm-{name}") for i, name in enumerate(names)]
        lines = [
            json.dumps({"name": vm.name, "address": vm.address, "token": tokens.mint(vm.vm_id, (None, secret))})
            for vm in self.vms
        ]
        if IPV6:
            self.v6 = VM("six", "::1", "vm-six")
            lines.append(json.dumps({"name": "six", "address": "::1", "token": tokens.mint("vm-six", (None, secret))}))
        proxy.hostagent("vm", "sync", "-", input="\n".join(lines) + "\n")
        self._next = count()

    def take(self) -> VM:
        return self.vms[next(self._next)]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, cp: ControlPlane) -> Iterator[Fleet]:
    """The main proxy: generous rates, MAX_CONCURRENT and MAX_BODY, an alias, IPv6 when there is one."""
    limits = f"[limits]\nrequests_per_second = 500\nburst = 1000\nmax_concurrent = {MAX_CONCURRENT}\n"
    limits += f"max_body_bytes = {MAX_BODY}\n"
    proxy = Proxy(tmp_path_factory.mktemp("hostile"), cp.url, limits + ROUTES, 'host_aliases = ["metadata.internal"]')
    port6 = free_port("::1") if IPV6 else 0
    if port6:
        ours = f'listen = ["127.0.0.1:{proxy.port}"]'
        both = f'listen = ["127.0.0.1:{proxy.port}", "[::1]:{port6}"]'
        proxy.config.write_text(proxy.config.read_text().replace(ours, both))
    proxy.start()
    with running(proxy):
        yield Fleet(proxy, cp, [f"h{i:02d}" for i in range(48)], 40, port6)


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory, cp: ControlPlane) -> Iterator[Fleet]:
    """A proxy whose token bucket empties after a few requests and refills slowly: a token
    every 2 s, so that a request within that long of the bucket's last token is refused
    however loaded the machine."""
    limits = "[limits]\nrequests_per_second = 0.5\nburst = 6\n"
    proxy = Proxy(tmp_path_factory.mktemp("tight"), cp.url, limits).start()
    with running(proxy):
        yield Fleet(proxy, cp, ["burst", "calm"], 100)


# -- a raw HTTP/1.1 guest -------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = [value for key, value in self.headers if key == name]
        assert len(values) <= 1, f"{name} repeated: {values}"
        return values[0] if values else None

    @property
    def code(self) -> str | None:
        if self.header("content-type") != "application/json":
            return None
        error = json.loads(self.body).get("error")
        return error["code"] if error else None

    def json(self) -> Any:
        return json.loads(self.body)


def read_answer(reader: BinaryIO) -> Answer:
    status_line = reader.readline()
    if not status_line:
        raise ConnectionError("closed without an answer")
    assert status_line.startswith(b"HTTP/1.1 "), status_line
    headers = []
    while (line := reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers.append((name.strip().lower(), value.strip()))
    length = int(dict(headers).get("content-length", "0"))  # every answer here has one
    return Answer(int(status_line.split()[1]), headers, reader.read(length))


class Conn:
    """One guest TCP connection from `source`, speaking raw bytes."""

    def __init__(self, fleet: Fleet, source: str, timeout: float = 5) -> None:
        if ":" in source:
            target: tuple[str, int] = ("::1", fleet.port6)
        else:
            target = ("127.0.0.1", fleet.proxy.port)
        self.sock = socket.create_connection(target, source_address=(source, 0), timeout=timeout)
        self.reader = self.sock.makefile("rb")

    def send(self, data: bytes) -> Conn:
        self.sock.sendall(data)
        return self

    def answer(self) -> Answer:
        return read_answer(self.reader)

    def closed(self, within: float = 2.0) -> bool:
        """True when the proxy closes the connection (EOF or reset) within `within` seconds."""
        self.sock.settimeout(within)
        try:
            return self.reader.read(1) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def __enter__(self) -> Conn:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def request(
    fleet: Fleet,
    target: str | bytes = "/runtime/whoami",
    headers: Sequence[tuple[str, str | bytes]] = (),
    *,
    method: str = "GET",
    host: str | None = "",
    metadata: bool = True,
    body: bytes = b"",
) -> bytes:
    """A request as bytes; `host` "" means the proxy's own address, None no Host at all."""
    lines = [method.encode() + b" " + (target if isinstance(target, bytes) else target.encode()) + b" HTTP/1.1"]
    if host is not None:
        lines.append(b"Host: " + (host or f"127.0.0.1:{fleet.proxy.port}").encode("latin-1"))
    if metadata:
        lines.append(b"Metadata: true")
    for name, value in headers:
        lines.append(name.encode() + b": " + (value if isinstance(value, bytes) else value.encode("latin-1")))
    if body:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def exchange(fleet: Fleet, source: str, data: bytes) -> Answer:
    with Conn(fleet, source) as conn:
        return conn.send(data).answer()


def quietly(cp: ControlPlane, action: Callable[[], T]) -> T:
    """`action`'s result from a run across which the control plane counted no request.

    The proxy's readiness probe reaches the control plane every 2 s and may land inside
    one run; a request the proxy forwarded moves the counter in every run.
    """
    for _ in range(3):
        before = seen(cp)
        result = action()
        if seen(cp) == before:
            return result
    pytest.fail("the control plane received a request in each of 3 runs")


def seen(cp: ControlPlane) -> int:
    """The control plane's request counter (`cp.requests_seen()` without an httpx client's set-up)."""
    with socket.create_connection(("127.0.0.1", cp.port), timeout=5) as sock, sock.makefile("rb") as reader:
        sock.sendall(b"GET /_test/requests HTTP/1.1\r\nHost: cp\r\nConnection: close\r\n\r\n")
        count: int = read_answer(reader).json()["count"]
        return count


def serves(fleet: Fleet, vm: VM) -> None:
    """The proxy answers this VM normally, on a new connection."""
    answer = exchange(fleet, vm.address, request(fleet, host="metadata.internal"))
    assert answer.status == 200, answer
    assert answer.json()["vm_id"] == vm.vm_id


def refused(
    fleet: Fleet, cp: ControlPlane, vm: VM, data: bytes, status: int, code: str, source: str | None = None
) -> Answer:
    """`data` from `source` (default: the VM) gets status/code, reaches nothing, and the VM is served after."""

    def once() -> Answer:
        answer = exchange(fleet, source or vm.address, data)
        assert (answer.status, answer.code) == (status, code), (answer, data[:200])
        assert answer.header("x-request-id")
        return answer

    answer = quietly(cp, once)
    serves(fleet, vm)
    return answer


# -- identity, Host and forwarded headers ---------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "host", "status", "code"),
    [
        pytest.param([("Host", "evil.example")], "", 403, "bad_host", id="second-host-foreign"),
        pytest.param([("Host", "127.0.0.1")], "", 403, "bad_host", id="second-host-ours-too"),
        pytest.param([], "evil.example", 403, "bad_host", id="foreign"),
        pytest.param([], "169.254.169.254", 403, "bad_host", id="not-our-listen-address"),
        pytest.param([], "127.0.0.1:1", 403, "bad_host", id="other-port"),
        pytest.param([], "127.0.0.1.nip.io", 403, "bad_host", id="rebinding-name"),
        pytest.param([], "evil.example@127.0.0.1", 403, "bad_host", id="userinfo"),
        pytest.param([], "metadata.internal.", 403, "bad_host", id="alias-trailing-dot"),
        pytest.param([], "[::ffff:127.0.0.1]", 403, "bad_host", id="v4-mapped"),
        pytest.param([], "2130706433", 403, "bad_host", id="decimal-ip"),
        pytest.param([], None, 403, "bad_host", id="missing"),
        pytest.param([("X-Forwarded-For", "10.0.0.9")], "", 400, "forwarded_request", id="xff"),
        pytest.param([("x-FORWARDED-for", "10.0.0.9")], "", 400, "forwarded_request", id="xff-odd-case"),
        pytest.param([("X-Forwarded-For", "")], "", 400, "forwarded_request", id="xff-empty"),
        pytest.param([("Forwarded", "for=10.0.0.9;proto=http")], "", 400, "forwarded_request", id="forwarded"),
        pytest.param([("X-Real-IP", "10.0.0.9")], "", 400, "forwarded_request", id="x-real-ip"),
        pytest.param([("Metadata", "true")], "", 400, "missing_metadata_header", id="two-metadata"),
        pytest.param([("Metadata", "false")], "", 400, "missing_metadata_header", id="metadata-true-and-false"),
    ],
)
def test_spoofed_and_duplicated_headers(
    fleet: Fleet, cp: ControlPlane, headers: list[tuple[str, str]], host: str | None, status: int, code: str
) -> None:
    vm = fleet.take()
    refused(fleet, cp, vm, request(fleet, headers=headers, host=host), status, code)


def test_metadata_header_values(fleet: Fleet, cp: ControlPlane) -> None:
    vm = fleet.take()
    for value in ("false", "1", "yes", "true, true", ""):
        refused(
            fleet, cp, vm, request(fleet, headers=[("Metadata", value)], metadata=False), 400, "missing_metadata_header"
        )
    for value in ("true", "TRUE", "True"):
        assert exchange(fleet, vm.address, request(fleet, headers=[("Metadata", value)], metadata=False)).status == 200


def test_identity_is_the_peer_and_comes_first(fleet: Fleet, cp: ControlPlane) -> None:
    vm = fleet.take()
    # An unregistered address is unknown_vm whatever else is wrong with the request.
    for data in (
        request(fleet),
        request(fleet, "/runtime/%2e%2e/x", [("X-Forwarded-For", vm.address)], host="evil.example"),
        request(fleet, "/metadata/v1/instance", [("X-Real-IP", vm.address)]),
    ):
        refused(fleet, cp, vm, data, 403, "unknown_vm", source=UNKNOWN)
    # Then Host, before the forwarded headers; those before the path, the path before the guard.
    refused(fleet, cp, vm, request(fleet, "/x/%2e%2e", [("Forwarded", "for=x")], host="evil"), 403, "bad_host")
    refused(fleet, cp, vm, request(fleet, "/runtime/%2e%2e/x", [("X-Real-IP", "1.2.3.4")]), 400, "forwarded_request")
    refused(fleet, cp, vm, request(fleet, "/runtime/%2e%2e/x", metadata=False), 400, "bad_path")
    refused(fleet, cp, vm, request(fleet, "/nowhere", metadata=False), 404, "not_found")


@pytest.mark.parametrize(
    "host",
    ["127.0.0.1", "127.0.0.1:{port}", "metadata.internal", "METADATA.Internal", "metadata.internal:{port}"],
)
def test_host_variants_accepted(fleet: Fleet, host: str) -> None:
    vm = fleet.vms[-1]  # read-only: shared
    answer = exchange(fleet, vm.address, request(fleet, host=host.format(port=fleet.proxy.port)))
    assert answer.status == 200, answer
    assert answer.json()["vm_id"] == vm.vm_id


@pytest.mark.skipif(not IPV6, reason="no IPv6 loopback")
def test_ipv6_guest_and_host_variants(fleet: Fleet, cp: ControlPlane) -> None:
    port6 = fleet.port6
    vm = fleet.v6
    for host in ("[::1]", f"[::1]:{port6}", f"[0:0:0::1]:{port6}", f"[0000::0001]:{port6}", "metadata.internal"):
        answer = exchange(fleet, vm.address, request(fleet, host=host))
        assert answer.status == 200, (host, answer)
        assert answer.json()["vm_id"] == "vm-six"
    # (Every listen address is accepted on every socket: 127.0.0.1 here too.)
    for host in ("::1", f"::1:{port6}", "[::1", f"[::1]:{port6 + 1}", "[::2]", "[fe80::1%lo]", "[::1]:80"):
        refused(fleet, cp, vm, request(fleet, host=host), 403, "bad_host")


def test_guest_cannot_set_the_proxys_own_headers(fleet: Fleet) -> None:
    vm = fleet.take()
    answer = exchange(
        fleet,
        vm.address,
        request(
            fleet,
            "/runtime/echo",
            [
                ("X-Metadata-Proxy-Host", "host-evil"),
                ("X-Request-Id", "forged"),
                ("Authorization", "Bearer forged"),
                ("Connection", "X-Custom"),
                ("X-Custom", "hop"),
            ],
        ),
    )
    assert answer.status == 200, answer
    sent = [(name.lower(), value) for name, value in answer.json()["headers"]]
    names = [name for name, _ in sent]
    assert names.count("x-metadata-proxy-host") == 1 and ("x-metadata-proxy-host", "host-test") in sent
    assert names.count("x-request-id") == 1 and ("x-request-id", answer.header("x-request-id")) in sent
    assert names.count("authorization") == 1 and answer.json()["vm_id"] == vm.vm_id
    assert "x-custom" not in names
    whoami = exchange(fleet, vm.address, request(fleet, headers=[("X-Metadata-Proxy-Host", "host-evil")]))
    assert whoami.json() == {"vm_id": vm.vm_id, "host_id": "host-test", "address": vm.address}


# -- paths ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "status", "code"),
    [
        (b"/runtime/../metadata/v1/instance", 400, "bad_path"),
        (b"/runtime/./whoami", 400, "bad_path"),
        (b"/runtime/whoami/..", 400, "bad_path"),
        (b"/runtime/%2e%2e/metadata/v1/instance", 400, "bad_path"),
        (b"/runtime/%2E%2e/x", 400, "bad_path"),
        (b"/runtime/.%2e/x", 400, "bad_path"),
        (b"/runtime/%252e%252e/x", 400, "bad_path"),
        (b"/runtime/%25252e%25252e/x", 400, "bad_path"),
        (b"/runtime/..%2f..%2fadmin", 400, "bad_path"),
        (b"/runtime/a%2fb", 400, "bad_path"),
        (b"/runtime/a%252Fb", 400, "bad_path"),
        (b"/runtime/a\\..\\b", 400, "bad_path"),
        (b"/runtime/a%5c..%5cb", 400, "bad_path"),
        (b"/runtime/..;/admin", 400, "bad_path"),
        (b"/runtime/%2e%2e;x=1/admin", 400, "bad_path"),
        (b"/runtime/%ef%bc%8e%ef%bc%8e/admin", 400, "bad_path"),  # fullwidth dots
        (b"/runtime/a%ef%bc%8fb", 400, "bad_path"),  # fullwidth solidus
        (b"/runtime/%00", 400, "bad_path"),
        (b"/runtime/%2500", 400, "bad_path"),
        (b"/runtime/x%0d%0aX-Injected:%201", 400, "bad_path"),
        (b"/runtime/x%09y", 400, "bad_path"),
        (b"/runtime/x%7f", 400, "bad_path"),
        (b"/runtime/x%c2%85", 400, "bad_path"),  # NEL, a C1 control
        (b"/runtime/%c0%ae%c0%ae/x", 400, "bad_path"),  # overlong UTF-8 dots
        (b"/runtime/%e0%80%af", 400, "bad_path"),  # overlong slash
        (b"/runtime/%ed%a0%80", 400, "bad_path"),  # a UTF-16 surrogate
        (b"/runtime/%ff", 400, "bad_path"),
        (b"/runtime/%2525252525252e", 400, "bad_path"),  # decoded more often than we follow
        (b"*", 400, "bad_path"),
        (b"/runtime/wh\x00oami", 400, "bad_request"),  # raw bytes: the parser refuses them
        (b"/runtime/\xc0\xae", 400, "bad_request"),
        (b"/runtime/x\ry", 400, "bad_request"),
        (b"/runtime", 404, "not_found"),
        (b"/RUNTIME/whoami", 404, "not_found"),
        (b"//runtime/whoami", 404, "not_found"),
        (b"/%72untime/whoami", 404, "not_found"),  # prefixes match the path as sent
        (b"/metadata/v1/instance/", 404, "not_found"),
        (b"/metadata/v1/%69nstance", 404, "not_found"),
        (b"/metadata/v1/../v1/instance", 400, "bad_path"),
    ],
)
def test_path_tricks(fleet: Fleet, cp: ControlPlane, target: bytes, status: int, code: str) -> None:
    vm = fleet.vms[-2]  # each case is refused before the limiter, so one VM serves them all
    refused(fleet, cp, vm, request(fleet, target), status, code)


def test_absolute_form_reaches_only_the_control_plane(fleet: Fleet, cp: ControlPlane) -> None:
    vm = fleet.take()
    with socket.socket() as witness:  # where the absolute-form target points
        witness.bind(("127.0.0.1", 0))
        witness.listen(8)
        witness.setblocking(False)
        elsewhere = f"127.0.0.1:{witness.getsockname()[1]}"
        answer = exchange(fleet, vm.address, request(fleet, f"http://{elsewhere}/runtime/echo/x?y=1"))
        assert answer.status == 200, answer
        echo = answer.json()
        assert (echo["raw_path"], echo["query_string"], echo["vm_id"]) == ("/runtime/echo/x", "y=1", vm.vm_id)
        refused(fleet, cp, vm, request(fleet, f"http://{elsewhere}/runtime/whoami", host=elsewhere), 403, "bad_host")
        refused(fleet, cp, vm, request(fleet, f"http://{elsewhere}/%2e%2e/x"), 400, "bad_path")
        refused(fleet, cp, vm, request(fleet, elsewhere, method="CONNECT", host=elsewhere), 400, "bad_request")
        refused(fleet, cp, vm, request(fleet, elsewhere, method="CONNECT"), 400, "bad_request")
        with pytest.raises(BlockingIOError):
            witness.accept()  # nobody ever connected to it


def test_trace_is_not_forwarded(fleet: Fleet, cp: ControlPlane) -> None:
    # A TRACE answer echoes the request, and with it the Authorization header the proxy adds.
    vm = fleet.take()
    answer = refused(fleet, cp, vm, request(fleet, "/runtime/echo", method="TRACE"), 405, "method_not_allowed")
    assert "TRACE" not in (answer.header("allow") or "TRACE")
    refused(fleet, cp, vm, request(fleet, "/metadata/v1/instance", method="POST"), 405, "method_not_allowed")


def test_upgrade_requests_are_refused(fleet: Fleet, cp: ControlPlane) -> None:
    """The parser hands everything after an Upgrade request's head to the other protocol:
    its framing ends there, so it is refused 400 and the connection closes (issue 11)."""
    vm = fleet.take()
    upgrades = [("Connection", "Upgrade"), ("Upgrade", "websocket"), ("Sec-WebSocket-Key", "dGhlIHNhbXBsZQ==")]

    def once() -> None:
        with Conn(fleet, vm.address) as conn:
            answer = conn.send(request(fleet, "/runtime/echo", upgrades)).answer()
            assert (answer.status, answer.code, answer.header("connection")) == (400, "bad_request", "close"), answer
            assert conn.closed()

    quietly(cp, once)
    serves(fleet, vm)


# -- framing: smuggling, oversized heads ----------------------------------------------------

SMUGGLED = b"GET /runtime/echo/smuggled HTTP/1.1\r\nHost: 127.0.0.1\r\nMetadata: true\r\n\r\n"


@pytest.mark.parametrize(
    "framing",
    [
        pytest.param(b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n", id="CL.TE"),
        pytest.param(b"Transfer-Encoding: chunked\r\nContent-Length: 4\r\n", id="TE.CL"),
        pytest.param(b"Content-Length: 4\r\nContent-Length: 5\r\n", id="CL.CL"),
        pytest.param(b"Content-Length: 5\r\nContent-Length: 5\r\n", id="CL.CL-same"),
        pytest.param(b"Content-Length: 5, 5\r\n", id="CL-list"),
        pytest.param(b"Content-Length: +5\r\n", id="CL-plus"),
        pytest.param(b"Content-Length: -1\r\n", id="CL-negative"),
        pytest.param(b"Content-Length: 0x5\r\n", id="CL-hex"),
        pytest.param(b"Transfer-Encoding: gzip\r\n", id="TE-not-chunked"),
        pytest.param(b"Transfer-Encoding: chunked, identity\r\n", id="TE-chunked-not-last"),
        pytest.param(b"Transfer-Encoding: xchunked\r\nContent-Length: 4\r\n", id="TE-xchunked"),
        pytest.param(b"Transfer-Encoding : chunked\r\n", id="TE-space-before-colon"),
        pytest.param(b"Transfer-Encoding:\x0bchunked\r\n", id="TE-vertical-tab"),
        pytest.param(b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n", id="TE.TE"),
        pytest.param(b"Transfer-Encoding: chunked\r\n ,identity\r\n", id="TE-obs-fold"),
        pytest.param(b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", id="bad-chunk-size"),
        pytest.param(b"Transfer-Encoding: chunked\r\n\r\nfffffffffffffffff1\r\n", id="chunk-size-overflow"),
        pytest.param(b"Transfer-Encoding: chunked\r\n\r\n5;\x00\r\n", id="chunk-extension-nul"),
    ],
)
@pytest.mark.parametrize("method", ["GET", "POST"])
def test_request_smuggling(fleet: Fleet, cp: ControlPlane, method: str, framing: bytes) -> None:
    vm = fleet.vms[-3]
    head = request(fleet, "/runtime/echo", method=method)[:-2]  # without the blank line
    data = head + framing + (b"" if framing.endswith(b"\r\n\r\n") or b"\r\n\r\n" in framing else b"\r\n")
    data += b"0\r\n\r\n" + SMUGGLED

    def once() -> None:
        with Conn(fleet, vm.address) as conn:
            answer = conn.send(data).answer()
            assert (answer.status, answer.code) == (400, "bad_request"), answer
            assert answer.header("connection") == "close"
            assert conn.closed()  # one answer, then nothing: the smuggled request was not read

    quietly(cp, once)
    serves(fleet, vm)


def test_pipelined_requests_are_each_checked(fleet: Fleet, cp: ControlPlane) -> None:
    vm = fleet.take()
    first = request(fleet, "/metadata/v1/instance")
    second = request(fleet, "/metadata/v1/instance", [("X-Forwarded-For", "10.0.0.1")])
    third = request(fleet, "/metadata/v1/instance", host="evil.example")

    def once() -> list[Answer]:
        with Conn(fleet, vm.address) as conn:
            conn.send(first + second + third)
            return [conn.answer() for _ in range(3)]

    answers = quietly(cp, once)
    assert [(a.status, a.code) for a in answers] == [(200, None), (400, "forwarded_request"), (403, "bad_host")]
    serves(fleet, vm)


def test_oversized_headers(fleet: Fleet, cp: ControlPlane) -> None:
    vm = fleet.take()
    # Complete but over 32 KiB: the app's check.
    refused(fleet, cp, vm, request(fleet, headers=[("X-Big", "a" * 33 * 1024)]), 431, "headers_too_large")
    refused(
        fleet, cp, vm, request(fleet, headers=[(f"X-H{i}", "a" * 60) for i in range(600)]), 431, "headers_too_large"
    )

    # Endless: the protocol answers once the head passes its bound, without waiting for the end.
    def endless(data: bytes, more: bytes) -> Callable[[], Answer]:
        def once() -> Answer:
            with Conn(fleet, vm.address) as conn:
                conn.send(data)
                try:
                    for _ in range(64):  # 4 MiB at most; the answer comes long before
                        conn.send(more)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                answer = conn.answer()
                assert (answer.status, answer.code) == (431, "headers_too_large"), answer
                assert conn.closed()
                return answer

        return once

    quietly(cp, endless(request(fleet)[:-2], b"X-More: " + b"m" * 65536 + b"\r\n"))
    quietly(cp, endless(b"GET /runtime/", b"a" * 65536))  # an endless request line
    serves(fleet, vm)


# -- session tokens -------------------------------------------------------------------------


def put_token(fleet: Fleet, vm: VM, *ttl: str | bytes, metadata: bool = True) -> Answer:
    headers = [("X-Metadata-Token-TTL-Seconds", value) for value in ttl]
    return exchange(fleet, vm.address, request(fleet, "/metadata/v1/token", headers, method="PUT", metadata=metadata))


def new_token(fleet: Fleet, vm: VM, ttl: int = 60) -> str:
    answer = put_token(fleet, vm, str(ttl))
    assert answer.status == 200, answer
    return answer.body.decode()


def with_token(fleet: Fleet, vm: VM, *token: str | bytes) -> Answer:
    """GET on the session route, with no Metadata header: the guard wants the token only."""
    headers = [("X-Metadata-Token", value) for value in token]
    return exchange(fleet, vm.address, request(fleet, "/runtime/echo/session/x", headers, metadata=False))


@pytest.mark.parametrize(
    "ttl",
    [["0"], ["21601"], ["-1"], ["abc"], ["1.5"], [""], ["+5"], ["0x10"], ["1e3"], ["０1".encode()], [], ["60", "60"]],
    ids=repr,
)
def test_session_ttl_refused(fleet: Fleet, cp: ControlPlane, ttl: list[str | bytes]) -> None:
    vm = fleet.vms[-4]

    def once() -> None:
        answer = put_token(fleet, vm, *ttl)
        assert (answer.status, answer.code) == (400, "invalid_ttl"), answer

    quietly(cp, once)
    serves(fleet, vm)


@pytest.mark.parametrize("ttl", [1, 60, 21600])
def test_session_ttl_accepted(fleet: Fleet, ttl: int) -> None:
    vm = fleet.vms[-4]
    answer = put_token(fleet, vm, str(ttl))
    assert answer.status == 200, answer
    assert (answer.header("content-type") or "").startswith("text/plain")
    assert answer.header("x-metadata-token-ttl-seconds") == str(ttl)
    token = answer.body.decode()
    assert token and token.isprintable() and " " not in token
    used = with_token(fleet, vm, token)
    assert used.status == 200, used
    assert used.json()["vm_id"] == vm.vm_id
    assert "x-metadata-token" not in {name.lower() for name, _ in used.json()["headers"]}


def test_session_tokens(fleet: Fleet, cp: ControlPlane) -> None:
    vm, other = fleet.take(), fleet.take()
    token, foreign, short = new_token(fleet, vm), new_token(fleet, other), new_token(fleet, vm, ttl=1)
    assert with_token(fleet, vm, token).status == 200
    version, expiry, nonce, mac = token.split(".")
    flipped = mac[:-1] + ("A" if mac[-1] != "A" else "B")
    bad: list[tuple[str | bytes, ...]] = [
        (),
        ("",),
        (foreign,),  # another VM's
        (token, token),  # twice is ambiguous
        (token + "x",),
        (token[:-1],),
        (".".join([version, str(int(expiry) + 3600), nonce, mac]),),
        (".".join([version, expiry, nonce[::-1], mac]),),
        (".".join([version, expiry, nonce, flipped]),),
        (".".join(["v2", expiry, nonce, mac]),),
        ("v1." + "9" * 300,),
        ("ünïcode".encode(),),
    ]
    for values in bad:

        def once(values: tuple[str | bytes, ...] = values) -> None:
            answer = with_token(fleet, vm, *values)
            assert (answer.status, answer.code) == (401, "invalid_session_token"), (values, answer)

        quietly(cp, once)
    assert with_token(fleet, other, foreign).status == 200  # its own works for it
    assert with_token(fleet, vm, short).status == 200
    time.sleep(1.1)  # `short` (TTL 1) has expired

    def expired() -> None:
        answer = with_token(fleet, vm, short)
        assert (answer.status, answer.code) == (401, "invalid_session_token"), answer

    quietly(cp, expired)
    assert with_token(fleet, vm, token).status == 200
    serves(fleet, vm)


def test_token_put_refusals(fleet: Fleet, cp: ControlPlane) -> None:
    vm = fleet.take()

    def token_request(*headers: tuple[str, str], method: str = "PUT", metadata: bool = True) -> bytes:
        ttl = ("X-Metadata-Token-TTL-Seconds", "60")
        return request(fleet, "/metadata/v1/token", [ttl, *headers], method=method, metadata=metadata)

    refused(fleet, cp, vm, token_request(("X-Forwarded-For", "10.0.0.1")), 400, "forwarded_request")
    refused(fleet, cp, vm, token_request(("Forwarded", "for=10.0.0.1")), 400, "forwarded_request")
    refused(fleet, cp, vm, token_request(("X-Real-IP", "10.0.0.1")), 400, "forwarded_request")
    refused(fleet, cp, vm, token_request(metadata=False), 400, "missing_metadata_header")
    refused(fleet, cp, vm, token_request(method="GET"), 405, "method_not_allowed")
    answer = refused(fleet, cp, vm, token_request(method="POST"), 405, "method_not_allowed")
    assert answer.header("allow") == "PUT"


def test_none_guard_route_needs_no_header(fleet: Fleet, cp: ControlPlane) -> None:
    vm = fleet.take()
    answer = exchange(fleet, vm.address, request(fleet, "/runtime/echo/open/x", metadata=False))
    assert answer.status == 200 and answer.json()["vm_id"] == vm.vm_id
    # It still passes every other check.
    refused(fleet, cp, vm, request(fleet, "/runtime/echo/open/x", host="evil", metadata=False), 403, "bad_host")
    xff = ("X-Forwarded-For", "1.2.3.4")
    refused(fleet, cp, vm, request(fleet, "/runtime/echo/open/x", [xff], metadata=False), 400, "forwarded_request")


# -- limits ---------------------------------------------------------------------------------


def test_burst_then_rate_limited_while_another_vm_is_served(tight: Fleet, cp: ControlPlane) -> None:
    noisy, calm = tight.vms
    stop = threading.Event()
    statuses: Counter[int] = Counter()

    def hammer() -> None:
        with Conn(tight, noisy.address) as conn:  # one kept-alive connection, as fast as it goes
            while not stop.is_set():
                statuses[conn.send(request(tight, "/metadata/v1/instance")).answer().status] += 1

    thread = threading.Thread(target=hammer)
    started = time.monotonic()
    thread.start()
    try:
        while statuses[429] < 20:
            time.sleep(0.01)
        for _ in range(3):  # the other VM's bucket is its own
            answer = exchange(tight, calm.address, request(tight))
            assert answer.status == 200 and answer.json()["vm_id"] == calm.vm_id
    finally:
        stop.set()
        thread.join()
    hammered = time.monotonic() - started
    assert 6 <= statuses[200] <= 6 + 0.5 * hammered + 1  # the burst, then one every 2 s

    def limited() -> Answer:  # within 2 s of the bucket's last token: no token yet
        answer = exchange(tight, noisy.address, request(tight))
        assert (answer.status, answer.code) == (429, "rate_limited"), answer
        return answer

    assert quietly(cp, limited).header("retry-after") in ("1", "2")  # whole seconds to the next token
    time.sleep(2.1)  # a token refills in 2 s
    assert exchange(tight, noisy.address, request(tight)).status == 200


def test_max_concurrent_while_another_vm_is_served(fleet: Fleet, cp: ControlPlane) -> None:
    busy, calm = fleet.take(), fleet.take()
    results: list[int] = []

    def slow() -> None:  # holds its slot for 2 s (the proxy times out at 3)
        results.append(exchange(fleet, busy.address, request(fleet, "/runtime/slow?seconds=2")).status)

    threads = [threading.Thread(target=slow) for _ in range(MAX_CONCURRENT)]
    for thread in threads:
        thread.start()
    try:
        deadline = time.monotonic() + 5
        while in_flight(fleet.proxy) < MAX_CONCURRENT and time.monotonic() < deadline:
            time.sleep(0.02)

        def limited() -> Answer:
            answer = exchange(fleet, busy.address, request(fleet))
            assert (answer.status, answer.code) == (429, "rate_limited"), answer
            return answer

        assert quietly(cp, limited).header("retry-after") == "1"
        serves(fleet, calm)
        assert results == []  # served while the slow requests still held every slot of the other VM
    finally:
        for thread in threads:
            thread.join()
    assert results == [200] * MAX_CONCURRENT
    serves(fleet, busy)


def test_slowloris_does_not_starve_other_vms(fleet: Fleet, cp: ControlPlane) -> None:
    slow, calm = fleet.take(), fleet.take()
    partial = request(fleet)[:-20]
    held = [Conn(fleet, slow.address).send(partial[:10]) for _ in range(CONNECTION_CAP)]
    try:
        # One connection more than the cap is answered 429 and closed at once.
        def over_cap() -> Answer:
            with Conn(fleet, slow.address) as conn:
                answer = conn.answer()
                assert (answer.status, answer.code) == (429, "rate_limited"), answer
                assert answer.header("retry-after") == "1"
                assert conn.closed()
                return answer

        quietly(cp, over_cap)
        # The held connections trickle their heads a byte at a time; the other VM is served at once.
        for i in range(10, 30):
            for conn in held:
                conn.send(partial[i : i + 1])
            serves(fleet, calm)  # within the guest's 5 s socket timeout, a head deadline's length
    finally:
        for conn in held:
            conn.close()
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:  # the closes reach the proxy
        with Conn(fleet, slow.address) as conn:
            if conn.send(request(fleet)).answer().status == 200:
                break
        time.sleep(0.05)
    serves(fleet, slow)


# -- request bodies -------------------------------------------------------------------------


def post_head(fleet: Fleet, *headers: tuple[str, str]) -> bytes:
    return request(fleet, "/runtime/echo", headers, method="POST")


def test_body_at_the_limit_is_forwarded(fleet: Fleet, cp: ControlPlane) -> None:
    vm = fleet.take()
    body = b"b" * MAX_BODY
    answer = exchange(fleet, vm.address, request(fleet, "/runtime/echo", method="POST", body=body))
    assert answer.status == 200 and answer.json()["body_length"] == MAX_BODY
    chunked = post_head(fleet, ("Transfer-Encoding", "chunked"))
    pieces = b"".join(b"%x\r\n%b\r\n" % (4096, body[:4096]) for _ in range(MAX_BODY // 4096)) + b"0\r\n\r\n"
    answer = exchange(fleet, vm.address, chunked + pieces)
    assert answer.status == 200 and answer.json()["body_length"] == MAX_BODY
    refused(fleet, cp, vm, request(fleet, "/runtime/echo", method="POST", body=body + b"!"), 413, "body_too_large")


@pytest.mark.parametrize("chunked", [False, True], ids=["declared", "chunked"])
@pytest.mark.parametrize("guest", ["keeps-sending", "stalls", "sends-all-then-reads"])
def test_body_too_large(fleet: Fleet, cp: ControlPlane, chunked: bool, guest: str) -> None:
    vm = fleet.vms[-5]
    total = 4 * 1024 * 1024
    framing = ("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(total))
    piece = b"x" * 16384
    if chunked:
        piece = b"%x\r\n%b\r\n" % (len(piece), piece)

    def once() -> Answer:
        with Conn(fleet, vm.address) as conn:
            conn.send(post_head(fleet, framing))
            started = time.monotonic()
            if guest == "stalls":  # a little over the limit, then nothing: the answer must not wait
                conn.send(piece * (MAX_BODY // 16384 + 2) if chunked else b"")
                answer = conn.answer()  # a wait for the rest would pass the guest's 5 s timeout
                assert time.monotonic() - started < 3.0  # generous: the proxy answers in milliseconds
            elif guest == "keeps-sending":  # reads while it sends, like curl

                def pump() -> None:
                    try:
                        for _ in range(total // 16384):
                            conn.sock.sendall(piece)
                    except OSError:
                        pass

                thread = threading.Thread(target=pump)
                thread.start()
                answer = conn.answer()
                thread.join()
            else:  # writes the whole body before reading anything
                try:
                    for _ in range(total // 16384):
                        conn.sock.sendall(piece)
                except (BrokenPipeError, ConnectionResetError):
                    pass
                answer = conn.answer()
            assert (answer.status, answer.code) == (413, "body_too_large"), answer
            assert answer.header("connection") == "close"
            assert conn.closed(within=5)  # after a bounded linger
            return answer

    quietly(cp, once)
    serves(fleet, vm)


def test_body_too_large_with_expect_continue(fleet: Fleet, cp: ControlPlane) -> None:
    vm = fleet.take()
    head = post_head(fleet, ("Content-Length", str(MAX_BODY + 1)), ("Expect", "100-continue"))

    def once() -> None:
        with Conn(fleet, vm.address) as conn:
            answer = conn.send(head).answer()  # the first line is the 413, never a 100 Continue
            assert (answer.status, answer.code) == (413, "body_too_large"), answer
            assert conn.closed(within=1)

    quietly(cp, once)
    serves(fleet, vm)


# -- refusals are counted -------------------------------------------------------------------


def metrics(proxy: Proxy) -> str:
    with httpx.Client(transport=httpx.HTTPTransport(uds=str(proxy.admin)), base_url="http://admin") as admin:
        return admin.get("/metrics").text


def in_flight(proxy: Proxy) -> float:
    found = re.search(r"^metadata_proxy_in_flight (\S+)$", metrics(proxy), re.M)
    return float(found[1]) if found else 0.0


def refusal_counts(proxy: Proxy) -> dict[str, float]:
    text = metrics(proxy)
    return {
        code: float(value)
        for code, value in re.findall(r'^metadata_proxy_refusals_total\{code="([a-z_]+)"\} (\S+)$', text, re.M)
    }


def test_refusals_are_counted_by_code(fleet: Fleet, cp: ControlPlane) -> None:
    vm = fleet.take()
    before = refusal_counts(fleet.proxy)
    cases = [
        (request(fleet), 403, "unknown_vm", UNKNOWN),
        (request(fleet, host="evil"), 403, "bad_host", None),
        (request(fleet, headers=[("Forwarded", "for=x")]), 400, "forwarded_request", None),
        (request(fleet, headers=[("X-Big", "a" * 33 * 1024)]), 431, "headers_too_large", None),
        (request(fleet, "/runtime/%2e%2e/"), 400, "bad_path", None),
        (request(fleet, "/elsewhere"), 404, "not_found", None),
        (request(fleet, metadata=False), 400, "missing_metadata_header", None),
        (request(fleet, "/runtime/echo/session/x"), 401, "invalid_session_token", None),
        (request(fleet, "/metadata/v1/token", method="PUT"), 400, "invalid_ttl", None),
        (
            post_head(fleet, ("Content-Length", str(MAX_BODY + 1)), ("Expect", "100-continue")),
            413,
            "body_too_large",
            None,
        ),
        (request(fleet, "/runtime/echo", method="TRACE"), 405, "method_not_allowed", None),
        (request(fleet, "/runtime/echo", [("Transfer-Encoding", "gzip")]), 400, "bad_request", None),
    ]
    for data, status, code, source in cases:
        # One run each (the counts must move by exactly one), so the control plane is not watched here.
        answer = exchange(fleet, source or vm.address, data)
        assert (answer.status, answer.code) == (status, code), answer
    after = refusal_counts(fleet.proxy)
    for _, _, code, _ in cases:
        assert after.get(code, 0) - before.get(code, 0) == 1, code
    serves(fleet, vm)


# -- the header deadline, in process with a short one ---------------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class ClockLoop:
    """The few event-loop calls uvicorn's protocol and GuestProtocol make, on a clock that
    moves only when the test says (`advance`): what the protocol scheduled is asserted to the
    scheduled instant, whatever else the machine is doing. A request's app runs to its end
    at once (the requests here are answered from the registry: the app never waits)."""

    class Timer:
        def __init__(self, when: float, callback: Callable[..., object], args: tuple[Any, ...]) -> None:
            self.when, self.callback, self.args, self.cancelled = when, callback, args, False

        def cancel(self) -> None:
            self.cancelled = True

    class Done:
        def add_done_callback(self, callback: Callable[[Any], object]) -> None:
            callback(self)

    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[ClockLoop.Timer] = []

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> ClockLoop.Timer:
        timer = ClockLoop.Timer(when, callback, args)
        self.timers.append(timer)
        return timer

    def call_later(self, delay: float, callback: Callable[..., object], *args: Any) -> ClockLoop.Timer:
        return self.call_at(self.now + delay, callback, *args)

    def call_soon(self, callback: Callable[..., object], *args: Any) -> ClockLoop.Timer:
        return self.call_at(self.now, callback, *args)

    def create_task(self, coro: Any, **_: Any) -> ClockLoop.Done:
        with pytest.raises(StopIteration):
            coro.send(None)
        return ClockLoop.Done()

    def create_future(self) -> asyncio.Future[None]:
        raise AssertionError("not expected here")

    def advance(self, seconds: float) -> None:
        """Move the clock, running every timer due by then in order (and those they schedule)."""
        until = self.now + seconds
        for _ in range(10_000):  # a timer that re-arms itself at once for ever fails, not hangs
            due = sorted((t for t in self.timers if t.when <= until), key=lambda t: t.when)
            if not due:
                break
            timer = due[0]
            self.timers.remove(timer)
            self.now = max(self.now, timer.when)
            if not timer.cancelled:
                timer.callback(*timer.args)
        else:
            raise AssertionError(f"timers keep firing at {self.now}: a busy loop")
        self.now = until


# A request the app answers from the registry alone (its local endpoint): on ClockLoop, at once.
INSTANCE = b"GET /metadata/v1/instance HTTP/1.1\r\nHost: 169.254.169.254\r\nMetadata: true\r\n\r\n"


def local_app(tmp_path: Path, address: str | None = None) -> ProxyApp:
    """The real app, for a GuestProtocol driven without a control plane: the VM `clock` at
    `address` (if any) registered by hostagent; the control plane's address is never dialled,
    so only requests answered before the forward (INSTANCE, refusals) are for it."""
    registry = tmp_path / "registry.sqlite3"
    if address is not None:
        token = tokens.mint("vm-clock", (None, b"a clock test secret, 32 bytes or more"))
        vm = json.dumps({"name": "clock", "address": address, "token": token})
        run("hostagent", "--registry", str(registry), "vm", "sync", "-", input=vm + "\n")
    config = parse_config(
        {"host_id": "host-clock", "registry": str(registry), "control_plane": {"url": "http://127.0.0.1:9"}}
    )
    client = build_client(config.control_plane)
    return ProxyApp(config, registry=Registry(config.registry), client=client, access_log=AccessLog(io.StringIO()))


class RecordingSocket(asyncio.Transport):
    """What the protocol wrote and whether it closed the connection (asyncio's socket transport
    stands in for the kernel here: the one part that is not ours)."""

    def __init__(self, peer: str) -> None:
        super().__init__()
        self.peer = peer
        self.written = b""
        self.closed = False

    def write(self, data: Any) -> None:
        assert not self.closed, "written after close"
        self.written += bytes(data)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": (self.peer, 40000), "sockname": ("127.0.0.1", 80)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def test_header_deadline_is_scheduled_from_each_heads_first_byte(tmp_path: Path) -> None:
    """GuestProtocol driven on ClockLoop: the silent close of a connection that sent nothing
    comes at the accept's deadline, and a head's 408 at its own deadline, to the instant,
    counted from that head's first byte (README, "Slow and greedy guests"), the first head's
    as a later one's."""
    deadline = 5.0
    app = local_app(tmp_path, "127.0.0.150")
    side = GuestSide(app, Deadlines(header_timeout=deadline))
    config = _uvicorn_config(app, functools.partial(GuestProtocol, side))
    config.load()
    loop = ClockLoop()
    state = uvicorn.server.ServerState()

    def connect() -> tuple[GuestProtocol, RecordingSocket]:
        transport = RecordingSocket("127.0.0.150")
        protocol = GuestProtocol(side, config, state, {}, _loop=loop)  # type: ignore[arg-type]
        protocol.connection_made(transport)
        return protocol, transport

    def timed_out(transport: RecordingSocket) -> bool:
        if not transport.written:
            return False
        assert transport.written.startswith(b"HTTP/1.1 408 ") and transport.closed
        assert json.loads(transport.written.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
        return True

    head = INSTANCE
    idle, idle_socket = connect()  # never sends a byte
    slow, slow_socket = connect()  # a head that never ends
    kept, kept_socket = connect()  # a whole request, then a second head that never ends
    loop.advance(1)
    slow.data_received(head[:10])
    kept.data_received(head)
    loop.advance(0)  # the pass ends: the answer leaves
    answer = kept_socket.written
    assert answer.startswith(b"HTTP/1.1 200 ") and not kept_socket.closed
    loop.advance(2)
    kept.data_received(head[:10])  # the next head, at 3 s: its deadline runs from here
    loop.advance(2 - 0.001)
    assert not idle_socket.closed and not slow_socket.closed
    loop.advance(0.001)  # the deadline of the accept (5 s): nothing came
    assert idle_socket.closed and idle_socket.written == b""  # closed, nothing said
    assert not slow_socket.closed  # its head began at 1 s
    loop.advance(1 - 0.001)
    assert not slow_socket.closed
    loop.advance(0.001)  # the first head's own deadline
    assert timed_out(slow_socket)
    assert not kept_socket.closed and kept_socket.written == answer
    loop.advance(2 - 0.001)
    assert not kept_socket.closed
    loop.advance(0.001)  # the second head's own deadline, 5 s from its first byte at 3 s
    kept_socket.written = kept_socket.written.removeprefix(answer)
    assert timed_out(kept_socket)
    for protocol in (idle, slow, kept):
        protocol.connection_lost(None)
    assert not side.open_by_peer


@pytest.mark.anyio
async def test_header_deadline(cp: ControlPlane, tmp_path: Path) -> None:
    """uvicorn has no deadline for a request head; GuestProtocol's, shortened here to `deadline`,
    on a real server beside a VM that is served meanwhile. When each deadline falls is asserted
    to the instant in test_header_deadline_is_scheduled_from_each_heads_first_byte."""
    deadline = 1.0
    port = free_port()
    registry = tmp_path / "registry.sqlite3"
    config = parse_config(
        {
            "host_id": "host-inproc",
            "listen": [f"127.0.0.1:{port}"],
            "registry": str(registry),
            "control_plane": {"url": cp.url, "timeout": 3, "retry_budget": 0.5},
        }
    )
    secret = cp.secret_file.read_bytes().strip()
    vms = [
        json.dumps({"name": f"p{i}", "address": f"127.0.0.{150 + i}", "token": tokens.mint(f"vm-p{i}", (None, secret))})
        for i in range(2)
    ]
    run("hostagent", "--registry", str(registry), "vm", "sync", "-", input="\n".join(vms) + "\n")
    client = build_client(config.control_plane)
    app = ProxyApp(config, registry=Registry(config.registry), client=client, access_log=AccessLog(io.StringIO()))
    side = GuestSide(app, Deadlines(header_timeout=deadline))
    server = uvicorn.Server(_uvicorn_config(app, functools.partial(GuestProtocol, side)))
    server.config.load()
    server.lifespan = server.config.lifespan_class(server.config)
    await server.startup(sockets=[bind_listen(ListenAddress("127.0.0.1", port))])
    head = f"GET /runtime/whoami HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nMetadata: true\r\n\r\n".encode()
    loop = asyncio.get_running_loop()
    writers: list[asyncio.StreamWriter] = []

    async def connect(source: str) -> asyncio.StreamReader:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
        writers.append(writer)
        return reader

    async def answer(reader: asyncio.StreamReader) -> tuple[int, Any]:
        status = int((await reader.readline()).split()[1])
        headers = (await reader.readuntil(b"\r\n\r\n")).lower()
        length = re.search(rb"content-length: (\d+)", headers)
        assert length is not None
        return status, json.loads(await reader.readexactly(int(length[1])))

    async def trickle(writer: asyncio.StreamWriter, data: bytes, pause: float) -> None:
        for i in range(len(data)):
            if writer.is_closing():
                return
            writer.write(data[i : i + 1])
            await asyncio.sleep(pause)

    try:
        started = loop.time()
        idle = await connect("127.0.0.150")  # connects, never sends a byte
        slow = await connect("127.0.0.150")  # a head too slow to finish in time
        trickler = asyncio.create_task(trickle(writers[1], head, deadline / 4))
        # Meanwhile the other VM is served, its head also trickled but complete in time.
        fast = await connect("127.0.0.151")
        writers[2].write(head[:20])
        await asyncio.sleep(deadline / 4)
        writers[2].write(head[20:])
        status, body = await answer(fast)
        assert status == 200 and body["vm_id"] == "vm-p1"

        status, body = await asyncio.wait_for(answer(slow), deadline + 10)
        trickler.cancel()
        assert (status, body["error"]["code"]) == (408, "request_timeout")
        assert await slow.read() == b""
        assert await idle.read() == b""  # closed, nothing said
        assert loop.time() - started >= deadline

        # On a kept-alive connection the deadline runs from the next request's first byte.
        await asyncio.sleep(deadline * 1.5)
        trickler = asyncio.create_task(trickle(writers[2], head, deadline / 2))
        status, body = await asyncio.wait_for(answer(fast), deadline + 10)
        trickler.cancel()
        assert (status, body["error"]["code"]) == (408, "request_timeout")
        assert 'metadata_proxy_refusals_total{code="request_timeout"} 2.0' in app.metrics.render().decode()
    finally:
        for writer in writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        server.should_exit = True
        await server.shutdown()
        await client.aclose()
