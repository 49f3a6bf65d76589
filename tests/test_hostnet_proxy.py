"""The whole host path in real namespaces: guests with the same address, behind their VMs'
namespaces, call the real proxy on the metadata addresses in the root namespace, and the
real control plane says who they are (root only).

The topology is test_hostnet.py's: per VM a namespace joined to the root by a veth (the
host-unique address inside) and a guest namespace behind it at 10.0.0.2 / fd00:0:0:1::2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import ControlPlane, Proxy, running
from tests.test_hostnet import HOSTAGENT, META4, META6, Topology, VMNet, leak_guard, lo_addresses, sh, tables

pytestmark = pytest.mark.root

# A guest's keep-alive client: one request, then (on a line from stdin) another on the same
# connection; prints each outcome as a JSON line.
KEEPALIVE_CLIENT = """
import http.client, json, sys
conn = http.client.HTTPConnection(sys.argv[1], 80, timeout=3)
for _ in range(2):
    try:
        conn.request("GET", "/runtime/whoami", headers={"Metadata": "true"})
        response = conn.getresponse()
        print(json.dumps({"status": response.status, "body": response.read().decode()}), flush=True)
    except Exception as exc:
        print(json.dumps({"error": type(exc).__name__}), flush=True)
    sys.stdin.readline()
"""


class Host:
    def __init__(self, workdir: Path, cp: ControlPlane, proxy: Proxy) -> None:
        self.workdir = workdir
        self.cp = cp
        self.proxy = proxy

    def agent(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return sh(HOSTAGENT, "--registry", str(self.proxy.registry), *args, stdin=stdin, check=False)

    def add(self, name: str, vm: VMNet, vm_id: str) -> None:
        token = self.cp.mint(vm_id)
        result = self.agent(
            "vm", "add", name, "--address", vm.addr4, "--address", vm.addr6, "--netns", vm.vmns,
            "--token-file", "-", stdin=token,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    workdir = tmp_path_factory.mktemp("hostnet-proxy")
    registry = workdir / "lib" / "registry.sqlite3"
    before_lo = lo_addresses()
    before_tables = tables(None)
    setup = sh(HOSTAGENT, "--registry", str(registry), "host", "setup", check=False)
    assert setup.returncode == 0, setup.stderr
    cp = ControlPlane(workdir)
    proxy = Proxy(workdir, cp.url, listen=((META4, 80), (META6, 80)), registry=registry)
    try:
        cp.start()
        proxy.start()
        with running(cp, proxy), leak_guard():
            yield Host(workdir, cp, proxy)
    finally:
        for address, prefix in lo_addresses():
            if address in (META4, META6) and (address, prefix) not in before_lo:
                sh("ip", "addr", "del", f"{address}/{prefix}", "dev", "lo", check=False)
        if ("inet", "metadata_proxy_host") not in before_tables:
            sh("nft", "delete", "table", "inet", "metadata_proxy_host", check=False)


@pytest.fixture
def topo() -> Iterator[Topology]:
    topology = Topology()
    try:
        yield topology
    finally:
        topology.close()


def whoami(vm: VMNet, target: str, *extra: str, timeout: float = 5) -> tuple[int, dict[str, object]]:
    """curl from inside the guest namespace, as a guest would; status 0 when nothing answered."""
    url = f"http://[{target}]/runtime/whoami" if ":" in target else f"http://{target}/runtime/whoami"
    result = sh(
        "ip", "netns", "exec", vm.guest, "curl", "-sg", "-m", str(timeout), "-o", "-", "-w", "\n%{http_code}",
        "-H", "Metadata: true", *extra, url, check=False,
    )  # fmt: skip
    body, _, status = result.stdout.rpartition("\n")
    return int(status or 0), json.loads(body) if body else {}


def test_same_guest_address_two_vms_each_identified_v4_and_v6(host: Host, topo: Topology) -> None:
    one, two = topo.vm(), topo.vm()
    host.add("hn-one", one, "vm-one")
    host.add("hn-two", two, "vm-two")
    for target in (META4, META6):
        status, body = whoami(one, target)
        assert status == 200 and body["vm_id"] == "vm-one", body
        status, body = whoami(two, target)
        assert status == 200 and body["vm_id"] == "vm-two", body
    assert whoami(one, META4)[1]["address"] == one.addr4
    assert whoami(two, META6)[1]["address"] == two.addr6


def test_a_guest_using_another_vms_address_is_still_itself(host: Host, topo: Topology) -> None:
    one, two = topo.vm(), topo.vm()
    host.add("hn-spoofer", one, "vm-spoofer")
    host.add("hn-victim", two, "vm-victim")
    sh("ip", "-n", one.guest, "addr", "add", f"{two.addr4}/32", "dev", "eth0")
    sh("ip", "-n", one.vmns, "route", "add", f"{two.addr4}/32", "via", "10.0.0.2", "dev", "tap0")
    status, body = whoami(one, META4, "--interface", two.addr4)
    assert status == 200
    assert body["vm_id"] == "vm-spoofer" and body["address"] == one.addr4


def test_remove_cuts_the_guest_off_also_on_an_open_keepalive_connection(host: Host, topo: Topology) -> None:
    vm = topo.vm()
    host.add("hn-leaving", vm, "vm-leaving")
    client = subprocess.Popen(
        ["ip", "netns", "exec", vm.guest, sys.executable, "-c", KEEPALIVE_CLIENT, META4],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert client.stdout is not None and client.stdin is not None
        first = json.loads(client.stdout.readline())
        assert first["status"] == 200 and "vm-leaving" in first["body"]
        removed = host.agent("vm", "remove", "hn-leaving")
        assert removed.returncode == 0, removed.stderr
        assert tables(vm.vmns) == []  # no rules left behind
        client.stdin.write("\n")
        client.stdin.flush()
        second = json.loads(client.stdout.readline())
        # The proxy closed the connection (or, had the close raced the request, refused it).
        assert "error" in second or second["status"] == 403, second
        client.stdin.write("\n")
        client.stdin.flush()
    finally:
        client.kill()
        client.wait(timeout=5)
        for stream in (client.stdin, client.stdout):
            if stream is not None:
                stream.close()
    status, _ = whoami(vm, META4, timeout=1)
    assert status == 0  # no table: the guest's traffic is no longer NATed, it cannot reach us


def test_flushed_rules_restored_by_reconcile_and_apply(host: Host, topo: Topology) -> None:
    vm = topo.vm()
    host.add("hn-flushed", vm, "vm-flushed")
    for repair in (("reconcile",), ("vm", "apply", "hn-flushed")):
        sh("ip", "netns", "exec", vm.vmns, "nft", "flush", "ruleset")
        assert whoami(vm, META4, timeout=1)[0] == 0
        result = host.agent(*repair)
        assert result.returncode == 0, result.stderr
        status, body = whoami(vm, META4)
        assert status == 200 and body["vm_id"] == "vm-flushed"


def test_refusals_are_clean(host: Host, topo: Topology) -> None:
    vm, other = topo.vm(), topo.vm()
    host.add("hn-holder", other, "vm-holder")
    token = host.cp.mint("vm-refused")
    cases = [
        (["--address", vm.addr4, "--netns", "mpt-absent-ns"], "mpt-absent-ns"),
        (["--address", "10.201.0.9", "--netns", vm.vmns], "10.201.0.9"),
        (["--address", other.addr4, "--netns", vm.vmns], "hn-holder"),
    ]
    for args, named in cases:
        result = host.agent("vm", "add", "hn-refused", *args, "--token-file", "-", stdin=token)
        assert result.returncode == 1
        assert len(result.stderr.strip().splitlines()) == 1 and named in result.stderr
        assert token not in result.stdout + result.stderr
        assert tables(vm.vmns) == []
    assert "hn-refused" not in host.agent("vm", "list").stdout
