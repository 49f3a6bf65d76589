"""Prometheus metrics (prometheus-client), one CollectorRegistry per proxy.

No token, fingerprint or request path is ever a label: VM names and route prefixes are
bounded by the registry and the config, status codes and refusal codes by the code.

With several workers (`workers` > 1) every process keeps its values in files under one
directory (prometheus-client's multiprocess mode, chosen by PROMETHEUS_MULTIPROC_DIR
before prometheus_client is first imported: see cli.cmd_serve), and `render` sums them.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .batch import Batch
from .registry import VM
from .version import version

EXPIRING_SOON_SECONDS = 3600

_Metric = TypeVar("_Metric", Counter, Gauge, Histogram)


class _RegistryCollector(Collector):
    """Registry-derived gauges, computed at scrape time from the current snapshot."""

    def __init__(self, vms: Callable[[], Iterable[VM]], available: Callable[[], bool]) -> None:
        self._vms = vms
        self._available = available

    def collect(self) -> Iterable[GaugeMetricFamily]:
        vms = list(self._vms())
        now = time.time()
        # Soon, not already: an expired token is counted once, under tokens_expired.
        soon = sum(1 for vm in vms if vm.token_exp is not None and now < vm.token_exp < now + EXPIRING_SOON_SECONDS)
        expired = sum(1 for vm in vms if vm.token_exp is not None and vm.token_exp <= now)
        yield GaugeMetricFamily("metadata_proxy_registry_vms", "VMs in the registry snapshot", value=len(vms))
        yield GaugeMetricFamily(
            "metadata_proxy_registry_available",
            "1 when the registry was readable at the last check",
            value=1 if self._available() else 0,
        )
        yield GaugeMetricFamily(
            "metadata_proxy_tokens_expiring_soon", f"VM tokens expiring within {EXPIRING_SOON_SECONDS} s", value=soon
        )
        yield GaugeMetricFamily("metadata_proxy_tokens_expired", "VM tokens already expired", value=expired)


class _BuildInfo(Collector):
    """metadata_proxy_build_info: 1, labelled with the running version (the Prometheus
    convention for telling which build answers). Computed at scrape time: no per-process file."""

    def collect(self) -> Iterable[GaugeMetricFamily]:
        info = GaugeMetricFamily(
            "metadata_proxy_build_info", "The running build: 1, labelled with its version", labels=["version", "python"]
        )
        info.add_metric([version(), platform.python_version()], 1)
        yield info


class Metrics:
    """The proxy's metrics. What every guest request updates goes through `count`,
    `observe_upstream` and the count given to `watch_in_flight`, batched: prometheus-client
    takes a lock and makes several calls for each update, a share of a forwarded request's
    CPU that bench/ measures, so updates are applied batch.DELAY after the first of them
    (`batch.Batch`), once per label set, and before every scrape (`render`)."""

    def __init__(self, multiprocess_dir: str | None = None) -> None:
        """`multiprocess_dir`: the PROMETHEUS_MULTIPROC_DIR of a service with several workers."""
        self.multiprocess_dir = multiprocess_dir
        # False (config `per_vm_metrics`): requests are counted without the VM's name, so the
        # series no longer grow with the number of VMs (README, "Health and metrics").
        self.per_vm_labels = True
        self._scrape_time: list[Collector] = [_BuildInfo()]
        self._children: dict[tuple[object, ...], Counter | Gauge | Histogram] = {}
        self._counts: dict[tuple[Counter, *tuple[str, ...]], int] = {}  # (counter, *labels) -> increments
        self._upstream_seconds: list[float] = []  # observations to apply
        self._batch = Batch(self.apply)
        # Requests being handled, read when the batch is applied (the app's own count, given
        # by watch_in_flight: a Gauge inc and dec per request would be two more locked updates).
        self._in_flight_now: Callable[[], int] | None = None
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        r.register(self._scrape_time[0])
        self.requests = Counter(
            "metadata_proxy_requests", "Guest requests answered", ["vm", "route", "status"], registry=r
        )
        self.refusals = Counter(
            "metadata_proxy_refusals", "Requests refused by the proxy, by error code", ["code"], registry=r
        )
        self.upstream_seconds = Histogram(
            "metadata_proxy_upstream_seconds",
            "Time to the control plane's response head",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.upstream_errors = Counter(
            "metadata_proxy_upstream_errors", "Upstream calls that failed, by error code", ["code"], registry=r
        )
        self.cache = Counter("metadata_proxy_cache", "Response cache lookups", ["result"], registry=r)
        # Summed over the live workers; a dead worker's requests are no longer in flight.
        self.in_flight = Gauge(
            "metadata_proxy_in_flight", "Guest requests being handled", registry=r, multiprocess_mode="livesum"
        )
        self.reloads = Counter("metadata_proxy_reloads", "Config reloads, by result", ["result"], registry=r)
        self.registry_reloads = Counter(
            "metadata_proxy_registry_reloads", "Times the registry snapshot was re-read after a change", registry=r
        )
        self.upstream_ready = Gauge(
            "metadata_proxy_upstream_reachable",
            "1 when the control plane answered the last readiness probe",
            registry=r,
            multiprocess_mode="livemax",  # only the worker serving the admin endpoint probes
        )

    def configure(self, *, per_vm_labels: bool) -> None:
        """Settings from the config, applied from start-up (a change needs a restart)."""
        self.per_vm_labels = per_vm_labels

    def count(self, counter: Counter, *values: str) -> None:
        """`counter.labels(*values).inc()`, within batch.DELAY."""
        if counter is self.requests and not self.per_vm_labels:
            values = ("", *values[1:])  # an empty label is no label to Prometheus: one series for all VMs
        key: tuple[Counter, *tuple[str, ...]] = (counter, *values)
        self._counts[key] = self._counts.get(key, 0) + 1
        if not self._batch.scheduled:
            self._batch.schedule()

    def observe_upstream(self, seconds: float) -> None:
        """`upstream_seconds.observe(seconds)`, within batch.DELAY."""
        self._upstream_seconds.append(seconds)
        if not self._batch.scheduled:
            self._batch.schedule()

    def apply(self) -> None:
        """Apply the batched updates now (the app also calls this on its registry watch)."""
        counts, self._counts = self._counts, {}
        for (counter, *values), n in counts.items():
            (self.labelled(counter, *values) if values else counter).inc(n)
        if self._upstream_seconds:
            seconds, self._upstream_seconds = self._upstream_seconds, []
            for value in seconds:
                self.upstream_seconds.observe(value)
        if self._in_flight_now is not None:
            self.in_flight.set(self._in_flight_now())

    def labelled(self, metric: _Metric, *values: str) -> _Metric:
        """`metric.labels(*values)`, looked up once per label set: labels() validates and takes
        a lock on every call, several µs that each guest request would pay (bench/)."""
        key = (metric, *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child  # type: ignore[return-value]

    def watch_in_flight(self, in_flight_now: Callable[[], int]) -> None:
        """`in_flight_now()`: the requests being handled, read into the in-flight gauge
        whenever the batch is applied."""
        self._in_flight_now = in_flight_now

    def watch_registry(self, vms: Callable[[], Iterable[VM]], available: Callable[[], bool]) -> None:
        collector = _RegistryCollector(vms, available)
        self._scrape_time.append(collector)
        self.registry.register(collector)

    def render(self) -> bytes:
        self.apply()
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        # Every process's counters, histograms and gauges, summed; the registry gauges are
        # the same in every worker (one registry file), so this process's are the answer.
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        for collector in self._scrape_time:
            registry.register(collector)
        return generate_latest(registry)


def forget_process(pid: int, multiprocess_dir: str) -> None:
    """A worker exited: its live gauges (in flight) stop counting; its counters stay."""
    multiprocess.mark_process_dead(pid, multiprocess_dir)  # type: ignore[no-untyped-call]
