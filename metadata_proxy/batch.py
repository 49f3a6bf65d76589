"""Work that every guest request would otherwise pay for on its own, done for many at once.

The access log (`logs.AccessLog`) writes its lines and the metrics (`metrics.Metrics`) apply
their updates through one `Batch` each: a write per line was a system call per request, a
prometheus-client update a lock and several calls per request (bench/ has the numbers).
A loop pass is not enough to share: when guests come one at a time, every pass holds a
single request, so the work waits a short, fixed DELAY after the first request that needs it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

# How long a log line or a metric update may wait for others. Short against a scrape
# interval or a reader of the journal; long against a request (a few hundred µs).
DELAY = 0.01


class Batch:
    """Runs `work` DELAY after the first `schedule()` since it last ran, from the running
    event loop; outside an event loop (a CLI, a test without one) at once.

    On the hot path the caller tests `scheduled` before calling `schedule()`: a method call
    per update is part of what batching saves. Calling `work` directly (before the loop
    stops, before a scrape) is fine: the scheduled run then finds less, or nothing, to do.
    """

    __slots__ = ("_work", "delay", "scheduled")

    def __init__(self, work: Callable[[], None], delay: float = DELAY) -> None:
        self._work = work
        self.delay = delay
        self.scheduled = False

    def schedule(self) -> None:
        if self.scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._work()
            return
        self.scheduled = True
        loop.call_later(self.delay, self._run)

    def _run(self) -> None:
        self.scheduled = False
        self._work()
