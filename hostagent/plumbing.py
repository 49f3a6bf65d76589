"""Moving a VM's plumbing along with its registry row, and undoing it (README "The host side").

Inside a write transaction a change is plumbed atomically: the first failure undoes what
was done and the transaction rolls back; if the commit then fails, the returned undo runs.
After a commit (`vm sync`, `reconcile`), every VM is plumbed on its own, a few at a time,
and the failures are listed instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

from hostagent.entries import Entry
from hostagent.errors import PlumbingFailed
from metadata_proxy.registry_file import VM

PLUMBING_WORKERS = 8  # ip/nft/conntrack are subprocesses: a few at a time hide their start-up cost


class Plumbing(Protocol):
    """The namespace side (hostagent.netns.Plumber); errors are raised as exceptions with one-line messages."""

    def check(self, netns: str, addresses: Sequence[str]) -> None: ...

    def apply(self, netns: str, addresses: Sequence[str]) -> None: ...

    def remove(self, netns: str) -> bool: ...

    def namespaces(self) -> frozenset[str]: ...


def replumb(
    plumber: Plumbing, old: VM | None, new: Entry | None, *, atomic: bool = True, check: bool = False
) -> Callable[[], None]:
    """Move the namespaces from `old` to `new`: install the new table, remove one left behind.

    Returns the undo. `atomic` (inside a transaction): on the first failure undo what was
    done and raise. Otherwise (after a commit) try every step and raise once with all reasons.
    `check` first verifies that the new namespace exists and holds the addresses.
    """
    undo: list[Callable[[], None]] = []
    errors: list[str] = []

    def failed(exc: Exception) -> None:
        if atomic:
            raise PlumbingFailed(f"{exc}{_run_undo(undo)}") from None
        errors.append(str(exc))

    if new is not None and new.netns is not None:
        netns, addresses = new.netns, new.addresses
        try:
            if check:
                plumber.check(netns, addresses)
            plumber.apply(netns, addresses)
        except Exception as exc:
            failed(exc)
        else:
            if old is not None and old.netns == netns:
                previous = old.addresses
                undo.append(lambda: plumber.apply(netns, previous))
            else:
                undo.append(lambda: _ignore(plumber.remove(netns)))
    if old is not None and old.netns is not None and (new is None or new.netns != old.netns):
        # The VM left this namespace: a table left there would keep NATing to its old address.
        old_netns, old_addresses = old.netns, old.addresses
        try:
            removed = plumber.remove(old_netns)
        except Exception as exc:
            failed(exc)
        else:
            if removed:
                undo.append(lambda: plumber.apply(old_netns, old_addresses))
    if errors:
        raise PlumbingFailed("; ".join(errors))
    return lambda: _ignore(_run_undo(undo))


def _run_undo(steps: list[Callable[[], None]]) -> str:
    """Undo in reverse order, best effort; returns a note for the error message if a step failed."""
    failures = []
    for step in reversed(steps):
        try:
            step()
        except Exception as exc:
            failures.append(str(exc))
    return f" (and undoing failed: {failures[0]})" if failures else ""


def _ignore(_: object) -> None:
    return None


def nothing() -> None:
    """The undo of a change that plumbed nothing."""
    return None


def touches_netns(old: VM | None, new: Entry | None) -> bool:
    return (old is not None and old.netns is not None) or (new is not None and new.netns is not None)


def entry_of(vm: VM) -> Entry:
    return Entry(vm.name, vm.vm_id, vm.token, vm.token_exp, vm.addresses, vm.netns)


def plumb_all(
    plumber: Plumbing, changes: Sequence[tuple[VM | None, Entry | None]], *, fresh: bool = False
) -> list[tuple[str, str]]:
    """Plumb many VMs concurrently after a commit; (name, reason) of each that failed, by name.

    `fresh` re-applies a VM's table from scratch (reconcile) rather than moving it from its old row.
    """

    def one(change: tuple[VM | None, Entry | None]) -> tuple[str, str] | None:
        old, new = change
        name = new.name if new is not None else old.name if old is not None else ""
        try:
            replumb(plumber, None if fresh else old, new, atomic=False, check=True)
        except Exception as exc:
            return (name, str(exc))
        return None

    if not changes:
        return []
    with ThreadPoolExecutor(max_workers=min(PLUMBING_WORKERS, len(changes))) as pool:
        outcomes = list(pool.map(one, changes))
    return sorted(outcome for outcome in outcomes if outcome is not None)
