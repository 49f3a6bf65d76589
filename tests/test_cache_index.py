"""The cache's entry index: the same tests against SQLite (a file under a temp dir) and a real
PostgreSQL server this module starts (tests/cache_harness.py). Times come from the tests (an
injected clock), never from the wall."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from controlplane.cache_index import CacheIndex, Entry, PostgresIndex, SqliteIndex, TooManyPending
from tests.cache_harness import Postgres, postgres

__all__ = ["postgres"]  # the session fixture, imported for pytest

T0 = 1_800_000_000.0
LEASE = 600.0
NEVER = float("-inf")


@pytest.fixture(params=["sqlite", "postgresql"])
def make_index(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], CacheIndex]]:
    """A factory of index handles on one fresh database: each handle plays one control-plane replica."""
    opened: list[CacheIndex] = []
    if request.param == "sqlite":
        path = tmp_path / "index.sqlite3"

        def make() -> CacheIndex:
            opened.append(SqliteIndex(path))
            return opened[-1]
    else:
        server: Postgres = request.getfixturevalue("postgres")
        database = f"t{uuid.uuid4().hex[:12]}"
        admin = PostgresIndex(server.url)  # creates the schema in `postgres`; used to make a fresh database
        with admin._connection().cursor() as cur:
            cur.execute(f"CREATE DATABASE {database}")
        admin.close()
        url = server.url.replace("/postgres?", f"/{database}?")

        def make() -> CacheIndex:
            opened.append(PostgresIndex(url))
            return opened[-1]

    yield make
    for index in opened:
        index.close()


@pytest.fixture
def index(make_index: Callable[[], CacheIndex]) -> CacheIndex:
    return make_index()


def finalized(index: CacheIndex, scope: str, key: str, size: int, at: float, version: str = "v") -> Entry:
    entry = index.create(scope, key, version, f"blob-{scope}-{key}-{version}", at, NEVER)
    assert entry is not None
    done, _ = index.finalize(entry, size, at, 10**12)
    assert done
    return entry


def test_exact_then_restore_prefixes_newest_first(index: CacheIndex) -> None:
    finalized(index, "s", "deps-a", 1, T0)
    finalized(index, "s", "deps-b", 1, T0 + 1)
    finalized(index, "s", "deps-c", 1, T0 + 2, version="other")
    finalized(index, "s", "build-x", 1, T0 + 3)
    found = index.lookup("s", "deps-a", ["build-"], "v", T0 + 10, LEASE)
    assert found is not None and found.key == "deps-a"  # exact beats a newer prefix match
    found = index.lookup("s", "deps-z", ["nothing-", "deps-", "build-"], "v", T0 + 10, LEASE)
    assert found is not None and found.key == "deps-b"  # the first restore key that matches, newest (of version v)
    assert index.lookup("s", "deps", [], "v", T0 + 10, LEASE) is None  # the primary key is exact only
    assert index.lookup("s", "zzz", ["deps-a-longer"], "v", T0 + 10, LEASE) is None
    # Prefixes are literal: no LIKE wildcards, and code points above the BMP work.
    finalized(index, "s", "we%ird_\U0001f600", 1, T0 + 4)
    assert index.lookup("s", "q", ["we%"], "v", T0 + 10, LEASE) is not None
    assert index.lookup("s", "q", ["w_"], "v", T0 + 10, LEASE) is None


def test_scopes_never_see_each_other(index: CacheIndex) -> None:
    entry = finalized(index, "team-a", "k", 1, T0)
    assert index.lookup("team-b", "k", ["k"], "v", T0, LEASE) is None
    assert index.get("team-b", entry.id) is None
    assert index.get("team-a", entry.id) is not None
    other = index.create("team-b", "k", "v", "blob-b", T0, NEVER)  # the same key is free in another scope
    assert other is not None and other.id != entry.id


def test_unfinalized_entries_are_invisible(index: CacheIndex) -> None:
    entry = index.create("s", "k", "v", "blob-1", T0, NEVER)
    assert entry is not None
    assert index.lookup("s", "k", ["k"], "v", T0, LEASE) is None
    assert index.pending("s", "k", "v") == entry
    assert index.finalize(entry, 5, T0 + 1, 10**12)[0] is True
    assert index.finalize(entry, 5, T0 + 1, 10**12)[0] is False  # once only
    assert index.pending("s", "k", "v") is None
    found = index.lookup("s", "k", [], "v", T0 + 2, LEASE)
    assert found is not None and found.size == 5 and found.last_used == T0 + 2


def test_duplicate_create_refused_abandoned_one_replaced(index: CacheIndex) -> None:
    assert index.create("s", "k", "v", "blob-1", T0, T0 - 1800) is not None
    assert index.create("s", "k", "v", "blob-2", T0 + 60, T0 + 60 - 1800) is None
    # 30 minutes later the first upload counts as abandoned: a new create replaces it, its blob is doomed.
    replaced = index.create("s", "k", "v", "blob-3", T0 + 1801, T0 + 1)
    assert replaced is not None and replaced.blob == "blob-3"
    assert index.expire(T0 + 1801, NEVER, NEVER) == ["blob-1"]
    index.forget(["blob-1"])
    assert index.expire(T0 + 1801, NEVER, NEVER) == []


def test_lru_eviction_within_the_scope_only(index: CacheIndex) -> None:
    finalized(index, "s", "old", 400, T0)
    finalized(index, "s", "used", 400, T0 + 1)
    finalized(index, "elsewhere", "x", 900, T0)
    assert index.lookup("s", "used", [], "v", T0 + 2, 0) is not None  # touched: now the most recently used
    entry = index.create("s", "new", "v", "blob-new", T0 + 3, NEVER)
    assert entry is not None
    done, doomed = index.finalize(entry, 400, T0 + 3, 1000)
    assert done and doomed == ["blob-s-old-v"]
    assert index.usage("s") == (2, 800)
    assert index.usage("elsewhere") == (1, 900)  # another scope's bytes are not this scope's quota
    assert "blob-s-old-v" in index.expire(T0 + 4, NEVER, NEVER)


def test_eviction_and_expiry_spare_a_leased_entry(index: CacheIndex) -> None:
    finalized(index, "s", "leased", 400, T0)
    finalized(index, "s", "idle", 400, T0 + 1)
    assert index.lookup("s", "leased", [], "v", T0 + 2, LEASE) is not None  # a URL handed out until T0 + 602
    index.lookup("s", "idle", [], "v", T0 + 3, 0)  # used later than "leased", but not leased
    entry = index.create("s", "new", "v", "blob-new", T0 + 4, NEVER)
    assert entry is not None
    done, doomed = index.finalize(entry, 700, T0 + 4, 1000)
    assert done and doomed == ["blob-s-idle-v"]  # the leased one stays though the quota is still exceeded
    assert index.usage("s") == (2, 1100)
    # Expiry: unused for 7 days, but leased: stays; after the lease, goes.
    week = 7 * 86400
    assert "blob-s-leased-v" not in index.expire(T0 + 100, T0 + 100 + week, NEVER)
    assert "blob-s-leased-v" in index.expire(T0 + 700, T0 + 700 - 0.5 + week, NEVER)


def test_expiry_of_unused_and_abandoned(index: CacheIndex) -> None:
    finalized(index, "s", "stale", 1, T0)
    finalized(index, "s", "fresh", 1, T0 + 86400)
    assert index.create("s", "abandoned", "v", "blob-abandoned", T0, NEVER) is not None
    assert index.create("s", "uploading", "v", "blob-uploading", T0 + 7 * 86400, NEVER) is not None
    now = T0 + 7 * 86400 + 60
    doomed = index.expire(now, now - 7 * 86400, now - 1800)
    assert sorted(doomed) == ["blob-abandoned", "blob-s-stale-v"]
    assert index.lookup("s", "stale", [], "v", now, 0) is None
    assert index.lookup("s", "fresh", [], "v", now, 0) is not None
    assert index.pending("s", "uploading", "v") is not None


def test_concurrent_duplicate_creates_across_replicas(make_index: Callable[[], CacheIndex]) -> None:
    """Eight replicas (their own connections) race to create one key, 5 rounds: exactly one wins each."""
    replicas = [make_index() for _ in range(8)]
    barrier = threading.Barrier(len(replicas))
    wins: dict[int, list[Entry]] = {round_: [] for round_ in range(5)}
    errors: list[BaseException] = []

    def attempt(replica: CacheIndex, n: int) -> None:
        try:
            for round_ in range(5):
                barrier.wait(timeout=10)
                entry = replica.create("s", f"race-{round_}", "v", f"blob-{round_}-{n}", T0, NEVER)
                if entry is not None:
                    wins[round_].append(entry)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=attempt, args=(r, n)) for n, r in enumerate(replicas)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert [len(won) for won in wins.values()] == [1] * 5


def test_eviction_never_takes_an_entry_being_handed_out(make_index: Callable[[], CacheIndex]) -> None:
    """One replica hands out URLs for an entry while another finalizes entries that push the scope
    over its quota: every entry a lookup returned is still in the index afterwards (leased), so the
    URL names a blob that exists; evictions only take entries no lookup returned."""
    reader, writer = make_index(), make_index()
    for n in range(20):
        finalized(reader, "s", f"e{n:02d}", 100, T0 + n)
    handed_out: set[str] = set()
    started, stop = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def read() -> None:
        try:
            n = 0
            while not stop.is_set() and n < 2000:
                found = reader.lookup("s", f"e{n % 20:02d}", [], "v", T0 + 100, LEASE)
                if found is not None:
                    handed_out.add(found.blob)
                    started.set()
                n += 1
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    thread = threading.Thread(target=read)
    thread.start()
    assert started.wait(timeout=30)
    doomed: list[str] = []
    for n in range(20):
        entry = writer.create("s", f"new{n:02d}", "v", f"blob-new-{n}", T0 + 100, NEVER)
        assert entry is not None
        doomed += writer.finalize(entry, 100, T0 + 100, 1000)[1]
    stop.set()
    thread.join(timeout=60)
    assert errors == []
    assert handed_out and doomed
    assert not (handed_out & set(doomed))


def test_uploads_in_progress_are_bounded_per_scope(index: CacheIndex) -> None:
    for n in range(3):
        assert index.create("s", f"p{n}", "v", f"blob-p{n}", T0, T0 - 1800, max_pending=3) is not None
    with pytest.raises(TooManyPending):
        index.create("s", "p3", "v", "blob-p3", T0, T0 - 1800, max_pending=3)
    assert index.create("elsewhere", "p3", "v", "blob-e3", T0, T0 - 1800, max_pending=3) is not None
    # Abandoned uploads no longer count.
    assert index.create("s", "p3", "v", "blob-p3", T0 + 1801, T0 + 1, max_pending=3) is not None


def test_entries_to_verify_after_the_write_url_expires(index: CacheIndex) -> None:
    guest_wrote = index.create("s", "v2", "v", "blob-v2", T0, NEVER)
    chunks = index.create("s", "v1", "v", "blob-v1", T0, NEVER)
    assert guest_wrote is not None and chunks is not None
    index.finalize(guest_wrote, 5, T0 + 1, 10**12, etag='"0x1"')
    index.finalize(chunks, 5, T0 + 1, 10**12)
    assert index.unverified(T0) == []  # created at T0: its write URL may still be valid
    [pending] = index.unverified(T0 + LEASE)
    assert pending.blob == "blob-v2" and pending.etag == '"0x1"' and pending.size == 5
    index.verified(pending)
    assert index.unverified(T0 + LEASE) == []
