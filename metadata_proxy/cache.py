"""The per-VM response cache for GETs the control plane marks `Cache-Control: max-age=N`.

An entry is keyed by (VM name, request target) and never served to another VM; the app
drops a VM's entries when its token changes or it is removed. Bounded twice: entries per
VM (the VM's oldest goes first) and bytes across all VMs (the least recently used goes
first), both with cachetools' LRU bookkeeping.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
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

    @property
    def size(self) -> int:
        return _ENTRY_OVERHEAD + len(self.body) + sum(len(name) + len(value) for name, value in self.headers)


def cacheable_max_age(status: int, headers: Sequence[tuple[bytes, bytes]]) -> int | None:
    """max-age when a GET answer may be cached (200, no Vary, no no-store/no-cache), else None."""
    if status != 200:
        return None
    max_age: int | None = None
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
    return max_age if max_age else None


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
            return None  # the usual answer, without cachetools' bookkeeping
        entry = self._entries.get((vm, target))
        if entry is None:
            return None
        age = self._clock() - entry.stored
        if age >= entry.max_age:
            self.discard(vm, target)
            return None
        return entry, int(age)

    def put(
        self, vm: str, target: bytes, status: int, headers: Sequence[tuple[bytes, bytes]], body: bytes, max_age: int
    ) -> None:
        entry = Entry(status, tuple(headers), body, self._clock(), max_age)
        if not self.enabled or entry.size > self._entries.maxsize:
            return
        self._entries[(vm, target)] = entry  # may evict entries (any VM's) for space
        targets = self._per_vm.setdefault(vm, OrderedDict())
        targets[target] = None
        targets.move_to_end(target)
        while len(targets) > self.max_entries_per_vm:
            oldest = next(iter(targets))
            self.discard(vm, oldest)

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
