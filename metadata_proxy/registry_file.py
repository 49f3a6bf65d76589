"""The registry file: its schema, the one check that a file is a registry of ours, and the
change feed both sides follow. `hostagent` writes through it, the proxy's `Registry`
reads through it; neither has a copy of any of this.

Schema (``PRAGMA user_version`` = SCHEMA_VERSION)::

    meta(one = 1 PK, id, seq, pruned)           a single row: the file's history
    vms(name PK, vm_id, token, token_exp NULL, netns NULL, updated_at, seq)
    addresses(address PK, name -> vms.name ON DELETE CASCADE)
    removed(name PK, seq)                       tombstones of removed VMs

Addresses are stored in canonical text form (``ipaddress`` compressed), so the proxy's
lookup is a dict hit on the peer address string that uvicorn hands it.

The change feed. Every write transaction calls `begin_change` once: it bumps ``meta.seq``
and returns the new value, which the transaction stamps on each VM row it writes (added
or replaced, addresses included: they go with their row, see `upsert_vms`) and on a
tombstone for each VM it removes (`remove_vms`). A reader that has seen sequence S finds
everything since in `read_since(S)`. `begin_change` also drops the tombstones that fell
out of the window and raises ``meta.pruned``: a reader older than that must read
everything (`follows` says when the feed can be followed). ``meta.id`` is drawn when the
file is made; another id is another history. Version 1 had no meta, seq or tombstones:
the proxy still reads it (in full, every time), and `hostagent` upgrades it inside its
next write transaction (`upgrade`).

    RegistryError
    └── RegistryUnavailable   the file exists but cannot be read or is not a registry of ours
"""

from __future__ import annotations

import ipaddress
import os
import sqlite3
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from urllib.parse import quote

SCHEMA_VERSION = 2

# Version 1, then what version 2 adds to it: a new file runs both, an old one the second.
# Single statements, not a script: sqlite3's executescript would commit the caller's transaction.
_SCHEMA_V1 = (
    """CREATE TABLE vms (
        name       TEXT PRIMARY KEY,
        vm_id      TEXT NOT NULL,
        token      TEXT NOT NULL,
        token_exp  INTEGER,
        netns      TEXT,
        updated_at INTEGER NOT NULL
    )""",
    """CREATE TABLE addresses (
        address TEXT PRIMARY KEY,
        name    TEXT NOT NULL REFERENCES vms(name) ON DELETE CASCADE
    )""",
    "CREATE INDEX addresses_by_name ON addresses(name)",
)
_SCHEMA_V2 = (
    "ALTER TABLE vms ADD COLUMN seq INTEGER NOT NULL DEFAULT 0",
    "CREATE INDEX vms_by_seq ON vms(seq)",
    "CREATE TABLE removed (name TEXT PRIMARY KEY, seq INTEGER NOT NULL)",
    "CREATE INDEX removed_by_seq ON removed(seq)",
    """CREATE TABLE meta (
        one    INTEGER PRIMARY KEY CHECK (one = 1),
        id     TEXT NOT NULL,
        seq    INTEGER NOT NULL,
        pruned INTEGER NOT NULL
    )""",
)
TABLES = {1: frozenset({"vms", "addresses"}), 2: frozenset({"vms", "addresses", "removed", "meta"})}
EMPTY = 0  # what check_schema returns for a database with no tables yet (no VM in it)


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


# -- the one schema check ---------------------------------------------------------------------


def check_schema(conn: sqlite3.Connection) -> int:
    """The schema version of the open database (EMPTY for one with no tables at all), or
    RegistryUnavailable saying why it is not a registry of ours. Raises sqlite3.Error when
    SQLite cannot read it. Every reader and writer asks this, so they agree on every file."""
    version: int = conn.execute("PRAGMA user_version").fetchone()[0]
    tables = {
        name
        for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        if not name.startswith("sqlite_")  # SQLite's own (sqlite_stat1, sqlite_sequence)
    }
    if version == 0:
        if not tables:
            return EMPTY
        # hostagent makes the tables and sets the version in one transaction: tables without
        # a version were made by someone else, even when they have our names.
        raise RegistryUnavailable(f"not a registry of ours (schema version 0 with tables {', '.join(sorted(tables))})")
    if version not in TABLES:
        newer = " (written by a newer hostagent)" if version > SCHEMA_VERSION else ""
        raise RegistryUnavailable(f"schema version {version}, this program knows 1 and {SCHEMA_VERSION}{newer}")
    missing = sorted(TABLES[version] - tables)
    if missing:
        raise RegistryUnavailable(f"not a registry of ours (schema version {version} without table {missing[0]})")
    return version


# -- connections ------------------------------------------------------------------------------


def connect_readonly(path: str) -> sqlite3.Connection:
    """Open the registry read-only: the proxy runs without write access to it.

    Autocommit (isolation_level None): a reader that needs several statements to agree
    says ``BEGIN`` itself.
    """
    uri = f"file:{quote(os.path.abspath(path))}?mode=ro"  # quoted: '?', '#', '%' are legal in paths
    # timeout 0: never block the event loop on a lock; Registry.refresh decides what a lock means.
    return sqlite3.connect(uri, uri=True, timeout=0, isolation_level=None, check_same_thread=False)


def connect_readwrite(path: str) -> sqlite3.Connection:
    """Open (creating if needed) the registry for `hostagent`, schema in place.

    Rollback-journal mode, not WAL: a WAL reader needs write access to the -shm file,
    and the proxy has none. A version-1 file is opened as it is: `upgrade` brings it up
    to date inside the first write transaction. RegistryUnavailable when the file is not
    a registry of ours (it is never changed then).
    """
    conn = sqlite3.connect(path, timeout=5.0, isolation_level=None)
    try:
        conn.execute("PRAGMA foreign_keys = ON")
        conn.execute("PRAGMA journal_mode = DELETE")
        if check_schema(conn) == EMPTY:
            # One transaction: a reader never sees the tables without the version, or half
            # of them; checked again inside it, as another hostagent may have been first.
            conn.execute("BEGIN IMMEDIATE")
            if check_schema(conn) == EMPTY:
                for statement in _SCHEMA_V1:
                    conn.execute(statement)
                _upgrade_to_v2(conn)
            conn.execute("COMMIT")
    except BaseException:
        conn.close()
        raise
    return conn


def upgrade(conn: sqlite3.Connection) -> None:
    """Bring a version-1 registry up to SCHEMA_VERSION inside the caller's write transaction,
    so that a command that fails leaves the file as it found it, version included."""
    if check_schema(conn) == 1:
        _upgrade_to_v2(conn)


def _upgrade_to_v2(conn: sqlite3.Connection) -> None:
    for statement in _SCHEMA_V2:
        conn.execute(statement)
    conn.execute("INSERT INTO meta(one, id, seq, pruned) VALUES (1, ?, 0, 0)", (os.urandom(8).hex(),))
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")


# -- reading ----------------------------------------------------------------------------------


def read_vms(conn: sqlite3.Connection, names: Collection[str] | None = None) -> list[VM]:
    """Every VM (or those of `names`) with its addresses, in name order. RegistryUnavailable
    for a file that is not a registry of ours, sqlite3.Error when SQLite cannot read it."""
    if check_schema(conn) == EMPTY:
        return []
    if names is None:
        return _vms(
            conn.execute("SELECT name, vm_id, token, token_exp, netns FROM vms ORDER BY name"),
            conn.execute("SELECT address, name FROM addresses ORDER BY address"),
        )
    wanted = sorted(set(names))
    marks = ", ".join("?" * len(wanted))
    return _vms(
        conn.execute(
            f"SELECT name, vm_id, token, token_exp, netns FROM vms WHERE name IN ({marks}) ORDER BY name", wanted
        ),
        conn.execute(f"SELECT address, name FROM addresses WHERE name IN ({marks}) ORDER BY address", wanted),
    )


def _vms(
    rows: Iterable[tuple[str, str, str, int | None, str | None]], addresses: Iterable[tuple[str, str]]
) -> list[VM]:
    """VMs from their rows and (address, name) rows in address order: every read gives a
    VM's addresses in the same order, or an unchanged VM would look changed."""
    by_name: dict[str, list[str]] = {}
    for address, name in addresses:
        by_name.setdefault(name, []).append(address)
    return [
        VM(name, vm_id, token, token_exp, netns, tuple(by_name.get(name, ())))
        for name, vm_id, token, token_exp, netns in rows
    ]


def index_by_address(vms: Iterable[VM]) -> dict[str, VM]:
    return {address: vm for vm in vms for address in vm.addresses}


# -- the change feed: reading -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FeedHead:
    """Where a version-2 file's history stands: its id, its last sequence, and the
    sequence up to which tombstones were dropped."""

    id: str
    seq: int
    pruned: int


def read_head(conn: sqlite3.Connection) -> FeedHead:
    """The feed's head of a version-2 registry (inside the caller's read transaction)."""
    row = conn.execute("SELECT id, seq, pruned FROM meta").fetchone()
    if row is None:
        raise RegistryUnavailable("not a registry of ours (its meta row is missing)")
    return FeedHead(*row)


def follows(head: FeedHead, file_id: str | None, seq: int) -> bool:
    """Whether a reader that has seen sequence `seq` of history `file_id` can catch up with
    `read_since(seq)`: the same history, something written since, and none of the
    tombstones it needs dropped. A head at the same sequence (or an older one) with a
    changed file is a change that is not hostagent's: read everything."""
    return file_id == head.id and head.pruned <= seq < head.seq


def read_since(conn: sqlite3.Connection, seq: int) -> tuple[list[VM], list[str]]:
    """The VMs written and the names removed after sequence `seq`. A name may be in both
    (removed, then added again): its row is there now, so it counts as written."""
    written = _vms(
        conn.execute("SELECT name, vm_id, token, token_exp, netns FROM vms WHERE seq > ?", (seq,)),
        # CROSS JOIN keeps the rows written after `seq` the outer loop: for ORDER BY, SQLite
        # would rather walk every address in index order and look up each one's VM.
        conn.execute(
            "SELECT a.address, a.name FROM vms v CROSS JOIN addresses a ON a.name = v.name WHERE v.seq > ?"
            " ORDER BY a.address",
            (seq,),
        ),
    )
    removed = [name for (name,) in conn.execute("SELECT name FROM removed WHERE seq > ?", (seq,))]
    return written, removed


def count_written_since(conn: sqlite3.Connection, seq: int) -> int:
    """How many VM rows were written after `seq` (an index count: costs what changed)."""
    count: int = conn.execute("SELECT count(*) FROM vms WHERE seq > ?", (seq,)).fetchone()[0]
    return count


# -- the change feed: writing -----------------------------------------------------------------


def begin_change(conn: sqlite3.Connection, tombstone_window: int) -> int:
    """This write transaction's sequence number (call once, inside ``BEGIN IMMEDIATE`` and
    before writing); the tombstones of transactions more than `tombstone_window` back are
    dropped, with meta.pruned saying so."""
    conn.execute("UPDATE meta SET seq = seq + 1")
    seq = read_head(conn).seq
    horizon = seq - tombstone_window
    if conn.execute("DELETE FROM removed WHERE seq <= ?", (horizon,)).rowcount > 0:
        conn.execute("UPDATE meta SET pruned = ? WHERE pruned < ?", (horizon, horizon))
    return seq


_UPSERT_VM = (
    "INSERT INTO vms(name, vm_id, token, token_exp, netns, updated_at, seq) VALUES (?, ?, ?, ?, ?, ?, ?) "
    "ON CONFLICT(name) DO UPDATE SET vm_id = excluded.vm_id, token = excluded.token, "
    "token_exp = excluded.token_exp, netns = excluded.netns, updated_at = excluded.updated_at, seq = excluded.seq"
)


def upsert_vms(conn: sqlite3.Connection, rows: Iterable[VM], addressed: Collection[str], seq: int, now: int) -> None:
    """Write `rows` stamped with `seq`. The rows named in `addressed` (new VMs, and VMs whose
    addresses changed) get their address rows rewritten, every old one freed before any
    new one is taken: in one `vm sync` an address may pass from one VM to another. Other
    rows keep theirs (a rotated token): addresses go with their row, stamped by its seq.
    Call `remove_vms` first for the VMs that go in the same transaction."""
    rows = list(rows)
    conn.executemany("DELETE FROM addresses WHERE name = ?", ((name,) for name in addressed))
    conn.executemany(_UPSERT_VM, ((row.name, row.vm_id, row.token, row.token_exp, row.netns, now, seq) for row in rows))
    conn.executemany(
        "INSERT INTO addresses(address, name) VALUES (?, ?)",
        ((address, row.name) for row in rows if row.name in addressed for address in row.addresses),
    )


def remove_vms(conn: sqlite3.Connection, names: Collection[str], seq: int) -> None:
    """Remove the VMs `names`, each leaving a tombstone stamped with `seq` (one per name: a
    VM removed twice, added again in between, needs only its last removal)."""
    conn.executemany("INSERT OR REPLACE INTO removed(name, seq) VALUES (?, ?)", ((name, seq) for name in names))
    conn.executemany("DELETE FROM addresses WHERE name = ?", ((name,) for name in names))
    conn.executemany("DELETE FROM vms WHERE name = ?", ((name,) for name in names))
