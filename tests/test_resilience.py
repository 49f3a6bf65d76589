"""Resilience end to end (issue 7): a control plane that stops, restarts, stalls and fails; the
per-VM response cache; expiring and rotated tokens; a damaged registry; TLS with a private CA
and a client certificate. Real processes throughout (tests/harness.py); guests are loopback
source addresses.

Counts come from the control plane's per-path counter (`/_test/requests?path=`): the proxy's
readiness probe calls the control plane too, so a total count would race with it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import count
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme

from controlplane.tokens import Secrets, fingerprint, mint
from metadata_proxy.registry import LOCK_PATIENCE
from tests.harness import ControlPlane, Proxy, TLSControlPlane, running

META = {"Metadata": "true"}
CACHED = "/runtime/cached"
_addresses = count(10)


def next_address() -> str:
    return f"127.0.0.{next(_addresses)}"


def token_for(cp: ControlPlane, vm_id: str, lifetime: int | None = None) -> str:
    """A runtime token signed with the control plane's secret (in-process: `controlplane mint` costs a start-up)."""
    return mint(vm_id, Secrets.from_specs([str(cp.secret_file)]), lifetime=lifetime)


def register(proxy: Proxy, cp: ControlPlane, name: str) -> tuple[str, str, str]:
    """A new VM: (address, vm_id, token)."""
    address = next_address()
    vm_id = f"vm-{name}"
    token = token_for(cp, vm_id)
    proxy.add_vm(name, address, token)
    return address, vm_id, token


def cached_get(guest: httpx.Client, **params: Any) -> httpx.Response:
    """GET /runtime/cached, whose answer carries `Cache-Control: max-age=<max_age>, <directive>...`."""
    return guest.get(CACHED, params=params, headers=META)


def served(response: httpx.Response) -> int:
    """The control plane's count of /runtime/cached answers when it produced `response`."""
    assert response.status_code == 200, response.text
    number: int = response.json()["served"]
    return number


def error_code(response: httpx.Response) -> str:
    code: str = response.json()["error"]["code"]
    return code


def wait_until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {condition}")
        time.sleep(0.02)


@contextlib.contextmanager
def admin_client(proxy: Proxy) -> Iterator[httpx.Client]:
    transport = httpx.HTTPTransport(uds=str(proxy.admin))
    with httpx.Client(transport=transport, base_url="http://admin", timeout=5) as client:
        yield client


def log_mentions(proxy: Proxy, text: str) -> bool:
    return any(text in line for line in proxy.log_lines())


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, cp: ControlPlane) -> Iterator[Proxy]:
    """The shared proxy: 2 s upstream timeout, at most 3 cached answers per VM."""
    server = Proxy(tmp_path_factory.mktemp("proxy"), cp.url, "[cache]\nmax_entries_per_vm = 3\n", timeout=2)
    with running(server.start()):
        yield server


@pytest.fixture(scope="module")
def shared_vm(proxy: Proxy, cp: ControlPlane) -> str:
    address, _, _ = register(proxy, cp, "shared")
    return address


# -- the control plane stops, restarts, stalls, fails ---------------------------------------


def test_stopped_control_plane_is_502_within_the_retry_budget(tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path).start()
    proxy = Proxy(tmp_path, cp.url).start()  # retry_budget 0.5 s
    with running(cp, proxy):
        address, _, _ = register(proxy, cp, "stopped")
        with proxy.guest(address) as guest:
            assert guest.get("/runtime/whoami", headers=META).status_code == 200  # a kept-alive upstream connection
            cp.stop()
            started = time.monotonic()
            response = guest.get("/runtime/whoami", headers=META)
            elapsed = time.monotonic() - started
        wait_until(lambda: log_mentions(proxy, "upstream_unavailable"))
    assert response.status_code == 502
    assert error_code(response) == "upstream_unavailable"
    assert elapsed < 2  # the 0.5 s budget, not the 3 s timeout


def test_control_plane_back_within_the_retry_budget_answers(tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path).start()
    proxy = Proxy(tmp_path, cp.url, retry_budget=10).start()
    with running(cp, proxy):
        address, vm_id, _ = register(proxy, cp, "comeback")
        cp.stop()
        restart = threading.Timer(0.5, cp.start)  # the same port
        restart.start()
        try:
            started = time.monotonic()
            with proxy.guest(address) as guest:
                response = guest.get("/runtime/whoami", headers=META)
            elapsed = time.monotonic() - started
        finally:
            restart.join()
        reached = cp.requests_seen("/runtime/whoami")
    assert response.status_code == 200, response.text
    assert response.json()["vm_id"] == vm_id
    assert elapsed >= 0.5  # it was refused first, and retried until the control plane was back
    assert reached == 1


def test_control_plane_killed_mid_request(tmp_path: Path) -> None:
    cp = ControlPlane(tmp_path).start()
    proxy = Proxy(tmp_path, cp.url).start()
    with running(cp, proxy):
        address, vm_id, _ = register(proxy, cp, "midway")
        with ThreadPoolExecutor(1) as pool, proxy.guest(address) as guest:
            in_flight = pool.submit(guest.get, "/runtime/slow", params={"seconds": 5}, headers=META)
            wait_until(lambda: cp.requests_seen("/runtime/slow") == 1)
            assert cp.process is not None
            cp.process.kill()  # a crash: no graceful drain
            cp.process.wait()
            cp.process = None
            response = in_flight.result(timeout=5)
        cp.start()  # the same port
        with proxy.guest(address) as guest:
            after = guest.get("/runtime/whoami", headers=META)
        replayed = cp.requests_seen("/runtime/slow")
    assert response.status_code == 502
    assert error_code(response) == "upstream_unavailable"
    assert after.status_code == 200 and after.json()["vm_id"] == vm_id
    assert replayed == 0


def test_slow_control_plane_is_504_and_never_retried(proxy: Proxy, cp: ControlPlane, shared_vm: str) -> None:
    before = cp.requests_seen("/runtime/slow")
    with proxy.guest(shared_vm) as guest:
        started = time.monotonic()
        response = guest.get("/runtime/slow", params={"seconds": 8}, headers=META)
        elapsed = time.monotonic() - started
    assert response.status_code == 504
    assert error_code(response) == "upstream_timeout"
    assert 2 <= elapsed < 6  # the proxy's 2 s timeout, not the control plane's 8 s
    assert cp.requests_seen("/runtime/slow") == before + 1


def test_upstream_5xx_pass_through_once(proxy: Proxy, cp: ControlPlane, shared_vm: str) -> None:
    with proxy.guest(shared_vm) as guest:
        for status in (500, 502, 503, 504):
            path = f"/runtime/status/{status}"
            before = cp.requests_seen(path)
            response = guest.get(path, headers=META)
            assert response.status_code == status
            assert response.json() == {"status": status}  # the control plane's body, not our envelope
            assert cp.requests_seen(path) == before + 1


# -- the response cache ---------------------------------------------------------------------


def test_cache_serves_for_max_age_with_age(proxy: Proxy, shared_vm: str) -> None:
    with proxy.guest(shared_vm) as guest:
        first = cached_get(guest, max_age=2, k="age")
        stored = time.monotonic()
        time.sleep(1.1)
        second = cached_get(guest, max_age=2, k="age")
        time.sleep(max(0.0, stored + 2.1 - time.monotonic()))
        third = cached_get(guest, max_age=2, k="age")
    assert first.headers["cache-control"] == "max-age=2"
    assert "age" not in first.headers
    assert second.json() == first.json()  # from the cache: the control plane did not answer again
    assert second.headers["cache-control"] == "max-age=2"
    assert second.headers["age"] == "1"
    assert second.headers["x-request-id"] != first.headers["x-request-id"]
    assert int(second.headers["content-length"]) == len(second.content)
    assert len(first.headers.get_list("date")) == len(second.headers.get_list("date")) == 1  # ours, not two
    assert served(third) > served(first)  # stale after max-age: fetched again
    assert "age" not in third.headers


def test_cache_is_never_shared_between_vms(proxy: Proxy, cp: ControlPlane) -> None:
    a, a_id, _ = register(proxy, cp, "cache-a")
    b, b_id, _ = register(proxy, cp, "cache-b")
    with proxy.guest(a) as guest_a, proxy.guest(b) as guest_b:
        a1 = cached_get(guest_a, max_age=60, k="same")
        b1 = cached_get(guest_b, max_age=60, k="same")
        a2 = cached_get(guest_a, max_age=60, k="same")
        b2 = cached_get(guest_b, max_age=60, k="same")
    assert a1.json()["vm_id"] == a_id and b1.json()["vm_id"] == b_id
    assert served(b1) == served(a1) + 1 and "age" not in b1.headers
    assert a2.json() == a1.json() and "age" in a2.headers
    assert b2.json() == b1.json() and "age" in b2.headers


@pytest.mark.parametrize(
    ("params", "cacheable"),
    [
        ({"max_age": 60}, True),
        ({"max_age": 60, "directive": "private"}, True),
        ({"max_age": 60, "directive": "no-store"}, False),
        ({"max_age": 60, "directive": "no-cache"}, False),
        ({"max_age": 60, "directive": ["private", "no-cache"]}, False),
        ({"max_age": 0}, False),
        ({"directive": "public"}, False),
        ({}, False),
    ],
    ids=["max-age", "private", "no-store", "no-cache", "private-no-cache", "max-age-0", "no-max-age", "none"],
)
def test_cache_control_directives(proxy: Proxy, shared_vm: str, params: dict[str, Any], cacheable: bool) -> None:
    key = json.dumps(params, sort_keys=True)
    with proxy.guest(shared_vm) as guest:
        first = cached_get(guest, **params, k=key)
        second = cached_get(guest, **params, k=key)
    if cacheable:
        assert second.json() == first.json() and "age" in second.headers
    else:
        assert served(second) == served(first) + 1 and "age" not in second.headers


def test_cache_entries_per_vm_are_bounded(proxy: Proxy, cp: ControlPlane) -> None:
    address, _, _ = register(proxy, cp, "bounded")  # max_entries_per_vm = 3
    with proxy.guest(address) as guest:
        misses = [served(cached_get(guest, max_age=60, k=k)) for k in (1, 2, 3, 4)]
        newest = cached_get(guest, max_age=60, k=4)
        oldest = cached_get(guest, max_age=60, k=1)
    assert misses == sorted(set(misses))
    assert served(newest) == misses[3] and "age" in newest.headers
    assert served(oldest) > misses[3] and "age" not in oldest.headers  # evicted for the fourth


def test_token_rotation_drops_the_vms_cache(proxy: Proxy, cp: ControlPlane) -> None:
    address, vm_id, old = register(proxy, cp, "rotated")
    new = token_for(cp, vm_id, lifetime=3600)
    with proxy.guest(address) as guest:
        first = cached_get(guest, max_age=60)
        hit = cached_get(guest, max_age=60)
        proxy.add_vm("rotated", address, new, "--replace")
        after = cached_get(guest, max_age=60)
    assert first.json()["token_fingerprint"] == fingerprint(old)
    assert hit.json() == first.json()
    assert after.json()["token_fingerprint"] == fingerprint(new)
    assert served(after) > served(first) and "age" not in after.headers


def test_answer_in_flight_during_rotation_is_not_cached(proxy: Proxy, cp: ControlPlane) -> None:
    address, vm_id, old = register(proxy, cp, "racing")
    new = token_for(cp, vm_id, lifetime=3600)
    before = cp.requests_seen(CACHED)
    with ThreadPoolExecutor(1) as pool, proxy.guest(address) as guest:
        in_flight = pool.submit(cached_get, guest, max_age=60, delay=1.5)
        wait_until(lambda: cp.requests_seen(CACHED) == before + 1)
        proxy.add_vm("racing", address, new, "--replace")
        first = in_flight.result(timeout=10)
    with proxy.guest(address) as guest:
        after = cached_get(guest, max_age=60, delay=1.5)
    assert first.status_code == 200, first.text
    assert first.json()["token_fingerprint"] == fingerprint(old)  # it began before the rotation
    assert after.json()["token_fingerprint"] == fingerprint(new)  # it began after: never the old answer
    assert "age" not in after.headers


def test_removal_drops_the_vms_cache(proxy: Proxy, cp: ControlPlane) -> None:
    address, _, token = register(proxy, cp, "removed")
    with proxy.guest(address) as guest:
        first = cached_get(guest, max_age=60)
    proxy.hostagent("vm", "remove", "removed")
    with proxy.guest(address) as guest:
        gone = cached_get(guest, max_age=60)
    proxy.add_vm("removed", address, token)  # the same name, address and token again
    with proxy.guest(address) as guest:
        again = cached_get(guest, max_age=60)
    assert gone.status_code == 403 and error_code(gone) == "unknown_vm"
    assert served(again) > served(first) and "age" not in again.headers


# -- tokens ---------------------------------------------------------------------------------


def test_expired_token_is_503_without_calling_the_control_plane(proxy: Proxy, cp: ControlPlane) -> None:
    address = next_address()
    token = cp.mint("vm-expiring", "--lifetime", "3")
    proxy.add_vm("expiring", address, token)
    exp = json.loads(proxy.hostagent("vm", "show", "expiring", "--json").stdout)["token_exp"]
    with proxy.guest(address) as guest:
        fresh = cached_get(guest, max_age=60)
        assert fresh.json()["token_fingerprint"] == fingerprint(token)
        time.sleep(max(0.0, exp - time.time()) + 0.05)
        before = cp.requests_seen("/runtime/whoami"), cp.requests_seen(CACHED)
        expired = guest.get("/runtime/whoami", headers=META)
        expired_cached = cached_get(guest, max_age=60)  # a cached answer does not outlive the token
        after = cp.requests_seen("/runtime/whoami"), cp.requests_seen(CACHED)
        renewed_token = cp.mint("vm-expiring", "--lifetime", "3600")
        proxy.add_vm("expiring", address, renewed_token, "--replace")
        renewed = guest.get("/runtime/echo", headers=META)
    for response in (expired, expired_cached):
        assert response.status_code == 503
        assert error_code(response) == "token_expired"
        assert token not in response.text  # the refusal names the problem, never the token
    assert after == before
    assert renewed.status_code == 200
    assert renewed.json()["token_fingerprint"] == fingerprint(renewed_token)


# -- the registry ---------------------------------------------------------------------------


def test_damaged_registry_fails_closed_then_recovers_when_rebuilt(tmp_path: Path, cp: ControlPlane) -> None:
    proxy = Proxy(tmp_path, cp.url).start()
    registry = proxy.registry
    with running(proxy), admin_client(proxy) as admin:
        address = next_address()
        proxy.add_vm("web", address, token_for(cp, "vm-web-old"))
        with proxy.guest(address) as guest:
            assert cached_get(guest, max_age=60).json()["vm_id"] == "vm-web-old"
        wait_until(lambda: admin.get("/readyz").status_code == 200)

        with open(registry, "r+b") as f:  # garbage over the file in place
            f.write(b"garbage!" * 1024)
        started = time.monotonic()
        wait_until(lambda: admin.get("/readyz").status_code == 503)
        noticed = time.monotonic() - started
        readyz = admin.get("/readyz").json()
        before = cp.requests_seen(CACHED)
        with proxy.guest(address) as guest:
            refused = cached_get(guest, max_age=60)
        reached = cp.requests_seen(CACHED) - before

        damaged, stamp = registry.read_bytes(), registry.stat().st_mtime_ns
        refusals = [
            proxy.hostagent("vm", "list", check=False),
            proxy.hostagent(
                "vm",
                "add",
                "db",
                "--address",
                next_address(),
                "--token-file",
                "-",
                input=token_for(cp, "vm-db"),
                check=False,
            ),
            proxy.hostagent("vm", "sync", "--allow-empty", "-", input="", check=False),
        ]
        untouched = registry.read_bytes() == damaged and registry.stat().st_mtime_ns == stamp

        # The rebuild: the damaged file moved aside, a fresh one written by `vm sync`; the
        # address now belongs to another VM of the same name.
        registry.rename(registry.with_name("registry.damaged"))
        with proxy.guest(address) as guest:
            missing = guest.get("/runtime/whoami", headers=META)
        line = json.dumps({"name": "web", "address": address, "token": token_for(cp, "vm-web-new")})
        proxy.hostagent("vm", "sync", "-", input=line + "\n")
        wait_until(lambda: admin.get("/readyz").status_code == 200)
        with proxy.guest(address) as guest:
            rebuilt = cached_get(guest, max_age=60)

    assert noticed < 3  # generous: the watch looks every 0.25 s (without it: never)
    assert readyz["checks"]["registry"] == "unavailable"
    assert refused.status_code == 503 and error_code(refused) == "registry_unavailable"
    assert reached == 0
    for result in refusals:
        assert result.returncode == 1
        assert result.stdout == ""
        assert len(result.stderr.splitlines()) == 1 and "Traceback" not in result.stderr
        assert str(registry) in result.stderr and "not an SQLite database" in result.stderr
    assert untouched
    assert missing.status_code == 403 and error_code(missing) == "unknown_vm"  # missing: nobody registered yet
    assert rebuilt.status_code == 200
    assert rebuilt.json()["vm_id"] == "vm-web-new"  # never the old VM's cached answer
    assert "age" not in rebuilt.headers


@pytest.mark.parametrize("damage", ["directory", "truncated"])
def test_unreadable_registry_is_registry_unavailable(tmp_path: Path, cp: ControlPlane, damage: str) -> None:
    proxy = Proxy(tmp_path, cp.url).start()
    registry = proxy.registry
    with running(proxy), admin_client(proxy) as admin:
        address = next_address()
        token = token_for(cp, "vm-unreadable")
        proxy.add_vm("unreadable", address, token)
        with proxy.guest(address) as guest:
            assert guest.get("/runtime/whoami", headers=META).status_code == 200
        wait_until(lambda: admin.get("/readyz").status_code == 200)
        if damage == "directory":
            registry.unlink()
            registry.mkdir()
        else:
            os.truncate(registry, 5)
        before = cp.requests_seen("/runtime/whoami")
        with proxy.guest(address) as guest:
            refused = guest.get("/runtime/whoami", headers=META)
        reached = cp.requests_seen("/runtime/whoami") - before
        wait_until(lambda: admin.get("/readyz").status_code == 503)
        listing = proxy.hostagent("vm", "list", check=False)

        if damage == "directory":
            registry.rmdir()
        else:
            registry.unlink()
        proxy.add_vm("unreadable", address, token)
        wait_until(lambda: admin.get("/readyz").status_code == 200)
        with proxy.guest(address) as guest:
            recovered = guest.get("/runtime/whoami", headers=META)
    assert refused.status_code == 503 and error_code(refused) == "registry_unavailable"
    assert reached == 0
    assert listing.returncode == 1 and len(listing.stderr.splitlines()) == 1
    assert recovered.status_code == 200 and recovered.json()["vm_id"] == "vm-unreadable"


def test_registry_locked_too_long_is_registry_unavailable(tmp_path: Path, cp: ControlPlane) -> None:
    proxy = Proxy(tmp_path, cp.url).start()
    registry = proxy.registry
    with running(proxy):
        address = next_address()
        proxy.add_vm("locked", address, token_for(cp, "vm-locked"))
        with proxy.guest(address) as guest:
            assert guest.get("/runtime/whoami", headers=META).status_code == 200
        holder = sqlite3.connect(registry, isolation_level=None)
        try:
            holder.execute("BEGIN EXCLUSIVE")  # readers are locked out until it ends
            os.utime(registry)  # a change the proxy has to read while the lock is held
            with proxy.guest(address) as guest:
                # A lock as brief as a commit: the snapshot from before it still holds.
                during_commit = guest.get("/runtime/whoami", headers=META)
                time.sleep(LOCK_PATIENCE + 0.3)
                refused = guest.get("/runtime/whoami", headers=META)
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        with proxy.guest(address) as guest:
            recovered = guest.get("/runtime/whoami", headers=META)
    assert during_commit.status_code == 200 and during_commit.json()["vm_id"] == "vm-locked"
    assert refused.status_code == 503 and error_code(refused) == "registry_unavailable"
    assert recovered.status_code == 200 and recovered.json()["vm_id"] == "vm-locked"


# -- TLS towards the control plane ----------------------------------------------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def tls_cp(tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA) -> Iterator[TLSControlPlane]:
    control_plane = TLSControlPlane(tmp_path_factory.mktemp("tls"), ca, require_client_cert=False).start()
    with running(control_plane):
        yield control_plane


@pytest.fixture(scope="module")
def mtls_cp(tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA) -> Iterator[TLSControlPlane]:
    control_plane = TLSControlPlane(tmp_path_factory.mktemp("mtls"), ca, require_client_cert=True).start()
    with running(control_plane):
        yield control_plane


def whoami_through(proxy: Proxy, cp: ControlPlane, name: str) -> httpx.Response:
    address, _, _ = register(proxy, cp, name)
    with proxy.guest(address) as guest:
        return guest.get("/runtime/whoami", headers=META)


@pytest.mark.parametrize(("ca_file", "client_cert"), [(True, False), (True, True)], ids=["ca", "ca+client-cert"])
def test_private_ca_with_ca_file(
    tmp_path: Path, tls_cp: TLSControlPlane, mtls_cp: TLSControlPlane, ca_file: bool, client_cert: bool
) -> None:
    cp = mtls_cp if client_cert else tls_cp
    proxy = Proxy(tmp_path, cp.url, cp.toml(ca_file=ca_file, client_cert=client_cert)).start()
    with running(proxy):
        response = whoami_through(proxy, cp, f"tls-{client_cert}")
    assert response.status_code == 200, response.text
    assert response.json()["vm_id"] == f"vm-tls-{client_cert}"


def test_private_ca_without_ca_file_is_502_tls_error(tmp_path: Path, tls_cp: TLSControlPlane) -> None:
    proxy = Proxy(tmp_path, tls_cp.url).start()
    with running(proxy):
        before = tls_cp.requests_seen("/runtime/whoami")
        response = whoami_through(proxy, tls_cp, "untrusted")
        reached = tls_cp.requests_seen("/runtime/whoami") - before
        wait_until(lambda: log_mentions(proxy, "certificate verification failed"))
    assert response.status_code == 502
    assert error_code(response) == "upstream_tls_error"
    assert reached == 0


def test_required_client_certificate_missing_is_502_at_once(tmp_path: Path, mtls_cp: TLSControlPlane) -> None:
    proxy = Proxy(tmp_path, mtls_cp.url, mtls_cp.toml(client_cert=False), retry_budget=10).start()
    with running(proxy):
        address, _, _ = register(proxy, mtls_cp, "anonymous")
        before = mtls_cp.requests_seen("/runtime/whoami")
        with proxy.guest(address) as guest:
            started = time.monotonic()
            response = guest.get("/runtime/whoami", headers=META)
            elapsed = time.monotonic() - started
        reached = mtls_cp.requests_seen("/runtime/whoami") - before
        wait_until(lambda: log_mentions(proxy, "client certificate"))
    assert response.status_code == 502
    # A TLS 1.3 server that refuses the certificate after the handshake may just close the
    # connection (uvicorn's does): then it is told apart from a crash only by the log line.
    assert error_code(response) in ("upstream_tls_error", "upstream_unavailable")
    assert elapsed < 2  # not retried for the 10 s budget: the call reached the control plane
    assert reached == 0
