"""The service's lifecycle: sockets (bound or passed by systemd), two uvicorn servers (guest
and admin) on one event loop, sd_notify, SIGHUP reload and SIGTERM drain; and, with
`workers` > 1, one of the workers that `workers.Supervisor` forks.

Signal handlers only record what was asked; `ProxyServer.run` (and `Supervisor.run`)
act on it in order. We drive uvicorn's `startup`/`main_loop`/`shutdown` ourselves instead
of `serve()` because `serve()` owns SIGTERM/SIGINT and re-raises them before our own
shutdown steps could run.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import logging
import os
import signal
import socket
import stat
from collections.abc import Callable, Mapping
from dataclasses import replace

import uvicorn

from . import systemd, upstream
from .admin import UpstreamProbe, create_admin_app
from .app import ProxyApp
from .config import Config, ConfigError, ListenAddress, check_input_files, load_config
from .forward import build_client
from .logs import AccessLog
from .metrics import Metrics
from .protocol import KEEP_ALIVE_SECONDS, GuestProtocol, GuestSide
from .registry import VM, Registry
from .sessions import SessionTokens
from .version import version

log = logging.getLogger("metadata_proxy")

# In-flight requests get this long to finish on SIGTERM; the unit's TimeoutStopSec is 30.
DRAIN_SECONDS = 20.0
# An old upstream client is closed this long after a reload replaced it, so the requests
# still using it finish first.
OLD_CLIENT_GRACE = DRAIN_SECONDS
# The rest of the shutdown after the guest drain; all of it stays under TimeoutStopSec.
ADMIN_DRAIN_SECONDS = 2.0
CLIENT_CLOSE_SECONDS = 2.0
HANDLED_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})

# A worker and its supervisor (workers > 1) speak over a socketpair, a byte per message.
READY_MESSAGE = b"R"  # worker to supervisor: serving (at start-up, and after each reload)
DRAINED_MESSAGE = b"D"  # supervisor to the admin worker, when stopping: the others are done


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


def unix_path(sock: socket.socket) -> str | None:
    """The file of a unix socket (read while it is open: uvicorn closes it on shutdown)."""
    if sock.family != socket.AF_UNIX:
        return None
    path = sock.getsockname()
    return path if isinstance(path, str) and path else None


def remove_socket_file(path: str | None) -> None:
    """Remove the admin socket's file, on stop and after a start that failed once it was
    bound: a stale file looks like a service to scrape."""
    with contextlib.suppress(OSError):  # already gone
        if path is not None and stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)


def socket_listen_address(sock: socket.socket) -> ListenAddress | None:
    """A passed socket's address, so the Host check accepts it too."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    host, port = sock.getsockname()[:2]
    return ListenAddress(str(ipaddress.ip_address(host.split("%")[0])), port)


def _uvicorn_config(
    app: object, protocol: Callable[..., asyncio.Protocol] | None = None, drain: float = DRAIN_SECONDS
) -> uvicorn.Config:
    """`protocol`: what uvicorn calls to build each connection's protocol (the guest side's
    `functools.partial(GuestProtocol, side)`); None for uvicorn's own (the admin endpoint)."""
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        loop="none",
        # Typed as a class, called as a factory with keyword arguments (GuestProtocol.__init__).
        http=protocol or "httptools",  # type: ignore[arg-type]
        ws="none",  # an Upgrade is never ours to accept: such a request is served as plain HTTP
        lifespan="on",
        proxy_headers=False,  # identity is the socket peer, never a header
        server_header=False,
        access_log=False,
        log_config=None,
        # The admin endpoint's idle keep-alive. GuestProtocol never arms uvicorn's timer and
        # keeps its own deadline (protocol.Deadlines.keep_alive_seconds).
        timeout_keep_alive=int(KEEP_ALIVE_SECONDS),
        timeout_graceful_shutdown=int(drain),
    )


def keep_fixed(running: Config, new: Config) -> tuple[Config, list[str]]:
    """`new` with the running values of the keys only a restart changes (the sockets are
    open, the workers forked), and the names of those that differed."""
    keys = ("listen", "admin_listen", "workers", "per_vm_metrics")
    fixed = [key for key in keys if getattr(new, key) != getattr(running, key)]
    kept = replace(new, **{key: getattr(running, key) for key in keys})
    return kept, fixed


class ProxyServer:
    """One process serving guests (and, unless `admin_socket` is None, the admin endpoint).

    Alone (`workers = 1`) it talks to systemd itself. As a worker of a `Supervisor` it gets
    a disabled notifier and the `supervisor` channel instead: it writes READY_MESSAGE there
    when it starts serving and when it finishes a reload, stops when the channel closes
    (the supervisor is gone), and leaves counting reloads to the supervisor. The worker
    that serves the admin endpoint keeps it open on stop until the supervisor writes
    DRAINED_MESSAGE: /healthz and /metrics answer while any worker drains.
    """

    def __init__(
        self,
        config: Config,
        *,
        config_path: str | None,
        guest_sockets: list[socket.socket],
        admin_socket: socket.socket | None,
        notifier: systemd.Notifier,
        sessions: SessionTokens | None = None,
        access_log: AccessLog | None = None,
        metrics: Metrics | None = None,
        on_ready: Callable[[], None] | None = None,
        supervisor: socket.socket | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.guest_sockets = guest_sockets
        self.admin_socket = admin_socket
        self._admin_path = unix_path(admin_socket) if admin_socket is not None else None
        self.notifier = notifier
        self.sessions = sessions
        self.access_log = access_log
        self.metrics = metrics
        self.on_ready = on_ready
        self.supervisor = supervisor
        self._wake = asyncio.Event()
        self._stop = False
        self._reload = False
        # Upstream clients a reload replaced, closed once their requests had time to finish.
        self._retired: set[upstream.Upstream] = set()
        self._others_drained = asyncio.Event()

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
        # A worker is forked with these blocked, so that one sent before the handlers above
        # existed waits instead of being lost; in a lone process this changes nothing.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, HANDLED_SIGNALS)
        if self.supervisor is not None:
            loop.add_reader(self.supervisor.fileno(), self._from_supervisor)

        extra = [address for sock in self.guest_sockets if (address := socket_listen_address(sock))]
        self.app = ProxyApp(
            self.config,
            registry=Registry(self.config.registry),
            client=build_client(self.config.control_plane),
            sessions=self.sessions,
            metrics=self.metrics or Metrics(),
            access_log=self.access_log,
            extra_listen=extra,
            close_connections=self.close_connections,
        )
        self.app.metrics.configure(per_vm_labels=self.config.per_vm_metrics)
        side = GuestSide(self.app)  # what every guest connection of this server shares
        self.guest = uvicorn.Server(_uvicorn_config(self.app, functools.partial(GuestProtocol, side)))
        servers = [self.guest]
        self.admin: uvicorn.Server | None = None
        prober: asyncio.Task[None] | None = None
        if self.admin_socket is not None:
            self.probe = UpstreamProbe(self.app)
            # Scrapes and health checks are quick: the admin endpoint's drain is short, so
            # the whole shutdown stays within systemd's TimeoutStopSec.
            admin_config = _uvicorn_config(create_admin_app(self.app, self.probe), drain=ADMIN_DRAIN_SECONDS)
            admin_config.lifespan = "off"
            self.admin = uvicorn.Server(admin_config)
            servers.append(self.admin)

        for server in servers:
            server.config.load()
            server.lifespan = server.config.lifespan_class(server.config)
        await self.guest.startup(sockets=self.guest_sockets)
        if self.admin is not None and self.admin_socket is not None:
            await self.admin.startup(sockets=[self.admin_socket])
            prober = asyncio.create_task(self.probe.run())
        ticker = asyncio.create_task(self.guest.main_loop())  # uvicorn's Date header upkeep
        names = ", ".join(str(socket_listen_address(s) or s.getsockname()) for s in self.guest_sockets)
        admin = self.config.admin_listen if self.admin is not None else "another worker"
        log.info("serving guests on %s, admin on %s, pid %d, metadata-proxy %s", names, admin, os.getpid(), version())
        self._ready()
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
        # 2. stop accepting and let in-flight guest requests finish, bounded by DRAIN_SECONDS
        #    (our listening sockets close: new connections are refused, or, under socket
        #    activation, wait in systemd's copy for the next start);
        self.guest.should_exit = True
        await ticker
        await self.guest.shutdown()
        # 3. the admin endpoint goes last, so /healthz answers during the drain (under a
        #    supervisor, until every worker has drained, bounded like a drain);
        if self.admin is not None:
            if self.supervisor is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(DRAIN_SECONDS + 1):
                        await self._others_drained.wait()
            self.admin.should_exit = True
            await self.admin.shutdown()
        # 4. nothing uses the upstream clients any more: close them, the current one and
        #    any a reload retired less than OLD_CLIENT_GRACE ago.
        if prober is not None:
            prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await prober
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLIENT_CLOSE_SECONDS):
                await asyncio.gather(*(client.aclose() for client in (*self._retired, self.app.client)))
        # 5. the last request lines and metric updates, batched (batch.Batch), before the
        #    loop stops (a worker's counts go to the multiprocess files here, before it exits).
        self.app.access_log.flush()
        self.app.metrics.apply()
        # 6. the admin socket's file goes: a stale one would look like a running service.
        remove_socket_file(self._admin_path)
        log.info("stopped")

    def _ready(self) -> None:
        """Serving (at start-up, and again after a reload): tell systemd or the supervisor."""
        self.notifier.ready()
        if self.supervisor is not None:
            with contextlib.suppress(OSError):
                self.supervisor.send(READY_MESSAGE)

    def _from_supervisor(self) -> None:
        assert self.supervisor is not None
        try:
            data = self.supervisor.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if DRAINED_MESSAGE in data:
            self._others_drained.set()
        if not data:
            asyncio.get_running_loop().remove_reader(self.supervisor.fileno())
            self._others_drained.set()  # nobody left to wait for
            if not self._stop:
                # Nothing else would ever stop this worker: without its supervisor, its
                # sockets and this process would outlive the service.
                log.error("the supervisor is gone; stopping")
                self.request_stop()

    def reload(self) -> None:
        """SIGHUP: re-read the config and apply it to requests that begin from now on."""
        self.notifier.reloading()
        # Under a supervisor, it counts reloads once for the service (it validated this one).
        counted = self.supervisor is None
        try:
            if self.config_path is None:
                raise ConfigError("no config file to reload (started without --config)")
            new = load_config(self.config_path)
            check_input_files(new)
            client = build_client(new.control_plane) if new.control_plane != self.config.control_plane else None
        except (ConfigError, OSError, ValueError) as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            if counted:
                self.app.metrics.reloads.labels("refused").inc()
            self._ready()
            return
        new, fixed = keep_fixed(self.config, new)
        if fixed:
            log.warning("reload: %s change only on restart; keeping the running values", ", ".join(fixed))
        old_client = self.app.client
        if new.registry != self.config.registry:
            self.app.registry = Registry(new.registry)  # read at its first lookup
        self.app.configure(new, client or old_client)
        if client is not None:
            self._retired.add(old_client)
            asyncio.get_running_loop().call_later(OLD_CLIENT_GRACE, self._close_retired, old_client)
        self.config = new
        if counted:
            self.app.metrics.reloads.labels("applied").inc()
        log.info("reloaded %s", self.config_path)
        self._ready()

    def _close_retired(self, client: upstream.Upstream) -> None:
        if client in self._retired:
            self._retired.discard(client)
            task = asyncio.ensure_future(client.aclose())
            task.add_done_callback(lambda done: done.exception())  # nothing to do on failure

    def close_connections(self, holders: Mapping[str, VM | None]) -> int:
        """For each address in `holders` whose VM no longer holds it (removed, or the address
        handed on), the guest connections its old holder opened: each closes after the
        request it is answering, or, idle, at its next request (answered 403 `unknown_vm`
        with `Connection: close`, README "Design choices") or its keep-alive deadline, whichever comes
        first (GuestProtocol.owner_lost). Those the new holder opened stay. Returns how many
        had a request in progress."""
        ending = 0
        for connection in list(self.guest.server_state.connections):
            if (
                isinstance(connection, GuestProtocol)
                and connection.client
                and connection.client[0] in holders
                and connection.owner.lost(holders[connection.client[0]])
                and connection.owner_lost()
            ):
                ending += 1
        return ending


def open_sockets(config: Config, environ: Mapping[str, str]) -> tuple[list[socket.socket], socket.socket]:
    """The guest sockets (systemd's when passed, else bound from `listen`) and the admin one."""
    guest = systemd.listen_fds(environ)
    admin: socket.socket | None = None
    try:
        if not guest:
            guest = [bind_listen(entry) for entry in config.listen]
        admin = bind_admin(config.admin_listen)
    except OSError:
        for sock in guest:
            sock.close()
        raise
    return guest, admin


# -- workers > 1: the supervisor ------------------------------------------------------------
