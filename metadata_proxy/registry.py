"""The proxy's side of the VM registry: a read-only, change-aware snapshot of the file
that `hostagent` writes. The file itself (schema, the one schema check, the change feed)
is `registry_file`, which both sides import; the names the app uses are re-exported here.

`Registry.refresh` re-checks the file (a ``stat`` and a read of the 100-byte SQLite header
on a file kept open, a couple of microseconds) and, when it changed, reads only what
changed since its sequence (`registry_file.read_since`), at a cost that follows the
change, not the registry's size. When the app asks it to, and how that keeps a
`hostagent` change in effect for the next request, is `owners.Owners.lookup`'s business.

    RegistryError
    └── RegistryUnavailable   the file exists but cannot be read or is not a registry
"""

from __future__ import annotations

import collections
import itertools
import os
import sqlite3
import time
from collections.abc import Mapping
from dataclasses import dataclass

from .registry_file import (
    SCHEMA_VERSION,
    VM,
    RegistryError,
    RegistryUnavailable,
    canonical_address,
    check_schema,
    connect_readonly,
    count_written_since,
    follows,
    index_by_address,
    read_head,
    read_since,
    read_vms,
)

__all__ = ["VM", "LOCK_PATIENCE", "Registry", "RegistryError", "RegistryUnavailable", "canonical_address"]

# What the file looks like from outside: device and inode (a file replaced by rename), size,
# mtime and ctime, and the SQLite header (its change counter moves on every commit, and
# garbage written over it shows up there first). None: there is no file.
_Fingerprint = tuple[int, int, int, int, int, bytes]
_STALE: _Fingerprint = (-1, -1, -1, -1, -1, b"")  # never equal to a real file's
# A hostagent commit holds SQLite's lock for milliseconds; a lock held longer is a fault.
LOCK_PATIENCE = 0.5
# Generations come from one counter per process, so a Registry that replaces another (a
# reloaded config naming another file) starts above every generation the app has seen:
# connections stamped with an old one still count as accepted before its changes.
_GENERATIONS = itertools.count(1)
# When more VMs were written since the snapshot than both of these (a count and a share of
# the snapshot's), reading them row by row through the index costs more than a full read.
REWRITTEN_COUNT = 1000
REWRITTEN_SHARE = 0.25
# How many generations back `changed_since` can answer; the app asks after every refresh.
CHANGES_KEPT = 16


@dataclass(frozen=True, slots=True)
class _Source:
    """Which file, and which point of its history, the snapshot was read from."""

    inode: tuple[int, int]  # (st_dev, st_ino)
    id: str | None  # meta.id; None for a version-1 file, which has no history to follow
    seq: int
    size: int


# What one read found: every VM, or the VMs written and the names removed since the snapshot.
_Read = list[VM] | tuple[list[VM], list[str]]


def _locked(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


class Registry:
    """The proxy's read-only, change-aware view of the registry.

    `lookup()` is called once per guest request, checking the file only when guest input
    arrived since the last check (owners.Owners.lookup). A check costs a ``stat`` and a
    100-byte ``pread`` when nothing changed; when something did, the rows written or removed since
    the snapshot's sequence are read and applied to it, and the VMs they replaced or
    removed are kept for `changed_since`. It reads everything on the first load, after
    an error, for a version-1 file, for another file (inode or meta.id), when its sequence
    is older than the tombstones kept, and when the file changed without a write of
    `hostagent` (same sequence, or smaller): whatever did that, a full read shows it, damage
    included. (Damage that lands between a hostagent write and the next check, in pages
    neither touches, goes unseen until a full read: the snapshot keeps what was committed.)

    A missing file is an empty registry; an unreadable or damaged one raises
    RegistryUnavailable until it is readable again (fail closed: never attach a token
    the registry may have dropped).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None  # the file, kept open: its header is read at every check
        self._fd_inode = (-1, -1)
        self._fingerprint: _Fingerprint | None = None
        self._source: _Source | None = None  # None: the next read is a full one
        # The last good snapshot. by_address is replaced, never changed in place (see _apply);
        # by_name is ours alone and updated in place.
        self._by_name: dict[str, VM] = {}
        self._by_address: dict[str, VM] = {}
        self._vms: tuple[VM, ...] | None = ()  # built on demand (metrics scrapes), then kept
        self._error: str | None = None
        self._locked_since: float | None = None
        self._refreshed = False  # until the first refresh, the (empty) snapshot says nothing
        self.generation = next(_GENERATIONS)  # a new one on every refresh that changed the VM set
        # (generation before, generation after, the VMs of before that after replaced or removed)
        self._changes: collections.deque[tuple[int, int, list[VM]]] = collections.deque(maxlen=CHANGES_KEPT)

    # -- the file -------------------------------------------------------------------------

    def _current_fingerprint(self, *, reopen: bool = True) -> _Fingerprint | None:
        """The file's fingerprint, read through the kept descriptor (two syscalls instead of
        open, fstat, pread, close). A path that names another inode than the descriptor's
        is reopened; with `reopen` False (inside an SQLite read, where closing a descriptor
        of the file would drop SQLite's POSIX lock on it) it is reported as _STALE instead.
        """
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if reopen:
                self.close()
            return None
        except OSError as exc:
            raise RegistryUnavailable(f"{self.path}: {exc.strerror}") from None
        if (st.st_dev, st.st_ino) != self._fd_inode or self._fd is None:
            if not reopen:
                return _STALE
            self.close()
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise RegistryUnavailable(f"{self.path}: {exc.strerror}") from None
            self._fd = fd
            st = os.fstat(fd)  # the inode actually opened, should the path have moved again
            self._fd_inode = (st.st_dev, st.st_ino)
        try:
            header = os.pread(self._fd, 100, 0)
        except OSError as exc:  # a directory, an I/O error
            raise RegistryUnavailable(f"{self.path}: {exc.strerror}") from None
        return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, header)

    def close(self) -> None:
        """Let go of the kept file descriptor (the next check reopens it)."""
        if self._fd is not None:
            fd, self._fd, self._fd_inode = self._fd, None, (-1, -1)
            os.close(fd)

    def __del__(self) -> None:
        self.close()

    # -- reading --------------------------------------------------------------------------

    def refresh(self) -> bool:
        """Bring the snapshot up to date with the file; True when the VM set changed.

        Raises RegistryUnavailable when the file exists but cannot be read.
        """
        self._refreshed = True
        try:
            fingerprint = self._current_fingerprint()
            if fingerprint == self._fingerprint and self._error is None:
                return False
            if fingerprint is None:
                self._source, self._fingerprint = None, None
                self._error = self._locked_since = None
                return self._replace([])
            conn = connect_readonly(self.path)
            try:
                fingerprint, source, read = self._read(conn)
            finally:
                conn.close()  # ends the read transaction too
        except RegistryUnavailable as exc:
            self._fail(str(exc))
            raise
        except sqlite3.Error as exc:
            if _locked(exc) and self._error is None:
                now = time.monotonic()
                self._locked_since = self._locked_since or now
                if now - self._locked_since < LOCK_PATIENCE:
                    # A writer is committing, so its command has not returned yet and the
                    # snapshot from before it is still the truth (SQLite's own readers see
                    # the same). The fingerprint stays old: the next call reads again.
                    return False
            self._fail(f"{self.path}: {exc}")
            raise RegistryUnavailable(self._error) from None
        self._fingerprint, self._source = fingerprint, source
        self._error = self._locked_since = None
        if isinstance(read, list):
            return self._replace(read)
        return self._apply(*read)

    def _read(self, conn: sqlite3.Connection) -> tuple[_Fingerprint, _Source, _Read]:
        """One read transaction: the fingerprint of exactly what it read, where it read it,
        and either every VM (a list) or what changed since the snapshot."""
        conn.execute("BEGIN")
        version = self._schema(conn)
        # From here until COMMIT SQLite holds a shared lock: no commit can land, so the
        # fingerprint taken now is the state this transaction reads (one taken before
        # opening could be older, and the next refresh would take the same commit for a
        # change that no write of hostagent explains).
        fingerprint = self._current_fingerprint(reopen=False)
        if fingerprint is None:
            fingerprint = _STALE  # replaced or removed while being opened: re-check next time
        inode, size = (fingerprint[0], fingerprint[1]), fingerprint[2]
        if version != SCHEMA_VERSION:  # version 1, or no tables yet: no history to follow
            return fingerprint, _Source(inode, None, 0, size), read_vms(conn)
        try:
            head = read_head(conn)
        except RegistryUnavailable as exc:
            raise RegistryUnavailable(f"{self.path}: {exc}") from None
        old, new = self._source, _Source(inode, head.id, head.seq, size)
        if (
            old is not None
            and old.inode == new.inode
            and follows(head, old.id, old.seq)
            and old.size <= new.size  # SQLite never shrinks the file without VACUUM
            and not self._mostly_rewritten(conn, old.seq)
        ):
            return fingerprint, new, read_since(conn, old.seq)
        return fingerprint, new, read_vms(conn)

    def _schema(self, conn: sqlite3.Connection) -> int:
        try:
            return check_schema(conn)
        except RegistryUnavailable as exc:
            raise RegistryUnavailable(f"{self.path}: {exc}") from None

    def _mostly_rewritten(self, conn: sqlite3.Connection, seq: int) -> bool:
        """Whether so many VMs were written after `seq` (a `vm sync` that rewrote most of
        them) that a full read costs less; counting index entries costs what changed."""
        written = count_written_since(conn, seq)
        return written > REWRITTEN_COUNT and written > REWRITTEN_SHARE * len(self._by_name)

    # -- applying -------------------------------------------------------------------------

    def _replace(self, vms: list[VM]) -> bool:
        """A full read: the new snapshot, compared with the last good one by name."""
        by_name = {vm.name: vm for vm in vms}
        replaced = [vm for name, vm in self._by_name.items() if by_name.get(name) != vm]
        if not replaced and len(by_name) == len(self._by_name):  # nothing replaced, removed or added
            return False
        self._install(by_name, index_by_address(vms), replaced)
        return True

    def _apply(self, written: list[VM], removed: list[str]) -> bool:
        """What changed since the snapshot's sequence, applied to it."""
        by_name = self._by_name
        # A name both removed and written since was added again after its removal (its row
        # is there now): written wins, even when it came back exactly as it was.
        gone = [name for name in set(removed).difference(vm.name for vm in written) if name in by_name]
        written = [vm for vm in written if by_name.get(vm.name) != vm]
        again = {vm.name for vm in written}
        if not written and not gone:
            return False
        replaced = [vm for name in itertools.chain(gone, again) if (vm := by_name.pop(name, None)) is not None]
        by_name.update((vm.name, vm) for vm in written)
        # by_address is copied, never changed in place: the app compares the one it saw
        # last with the new one. A copy is a memcpy while the dict has no deleted slots, so
        # an address that stays (a rotated token) is overwritten rather than deleted and
        # added again. All old addresses go before new ones come: within one `vm sync` an
        # address can pass from one VM to another.
        taken = {address: vm for vm in written for address in vm.addresses}
        by_address = dict(self._by_address)
        for vm in replaced:
            for address in vm.addresses:
                if address not in taken:
                    del by_address[address]
        by_address.update(taken)
        self._install(by_name, by_address, replaced)
        return True

    def _install(self, by_name: dict[str, VM], by_address: dict[str, VM], replaced: list[VM]) -> None:
        self._by_name, self._by_address, self._vms = by_name, by_address, None
        before, self.generation = self.generation, next(_GENERATIONS)
        self._changes.append((before, self.generation, replaced))

    def _fail(self, message: str) -> None:
        # The last good snapshot stays (hidden): once the file is readable again, a change
        # is what differs from it, which is also what the app last saw.
        self._error = message
        self._locked_since = None
        self._fingerprint = _STALE
        self._source = None

    # -- the view -------------------------------------------------------------------------

    def lookup(self, address: str, *, refresh: bool = True) -> VM | None:
        """The VM holding `address` now, or None. Raises RegistryUnavailable.

        With `refresh` False, the VM as of the last refresh: for a caller that knows nothing
        it must see can have changed since (see owners.Owners.lookup). A registry never
        refreshed (a reload named a new file) refreshes all the same.
        """
        if refresh or not self._refreshed:
            self.refresh()
        elif self._error is not None:
            raise RegistryUnavailable(self._error)
        vm = self._by_address.get(address)
        if vm is None and (address.startswith("::ffff:") or "%" in address):
            try:
                vm = self._by_address.get(canonical_address(address.split("%", 1)[0]))
            except ValueError:
                return None
        return vm

    def changed_since(self, generation: int) -> Mapping[str, VM] | None:
        """By name, the VMs as they were at `generation` that have since been replaced or
        removed (not those added since: nothing of theirs can be stale), so that who reacts
        to a change pays for the change, not for the registry. None when this registry cannot
        tell (a generation it did not make, or too old): compare everything.
        """
        if generation == self.generation:
            return {}
        parts: list[list[VM]] = []
        want = self.generation
        for before, after, replaced in reversed(self._changes):
            if after != want:
                break
            parts.append(replaced)
            if before == generation:
                then: dict[str, VM] = {}
                for part in reversed(parts):  # oldest first: a VM as it was at `generation`
                    for vm in part:
                        then.setdefault(vm.name, vm)
                return then
            want = before
        return None

    @property
    def error(self) -> str | None:
        """Why the registry is unavailable, or None when the last read worked."""
        return self._error

    @property
    def vms(self) -> tuple[VM, ...]:
        """Every VM in name order (none while unavailable)."""
        if self._error is not None:
            return ()
        if self._vms is None:
            self._vms = tuple(self._by_name[name] for name in sorted(self._by_name))
        return self._vms

    def by_address(self) -> Mapping[str, VM]:
        """Address -> VM (empty while unavailable); never changed in place."""
        return {} if self._error is not None else self._by_address

    def by_name(self) -> Mapping[str, VM]:
        """Name -> VM (empty while unavailable); updated in place by the next change."""
        return {} if self._error is not None else self._by_name
