"""The VM registry: one SQLite file that `hostagent` writes and the proxy only reads.

Both sides import this module, so the schema and the read helpers exist once.

Schema (``PRAGMA user_version`` = SCHEMA_VERSION)::

    vms(name PK, vm_id, token, token_exp NULL, netns NULL, updated_at)
    addresses(address PK, name -> vms.name ON DELETE CASCADE)

Addresses are stored in canonical text form (``ipaddress`` compressed), so the proxy's
lookup is a dict hit on the peer address string that uvicorn hands it.

The proxy side is `Registry`: an in-memory snapshot that re-checks the file on every
request (a ``stat`` and a read of the 100-byte SQLite header, a few microseconds) and
reloads when anything changed. That is what makes a `hostagent` change effective for
the very next request in every worker, and a damaged file noticed at once:

    RegistryError
    └── RegistryUnavailable   the file exists but cannot be read or is not a registry
"""

from __future__ import annotations

import ipaddress
import os
import sqlite3
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import quote

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS vms (
    name       TEXT PRIMARY KEY,
    vm_id      TEXT NOT NULL,
    token      TEXT NOT NULL,
    token_exp  INTEGER,
    netns      TEXT,
    updated_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS addresses (
    address TEXT PRIMARY KEY,
    name    TEXT NOT NULL REFERENCES vms(name) ON DELETE CASCADE
);
CREATE INDEX IF NOT EXISTS addresses_by_name ON addresses(name);
"""


class RegistryError(Exception):
    """Base of the registry's errors."""


class RegistryUnavailable(RegistryError):
    """The registry file exists but cannot be read, or is not a registry of ours."""


@dataclass(frozen=True, slots=True)
class VM:
    """One registered VM as both sides see it."""

    name: str
    vm_id: str
    token: str
    token_exp: int | None
    netns: str | None
    addresses: tuple[str, ...]


def canonical_address(text: str) -> str:
    """The registry's form of an address; IPv4-mapped IPv6 becomes plain IPv4.

    Raises ValueError for anything that is not a single IP address.
    """
    addr = ipaddress.ip_address(text.strip())
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def connect_readonly(path: str) -> sqlite3.Connection:
    """Open the registry read-only: the proxy runs without write access to it."""
    uri = f"file:{quote(os.path.abspath(path))}?mode=ro"  # quoted: '?', '#', '%' are legal in paths
    # timeout 0: never block the event loop on a lock; Registry.refresh decides what a lock means.
    return sqlite3.connect(uri, uri=True, timeout=0, check_same_thread=False)


def connect_readwrite(path: str) -> sqlite3.Connection:
    """Open (creating if needed) the registry for `hostagent`, schema in place.

    Rollback-journal mode, not WAL: a WAL reader needs write access to the -shm file,
    and the proxy has none.
    """
    conn = sqlite3.connect(path, timeout=5.0, isolation_level=None)
    conn.execute("PRAGMA foreign_keys = ON")
    conn.execute("PRAGMA journal_mode = DELETE")
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version == 0:
        if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
            conn.close()
            raise RegistryUnavailable(f"{path}: an SQLite file, but not a registry of ours")
        # One transaction: a reader never sees the tables without the version, or half of them.
        conn.executescript(f"BEGIN IMMEDIATE; {SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
    elif version != SCHEMA_VERSION:
        conn.close()
        raise RegistryUnavailable(f"{path}: schema version {version}, this program knows {SCHEMA_VERSION}")
    return conn


def read_vms(conn: sqlite3.Connection) -> list[VM]:
    """Every VM with its addresses, in name order. Raises sqlite3.Error on damage."""
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version != SCHEMA_VERSION:
        raise sqlite3.DatabaseError(f"schema version {version}, expected {SCHEMA_VERSION}")
    addresses: dict[str, list[str]] = {}
    for address, name in conn.execute("SELECT address, name FROM addresses ORDER BY address"):
        addresses.setdefault(name, []).append(address)
    return [
        VM(name, vm_id, token, token_exp, netns, tuple(addresses.get(name, ())))
        for name, vm_id, token, token_exp, netns in conn.execute(
            "SELECT name, vm_id, token, token_exp, netns FROM vms ORDER BY name"
        )
    ]


def index_by_address(vms: Iterable[VM]) -> dict[str, VM]:
    return {address: vm for vm in vms for address in vm.addresses}


# The part of the file whose change means "reload": inode (a file replaced by rename),
# size, mtime and ctime, and the SQLite header (its change counter moves on every commit,
# and garbage written over it shows up there first).
_Fingerprint = tuple[int, int, int, int, bytes]
_STALE: _Fingerprint = (-1, -1, -1, -1, b"")  # never equal to a real file's
# A hostagent commit holds SQLite's lock for milliseconds; a lock held longer is a fault.
LOCK_PATIENCE = 0.5


def _locked(exc: sqlite3.Error) -> bool:
    return getattr(exc, "sqlite_errorcode", None) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)


class Registry:
    """The proxy's read-only, change-aware view of the registry.

    `lookup()` is called once per guest request. It costs a ``stat`` and a 100-byte
    ``pread`` when nothing changed, and a full reload when anything did.
    A missing file is an empty registry; an unreadable or damaged one raises
    RegistryUnavailable until it is readable again (fail closed: never attach a token
    the registry may have dropped).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fingerprint: _Fingerprint | None = None
        self._by_address: dict[str, VM] = {}
        self._vms: tuple[VM, ...] = ()
        self._error: str | None = None
        self._locked_since: float | None = None
        self.generation = 0  # bumped on every successful reload that changed something

    # -- reading --------------------------------------------------------------------

    def _current_fingerprint(self) -> _Fingerprint | None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise RegistryUnavailable(f"{self.path}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            header = os.pread(fd, 100, 0)
        except OSError as exc:
            raise RegistryUnavailable(f"{self.path}: {exc.strerror}") from None
        finally:
            os.close(fd)
        return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns, header)

    def refresh(self) -> bool:
        """Bring the snapshot up to date with the file; True when the VM set changed.

        Raises RegistryUnavailable when the file exists but cannot be read.
        """
        try:
            fingerprint = self._current_fingerprint()
        except RegistryUnavailable as exc:
            self._fail(str(exc))
            raise
        if fingerprint == self._fingerprint and self._error is None:
            return False
        if fingerprint is None:
            vms: list[VM] = []
        else:
            try:
                conn = connect_readonly(self.path)
                try:
                    vms = read_vms(conn)
                finally:
                    conn.close()
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
            self._locked_since = None
            # A write may have landed between the stat and the read: take the
            # fingerprint again so a later call re-reads rather than trusting a mix.
            try:
                if self._current_fingerprint() != fingerprint:
                    fingerprint = _STALE
            except RegistryUnavailable as exc:
                self._fail(str(exc))
                raise
        self._fingerprint = fingerprint
        self._error = None
        new = tuple(vms)
        if new == self._vms:
            return False
        self._vms = new
        self._by_address = index_by_address(new)
        self.generation += 1
        return True

    def _fail(self, message: str) -> None:
        self._error = message
        self._locked_since = None
        self._fingerprint = _STALE
        self._by_address = {}
        self._vms = ()

    def lookup(self, address: str) -> VM | None:
        """The VM holding `address` now, or None. Raises RegistryUnavailable."""
        self.refresh()
        vm = self._by_address.get(address)
        if vm is None and (address.startswith("::ffff:") or "%" in address):
            try:
                vm = self._by_address.get(canonical_address(address.split("%", 1)[0]))
            except ValueError:
                return None
        return vm

    @property
    def error(self) -> str | None:
        """Why the registry is unavailable, or None when the last read worked."""
        return self._error

    @property
    def vms(self) -> tuple[VM, ...]:
        return self._vms

    def by_address(self) -> Mapping[str, VM]:
        return self._by_address
