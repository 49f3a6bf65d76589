"""The change feed, as a property (issue 16): over random sequences of `hostagent` writes
(add, replace, remove, sync) with a small tombstone window, a proxy-side `Registry` that
follows the file incrementally holds exactly what a full read of the file holds, and what
the store says is registered. A wrong answer here attaches one VM's token to another's
requests, so the incremental path must be taken, and is counted."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from controlplane.tokens import mint
from hostagent.errors import Conflict
from hostagent.store import Access, Store, make_entry
from metadata_proxy import registry as registry_module
from metadata_proxy.registry import Registry

NAMES = [f"vm{i}" for i in range(5)]
ADDRESSES = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "fd00::1", "fd00::2", "10.0.0.4"]
SECRET = (None, b"p" * 32)
# One token per (name, variant): a token is never registered under two names.
TOKENS = {
    (name, variant): mint(f"id-{name}-{variant}", SECRET, lifetime=86400) for name in NAMES for variant in range(3)
}

_name = st.sampled_from(NAMES)
_addresses = st.lists(st.sampled_from(ADDRESSES), min_size=1, max_size=2, unique=True).filter(
    lambda addresses: len({":" in a for a in addresses}) == len(addresses)  # at most one per family
)
_variant = st.integers(0, 2)
_add = st.tuples(st.just("add"), _name, _addresses, _variant)
_remove = st.tuples(st.just("remove"), _name)
_sync = st.tuples(st.just("sync"), st.lists(st.tuples(_name, _addresses, _variant), max_size=5))
_check = st.tuples(st.just("check"))
OPERATIONS = st.lists(st.one_of(_add, _add, _remove, _remove, _sync, _check), max_size=40)


def _apply(store: Store, operation: tuple[object, ...]) -> None:
    kind = operation[0]
    if kind == "add":
        _, name, addresses, variant = operation
        entry = make_entry(name, addresses, TOKENS[(name, variant)])  # type: ignore[index, arg-type]
        try:
            store.add(entry, replace=True)
        except Conflict:  # an address held by another VM: refused, nothing written
            pass
    elif kind == "remove":
        store.remove(operation[1])  # type: ignore[arg-type]
    elif kind == "sync":
        wanted: dict[str, tuple[list[str], int]] = {}
        taken: set[str] = set()
        for name, addresses, variant in operation[1]:  # type: ignore[attr-defined]
            if name not in wanted and not taken & set(addresses):
                wanted[name] = (addresses, variant)
                taken |= set(addresses)
        store.sync([make_entry(name, a, TOKENS[(name, v)]) for name, (a, v) in wanted.items()])


def _agree(follower: Registry, path: Path, store: Store) -> None:
    follower.refresh()
    full = Registry(str(path))
    try:
        full.refresh()
        assert dict(follower.by_name()) == dict(full.by_name())
        assert dict(follower.by_address()) == dict(full.by_address())
        assert list(follower.vms) == store.vms()
        for address in ADDRESSES:
            assert follower.lookup(address, refresh=False) == full.lookup(address, refresh=False)
    finally:
        full.close()


@pytest.fixture
def incremental_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many refreshes read only what changed (a spy on the real function)."""
    calls: list[int] = []
    real: Callable[..., object] = registry_module.read_since  # type: ignore[attr-defined]

    def counted(conn: object, seq: int) -> object:
        calls.append(seq)
        return real(conn, seq)

    monkeypatch.setattr(registry_module, "read_since", counted)
    return calls


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(operations=OPERATIONS, window=st.integers(1, 4))
# A reader left behind the pruned tombstones: it must read everything, not follow the feed.
@example(
    operations=[("add", "vm0", ["10.0.0.1"], 0), ("check",), ("remove", "vm0"), ("add", "vm1", ["10.0.0.2"], 0)]
    + [("add", "vm2", ["10.0.0.3"], v) for v in (0, 1, 2)],
    window=1,
)
# An address passing from one VM to another within one sync, the reader following.
@example(
    operations=[("sync", [("vm0", ["10.0.0.1"], 0), ("vm1", ["10.0.0.2"], 0)]), ("check",)]
    + [("sync", [("vm0", ["10.0.0.2"], 1), ("vm1", ["10.0.0.1"], 1)])],
    window=4,
)
def test_an_incremental_read_always_equals_a_full_read(
    incremental_reads: list[int], operations: list[tuple[object, ...]], window: int
) -> None:
    with tempfile.TemporaryDirectory(prefix="mp-feed-") as directory:
        path = Path(directory) / "registry.sqlite3"
        store = Store(str(path), Access(None), tombstone_window=window)
        follower = Registry(str(path))
        try:
            for operation in operations:
                if operation[0] == "check":
                    _agree(follower, path, store)
                else:
                    _apply(store, operation)
            _agree(follower, path, store)
        finally:
            follower.close()


def test_the_property_takes_the_incremental_path(incremental_reads: list[int], tmp_path: Path) -> None:
    # The property above is only worth something if following the feed is what it checks.
    path = tmp_path / "registry.sqlite3"
    store = Store(str(path), Access(None), tombstone_window=2)
    follower = Registry(str(path))
    try:
        store.add(make_entry("vm0", ["10.0.0.1"], TOKENS[("vm0", 0)]))
        _agree(follower, path, store)  # the first read is a full one
        store.add(make_entry("vm1", ["10.0.0.2"], TOKENS[("vm1", 0)]))
        store.remove("vm0")
        _agree(follower, path, store)
        assert len(incremental_reads) == 1
        for _ in range(3):  # more transactions than the window: vm1's tombstone is pruned
            store.add(make_entry("vm2", ["10.0.0.3"], TOKENS[("vm2", 0)]))
            store.remove("vm2")
        store.remove("vm1")
        store.add(make_entry("vm3", ["10.0.0.4"], TOKENS[("vm3", 0)]))
        _agree(follower, path, store)  # behind the pruned horizon: a full read, still right
        assert len(incremental_reads) == 1
        assert [vm.name for vm in follower.vms] == ["vm3"]
    finally:
        follower.close()
