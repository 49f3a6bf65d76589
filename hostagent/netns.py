"""Host and per-VM network plumbing (README "The host side"), driven through `ip`, `nft` and `conntrack`.

Everything is read in machine formats (``ip -j``, ``nft -j``) and every nftables change is
one ``nft -f -`` transaction, so a table is either fully installed or not touched at all.

Inside each VM namespace we own exactly one table, ``inet metadata_proxy``: a NAT chain that
source-NATs every TCP connection towards a metadata address (the hosts of the config's
``listen`` entries) to the VM's host-unique address of the same family. It matches on the
destination only, never on the source, so whatever source a guest forges (another VM's
address included) leaves the namespace as this VM's address. A forged source equal to the
VM's own address gets nowhere: the namespace holds that address, so IPv4 drops the packet as
a martian and IPv6 answers land in the namespace itself. In the root namespace we own
``inet metadata_proxy_host``, which accepts TCP to the metadata addresses.

    NetnsError            a command failed, timed out or is missing; the message is one line
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

VM_TABLE = "metadata_proxy"
HOST_TABLE = "metadata_proxy_host"
METADATA_LINK = "metadata0"
TIMEOUT = 10.0  # seconds for one command; ip/nft/conntrack answer in milliseconds when healthy


class NetnsError(Exception):
    """A plumbing step failed; the message names the namespace or object and the reason."""


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One metadata address the proxy listens on, with its TCP port."""

    address: str
    port: int = 80

    @property
    def version(self) -> int:
        return ipaddress.ip_address(self.address).version


def endpoints_from(pairs: Iterable[tuple[str, int]]) -> tuple[Endpoint, ...]:
    """Endpoints for (host, port) listen pairs, minus those no guest can reach through NAT.

    Loopback and unspecified hosts (a test or demo config listening on 127.0.0.1) are
    already local and cannot be a NAT destination, so they get neither an address nor a rule.
    """
    found: dict[tuple[str, int], Endpoint] = {}
    for host, port in pairs:
        addr = ipaddress.ip_address(host)
        if addr.is_loopback or addr.is_unspecified:
            continue
        found.setdefault((str(addr), port), Endpoint(str(addr), port))
    return tuple(found.values())


# -- running commands -----------------------------------------------------------------------


def _run(
    argv: Sequence[str], *, stdin: str | None = None, timeout: float = TIMEOUT
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(list(argv), input=stdin, capture_output=True, text=True, timeout=timeout, check=False)
    except FileNotFoundError:
        raise NetnsError(f"{argv[0]}: command not found") from None
    except subprocess.TimeoutExpired:
        raise NetnsError(f"{' '.join(argv[:4])}: no answer within {timeout:g} s") from None


def _reason(proc: subprocess.CompletedProcess[str]) -> str:
    """The first meaningful line of a failed command's stderr."""
    for line in (proc.stderr or proc.stdout or "").splitlines():
        line = line.strip()
        if line and not line.startswith("^"):  # nft underlines the offending token on a line of its own
            return line.removeprefix("Error: ")
    return f"exit status {proc.returncode}"


def _json(proc: subprocess.CompletedProcess[str], what: str) -> object:
    try:
        return json.loads(proc.stdout) if proc.stdout.strip() else []
    except json.JSONDecodeError:
        raise NetnsError(f"{what}: unreadable JSON output") from None


def _in_netns(netns: str | None, argv: Sequence[str]) -> list[str]:
    return list(argv) if netns is None else ["ip", "netns", "exec", netns, *argv]


def _nft(netns: str | None, script: str) -> None:
    proc = _run(_in_netns(netns, ["nft", "-f", "-"]), stdin=script)
    if proc.returncode != 0:
        where = f"netns {netns}" if netns else "root namespace"
        raise NetnsError(f"{where}: nft: {_reason(proc)}")


# -- namespaces and addresses ---------------------------------------------------------------


def namespaces() -> frozenset[str]:
    """The names of every named network namespace (``ip netns``)."""
    proc = _run(["ip", "-j", "netns", "list"])
    if proc.returncode != 0:
        raise NetnsError(f"ip netns list: {_reason(proc)}")
    listing = _json(proc, "ip netns list")
    items = listing if isinstance(listing, list) else []
    return frozenset(str(ns["name"]) for ns in items if isinstance(ns, dict) and "name" in ns)


def netns_exists(netns: str) -> bool:
    """Whether a named network namespace exists."""
    return netns in namespaces()


def link_addresses(netns: str | None, link: str | None = None) -> list[tuple[str, int]]:
    """(address, prefix length) of every usable address in a namespace (or on one link).

    Addresses whose duplicate-address detection failed are left out: they carry no traffic.
    """
    argv = ["ip", "-j", "addr", "show"] + (["dev", link] if link else [])
    if netns is not None:
        argv[1:1] = ["-n", netns]
    proc = _run(argv)
    if proc.returncode != 0:
        where = f"netns {netns}" if netns else (link or "root namespace")
        raise NetnsError(f"{where}: {_reason(proc)}")
    found: list[tuple[str, int]] = []
    links = _json(proc, "ip addr")
    for entry in links if isinstance(links, list) else []:
        for info in entry.get("addr_info", []) if isinstance(entry, dict) else []:
            if not isinstance(info, dict) or "local" not in info or info.get("dadfailed"):
                continue
            found.append((str(ipaddress.ip_address(info["local"])), int(info.get("prefixlen", 0))))
    return found


def check_vm_netns(netns: str, addresses: Iterable[str]) -> None:
    """Raise NetnsError unless `netns` exists and holds every one of `addresses`."""
    if not netns_exists(netns):
        raise NetnsError(f"netns {netns}: no such network namespace")
    held = {address for address, _ in link_addresses(netns)}
    missing = [address for address in addresses if address not in held]
    if missing:
        raise NetnsError(f"netns {netns}: address {missing[0]} is not configured in the namespace")


# -- the per-VM table -----------------------------------------------------------------------


def _family(address: str) -> str:
    return "ip" if ipaddress.ip_address(address).version == 4 else "ip6"


def vm_ruleset(addresses: Sequence[str], endpoints: Sequence[Endpoint]) -> str:
    """The nft script that (re)creates a VM's table: one SNAT rule per metadata endpoint of a family it has.

    ``add table`` then ``delete table`` makes the script replace whatever was there, in the
    same transaction as the new table, so re-running it is idempotent. The chain runs just
    before the usual srcnat priority: the first NAT binding of a connection wins, so ours
    beats a hypervisor masquerade rule in the same namespace.
    """
    rules = []
    for address in addresses:
        family = _family(address)
        for endpoint in endpoints:
            if _family(endpoint.address) == family:
                rules.append(
                    f"\t\t{family} daddr {endpoint.address} tcp dport {endpoint.port} snat {family} to {address}\n"
                )
    return (
        f"add table inet {VM_TABLE}\n"
        f"delete table inet {VM_TABLE}\n"
        f"table inet {VM_TABLE} {{\n"
        "\tchain postrouting {\n"
        "\t\ttype nat hook postrouting priority srcnat - 10; policy accept;\n"
        f"{''.join(rules)}"
        "\t}\n"
        "}\n"
    )


def flush_conntrack(netns: str, endpoints: Sequence[Endpoint]) -> None:
    """Forget the namespace's tracked connections towards the metadata endpoints.

    NAT is decided on a connection's first packet only: a flow tracked before the table
    changed would keep its old source (or none) for as long as it lives.
    """
    for endpoint in endpoints:
        family = "ipv4" if endpoint.version == 4 else "ipv6"
        argv = ["conntrack", "-D", "-f", family, "-d", endpoint.address, "-p", "tcp", "--dport", str(endpoint.port)]
        proc = _run(_in_netns(netns, argv))
        # conntrack exits 1 when nothing matched; that is the common, successful case.
        if proc.returncode != 0 and not (proc.returncode == 1 and "0 flow entries" in proc.stderr):
            raise NetnsError(f"netns {netns}: conntrack: {_reason(proc)}")


def desired_snat(addresses: Sequence[str], endpoints: Sequence[Endpoint]) -> frozenset[tuple[str, int, str]]:
    """(metadata address, port, VM address) for each SNAT rule `vm_ruleset` writes."""
    return frozenset(
        (endpoint.address, endpoint.port, address)
        for address in addresses
        for endpoint in endpoints
        if endpoint.version == ipaddress.ip_address(address).version
    )


def installed_snat(netns: str) -> frozenset[tuple[str, int, str]] | None:
    """The SNAT rules of our table in `netns` as `desired_snat` spells them; None without the table.

    A rule of any other shape is reported as an entry that never matches a desired one.
    """
    # One listing of the whole ruleset: "list table" would fail on a missing table with only
    # human text to tell that apart from a real failure.
    proc = _run(_in_netns(netns, ["nft", "-j", "list", "ruleset"]))
    if proc.returncode != 0:
        raise NetnsError(f"netns {netns}: nft: {_reason(proc)}")
    data = _json(proc, "nft list ruleset")
    present = False
    found: set[tuple[str, int, str]] = set()
    for item in data.get("nftables", []) if isinstance(data, dict) else []:
        if not isinstance(item, dict):
            continue
        table = item.get("table")
        if isinstance(table, dict) and (table.get("family"), table.get("name")) == ("inet", VM_TABLE):
            present = True
        rule = item.get("rule")
        if isinstance(rule, dict) and (rule.get("family"), rule.get("table")) == ("inet", VM_TABLE):
            found.add(_snat_of(rule.get("expr")))
    return frozenset(found) if present else None


def _snat_of(expr: object) -> tuple[str, int, str]:
    unknown = ("?", 0, "?")
    if not isinstance(expr, list) or len(expr) != 3:
        return unknown
    try:
        daddr, dport, snat = expr[0]["match"], expr[1]["match"], expr[2]["snat"]
        if daddr["left"]["payload"]["field"] != "daddr" or dport["left"]["payload"] != {
            "protocol": "tcp",
            "field": "dport",
        }:
            return unknown
        return (str(ipaddress.ip_address(daddr["right"])), int(dport["right"]), str(ipaddress.ip_address(snat["addr"])))
    except (KeyError, TypeError, ValueError):
        return unknown


@dataclass(frozen=True, slots=True)
class Plumber:
    """The per-VM plumbing `hostagent.store` runs inside its registry transactions."""

    endpoints: tuple[Endpoint, ...]

    def check(self, netns: str, addresses: Sequence[str]) -> None:
        """NetnsError unless the namespace exists and holds every address."""
        check_vm_netns(netns, addresses)

    def apply(self, netns: str, addresses: Sequence[str]) -> None:
        """Install (or replace) the VM's table in `netns`.

        When the table was missing or said something else, the namespace's tracked flows
        to the metadata endpoints are dropped too: they were NATed the old way (or not at
        all) and would stay so. An unchanged table (a token rotation) keeps them.
        """
        before = installed_snat(netns)
        _nft(netns, vm_ruleset(addresses, self.endpoints))
        if before != desired_snat(addresses, self.endpoints):
            flush_conntrack(netns, self.endpoints)

    def remove(self, netns: str) -> bool:
        """Delete the VM's table and its tracked metadata flows; False if the namespace is gone."""
        if not netns_exists(netns):
            return False
        try:
            _nft(netns, f"add table inet {VM_TABLE}\ndelete table inet {VM_TABLE}\n")
            flush_conntrack(netns, self.endpoints)
        except NetnsError:
            # The namespace may have been deleted under us; that is the outcome we wanted.
            if not netns_exists(netns):
                return False
            raise
        return True

    def namespaces(self) -> frozenset[str]:
        return namespaces()


# -- the host side --------------------------------------------------------------------------


def _metadata_link() -> str:
    """The link that carries the metadata addresses: our dummy link if the kernel has one, else lo."""
    proc = _run(["ip", "-j", "link", "show", "dev", METADATA_LINK])
    if proc.returncode != 0:
        created = _run(["ip", "link", "add", METADATA_LINK, "type", "dummy"])
        if created.returncode != 0:
            return "lo"  # no dummy module (development and CI kernels): lo, with host prefixes only
    up = _run(["ip", "link", "set", "dev", METADATA_LINK, "up"])
    if up.returncode != 0:
        raise NetnsError(f"{METADATA_LINK}: {_reason(up)}")
    return METADATA_LINK


def host_ruleset(endpoints: Sequence[Endpoint]) -> str:
    """The nft script for the root namespace's table: accept TCP to each metadata endpoint.

    Its input chain runs just before the usual filter priority with policy accept, so it
    never drops anything itself.
    """
    rules = "".join(f"\t\t{_family(e.address)} daddr {e.address} tcp dport {e.port} accept\n" for e in endpoints)
    return (
        f"add table inet {HOST_TABLE}\n"
        f"delete table inet {HOST_TABLE}\n"
        f"table inet {HOST_TABLE} {{\n"
        "\tchain input {\n"
        "\t\ttype filter hook input priority filter - 1; policy accept;\n"
        f"{rules}"
        "\t}\n"
        "}\n"
    )


def host_setup(endpoints: Sequence[Endpoint]) -> list[str]:
    """Put each metadata address on a local link as a host route and install the host table.

    Idempotent. Returns one human line per change made (empty when nothing was needed).
    """
    changes: list[str] = []
    link = _metadata_link()
    present = link_addresses(None, link)
    for address in dict.fromkeys(e.address for e in endpoints):
        full = 32 if ipaddress.ip_address(address).version == 4 else 128
        if (address, full) in present:
            continue
        for held, prefix in present:
            if held == address:
                # A wider prefix on lo would swallow the whole range: replace it with the host prefix.
                _ip_addr("del", f"{address}/{prefix}", link)
                changes.append(f"removed {address}/{prefix} from {link}")
        extra = ["nodad"] if full == 128 else []  # lo has no neighbours to collide with; skip the DAD wait
        _ip_addr("add", f"{address}/{full}", link, *extra)
        changes.append(f"added {address}/{full} to {link}")
    _nft(None, host_ruleset(endpoints))
    return changes


def _ip_addr(verb: str, prefix: str, link: str, *extra: str) -> None:
    proc = _run(["ip", "addr", verb, prefix, "dev", link, *extra])
    if proc.returncode != 0:
        raise NetnsError(f"{link}: ip addr {verb} {prefix}: {_reason(proc)}")
