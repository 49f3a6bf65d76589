"""The ``--vms`` file: which VMs exist, the scope each belongs to, the metadata each is served.

One VM a line, either a bare VM id or a JSON object::

    vm-1
    {"vm_id": "vm-2", "scope": "team-a", "metadata": {"role": "builder"}}

``scope`` defaults to the VM id, ``metadata`` to ``{}``; blank lines and ``#`` comments are
skipped. The file is re-read whenever its stat changes, so a VM removed from it is gone for
the next request. Unreadable or malformed at start: VmFileError. Unreadable later: no VM
exists (fail closed); malformed later: the last good contents stay in force.

Change notification, for long-polls (``controlplane.metadata``): ``version`` counts the
changes seen; ``wait_for_change(version, timeout)`` returns once it moved on. While anyone
waits, one watcher task stats the file every WATCH_INTERVAL seconds and wakes every waiter
with one event; nothing polls per waiter, and the watcher stops when nobody waits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["VM", "VmDirectory", "VmFileError"]

# How often the file is stat'ed while a long-poll waits: a change reaches the waiters within this.
WATCH_INTERVAL = 0.2


class VmFileError(Exception):
    """The VM file cannot be read or has a malformed line; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class VM:
    vm_id: str
    scope: str
    metadata: dict[str, Any] = field(default_factory=dict)


def parse_vm_line(line: str) -> VM:
    """One line of the file (already stripped, not blank, not a comment) as a VM; ValueError if malformed."""
    if not line.startswith("{"):
        return VM(line, line)
    item = json.loads(line)
    if not isinstance(item, dict) or set(item) - {"vm_id", "scope", "metadata"}:
        raise ValueError('expected {"vm_id", "scope"?, "metadata"?}')
    vm_id, scope, metadata = item.get("vm_id"), item.get("scope", item.get("vm_id")), item.get("metadata", {})
    if not isinstance(vm_id, str) or not vm_id:
        raise ValueError("vm_id must be a non-empty string")
    if not isinstance(scope, str) or not scope:
        raise ValueError("scope must be a non-empty string")
    if not isinstance(metadata, dict):
        raise ValueError("metadata must be an object")
    return VM(vm_id, scope, metadata)


def parse_vm_file(text: str, path: Path) -> dict[str, VM]:
    vms: dict[str, VM] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            vm = parse_vm_line(line)
        except ValueError as exc:  # json.JSONDecodeError included
            raise VmFileError(f"{path}:{number}: {exc}") from None
        if vm.vm_id in vms:
            raise VmFileError(f"{path}:{number}: VM {vm.vm_id!r} is listed twice")
        vms[vm.vm_id] = vm
    return vms


class VmDirectory:
    """The ``--vms`` file, re-read when it changes. ``exists`` is the Verifier's ``vm_exists`` callback."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._stamp: tuple[int, int, int] | None = None
        self._vms: dict[str, VM] = {}
        self._readable = True
        self.version = 0  # bumped whenever what get() answers may have changed
        self._changed: asyncio.Event | None = None  # set (and replaced) at each change
        self._waiting = 0
        self._watcher: asyncio.Task[None] | None = None
        try:
            self.refresh()
        except (OSError, UnicodeDecodeError) as exc:
            raise VmFileError(f"cannot read VM list {path}: {getattr(exc, 'strerror', None) or exc}") from None

    @property
    def path(self) -> Path:
        return self._path

    def refresh(self) -> bool:
        """Re-read the file if its stat changed; True when the contents were replaced.

        Raises OSError/UnicodeDecodeError if it cannot be read, VmFileError if malformed.
        """
        st = os.stat(self._path)
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp == self._stamp:
            return False
        vms = parse_vm_file(self._path.read_text(encoding="utf-8"), self._path)
        self._vms, self._stamp = vms, stamp
        self._bump()
        return True

    def _bump(self) -> None:
        self.version += 1
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def get(self, vm_id: str) -> VM | None:
        """The VM as listed now; None if it is not listed or the file has become unreadable."""
        readable = True
        try:
            self.refresh()
        except (OSError, UnicodeDecodeError):
            readable = False
        except VmFileError:
            pass  # a half-edited file: the last good contents stay in force
        if readable != self._readable:
            self._readable = readable
            self._bump()
        return self._vms.get(vm_id) if self._readable else None

    def exists(self, vm_id: str) -> bool:
        return self.get(vm_id) is not None

    def scope(self, vm_id: str) -> str:
        """The VM's scope (its id when the VM is not listed)."""
        vm = self.get(vm_id)
        return vm.scope if vm is not None else vm_id

    async def wait_for_change(self, version: int, timeout: float) -> None:
        """Return once ``version`` differs from `version` (within WATCH_INTERVAL of the file's
        change), or after `timeout` seconds."""
        self.get("")  # a change since the caller's look counts too
        if self.version != version:
            return
        if self._changed is None:
            self._changed = asyncio.Event()
        changed = self._changed
        self._waiting += 1
        if self._watcher is None or self._watcher.done():
            self._watcher = asyncio.get_running_loop().create_task(self._watch())
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await changed.wait()
        finally:
            self._waiting -= 1

    async def _watch(self) -> None:
        """While anyone waits: stat the file every WATCH_INTERVAL (get() re-reads it on change)."""
        while self._waiting:
            await asyncio.sleep(WATCH_INTERVAL)
            self.get("")
        self._watcher = None
