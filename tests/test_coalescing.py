"""Identical misses share one upstream call; stale answers when the control plane fails
(issue 15). Real processes (tests/harness.py): `controlplane serve` with the test-only
endpoints and `metadata-proxy serve`; guests are loopback source addresses, driven
concurrently by httpx's async client.

Counts come from the control plane's per-path counter (`/_test/requests?path=`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import count
from pathlib import Path
from typing import Any

import httpx
import pytest

from controlplane.tokens import Secrets, mint
from tests.harness import ControlPlane, Proxy, running

META = {"Metadata": "true"}
CACHED = "/runtime/cached"
# One VM may send 100 at once here: far above the per-VM defaults (16 at once, burst 100).
LIMITS = "[limits]\nrequests_per_second = 1000\nburst = 1000\nmax_concurrent = 200\n"
_addresses = count(40)
_keys = count()


def next_address() -> str:
    return f"127.0.0.{next(_addresses)}"


def register(proxy: Proxy, cp: ControlPlane, name: str) -> tuple[str, str]:
    """A new VM: (address, vm_id)."""
    address, vm_id = next_address(), f"vm-{name}"
    proxy.add_vm(name, address, mint(vm_id, Secrets.from_specs([str(cp.secret_file)])))
    return address, vm_id


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {condition}")
        time.sleep(0.02)


def log_entries(proxy: Proxy) -> list[dict[str, Any]]:
    return [json.loads(line) for line in proxy.log_lines() if line.startswith("{")]


def cache_results(proxy: Proxy, vm: str) -> list[str | None]:
    """The `cache` field of the proxy's log lines for VM `vm`'s /runtime/cached requests
    (log lines carry no query string: each test has VMs of its own)."""
    return [e.get("cache") for e in log_entries(proxy) if e.get("path") == CACHED and e.get("vm") == vm]


async def burst(proxy: Proxy, address: str, n: int, **params: Any) -> list[httpx.Response]:
    """`n` concurrent GET /runtime/cached from `address`, each on its own connection."""
    transport = httpx.AsyncHTTPTransport(local_address=address, retries=0)
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=proxy.url, transport=transport, timeout=30, limits=limits) as client:
        return list(await asyncio.gather(*(client.get(CACHED, params=params, headers=META) for _ in range(n))))


@contextlib.contextmanager
def admin_client(proxy: Proxy) -> Iterator[httpx.Client]:
    transport = httpx.HTTPTransport(uds=str(proxy.admin))
    with httpx.Client(transport=transport, base_url="http://admin", timeout=5) as client:
        yield client


def cache_metric(proxy: Proxy, result: str) -> float:
    with admin_client(proxy) as admin:
        text = admin.get("/metrics").text
    for line in text.splitlines():
        if line.startswith(f'metadata_proxy_cache_total{{result="{result}"}}'):
            return float(line.split()[-1])
    return 0.0


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, cp: ControlPlane) -> Iterator[Proxy]:
    server = Proxy(tmp_path_factory.mktemp("proxy"), cp.url, LIMITS, timeout=10)
    with running(server.start()):
        yield server


# -- identical misses share one call ----------------------------------------------------------


def test_100_identical_misses_make_one_call(proxy: Proxy, cp: ControlPlane) -> None:
    address, vm_id = register(proxy, cp, "storm")
    before = cp.requests_seen(CACHED)
    key = f"storm-{next(_keys)}"
    responses = asyncio.run(burst(proxy, address, 100, max_age=60, delay=1, k=key))
    assert [r.status_code for r in responses] == [200] * 100
    assert cp.requests_seen(CACHED) - before == 1
    bodies = {r.text for r in responses}
    assert len(bodies) == 1 and json.loads(bodies.pop())["vm_id"] == vm_id
    assert len({r.headers["x-request-id"] for r in responses}) == 100  # each its own answer
    wait_until(lambda: len(cache_results(proxy, "storm")) == 100)
    results = cache_results(proxy, "storm")
    assert results.count("miss") == 1
    assert set(results) <= {"miss", "shared", "hit"}


def test_identical_misses_of_two_vms_make_two_calls_and_never_cross(proxy: Proxy, cp: ControlPlane) -> None:
    (a, a_id), (b, b_id) = register(proxy, cp, "pair-a"), register(proxy, cp, "pair-b")
    before = cp.requests_seen(CACHED)
    key = f"pair-{next(_keys)}"

    async def both() -> tuple[list[httpx.Response], list[httpx.Response]]:
        from_a, from_b = await asyncio.gather(
            burst(proxy, a, 50, max_age=60, delay=1, k=key), burst(proxy, b, 50, max_age=60, delay=1, k=key)
        )
        return from_a, from_b

    from_a, from_b = asyncio.run(both())
    assert cp.requests_seen(CACHED) - before == 2
    assert {r.json()["vm_id"] for r in from_a} == {a_id}
    assert {r.json()["vm_id"] for r in from_b} == {b_id}


def test_uncacheable_answer_makes_each_waiter_call_on_its_own(proxy: Proxy, cp: ControlPlane) -> None:
    address, _ = register(proxy, cp, "uncacheable")
    before = cp.requests_seen(CACHED)
    key = f"uncacheable-{next(_keys)}"
    responses = asyncio.run(burst(proxy, address, 20, delay=0.5, k=key))  # no max-age: not cacheable
    assert [r.status_code for r in responses] == [200] * 20
    assert cp.requests_seen(CACHED) - before == 20
    assert len({r.json()["served"] for r in responses}) == 20  # each got its own answer


def test_no_store_answer_is_not_shared(proxy: Proxy, cp: ControlPlane) -> None:
    address, _ = register(proxy, cp, "no-store")
    before = cp.requests_seen(CACHED)
    responses = asyncio.run(burst(proxy, address, 10, max_age=60, directive="no-store", delay=0.5, k=next(_keys)))
    assert cp.requests_seen(CACHED) - before == 10
    assert len({r.json()["served"] for r in responses}) == 10


def test_a_path_that_answered_uncacheably_is_not_waited_on_then_cacheable_answers_share_again(
    proxy: Proxy, cp: ControlPlane
) -> None:
    """Hit-for-miss: after one uncacheable answer, identical GETs of that path all call at once
    (a long-poll's waiters must not queue behind each other); a cacheable answer ends that."""
    address, _ = register(proxy, cp, "hit-for-miss")
    with httpx.Client(base_url=proxy.url, transport=httpx.HTTPTransport(local_address=address)) as guest:
        assert guest.get(CACHED, params={"k": next(_keys)}, headers=META).status_code == 200  # no max-age
    before = cp.requests_seen(CACHED)
    responses = asyncio.run(burst(proxy, address, 10, max_age=60, delay=0.5, k=next(_keys)))
    assert [r.status_code for r in responses] == [200] * 10
    assert cp.requests_seen(CACHED) - before == 10  # nobody waited for another's call
    before = cp.requests_seen(CACHED)
    asyncio.run(burst(proxy, address, 10, max_age=60, delay=0.5, k=next(_keys)))
    assert cp.requests_seen(CACHED) - before == 1  # answered cacheably since: shared again


def test_a_5xx_answer_does_not_turn_sharing_off(proxy: Proxy, cp: ControlPlane) -> None:
    """An outage answers 5xx, uncacheably: were that a reason not to wait, every VM's boot-time
    storm would reach the control plane whole just as it recovers."""
    address, _ = register(proxy, cp, "outage")
    with httpx.Client(base_url=proxy.url, transport=httpx.HTTPTransport(local_address=address)) as guest:
        failed = guest.get(CACHED, params={"status": 503, "k": next(_keys)}, headers=META)
    assert failed.status_code == 503
    before = cp.requests_seen(CACHED)
    responses = asyncio.run(burst(proxy, address, 20, max_age=60, delay=0.5, k=next(_keys)))
    assert [r.status_code for r in responses] == [200] * 20
    assert cp.requests_seen(CACHED) - before == 1


def test_a_waiter_whose_guest_leaves_costs_nothing_more(proxy: Proxy, cp: ControlPlane) -> None:
    """Waiters that hang up free their slot at once and never call on their own, even when the
    answer turns out uncacheable (which would make a waiter still there call again)."""
    address, _ = register(proxy, cp, "leaver")
    key = f"leaver-{next(_keys)}"
    before = cp.requests_seen(CACHED)

    async def scenario() -> httpx.Response:
        transport = httpx.AsyncHTTPTransport(local_address=address, retries=0)
        async with httpx.AsyncClient(base_url=proxy.url, transport=transport, timeout=30) as leader_client:
            leader = asyncio.create_task(leader_client.get(CACHED, params={"delay": 2, "k": key}, headers=META))
            while cp.requests_seen(CACHED) - before < 1:
                await asyncio.sleep(0.02)
            quitters = [
                asyncio.create_task(burst(proxy, address, 5, delay=2, k=key)) for _ in range(2)
            ]  # ten waiters on ten connections
            await asyncio.sleep(0.5)
            for task in quitters:
                task.cancel()  # their connections close
            for task in quitters:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            return await leader

    assert asyncio.run(scenario()).status_code == 200
    time.sleep(0.5)  # any waiter that (wrongly) called on its own would have reached it by now
    assert cp.requests_seen(CACHED) - before == 1
    wait_until(lambda: len(cache_results(proxy, "leaver")) == 11)
    entries = [e for e in log_entries(proxy) if e.get("path") == CACHED and e.get("vm") == "leaver"]
    assert sorted(e["status"] for e in entries) == [200] + [499] * 10
    assert [e.get("cache") for e in entries if e["status"] == 200] == ["miss"]


# -- stale-if-error ----------------------------------------------------------------------------


@pytest.fixture
def own_cp(tmp_path: Path) -> Iterator[ControlPlane]:
    """A control plane of the test's own, to stop and make fail."""
    (tmp_path / "cp-own").mkdir()
    control_plane = ControlPlane(tmp_path / "cp-own").start()
    with running(control_plane):
        yield control_plane


def test_stopped_control_plane_gets_the_stale_entry_within_its_window_then_502(
    tmp_path: Path, own_cp: ControlPlane
) -> None:
    # stale-if-error=100 asked for, capped at 3 s by the config.
    proxy = Proxy(tmp_path, own_cp.url, "[cache]\nstale_if_error_max = 3\n", timeout=2)
    with running(proxy.start()):
        (a, _), (b, _) = register(proxy, own_cp, "stale-a"), register(proxy, own_cp, "stale-b")
        params: dict[str, str | int] = {"max_age": 1, "directive": "stale-if-error=100", "k": "stale"}
        with proxy.guest(a) as guest_a, proxy.guest(b) as guest_b:
            fresh = guest_a.get(CACHED, params=params, headers=META)
            stored = time.monotonic()
            assert fresh.status_code == 200
            own_cp.stop()
            time.sleep(max(0.0, stored + 1.2 - time.monotonic()))  # past max-age
            stale = guest_a.get(CACHED, params=params, headers=META)
            elsewhere = guest_b.get(CACHED, params=params, headers=META)  # never another VM's entry
            time.sleep(max(0.0, stored + 4.5 - time.monotonic()))  # past max-age + the capped window
            late = guest_a.get(CACHED, params=params, headers=META)
        assert stale.status_code == 200 and stale.json() == fresh.json()
        assert int(stale.headers["age"]) >= 1
        assert elsewhere.status_code == 502 and elsewhere.json()["error"]["code"] == "upstream_unavailable"
        assert late.status_code == 502 and late.json()["error"]["code"] == "upstream_unavailable"
        assert cache_metric(proxy, "stale") == 1
        wait_until(lambda: cache_results(proxy, "stale-a").count("stale") == 1)


def test_5xx_from_the_control_plane_gets_the_stale_entry(tmp_path: Path, own_cp: ControlPlane) -> None:
    proxy = Proxy(tmp_path, own_cp.url, timeout=2)
    with running(proxy.start()):
        address, _ = register(proxy, own_cp, "five")
        params: dict[str, str | int] = {"max_age": 1, "directive": "stale-if-error=60", "k": "five"}
        with proxy.guest(address) as guest:
            fresh = guest.get(CACHED, params=params, headers=META)
            time.sleep(1.2)
            answers = {}
            for status in (500, 502, 503, 504, 404):
                httpx.get(f"{own_cp.url}/_test/cached_status", params={"status": status}, timeout=5)
                answers[status] = guest.get(CACHED, params=params, headers=META)
        for status in (500, 502, 503, 504):
            assert answers[status].status_code == 200 and answers[status].json() == fresh.json(), status
            assert int(answers[status].headers["age"]) >= 1
        assert answers[404].status_code == 404  # not a failure of the control plane: passed on
        assert own_cp.requests_seen(CACHED) == 6
        assert cache_metric(proxy, "stale") == 4
    log = proxy.log.read_text()
    assert log.count("answered stale") == 4 and "eyJ" not in log  # each logged, never with the VM's token


def test_no_stale_entry_after_the_token_changed(tmp_path: Path, own_cp: ControlPlane) -> None:
    proxy = Proxy(tmp_path, own_cp.url, timeout=2)
    with running(proxy.start()):
        address, vm_id = register(proxy, own_cp, "rekeyed")
        params: dict[str, str | int] = {"max_age": 1, "directive": "stale-if-error=60", "k": "rekeyed"}
        with proxy.guest(address) as guest:
            assert guest.get(CACHED, params=params, headers=META).status_code == 200
            # A lifetime makes it differ from the first token even within the same second.
            new_token = mint(vm_id, Secrets.from_specs([str(own_cp.secret_file)]), lifetime=3600)
            proxy.add_vm("rekeyed", address, new_token, "--replace")
            time.sleep(1.2)
            httpx.get(f"{own_cp.url}/_test/cached_status", params={"status": 503}, timeout=5)
            after = guest.get(CACHED, params=params, headers=META)
        assert after.status_code == 503  # the control plane's own answer: nothing stale to serve
        assert cache_metric(proxy, "stale") == 0


def test_no_stale_entry_when_the_token_changes_during_the_failing_call(tmp_path: Path, own_cp: ControlPlane) -> None:
    """The entry was fetched with the old token: a call that fails after a re-key has nothing
    stale to serve, though it began before the change."""
    proxy = Proxy(tmp_path, own_cp.url, timeout=10)
    with running(proxy.start()):
        address, vm_id = register(proxy, own_cp, "rekeyed-during")
        params: dict[str, str | int] = {"max_age": 1, "directive": "stale-if-error=60", "delay": 3, "k": "during"}
        with proxy.guest(address) as guest, ThreadPoolExecutor(1) as pool:
            assert guest.get(CACHED, params=params, headers=META).status_code == 200
            time.sleep(1.2)  # past max-age, well within stale-if-error
            httpx.get(f"{own_cp.url}/_test/cached_status", params={"status": 503}, timeout=5)
            before = own_cp.requests_seen(CACHED)
            failing = pool.submit(guest.get, CACHED, params=params, headers=META)
            wait_until(lambda: own_cp.requests_seen(CACHED) > before)  # the call is at the control plane
            new_token = mint(vm_id, Secrets.from_specs([str(own_cp.secret_file)]), lifetime=3600)
            proxy.add_vm("rekeyed-during", address, new_token, "--replace")  # within the call's 3 s
            after = failing.result()
        assert after.status_code == 503  # the control plane's own answer
        assert cache_metric(proxy, "stale") == 0


def test_waiters_are_answered_when_the_leaders_guest_hangs_up(proxy: Proxy, cp: ControlPlane) -> None:
    address, vm_id = register(proxy, cp, "orphans")
    before = cp.requests_seen(CACHED)
    target = f"{CACHED}?max_age=60&delay=1&k=orphans"

    async def scenario() -> list[httpx.Response]:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port, local_addr=(address, 0))
        writer.write(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{proxy.port}\r\nMetadata: true\r\n\r\n".encode())
        while cp.requests_seen(CACHED) - before < 1:
            await asyncio.sleep(0.02)
        waiters = asyncio.create_task(burst(proxy, address, 10, max_age=60, delay=1, k="orphans"))
        await asyncio.sleep(0.2)
        writer.close()  # the leader's guest goes away; its call does not fail the waiters
        return await waiters

    responses = asyncio.run(scenario())
    assert [r.status_code for r in responses] == [200] * 10
    assert {r.json()["vm_id"] for r in responses} == {vm_id}
    assert cp.requests_seen(CACHED) - before == 1
