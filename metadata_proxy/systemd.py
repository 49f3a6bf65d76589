"""systemd integration: readiness notification (sd_notify), socket activation, and
whether stdout goes to the journal.

Standard library only: the protocols are a few lines each, and libsystemd bindings would
be a compiled dependency for that. Nothing here reads ``os.environ`` by itself; the
server hands its environment in once at start-up (`Notifier.from_environ`,
`listen_fds`, `connected_to_journal`).

Errors::

    SystemdError
    └── ListenFdsError   $LISTEN_FDS / $LISTEN_PID malformed, or a passed fd is not a socket

Notification failures are never raised: a service that cannot reach systemd should keep
serving, and systemd's own timeouts deal with a unit that never said READY=1.
"""

from __future__ import annotations

import io
import os
import socket
import time
from collections.abc import Mapping, MutableMapping
from typing import IO

# sd_listen_fds(3): passed descriptors start right after stdin, stdout and stderr.
LISTEN_FDS_START = 3

_LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def connected_to_journal(environ: Mapping[str, str], stream: IO[str]) -> bool:
    """True when `stream` is the journal stream systemd connected us to.

    systemd.exec(5): ``$JOURNAL_STREAM`` holds the device and inode numbers of the stdout
    or stderr it connected to journald; a program compares them with its own descriptor
    (a shell redirection or a pipe inherits the variable but not the descriptor).
    """
    raw = environ.get("JOURNAL_STREAM", "")
    device, _, inode = raw.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError, io.UnsupportedOperation):
        return False
    return (info.st_dev, info.st_ino) == (int(device), int(inode))


class SystemdError(Exception):
    """Base of this module's errors."""


class ListenFdsError(SystemdError):
    """The socket-activation environment is malformed, or a passed fd is not a socket."""


class Notifier:
    """Sends sd_notify(3) state changes to the service manager.

    Without ``$NOTIFY_SOCKET`` (not started by systemd, or not ``Type=notify``) every
    method is a no-op that returns False, so callers need no special case. Each method
    returns True when the datagram was sent.
    """

    def __init__(self, address: str | None) -> None:
        self._address = address
        self._sock: socket.socket | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Notifier:
        """Build a notifier from ``$NOTIFY_SOCKET``.

        The socket is a file-system path or, with a leading ``@``, a name in the abstract
        namespace; any other form (a relative path, ``vsock:`` of newer systemd versions)
        is not supported and leaves the notifier disabled, as sd_notify(3) does.
        """
        raw = environ.get("NOTIFY_SOCKET", "")
        address: str | None
        if raw.startswith("/"):
            address = raw
        elif raw.startswith("@") and len(raw) > 1:
            address = "\0" + raw[1:]
        else:
            address = None
        return cls(address)

    @property
    def enabled(self) -> bool:
        """True when there is a notification socket to talk to."""
        return self._address is not None

    def notify(self, state: str) -> bool:
        """Send one raw notification, newline-separated ``KEY=VALUE`` assignments."""
        if self._address is None:
            return False
        try:
            if self._sock is None:
                # Python sockets are created close-on-exec, so nothing we start inherits it.
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.sendto(state.encode(), self._address)
        except OSError:
            return False
        return True

    def ready(self) -> bool:
        """Serving: at start-up, and again once a reload has finished."""
        return self.notify("READY=1")

    def reloading(self) -> bool:
        """A reload (SIGHUP) begins; send `ready` when it is done.

        The timestamp is required by ``Type=notify-reload`` (systemd 253 and newer), which
        matches it against the reload it asked for; plain ``Type=notify`` ignores it.
        """
        return self.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self) -> bool:
        """Shutdown begins (draining); systemd shows the unit as deactivating."""
        return self.notify("STOPPING=1")

    def close(self) -> None:
        """Release the notification socket (a later call opens it again)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def listen_fds_with_names(environ: Mapping[str, str], *, unset: bool = True) -> list[tuple[str, socket.socket]]:
    """The sockets systemd passed in, each with its ``FileDescriptorName=``, in fd order.

    Follows sd_listen_fds_with_names(3): nothing was passed unless ``$LISTEN_PID`` is this
    very process (the variables may have been inherited from a parent that was activated);
    the fds start at 3; a missing ``$LISTEN_FDNAMES`` names every fd "unknown". Each fd is
    made close-on-exec, so nothing this process starts inherits a listening socket.

    With ``unset`` (the default), the three variables are removed from ``environ`` when it
    is mutable (``os.environ``), so a worker or subprocess never mistakes them for its own.

    The sockets are built with ``socket.socket(fileno=fd)``, which asks the kernel for the
    family, type and protocol (SO_DOMAIN, SO_TYPE, SO_PROTOCOL). uvicorn's own fd support
    (``--fd``; ``Config.bind_socket`` in uvicorn/config.py, ``Server.startup`` in
    uvicorn/server.py) instead wraps the fd with ``socket.fromfd(fd, AF_UNIX, SOCK_STREAM)``,
    hard-coding AF_UNIX: a TCP socket then claims to be a unix socket, uvloop's
    ``create_server`` takes its AF_UNIX branch and serves it as a libuv pipe
    (``UnixTransport``), asyncio skips TCP_NODELAY, and anything that looks at the family
    (the Host-header check's list of listen addresses) is misled. Hand the sockets from
    here to uvicorn as ``Server.run(sockets=...)`` instead.
    """
    try:
        return _listen_fds(environ)
    finally:
        if unset and isinstance(environ, MutableMapping):
            for name in _LISTEN_VARIABLES:
                environ.pop(name, None)


def listen_fds(environ: Mapping[str, str], *, unset: bool = True) -> list[socket.socket]:
    """The sockets systemd passed in, in fd order (see `listen_fds_with_names`)."""
    return [sock for _, sock in listen_fds_with_names(environ, unset=unset)]


def _listen_fds(environ: Mapping[str, str]) -> list[tuple[str, socket.socket]]:
    pid_text = environ.get("LISTEN_PID")
    count_text = environ.get("LISTEN_FDS")
    if pid_text is None or count_text is None:
        return []
    try:
        pid = int(pid_text)
    except ValueError:
        raise ListenFdsError(f"LISTEN_PID is not a process id: {pid_text!r}") from None
    if pid != os.getpid():
        return []
    try:
        count = int(count_text)
    except ValueError:
        raise ListenFdsError(f"LISTEN_FDS is not a number: {count_text!r}") from None
    if count < 0:
        raise ListenFdsError(f"LISTEN_FDS is negative: {count_text!r}")
    names_text = environ.get("LISTEN_FDNAMES")
    names = ["unknown"] * count if names_text is None else names_text.split(":")
    if len(names) != count:
        raise ListenFdsError(f"LISTEN_FDNAMES names {len(names)} fds but LISTEN_FDS is {count}: {names_text!r}")

    result: list[tuple[str, socket.socket]] = []
    for fd, name in zip(range(LISTEN_FDS_START, LISTEN_FDS_START + count), names, strict=True):
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            # The service cannot start half-listening; release what was already wrapped.
            for _, built in result:
                built.close()
            raise ListenFdsError(f"fd {fd} ({name}) passed by systemd is not a usable socket: {exc.strerror}") from None
        result.append((name, sock))
    return result
