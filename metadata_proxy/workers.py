"""`workers = N`: the supervisor forks N workers, each a `server.ProxyServer` on the shared
listening sockets; restarts the ones that die (within a bound); forwards SIGHUP and
SIGTERM; and is the one process that speaks to systemd (NotifyAccess=main), the workers
reporting to it over a socketpair.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import NoReturn

import uvloop

from . import systemd
from .config import Config, ConfigError, check_input_files, load_config
from .forward import build_client
from .metrics import Metrics, forget_process
from .server import DRAIN_SECONDS, DRAINED_MESSAGE, HANDLED_SIGNALS, READY_MESSAGE, ProxyServer, keep_fixed
from .sessions import SessionTokens

log = logging.getLogger("metadata_proxy")

SUPERVISOR_TICK = 1.0
# More worker deaths than this within the window and the supervisor stops restarting them.
RESTART_LIMIT = 5
RESTART_WINDOW = 60.0
EXIT_GAVE_UP = 1
# A worker that has not confirmed a reload by then no longer holds READY=1 back.
RELOAD_SECONDS = 10.0
# A worker's drain and its last steps; then it is killed. Under TimeoutStopSec (30 s).
STOP_SECONDS = DRAIN_SECONDS + 6.0


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
