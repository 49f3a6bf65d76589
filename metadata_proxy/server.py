"""The service's lifecycle: sockets (bound or passed by systemd), two uvicorn servers (guest
and admin) on one event loop, sd_notify, SIGHUP reload and SIGTERM drain.

Signal handlers only record what was asked; `ProxyServer.run` acts on it in order. We
drive uvicorn's `startup`/`main_loop`/`shutdown` ourselves instead of `serve()` because
`serve()` owns SIGTERM/SIGINT and re-raises them before our own shutdown steps could run.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import secrets
import signal
import socket
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING

import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from . import guards, systemd
from .admin import UpstreamProbe, create_admin_app
from .app import ProxyApp
from .config import Config, ConfigError, ListenAddress, check_input_files, load_config
from .forward import build_client
from .logs import AccessLog
from .registry import Registry
from .sessions import SessionTokens

if TYPE_CHECKING:
    from uvicorn._types import ASGI3Application, ASGIReceiveCallable, ASGISendCallable, Scope

log = logging.getLogger("metadata_proxy")

# In-flight requests get this long to finish on SIGTERM; the unit's TimeoutStopSec is 30.
DRAIN_SECONDS = 20.0
# Idle keep-alive connections from guests are closed after this long.
KEEP_ALIVE_SECONDS = 5
# Slowloris: uvicorn has no timeout for a request head. A request's line and headers must
# arrive within this long of its first byte (a new connection's first request, of the
# accept); else 408 and close. Guests sit on the same host: a head takes milliseconds.
HEADER_TIMEOUT = 5.0
# llhttp buffers a head of any size, and the app's 32 KiB check runs only once the head
# is complete: past this many bytes the protocol answers 431 itself and closes.
MAX_HEAD_BYTES = 64 * 1024
# Open connections per peer address: max_concurrent requests plus idle keep-alive ones,
# and never so many that one VM could take the process's file descriptors from the rest.
CONNECTIONS_PER_CONCURRENT = 4
MIN_CONNECTIONS_PER_PEER = 32
# An old upstream client is closed this long after a reload replaced it, so the requests
# still using it finish first.
OLD_CLIENT_GRACE = DRAIN_SECONDS


def bind_listen(entry: ListenAddress) -> socket.socket:
    family = socket.AF_INET6 if ":" in entry.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    try:
        sock.bind((entry.host, entry.port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {entry}: {exc.strerror}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def bind_admin(address: str) -> socket.socket:
    if address.startswith("/"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(address)  # a stale socket from an earlier run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(address)
        except OSError as exc:
            sock.close()
            raise OSError(exc.errno, f"cannot listen on {address}: {exc.strerror}") from None
        os.chmod(address, 0o660)
    else:
        host, _, port = address.rpartition(":")
        sock = bind_listen(ListenAddress(host.strip("[]"), int(port)))
    sock.listen(128)
    sock.setblocking(False)
    return sock


def socket_listen_address(sock: socket.socket) -> ListenAddress | None:
    """A passed socket's address, so the Host check accepts it too."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    host, port = sock.getsockname()[:2]
    return ListenAddress(str(ipaddress.ip_address(host.split("%")[0])), port)


class GuestProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, stamped with the registry generation at accept time,
    with the bounds uvicorn lacks: a deadline and a size cap for each request head, and a
    cap on open connections per peer. What it refuses gets the app's JSON envelope."""

    registry_generation = 0
    proxy_app: ProxyApp | None = None  # set on the per-server subclass
    open_by_peer: Counter[str] = Counter()  # likewise: each server counts its own
    header_timeout = HEADER_TIMEOUT

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.proxy_app is not None:
            self.registry_generation = self.proxy_app.current_generation()
        self._head_timer: asyncio.TimerHandle | None = None
        self._in_head = False  # between a request's first byte and the end of its headers
        self._head_bytes = 0
        self._heads_begun = 0
        super().connection_made(transport)  # type: ignore[arg-type]
        self._peer = self.client[0] if self.client else ""
        self.open_by_peer[self._peer] += 1
        limits = self.proxy_app.config.limits if self.proxy_app is not None else None
        cap = max(MIN_CONNECTIONS_PER_PEER, CONNECTIONS_PER_CONCURRENT * limits.max_concurrent if limits else 0)
        if self.open_by_peer[self._peer] > cap:
            self.refuse(guards.TOO_MANY_CONNECTIONS)
        else:
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
        self.open_by_peer[self._peer] -= 1
        if self.open_by_peer[self._peer] <= 0:
            del self.open_by_peer[self._peer]
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        begun = self._heads_begun
        super().data_received(data)
        if self._in_head and not self.transport.is_closing():
            # All of `data` belongs to the head only when the head began before it; one
            # that began inside it is counted from the next read (at most one read short).
            if begun == self._heads_begun:
                self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self.refuse(guards.HEADERS_TOO_LARGE)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0
        self._heads_begun += 1
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timeout)

    def on_headers_complete(self) -> None:
        self._in_head = False
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().on_headers_complete()

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head behind a request still being answered: wait for that answer.
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timeout)
        elif self._in_head:
            self.refuse(guards.REQUEST_TIMEOUT)
        else:
            self.transport.close()  # connected and never sent a byte: nothing to answer

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to what llhttp cannot parse (smuggling shapes included)."""
        self.refuse(guards.MALFORMED)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        # llhttp rejects some requests only after their headers were complete and the app's
        # task was created (a Transfer-Encoding other than chunked, a malformed chunk): the
        # app must not then forward what the guest was told is malformed.
        async def unless_refused(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
            if not cycle.disconnected:
                await app(scope, receive, send)

        super()._start_asgi_task(cycle, unless_refused)

    def refuse(self, refusal: guards.Refusal) -> None:
        """Answer for a request the app never saw, then close; counted and logged like the app's."""
        request_id = secrets.token_hex(8)
        cycle = self.cycle
        answering = cycle is not None and cycle.response_started and not cycle.response_complete
        if cycle is not None and not cycle.response_started:
            cycle.disconnected = True  # the app, if it already runs, sees the guest gone
            cycle.message_event.set()
        if not answering and not self.transport.is_closing():  # never inside another answer
            body = json.dumps({"error": {"code": refusal.code, "message": refusal.message}}).encode()
            headers = [
                *self.server_state.default_headers,
                (b"content-type", b"application/json"),
                *refusal.headers,
                (b"content-length", b"%d" % len(body)),
                (b"x-request-id", request_id.encode()),
                (b"connection", b"close"),
            ]
            lines = b"".join(name + b": " + value + b"\r\n" for name, value in headers)
            self.transport.write(STATUS_LINE[refusal.status] + lines + b"\r\n" + body)
        self.transport.close()
        app = self.proxy_app
        if app is not None:
            app.metrics.refusals.labels(refusal.code).inc()
            entry = dict.fromkeys(("vm", "vm_id", "method", "path", "duration_ms", "upstream_status"))
            app.access_log.write(
                {**entry, "request_id": request_id, "peer": self._peer, "status": refusal.status, "code": refusal.code}
            )


def _uvicorn_config(app: object, protocol: type[asyncio.Protocol] | None = None) -> uvicorn.Config:
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        loop="none",
        http=protocol or "httptools",
        ws="none",  # an Upgrade is never ours to accept: such a request is served as plain HTTP
        lifespan="on",
        proxy_headers=False,  # identity is the socket peer, never a header
        server_header=False,
        access_log=False,
        log_config=None,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        timeout_graceful_shutdown=int(DRAIN_SECONDS),
    )


class ProxyServer:
    def __init__(
        self,
        config: Config,
        *,
        config_path: str | None,
        guest_sockets: list[socket.socket],
        admin_socket: socket.socket,
        notifier: systemd.Notifier,
        sessions: SessionTokens | None = None,
        access_log: AccessLog | None = None,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.guest_sockets = guest_sockets
        self.admin_socket = admin_socket
        self.notifier = notifier
        self.sessions = sessions
        self.access_log = access_log
        self.on_ready = on_ready
        self._wake = asyncio.Event()
        self._stop = False
        self._reload = False

    # Signal handlers: record the wish, wake the main loop, nothing else.
    def request_stop(self) -> None:
        self._stop = True
        self._wake.set()

    def request_reload(self) -> None:
        self._reload = True
        self._wake.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)

        extra = [address for sock in self.guest_sockets if (address := socket_listen_address(sock))]
        self.app = ProxyApp(
            self.config,
            registry=Registry(self.config.registry),
            client=build_client(self.config.control_plane),
            sessions=self.sessions,
            access_log=self.access_log,
            extra_listen=extra,
            close_connections=self.close_connections,
        )
        self.probe = UpstreamProbe(self.app)
        protocol = type("BoundGuestProtocol", (GuestProtocol,), {"proxy_app": self.app, "open_by_peer": Counter()})
        self.guest = uvicorn.Server(_uvicorn_config(self.app, protocol))
        admin_config = _uvicorn_config(create_admin_app(self.app, self.probe))
        admin_config.lifespan = "off"
        self.admin = uvicorn.Server(admin_config)

        for server in (self.guest, self.admin):
            server.config.load()
            server.lifespan = server.config.lifespan_class(server.config)
        await self.guest.startup(sockets=self.guest_sockets)
        await self.admin.startup(sockets=[self.admin_socket])
        ticker = asyncio.create_task(self.guest.main_loop())  # uvicorn's Date header upkeep
        prober = asyncio.create_task(self.probe.run())
        names = ", ".join(str(socket_listen_address(s) or s.getsockname()) for s in self.guest_sockets)
        log.info("serving guests on %s, admin on %s, pid %d", names, self.config.admin_listen, os.getpid())
        self.notifier.ready()
        if self.on_ready is not None:
            self.on_ready()

        while not self._stop:
            await self._wake.wait()
            self._wake.clear()
            if self._reload and not self._stop:
                self._reload = False
                self.reload()

        # Shutdown, in order:
        # 1. tell systemd, so it does not count the drain as a hang;
        self.notifier.stopping()
        log.info("stopping: draining in-flight requests for up to %.0f s", DRAIN_SECONDS)
        # 2. stop accepting and let in-flight guest requests finish (bounded by DRAIN_SECONDS);
        self.guest.should_exit = True
        await ticker
        await self.guest.shutdown()
        # 3. the admin endpoint goes last, so /healthz answers during the drain;
        self.admin.should_exit = True
        await self.admin.shutdown()
        # 4. nothing uses the upstream client any more.
        prober.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await prober
        await self.app.client.aclose()
        log.info("stopped")

    def reload(self) -> None:
        """SIGHUP: re-read the config and apply it to requests that begin from now on."""
        self.notifier.reloading()
        try:
            if self.config_path is None:
                raise ConfigError("no config file to reload (started without --config)")
            new = load_config(self.config_path)
            check_input_files(new)
            client = build_client(new.control_plane) if new.control_plane != self.config.control_plane else None
        except (ConfigError, OSError, ValueError) as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            self.app.metrics.reloads.labels("refused").inc()
            self.notifier.ready()
            return
        fixed = [key for key in ("listen", "admin_listen", "workers") if getattr(new, key) != getattr(self.config, key)]
        if fixed:
            log.warning("reload: %s change only on restart; keeping the running values", ", ".join(fixed))
            new = replace(
                new, listen=self.config.listen, admin_listen=self.config.admin_listen, workers=self.config.workers
            )
        old_client = self.app.client
        if new.registry != self.config.registry:
            self.app.registry = Registry(new.registry)
        self.app.configure(new, client or old_client)
        if client is not None:
            asyncio.get_running_loop().call_later(OLD_CLIENT_GRACE, lambda: asyncio.ensure_future(old_client.aclose()))
        self.config = new
        self.app.metrics.reloads.labels("applied").inc()
        log.info("reloaded %s", self.config_path)
        self.notifier.ready()

    def close_connections(self, addresses: set[str], generation: int) -> int:
        """Close the guest connections from `addresses` accepted before registry `generation`
        (their VM was removed or its address handed on); newer ones belong to the new holder."""
        closed = 0
        for connection in list(self.guest.server_state.connections):
            if (
                isinstance(connection, GuestProtocol)
                and connection.client
                and connection.client[0] in addresses
                and connection.registry_generation < generation
            ):
                connection.transport.close()
                closed += 1
        return closed


def open_sockets(config: Config, environ: Mapping[str, str]) -> tuple[list[socket.socket], socket.socket]:
    """The guest sockets (systemd's when passed, else bound from `listen`) and the admin one."""
    guest = systemd.listen_fds(environ)
    try:
        if not guest:
            guest = [bind_listen(entry) for entry in config.listen]
        admin = bind_admin(config.admin_listen)
    except OSError:
        for sock in guest:
            sock.close()
        raise
    return guest, admin
