"""What a VM description must look like before it reaches the registry (README "A VM's life"):
names, namespaces, addresses and tokens, for `vm add` (`make_entry`, `make_change`) and
for a whole `vm sync` input (`parse_sync`). Messages never show a token."""

from __future__ import annotations

import ipaddress
import json
import re
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from controlplane.tokens import InvalidToken, peek_claims
from hostagent.errors import InvalidEntry
from metadata_proxy.registry_file import VM, canonical_address

# Names end up in log lines, nft comments and argv: keep them to a plain, unambiguous alphabet.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
_NETNS = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}")  # a file name under /run/netns, never an option
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


@dataclass(frozen=True, slots=True)
class Entry:
    """A validated, desired registry row. `addresses` are canonical, IPv4 first."""

    name: str
    vm_id: str
    token: str
    token_exp: int | None
    addresses: tuple[str, ...]
    netns: str | None = None

    def over(self, old: VM | None) -> Entry:
        """The row this description makes of `old`: all of it."""
        return self

    def as_vm(self) -> VM:
        return VM(self.name, self.vm_id, self.token, self.token_exp, self.netns, self.addresses)


@dataclass(frozen=True, slots=True)
class _Token:
    token: str
    vm_id: str
    exp: int | None


class _Keep:
    """`Change.netns` when the command said nothing about it."""


KEEP = _Keep()


@dataclass(frozen=True, slots=True)
class Change:
    """What a `vm add --replace` names, validated; what it leaves out (None, KEEP) stays."""

    name: str
    addresses: tuple[str, ...] | None
    token: _Token | None
    netns: str | None | _Keep

    def over(self, old: VM | None) -> Entry:
        """The row that results from applying this change to `old` (None: not registered)."""
        if old is None and (self.addresses is None or self.token is None):
            raise InvalidEntry(f"VM {self.name} is not registered: --address and --token-file are needed to add it")
        token = self.token
        if token is None and old is not None:  # kept as registered, not checked again
            token = _Token(old.token, old.vm_id, old.token_exp)
        addresses = self.addresses
        if addresses is None and old is not None:
            addresses = old.addresses
        assert token is not None and addresses is not None
        netns = self.netns
        if isinstance(netns, _Keep):
            netns = old.netns if old is not None else None
        return Entry(self.name, token.vm_id, token.token, token.exp, _ordered(addresses), netns)


def make_entry(
    name: str,
    addresses: Sequence[str],
    token: str,
    netns: str | None = None,
    *,
    now: float | None = None,
    reserved: Collection[str] = (),
) -> Entry:
    """Validate one complete VM description; InvalidEntry says what is wrong (never showing
    the token). `reserved`: the metadata addresses, which no VM may have."""
    name = _name(name)
    netns = _netns(name, netns)
    canonical = _addresses(name, addresses, reserved)
    parsed = _token(name, token, now)
    return Entry(name, parsed.vm_id, parsed.token, parsed.exp, canonical, netns)


def make_change(
    name: str,
    addresses: Sequence[str] | None,
    token: str | None,
    netns: str | None | _Keep,
    *,
    reserved: Collection[str] = (),
) -> Change:
    """Validate what a `vm add --replace` names (None or KEEP: left as registered)."""
    name = _name(name)
    return Change(
        name,
        _addresses(name, addresses, reserved) if addresses is not None else None,
        _token(name, token, None) if token is not None else None,
        netns if isinstance(netns, _Keep) else _netns(name, netns),
    )


def _name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidEntry(f"VM name {name!r} is not valid (letters, digits and ._:@-, at most 128)")
    return name


def _netns(name: str, netns: str | None) -> str | None:
    if netns is not None and (not isinstance(netns, str) or not _NETNS.fullmatch(netns)):
        raise InvalidEntry(f"VM {name}: netns {netns!r} is not a valid namespace name")
    return netns


def _token(name: str, token: str, now: float | None) -> _Token:
    if not isinstance(token, str) or not token.strip():
        raise InvalidEntry(f"VM {name}: the token is empty")
    token = token.strip()
    try:
        claims = peek_claims(token)
    except InvalidToken as exc:
        raise InvalidEntry(f"VM {name}: {exc}") from None
    exp = claims.get("exp")
    if exp is not None and (not isinstance(exp, int) or isinstance(exp, bool)):
        raise InvalidEntry(f"VM {name}: token exp is not an integer")
    if exp is not None and exp <= (time.time() if now is None else now):
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(exp))
        raise InvalidEntry(f"VM {name}: token expired at {when}")
    return _Token(token, str(claims["sub"]), exp)


def _addresses(name: str, addresses: Sequence[str], reserved: Collection[str] = ()) -> tuple[str, ...]:
    """The canonical addresses, IPv4 first; at most one of each family, none that cannot be
    a guest's source address as the proxy sees it."""
    if not addresses:
        raise InvalidEntry(f"VM {name}: no address given")
    by_version: dict[int, str] = {}
    for text in addresses:
        try:
            address = canonical_address(text) if isinstance(text, str) else ""
            parsed = ipaddress.ip_address(address)
        except ValueError:
            raise InvalidEntry(f"VM {name}: address {text!r} is not an IP address") from None
        if address in reserved:
            raise InvalidEntry(f"VM {name}: address {address} is a metadata address, where guests find the proxy")
        for kind, refused in (
            ("unspecified", parsed.is_unspecified),
            ("multicast", parsed.is_multicast),
            ("broadcast", parsed == _BROADCAST),
        ):
            if refused:
                raise InvalidEntry(f"VM {name}: address {address} is {kind}: it cannot be a VM's source address")
        if parsed.version in by_version:
            if by_version[parsed.version] == address:
                raise InvalidEntry(f"VM {name}: address {address} is given twice")
            raise InvalidEntry(
                f"VM {name}: at most one IPv{parsed.version} address ({by_version[parsed.version]}, {address})"
            )
        by_version[parsed.version] = address
    return _ordered(by_version.values())


def _ordered(addresses: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(addresses, key=lambda address: ":" in address))  # IPv4 first


def differences(vm: VM, entry: Entry) -> list[str]:
    """The fields `entry` would change about the registered `vm`, in the order `vm show` prints them."""
    changed = []
    if vm.vm_id != entry.vm_id:
        changed.append("vm_id")
    if sorted(vm.addresses) != sorted(entry.addresses):
        changed.append("address")
    if vm.netns != entry.netns:
        changed.append("netns")
    if vm.token != entry.token:
        changed.append("token")
    return changed


# -- sync input -----------------------------------------------------------------------------

_SYNC_KEYS = frozenset({"name", "address", "token", "netns"})


def parse_sync(lines: Iterable[str], *, now: float | None = None, reserved: Collection[str] = ()) -> list[Entry]:
    """Validate a whole ``vm sync`` input (JSON lines); InvalidEntry names the first bad line.

    Blank lines are skipped. Names, addresses and tokens must be unique across the whole set.
    """
    entries: list[Entry] = []
    name_line: dict[str, int] = {}
    address_line: dict[str, tuple[int, str]] = {}
    token_line: dict[str, int] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = _sync_entry(line, now, reserved)
        except InvalidEntry as exc:
            raise InvalidEntry(f"line {number}: {exc}") from None
        if entry.name in name_line:
            raise InvalidEntry(f"line {number}: VM {entry.name} is already on line {name_line[entry.name]}")
        for address in entry.addresses:
            if address in address_line:
                other, holder = address_line[address]
                raise InvalidEntry(f"line {number}: address {address} is already on line {other} (VM {holder})")
            address_line[address] = (number, entry.name)
        if entry.token in token_line:
            raise InvalidEntry(
                f"line {number}: VM {entry.name}: its token is already on line {token_line[entry.token]}"
            )
        token_line[entry.token] = number
        name_line[entry.name] = number
        entries.append(entry)
    return entries


def _sync_entry(line: str, now: float | None, reserved: Collection[str]) -> Entry:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidEntry(f"not JSON ({exc.msg})") from None
    if not isinstance(item, dict):
        raise InvalidEntry("not a JSON object")
    unknown = sorted(set(item) - _SYNC_KEYS)
    if unknown:
        raise InvalidEntry(f"unknown key {unknown[0]!r}")
    for key in ("name", "address", "token"):
        if key not in item:
            raise InvalidEntry(f"no {key!r}")
    address = item["address"]
    addresses = [address] if isinstance(address, str) else address
    if (
        not isinstance(addresses, list)
        or not 1 <= len(addresses) <= 2
        or not all(isinstance(a, str) for a in addresses)
    ):
        raise InvalidEntry("'address' must be an address or a list of one or two")
    return make_entry(item["name"], addresses, item["token"], item.get("netns"), now=now, reserved=reserved)
