"""Registry writes: every invariant of SPEC section 4, one SQLite transaction per command.

The schema and the read helpers live in `metadata_proxy.registry` (shared with the proxy);
this module owns the writes. Each write runs under ``BEGIN IMMEDIATE``, re-reads what it
needs of the registry inside that transaction, checks the invariants against it, and only
then writes, stamping what it wrote with the transaction's sequence number (meta.seq + 1)
and leaving a tombstone for each VM it removed, so the proxy reads only what changed.
A version-1 registry is upgraded inside the same transaction.
Plumbing that must agree with a row (SPEC section 5) runs inside the still-open transaction:
if it fails the transaction rolls back, and if the commit fails the plumbing is undone.

    StoreError            base; the message is one line naming the thing and the reason
    ├── InvalidEntry      a VM description that breaks a rule (name, address, token, sync line)
    ├── Conflict          refused by an invariant (address held by another VM, --replace needed)
    ├── RegistryDamaged   the file exists but is not a registry of ours; it is never replaced
    └── PlumbingFailed    the namespace side failed; the registry was left as it was
"""

from __future__ import annotations

import contextlib
import grp
import ipaddress
import json
import os
import pwd
import re
import sqlite3
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from controlplane.tokens import InvalidToken, peek_claims
from metadata_proxy.registry import (
    SCHEMA_VERSION,
    TABLES,
    VM,
    RegistryUnavailable,
    canonical_address,
    connect_readonly,
    connect_readwrite,
    read_vms,
    upgrade,
)

PROXY_USER = "metadata-proxy"
SQLITE_MAGIC = b"SQLite format 3\x00"
# Tombstones of the last this many write transactions are kept. A running proxy checks the
# file every 0.25 s; one that falls further behind (stopped, or starting) reads it whole.
TOMBSTONE_WINDOW = 10_000
PLUMBING_WORKERS = 8  # ip/nft/conntrack are subprocesses: a few at a time hide their start-up cost

# Names end up in log lines, nft comments and argv: keep them to a plain, unambiguous alphabet.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
_NETNS = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}")  # a file name under /run/netns, never an option


class StoreError(Exception):
    """A registry command failed; nothing was changed."""


class InvalidEntry(StoreError):
    """A VM description breaks a rule."""


class Conflict(StoreError):
    """An invariant refuses the change."""


class RegistryDamaged(StoreError):
    """The registry file exists but is not a readable registry of ours."""


class PlumbingFailed(StoreError):
    """The namespace side of a change failed."""


# -- who may read the file ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Access:
    """Owner and modes of the registry: root, plus read access for the proxy's group if it has one."""

    gid: int | None

    @property
    def file_mode(self) -> int:
        return 0o640 if self.gid is not None else 0o600

    @property
    def dir_mode(self) -> int:
        return 0o750 if self.gid is not None else 0o700

    @property
    def umask(self) -> int:
        return 0o027 if self.gid is not None else 0o077


def proxy_access(user: str = PROXY_USER) -> Access:
    """Access for the proxy's user: its primary group, or a group of that name; else root only."""
    try:
        return Access(pwd.getpwnam(user).pw_gid)
    except KeyError:
        pass
    try:
        return Access(grp.getgrnam(user).gr_gid)
    except KeyError:
        return Access(None)


# -- what a VM should look like -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """A validated, desired registry row. `addresses` are canonical, IPv4 first."""

    name: str
    vm_id: str
    token: str
    token_exp: int | None
    addresses: tuple[str, ...]
    netns: str | None = None


def make_entry(
    name: str, addresses: Sequence[str], token: str, netns: str | None = None, *, now: float | None = None
) -> Entry:
    """Validate one VM description; InvalidEntry says what is wrong (never showing the token)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidEntry(f"VM name {name!r} is not valid (letters, digits and ._:@-, at most 128)")
    if netns is not None and (not isinstance(netns, str) or not _NETNS.fullmatch(netns)):
        raise InvalidEntry(f"VM {name}: netns {netns!r} is not a valid namespace name")
    canonical = _addresses(name, addresses)
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
    return Entry(name, str(claims["sub"]), token, exp, canonical, netns)


def _addresses(name: str, addresses: Sequence[str]) -> tuple[str, ...]:
    if not addresses:
        raise InvalidEntry(f"VM {name}: no address given")
    by_version: dict[int, str] = {}
    for text in addresses:
        try:
            address = canonical_address(text) if isinstance(text, str) else ""
            parsed = ipaddress.ip_address(address)
        except ValueError:
            raise InvalidEntry(f"VM {name}: address {text!r} is not an IP address") from None
        if parsed.is_unspecified or parsed.is_multicast:
            raise InvalidEntry(f"VM {name}: address {address} cannot be a VM's source address")
        if parsed.version in by_version:
            if by_version[parsed.version] == address:
                raise InvalidEntry(f"VM {name}: address {address} is given twice")
            raise InvalidEntry(
                f"VM {name}: at most one IPv{parsed.version} address ({by_version[parsed.version]}, {address})"
            )
        by_version[parsed.version] = address
    return tuple(by_version[v] for v in sorted(by_version))


def _differences(vm: VM, entry: Entry) -> list[str]:
    """What `entry` would change about the registered `vm`."""
    changed = []
    if vm.token != entry.token:
        changed.append("token")
    if sorted(vm.addresses) != sorted(entry.addresses):
        changed.append("address")
    if vm.netns != entry.netns:
        changed.append("netns")
    return changed


# -- sync input -----------------------------------------------------------------------------

_SYNC_KEYS = frozenset({"name", "address", "token", "netns"})


def parse_sync(lines: Iterable[str], *, now: float | None = None) -> list[Entry]:
    """Validate a whole ``vm sync`` input (JSON lines); InvalidEntry names the first bad line.

    Blank lines are skipped. Names and addresses must be unique across the whole set.
    """
    entries: list[Entry] = []
    name_line: dict[str, int] = {}
    address_line: dict[str, tuple[int, str]] = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            entry = _sync_entry(line, now)
        except InvalidEntry as exc:
            raise InvalidEntry(f"line {number}: {exc}") from None
        if entry.name in name_line:
            raise InvalidEntry(f"line {number}: VM {entry.name} is already on line {name_line[entry.name]}")
        for address in entry.addresses:
            if address in address_line:
                other, holder = address_line[address]
                raise InvalidEntry(f"line {number}: address {address} is already on line {other} (VM {holder})")
            address_line[address] = (number, entry.name)
        name_line[entry.name] = number
        entries.append(entry)
    return entries


def _sync_entry(line: str, now: float | None) -> Entry:
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
    return make_entry(item["name"], addresses, item["token"], item.get("netns"), now=now)


# -- plumbing hooks -------------------------------------------------------------------------


class Plumbing(Protocol):
    """The namespace side (hostagent.netns.Plumber); errors are raised as exceptions with one-line messages."""

    def check(self, netns: str, addresses: Sequence[str]) -> None: ...

    def apply(self, netns: str, addresses: Sequence[str]) -> None: ...

    def remove(self, netns: str) -> bool: ...

    def namespaces(self) -> frozenset[str]: ...


def _replumb(
    plumber: Plumbing, old: VM | None, new: Entry | None, *, atomic: bool = True, check: bool = False
) -> Callable[[], None]:
    """Move the namespaces from `old` to `new`: install the new table, remove one left behind.

    Returns the undo. `atomic` (inside a transaction): on the first failure undo what was
    done and raise. Otherwise (after a commit) try every step and raise once with all reasons.
    `check` first verifies that the new namespace exists and holds the addresses.
    """
    undo: list[Callable[[], None]] = []
    errors: list[str] = []

    def failed(exc: Exception) -> None:
        if atomic:
            raise PlumbingFailed(f"{exc}{_run_undo(undo)}") from None
        errors.append(str(exc))

    if new is not None and new.netns is not None:
        netns, addresses = new.netns, new.addresses
        try:
            if check:
                plumber.check(netns, addresses)
            plumber.apply(netns, addresses)
        except Exception as exc:
            failed(exc)
        else:
            if old is not None and old.netns == netns:
                previous = old.addresses
                undo.append(lambda: plumber.apply(netns, previous))
            else:
                undo.append(lambda: _ignore(plumber.remove(netns)))
    if old is not None and old.netns is not None and (new is None or new.netns != old.netns):
        # The VM left this namespace: a table left there would keep NATing to its old address.
        old_netns, old_addresses = old.netns, old.addresses
        try:
            removed = plumber.remove(old_netns)
        except Exception as exc:
            failed(exc)
        else:
            if removed:
                undo.append(lambda: plumber.apply(old_netns, old_addresses))
    if errors:
        raise PlumbingFailed("; ".join(errors))
    return lambda: _ignore(_run_undo(undo))


def _run_undo(steps: list[Callable[[], None]]) -> str:
    """Undo in reverse order, best effort; returns a note for the error message if a step failed."""
    failures = []
    for step in reversed(steps):
        try:
            step()
        except Exception as exc:
            failures.append(str(exc))
    return f" (and undoing failed: {failures[0]})" if failures else ""


def _ignore(_: object) -> None:
    return None


# -- the store ------------------------------------------------------------------------------


@dataclass
class SyncResult:
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (VM name, reason) of failed plumbing


@dataclass(frozen=True, slots=True)
class ApplyReport:
    applied: list[str]
    missing: list[tuple[str, str]]  # (VM name, netns) whose namespace does not exist
    failed: list[tuple[str, str]]  # (VM name, reason)


class Store:
    """The registry at `path`, as `hostagent` writes it."""

    def __init__(self, path: str, access: Access | None = None, *, tombstone_window: int = TOMBSTONE_WINDOW) -> None:
        self.path = path
        self.access = access if access is not None else proxy_access()
        self.tombstone_window = tombstone_window

    # -- reading ------------------------------------------------------------------------

    def vms(self, names: Sequence[str] | None = None) -> list[VM]:
        """Every registered VM (or those of `names`) in name order; a missing registry has none."""
        if not os.path.lexists(self.path):
            return []
        self._check_file()
        try:
            conn = connect_readonly(self.path)
            try:
                return read_vms(conn, names)
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise RegistryDamaged(f"registry {self.path}: {exc}") from None

    def get(self, name: str) -> VM | None:
        return next(iter(self.vms([name])), None)

    # -- writing ------------------------------------------------------------------------

    def add(self, entry: Entry, *, replace: bool = False, plumber: Plumbing | None = None) -> str:
        """Register `entry`: "added", "replaced" or "unchanged". Conflict, PlumbingFailed, StoreError."""
        with self._transaction() as conn:
            old = self._current(conn, [entry.name]).get(entry.name)
            if old is not None and not _differences(old, entry):
                return "unchanged"
            marks = ", ".join("?" * len(entry.addresses))
            holders = dict(
                conn.execute(f"SELECT address, name FROM addresses WHERE address IN ({marks})", entry.addresses)
            )
            for address in entry.addresses:
                holder = holders.get(address)
                if holder is not None and holder != entry.name:
                    raise Conflict(f"address {address} is already held by VM {holder}")
            if old is not None and not replace:
                what = " and ".join(_differences(old, entry))
                raise Conflict(f"VM {entry.name} is registered with a different {what}; use --replace to change it")
            if plumber is not None and entry.netns is not None:
                try:
                    plumber.check(entry.netns, entry.addresses)
                except Exception as exc:
                    raise PlumbingFailed(str(exc)) from None
            now, seq = int(time.time()), self._next_seq(conn)
            if old is not None and sorted(old.addresses) != sorted(entry.addresses):
                conn.execute("DELETE FROM addresses WHERE name = ?", (entry.name,))
            conn.execute(_UPSERT_VM, _vm_row(entry, now, seq))
            if old is None or sorted(old.addresses) != sorted(entry.addresses):
                conn.executemany("INSERT INTO addresses(address, name) VALUES (?, ?)", _address_rows([entry]))
            undo = _replumb(plumber, old, entry) if plumber is not None else _nothing
            self._commit(conn, undo)
        return "added" if old is None else "replaced"

    def remove(self, name: str, *, plumber: Plumbing | None = None) -> str:
        """Unregister `name` and tear down its table: "removed" or "absent"."""
        if not os.path.lexists(self.path):
            return "absent"
        with self._transaction() as conn:
            old = self._current(conn, [name]).get(name)
            if old is None:
                return "absent"
            conn.execute(_TOMBSTONE, (name, self._next_seq(conn)))
            conn.execute("DELETE FROM addresses WHERE name = ?", (name,))
            conn.execute("DELETE FROM vms WHERE name = ?", (name,))
            undo = _replumb(plumber, old, None) if plumber is not None else _nothing
            self._commit(conn, undo)
        return "removed"

    def sync(self, entries: Sequence[Entry], *, plumber: Plumbing | None = None) -> SyncResult:
        """Make the registry exactly `entries` (already validated by parse_sync) in one transaction.

        Only rows that change are written. Plumbing then follows for the VMs whose row
        changed (or went); its failures are listed in the result, the registry stays converged.
        """
        result = SyncResult()
        changes: list[tuple[VM | None, Entry | None]] = []
        with self._transaction() as conn:
            current = self._current(conn)
            desired = {entry.name: entry for entry in entries}
            gone = [vm for name, vm in current.items() if name not in desired]
            readdressed: list[str] = [vm.name for vm in gone]
            upserts: list[Entry] = []
            new_addresses: list[Entry] = []
            for entry in entries:
                old = current.get(entry.name)
                if old is not None and not _differences(old, entry):
                    result.unchanged += 1
                    continue
                upserts.append(entry)
                (result.added if old is None else result.replaced).append(entry.name)
                changes.append((old, entry))
                if old is None or sorted(old.addresses) != sorted(entry.addresses):
                    if old is not None:
                        readdressed.append(entry.name)
                    new_addresses.append(entry)
            result.removed = [vm.name for vm in gone]
            changes.extend((vm, None) for vm in gone)
            if not upserts and not gone:
                return result
            now, seq = int(time.time()), self._next_seq(conn)
            # Free every address that moves before inserting any: in a complete desired set
            # an address may pass from one VM to another within this one transaction.
            conn.executemany("DELETE FROM addresses WHERE name = ?", ((name,) for name in readdressed))
            conn.executemany(_TOMBSTONE, ((vm.name, seq) for vm in gone))
            conn.executemany("DELETE FROM vms WHERE name = ?", ((vm.name,) for vm in gone))
            conn.executemany(_UPSERT_VM, (_vm_row(entry, now, seq) for entry in upserts))
            conn.executemany("INSERT INTO addresses(address, name) VALUES (?, ?)", _address_rows(new_addresses))
            self._commit(conn, _nothing)
        if plumber is not None:
            result.failed = _plumb_all(plumber, [c for c in changes if _touches_netns(*c)])
        return result

    def reapply(self, names: Sequence[str] | None, plumber: Plumbing) -> ApplyReport:
        """Re-install the table of the named VMs (None: every VM with a netns)."""
        vms = self.vms()
        if names is not None:
            by_name = {vm.name: vm for vm in vms}
            for name in names:
                if name not in by_name:
                    raise StoreError(f"VM {name} is not registered")
                if by_name[name].netns is None:
                    raise StoreError(f"VM {name} has no netns: its plumbing is the caller's")
            vms = [by_name[name] for name in names]
        todo = [vm for vm in vms if vm.netns is not None]
        try:
            existing = plumber.namespaces() if todo else frozenset()
        except Exception as exc:
            raise PlumbingFailed(str(exc)) from None
        present = [vm for vm in todo if vm.netns in existing]
        missing = [(vm.name, vm.netns or "") for vm in todo if vm.netns not in existing]
        failed = _plumb_all(plumber, [(vm, _entry_of(vm)) for vm in present], fresh=True)
        bad = {name for name, _ in failed}
        return ApplyReport([vm.name for vm in present if vm.name not in bad], missing, failed)

    # -- the file -----------------------------------------------------------------------

    def _current(self, conn: sqlite3.Connection, names: Sequence[str] | None = None) -> dict[str, VM]:
        """The registry inside the transaction (only `names`, when given), by name."""
        try:
            return {vm.name: vm for vm in read_vms(conn, names)}
        except sqlite3.Error as exc:
            raise RegistryDamaged(f"registry {self.path}: {exc}") from None

    def _next_seq(self, conn: sqlite3.Connection) -> int:
        """This write transaction's sequence number (call once, before writing), and the
        tombstones that fell out of the window dropped, with meta.pruned saying so."""
        conn.execute("UPDATE meta SET seq = seq + 1")
        row = conn.execute("SELECT seq FROM meta").fetchone()
        if row is None:
            raise RegistryDamaged(f"registry {self.path}: not a registry (its meta row is missing)")
        seq: int = row[0]
        horizon = seq - self.tombstone_window
        if conn.execute("DELETE FROM removed WHERE seq <= ?", (horizon,)).rowcount > 0:
            conn.execute("UPDATE meta SET pruned = ? WHERE pruned < ?", (horizon, horizon))
        return seq

    def _check_file(self) -> None:
        """RegistryDamaged unless the file is empty or starts like an SQLite database."""
        try:
            st = os.lstat(self.path)
            if not stat.S_ISREG(st.st_mode):
                raise RegistryDamaged(f"registry {self.path}: not a regular file")
            if st.st_size == 0:
                return
            with open(self.path, "rb") as f:
                header = f.read(len(SQLITE_MAGIC))
        except OSError as exc:
            raise RegistryDamaged(f"registry {self.path}: {exc.strerror}") from None
        if header != SQLITE_MAGIC:
            raise RegistryDamaged(f"registry {self.path}: not an SQLite database")

    def _check_schema(self) -> None:
        """RegistryDamaged if the database is someone else's (another schema, foreign tables)."""
        try:
            conn = connect_readonly(self.path)
            try:
                version = conn.execute("PRAGMA user_version").fetchone()[0]
                tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise RegistryDamaged(f"registry {self.path}: {exc}") from None
        if version != 0 and version not in TABLES:
            raise RegistryDamaged(
                f"registry {self.path}: schema version {version}, this program knows {SCHEMA_VERSION}"
            )
        # Version 0 with only our tables is a creation interrupted before the version was set.
        ours = TABLES[version or SCHEMA_VERSION]
        if version == 0 and tables - ours:
            raise RegistryDamaged(f"registry {self.path}: not a registry (unknown table {sorted(tables - ours)[0]})")
        if version != 0 and not ours <= tables:
            raise RegistryDamaged(f"registry {self.path}: not a registry (table {sorted(ours - tables)[0]} missing)")

    def ensure_directory(self) -> None:
        """Create the registry's directory with its owner and mode if it does not exist yet.

        An existing directory is left as it is: it may be shared (a test's /tmp).
        """
        directory = os.path.dirname(os.path.abspath(self.path))
        if os.path.isdir(directory):
            return
        old = os.umask(self.access.umask)
        try:
            os.makedirs(directory, mode=self.access.dir_mode, exist_ok=True)
            self._own(directory, self.access.dir_mode)
        except OSError as exc:
            raise StoreError(f"registry directory {directory}: {exc.strerror}") from None
        finally:
            os.umask(old)

    def _own(self, path: str, mode: int) -> None:
        st = os.stat(path)
        gid = self.access.gid if self.access.gid is not None else os.getegid()
        if (st.st_uid, st.st_gid) != (os.geteuid(), gid):
            os.chown(path, os.geteuid(), gid)
        if stat.S_IMODE(st.st_mode) != mode:
            os.chmod(path, mode)

    def _create(self) -> None:
        """Create an empty registry, atomically and with its final owner and mode.

        It is built under a temporary name and hard-linked into place, so a reader never
        sees a half-made file, and a concurrent `hostagent` that won the race is kept.
        SQLite gives a -journal the mode and owner of its database, so the journal of
        every later transaction is as closed as the file itself.
        """
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, tmp = tempfile.mkstemp(prefix=".registry-", suffix=".new", dir=directory)
        try:
            os.close(fd)
            self._own(tmp, self.access.file_mode)
            connect_readwrite(tmp).close()
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                pass
        finally:
            for leftover in (tmp, tmp + "-journal"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leftover)

    def _open_for_write(self) -> sqlite3.Connection:
        self.ensure_directory()
        old = os.umask(self.access.umask)  # whatever SQLite creates beside the file stays closed too
        try:
            if not os.path.lexists(self.path):
                self._create()
            self._check_file()
            self._check_schema()
            self._own(self.path, self.access.file_mode)
            return connect_readwrite(self.path)
        except OSError as exc:
            raise StoreError(f"registry {self.path}: {exc.strerror or exc}") from None
        except (sqlite3.Error, RegistryUnavailable) as exc:
            raise RegistryDamaged(f"registry {self.path}: {str(exc).removeprefix(self.path + ': ')}") from None
        finally:
            os.umask(old)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """An open ``BEGIN IMMEDIATE`` transaction on a registry of the current schema.

        The caller reads what it needs and commits with `_commit`; leaving the block any
        other way rolls back, a version-1 upgrade included.
        """
        conn = self._open_for_write()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                upgrade(conn)
            except sqlite3.Error as exc:
                raise RegistryDamaged(f"registry {self.path}: {exc}") from None
            yield conn
        except sqlite3.Error as exc:
            raise StoreError(f"registry {self.path}: {exc}") from None
        finally:
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            conn.close()

    def _commit(self, conn: sqlite3.Connection, undo: Callable[[], None]) -> None:
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            undo()
            raise StoreError(f"registry {self.path}: commit failed: {exc}") from None


_UPSERT_VM = (
    "INSERT INTO vms(name, vm_id, token, token_exp, netns, updated_at, seq) VALUES (?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT(name) DO UPDATE SET vm_id = excluded.vm_id, token = excluded.token, "
    "token_exp = excluded.token_exp, netns = excluded.netns, updated_at = excluded.updated_at, seq = excluded.seq"
)
# One per name: a VM removed twice (added again in between) needs only its last removal.
_TOMBSTONE = "INSERT OR REPLACE INTO removed(name, seq) VALUES (?, ?)"


def _vm_row(entry: Entry, now: int, seq: int) -> tuple[object, ...]:
    return (entry.name, entry.vm_id, entry.token, entry.token_exp, entry.netns, now, seq)


def _address_rows(entries: Iterable[Entry]) -> Iterator[tuple[str, str]]:
    return ((address, entry.name) for entry in entries for address in entry.addresses)


def _nothing() -> None:
    return None


def _entry_of(vm: VM) -> Entry:
    return Entry(vm.name, vm.vm_id, vm.token, vm.token_exp, vm.addresses, vm.netns)


def _touches_netns(old: VM | None, new: Entry | None) -> bool:
    return (old is not None and old.netns is not None) or (new is not None and new.netns is not None)


def _plumb_all(
    plumber: Plumbing, changes: Sequence[tuple[VM | None, Entry | None]], *, fresh: bool = False
) -> list[tuple[str, str]]:
    """Plumb many VMs concurrently after a commit; (name, reason) of each that failed, by name.

    `fresh` re-applies a VM's table from scratch (reconcile) rather than moving it from its old row.
    """

    def one(change: tuple[VM | None, Entry | None]) -> tuple[str, str] | None:
        old, new = change
        name = new.name if new is not None else old.name if old is not None else ""
        try:
            _replumb(plumber, None if fresh else old, new, atomic=False, check=True)
        except Exception as exc:
            return (name, str(exc))
        return None

    if not changes:
        return []
    with ThreadPoolExecutor(max_workers=min(PLUMBING_WORKERS, len(changes))) as pool:
        outcomes = list(pool.map(one, changes))
    return sorted(outcome for outcome in outcomes if outcome is not None)
