"""Who may use a guest connection, and the reaction to registry changes (README "A VM's life").

`Owners` is the registry as the data path sees it: the VM holding an address for a request
that begins now, the VM that held it when a connection was accepted (`ConnectionOwner`),
and what a change of the registry undoes: the cache of a VM removed or re-keyed, the
connections of an address that went away or changed hands. Its interface, used by
`protocol.GuestProtocol` and `app.ProxyApp`:

- `accept(address)`: a connection was accepted; its ConnectionOwner.
- `input_arrived()`: guest bytes were read (the next lookup checks the file first).
- `lookup(address)`: the VM for a request that begins now.
- `still_registered(address, vm)`, `poll()`: checks that always read the file's state.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from .metrics import Metrics
from .registry import VM, Registry, RegistryUnavailable

log = logging.getLogger("metadata_proxy")

# The scope key under which GuestProtocol hands the app each request's ConnectionOwner.
OWNER_KEY = "metadata_proxy.owner"


class ConnectionOwner:
    """The VM that held a connection's peer address when the connection was accepted.

    IP reuse (README "A VM's life"): a connection the old holder opened must never carry the new
    holder's token, not even for the one request that races the close of that connection.
    Every request on the connection must come from the same VM (a token rotation keeps the
    VM); when the registry could not be read at accept time, the first request decides.
    `closed` once the guest protocol called `connection_ended()` (it answered the connection
    itself, a parse error or a deadline, or began to close it): a request of the connection
    that the app has not begun is neither forwarded nor answered. `gone` once the connection
    is closed (`hang_up`, from the protocol's connection_lost; `closed` with it): a request
    that waits meanwhile (a long-poll, a wait for an identical call) is told through the
    callback it set with `on_hang_up`.
    """

    __slots__ = ("identity", "known", "closed", "gone", "_on_hang_up")

    def __init__(self, vm: VM | None, known: bool = True) -> None:
        self.identity = (vm.name, vm.vm_id) if vm else None
        self.known = known
        self.closed = False
        self.gone = False
        self._on_hang_up: Callable[[], object] | None = None

    def on_hang_up(self, callback: Callable[[], object] | None) -> None:
        """Have `callback` run when the connection closes (None: no longer). One at a time:
        the request being answered. The caller checks `gone` first."""
        self._on_hang_up = callback

    def hang_up(self) -> None:
        """The connection closed (the guest left, or the protocol closed it)."""
        self.closed = self.gone = True
        callback, self._on_hang_up = self._on_hang_up, None
        if callback is not None:
            callback()

    def admits(self, vm: VM) -> bool:
        if not self.known:
            self.identity, self.known = (vm.name, vm.vm_id), True
        return self.identity == (vm.name, vm.vm_id)

    def connection_ended(self) -> None:
        """The guest protocol answered the connection itself (a parse error, a deadline) or
        began to close it."""
        self.closed = True

    def lost(self, holder: VM | None) -> bool:
        """True when the address now belongs to another VM, or to none: close the connection."""
        return self.known and (holder is None or self.identity != (holder.name, holder.vm_id))


class Owners:
    """The registry as the data path sees it, and the reaction to its changes.

    `forget_vm(name)` drops what is cached for a VM removed or re-keyed;
    `close_connections(holders)` ends the connections from each address of `holders` whose
    owner no longer holds it (holders: the address's VM now, None for nobody): see
    server.ProxyServer.close_connections; it returns how many were answering a request.
    """

    def __init__(
        self,
        registry: Registry,
        metrics: Metrics,
        forget_vm: Callable[[str], None],
        close_connections: Callable[[Mapping[str, VM | None]], int] | None = None,
    ) -> None:
        self.registry = registry  # replaced by a reload that names another file
        self.metrics = metrics
        self.forget_vm = forget_vm
        self.close_connections = close_connections
        self._generation = registry.generation
        # The VMs as of the last generation handled: what a change is compared with. Not the
        # registry's current view, which is empty while the file is unreadable.
        self._known: Mapping[str, VM] = registry.by_address()
        self._unchecked = True  # guest input arrived since the file was last checked

    def accept(self, address: str) -> ConnectionOwner:
        """For a new connection from `address`: the VM that holds the address now."""
        self._unchecked = True
        try:
            return ConnectionOwner(self.lookup(address))
        except RegistryUnavailable:
            return ConnectionOwner(None, known=False)

    def input_arrived(self) -> None:
        """Guest bytes were read: the next lookup checks the file first."""
        self._unchecked = True

    def lookup(self, address: str, *, fresh: bool = False) -> VM | None:
        """The VM holding `address` for a request that begins now (`fresh`: check the file).

        README "A VM's life": a change is in effect for every request that begins after the
        `hostagent` command returns. Checking the file costs two system calls, so it is done
        before the first lookup after a connection was accepted or guest bytes were read
        (`accept`, `input_arrived`), not before every request: a request that begins after a
        change has its bytes read after it, so the check that follows that read sees the
        change, and a lookup with no read since the last check can only be for a request
        whose bytes that check already followed.
        """
        check = fresh or self._unchecked
        self._unchecked = False
        registry = self.registry
        try:
            vm = registry.lookup(address, refresh=check)
        finally:
            if registry.generation != self._generation:
                changed = registry.changed_since(self._generation)
                self._generation = registry.generation
                self.registry_changed(self._known, changed)
                self._known = registry.by_address()
        return vm

    def still_registered(self, address: str, vm: VM) -> bool:
        """True when `address` still belongs to `vm` with the same token (the file checked)."""
        try:
            return self.lookup(address, fresh=True) == vm
        except RegistryUnavailable:
            return False

    def poll(self) -> None:
        """Check the file with no request to look up (raises RegistryUnavailable)."""
        self.lookup("", fresh=True)

    def registry_changed(self, before: Mapping[str, VM], changed: Mapping[str, VM] | None = None) -> None:
        """Forget the cache of VMs removed or re-keyed; close the connections of addresses
        whose VM went away or changed hands. `changed`: the VMs of `before`, by name, that
        were replaced or removed since (None: any may have been), so that a change costs
        what it touched, not what the registry holds."""
        self.metrics.registry_reloads.inc()
        now, names = self.registry.by_address(), self.registry.by_name()
        then = before if changed is None else {a: vm for vm in changed.values() for a in vm.addresses}
        for vm in {vm.name: vm for vm in then.values()}.values():
            if (current := names.get(vm.name)) is None or current.token != vm.token or current.vm_id != vm.vm_id:
                self.forget_vm(vm.name)
        # Each address that went away or changed hands, with its holder now (None: nobody).
        gone = {
            address: current
            for address, vm in then.items()
            if (current := now.get(address)) is None or (current.name, current.vm_id) != (vm.name, vm.vm_id)
        }
        if gone and self.close_connections is not None:
            closed = self.close_connections(gone)
            if closed:
                log.info("closing %d busy connection(s) from %d address(es) no longer registered", closed, len(gone))
