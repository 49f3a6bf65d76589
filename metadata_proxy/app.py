"""The guest-facing ASGI app: one function walks a request through identity, the checks,
a local endpoint or the forward, and the log line.

Raw ASGI rather than a framework on this path: it is the hot path, and the routing is a
prefix match (bench/ has the numbers). Read `ProxyApp.handle` top to bottom.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import Any
from urllib.parse import urlsplit

from . import guards, upstream
from .cache import MAX_CACHED_BODY, Entry, Flight, Flights, ResponseCache, freshness
from .config import Config, ListenAddress, Route
from .forward import (
    BodyTimeout,
    BodyTooLarge,
    GuestDisconnected,
    RequestBody,
    refusal_for,
    response_headers,
    upstream_headers,
)
from .guards import Refusal
from .limits import Limiter
from .logs import AccessLog, new_request_id
from .metrics import Metrics
from .owners import OWNER_KEY, ConnectionOwner, Owners
from .registry import VM, Registry, RegistryUnavailable
from .sessions import SessionTokens

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

log = logging.getLogger("metadata_proxy")

REGISTRY_UNAVAILABLE = Refusal(503, "registry_unavailable", "The VM registry cannot be read; try again shortly.")
# A request that reached the app without the guest protocol's ConnectionOwner: the seam with
# uvicorn is broken (protocol.GuestProtocol), so who may use the connection is unknown. Fail
# closed, nothing forwarded.
NO_OWNER = Refusal(500, "internal_error", "The proxy cannot tell which VM owns this connection; nothing was forwarded.")
CLOSE = ((b"connection", b"close"),)
TOKEN_EXPIRED = Refusal(503, "token_expired", "This VM's runtime token has expired; the control plane must renew it.")
REGISTRY_WATCH_INTERVAL = 0.25
STREAM_SMALL_BODY = 64 * 1024
# Seconds a guest may leave a streamed answer unread before it is cut off.
GUEST_WRITE_TIMEOUT = 10
# A GET that fails with one of these (or with no answer at all) may be answered stale (RFC 5861).
STALE_IF_STATUS = frozenset({500, 502, 503, 504})


class Exchange:
    """One guest request in flight: what the log line and the metrics need."""

    __slots__ = (
        "scope",
        "receive",
        "send",
        "request_id",
        "peer",
        "peer_port",
        "vm",
        "route",
        "status",
        "code",
        "upstream_status",
        "cache",
        "started",
    )

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope = scope
        self.receive = receive
        self.send = send
        self.request_id = new_request_id()
        client = scope.get("client")
        self.peer: str = client[0] if client else ""
        self.peer_port: int = client[1] if client else 65535  # no peer: never a privileged port
        self.vm: VM | None = None
        self.route = ""
        self.status = 0
        self.code: str | None = None
        self.upstream_status: int | None = None
        self.cache: str | None = None
        self.started = time.perf_counter()

    async def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        headers.append((b"x-request-id", self.request_id.encode()))
        headers.append((b"content-length", b"%d" % len(body)))
        self.status = status
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})

    async def refuse(self, refusal: Refusal, extra: Iterable[tuple[bytes, bytes]] = ()) -> None:
        self.code = refusal.code
        body = guards.error_body(refusal)
        headers = [(b"content-type", b"application/json"), *refusal.headers, *extra]
        await self.respond(refusal.status, headers, body)


class ProxyApp:
    """The guest-facing ASGI app. Served by protocol.GuestProtocol, which hands each request
    its connection's ConnectionOwner (scope[OWNER_KEY]); a request without one is refused."""

    def __init__(
        self,
        config: Config,
        *,
        registry: Registry,
        client: upstream.Upstream,
        sessions: SessionTokens | None = None,
        metrics: Metrics | None = None,
        access_log: AccessLog | None = None,
        extra_listen: Iterable[ListenAddress] = (),
        close_connections: Callable[[Mapping[str, VM | None]], int] | None = None,
    ) -> None:
        self.sessions = sessions or SessionTokens()
        self.metrics = metrics or Metrics()
        self.in_flight = 0  # guest requests being handled
        self.metrics.watch_in_flight(lambda: self.in_flight)
        # Identity and connection ownership, and what a registry change undoes.
        self.owners = Owners(registry, self.metrics, lambda name: self.cache.drop_vm(name), close_connections)
        self.metrics.watch_registry(lambda: self.registry.vms, lambda: self.registry.error is None)
        self.access_log = access_log or AccessLog()
        self._extra_listen = tuple(extra_listen)
        self._watcher: asyncio.Task[None] | None = None
        self.limiter = Limiter(config.limits)
        self.cache = ResponseCache(config.cache.max_entries_per_vm, config.cache.max_bytes)
        self.flights = Flights()
        self.configure(config, client)

    @property
    def registry(self) -> Registry:
        return self.owners.registry

    @registry.setter
    def registry(self, registry: Registry) -> None:
        self.owners.registry = registry  # a reload that names another file; read at its first lookup

    def configure(self, config: Config, client: upstream.Upstream) -> None:
        """Apply a (re)loaded config to every request that begins from now on."""
        self.config = config
        self.client = client
        self.routes: tuple[Route, ...] = config.routes
        self.hosts = guards.allowed_hosts((*config.listen, *self._extra_listen), config.host_aliases)
        self.limiter.reconfigure(config.limits)
        self.upstream_prefix = urlsplit(config.control_plane.url).path.rstrip("/").encode("ascii")
        if (config.cache.max_entries_per_vm, config.cache.max_bytes) != (
            self.cache.max_entries_per_vm,
            self.cache.max_bytes,
        ):
            self.cache = ResponseCache(config.cache.max_entries_per_vm, config.cache.max_bytes)

    # -- ASGI ---------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            owner: ConnectionOwner | None = scope.get(OWNER_KEY)
            if owner is not None and owner.closed:
                return  # the guest protocol answered (and logged) this connection itself, or the guest left
            exchange = Exchange(scope, receive, send)
            self.in_flight += 1
            try:
                await self.handle(exchange)
            finally:
                self.in_flight -= 1
                self.record(exchange)
        elif scope["type"] == "lifespan":
            await self.lifespan(receive, send)

    async def handle(self, ex: Exchange) -> None:
        """Every check of README "How a request flows", in its order, then the local answer or the forward."""
        headers: list[tuple[bytes, bytes]] = ex.scope["headers"]
        raw_path: bytes = ex.scope.get("raw_path") or ex.scope["path"].encode()

        # 1. Identity: the connection's peer address, never anything the guest wrote, and
        # the VM that held it when the connection was accepted (set by GuestProtocol).
        owner: ConnectionOwner | None = ex.scope.get(OWNER_KEY)
        if owner is None:
            return await ex.refuse(NO_OWNER, CLOSE)
        try:
            vm = self.owners.lookup(ex.peer)
        except RegistryUnavailable:
            return await ex.refuse(REGISTRY_UNAVAILABLE)
        if vm is None or not owner.admits(vm):
            # Unregistered, removed, or a connection from before the address changed hands:
            # not this VM's to use; closed, so its next request is accepted anew.
            return await ex.refuse(guards.UNKNOWN_VM, CLOSE)
        ex.vm = vm
        # A request the guest protocol refuses as a whole (Upgrade: its framing is not ours),
        # answered here, in its turn behind the requests pipelined before it; then closed.
        refusal = ex.scope.get(guards.REFUSAL_KEY)
        if refusal is not None:
            return await ex.refuse(refusal, CLOSE)

        # 2. The Host header names us (DNS rebinding); 3. no proxy inside the guest relayed
        # this (SSRF); 4. bounded headers, sane framing, a clean path under a known prefix.
        refusal = (
            guards.check_host(guards.single_header(headers, b"host"), self.hosts)
            or guards.check_headers(headers, ex.scope["method"])
            or guards.check_path(raw_path)
        )
        if refusal:
            return await ex.refuse(refusal)
        local_method = guards.LOCAL_ENDPOINTS.get(raw_path)
        route = None if local_method else guards.match_route(raw_path, self.routes)
        if local_method is None and route is None:
            return await ex.refuse(guards.NOT_FOUND)
        ex.route = route.prefix if route else raw_path.decode()
        if local_method and ex.scope["method"] != local_method:
            return await ex.refuse(guards.method_not_allowed(local_method))
        if route and ex.scope["method"] not in guards.FORWARDED_METHODS:
            return await ex.refuse(guards.method_not_allowed(guards.ALLOW_FORWARDED))

        # 5. The route's guard (local endpoints: "header"), then its source-port rule.
        guard = route.guard if route else "header"
        if guard == "header":
            refusal = guards.check_metadata_header(headers)
        elif guard == "session":
            token = guards.single_header(headers, b"x-metadata-token")
            refusal = None if self.sessions.valid(token, vm.name, vm.vm_id) else guards.INVALID_SESSION
        else:  # "none": the route is open to every registered VM (clients that cannot add a header)
            refusal = None
        if refusal is None and route and route.privileged_port and ex.peer_port >= guards.PRIVILEGED_PORTS:
            refusal = guards.UNPRIVILEGED_PORT
        if refusal:
            return await ex.refuse(refusal)

        # 6. Per-VM rate and concurrency limits.
        # Keyed by name and id, as a connection's owner is: a VM given a destroyed VM's name
        # (whose held requests run on to their answers) starts with a bucket of its own.
        identity = (vm.name, vm.vm_id)
        retry_after = self.limiter.acquire(identity)
        if retry_after is not None:
            return await ex.refuse(guards.rate_limited(retry_after))
        try:
            # 7. A declared body over the limit is refused before anything is read (the
            # guest protocol's lingering close reads the rest, bounded, so the guest reads the 413).
            length = guards.declared_length(headers)
            body_limit = route.max_body_bytes if route else self.config.limits.max_body_bytes
            if length is not None and length > body_limit:
                return await ex.refuse(guards.BODY_TOO_LARGE, CLOSE)
            if local_method:
                return await self.local(ex, raw_path)
            assert route is not None
            await self.forward(ex, route, raw_path, length)
        finally:
            self.limiter.release(identity)

    # -- the registry ----------------------------------------------------------------------

    async def watch_registry(self) -> None:
        """Notice changes and damage without traffic: /readyz, metrics, idle connections.
        Also brings this process's in-flight gauge up to date for other workers' scrapes."""
        while True:
            await asyncio.sleep(REGISTRY_WATCH_INTERVAL)
            self.metrics.apply()
            error = self.registry.error
            try:
                self.owners.poll()
            except RegistryUnavailable:
                if error is None:
                    log.error("registry unavailable: %s", self.registry.error)
            else:
                if error is not None:
                    log.info("registry readable again")

    # -- local endpoints ----------------------------------------------------------------

    async def local(self, ex: Exchange, raw_path: bytes) -> None:
        vm = ex.vm
        assert vm is not None
        if raw_path == guards.LOCAL_INSTANCE:
            body = json.dumps({"vm_id": vm.vm_id, "name": vm.name, "host_id": self.config.host_id}).encode()
            return await ex.respond(200, [(b"content-type", b"application/json")], body)
        headers: list[tuple[bytes, bytes]] = ex.scope["headers"]
        ttl = guards.parse_ttl(guards.single_header(headers, b"x-metadata-token-ttl-seconds"))
        if ttl is None:
            return await ex.refuse(guards.INVALID_TTL)
        token = self.sessions.issue(vm.name, vm.vm_id, ttl)
        await ex.respond(
            200,
            [(b"content-type", b"text/plain"), (b"x-metadata-token-ttl-seconds", b"%d" % ttl)],
            token.encode(),
        )

    # -- forwarding ---------------------------------------------------------------------

    def forward(self, ex: Exchange, route: Route, raw_path: bytes, length: int | None) -> Awaitable[object]:
        """To the control plane: a GET through the VM's cache (`forward_get`), anything else
        straight through (`forward_other`). Not a coroutine but the one that does the work,
        awaited by the caller: a frame fewer for each suspension of the request to pass
        through (bench/)."""
        vm = ex.vm
        assert vm is not None
        if vm.token_exp is not None and vm.token_exp <= time.time():
            return ex.refuse(TOKEN_EXPIRED)
        query: bytes = ex.scope.get("query_string", b"")
        # `{control_plane.url}` + the guest's path: the url's own path, if any, is a prefix.
        path = self.upstream_prefix + raw_path
        target = path + b"?" + query if query else path
        if ex.scope["method"] == "GET" and self.cache.enabled:
            return self.forward_get(ex, route, raw_path, target)
        return self.forward_other(ex, route, target, length)

    async def forward_other(self, ex: Exchange, route: Route, target: bytes, length: int | None) -> None:
        """Anything but a GET through the cache: `call`, then `relay`."""
        try:
            response = await self.call(ex, route, target, length)
        except upstream.UpstreamError as exc:
            return await self.upstream_failed(ex, exc)
        if response is not None:
            await self.relay(ex, response)

    def forward_get(self, ex: Exchange, route: Route, raw_path: bytes, target: bytes) -> Awaitable[object]:
        """A GET: from the VM's cache when fresh; else shared with the same VM's identical
        GET in flight (`coalesce`), unless the target answered uncacheably a moment ago:
        then nobody waits for it, nor it for anyone (`fetch`). Not a coroutine, as `forward`."""
        vm = ex.vm
        assert vm is not None
        hit = self.cache.get(vm.name, target)
        if hit is not None:
            return self.answer_from(ex, *hit, "hit")
        ex.cache = "miss"
        if self.flights.coalesces((vm.name, vm.vm_id), raw_path):
            return self.coalesce(ex, route, raw_path, target)
        return self.fetch(ex, route, raw_path, target)

    async def coalesce(self, ex: Exchange, route: Route, raw_path: bytes, target: bytes) -> None:
        """A cache miss: when the same VM's identical GET is in flight, its answer if that is
        cacheable (or stale on its failure); else a call of our own, which identical GETs
        arriving meanwhile wait for. Identical: same VM, same byte-exact target (README,
        "Design choices"); waiters keep their `max_concurrent` slot."""
        vm = ex.vm
        assert vm is not None
        key = (vm.name, target)
        flight = None
        leader = self.flights.in_flight(key)
        if leader is None:
            flight = self.flights.take_off(key, vm)
        elif leader.caller != vm:
            # Begun for the VM that held this name before a change (removed and the
            # name given to another VM, or re-keyed): its answer is not ours to share.
            pass
        else:
            try:
                shared = await self.wait_for(ex, leader)
            except GuestDisconnected:
                ex.status, ex.cache = 499, None  # gone while waiting: nothing more to do
                return
            if shared is not None:
                entry, how = shared
                return await self.answer_from(ex, entry, self.cache.age(entry), how)
            # Not cacheable, or the call failed with nothing stale to serve: call on our own.
        outcome: tuple[Entry, str] | None = None
        try:
            outcome = await self.fetch(ex, route, raw_path, target)
        finally:
            if flight is not None:
                self.flights.land(key, flight, outcome)

    async def wait_for(self, ex: Exchange, flight: Flight) -> tuple[Entry, str] | None:
        """The outcome of the identical call in flight; GuestDisconnected if our guest leaves first."""
        with _UntilHangUp(ex):
            return await asyncio.shield(flight.outcome())  # shared: our hang-up must not cancel it

    async def fetch(self, ex: Exchange, route: Route, raw_path: bytes, target: bytes) -> tuple[Entry, str] | None:
        """A GET the cache missed: call, answer the guest (stale if the call fails and an entry
        allows it), store what may be cached. Returns what waiters for this call may answer."""
        vm = ex.vm
        assert vm is not None
        try:
            response = await self.call(ex, route, target, None)
        except upstream.UpstreamError as exc:
            stale = await self.answer_stale(ex, vm, target)
            if stale is None:
                await self.upstream_failed(ex, exc)
            return stale
        if response is None:
            return None
        if response.status in STALE_IF_STATUS:
            stale = await self.answer_stale(ex, vm, target, response)
            if stale is not None:
                return stale
        entry = await self.relay(ex, response, target)
        if response.status < 500:  # an outage must not turn coalescing off
            self.flights.answered((vm.name, vm.vm_id), raw_path, entry is not None)
        return None if entry is None else (entry, "shared")

    async def call(self, ex: Exchange, route: Route, target: bytes, length: int | None) -> upstream.Response | None:
        """The upstream call, with the runtime token attached: the response (the caller must
        relay or close it), or None when the guest was answered already (its body refused or
        stalled) or went away. Raises UpstreamError when the call fails."""
        vm = ex.vm
        assert vm is not None
        method: str = ex.scope["method"]
        # Where the runtime token gets attached.
        headers = upstream_headers(
            ex.scope["headers"], token=vm.token, peer=ex.peer, host_id=self.config.host_id, request_id=ex.request_id
        )
        reader = RequestBody(ex.receive, route.max_body_bytes)
        try:
            # No body on GET/HEAD; a small body whole (one write, retryable); a large one streamed.
            body: bytes | AsyncIterator[bytes] | None = None
            if method not in ("GET", "HEAD"):
                prefetched = await reader.prefetch()
                body = reader.chunks() if prefetched is None else prefetched
            started = time.perf_counter()
            request = self.client.request(
                method,
                target,
                headers,
                body,
                content_length=length if body is not None and not isinstance(body, bytes) else None,  # streamed
                timeout=route.timeout,
            )
            del headers  # the request's head from now on: a held request's frame keeps no copy
            if body is None and route.timeout > self.config.control_plane.timeout:
                # A long-poll route: a held request must not keep its `max_concurrent` slot
                # and an upstream connection to the route's timeout for a guest that left.
                with _UntilHangUp(ex):
                    response = await request
            else:
                response = await request
        except BodyTooLarge:
            await ex.refuse(guards.BODY_TOO_LARGE, CLOSE)  # the rest: as for a declared body (step 7)
            return None
        except BodyTimeout:
            await ex.refuse(guards.REQUEST_TIMEOUT, CLOSE)
            return None
        except GuestDisconnected:
            ex.status = 499
            return None
        self.metrics.observe_upstream(time.perf_counter() - started)
        return response

    async def upstream_failed(self, ex: Exchange, exc: upstream.UpstreamError) -> None:
        refusal = refusal_for(exc)
        self.metrics.upstream_errors.labels(refusal.code).inc()
        vm = ex.vm.name if ex.vm else ""
        log.warning("upstream %s for %s (request %s): %s", refusal.code, vm, ex.request_id, exc)
        await ex.refuse(refusal)

    async def answer_from(self, ex: Exchange, entry: Entry, age: int, how: str) -> None:
        """Answer from a cache entry (`how`: hit, shared, stale), with its Age."""
        ex.cache = how
        await ex.respond(entry.status, [*entry.headers, (b"age", b"%d" % age)], entry.body)

    async def answer_stale(
        self, ex: Exchange, vm: VM, target: bytes, response: upstream.Response | None = None
    ) -> tuple[Entry, str] | None:
        """After a failed call (an error, or `response` with a 5xx): the entry still within its
        stale-if-error window, answered, if the VM still holds its address with the same token."""
        found = self.cache.get_stale(vm.name, target)
        if found is None or not self.owners.still_registered(ex.peer, vm):
            return None
        if response is not None:
            ex.upstream_status = response.status
            await response.aclose()
        entry, age = found
        log.warning("control plane failed for %s (request %s): answered stale, %d s old", vm.name, ex.request_id, age)
        await self.answer_from(ex, entry, age, "stale")
        return entry, "stale"

    async def relay(self, ex: Exchange, response: upstream.Response, target: bytes | None = None) -> Entry | None:
        """Pass the response to the guest; with `target` (a GET), store it in the VM's cache if
        cacheable. Returns the stored entry, if any. Always closes the response."""
        vm = ex.vm
        assert vm is not None
        try:
            ex.upstream_status = response.status
            out = response_headers(response.headers, ex.request_id.encode())
            ex.status = response.status
            answer_length = _content_length(out)
            lifetime = freshness(response.status, out) if target is not None else None
            entry = None
            if lifetime and answer_length is not None and answer_length <= MAX_CACHED_BODY:
                assert target is not None
                data = await response.read()
                # Re-keyed or removed during the call: the answer (fetched with the old token)
                # must not be served to a request that begins after the change.
                if self.owners.still_registered(ex.peer, vm):
                    stored = [(name, value) for name, value in out if name not in (b"content-length", b"x-request-id")]
                    stale = min(lifetime[1], self.config.cache.stale_if_error_max)
                    entry = self.cache.put(vm.name, target, response.status, stored, data, lifetime[0], stale)
            elif ex.scope["method"] == "HEAD" or (answer_length is not None and answer_length <= STREAM_SMALL_BODY):
                data = b"" if ex.scope["method"] == "HEAD" else await response.read()
            else:
                data = None
            await ex.send({"type": "http.response.start", "status": response.status, "headers": out})
            if data is not None:
                await ex.send({"type": "http.response.body", "body": data})
                return entry
            async for chunk in response.iter_body():
                # A guest that stops reading must not hold a pooled upstream connection for ever.
                async with asyncio.timeout(GUEST_WRITE_TIMEOUT):
                    await ex.send({"type": "http.response.body", "body": chunk, "more_body": True})
            await ex.send({"type": "http.response.body", "body": b""})
        except TimeoutError:
            log.warning(
                "%s stopped reading its answer for %d s (request %s): cut off",
                vm.name,
                GUEST_WRITE_TIMEOUT,
                ex.request_id,
            )
            ex.code = "guest_write_timeout"
        except upstream.UpstreamError as exc:
            # The answer had started: the guest sees a truncated response and a closed connection.
            log.warning("upstream failed mid-response for %s (request %s): %s", vm.name, ex.request_id, exc)
            ex.code = refusal_for(exc).code
        finally:
            await response.aclose()
        return None

    # -- the log line and metrics -------------------------------------------------------

    def record(self, ex: Exchange) -> None:
        vm = ex.vm
        duration_ms = (time.perf_counter() - ex.started) * 1000  # logged to the µs
        name = vm.name if vm else None
        self.metrics.count(self.metrics.requests, name or "", ex.route, str(ex.status))
        if ex.code:
            self.metrics.count(self.metrics.refusals, ex.code)  # hot when a guest floods us
        if ex.cache:
            self.metrics.count(self.metrics.cache, ex.cache)  # a GET's: hit, miss, shared, stale
        raw_path = ex.scope.get("raw_path") or b""
        self.access_log.write(
            request_id=ex.request_id,
            peer=ex.peer,
            vm=name,
            vm_id=vm.vm_id if vm else None,
            method=ex.scope.get("method"),
            path=raw_path.decode("latin-1"),
            route=ex.route or None,
            status=ex.status,
            code=ex.code,
            duration_ms=duration_ms,
            upstream_status=ex.upstream_status,
            cache=ex.cache,
        )

    # -- lifespan -----------------------------------------------------------------------

    async def lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._watcher = asyncio.create_task(self.watch_registry())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self._watcher is not None:
                    self._watcher.cancel()
                await send({"type": "lifespan.shutdown.complete"})
                return


class _UntilHangUp:
    """Inside it, the guest's hang-up (ConnectionOwner.hang_up) cancels the request's task,
    and the exit turns that cancellation into GuestDisconnected (any other passes through):
    what is awaited inside is abandoned at once (an upstream call's connection closed).
    A callback rather than a task watching `receive()`: a held request costs one task, not
    two (bench/held_memory.py). Nothing resumes reading meanwhile: where uvicorn paused it
    (a pipelined request queued behind, a GET's body past its buffer), a hang-up is seen
    when the wait ends."""

    __slots__ = ("_owner", "_task")

    def __init__(self, ex: Exchange) -> None:
        self._owner: ConnectionOwner = ex.scope[OWNER_KEY]

    def __enter__(self) -> None:
        if self._owner.gone:
            # Gone already: nothing inside runs (a cancel of our own would wait for the first
            # suspension inside, and fire after the exit if there were none).
            raise GuestDisconnected
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        # Runs from the protocol's connection_lost, a loop callback: the task is suspended
        # inside then, and the cancel lands there.
        self._owner.on_hang_up(task.cancel)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        owner = self._owner
        owner.on_hang_up(None)
        if kind is asyncio.CancelledError and owner.gone and self._task.uncancel() == 0:
            raise GuestDisconnected from None


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None
