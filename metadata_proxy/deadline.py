"""One lazily re-armed timer for a sequence of deadlines (`Deadline`).

Both sides of the proxy keep a deadline per connection that moves on every request or wait:
the guest side (protocol.GuestProtocol: a head, a body, an idle keep-alive) and the upstream
side (upstream._Connection: each wait for the control plane). A `call_later` and a `cancel`
per move cost µs a request (bench/); instead one timer per connection stays armed, and when
it fires for a deadline that has moved later since, it re-arms itself for the new one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class Deadline:
    """Calls `expired()` once `loop.time()` passes the deadline last set with `at()`.

    `at()` moves the deadline (earlier re-arms the timer at once, later re-arms it only when
    it fires); `clear()` leaves no deadline (the armed timer, when it fires, does nothing);
    `cancel()` also drops the timer (the connection is gone).
    """

    __slots__ = ("_loop", "_expired", "_when", "_handle", "_armed")

    def __init__(self, loop: asyncio.AbstractEventLoop, expired: Callable[[], object]) -> None:
        self._loop = loop
        self._expired = expired
        self._when: float | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._armed = 0.0  # the time the timer was armed for

    @property
    def when(self) -> float | None:
        return self._when

    def at(self, when: float) -> None:
        self._when = when
        handle = self._handle
        if handle is not None:
            if when >= self._armed:
                return  # the timer fires first and re-arms itself for `when`
            handle.cancel()
        self._armed = when
        self._handle = self._loop.call_at(when, self._fire)

    def clear(self) -> None:
        self._when = None

    def cancel(self) -> None:
        self._when = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        when = self._when
        if when is None:
            return
        if when > self._armed:
            self._armed = when
            self._handle = self._loop.call_at(when, self._fire)
            return
        self._when = None
        self._expired()
