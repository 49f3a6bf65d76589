"""``GET /runtime/metadata``: the VM's ``metadata`` from the ``--vms`` file, long-polled.

GCP's ``wait_for_change`` semantics::

    GET /runtime/metadata                          the VM's metadata object, with its ETag
    GET /runtime/metadata?wait_for_change=true&last_etag=E[&timeout_sec=N]
                                                   held until the VM's metadata differs from E,
                                                   then answered at once; at N seconds (1..300,
                                                   default 60) answered unchanged

``/runtime/metadata/`` answers the same (a proxy route prefix ends with a slash, so a route
with a long-poll timeout can cover exactly this endpoint). Without ``last_etag`` the request
waits for the next change. Every answer is ``Cache-Control: no-store`` with ``ETag: "<hex>"``
(``last_etag`` may be given with or without the quotes). A bad parameter is 400
``bad_request``; a VM removed while its request is held gets 403 ``unknown_vm`` at once.
Without ``--vms`` every VM's metadata is ``{}`` and never changes.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from controlplane.app import authenticate, error_response
from controlplane.vms import VmDirectory

__all__ = ["DEFAULT_TIMEOUT", "MAX_TIMEOUT", "etag_of", "routes"]

DEFAULT_TIMEOUT = 60
MAX_TIMEOUT = 300
_MAX_ETAG = 128


def etag_of(metadata: dict[str, Any]) -> str:
    """The strong ETag of a metadata object: a hash of its canonical JSON, quoted."""
    canonical = json.dumps(metadata, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return '"' + hashlib.sha256(canonical.encode()).hexdigest()[:20] + '"'


class _BadRequest(Exception):
    pass


def _single(request: Request, name: str) -> str | None:
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise _BadRequest(f"{name} is given more than once")
    return values[0] if values else None


def _parameters(request: Request) -> tuple[bool, str | None, int]:
    """(wait_for_change, last_etag without quotes, timeout_sec); _BadRequest if malformed."""
    wait = _single(request, "wait_for_change")
    if wait not in (None, "true", "false"):
        raise _BadRequest("wait_for_change must be true or false")
    last = _single(request, "last_etag")
    if last is not None:
        last = last.removeprefix("W/").strip('"')
        if not last or len(last) > _MAX_ETAG or not last.isascii() or not last.isprintable():
            raise _BadRequest(f"last_etag must be 1..{_MAX_ETAG} printable ASCII characters")
    timeout = _single(request, "timeout_sec")
    if timeout is not None and (not timeout.isdigit() or not 1 <= int(timeout) <= MAX_TIMEOUT):
        raise _BadRequest(f"timeout_sec must be a whole number of seconds, 1..{MAX_TIMEOUT}")
    return wait == "true", last, int(timeout) if timeout is not None else DEFAULT_TIMEOUT


def _current(vms: VmDirectory, vm_id: str) -> dict[str, Any] | None:
    vm = vms.get(vm_id)
    return None if vm is None else vm.metadata


def _answer(metadata: dict[str, Any]) -> Response:
    return JSONResponse(metadata, headers={"ETag": etag_of(metadata), "Cache-Control": "no-store"})


async def metadata(request: Request) -> Response:
    claims = authenticate(request)
    try:
        wait, last, timeout = _parameters(request)
    except _BadRequest as exc:
        return error_response(400, "bad_request", str(exc))
    vms: VmDirectory | None = request.app.state.vms
    if vms is None:  # no --vms: {} for every VM, for ever
        if wait and last in (None, etag_of({}).strip('"')):
            await asyncio.sleep(timeout)
        return _answer({})
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        version = vms.version  # before the read: a change after it ends the wait below at once
        current = _current(vms, claims.sub)
        if current is None:
            return error_response(403, "unknown_vm", "this VM no longer exists")
        etag = etag_of(current).strip('"')
        if last is None:
            last = etag  # wait for the next change
        remaining = deadline - loop.time()
        if not wait or etag != last or remaining <= 0:
            return _answer(current)
        await vms.wait_for_change(version, remaining)


def routes() -> tuple[BaseRoute, ...]:
    return (
        Route("/runtime/metadata", metadata, methods=["GET"]),
        Route("/runtime/metadata/", metadata, methods=["GET"]),
    )
