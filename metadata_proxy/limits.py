"""Per-VM rate and concurrency limits: a token bucket and an in-flight cap.

State lives in a bounded TTL cache keyed by VM name, so a host with thousands of VMs that
went quiet holds no state for them: an evicted VM simply starts again with a full bucket.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from cachetools import TTLCache

from .config import Limits

# More VMs than any one host runs; the TTL does the real eviction.
_MAX_TRACKED_VMS = 65536
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
        self._buckets: TTLCache[str, _Bucket] = TTLCache(_MAX_TRACKED_VMS, _IDLE_SECONDS, timer=clock)

    def acquire(self, vm: str) -> int | None:
        """Admit one request from `vm`: None when admitted (call release() after),
        else the seconds the guest should wait (for Retry-After)."""
        limits = self.limits
        now = self._clock()
        bucket = self._buckets.get(vm)
        if bucket is None:
            bucket = _Bucket(float(limits.burst), now)
        else:
            bucket.tokens = min(float(limits.burst), bucket.tokens + (now - bucket.stamp) * limits.requests_per_second)
            bucket.stamp = now
        # Re-inserting refreshes the entry's TTL: only quiet VMs are evicted.
        self._buckets[vm] = bucket
        if bucket.in_flight >= limits.max_concurrent:
            return 1
        if bucket.tokens < 1.0:
            return max(1, math.ceil((1.0 - bucket.tokens) / limits.requests_per_second))
        bucket.tokens -= 1.0
        bucket.in_flight += 1
        return None

    def release(self, vm: str) -> None:
        bucket = self._buckets.get(vm)
        if bucket is not None and bucket.in_flight > 0:
            bucket.in_flight -= 1

    def __len__(self) -> int:
        return len(self._buckets)
