"""hostagent's plumbing in real network namespaces with real nftables (root only).

The README "The host side" topology, built per test: for VM n a namespace ``vmns`` joined to the
root namespace by a veth (host-unique 10.200.n.2/24 and fd00:200:n::2/64 inside, .1 and
::1 in root), and a guest namespace joined to ``vmns`` by a second veth standing in for
the tap (the guest is 10.0.0.2 and fd00:0:0:1::2 in every VM, behind .1 and ::1). A test
server in the root namespace listens on the metadata addresses and answers each
connection with the peer address it saw: the proxy's view of who is calling.

Traffic goes only to loopback and to namespaces created here; the addresses and table
that ``host setup`` adds to the root namespace are removed at the end of the module.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from controlplane.tokens import fingerprint, mint

pytestmark = pytest.mark.root

HOSTAGENT = str(Path(sys.executable).with_name("hostagent"))
META4, META6 = "169.254.169.254", "fd00:a9fe::254"
PREFIX = f"mpt-{os.getpid()}-"
SECRET = (None, b"k" * 32)
# Subnet numbers: each VM of this run gets its own 10.200.n.0/24; a pid-derived start keeps
# two concurrent runs apart.
_SUBNETS = itertools.count(1 + (os.getpid() % 12) * 20)

CLIENT = """
import socket, sys
family = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(family, socket.SOCK_STREAM)
s.settimeout(float(sys.argv[3]))
if sys.argv[2]:
    s.bind((sys.argv[2], 0))
try:
    s.connect((sys.argv[1], 80))
    print(s.recv(200).decode().strip())
except OSError as exc:
    print(f"error: {exc}")
"""


def sh(*argv: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=20, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} -> {proc.returncode}: {proc.stderr.strip()}")
    return proc


def lo_addresses() -> list[tuple[str, int]]:
    data = json.loads(sh("ip", "-j", "addr", "show", "dev", "lo").stdout)
    return [(info["local"], info["prefixlen"]) for link in data for info in link["addr_info"]]


def tables(netns: str | None) -> list[tuple[str, str]]:
    argv = ["nft", "-j", "list", "tables"]
    if netns is not None:
        argv = ["ip", "netns", "exec", netns, *argv]
    data = json.loads(sh(*argv).stdout)["nftables"]
    return [(item["table"]["family"], item["table"]["name"]) for item in data if "table" in item]


def flows_to_metadata(netns: str) -> int:
    """Tracked connections inside `netns` towards a metadata address, read as conntrack XML."""
    count = 0
    for family, address in (("ipv4", META4), ("ipv6", META6)):
        argv = ["conntrack", "-L", "-f", family, "-d", address, "-p", "tcp", "--dport", "80", "-o", "xml"]
        out = sh("ip", "netns", "exec", netns, *argv, check=False).stdout
        if out.strip():
            count += len(ET.fromstring(out).findall("flow"))
    return count


# -- the root side: host setup and the test server ------------------------------------------


@contextlib.contextmanager
def leak_guard() -> Iterator[None]:
    """Drop, in the root namespace, whatever arrives from a test VM without a VM address.

    A guest whose VM table is gone (removed, flushed) reaches the root namespace un-NATed,
    from 10.0.0.2; without this guard the root namespace would answer it through its
    default route, off this machine. Traffic stays inside the namespaces the tests made.
    """
    table = f"mpt_guard_{os.getpid()}"
    sh(
        "nft",
        "-f",
        "-",
        stdin=f"""
table inet {table} {{
    chain prerouting {{
        type filter hook prerouting priority raw; policy accept;
        iifname "mpt*" ip saddr != 10.200.0.0/16 drop
        iifname "mpt*" ip6 saddr != fd00:200::/32 ip6 saddr != fe80::/10 drop
    }}
}}
""",
    )
    try:
        yield
    finally:
        sh("nft", "delete", "table", "inet", table, check=False)


@dataclass
class Host:
    registry: Path
    setup_runs: list[subprocess.CompletedProcess[str]]
    peers: list[str]  # every peer address the server accepted, in order


class PeerServer:
    """Answers every connection with the peer address it saw, and remembers it."""

    def __init__(self, address: str, family: socket.AddressFamily, peers: list[str]) -> None:
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((address, 80))
        self.sock.listen(64)
        self.peers = peers
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, peer = self.sock.accept()
            except OSError:
                return
            with conn:
                self.peers.append(peer[0])
                conn.sendall(f"{peer[0]}\n".encode())

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        self.thread.join(timeout=5)


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    before_lo = lo_addresses()
    before_tables = tables(None)
    registry = tmp_path_factory.mktemp("hostnet") / "var" / "registry.sqlite3"
    runs = [sh(HOSTAGENT, "--registry", str(registry), "host", "setup", check=False) for _ in range(2)]
    peers: list[str] = []
    servers: list[PeerServer] = []
    try:
        for run in runs:
            assert run.returncode == 0, run.stderr
        servers = [PeerServer(META4, socket.AF_INET, peers), PeerServer(META6, socket.AF_INET6, peers)]
        with leak_guard():
            yield Host(registry, runs, peers)
    finally:
        for server in servers:
            server.close()
        # Remove exactly what host setup added to the root namespace, nothing that was there before.
        for address, prefix in lo_addresses():
            if address in (META4, META6) and (address, prefix) not in before_lo:
                sh("ip", "addr", "del", f"{address}/{prefix}", "dev", "lo", check=False)
        if ("inet", "metadata_proxy_host") not in before_tables:
            sh("nft", "delete", "table", "inet", "metadata_proxy_host", check=False)


# -- the per-VM topology --------------------------------------------------------------------


@dataclass
class VMNet:
    n: int
    vmns: str
    guest: str
    addr4: str
    addr6: str

    def fetch(self, target: str = META4, source: str | None = None, timeout: float = 3.0) -> str:
        """Connect from the guest to `target`:80 (optionally from `source`); what the server saw, or error: ..."""
        argv = ["ip", "netns", "exec", self.guest, sys.executable, "-c", CLIENT, target, source or "", str(timeout)]
        return sh(*argv).stdout.strip()


class Topology:
    """Creates namespaces and links for VMs; deletes every one of them in `close`."""

    def __init__(self) -> None:
        self.namespaces: list[str] = []
        self.root_links: list[str] = []

    def namespace(self, name: str) -> str:
        full = PREFIX + name
        sh("ip", "netns", "add", full)
        self.namespaces.append(full)
        sh("ip", "-n", full, "link", "set", "lo", "up")
        return full

    def vm(self) -> VMNet:
        n = next(_SUBNETS)
        vmns, guest = self.namespace(f"vm{n}"), self.namespace(f"g{n}")
        root_end = f"mpt{os.getpid() % 100000}r{n}"
        self.root_links.append(root_end)
        addr4, addr6 = f"10.200.{n}.2", f"fd00:200:{n:x}::2"
        # vmns <-> root: the host-unique addresses.
        sh("ip", "link", "add", root_end, "type", "veth", "peer", "name", "eth0", "netns", vmns)
        sh("ip", "addr", "add", f"10.200.{n}.1/24", "dev", root_end)
        sh("ip", "addr", "add", f"fd00:200:{n:x}::1/64", "dev", root_end, "nodad")
        sh("ip", "link", "set", root_end, "up")
        sh("ip", "-n", vmns, "addr", "add", f"{addr4}/24", "dev", "eth0")
        sh("ip", "-n", vmns, "addr", "add", f"{addr6}/64", "dev", "eth0", "nodad")
        sh("ip", "-n", vmns, "link", "set", "eth0", "up")
        sh("ip", "-n", vmns, "route", "add", "default", "via", f"10.200.{n}.1")
        sh("ip", "-n", vmns, "-6", "route", "add", "default", "via", f"fd00:200:{n:x}::1")
        sh("ip", "netns", "exec", vmns, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
        # guest <-> vmns: the tap stand-in; the same guest addresses in every VM.
        sh("ip", "-n", vmns, "link", "add", "tap0", "type", "veth", "peer", "name", "eth0", "netns", guest)
        sh("ip", "-n", vmns, "addr", "add", "10.0.0.1/24", "dev", "tap0")
        sh("ip", "-n", vmns, "addr", "add", "fd00:0:0:1::1/64", "dev", "tap0", "nodad")
        sh("ip", "-n", vmns, "link", "set", "tap0", "up")
        sh("ip", "-n", guest, "addr", "add", "10.0.0.2/24", "dev", "eth0")
        sh("ip", "-n", guest, "addr", "add", "fd00:0:0:1::2/64", "dev", "eth0", "nodad")
        sh("ip", "-n", guest, "link", "set", "eth0", "up")
        sh("ip", "-n", guest, "route", "add", "default", "via", "10.0.0.1")
        sh("ip", "-n", guest, "-6", "route", "add", "default", "via", "fd00:0:0:1::1")
        return VMNet(n, vmns, guest, addr4, addr6)

    def close(self) -> None:
        for link in self.root_links:
            sh("ip", "link", "del", link, check=False)
        for ns in self.namespaces:
            sh("ip", "netns", "del", ns, check=False)


@pytest.fixture
def topo() -> Iterator[Topology]:
    topology = Topology()
    try:
        yield topology
    finally:
        topology.close()


@pytest.fixture
def agent(host: Host, tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run hostagent on a registry of this test's own."""
    registry = tmp_path / "registry.sqlite3"

    def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return sh(HOSTAGENT, "--registry", str(registry), *args, check=False, stdin=stdin)

    run.registry = registry  # type: ignore[attr-defined]
    return run


def add(agent: Callable[..., subprocess.CompletedProcess[str]], name: str, vm: VMNet, *extra: str) -> str:
    token = mint(f"id-{name}", SECRET)
    proc = agent(
        "vm", "add", name, "--address", vm.addr4, "--address", vm.addr6, "--token-file", "-", "--netns", vm.vmns,
        *extra, stdin=token,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert token not in proc.stdout + proc.stderr
    return token


def registry_dump(path: Path) -> list[str]:
    import sqlite3

    if not path.exists():
        return []
    conn = sqlite3.connect(path)
    try:
        return list(conn.iterdump())
    finally:
        conn.close()


# -- tests ----------------------------------------------------------------------------------


def test_host_setup_is_idempotent(host: Host) -> None:
    first, second = host.setup_runs
    assert "added 169.254.169.254/32 to lo" in first.stdout or "unchanged" in first.stdout
    assert "host setup: unchanged" in second.stdout
    held = [entry for entry in lo_addresses() if entry[0] in (META4, META6)]
    assert sorted(held) == sorted([(META4, 32), (META6, 128)])  # once each, never a wider prefix
    assert tables(None).count(("inet", "metadata_proxy_host")) == 1
    ruleset = json.loads(sh("nft", "-j", "list", "table", "inet", "metadata_proxy_host").stdout)["nftables"]
    rules = [item["rule"]["expr"] for item in ruleset if "rule" in item]
    assert {r[0]["match"]["right"] for r in rules} == {META4, META6}
    assert all(r[1]["match"]["right"] == 80 and "accept" in r[2] for r in rules)
    directory = host.registry.parent
    assert directory.is_dir() and (directory.stat().st_mode & 0o777) in (0o700, 0o750)


def test_guests_with_the_same_address_are_told_apart(
    host: Host, topo: Topology, agent: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    one, two = topo.vm(), topo.vm()
    add(agent, "one", one)
    add(agent, "two", two)
    assert tables(one.vmns) == [("inet", "metadata_proxy")]
    assert one.fetch(META4) == one.addr4
    assert two.fetch(META4) == two.addr4
    assert one.fetch(META6) == one.addr6
    assert two.fetch(META6) == two.addr6


def test_a_guest_cannot_borrow_another_vms_address(
    host: Host, topo: Topology, agent: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    one, two = topo.vm(), topo.vm()
    add(agent, "one", one)
    add(agent, "two", two)
    # The guest of `one` claims VM two's host-unique addresses, and its vmns even routes the
    # answers back to it: the connection works, and is still seen as VM one.
    sh("ip", "-n", one.guest, "addr", "add", f"{two.addr4}/32", "dev", "eth0")
    sh("ip", "-n", one.guest, "addr", "add", f"{two.addr6}/128", "dev", "eth0", "nodad")
    sh("ip", "-n", one.vmns, "route", "add", f"{two.addr4}/32", "via", "10.0.0.2")
    sh("ip", "-n", one.vmns, "-6", "route", "add", f"{two.addr6}/128", "via", "fd00:0:0:1::2")
    start = len(host.peers)
    assert one.fetch(META4, source=two.addr4) == one.addr4
    assert one.fetch(META6, source=two.addr6) == one.addr6
    # Its own VM's address as source: whether or not the namespace lets it through, the
    # server never sees anyone but VM one.
    sh("ip", "-n", one.guest, "addr", "add", f"{one.addr4}/32", "dev", "eth0")
    sh("ip", "-n", one.guest, "addr", "add", f"{one.addr6}/128", "dev", "eth0", "nodad")
    for target, source in ((META4, one.addr4), (META6, one.addr6)):
        seen = one.fetch(target, source=source, timeout=1.0)
        assert seen == source or seen.startswith("error"), seen
    assert set(host.peers[start:]) == {one.addr4, one.addr6}


def test_remove_deletes_table_and_tracked_flows(
    host: Host, topo: Topology, agent: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    vm = topo.vm()
    add(agent, "gone", vm)
    assert vm.fetch(META4) == vm.addr4 and vm.fetch(META6) == vm.addr6
    assert flows_to_metadata(vm.vmns) >= 2  # the closed connections linger in conntrack
    proc = agent("vm", "remove", "gone")
    assert proc.returncode == 0 and proc.stdout.strip() == "gone: removed", proc.stderr
    assert tables(vm.vmns) == []
    assert flows_to_metadata(vm.vmns) == 0
    assert json.loads(agent("vm", "list", "--json").stdout) == []


def test_reconcile_and_apply_restore_a_flushed_namespace(
    host: Host, topo: Topology, agent: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    vm = topo.vm()
    add(agent, "vm", vm)
    # No guest traffic while the table is gone: unNATed answers would head for 10.0.0.2 via the host's default route.
    sh("ip", "netns", "exec", vm.vmns, "nft", "flush", "ruleset")
    assert tables(vm.vmns) == []
    proc = agent("reconcile")
    assert proc.returncode == 0, proc.stderr
    assert "1 applied" in proc.stdout
    assert tables(vm.vmns) == [("inet", "metadata_proxy")]
    assert vm.fetch(META4) == vm.addr4

    sh("ip", "netns", "exec", vm.vmns, "nft", "flush", "ruleset")
    proc = agent("vm", "apply", "vm")
    assert proc.returncode == 0 and proc.stdout.strip() == "vm: table applied", proc.stderr
    assert vm.fetch(META6) == vm.addr6


def test_reconcile_lists_missing_namespaces(
    host: Host, topo: Topology, agent: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    present, lost = topo.vm(), topo.vm()
    add(agent, "present", present)
    add(agent, "lost", lost)
    sh("ip", "netns", "del", lost.vmns)
    proc = agent("reconcile")
    assert proc.returncode == 0, proc.stderr
    assert f"lost: netns {lost.vmns} is missing" in proc.stdout.splitlines()
    assert "present" not in proc.stdout.replace("1 applied", "")
    strict = agent("reconcile", "--strict")
    assert strict.returncode == 1
    assert len(strict.stderr.splitlines()) == 1 and "missing" in strict.stderr
    apply = agent("vm", "apply", "lost")
    assert apply.returncode == 1 and lost.vmns in apply.stderr and len(apply.stderr.splitlines()) == 1
    # The namespace being gone does not keep the row.
    remove = agent("vm", "remove", "lost")
    assert remove.returncode == 0 and remove.stdout.strip() == "lost: removed", remove.stderr
    assert [vm["name"] for vm in json.loads(agent("vm", "list", "--json").stdout)] == ["present"]


def test_failed_add_writes_nothing_and_leaves_no_table(
    host: Host, topo: Topology, agent: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    vm, other = topo.vm(), topo.vm()
    add(agent, "other", other)
    registry: Path = agent.registry  # type: ignore[attr-defined]
    before = registry_dump(registry)
    token = mint("id-new", SECRET)

    def attempt(*args: str) -> subprocess.CompletedProcess[str]:
        proc = agent("vm", "add", "new", "--token-file", "-", *args, stdin=token)
        assert proc.returncode == 1
        assert len(proc.stderr.splitlines()) == 1 and "Traceback" not in proc.stderr
        assert token not in proc.stdout + proc.stderr
        assert registry_dump(registry) == before
        assert tables(vm.vmns) == []
        return proc

    missing = attempt("--address", vm.addr4, "--netns", PREFIX + "no-such-ns")
    assert "no-such-ns" in missing.stderr and "no such network namespace" in missing.stderr
    absent = attempt("--address", "10.201.0.2", "--netns", vm.vmns)
    assert "10.201.0.2" in absent.stderr and "not configured" in absent.stderr
    taken = attempt("--address", other.addr4, "--netns", vm.vmns)
    assert "held by VM other" in taken.stderr
    assert tables(other.vmns) == [("inet", "metadata_proxy")] and other.fetch() == other.addr4


def test_replace_moves_the_mapping_to_the_new_address(
    host: Host, topo: Topology, agent: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    vm = topo.vm()
    add(agent, "vm", vm)
    assert vm.fetch() == vm.addr4
    new4 = f"10.200.{vm.n}.3"
    sh("ip", "-n", vm.vmns, "addr", "add", f"{new4}/24", "dev", "eth0")
    token = mint("id-vm", SECRET, lifetime=3600)
    proc = agent(
        "vm", "add", "vm", "--address", new4, "--token-file", "-", "--netns", vm.vmns, "--replace", stdin=token
    )
    assert proc.returncode == 0 and "replaced" in proc.stdout, proc.stderr
    assert vm.fetch() == new4
    # It had no IPv6 address any more: its guest's IPv6 traffic is no longer NATed to the old one.
    rules = json.loads(sh("ip", "netns", "exec", vm.vmns, "nft", "-j", "list", "ruleset").stdout)["nftables"]
    assert [item["rule"]["expr"][2]["snat"]["addr"] for item in rules if "rule" in item] == [new4]


def test_sync_plumbs_changed_vms_and_reports_failures(
    host: Host, topo: Topology, agent: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    one, two = topo.vm(), topo.vm()
    missing_ns = PREFIX + "never-created"

    def line(name: str, vm: VMNet, netns: str) -> str:
        address = [vm.addr4, vm.addr6]
        return json.dumps({"name": name, "address": address, "token": mint(f"id-{name}", SECRET), "netns": netns})

    lines = [line("one", one, one.vmns), line("two", two, two.vmns)]
    lines.append(
        json.dumps({"name": "ghost", "address": "10.202.0.2", "token": mint("id-ghost", SECRET), "netns": missing_ns})
    )
    proc = agent("vm", "sync", "-", stdin="\n".join(lines) + "\n")
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [
        f"hostagent: VM ghost: plumbing failed: netns {missing_ns}: no such network namespace"
    ]
    assert "3 added" in proc.stdout
    assert [vm["name"] for vm in json.loads(agent("vm", "list", "--json").stdout)] == ["ghost", "one", "two"]
    assert one.fetch() == one.addr4 and two.fetch(META6) == two.addr6

    proc = agent("vm", "sync", "-", stdin=lines[0] + "\n")
    assert proc.returncode == 0, proc.stderr
    assert "2 removed" in proc.stdout and "1 unchanged" in proc.stdout
    assert tables(two.vmns) == [] and tables(one.vmns) == [("inet", "metadata_proxy")]


def test_replace_into_another_namespace_leaves_no_table_behind(
    host: Host, topo: Topology, agent: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    old, new = topo.vm(), topo.vm()
    add(agent, "vm", old)
    token = mint("id-vm", SECRET)
    proc = agent(
        "vm", "add", "vm", "--address", new.addr4, "--token-file", "-", "--netns", new.vmns, "--replace", stdin=token
    )
    assert proc.returncode == 0, proc.stderr
    assert tables(old.vmns) == [] and tables(new.vmns) == [("inet", "metadata_proxy")]
    assert new.fetch() == new.addr4


def test_replace_keeps_what_it_does_not_name_and_no_netns_leaves_the_namespace(
    host: Host, topo: Topology, agent: Callable[..., subprocess.CompletedProcess[str]]
) -> None:
    vm = topo.vm()
    first = add(agent, "vm", vm)
    rotated = mint("id-vm-2", SECRET, lifetime=3600)
    proc = agent("vm", "add", "vm", "--token-file", "-", "--replace", stdin=rotated)
    assert proc.returncode == 0, proc.stderr
    assert (
        proc.stdout == f"vm: replaced: vm_id id-vm -> id-vm-2, token {fingerprint(first)} -> {fingerprint(rotated)}\n"
    )
    shown = json.loads(agent("vm", "show", "vm", "--json").stdout)
    # Neither the addresses nor the namespace were named: both stay, and so does the table.
    assert (shown["addresses"], shown["netns"]) == ([vm.addr4, vm.addr6], vm.vmns)
    assert tables(vm.vmns) == [("inet", "metadata_proxy")] and vm.fetch() == vm.addr4

    proc = agent("vm", "add", "vm", "--no-netns", "--replace")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"vm: replaced: netns {vm.vmns} -> -\n"
    assert json.loads(agent("vm", "show", "vm", "--json").stdout)["netns"] is None
    assert tables(vm.vmns) == []  # the VM left the namespace: its table went with it
