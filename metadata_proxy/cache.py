"""The per-VM response cache for GETs the control plane marks `Cache-Control: max-age=N`,
and the calls in flight that identical misses wait for.

An entry is keyed by (VM name, request target) and never served to another VM; the app
drops a VM's entries when its token changes or it is removed. Bounded twice: entries per
VM (the VM's oldest goes first) and bytes across all VMs (the least recently used goes
first), both with cachetools' LRU bookkeeping. An entry whose answer said
`stale-if-error=S` (RFC 5861) stays past its freshness for S more seconds (capped by
`[cache] stale_if_error_max`), within the same bounds, for `get_stale` to serve when the
control plane fails.

`Flights` are the GETs in flight to the control plane, per (VM, target): an identical miss
waits for the one in flight instead of calling again. A target whose answer was not
cacheable a moment ago (a long-poll, a `no-store` answer) is not waited for: its next
identical GET would only wait to call again itself (Varnish's "hit-for-miss").
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

from cachetools import LRUCache

Key = tuple[str, bytes]
# A response larger than this is streamed, never cached.
MAX_CACHED_BODY = 1024 * 1024
_ENTRY_OVERHEAD = 512  # bookkeeping bytes counted per entry besides headers and body


@dataclass(frozen=True, slots=True)
class Entry:
    status: int
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    stored: float
    max_age: int
    stale_if_error: float = 0.0  # seconds past max_age it may still be served when a call fails
    key_size: int = 0  # the bytes of its target, the key: the guest chooses it, up to a whole head

    @property
    def size(self) -> int:
        headers = sum(len(name) + len(value) for name, value in self.headers)
        return _ENTRY_OVERHEAD + self.key_size + len(self.body) + headers


def cacheable_max_age(status: int, headers: Sequence[tuple[bytes, bytes]]) -> int | None:
    """max-age when a GET answer may be cached (200, no Vary, no no-store/no-cache), else None."""
    lifetime = freshness(status, headers)
    return lifetime[0] if lifetime else None


def freshness(status: int, headers: Sequence[tuple[bytes, bytes]]) -> tuple[int, int] | None:
    """(max-age, stale-if-error) when a GET answer may be cached, else None.

    Cacheable: 200, no Vary, no no-store/no-cache, max-age > 0. stale-if-error (RFC 5861)
    is 0 when absent or malformed; the caller caps it.
    """
    if status != 200:
        return None
    max_age: int | None = None
    stale = 0
    for name, value in headers:
        if name == b"vary":
            return None
        if name != b"cache-control":
            continue
        for directive in value.lower().split(b","):
            key, _, argument = directive.strip().partition(b"=")
            if key in (b"no-store", b"no-cache"):
                return None
            if key == b"max-age":
                if not argument.isdigit():
                    return None
                max_age = int(argument)
            elif key == b"stale-if-error" and argument.isdigit():
                stale = int(argument)
    return (max_age, stale) if max_age else None


class _LRU(LRUCache[Key, Entry]):
    """cachetools' LRU that tells its owner what it evicted for space."""

    def __init__(self, maxsize: int, on_evict: Callable[[Key], None]) -> None:
        super().__init__(maxsize, getsizeof=lambda entry: entry.size)
        self._on_evict = on_evict

    def popitem(self) -> tuple[Key, Entry]:
        key, entry = super().popitem()
        self._on_evict(key)
        return key, entry


class ResponseCache:
    def __init__(self, max_entries_per_vm: int, max_bytes: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries_per_vm = max_entries_per_vm
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries = _LRU(max(max_bytes, 1), self._forget)
        self._per_vm: dict[str, OrderedDict[bytes, None]] = {}
        self.enabled = max_entries_per_vm > 0 and max_bytes > 0

    def _forget(self, key: Key) -> None:
        targets = self._per_vm.get(key[0])
        if targets is not None:
            targets.pop(key[1], None)
            if not targets:
                del self._per_vm[key[0]]

    def get(self, vm: str, target: bytes) -> tuple[Entry, int] | None:
        """A fresh entry and its age in whole seconds, or None."""
        targets = self._per_vm.get(vm)
        if targets is None or target not in targets:
            return None  # the usual answer, on every GET: without a further call
        return self._lookup(vm, target, stale=False)

    def get_stale(self, vm: str, target: bytes) -> tuple[Entry, int] | None:
        """An entry still within its stale-if-error window, and its age: for a failed call only."""
        return self._lookup(vm, target, stale=True)

    def _lookup(self, vm: str, target: bytes, stale: bool) -> tuple[Entry, int] | None:
        targets = self._per_vm.get(vm)
        if targets is None or target not in targets:
            return None  # the usual answer, without cachetools' bookkeeping
        entry = self._entries.get((vm, target))
        if entry is None:
            return None
        age = self._clock() - entry.stored
        if age >= entry.max_age + entry.stale_if_error:
            self.discard(vm, target)  # past any use: it goes on the read that finds it
            return None
        if age >= entry.max_age and not stale:
            return None  # kept for a failed call to serve
        return entry, int(age)

    def put(
        self,
        vm: str,
        target: bytes,
        status: int,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes,
        max_age: int,
        stale_if_error: float = 0.0,
    ) -> Entry | None:
        """Store an answer; the entry, or None when it cannot be stored (too large, cache off)."""
        entry = Entry(status, tuple(headers), body, self._clock(), max_age, stale_if_error, len(target))
        if not self.enabled or entry.size > self._entries.maxsize:
            return None
        self._entries[(vm, target)] = entry  # may evict entries (any VM's) for space
        targets = self._per_vm.setdefault(vm, OrderedDict())
        targets[target] = None
        targets.move_to_end(target)
        while len(targets) > self.max_entries_per_vm:
            oldest = next(iter(targets))
            self.discard(vm, oldest)
        return entry

    def age(self, entry: Entry) -> int:
        return int(self._clock() - entry.stored)

    def discard(self, vm: str, target: bytes) -> None:
        self._entries.pop((vm, target), None)
        self._forget((vm, target))

    def drop_vm(self, vm: str) -> None:
        for target in list(self._per_vm.get(vm, ())):
            self.discard(vm, target)

    @property
    def bytes(self) -> int:
        return int(self._entries.currsize)

    def __len__(self) -> int:
        return len(self._entries)


# How long a target that answered something uncacheable is not waited for, and how many such
# targets are remembered (past that, the expired go, then all: the cost is only a wait).
UNCACHEABLE_SECONDS = 60.0
MAX_UNCACHEABLE = 4096


class Flight:
    """One GET in flight to the control plane. Waiters take `outcome()`, resolved by `land`:
    an entry to answer with and how ("shared" or "stale"), or None (call on your own).
    `caller`: who made the call (the app's VM, token included); only an equal caller may wait
    for it: the key's VM name may pass to another VM, or the VM to another token, meanwhile."""

    __slots__ = ("_future", "caller")

    def __init__(self, caller: object = None) -> None:
        self._future: asyncio.Future[tuple[Entry, str] | None] | None = None  # made by the first waiter
        self.caller = caller

    def outcome(self) -> asyncio.Future[tuple[Entry, str] | None]:
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
        return self._future

    def land(self, result: tuple[Entry, str] | None) -> None:
        if self._future is not None and not self._future.done():
            self._future.set_result(result)


class Flights:
    """The GETs in flight per (VM name, target), and the targets not worth waiting for."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._flying: dict[Key, Flight] = {}
        # (VM, hash of the path) -> when it last answered so. The VM as the app names it (name
        # and id: a VM given a destroyed VM's name inherits none of its marks). The path's
        # hash, not the path: the guest chooses paths up to a whole head long, and
        # MAX_UNCACHEABLE of those would hold megabytes; two paths sharing a (salted) hash only
        # lose or gain a wait.
        self._uncacheable: dict[tuple[Hashable, int], float] = {}

    def coalesces(self, vm: Hashable, path: bytes) -> bool:
        """False when `path` answered `vm` uncacheably lately: nobody should wait for such a call."""
        marked = self._uncacheable.get((vm, hash(path))) if self._uncacheable else None
        return marked is None or self._clock() - marked >= UNCACHEABLE_SECONDS

    def in_flight(self, key: Key) -> Flight | None:
        return self._flying.get(key)

    def take_off(self, key: Key, caller: object = None) -> Flight | None:
        """Register `caller`'s call as the one in flight for `key` (None if one already is)."""
        if key in self._flying:
            return None
        flight = self._flying[key] = Flight(caller)
        return flight

    def land(self, key: Key, flight: Flight, result: tuple[Entry, str] | None) -> None:
        if self._flying.get(key) is flight:
            del self._flying[key]
        flight.land(result)

    def answered(self, vm: Hashable, path: bytes, cacheable: bool) -> None:
        """Remember whether `path` answers `vm` cacheably (only the uncacheable are kept)."""
        marks = self._uncacheable
        mark = (vm, hash(path))
        if cacheable:
            if marks:
                marks.pop(mark, None)
            return
        now = self._clock()
        if len(marks) >= MAX_UNCACHEABLE and mark not in marks:
            for key in [key for key, when in marks.items() if now - when >= UNCACHEABLE_SECONDS]:
                del marks[key]
            if len(marks) >= MAX_UNCACHEABLE:
                marks.clear()
        marks[mark] = now

    def __len__(self) -> int:
        return len(self._flying)
