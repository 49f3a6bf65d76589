"""Registry writes: every invariant of README "A VM's life", one SQLite transaction per command.

The file's schema and change feed live in `metadata_proxy.registry_file` (shared with the
proxy); the rest of what a write needs is beside this module, one concern each:

    hostagent/errors.py     the error tree (StoreError and its kinds)
    hostagent/files.py      the file on disk: owner, modes, atomic creation, pre-open checks
    hostagent/entries.py    what a VM description must look like (vm add, vm sync lines)
    hostagent/plumbing.py   moving a VM's namespace table with its row, and undoing it
    hostagent/store.py      the transactions (this module)

Each write runs under ``BEGIN IMMEDIATE``, re-reads what it needs of the registry inside
that transaction, checks the invariants against it, and only then writes through the
change feed (`begin_change`, `upsert_vms`, `remove_vms`), so the proxy reads only what
changed. A version-1 registry is upgraded inside the same transaction. Plumbing that must
agree with a row (README "The host side") runs inside the still-open transaction: if it fails the
transaction rolls back, and if the commit fails the plumbing is undone.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

from hostagent import files
from hostagent.entries import KEEP, Change, Entry, differences, make_change, make_entry, parse_sync
from hostagent.errors import Conflict, InvalidEntry, PlumbingFailed, RegistryDamaged, StoreError
from hostagent.files import Access, proxy_access
from hostagent.plumbing import Plumbing, entry_of, nothing, plumb_all, replumb, touches_netns
from metadata_proxy.registry_file import (
    VM,
    RegistryUnavailable,
    begin_change,
    connect_readonly,
    connect_readwrite,
    read_vms,
    remove_vms,
    upgrade,
    upsert_vms,
)

# What callers of the store use, wherever it is defined.
__all__ = [
    "Access",
    "ApplyReport",
    "Change",
    "Conflict",
    "Entry",
    "InvalidEntry",
    "KEEP",
    "PlumbingFailed",
    "Put",
    "RegistryDamaged",
    "Store",
    "StoreError",
    "SyncResult",
    "make_change",
    "make_entry",
    "parse_sync",
    "proxy_access",
]

# Tombstones of the last this many write transactions are kept. A running proxy checks the
# file every 0.25 s; one that falls further behind (stopped, or starting) reads it whole.
TOMBSTONE_WINDOW = 10_000


@dataclass
class SyncResult:
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (VM name, reason) of failed plumbing
    fields: dict[str, list[str]] = field(default_factory=dict)  # replaced VM name -> the fields that change


@dataclass(frozen=True, slots=True)
class ApplyReport:
    applied: list[str]
    missing: list[tuple[str, str]]  # (VM name, netns) whose namespace does not exist
    failed: list[tuple[str, str]]  # (VM name, reason)


@dataclass(frozen=True, slots=True)
class Put:
    """What `Store.put` did: "added", "replaced" or "unchanged", the row before and after,
    and the fields that changed (differences' names, vm_id included)."""

    outcome: str
    old: VM | None
    new: Entry
    changed: list[str]


class Store:
    """The registry at `path`, as `hostagent` writes it."""

    def __init__(self, path: str, access: Access | None = None, *, tombstone_window: int = TOMBSTONE_WINDOW) -> None:
        self.path = path
        self.access = access if access is not None else proxy_access()
        self.tombstone_window = tombstone_window

    # -- reading ------------------------------------------------------------------------

    def vms(self, names: Sequence[str] | None = None) -> list[VM]:
        """Every registered VM (or those of `names`) in name order; a missing registry has
        none. StoreError when this user cannot read it (never an empty answer)."""
        if not files.exists(self.path):
            return []
        files.check_file(self.path)
        try:
            conn = connect_readonly(self.path)
            try:
                return read_vms(conn, names)
            finally:
                conn.close()
        except (sqlite3.Error, RegistryUnavailable) as exc:
            raise RegistryDamaged(f"registry {self.path}: {exc}") from None

    def get(self, name: str) -> VM | None:
        return next(iter(self.vms([name])), None)

    # -- writing ------------------------------------------------------------------------

    def ensure_directory(self) -> None:
        """Create the registry's directory with its owner and mode (`host setup` only)."""
        files.ensure_directory(self.path, self.access)

    def add(self, entry: Entry, *, replace: bool = False, plumber: Plumbing | None = None) -> str:
        """Register `entry`: "added", "replaced" or "unchanged". Conflict, PlumbingFailed, StoreError."""
        return self.put(entry, replace=replace, plumber=plumber).outcome

    def put(self, change: Entry | Change, *, replace: bool = False, plumber: Plumbing | None = None) -> Put:
        """Register a VM, or change the fields `change` names (with `replace`) keeping the rest."""
        with self._transaction() as conn:
            old = self._current(conn, [change.name]).get(change.name)
            entry = change.over(old)
            changed = differences(old, entry) if old is not None else []
            if old is not None and not changed:
                return Put("unchanged", old, entry, [])
            marks = ", ".join("?" * len(entry.addresses))
            holders = dict(
                conn.execute(f"SELECT address, name FROM addresses WHERE address IN ({marks})", entry.addresses)
            )
            for address in entry.addresses:
                holder = holders.get(address)
                if holder is not None and holder != entry.name:
                    raise Conflict(f"address {address} is already held by VM {holder}")
            twin = conn.execute(
                "SELECT name FROM vms WHERE token = ? AND name != ? LIMIT 1", (entry.token, entry.name)
            ).fetchone()
            if twin is not None:
                raise Conflict(
                    f"VM {entry.name}: its token is already registered for VM {twin[0]}; each VM has its own"
                )
            if old is not None and not replace:
                what = " and ".join(key for key in ("token", "address", "netns") if key in changed)
                raise Conflict(f"VM {entry.name} is registered with a different {what}; use --replace to change it")
            if plumber is not None and entry.netns is not None:
                try:
                    plumber.check(entry.netns, entry.addresses)
                except Exception as exc:
                    raise PlumbingFailed(str(exc)) from None
            seq = begin_change(conn, self.tombstone_window)
            readdressed = old is None or sorted(old.addresses) != sorted(entry.addresses)
            upsert_vms(conn, [entry.as_vm()], {entry.name} if readdressed else set(), seq, int(time.time()))
            undo = replumb(plumber, old, entry) if plumber is not None else nothing
            self._commit(conn, undo)
        return Put("added" if old is None else "replaced", old, entry, changed)

    def remove(self, name: str, *, plumber: Plumbing | None = None) -> str:
        """Unregister `name` and tear down its table: "removed" or "absent"."""
        if not files.exists(self.path):
            return "absent"
        with self._transaction() as conn:
            old = self._current(conn, [name]).get(name)
            if old is None:
                return "absent"
            remove_vms(conn, [name], begin_change(conn, self.tombstone_window))
            undo = replumb(plumber, old, None) if plumber is not None else nothing
            self._commit(conn, undo)
        return "removed"

    def sync(self, entries: Sequence[Entry], *, plumber: Plumbing | None = None, dry_run: bool = False) -> SyncResult:
        """Make the registry exactly `entries` (already validated by parse_sync) in one transaction.

        Only rows that change are written. Plumbing then follows for the VMs whose row
        changed (or went); its failures are listed in the result, the registry stays converged.
        `dry_run`: the result says what would change; nothing is written or plumbed.
        """
        if dry_run:
            return _plan({vm.name: vm for vm in self.vms()}, entries)[0]
        with self._transaction() as conn:
            result, changes = _plan(self._current(conn), entries)
            if not changes:
                return result
            seq = begin_change(conn, self.tombstone_window)
            remove_vms(conn, result.removed, seq)
            upserts = [new for _, new in changes if new is not None]
            addressed = {
                new.name
                for old, new in changes
                if new is not None and (old is None or sorted(old.addresses) != sorted(new.addresses))
            }
            upsert_vms(conn, [entry.as_vm() for entry in upserts], addressed, seq, int(time.time()))
            self._commit(conn, nothing)
        if plumber is not None:
            result.failed = plumb_all(plumber, [c for c in changes if touches_netns(*c)])
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
        failed = plumb_all(plumber, [(vm, entry_of(vm)) for vm in present], fresh=True)
        bad = {name for name, _ in failed}
        return ApplyReport([vm.name for vm in present if vm.name not in bad], missing, failed)

    # -- the transaction ----------------------------------------------------------------

    def _current(self, conn: sqlite3.Connection, names: Sequence[str] | None = None) -> dict[str, VM]:
        """The registry inside the transaction (only `names`, when given), by name."""
        try:
            return {vm.name: vm for vm in read_vms(conn, names)}
        except (sqlite3.Error, RegistryUnavailable) as exc:
            raise RegistryDamaged(f"registry {self.path}: {exc}") from None

    def _open_for_write(self) -> sqlite3.Connection:
        files.require_directory(self.path)  # a mistyped --registry creates nothing
        old = os.umask(self.access.umask)  # whatever SQLite creates beside the file stays closed too
        try:
            if not files.exists(self.path):
                files.create(self.path, self.access)
            files.check_file(self.path)
            files.own(self.path, self.access, self.access.file_mode)
            return connect_readwrite(self.path)
        except OSError as exc:
            raise StoreError(f"registry {self.path}: {exc.strerror or exc}") from None
        except (sqlite3.Error, RegistryUnavailable) as exc:
            raise RegistryDamaged(f"registry {self.path}: {exc}") from None
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
            except (sqlite3.Error, RegistryUnavailable) as exc:
                raise RegistryDamaged(f"registry {self.path}: {exc}") from None
            yield conn
        except RegistryUnavailable as exc:  # the feed found no meta row
            raise RegistryDamaged(f"registry {self.path}: {exc}") from None
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


def _plan(current: dict[str, VM], entries: Sequence[Entry]) -> tuple[SyncResult, list[tuple[VM | None, Entry | None]]]:
    """What making `current` exactly `entries` takes: the result to report, and each
    change as (row before or None, row after or None), removals last."""
    result = SyncResult()
    changes: list[tuple[VM | None, Entry | None]] = []
    desired = {entry.name for entry in entries}
    for entry in entries:
        old = current.get(entry.name)
        if old is not None and not differences(old, entry):
            result.unchanged += 1
            continue
        (result.added if old is None else result.replaced).append(entry.name)
        if old is not None:
            result.fields[entry.name] = differences(old, entry)
        changes.append((old, entry))
    gone = [vm for name, vm in current.items() if name not in desired]
    result.removed = [vm.name for vm in gone]
    changes.extend((vm, None) for vm in gone)
    return result, changes
