"""The service's lifecycle: sockets (bound or passed by systemd), two uvicorn servers (guest
and admin) on one event loop, sd_notify, SIGHUP reload and SIGTERM drain; and, with
`workers` > 1, the supervisor that forks the workers and speaks for them to systemd.

Signal handlers only record what was asked; `ProxyServer.run` (and `Supervisor.run`)
act on it in order. We drive uvicorn's `startup`/`main_loop`/`shutdown` ourselves instead
of `serve()` because `serve()` owns SIGTERM/SIGINT and re-raises them before our own
shutdown steps could run.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import selectors
import signal
import socket
import sys
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NoReturn

import uvicorn
import uvloop
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from . import guards, systemd, upstream
from .admin import UpstreamProbe, create_admin_app
from .app import ProxyApp
from .config import Config, ConfigError, ListenAddress, check_input_files, load_config
from .forward import build_client
from .logs import AccessLog, new_request_id
from .metrics import Metrics, forget_process
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
# The rest of the shutdown after the guest drain; all of it stays under TimeoutStopSec.
ADMIN_DRAIN_SECONDS = 2.0
CLIENT_CLOSE_SECONDS = 2.0
HANDLED_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})

# The supervisor (workers > 1).
READY_MESSAGE = b"R"  # worker to supervisor: serving (at start-up, and after each reload)
DRAINED_MESSAGE = b"D"  # supervisor to the admin worker, when stopping: the others are done
SUPERVISOR_TICK = 1.0
# More worker deaths than this within the window and the supervisor stops restarting them.
RESTART_LIMIT = 5
RESTART_WINDOW = 60.0
EXIT_GAVE_UP = 1
# A worker that has not confirmed a reload by then no longer holds READY=1 back.
RELOAD_SECONDS = 10.0
# A worker's drain and its last steps; then it is killed. Under TimeoutStopSec (30 s).
STOP_SECONDS = DRAIN_SECONDS + 6.0


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
        # At most one deadline timer per connection rather than one per request: a request
        # head only notes when it began, and the timer, when it fires, re-arms itself for a
        # head that began after it was armed (call_later and cancel on every request cost
        # µs, bench/).
        self._head_timer: asyncio.TimerHandle | None = None
        self._in_head = False  # between a request's first byte and the end of its headers
        self._head_began = 0.0
        self._head_bytes = 0
        self._heads_begun = 0
        self._timer_head = 1  # the head the timer was armed for: the connection's is the first head's
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
        self._head_began = self.loop.time()
        self._head_bytes = 0
        self._heads_begun += 1
        if self._head_timer is None:
            self._timer_head = self._heads_begun
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timeout)

    def on_headers_complete(self) -> None:
        self._in_head = False  # the timer, if it fires before the next head, finds nothing to do
        super().on_headers_complete()

    def _head_timeout(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if not self._in_head:
            if not self._heads_begun:
                self.transport.close()  # connected and never sent a byte: nothing to answer
            return  # every head so far was complete in time; the next one arms a timer again
        if self._timer_head != self._heads_begun:
            # Armed for an earlier head: this one's deadline runs from its own first byte.
            self._timer_head = self._heads_begun
            self._head_timer = self.loop.call_at(self._head_began + self.header_timeout, self._head_timeout)
        elif self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head behind a request still being answered: wait for that answer.
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timeout)
        else:
            self.refuse(guards.REQUEST_TIMEOUT)

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to what llhttp cannot parse (smuggling shapes included)."""
        self.refuse(guards.MALFORMED)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        # llhttp rejects some requests only after their headers were complete and the app's
        # task was created (a Transfer-Encoding other than chunked, a malformed chunk): the
        # app must not then forward what the guest was told is malformed. This runs when the
        # task starts, and hands back the app's own coroutine: a coroutine awaiting it would be
        # one more frame for each suspension and resumption of every request to pass through.
        def unless_refused(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> Awaitable[None]:
            if cycle.disconnected:
                nothing: asyncio.Future[None] = self.loop.create_future()
                nothing.set_result(None)
                return nothing
            return app(scope, receive, send)

        super()._start_asgi_task(cycle, unless_refused)

    def refuse(self, refusal: guards.Refusal) -> None:
        """Answer for a request the app never saw, then close; counted and logged like the app's."""
        request_id = new_request_id()
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
            app.metrics.labelled(app.metrics.refusals, refusal.code).inc()
            app.access_log.write(
                request_id=request_id,
                peer=self._peer,
                vm=None,
                vm_id=None,
                method=None,
                path=None,
                route=None,
                status=refusal.status,
                code=refusal.code,
                duration_ms=None,
                upstream_status=None,
                cache=None,
            )


def _uvicorn_config(
    app: object, protocol: type[asyncio.Protocol] | None = None, drain: float = DRAIN_SECONDS
) -> uvicorn.Config:
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
        timeout_graceful_shutdown=int(drain),
    )


def keep_fixed(running: Config, new: Config) -> tuple[Config, list[str]]:
    """`new` with the running values of the keys only a restart changes (the sockets are
    open, the workers forked), and the names of those that differed."""
    fixed = [key for key in ("listen", "admin_listen", "workers") if getattr(new, key) != getattr(running, key)]
    kept = replace(new, listen=running.listen, admin_listen=running.admin_listen, workers=running.workers)
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
            metrics=self.metrics,
            access_log=self.access_log,
            extra_listen=extra,
            close_connections=self.close_connections,
        )
        protocol = type("BoundGuestProtocol", (GuestProtocol,), {"proxy_app": self.app, "open_by_peer": Counter()})
        self.guest = uvicorn.Server(_uvicorn_config(self.app, protocol))
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
        log.info("serving guests on %s, admin on %s, pid %d", names, admin, os.getpid())
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
            self.app.registry = Registry(new.registry)
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


# -- workers > 1: the supervisor ------------------------------------------------------------


@dataclass(slots=True)
class _Worker:
    slot: int  # slot 0 also serves the admin endpoint
    pid: int
    channel: socket.socket  # the supervisor's end
    ready: bool = False


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            return f"killed by {signal.Signals(number).name}"
        except ValueError:
            return f"killed by signal {number}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


class Supervisor:
    """`workers` > 1: the main process forks the workers and watches over them.

    It holds what the workers share and is the one systemd hears from (the unit's
    `NotifyAccess=main`):

    - the listening sockets (systemd's or bound), inherited by every worker: the kernel
      hands each new connection to one of the workers waiting on them;
    - the session-token key, drawn before the first fork, so that every worker accepts a
      token another one issued;
    - READY=1 once every worker has reported ready on its channel; RELOADING=1 and READY=1
      around a reload, which the supervisor validates first and then forwards as SIGHUP to
      every worker; STOPPING=1 and the ordered stop of `_shutdown`.

    Worker 0 also serves the admin endpoint; its /metrics sums the values of every process
    (prometheus-client's multiprocess mode, files in `metrics_dir`). A worker that dies is
    replaced, worker 0 with the admin socket, which stays open here meanwhile (scrapes wait
    in its backlog), unless more than RESTART_LIMIT died within RESTART_WINDOW: restarting
    is then not fixing it, and the service fails (exit 1) for systemd's Restart= to handle.

    Signal handlers only set flags; the wakeup fd makes the loop notice them at once.
    """

    def __init__(
        self,
        config: Config,
        *,
        config_path: str,
        guest_sockets: list[socket.socket],
        admin_socket: socket.socket,
        notifier: systemd.Notifier,
        metrics_dir: str,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.guest_sockets = guest_sockets
        self.admin_socket = admin_socket
        self.notifier = notifier
        self.metrics_dir = metrics_dir
        # Drawn before any fork: one key for every worker.
        self.sessions = SessionTokens()
        # The supervisor's own share of the metrics: reloads, counted once for the service.
        self.metrics = Metrics(multiprocess_dir=metrics_dir)
        self.workers: dict[int, _Worker] = {}
        self._deaths: deque[float] = deque()
        self._stop = False
        self._reload = False
        self._announced = False  # READY=1 sent for the start-up
        self._reload_waiting: set[int] | None = None  # workers yet to confirm the current reload
        self._reload_deadline = 0.0
        self._exit_code = 0

    def _on_stop(self, signum: int, frame: object) -> None:
        self._stop = True

    def _on_reload(self, signum: int, frame: object) -> None:
        self._reload = True

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; 0 after a clean stop, 1 after giving up on the workers."""
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        signal.set_wakeup_fd(self._wake_w)
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)
        # Only so that a worker's death wakes the loop (through the wakeup fd); _reap acts.
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)
        log.info("supervisor pid %d: starting %d workers", os.getpid(), self.config.workers)
        try:
            for slot in range(self.config.workers):
                self._spawn(slot)
            while not self._stop:
                self._poll(SUPERVISOR_TICK)
                self._step()
        finally:
            self._shutdown()
        return self._exit_code

    def _poll(self, timeout: float) -> None:
        """Wait for a signal or a worker's message, read what came, reap dead workers."""
        for key, _ in self._selector.select(timeout):
            if key.data is None:
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._wake_r, 512):
                        pass
            else:
                self._from_worker(key.data)
        self._reap()

    def _from_worker(self, worker: _Worker) -> None:
        try:
            data = worker.channel.recv(64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            # The worker is gone or going: _reap replaces it once it can be waited for.
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(worker.channel)
            return
        if READY_MESSAGE in data:  # started serving, or done reloading
            worker.ready = True
            if self._reload_waiting is not None:
                self._reload_waiting.discard(worker.pid)

    def _step(self) -> None:
        if not self._announced and len(self.workers) == self.config.workers:
            if all(worker.ready for worker in self.workers.values()):
                self._announced = True
                log.info("ready: %d workers serving", len(self.workers))
                self.notifier.ready()
        if self._reload_waiting is not None:
            late = self._reload_waiting
            if not late or time.monotonic() > self._reload_deadline:
                if late:
                    pids = ", ".join(str(pid) for pid in sorted(late))
                    log.warning("reload: worker pid(s) %s did not confirm within %.0f s", pids, RELOAD_SECONDS)
                log.info("reloaded %s in %d workers", self.config_path, len(self.workers))
                self._reload_waiting = None
                self.notifier.ready()
        # One reload at a time, and none before the service is up.
        if self._reload and self._announced and self._reload_waiting is None:
            self._reload = False
            self._begin_reload()

    def _begin_reload(self) -> None:
        self.notifier.reloading()
        try:
            new = load_config(self.config_path)
            check_input_files(new)
            build_client(new.control_plane)  # the checks each worker's reload makes (TLS files)
        except (ConfigError, OSError, ValueError) as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            self.metrics.reloads.labels("refused").inc()
            self.notifier.ready()
            return
        # Workers forked from now on start with it; the running ones re-read the file.
        self.config, _ = keep_fixed(self.config, new)
        self.metrics.reloads.labels("applied").inc()
        self._reload_waiting = {pid for pid, worker in self.workers.items() if worker.ready}
        self._reload_deadline = time.monotonic() + RELOAD_SECONDS
        for pid in self.workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker = self.workers.pop(pid, None)
            if worker is None:
                continue
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(worker.channel)
            worker.channel.close()
            forget_process(pid, self.metrics_dir)  # its in-flight gauge no longer counts
            if self._reload_waiting is not None:
                self._reload_waiting.discard(pid)
            if self._stop:
                continue  # stopping: every worker is meant to exit
            now = time.monotonic()
            self._deaths.append(now)
            while self._deaths[0] < now - RESTART_WINDOW:
                self._deaths.popleft()
            how = _describe(status)
            if len(self._deaths) > RESTART_LIMIT:
                log.error(
                    "worker %d (pid %d) died: %s; %d deaths within %.0f s, giving up",
                    worker.slot,
                    pid,
                    how,
                    len(self._deaths),
                    RESTART_WINDOW,
                )
                self._exit_code = EXIT_GAVE_UP
                self._stop = True
            else:
                log.error("worker %d (pid %d) died: %s; restarting it", worker.slot, pid, how)
                self._spawn(worker.slot)

    def _spawn(self, slot: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # What sits in our buffers would be written a second time by the child.
        sys.stdout.flush()
        sys.stderr.flush()
        # The worker inherits these blocked, and they stay pending until its own handlers
        # exist (ProxyServer.run); ours would swallow them in the child meanwhile.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                self._worker(slot, theirs, ours)  # never returns
        except OSError:
            ours.close()
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
            theirs.close()
        ours.setblocking(False)
        worker = _Worker(slot, pid, ours)
        self.workers[pid] = worker
        self._selector.register(ours, selectors.EVENT_READ, worker)

    def _worker(self, slot: int, channel: socket.socket, supervisor_end: socket.socket) -> NoReturn:
        """The child's side of `_spawn`: undo the supervisor's set-up, then serve."""
        code = 1
        try:
            signal.set_wakeup_fd(-1)
            for sig in (*HANDLED_SIGNALS, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)  # the first three stay blocked until run()
            self._selector.close()
            os.close(self._wake_r)
            os.close(self._wake_w)
            supervisor_end.close()
            for other in self.workers.values():
                # A copy held here would keep that worker's channel open after the supervisor died.
                other.channel.close()
            self.notifier.close()
            admin = self.admin_socket if slot == 0 else None
            if admin is None:
                self.admin_socket.close()
            channel.setblocking(False)
            server = ProxyServer(
                self.config,
                config_path=self.config_path,
                guest_sockets=self.guest_sockets,
                admin_socket=admin,
                notifier=systemd.Notifier(None),  # NotifyAccess=main: only the supervisor talks to systemd
                sessions=self.sessions,
                metrics=Metrics(multiprocess_dir=self.metrics_dir),
                supervisor=channel,
            )
            uvloop.run(server.run())
            code = 0
        except BaseException:
            log.exception("worker %d failed", slot)
        finally:
            # Never return into the supervisor's code: its finally blocks and atexit hooks
            # (which remove the metrics directory) belong to the supervisor alone.
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code)

    def _shutdown(self) -> None:
        """The ordered stop (SIGTERM, SIGINT, or giving up on the workers)."""
        self._stop = True
        # 1. Tell systemd, so it does not count the drain as a hang.
        self.notifier.stopping()
        log.info("stopping: %d worker(s) draining for up to %.0f s", len(self.workers), DRAIN_SECONDS)
        # 2. Close our copies of the guest sockets. A listening socket stays open while any
        #    process holds it: new connections would queue here, where nobody accepts them,
        #    instead of being refused once the workers have closed theirs.
        for sock in self.guest_sockets:
            sock.close()
        # 3. Each worker stops accepting and drains its in-flight requests (ProxyServer.run).
        for pid in self.workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        # 4. Wait for them, within a bound shorter than the unit's TimeoutStopSec; kill the
        #    rest. The admin worker answers /healthz and /metrics until the others are done.
        deadline = time.monotonic() + STOP_SECONDS
        released = False
        while self.workers and (remaining := deadline - time.monotonic()) > 0:
            if not released and all(worker.slot == 0 for worker in self.workers.values()):
                released = True
                for worker in self.workers.values():
                    with contextlib.suppress(OSError):
                        worker.channel.send(DRAINED_MESSAGE)
            self._poll(min(remaining, SUPERVISOR_TICK))
        for pid, worker in list(self.workers.items()):
            log.error("worker %d (pid %d) did not stop within %.0f s; killing it", worker.slot, pid, STOP_SECONDS)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
            worker.channel.close()
        self.workers.clear()
        # 5. Nothing is left to serve: the admin socket, our signal plumbing.
        self.admin_socket.close()
        signal.set_wakeup_fd(-1)
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        log.info("stopped")
