"""The Actions cache's entry index: one small interface, two backends (SQLite, PostgreSQL).

An entry is (scope, key, version) -> one blob. The rules every backend keeps, with the
database doing the deciding so that several control-plane replicas may share one index:

- ``create`` inserts under a unique (scope, key, version) constraint: of two concurrent
  creates exactly one wins; the other gets None. An unfinalized entry older than the
  abandon deadline is replaced (its blob goes to the deletion queue).
- ``lookup`` sees finalized entries of one scope only: the exact key first, then each
  restore key as a prefix, newest first. The entry it answers is touched (``last_used``)
  and *leased* until the signed URL expires, in the same statement that re-checks it still
  exists; eviction and expiry never remove a leased entry, so a URL handed out always
  names a blob that is still there.
- Every removal moves the entry's blob name to ``doomed_blobs`` in the same transaction;
  the service deletes those blobs from the store afterwards and then ``forget``s them (a
  crash in between only delays the deletion).

Times are seconds since the epoch, passed in by the caller (tests inject a clock).
Statements are written once with ``?`` placeholders; the PostgreSQL backend rewrites them.
"""

from __future__ import annotations

import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

__all__ = ["CacheIndex", "Entry", "IndexError_", "PostgresIndex", "SqliteIndex", "TooManyPending", "open_index"]

# The largest code point: a prefix's range scan ends below prefix + MAX_CHAR (then checked exactly).
MAX_CHAR = "\U0010ffff"


class IndexError_(Exception):  # noqa: N801 - IndexError is a builtin
    """The index cannot be opened or used (the message names the database)."""


class TooManyPending(Exception):
    """The scope already has its maximum of unfinalized entries (uploads in progress)."""


@dataclass(frozen=True, slots=True)
class Entry:
    id: int
    scope: str
    key: str
    version: str
    blob: str
    size: int | None
    created: float
    finalized: float | None
    last_used: float
    # Set at finalize while the guest still holds a write URL for the blob: the blob's ETag then,
    # checked again once that URL has expired (``unverified``/``verified``).
    etag: str | None = None


_COLUMNS = "id, scope, key, version, blob, size, created, finalized, last_used, etag"


class _Cursor(Protocol):
    def execute(self, sql: Any, params: Sequence[Any] = ...) -> Any: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> Any: ...


def _entry(row: Sequence[Any] | None) -> Entry | None:
    return Entry(*row) if row is not None else None


class CacheIndex(ABC):
    """The interface the cache service uses; a backend provides ``_transaction`` and ``_sql``."""

    @abstractmethod
    def _transaction(self, *, scope_lock: str | None = None) -> Any:
        """A context manager yielding a cursor inside one write transaction; with ``scope_lock``,
        serialised against every other transaction holding the same scope's lock."""

    @abstractmethod
    def _statements(self) -> Any:
        """A context manager yielding a cursor whose statements each commit on their own."""

    def _sql(self, statement: str) -> str:
        return statement

    @abstractmethod
    def close(self) -> None: ...

    def create(
        self, scope: str, key: str, version: str, blob: str, now: float, abandon_before: float, max_pending: int = 0
    ) -> Entry | None:
        """A new unfinalized entry; None when one with this scope, key and version exists.
        With ``max_pending``, TooManyPending when the scope already has that many uploads in progress."""
        with self._transaction(scope_lock=scope if max_pending else None) as cur:
            # An upload abandoned long ago must not block the key forever.
            cur.execute(
                self._sql(
                    "DELETE FROM entries WHERE scope = ? AND key = ? AND version = ?"
                    " AND finalized IS NULL AND created < ? RETURNING blob"
                ),
                (scope, key, version, abandon_before),
            )
            self._doom(cur, [row[0] for row in cur.fetchall()], now)
            if max_pending:
                cur.execute(
                    self._sql("SELECT count(*) FROM entries WHERE scope = ? AND finalized IS NULL AND created >= ?"),
                    (scope, abandon_before),
                )
                if int(cur.fetchone()[0]) >= max_pending:
                    raise TooManyPending(scope)
            cur.execute(
                self._sql(
                    "INSERT INTO entries (scope, key, version, blob, created, last_used) VALUES (?, ?, ?, ?, ?, ?)"
                    f" ON CONFLICT (scope, key, version) DO NOTHING RETURNING {_COLUMNS}"
                ),
                (scope, key, version, blob, now, now),
            )
            return _entry(cur.fetchone())

    def pending(self, scope: str, key: str, version: str) -> Entry | None:
        """The scope's unfinalized entry for key and version (v2 finalize names it so)."""
        with self._transaction() as cur:
            cur.execute(
                self._sql(
                    f"SELECT {_COLUMNS} FROM entries WHERE scope = ? AND key = ? AND version = ? AND finalized IS NULL"
                ),
                (scope, key, version),
            )
            return _entry(cur.fetchone())

    def get(self, scope: str, entry_id: int) -> Entry | None:
        """The scope's entry with this id (v1 names entries by id); another scope's id is None."""
        with self._transaction() as cur:
            cur.execute(self._sql(f"SELECT {_COLUMNS} FROM entries WHERE id = ? AND scope = ?"), (entry_id, scope))
            return _entry(cur.fetchone())

    def finalize(
        self, entry: Entry, size: int, now: float, quota: int, etag: str | None = None
    ) -> tuple[bool, list[str]]:
        """Mark the entry finalized with its size (and, when the guest may still write the blob,
        its ETag), then evict the scope's least recently used other entries (unleased) until the
        scope holds at most ``quota`` bytes.
        Returns (finalized, blobs to delete); False when the entry is gone or already finalized."""
        with self._transaction(scope_lock=entry.scope) as cur:
            cur.execute(
                self._sql(
                    "UPDATE entries SET finalized = ?, size = ?, last_used = ?, etag = ?"
                    " WHERE id = ? AND scope = ? AND finalized IS NULL RETURNING id"
                ),
                (now, size, now, etag, entry.id, entry.scope),
            )
            if cur.fetchone() is None:
                return False, []
            cur.execute(
                self._sql("SELECT coalesce(sum(size), 0) FROM entries WHERE scope = ? AND finalized IS NOT NULL"),
                (entry.scope,),
            )
            total = int(cur.fetchone()[0])
            doomed: list[str] = []
            if total > quota:
                cur.execute(
                    self._sql(
                        "SELECT id, size FROM entries WHERE scope = ? AND finalized IS NOT NULL AND id <> ?"
                        " AND leased_until < ? ORDER BY last_used, id"
                    ),
                    (entry.scope, entry.id, now),
                )
                victims = []
                for victim_id, victim_size in cur.fetchall():
                    if total <= quota:
                        break
                    victims.append(victim_id)
                    total -= victim_size
                for victim_id in victims:
                    # Re-checked in the statement: a lookup may have leased it since the SELECT.
                    cur.execute(
                        self._sql("DELETE FROM entries WHERE id = ? AND leased_until < ? RETURNING blob"),
                        (victim_id, now),
                    )
                    doomed += [row[0] for row in cur.fetchall()]
            self._doom(cur, doomed, now)
            return True, doomed

    def lookup(
        self, scope: str, key: str, restore_keys: Sequence[str], version: str, now: float, lease: float
    ) -> Entry | None:
        """The finalized entry the client should restore, touched and leased until ``now + lease``; None on a miss.

        One statement per key, each atomic on its own (no transaction around them: one round
        trip per key on PostgreSQL): the UPDATE re-checks the row its sub-select chose, so an
        entry removed in between is simply not answered."""
        touch = (
            "UPDATE entries SET last_used = ?, leased_until = ? WHERE finalized IS NOT NULL AND id = ({})"
            f" RETURNING {_COLUMNS}"
        )
        exact = touch.format(
            "SELECT id FROM entries WHERE scope = ? AND version = ? AND key = ? AND finalized IS NOT NULL"
        )
        prefix = touch.format(
            "SELECT id FROM entries WHERE scope = ? AND version = ? AND key >= ? AND key < ?"
            " AND substr(key, 1, length(?)) = ? AND finalized IS NOT NULL ORDER BY finalized DESC, id DESC LIMIT 1"
        )
        with self._statements() as cur:
            cur.execute(self._sql(exact), (now, now + lease, scope, version, key))
            found = _entry(cur.fetchone())
            for text in restore_keys:
                if found is not None:
                    break
                cur.execute(self._sql(prefix), (now, now + lease, scope, version, text, text + MAX_CHAR, text, text))
                found = _entry(cur.fetchone())
            return found

    def unverified(self, created_before: float) -> list[Entry]:
        """Finalized entries with an ETag to check, created before ``created_before``."""
        with self._transaction() as cur:
            cur.execute(
                self._sql(
                    f"SELECT {_COLUMNS} FROM entries WHERE etag IS NOT NULL AND finalized IS NOT NULL AND created < ?"
                ),
                (created_before,),
            )
            return [Entry(*row) for row in cur.fetchall()]

    def verified(self, entry: Entry) -> None:
        """The entry's blob is as finalized and can no longer change: nothing left to check."""
        with self._transaction() as cur:
            cur.execute(self._sql("UPDATE entries SET etag = NULL WHERE id = ?"), (entry.id,))

    def remove(self, entry: Entry, now: float) -> None:
        """Remove one entry (e.g. an upload that failed its checks); its blob joins the deletion queue."""
        with self._transaction() as cur:
            cur.execute(self._sql("DELETE FROM entries WHERE id = ? RETURNING blob"), (entry.id,))
            self._doom(cur, [row[0] for row in cur.fetchall()], now)

    def expire(self, now: float, unused_before: float, abandon_before: float) -> list[str]:
        """Remove finalized entries last used before ``unused_before`` and unfinalized ones created
        before ``abandon_before`` (leased ones stay). Returns every blob now waiting for deletion."""
        with self._transaction() as cur:
            cur.execute(
                self._sql(
                    "DELETE FROM entries WHERE leased_until < ? AND ((finalized IS NOT NULL AND last_used < ?)"
                    " OR (finalized IS NULL AND created < ?)) RETURNING blob"
                ),
                (now, unused_before, abandon_before),
            )
            self._doom(cur, [row[0] for row in cur.fetchall()], now)
            cur.execute(self._sql("SELECT blob FROM doomed_blobs ORDER BY since"))
            return [row[0] for row in cur.fetchall()]

    def forget(self, blobs: Sequence[str]) -> None:
        """The blobs are deleted from the store: drop them from the deletion queue."""
        if not blobs:
            return
        with self._transaction() as cur:
            for blob in blobs:
                cur.execute(self._sql("DELETE FROM doomed_blobs WHERE blob = ?"), (blob,))

    def usage(self, scope: str) -> tuple[int, int]:
        """(finalized entries, their bytes) of one scope."""
        with self._transaction() as cur:
            cur.execute(
                self._sql(
                    "SELECT count(*), coalesce(sum(size), 0) FROM entries WHERE scope = ? AND finalized IS NOT NULL"
                ),
                (scope,),
            )
            count, total = cur.fetchone()
            return int(count), int(total)

    def _doom(self, cur: _Cursor, blobs: Sequence[str], now: float) -> None:
        for blob in blobs:
            cur.execute(
                self._sql("INSERT INTO doomed_blobs (blob, since) VALUES (?, ?) ON CONFLICT DO NOTHING"), (blob, now)
            )


_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    version TEXT NOT NULL,
    blob TEXT NOT NULL UNIQUE,
    size INTEGER,
    created REAL NOT NULL,
    finalized REAL,
    last_used REAL NOT NULL,
    leased_until REAL NOT NULL DEFAULT 0,
    etag TEXT,
    UNIQUE (scope, key, version)
);
CREATE INDEX IF NOT EXISTS entries_lookup ON entries (scope, version, key);
CREATE INDEX IF NOT EXISTS entries_lru ON entries (scope, last_used);
CREATE TABLE IF NOT EXISTS doomed_blobs (blob TEXT PRIMARY KEY, since REAL NOT NULL);
"""


class SqliteIndex(CacheIndex):
    """The embedded default: ``cache-index.sqlite3`` under ``--state-dir``. WAL mode; every write
    transaction starts with BEGIN IMMEDIATE, so writers (threads or processes) are serialised
    by SQLite itself and each statement sees the rows the previous writer committed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            connection = self._connection()
            connection.executescript(_SQLITE_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise IndexError_(f"cannot open cache index {path}: {exc}") from None

    def _connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            # isolation_level=None: transactions are the explicit BEGIN IMMEDIATE below.
            connection = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            self._local.connection = connection
            with self._lock:
                self._connections.append(connection)
        return connection

    @contextmanager
    def _transaction(self, *, scope_lock: str | None = None) -> Iterator[sqlite3.Cursor]:
        # BEGIN IMMEDIATE takes the database's write lock: every transaction is serialised, scopes included.
        cur = self._connection().cursor()
        cur.execute("BEGIN IMMEDIATE")
        try:
            yield cur
        except BaseException:
            cur.execute("ROLLBACK")
            raise
        else:
            cur.execute("COMMIT")
        finally:
            cur.close()

    def _statements(self) -> Any:
        # Local calls cost no round trips: take the write lock up front, as every writer here does,
        # rather than upgrade a read lock inside the statement.
        return self._transaction()

    def close(self) -> None:
        with self._lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()


_POSTGRES_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id BIGSERIAL PRIMARY KEY,
    scope TEXT COLLATE "C" NOT NULL,
    key TEXT COLLATE "C" NOT NULL,
    version TEXT COLLATE "C" NOT NULL,
    blob TEXT NOT NULL UNIQUE,
    size BIGINT,
    created DOUBLE PRECISION NOT NULL,
    finalized DOUBLE PRECISION,
    last_used DOUBLE PRECISION NOT NULL,
    leased_until DOUBLE PRECISION NOT NULL DEFAULT 0,
    etag TEXT,
    UNIQUE (scope, key, version)
);
CREATE INDEX IF NOT EXISTS entries_lookup ON entries (scope, version, key);
CREATE INDEX IF NOT EXISTS entries_lru ON entries (scope, last_used);
CREATE TABLE IF NOT EXISTS doomed_blobs (blob TEXT PRIMARY KEY, since DOUBLE PRECISION NOT NULL);
"""


class PostgresIndex(CacheIndex):
    """The shared index for several control-plane replicas (``--database postgresql://...``), psycopg 3.

    READ COMMITTED: a concurrent duplicate insert waits for the first and then does nothing
    (ON CONFLICT); an UPDATE or DELETE re-checks its WHERE clause on the row's newest version,
    so a lease taken by one replica stops another replica's eviction of that row. Quota
    eviction takes a per-scope advisory lock so two finalizes of one scope do not both evict.
    """

    def __init__(self, url: str) -> None:
        try:
            import psycopg  # the optional `postgres` extra: only a control plane using PostgreSQL needs it
        except ImportError:
            raise IndexError_("--database needs psycopg: pip install 'metadata-proxy[postgres]'") from None
        self._psycopg = psycopg
        self.url = url
        self._local = threading.local()
        self._connections: list[Any] = []
        self._lock = threading.Lock()
        try:
            with self._connection().transaction():
                conn = self._connection()
                # Two replicas starting together must not race on CREATE TABLE IF NOT EXISTS.
                conn.execute("SELECT pg_advisory_xact_lock(7242013)")
                conn.execute(_POSTGRES_SCHEMA)
        except psycopg.Error as exc:
            raise IndexError_(f"cannot open cache index database: {str(exc).strip().splitlines()[0]}") from None

    def _connection(self) -> Any:
        connection = getattr(self._local, "connection", None)
        if connection is None or connection.closed:
            connection = self._psycopg.connect(self.url, autocommit=True)
            self._local.connection = connection
            with self._lock:
                self._connections.append(connection)
        return connection

    def _sql(self, statement: str) -> str:
        return statement.replace("?", "%s")

    @contextmanager
    def _transaction(self, *, scope_lock: str | None = None) -> Iterator[Any]:
        connection = self._connection()
        with connection.transaction(), connection.cursor() as cur:
            if scope_lock is not None:
                cur.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (scope_lock,))
            yield cur

    @contextmanager
    def _statements(self) -> Iterator[Any]:
        with self._connection().cursor() as cur:  # an autocommit connection: each statement commits
            yield cur

    def close(self) -> None:
        with self._lock:
            for connection in self._connections:
                connection.close()
            self._connections.clear()


def open_index(state_dir: Path | None, database: str | None) -> CacheIndex:
    """PostgreSQL when ``database`` is given, else SQLite under ``state_dir``."""
    if database:
        return PostgresIndex(database)
    if state_dir is None:
        raise IndexError_("the cache needs --state-dir DIR or --database URL")
    return SqliteIndex(state_dir / "cache-index.sqlite3")
