"""The proxy's view of the registry (`metadata_proxy.registry.Registry`) against real SQLite
files written by hostagent's store: every change seen exactly, read incrementally where the
file's history allows it and in full where it does not.

An incremental read keeps the VM objects of VMs it did not touch; a full read builds every
one anew. That is how these tests tell the two apart without looking inside.
"""

from __future__ import annotations

import functools
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from controlplane.tokens import mint
from hostagent.store import Access, Entry, Store, make_entry
from metadata_proxy.registry import VM, Registry, RegistryUnavailable

SECRET = (None, b"s" * 32)


@functools.cache
def token(sub: str) -> str:
    """One token per VM id: an entry made twice is the same entry, whenever the clock ticks."""
    return mint(sub, SECRET, lifetime=3600)


def entry(name: str, *addresses: str, sub: str | None = None) -> Entry:
    return make_entry(name, list(addresses), token(sub or f"id-{name}"))


def truth(path: Path) -> dict[str, VM]:
    """What a fresh reader sees: the truth an incremental snapshot must equal."""
    fresh = Registry(str(path))
    fresh.refresh()
    return dict(fresh.by_address())


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "registry.sqlite3"


@pytest.fixture
def store(path: Path) -> Store:
    return Store(str(path), Access(None))


@pytest.fixture
def reader(path: Path, store: Store) -> Iterator[Registry]:
    store.sync([entry("a", "10.0.0.1", "fd00::1"), entry("b", "10.0.0.2"), entry("c", "10.0.0.3")])
    registry = Registry(str(path))
    assert registry.refresh()
    yield registry
    registry.close()


def same_objects(registry: Registry, before: dict[str, VM], names: list[str]) -> bool:
    now = registry.by_name()
    return all(now[name] is before[name] for name in names)


def test_add_replace_remove_are_read_exactly(path: Path, store: Store, reader: Registry) -> None:
    steps: list[Callable[[], object]] = [
        lambda: store.add(entry("d", "10.0.0.4")),
        lambda: store.add(entry("a", "10.0.0.1", "fd00::1", sub="id-a-rotated"), replace=True),  # token only
        lambda: store.add(entry("b", "10.0.0.12"), replace=True),  # a new address
        lambda: store.remove("c"),
    ]
    first, seen = dict(reader.by_name()), []
    for step in steps:
        generation, known = reader.generation, reader.by_address()
        step()
        assert reader.refresh()
        assert dict(reader.by_address()) == truth(path)
        seen.append((reader.changed_since(generation), known))
    assert reader.by_name()["d"].vm_id == "id-d"
    assert reader.lookup("10.0.0.1") == reader.lookup("fd00::1") and reader.by_name()["a"].vm_id == "id-a-rotated"
    assert reader.lookup("10.0.0.2") is None and reader.lookup("10.0.0.12") == reader.by_name()["b"]
    assert reader.lookup("10.0.0.3") is None and "c" not in reader.by_name()
    # What each change replaced or removed, as it was: an addition leaves nothing stale.
    assert [changed for changed, _ in seen] == [{}, {"a": first["a"]}, {"b": first["b"]}, {"c": first["c"]}]
    # The dicts handed out before a change are left as they were: the app compares them with the new ones.
    assert seen[3][1]["10.0.0.3"].name == "c" and "10.0.0.12" not in seen[2][1]
    assert not reader.refresh()  # nothing new


def test_a_change_is_read_incrementally(path: Path, store: Store, reader: Registry) -> None:
    before = dict(reader.by_name())
    store.add(entry("d", "10.0.0.4"))
    store.remove("c")
    store.add(entry("b", "10.0.0.2", sub="id-b-rotated"), replace=True)
    assert reader.refresh()
    assert same_objects(reader, before, ["a"])  # untouched: the very object of the first load
    assert dict(reader.by_address()) == truth(path)


def test_sync_that_adds_replaces_removes_and_moves_addresses(path: Path, store: Store, reader: Registry) -> None:
    before, generation = dict(reader.by_name()), reader.generation
    # b and c swap addresses, a is removed, its IPv4 address goes to a new VM, d is new.
    result = store.sync(
        [
            entry("b", "10.0.0.3"),
            entry("c", "10.0.0.2"),
            entry("e", "10.0.0.1"),
            entry("d", "10.0.0.4", "fd00::4"),
        ]
    )
    assert (result.added, result.replaced, result.removed) == (["e", "d"], ["b", "c"], ["a"])
    assert reader.refresh()
    assert dict(reader.by_address()) == truth(path)
    assert reader.lookup("10.0.0.1") == reader.by_name()["e"]  # never a's old token
    assert reader.lookup("fd00::1") is None
    assert (reader.lookup("10.0.0.2"), reader.lookup("10.0.0.3")) == (reader.by_name()["c"], reader.by_name()["b"])
    assert reader.changed_since(generation) == {"a": before["a"], "b": before["b"], "c": before["c"]}
    assert [vm.name for vm in reader.vms] == ["b", "c", "d", "e"]
    assert before["a"].addresses == ("10.0.0.1", "fd00::1")


def test_removed_then_added_again_between_two_reads(path: Path, store: Store, reader: Registry) -> None:
    before, generation = dict(reader.by_name()), reader.generation
    store.remove("b")
    store.add(entry("b", "10.0.0.22", sub="id-b-new"))
    store.add(entry("x", "10.0.0.2"))  # b's old address, handed on
    store.remove("c")
    store.add(entry("c", "10.0.0.3"))  # exactly as it was
    assert reader.refresh()
    assert dict(reader.by_address()) == truth(path)
    assert reader.lookup("10.0.0.2") == reader.by_name()["x"]
    assert reader.by_name()["b"].vm_id == "id-b-new"
    assert reader.changed_since(generation) == {"b": before["b"]}  # c is back as it was: nothing changed


def test_no_change_no_generation(path: Path, store: Store, reader: Registry) -> None:
    generation = reader.generation
    assert store.add(entry("a", "10.0.0.1", "fd00::1")) == "unchanged"
    os.utime(path)  # touched: a read, nothing different
    assert not reader.refresh()
    assert reader.generation == generation and reader.changed_since(generation) == {}


def test_a_change_that_is_not_hostagents_is_read_in_full(path: Path, store: Store, reader: Registry) -> None:
    """The file changed but its sequence did not: whatever did that, a full read shows it."""
    before = dict(reader.by_name())
    conn = sqlite3.connect(path)
    conn.execute("UPDATE vms SET vm_id = 'edited' WHERE name = 'a'")
    conn.commit()
    conn.close()
    assert reader.refresh()
    assert reader.by_name()["a"].vm_id == "edited"
    assert reader.by_name()["b"] == before["b"] and reader.by_name()["b"] is not before["b"]


def test_a_fresh_file_renamed_into_place_is_read_in_full(path: Path, store: Store, reader: Registry) -> None:
    # The new file's history is further along than the old one's: its sequence alone would mislead.
    other = path.with_name("rebuilt.sqlite3")
    rebuilt = Store(str(other), Access(None))
    for i in range(6):
        rebuilt.add(entry(f"n{i}", f"10.0.1.{i}"))
    rebuilt.add(entry("a", "10.0.0.9", sub="id-a-rebuilt"))
    before, generation = dict(reader.by_name()), reader.generation
    os.replace(other, path)
    assert reader.refresh()
    assert dict(reader.by_address()) == truth(path)
    assert reader.lookup("10.0.0.1") is None and reader.lookup("10.0.0.2") is None
    assert reader.by_name()["a"].vm_id == "id-a-rebuilt" and reader.lookup("10.0.0.9") == reader.by_name()["a"]
    assert reader.changed_since(generation) == before  # a replaced, b and c gone
    store.add(entry("z", "10.0.0.26"))  # and it is followed incrementally from there
    kept = dict(reader.by_name())
    assert reader.refresh()
    assert same_objects(reader, kept, ["a", "n0"]) and reader.lookup("10.0.0.26") == reader.by_name()["z"]


def test_pruned_tombstones_mean_a_full_read(path: Path, reader: Registry) -> None:
    store = Store(str(path), Access(None), tombstone_window=2)
    store.add(entry("d", "10.0.0.4"))
    assert reader.refresh()
    before = dict(reader.by_name())
    store.remove("b")  # write 3; with a window of 2 its tombstone goes at write 5
    store.add(entry("e", "10.0.0.5"))
    store.add(entry("f", "10.0.0.6"))
    store.add(entry("g", "10.0.0.7"))
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    tombstones = conn.execute("SELECT count(*) FROM removed").fetchone()[0]
    meta = conn.execute("SELECT seq, pruned FROM meta").fetchone()
    conn.close()
    assert tombstones == 0 and meta == (6, 3)
    assert reader.refresh()
    assert reader.lookup("10.0.0.2") is None and "b" not in reader.by_name()  # b's removal was not missed
    assert dict(reader.by_address()) == truth(path)
    assert reader.by_name()["a"] == before["a"] and reader.by_name()["a"] is not before["a"]  # read in full


def test_a_version_1_file_is_read_and_upgraded_by_the_next_write(path: Path) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(V1_SCHEMA)
    conn.execute("INSERT INTO vms VALUES ('old', 'id-old', ?, NULL, NULL, 1)", (token("id-old"),))
    conn.execute("INSERT INTO addresses VALUES ('10.0.0.1', 'old')")
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    reader = Registry(str(path))
    assert reader.lookup("10.0.0.1") == VM("old", "id-old", reader.by_name()["old"].token, None, None, ("10.0.0.1",))

    store = Store(str(path), Access(None))
    bytes_before = path.read_bytes()
    with pytest.raises(Exception, match="held by VM old"):
        store.add(entry("new", "10.0.0.1"))
    assert path.read_bytes() == bytes_before  # a failed command upgrades nothing either
    assert store.add(entry("new", "10.0.0.2")) == "added"
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    seqs = dict(conn.execute("SELECT name, seq FROM vms"))
    meta = conn.execute("SELECT seq, pruned FROM meta").fetchone()
    conn.close()
    assert version == 2 and seqs == {"old": 0, "new": 1} and meta == (1, 0)
    assert reader.refresh()
    assert reader.lookup("10.0.0.2") == reader.by_name()["new"] and reader.lookup("10.0.0.1") is not None
    store.remove("old")
    assert reader.refresh() and reader.lookup("10.0.0.1") is None
    assert dict(reader.by_address()) == truth(path)


# Written out here, not taken from registry.py: an old file is frozen in time, whatever
# the module's own copy of the v1 statements becomes.
V1_SCHEMA = """
CREATE TABLE vms (
    name       TEXT PRIMARY KEY,
    vm_id      TEXT NOT NULL,
    token      TEXT NOT NULL,
    token_exp  INTEGER,
    netns      TEXT,
    updated_at INTEGER NOT NULL
);
CREATE TABLE addresses (
    address TEXT PRIMARY KEY,
    name    TEXT NOT NULL REFERENCES vms(name) ON DELETE CASCADE
);
CREATE INDEX addresses_by_name ON addresses(name);
"""


@pytest.mark.parametrize("damage", ["garbage", "truncated", "directory", "schema"])
def test_damage_fails_closed_then_recovers(path: Path, store: Store, reader: Registry, damage: str) -> None:
    before, generation = dict(reader.by_name()), reader.generation
    if damage == "garbage":
        with open(path, "r+b") as f:
            f.write(b"garbage!" * 512)
    elif damage == "truncated":
        os.truncate(path, path.stat().st_size // 2)
    elif damage == "directory":
        path.unlink()
        path.mkdir()
    else:
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA user_version = 9")
        conn.commit()
        conn.close()
    with pytest.raises(RegistryUnavailable):
        reader.lookup("10.0.0.1")
    assert reader.error is not None and reader.vms == () and dict(reader.by_address()) == {}
    with pytest.raises(RegistryUnavailable):  # and it stays so, however often asked
        reader.refresh()

    if damage == "directory":
        path.rmdir()
    else:
        path.unlink()
    store.sync([entry("a", "10.0.0.1", "fd00::1"), entry("b", "10.0.0.20")])
    assert reader.refresh()
    assert reader.error is None and dict(reader.by_address()) == truth(path)
    # Compared with the last good snapshot, which is what the app saw before the damage.
    assert reader.changed_since(generation) == {"b": before["b"], "c": before["c"]}


def test_damage_in_the_middle_of_the_file_is_noticed(path: Path, store: Store, reader: Registry) -> None:
    size = path.stat().st_size
    with open(path, "r+b") as f:  # every page but the first: the header says nothing
        f.seek(4096)
        f.write(b"\xff" * (size - 4096))
    with pytest.raises(RegistryUnavailable):
        reader.refresh()


def test_a_missing_file_is_an_empty_registry(path: Path, store: Store, reader: Registry) -> None:
    before, generation = dict(reader.by_name()), reader.generation
    path.unlink()
    assert reader.refresh()
    assert reader.error is None and reader.vms == () and reader.lookup("10.0.0.1") is None
    assert reader.changed_since(generation) == before
    store.add(entry("a", "10.0.0.1"))
    assert reader.refresh() and reader.lookup("10.0.0.1") == reader.by_name()["a"]


def test_changed_since_answers_only_for_its_own_recent_generations(store: Store, reader: Registry, path: Path) -> None:
    first, generation = dict(reader.by_name()), reader.generation
    store.add(entry("a", "10.0.0.1", "fd00::1", sub="id-a-2"), replace=True)
    reader.refresh()
    store.add(entry("a", "10.0.0.11", sub="id-a-3"), replace=True)
    reader.refresh()
    store.add(entry("n", "10.0.0.5"))
    reader.refresh()
    store.remove("b")
    reader.refresh()
    assert reader.changed_since(generation) == {"a": first["a"], "b": first["b"]}  # each as it was then
    other = Registry(str(path))
    other.refresh()
    assert other.generation > reader.generation  # a replacement Registry never reuses a generation
    assert other.changed_since(reader.generation) is None  # not one of its own: compare everything
    for i in range(20):
        store.add(entry(f"m{i}", f"10.0.3.{i}"))
        reader.refresh()
    assert reader.changed_since(generation) is None  # too far back
    other.close()


def test_a_sync_that_rewrote_most_vms_is_read_in_full(path: Path, store: Store, reader: Registry) -> None:
    many = [entry(f"n{i:04d}", f"10.1.{i >> 8}.{i & 255}") for i in range(1200)]
    store.sync([entry("a", "10.0.0.1", "fd00::1"), *many])
    assert reader.refresh()
    before, generation = dict(reader.by_name()), reader.generation
    store.sync([entry("a", "10.0.0.1", "fd00::1"), *(entry(e.name, f"10.2.{e.addresses[0][5:]}") for e in many)])
    assert reader.refresh()
    assert dict(reader.by_address()) == truth(path)
    assert reader.by_name()["a"] == before["a"] and reader.by_name()["a"] is not before["a"]  # read in full
    assert reader.changed_since(generation) == {e.name: before[e.name] for e in many}  # a did not change
