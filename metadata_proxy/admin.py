"""The admin endpoint (unix socket or loopback, never a guest address):
/healthz, /readyz and /metrics.

/readyz is cheap: it reads two facts kept up to date in the background, the registry's
last read (the app's watcher, every 0.25 s) and the last control-plane probe.
"""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from . import upstream
from .app import ProxyApp

log = logging.getLogger("metadata_proxy")

PROBE_INTERVAL = 2.0
# A probe older than this no longer counts: "a few seconds old at most".
PROBE_MAX_AGE = 5.0


class UpstreamProbe:
    """Asks the control plane for anything every PROBE_INTERVAL; any HTTP answer counts."""

    def __init__(self, app: ProxyApp) -> None:
        self.app = app
        self.last_ok = 0.0
        self.last_error: str | None = "not probed yet"
        # What the last probe found, None before the first: the first answer is logged
        # either way (an operator starting the service wants to know), then every change.
        self.reachable: bool | None = None

    @property
    def ready(self) -> bool:
        return time.monotonic() - self.last_ok <= PROBE_MAX_AGE

    async def probe(self) -> None:
        client = self.app.client
        try:
            async with asyncio.timeout(self.app.config.control_plane.timeout):
                response = await client.request("HEAD", b"/", [(b"x-metadata-proxy-host", b"readiness-probe")])
                await response.aclose()
        except (upstream.UpstreamError, TimeoutError) as exc:
            self.last_error = str(exc) or type(exc).__name__
            if self.reachable is not False:
                log.warning("control plane %s unreachable: %s", self.app.config.control_plane.url, self.last_error)
            self.reachable = False
            self.app.metrics.upstream_ready.set(0)
            return
        if self.reachable is not True:
            log.info("control plane %s reachable", self.app.config.control_plane.url)
        self.reachable = True
        self.last_ok = time.monotonic()
        self.last_error = None
        self.app.metrics.upstream_ready.set(1)

    async def run(self) -> None:
        while True:
            await self.probe()
            await asyncio.sleep(PROBE_INTERVAL)


def create_admin_app(app: ProxyApp, probe: UpstreamProbe) -> Starlette:
    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        registry_error = app.registry.error
        checks = {
            "registry": "ok" if registry_error is None else "unavailable",
            "control_plane": "ok" if probe.ready else "unreachable",
        }
        ready = registry_error is None and probe.ready
        return JSONResponse({"status": "ready" if ready else "not_ready", "checks": checks}, 200 if ready else 503)

    async def metrics(request: Request) -> Response:
        return PlainTextResponse(app.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            Route("/metrics", metrics),
        ]
    )
