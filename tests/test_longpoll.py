"""Long-poll (issue 15): the reference control plane's `GET /runtime/metadata` with
`wait_for_change`, fed by the `--vms` file, through the proxy on a route whose timeout covers
the wait. Real processes (tests/harness.py); guests are loopback source addresses.
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from itertools import count
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from controlplane.metadata import etag_of
from controlplane.tokens import Secrets, mint
from controlplane.vms import WATCH_INTERVAL, VmDirectory
from metadata_proxy.app import Exchange, ProxyApp, _UntilHangUp
from metadata_proxy.config import ListenAddress, parse_config
from metadata_proxy.forward import GuestDisconnected, build_client
from metadata_proxy.logs import AccessLog
from metadata_proxy.owners import OWNER_KEY, ConnectionOwner
from metadata_proxy.protocol import GuestProtocol, GuestSide
from metadata_proxy.registry import Registry
from metadata_proxy.server import _uvicorn_config, bind_listen
from tests.harness import ControlPlane, Proxy, free_port, run, running

META = {"Metadata": "true"}
METADATA = "/runtime/metadata/"
# The long-poll endpoint gets a route of its own with a timeout above the longest wait asked
# for here; every VM may hold two requests at once.
ROUTES = """
[limits]
max_concurrent = 2

[[routes]]
prefix = "/runtime/"

[[routes]]
prefix = "/runtime/metadata/"
timeout = 40
"""
_addresses = count(120)


class VmFile:
    """The control plane's --vms file, rewritten whole (a rename: a new inode) on each change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.vms: dict[str, dict[str, Any]] = {}
        self.write()

    def write(self) -> None:
        lines = [json.dumps({"vm_id": vm_id, "metadata": metadata}) for vm_id, metadata in self.vms.items()]
        temporary = self.path.with_suffix(".new")
        temporary.write_text("\n".join(lines) + "\n")
        os.replace(temporary, self.path)

    def set(self, vm_id: str, metadata: dict[str, Any]) -> None:
        self.vms[vm_id] = metadata
        self.write()


@pytest.fixture(scope="module")
def vm_file(tmp_path_factory: pytest.TempPathFactory) -> VmFile:
    return VmFile(tmp_path_factory.mktemp("vms") / "vms.jsonl")


@pytest.fixture(scope="module")
def lp_cp(tmp_path_factory: pytest.TempPathFactory, vm_file: VmFile) -> Iterator[ControlPlane]:
    control_plane = ControlPlane(tmp_path_factory.mktemp("cp"), extra=("--vms", str(vm_file.path))).start()
    with running(control_plane):
        yield control_plane


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, lp_cp: ControlPlane) -> Iterator[Proxy]:
    server = Proxy(tmp_path_factory.mktemp("proxy"), lp_cp.url, ROUTES, timeout=5)
    with running(server.start()):
        yield server


def register(proxy: Proxy, cp: ControlPlane, vm_file: VmFile, name: str, metadata: dict[str, Any]) -> str:
    address, vm_id = f"127.0.0.{next(_addresses)}", f"vm-{name}"
    vm_file.set(vm_id, metadata)
    proxy.add_vm(name, address, mint(vm_id, Secrets.from_specs([str(cp.secret_file)])))
    return address


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {condition}")
        time.sleep(0.02)


class Poll(threading.Thread):
    """One long-poll from `address`, in a thread; `.response` and `.answered` (monotonic) when done."""

    def __init__(self, proxy: Proxy, address: str, **params: Any) -> None:
        super().__init__(daemon=True)
        self.proxy, self.address, self.params = proxy, address, params
        self.response: httpx.Response | None = None
        self.answered = 0.0

    def run(self) -> None:
        with self.proxy.guest(self.address) as guest:
            self.response = guest.get(METADATA, params=self.params, headers=META, timeout=60)
        self.answered = time.monotonic()

    def result(self) -> httpx.Response:
        self.join(60)
        assert self.response is not None, "the long-poll did not finish"
        return self.response


def test_metadata_with_its_etag(proxy: Proxy, lp_cp: ControlPlane, vm_file: VmFile) -> None:
    address = register(proxy, lp_cp, vm_file, "plain", {"role": "builder", "n": 1})
    with proxy.guest(address) as guest:
        response = guest.get(METADATA, headers=META)
        bare = guest.get("/runtime/metadata", headers=META)  # the documented path: the /runtime/ route
    assert response.status_code == 200 and response.json() == {"role": "builder", "n": 1}
    assert response.headers["etag"] == etag_of({"role": "builder", "n": 1})
    assert response.headers["cache-control"] == "no-store"
    assert bare.json() == response.json() and bare.headers["etag"] == response.headers["etag"]


@pytest.mark.parametrize(
    "params",
    [
        {"wait_for_change": "yes"},
        {"wait_for_change": "true", "timeout_sec": "0"},
        {"wait_for_change": "true", "timeout_sec": "301"},
        {"wait_for_change": "true", "timeout_sec": "1.5"},
        {"wait_for_change": "true", "last_etag": "x" * 129},
        {"wait_for_change": ["true", "false"]},
    ],
    ids=["wait-not-bool", "timeout-0", "timeout-301", "timeout-fraction", "etag-too-long", "wait-twice"],
)
def test_bad_parameter_is_400(proxy: Proxy, lp_cp: ControlPlane, vm_file: VmFile, params: dict[str, Any]) -> None:
    address = register(proxy, lp_cp, vm_file, f"bad-{next(_addresses)}", {})
    with proxy.guest(address) as guest:
        response = guest.get(METADATA, params=params, headers=META)
    assert response.status_code == 400 and response.json()["error"]["code"] == "bad_request"


def test_a_waiting_guest_gets_changed_metadata_within_a_second(
    proxy: Proxy, lp_cp: ControlPlane, vm_file: VmFile
) -> None:
    address = register(proxy, lp_cp, vm_file, "watcher", {"stage": "boot"})
    with proxy.guest(address) as guest:
        etag = guest.get(METADATA, headers=META).headers["etag"]
    seen = lp_cp.requests_seen(METADATA)
    poll = Poll(proxy, address, wait_for_change="true", last_etag=etag, timeout_sec=30)
    poll.start()
    wait_until(lambda: lp_cp.requests_seen(METADATA) > seen)  # held at the control plane
    time.sleep(0.3)
    assert poll.response is None  # still held: nothing changed
    vm_file.set("vm-watcher", {"stage": "configured"})
    changed = time.monotonic()
    response = poll.result()
    assert response.status_code == 200 and response.json() == {"stage": "configured"}
    assert response.headers["etag"] == etag_of({"stage": "configured"}) != etag
    # The bound (the control plane checks the file every 0.2 s).
    assert poll.answered - changed < 1.0


def test_last_etag_is_accepted_with_or_without_quotes_and_a_stale_one_answers_at_once(
    proxy: Proxy, lp_cp: ControlPlane, vm_file: VmFile
) -> None:
    address = register(proxy, lp_cp, vm_file, "quotes", {"v": 1})
    with proxy.guest(address) as guest:
        bare = etag_of({"v": 1}).strip('"')
        held = guest.get(
            METADATA, params={"wait_for_change": "true", "last_etag": bare, "timeout_sec": 1}, headers=META
        )
        old = guest.get(
            METADATA, params={"wait_for_change": "true", "last_etag": "old", "timeout_sec": 30}, headers=META
        )
    assert held.json() == {"v": 1} and held.headers["etag"] == f'"{bare}"'
    assert old.status_code == 200 and old.json() == {"v": 1}  # differs from "old": at once


def test_at_the_timeout_the_unchanged_value_and_etag(proxy: Proxy, lp_cp: ControlPlane, vm_file: VmFile) -> None:
    address = register(proxy, lp_cp, vm_file, "quiet", {"stage": "steady"})
    etag = etag_of({"stage": "steady"})
    with proxy.guest(address) as guest:
        started = time.monotonic()
        response = guest.get(
            METADATA, params={"wait_for_change": "true", "last_etag": etag, "timeout_sec": 2}, headers=META
        )
        waited = time.monotonic() - started
    assert response.status_code == 200 and response.json() == {"stage": "steady"}
    assert response.headers["etag"] == etag
    assert waited >= 1.9  # held for the whole timeout: here time is the point


def test_held_requests_count_against_max_concurrent(proxy: Proxy, lp_cp: ControlPlane, vm_file: VmFile) -> None:
    address = register(proxy, lp_cp, vm_file, "busy", {"v": 1})
    etag = etag_of({"v": 1})
    seen = lp_cp.requests_seen(METADATA)
    # Two different targets: identical GETs would share one call.
    polls = [Poll(proxy, address, wait_for_change="true", last_etag=etag, timeout_sec=30, n=n) for n in range(2)]
    for poll in polls:
        poll.start()
    wait_until(lambda: lp_cp.requests_seen(METADATA) >= seen + 2)
    whoami_before = lp_cp.requests_seen("/runtime/whoami")
    with proxy.guest(address) as guest:
        refused = guest.get("/runtime/whoami", headers=META)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limited"
        assert lp_cp.requests_seen("/runtime/whoami") == whoami_before  # nothing reached the control plane
        vm_file.set("vm-busy", {"v": 2})
        assert [poll.result().json() for poll in polls] == [{"v": 2}, {"v": 2}]
        assert guest.get("/runtime/whoami", headers=META).status_code == 200  # the slots are free again


def test_a_guest_that_hangs_up_frees_its_slot_at_once(proxy: Proxy, lp_cp: ControlPlane, vm_file: VmFile) -> None:
    """Without this, a guest that gives up on a long-poll would hold its slot (and an upstream
    connection) until the route's timeout: two such and the VM is locked out for 30 s."""
    address = register(proxy, lp_cp, vm_file, "hangup", {"v": 1})
    etag = etag_of({"v": 1})
    seen = lp_cp.requests_seen(METADATA)
    for n in range(2):
        with socket.create_connection(("127.0.0.1", proxy.port), source_address=(address, 0)) as sock:
            target = f"{METADATA}?wait_for_change=true&last_etag={etag.strip(chr(34))}&timeout_sec=30&n={n}"
            sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{proxy.port}\r\nMetadata: true\r\n\r\n".encode())
            wait_until(lambda n=n: lp_cp.requests_seen(METADATA) >= seen + n + 1)  # type: ignore[misc]
    with proxy.guest(address) as guest:
        wait_until(lambda: guest.get("/runtime/whoami", headers=META).status_code == 200, timeout=10)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.mark.anyio
@pytest.mark.parametrize("hang_up", ["close", "half-close"])
async def test_a_hang_up_ends_the_held_request_and_closes_its_upstream_connection(
    lp_cp: ControlPlane, vm_file: VmFile, tmp_path: Path, hang_up: str
) -> None:
    """The real server in this process, so that its upstream pool can be looked at: a guest
    that hangs up on a held long-poll ends it (logged 499) and its upstream connection is
    closed, not kept open to the route's timeout nor pooled with an answer still to come.
    A half-close (EOF, the guest still reading) is a hang-up too (README, "Slow and greedy
    guests"): it cannot be told from a guest that died."""
    port, address = free_port(), f"127.0.0.{next(_addresses)}"
    vm_file.set("vm-gone", {"v": 1})
    registry = tmp_path / "registry.sqlite3"
    config = parse_config(
        {
            "host_id": "host-hang-up",
            "listen": [f"127.0.0.1:{port}"],
            "registry": str(registry),
            "control_plane": {"url": lp_cp.url, "timeout": 5, "retry_budget": 0.5},
            "routes": [{"prefix": "/runtime/"}, {"prefix": METADATA, "timeout": 40}],
        }
    )
    token = mint("vm-gone", Secrets.from_specs([str(lp_cp.secret_file)]))
    run(
        "hostagent",
        "--registry",
        str(registry),
        "vm",
        "add",
        "gone",
        "--address",
        address,
        "--token-file",
        "-",
        input=token,
    )
    client, log = build_client(config.control_plane), io.StringIO()
    app = ProxyApp(config, registry=Registry(config.registry), client=client, access_log=AccessLog(log))
    server = uvicorn.Server(_uvicorn_config(app, functools.partial(GuestProtocol, GuestSide(app))))
    server.config.load()
    server.lifespan = server.config.lifespan_class(server.config)
    await server.startup(sockets=[bind_listen(ListenAddress("127.0.0.1", port))])
    try:
        seen = lp_cp.requests_seen(METADATA)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(address, 0))
        target = f"{METADATA}?wait_for_change=true&last_etag={etag_of({'v': 1}).strip(chr(34))}&timeout_sec=30"
        writer.write(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nMetadata: true\r\n\r\n".encode())
        for _ in range(500):
            if lp_cp.requests_seen(METADATA) > seen:
                break
            await asyncio.sleep(0.02)
        assert (app.in_flight, client.connections_open, client.connections_idle) == (1, 1, 0)  # held
        if hang_up == "close":
            writer.close()
        else:
            writer.write_eof()
        for _ in range(500):
            if app.in_flight == 0 and client.connections_open == 0:
                break
            await asyncio.sleep(0.02)
        assert (app.in_flight, client.connections_open) == (0, 0)
        app.access_log.flush()
        (line,) = [json.loads(line) for line in log.getvalue().splitlines()]
        assert (line["vm"], line["status"], line["upstream_status"]) == ("gone", 499, None)
        assert await reader.read() == b""  # nothing was answered
        writer.close()
    finally:
        server.should_exit = True
        await server.shutdown()
        await client.aclose()


# -- the --vms file's change notification, in-process ------------------------------------------


def test_wait_for_change_wakes_every_waiter_once_on_a_change_and_stops_watching(tmp_path: Path) -> None:
    path = tmp_path / "vms"
    path.write_text('{"vm_id": "a", "metadata": {"v": 1}}\n')
    vms = VmDirectory(path)

    async def scenario() -> tuple[list[float], float, bool]:
        loop = asyncio.get_running_loop()
        version = vms.version
        waiters = [asyncio.create_task(vms.wait_for_change(version, 30)) for _ in range(100)]
        await asyncio.sleep(0.3)
        assert not any(w.done() for w in waiters)
        temporary = tmp_path / "vms.new"
        temporary.write_text('{"vm_id": "a", "metadata": {"v": 2}}\n')
        os.replace(temporary, path)
        changed = loop.time()
        await asyncio.gather(*waiters)
        woke = loop.time() - changed
        timed_out = loop.time()
        await vms.wait_for_change(vms.version, 0.3)  # nothing changes: returns at the timeout
        waited = loop.time() - timed_out
        await asyncio.sleep(WATCH_INTERVAL * 2)
        return [woke], waited, vms._watcher is None

    [woke], waited, stopped = asyncio.run(scenario())
    vm = vms.get("a")
    assert vm is not None and vm.metadata == {"v": 2}
    assert woke < 1.0  # within a few watch intervals
    assert waited >= 0.29
    assert stopped  # nobody waits: nothing stats the file any more


def test_a_change_before_the_wait_returns_at_once(tmp_path: Path) -> None:
    path = tmp_path / "vms"
    path.write_text("a\n")
    vms = VmDirectory(path)
    version = vms.version
    path.write_text("a\nb\n")

    async def scenario() -> None:
        await asyncio.wait_for(vms.wait_for_change(version, 30), 5)

    asyncio.run(scenario())
    assert vms.exists("b")


def test_etag_follows_the_content_not_the_key_order() -> None:
    assert etag_of({"a": 1, "b": [1, 2]}) == etag_of({"b": [1, 2], "a": 1})
    assert etag_of({"a": 1}) != etag_of({"a": 2})
    assert etag_of({}).startswith('"') and etag_of({}).endswith('"')


@pytest.mark.anyio
async def test_a_request_whose_guest_left_already_waits_for_nothing() -> None:
    """A guest gone before the wait begins: GuestDisconnected at once, nothing inside runs, and
    no cancel is left pending for the request's task (it would fire at its next await)."""
    owner = ConnectionOwner(None, known=False)
    owner.hang_up()

    async def nothing() -> dict[str, Any]:
        raise AssertionError("never received from")

    async def ignore(message: Any) -> None:
        raise AssertionError("never sent to")

    exchange = Exchange({"type": "http", OWNER_KEY: owner, "client": ("127.0.0.1", 1)}, nothing, ignore)
    ran = []
    with pytest.raises(GuestDisconnected), _UntilHangUp(exchange):
        ran.append("inside")
    assert ran == []
    await asyncio.sleep(0)  # a pending cancel would land here
    task = asyncio.current_task()
    assert task is not None and task.cancelling() == 0
