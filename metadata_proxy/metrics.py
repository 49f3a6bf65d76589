"""Prometheus metrics (prometheus-client), one CollectorRegistry per proxy.

No token, fingerprint or request path is ever a label: VM names and route prefixes are
bounded by the registry and the config, status codes and refusal codes by the code.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .registry import VM

EXPIRING_SOON_SECONDS = 3600


class _RegistryCollector(Collector):
    """Registry-derived gauges, computed at scrape time from the current snapshot."""

    def __init__(self, vms: Callable[[], Iterable[VM]], available: Callable[[], bool]) -> None:
        self._vms = vms
        self._available = available

    def collect(self) -> Iterable[GaugeMetricFamily]:
        vms = list(self._vms())
        now = time.time()
        soon = sum(1 for vm in vms if vm.token_exp is not None and vm.token_exp - now < EXPIRING_SOON_SECONDS)
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


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
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
        self.in_flight = Gauge("metadata_proxy_in_flight", "Guest requests being handled", registry=r)
        self.reloads = Counter("metadata_proxy_reloads", "Config reloads, by result", ["result"], registry=r)
        self.registry_reloads = Counter(
            "metadata_proxy_registry_reloads", "Times the registry snapshot was re-read after a change", registry=r
        )
        self.upstream_ready = Gauge(
            "metadata_proxy_upstream_reachable",
            "1 when the control plane answered the last readiness probe",
            registry=r,
        )

    def watch_registry(self, vms: Callable[[], Iterable[VM]], available: Callable[[], bool]) -> None:
        self.registry.register(_RegistryCollector(vms, available))

    def render(self) -> bytes:
        return generate_latest(self.registry)
