"""Per-VM rate and concurrency limits: a token bucket and an in-flight cap.

State lives in a plain dict keyed by the VM's identity (the app's: name and id), swept
every _IDLE_SECONDS of the VMs quiet for that long with nothing in flight, so a host with
thousands of VMs that went quiet holds no state for them: what is tracked is at most the
registered VMs (nothing else reaches the limiter) that sent a request in the last two idle
periods or still have one in flight (a long-poll may be held for longer than a period, and
must keep counting against its VM's `max_concurrent`; a VM removed or replaced meanwhile is
tracked until its last request ends). A VM quiet that long starts again with a full bucket,
evicted or not. A dict rather than cachetools' TTLCache, whose expiry bookkeeping on every
get and set (a linked list, the clock) cost several µs a request (bench/).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable

from .config import Limits

_IDLE_SECONDS = 300.0


class _Bucket:
    __slots__ = ("tokens", "stamp", "in_flight")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp
        self.in_flight = 0


class Limiter:
    def __init__(self, limits: Limits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._buckets: dict[Hashable, _Bucket] = {}
        self._next_sweep = clock() + _IDLE_SECONDS

    def reconfigure(self, limits: Limits) -> None:
        """Reloaded limits, for the requests admitted from now on; each VM's bucket and
        in-flight count carry over."""
        self.limits = limits

    def acquire(self, vm: Hashable) -> int | None:
        """Admit one request from `vm`: None when admitted (call release() after),
        else the seconds the guest should wait (for Retry-After)."""
        limits = self.limits
        now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        bucket = self._buckets.get(vm)
        if bucket is None:
            bucket = self._buckets[vm] = _Bucket(float(limits.burst), now)
        elif now - bucket.stamp > _IDLE_SECONDS:  # quiet, kept for what it has in flight: as if evicted
            bucket.tokens, bucket.stamp = float(limits.burst), now
        else:
            bucket.tokens = min(float(limits.burst), bucket.tokens + (now - bucket.stamp) * limits.requests_per_second)
            bucket.stamp = now  # the VM's last request: what the sweep judges quietness by
        if bucket.in_flight >= limits.max_concurrent:
            return 1
        if bucket.tokens < 1.0:
            return max(1, math.ceil((1.0 - bucket.tokens) / limits.requests_per_second))
        bucket.tokens -= 1.0
        bucket.in_flight += 1
        return None

    def release(self, vm: Hashable) -> None:
        bucket = self._buckets.get(vm)
        if bucket is not None and bucket.in_flight > 0:
            bucket.in_flight -= 1

    def _sweep(self, now: float) -> None:
        """Forget the VMs whose last request is more than _IDLE_SECONDS old and that have
        nothing in flight."""
        self._next_sweep = now + _IDLE_SECONDS
        quiet = now - _IDLE_SECONDS
        self._buckets = {vm: b for vm, b in self._buckets.items() if b.stamp > quiet or b.in_flight}

    def __len__(self) -> int:
        return len(self._buckets)
