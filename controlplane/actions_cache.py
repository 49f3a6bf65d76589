"""The GitHub Actions cache service, in GitHub's own two protocols, for the unmodified ``@actions/cache``.

    v2 (Twirp, JSON; errors ``{"code", "msg"}``)
    POST /twirp/github.actions.results.api.v1.CacheService/CreateCacheEntry
         {"key", "version"}                          -> {"ok": true, "signed_upload_url"}
    POST .../FinalizeCacheEntryUpload {"key", "version", "size_bytes"} -> {"ok": true, "entry_id"}
    POST .../GetCacheEntryDownloadURL {"key", "restore_keys", "version"}
                                                     -> {"ok": true, "signed_download_url", "matched_key"}
                                                        or {"ok": false} on a miss
    v1 (REST, under /runtime/github/_apis/artifactcache/; errors in the proxy's envelope)
    GET   cache?keys=K1,K2&version=V   200 {"cacheKey", "cacheVersion", "creationTime", "archiveLocation"}
                                     or 204 on a miss
    POST  caches {"key", "version", "cacheSize"?}    201 {"cacheId"}
    PATCH caches/{id}  Content-Range: bytes A-B/*    204 (the chunk becomes block A of the entry's blob)
    POST  caches/{id} {"size"}                       204 (the blocks, contiguous from 0 to size, are committed)

The caller is the VM of the runtime token; its entries live in its scope (``--vms``; the VM
id when it has none) and nothing here ever names another scope's entry. The client moves
v2 blobs itself with the SAS URLs signed here; v1 chunks pass through this service.
Every answer is JSON: the client retries a 5xx five times and chokes on HTML.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import anyio.to_thread
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from controlplane.app import authenticate, error_response
from controlplane.azure_blob import SAS_LIFETIME, BlobError, BlobStore
from controlplane.cache_index import CacheIndex, Entry, IndexError_, TooManyPending, open_index
from controlplane.tokens import InvalidToken, UnknownVM

__all__ = ["CacheLimits", "CacheService", "CacheSetupError", "add_arguments", "cache_routes", "from_args"]

GiB = 1024**3
TWIRP_PREFIX = "/twirp/github.actions.results.api.v1.CacheService/"
V1_PREFIX = "/runtime/github/_apis/artifactcache/"
MAX_KEY = 512
MAX_VERSION = 512
MAX_RESTORE_KEYS = 9  # the client sends at most 10 keys in all
MAX_CHUNK_BYTES = 64 * 1024 * 1024  # a v1 PATCH: the client sends 32 MiB
MAX_JSON_BYTES = 64 * 1024
SWEEP_INTERVAL = 60.0
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\*|\d+)")

log = logging.getLogger("controlplane")


@dataclass(frozen=True)
class CacheLimits:
    max_entry_bytes: int = 10 * GiB
    scope_bytes: int = 10 * GiB
    unused_seconds: float = 7 * 86400.0
    unfinalized_seconds: float = 30 * 60.0
    # Uploads in progress per scope: a write SAS cannot cap what is written through it, so the
    # number of open ones is what bounds the storage a scope can fill before its finalize checks.
    max_pending: int = 32


class CacheError(Exception):
    """A refusal: ``twirp`` is the Twirp code, ``status`` the HTTP status, ``code`` the envelope's code."""

    def __init__(self, status: int, twirp: str, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.twirp, self.code = status, twirp, code


def _bad(message: str) -> CacheError:
    return CacheError(400, "invalid_argument", "bad_request", message)


def _check_key(key: Any, what: str = "key") -> str:
    if not isinstance(key, str) or not key:
        raise _bad(f"{what} must be a non-empty string")
    if len(key) > MAX_KEY or "," in key:
        raise _bad(f"{what} must be at most {MAX_KEY} characters without commas")
    return key


def _check_version(version: Any) -> str:
    if not isinstance(version, str) or not version or len(version) > MAX_VERSION:
        raise _bad(f"version must be a non-empty string of at most {MAX_VERSION} characters")
    return version


def _block_id(offset: int) -> str:
    # Block ids of one blob must all have the same length: the offset, zero-padded.
    return base64.b64encode(f"{offset:020d}".encode()).decode()


@dataclass
class CacheService:
    """The protocol-independent logic: every call takes the caller's scope. Blocking calls
    (index, blob store) run in worker threads so the event loop keeps serving."""

    index: CacheIndex
    store: BlobStore
    limits: CacheLimits = field(default_factory=CacheLimits)
    clock: Callable[[], float] = time.time
    _last_sweep: float = field(default=0.0, init=False)

    async def _run(self, func: Callable[..., Any], *args: Any) -> Any:
        try:
            return await anyio.to_thread.run_sync(func, *args)
        except BlobError as exc:
            # The guest learns that the store failed, not how (addresses, internal errors): the
            # operator reads that in the control plane's own log.
            log.warning("actions cache: the blob store failed: %s", exc)
            raise CacheError(503, "unavailable", "storage_unavailable", "the blob store is unavailable") from None

    async def create(self, scope: str, key: str, version: str, size: int | None = None) -> Entry:
        if size is not None and size > self.limits.max_entry_bytes:
            raise CacheError(
                400, "invalid_argument", "entry_too_large", f"entries are at most {self.limits.max_entry_bytes} bytes"
            )
        now = self.clock()
        blob = secrets.token_hex(16)  # never reused: a re-created key gets a new blob
        try:
            entry: Entry | None = await self._run(
                self.index.create, scope, key, version, blob, now, now - self.limits.unfinalized_seconds,
                self.limits.max_pending,
            )  # fmt: skip
        except TooManyPending:
            raise CacheError(
                429, "resource_exhausted", "too_many_uploads", "too many uploads in progress in this scope"
            ) from None
        if entry is None:
            raise CacheError(409, "already_exists", "already_exists", "an entry with this key and version exists")
        return entry

    async def pending(self, scope: str, key: str, version: str) -> Entry | None:
        """The scope's upload in progress for key and version (v2 names entries so)."""
        entry: Entry | None = await self._run(self.index.pending, scope, key, version)
        return entry

    async def get(self, scope: str, entry_id: int) -> Entry | None:
        """The scope's entry with this id (v1 names entries so); None for another scope's."""
        entry: Entry | None = await self._run(self.index.get, scope, entry_id)
        return entry

    def upload_url(self, entry: Entry) -> str:
        return self.store.sas_url(entry.blob, "cw", now=self.clock())

    def download_url(self, entry: Entry) -> str:
        return self.store.sas_url(entry.blob, "r", now=self.clock())

    async def finalize(self, entry: Entry, size: int, *, guest_wrote: bool = True) -> None:
        """Check the uploaded blob against ``size`` and the limits, then make the entry visible.
        ``guest_wrote``: the guest holds a write URL (v2), so the blob is checked again once it expires."""
        found: tuple[int, str] | None = await self._run(self.store.properties, entry.blob)
        problem = None
        if found is None:
            problem = CacheError(412, "failed_precondition", "not_uploaded", "nothing was uploaded for this entry")
        elif found[0] != size:
            problem = _bad(f"the uploaded blob has {found[0]} bytes, not {size}")
        elif size > min(self.limits.max_entry_bytes, self.limits.scope_bytes):
            problem = CacheError(
                400, "invalid_argument", "entry_too_large", f"entries are at most {self.limits.max_entry_bytes} bytes"
            )
        if problem is not None:
            await self._run(self.index.remove, entry, self.clock())
            await self._delete_doomed()
            raise problem
        assert found is not None
        etag = found[1] if guest_wrote else None
        done, doomed = await self._run(self.index.finalize, entry, size, self.clock(), self.limits.scope_bytes, etag)
        if not done:
            raise CacheError(409, "already_exists", "already_exists", "the entry is already finalized")
        if doomed:
            await self._delete(doomed)

    async def lookup(self, scope: str, key: str, restore_keys: list[str], version: str) -> Entry | None:
        entry: Entry | None = await self._run(
            self.index.lookup, scope, key, restore_keys, version, self.clock(), SAS_LIFETIME
        )
        return entry

    async def put_chunk(self, entry: Entry, start: int, data: bytes) -> None:
        await self._run(self.store.put_block, entry.blob, _block_id(start), data)

    async def commit_chunks(self, entry: Entry, size: int) -> None:
        """v1: the uploaded blocks must cover 0..size exactly, in order; they become the blob."""
        blocks: list[tuple[str, int]] = await self._run(self.store.uncommitted_blocks, entry.blob)
        by_offset: dict[int, tuple[str, int]] = {}
        for block_id, length in blocks:
            try:
                by_offset[int(base64.b64decode(block_id))] = (block_id, length)
            except ValueError:
                continue  # not one of ours
        order, offset = [], 0
        while offset < size and offset in by_offset:
            block_id, length = by_offset[offset]
            order.append(block_id)
            offset += length
        if offset != size or not order:
            await self._run(self.index.remove, entry, self.clock())
            await self._delete_doomed()
            raise _bad(f"the uploaded chunks do not cover 0..{size} contiguously")
        await self._run(self.store.put_block_list, entry.blob, order)
        await self.finalize(entry, size, guest_wrote=False)

    async def sweep(self, *, force: bool = False) -> None:
        """Expire unused and abandoned entries and delete doomed blobs, at most once a SWEEP_INTERVAL
        per process. Runs after the cache's own answers have been sent (a response's background
        task): the reference server has no lifespan tasks, and every replica's traffic keeps the
        shared index clean."""
        now = self.clock()
        if not force and now - self._last_sweep < SWEEP_INTERVAL:
            return
        self._last_sweep = now
        await self._verify(now)
        doomed: list[str] = await self._run(
            self.index.expire, now, now - self.limits.unused_seconds, now - self.limits.unfinalized_seconds
        )
        await self._delete(doomed)

    async def sweep_quietly(self) -> None:
        """``sweep`` after an answer has been sent: a failure (store or database down) has no one to
        answer and must not become a traceback; the entries stay and the next sweep tries again."""
        try:
            await self.sweep()
        except Exception:  # noqa: BLE001 - retried a SWEEP_INTERVAL later, not at once (the store may be down)
            pass

    async def _verify(self, now: float) -> None:
        """A v2 guest holds a write URL for its blob until SAS_LIFETIME after the create: once that
        has expired, an entry whose blob changed after finalize (size or ETag) is removed, so
        rewriting a blob cannot get around the size limits or the quota for long."""
        entries: list[Entry] = await self._run(self.index.unverified, now - SAS_LIFETIME)
        for entry in entries:
            found = await self._run(self.store.properties, entry.blob)
            if found == (entry.size, entry.etag):
                await self._run(self.index.verified, entry)
            else:
                await self._run(self.index.remove, entry, now)

    async def _delete_doomed(self) -> None:
        now = self.clock()
        doomed: list[str] = await self._run(self.index.expire, now, float("-inf"), float("-inf"))
        await self._delete(doomed)

    async def _delete(self, blobs: list[str]) -> None:
        deleted = []
        for blob in blobs:
            try:
                await anyio.to_thread.run_sync(self.store.delete, blob)
            except BlobError:
                continue  # stays queued; the next sweep tries again
            deleted.append(blob)
        await anyio.to_thread.run_sync(self.index.forget, deleted)


def _scope(request: Request) -> str:
    claims = authenticate(request)
    vms = request.app.state.vms
    return vms.scope(claims.sub) if vms is not None else claims.sub


async def _json_body(request: Request) -> dict[str, Any]:
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_JSON_BYTES:
            raise CacheError(413, "invalid_argument", "body_too_large", "the request body is too large")
    try:
        data = json.loads(body or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise CacheError(400, "malformed", "bad_request", "the body is not JSON") from None
    if not isinstance(data, dict):
        raise CacheError(400, "malformed", "bad_request", "the body is not a JSON object")
    return data


# --- v2: Twirp ----------------------------------------------------------------------------------

_TWIRP_STATUS = {"unauthenticated": 401, "permission_denied": 403, "bad_route": 404, "internal": 500}


def _twirp_error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"code": code, "msg": message}, status_code=status)


async def _create_entry(request: Request, service: CacheService, scope: str, body: dict[str, Any]) -> dict[str, Any]:
    entry = await service.create(scope, _check_key(body.get("key")), _check_version(body.get("version")))
    return {"ok": True, "signed_upload_url": service.upload_url(entry), "message": ""}


async def _finalize_entry(request: Request, service: CacheService, scope: str, body: dict[str, Any]) -> dict[str, Any]:
    key, version = _check_key(body.get("key")), _check_version(body.get("version"))
    size_text = body.get("size_bytes", 0)
    if not isinstance(size_text, (str, int)) or not str(size_text).isdigit():
        raise _bad("size_bytes must be a non-negative integer")
    entry = await service.pending(scope, key, version)
    if entry is None:
        raise CacheError(404, "not_found", "not_found", "no upload in progress for this key and version")
    await service.finalize(entry, int(size_text))
    return {"ok": True, "entry_id": str(entry.id), "message": ""}


async def _download_url(request: Request, service: CacheService, scope: str, body: dict[str, Any]) -> dict[str, Any]:
    key, version = _check_key(body.get("key")), _check_version(body.get("version"))
    restore_keys = body.get("restore_keys", [])
    if not isinstance(restore_keys, list) or len(restore_keys) > MAX_RESTORE_KEYS:
        raise _bad(f"restore_keys must be a list of at most {MAX_RESTORE_KEYS} keys")
    restore_keys = [_check_key(item, "restore key") for item in restore_keys]
    entry = await service.lookup(scope, key, restore_keys, version)
    if entry is None:
        return {"ok": False, "signed_download_url": "", "matched_key": ""}
    return {"ok": True, "signed_download_url": service.download_url(entry), "matched_key": entry.key}


_Method = Callable[[Request, CacheService, str, dict[str, Any]], Awaitable[dict[str, Any]]]
_TWIRP_METHODS: dict[str, _Method] = {
    "CreateCacheEntry": _create_entry,
    "FinalizeCacheEntryUpload": _finalize_entry,
    "GetCacheEntryDownloadURL": _download_url,
}


def _twirp(service: CacheService) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        return await twirp(request, service)

    return endpoint


async def twirp(request: Request, service: CacheService) -> Response:
    method = _TWIRP_METHODS.get(request.path_params["method"])
    if method is None or request.method != "POST":
        return _twirp_error(404, "bad_route", "no such method on CacheService")
    try:
        scope = _scope(request)
        if "json" not in request.headers.get("content-type", ""):
            raise CacheError(400, "malformed", "bad_request", "only the JSON encoding is served")
        answer = await method(request, service, scope, await _json_body(request))
        return JSONResponse(answer, background=BackgroundTask(service.sweep_quietly))
    except InvalidToken as exc:
        return _twirp_error(401, "unauthenticated", str(exc))
    except UnknownVM as exc:
        return _twirp_error(403, "permission_denied", str(exc))
    except CacheError as exc:
        return _twirp_error(exc.status, exc.twirp, str(exc))
    except Exception:  # noqa: BLE001 - an HTML 500 would be retried five times by the client
        return _twirp_error(500, "internal", "internal error")


# --- v1: REST -----------------------------------------------------------------------------------


def _rest(
    service: CacheService, handler: Callable[[Request, CacheService, str], Awaitable[Response]]
) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            response = await handler(request, service, _scope(request))
            response.background = BackgroundTask(service.sweep_quietly)
            return response
        except CacheError as exc:
            return error_response(exc.status, exc.code, str(exc))
        except (InvalidToken, UnknownVM):
            raise  # the app's handlers answer these in the proxy's envelope
        except Exception:  # noqa: BLE001 - the client must never see an HTML 500
            return error_response(500, "internal_error", "internal error")

    return endpoint


def _entry_id(request: Request) -> int:
    text = request.path_params["entry_id"]
    if not text.isdigit() or len(text) > 18:
        raise CacheError(404, "not_found", "not_found", "no such cache entry")
    return int(text)


async def _v1_entry(request: Request, service: CacheService, scope: str) -> Entry:
    entry = await service.get(scope, _entry_id(request))
    if entry is None:
        raise CacheError(404, "not_found", "not_found", "no such cache entry")
    if entry.finalized is not None:
        raise CacheError(409, "already_exists", "already_committed", "the entry is already committed")
    return entry


async def v1_get(request: Request, service: CacheService, scope: str) -> Response:
    keys = [_check_key(key) for key in request.query_params.get("keys", "").split(",")]
    version = _check_version(request.query_params.get("version"))
    if len(keys) > MAX_RESTORE_KEYS + 1:
        raise _bad(f"at most {MAX_RESTORE_KEYS + 1} keys")
    entry = await service.lookup(scope, keys[0], keys[1:], version)
    if entry is None:
        return Response(status_code=204)
    created = datetime.fromtimestamp(entry.created, UTC).isoformat().replace("+00:00", "Z")
    return JSONResponse(
        {
            "cacheKey": entry.key,
            "cacheVersion": entry.version,
            "creationTime": created,
            "archiveLocation": service.download_url(entry),
        }
    )


async def v1_reserve(request: Request, service: CacheService, scope: str) -> Response:
    body = await _json_body(request)
    size = body.get("cacheSize")
    if size is not None and (not isinstance(size, int) or size < 0):
        raise _bad("cacheSize must be a non-negative integer")
    entry = await service.create(scope, _check_key(body.get("key")), _check_version(body.get("version")), size)
    return JSONResponse({"cacheId": entry.id}, status_code=201)


async def v1_upload(request: Request, service: CacheService, scope: str) -> Response:
    entry = await _v1_entry(request, service, scope)
    match = _CONTENT_RANGE.fullmatch(request.headers.get("content-range", ""))
    if match is None:
        raise _bad("Content-Range must be 'bytes START-END/*'")
    start, end = int(match[1]), int(match[2])
    length = end - start + 1
    if length <= 0 or length > MAX_CHUNK_BYTES:
        raise _bad(f"a chunk is 1..{MAX_CHUNK_BYTES} bytes")
    if end >= service.limits.max_entry_bytes:
        raise CacheError(400, "invalid_argument", "entry_too_large", "the chunk lies beyond the entry size limit")
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > length:
            break
    if len(data) != length:
        raise _bad(f"the body has {len(data)} bytes, Content-Range says {length}")
    await service.put_chunk(entry, start, bytes(data))
    return Response(status_code=204)


async def v1_commit(request: Request, service: CacheService, scope: str) -> Response:
    entry = await _v1_entry(request, service, scope)
    size = (await _json_body(request)).get("size")
    if not isinstance(size, int) or size < 0:
        raise _bad("size must be a non-negative integer")
    await service.commit_chunks(entry, size)
    return Response(status_code=204)


def cache_routes(service: CacheService) -> tuple[BaseRoute, ...]:
    """The v2 and v1 endpoints of `service`, for ``create_app(..., routes=...)``."""
    return (
        Route(TWIRP_PREFIX + "{method}", _twirp(service), methods=["POST", "GET", "PUT", "PATCH", "DELETE"]),
        Route(V1_PREFIX + "cache", _rest(service, v1_get), methods=["GET"]),
        Route(V1_PREFIX + "caches", _rest(service, v1_reserve), methods=["POST"]),
        Route(V1_PREFIX + "caches/{entry_id}", _rest(service, v1_upload), methods=["PATCH"]),
        Route(V1_PREFIX + "caches/{entry_id}", _rest(service, v1_commit), methods=["POST"]),
    )


# --- command line ---------------------------------------------------------------------------------


class CacheSetupError(Exception):
    """The cache's options are incomplete, or its store or index cannot be reached at start."""


def _bytes(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of bytes")
    return int(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``controlplane serve``'s cache options."""
    group = parser.add_argument_group("GitHub Actions cache (without --blob-url its endpoints answer 404)")
    group.add_argument("--blob-url", metavar="URL", help="the storage account's blob endpoint")
    group.add_argument("--blob-account", metavar="NAME", help="the storage account's name")
    group.add_argument("--blob-key-file", type=Path, metavar="FILE", help="the account key (base64) in FILE")
    group.add_argument("--blob-container", default="actions-cache", metavar="NAME", help="created at start if missing")
    where = group.add_mutually_exclusive_group()
    where.add_argument("--state-dir", type=Path, metavar="DIR", help="the entry index in DIR/cache-index.sqlite3")
    where.add_argument("--database", metavar="URL", help="the entry index in PostgreSQL (postgresql://...)")
    group.add_argument("--cache-max-entry-bytes", type=_bytes, default=CacheLimits.max_entry_bytes, metavar="N")
    group.add_argument("--cache-scope-bytes", type=_bytes, default=CacheLimits.scope_bytes, metavar="N")


def _has_password(url: str) -> bool:
    """True when a postgresql:// URL names a password, in its user part or as a parameter."""
    parts = urlsplit(url)
    return parts.password is not None or any(name.lower() == "password" for name, _ in parse_qsl(parts.query))


def from_args(args: argparse.Namespace) -> CacheService:
    """The service ``serve``'s options describe: the key read, the container created, the index opened."""
    if not args.blob_account or not args.blob_key_file:
        raise CacheSetupError("--blob-url needs --blob-account and --blob-key-file")
    if not args.blob_url.startswith(("http://", "https://")):
        raise CacheSetupError(f"--blob-url {args.blob_url!r}: must be an http:// or https:// URL")
    if args.database is not None and not args.database.startswith(("postgresql://", "postgres://")):
        raise CacheSetupError("--database must be a postgresql:// URL")
    if args.database is not None and _has_password(args.database):
        # argv is readable by every user of the machine (ps, /proc): the password belongs in a file.
        raise CacheSetupError("--database must not carry a password (argv is public): put it in PGPASSFILE")
    try:
        key = base64.b64decode(args.blob_key_file.read_text().strip(), validate=True)
    except OSError as exc:
        raise CacheSetupError(f"cannot read blob key {args.blob_key_file}: {exc.strerror or exc}") from None
    except ValueError:
        raise CacheSetupError(f"blob key {args.blob_key_file}: not base64") from None
    store = BlobStore(args.blob_url, args.blob_account, key, args.blob_container)
    try:
        store.create_container()
    except BlobError as exc:
        raise CacheSetupError(f"blob container {args.blob_container}: {exc}") from None
    try:
        index = open_index(args.state_dir, args.database)
    except IndexError_ as exc:
        raise CacheSetupError(str(exc)) from None
    limits = CacheLimits(max_entry_bytes=args.cache_max_entry_bytes, scope_bytes=args.cache_scope_bytes)
    return CacheService(index, store, limits)
