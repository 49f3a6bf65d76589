"""A hostile guest against the real `metadata-proxy serve` and `controlplane serve`: the
attacks the other hostile suites (test_hostile, test_slow_greedy) did not cover and that
broke something. Raw bytes; each refusal asserts status, code, that nothing reached the
control plane, and that the VM is served after.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness import ControlPlane, Proxy, running
from tests.test_hostile import Fleet, exchange, refused, request

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
"""


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, cp: ControlPlane) -> Iterator[Fleet]:
    proxy = Proxy(tmp_path_factory.mktemp("attack"), cp.url, ROUTES, 'host_aliases = ["metadata.internal"]').start()
    with running(proxy):
        yield Fleet(proxy, cp, [f"a{i:02d}" for i in range(8)], 160)


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
    ],
)
def test_a_narrower_routes_guard_is_not_bypassed_by_how_upstream_reads_the_path(
    fleet: Fleet, cp: ControlPlane, target: bytes
) -> None:
    vm = fleet.vms[0]
    refused(fleet, cp, vm, request(fleet, target), 404, "not_found")


def test_paths_with_parameters_or_empty_segments_inside_one_route_are_forwarded(fleet: Fleet) -> None:
    vm = fleet.vms[1]
    for target in (b"/runtime/echo/a;b", b"/runtime/echo//a", b"/runtime/echo/a;b/c"):
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
