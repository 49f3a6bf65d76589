"""The Actions cache service through httpx.ASGITransport against a real Azurite: both protocols'
answers and error shapes (every one JSON: Twirp ``{"code", "msg"}`` for v2, the envelope for v1),
SAS URLs as the store sees them, and ``controlplane serve``'s cache options."""

from __future__ import annotations

import base64
import contextlib
import ssl
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import psycopg
import pytest
import trustme
from starlette.applications import Starlette

from controlplane.actions_cache import CacheLimits, CacheService, cache_routes
from controlplane.app import create_app
from controlplane.azure_blob import BlobStore
from controlplane.cache_index import SqliteIndex
from controlplane.tokens import Secrets, Verifier, mint
from controlplane.vms import VmDirectory
from tests.cache_harness import AZURITE_ACCOUNT, Azurite, Postgres, azurite, azurite_key, postgres
from tests.harness import ControlPlane, free_port

__all__ = ["azurite", "postgres"]  # the session fixtures, imported for pytest

SECRET = b"cache-api-secret-".ljust(48, b"x")
SECRETS = Secrets([(None, SECRET)])
TWIRP = "/twirp/github.actions.results.api.v1.CacheService/"
V1 = "/runtime/github/_apis/artifactcache/"
CONTROLPLANE = Path(sys.executable).parent / "controlplane"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


pytestmark = pytest.mark.anyio


def store_for(azurite: Azurite, container: str) -> BlobStore:
    store = BlobStore(azurite.url, AZURITE_ACCOUNT, azurite_key(), container)
    store.create_container()
    return store


def build(tmp_path: Path, store: BlobStore, limits: CacheLimits | None = None) -> tuple[Starlette, CacheService]:
    vms = tmp_path / "vms"
    vms.write_text('{"vm_id": "a1", "scope": "team-a"}\n{"vm_id": "a2", "scope": "team-a"}\nb1\n')
    directory = VmDirectory(vms)
    service = CacheService(SqliteIndex(tmp_path / "index.sqlite3"), store, limits or CacheLimits())
    app = create_app(Verifier(SECRETS, vm_exists=directory.exists), vms=directory, routes=cache_routes(service))
    return app, service


@pytest.fixture
async def app(tmp_path: Path, azurite: Azurite) -> AsyncIterator[tuple[Starlette, CacheService]]:
    built = build(tmp_path, store_for(azurite, "asgi"), CacheLimits(max_entry_bytes=1000, scope_bytes=5000))
    yield built
    built[1].index.close()


def client(app: Starlette, vm: str | None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {mint(vm, SECRETS)}"} if vm else {}
    transport = httpx.ASGITransport(app=app, client=("192.0.2.10", 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://cp", headers=headers)


def assert_twirp(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert sorted(body) == ["code", "msg"] and body["code"] == code and body["msg"]


def assert_envelope(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == code


async def upload(url: str, data: bytes) -> None:
    async with httpx.AsyncClient() as http:
        answer = await http.put(url, content=data, headers={"x-ms-blob-type": "BlockBlob"})
    assert answer.status_code == 201


async def test_v2_round_trip_and_json_shapes(app: tuple[Starlette, CacheService]) -> None:
    async with client(app[0], "a1") as a1, client(app[0], "a2") as a2:
        created = await a1.post(TWIRP + "CreateCacheEntry", json={"key": "k-1", "version": "v1"})
        assert created.status_code == 200
        body = created.json()
        assert body["ok"] is True
        query = parse_qs(urlsplit(body["signed_upload_url"]).query)
        assert query["sp"] == ["cw"] and query["sr"] == ["b"]
        # Not visible before it is finalized.
        miss = await a2.post(TWIRP + "GetCacheEntryDownloadURL", json={"key": "k-1", "version": "v1"})
        assert miss.json() == {"ok": False, "signed_download_url": "", "matched_key": ""}
        await upload(body["signed_upload_url"], b"archive")
        done = await a1.post(
            TWIRP + "FinalizeCacheEntryUpload", json={"key": "k-1", "version": "v1", "size_bytes": "7"}
        )
        assert done.json()["ok"] is True and done.json()["entry_id"].isdigit()
        hit = await a2.post(
            TWIRP + "GetCacheEntryDownloadURL", json={"key": "x", "restore_keys": ["k-"], "version": "v1"}
        )
        assert hit.json()["ok"] is True and hit.json()["matched_key"] == "k-1"
        async with httpx.AsyncClient() as http:
            assert (await http.get(hit.json()["signed_download_url"])).content == b"archive"
        dup = await a2.post(TWIRP + "CreateCacheEntry", json={"key": "k-1", "version": "v1"})
        assert_twirp(dup, 409, "already_exists")


async def test_v2_errors_are_twirp_json(app: tuple[Starlette, CacheService]) -> None:
    async with client(app[0], "a1") as a1, client(app[0], None) as anonymous, client(app[0], "gone") as gone:
        assert_twirp(await a1.post(TWIRP + "DeleteCacheEntry", json={}), 404, "bad_route")
        assert_twirp(await a1.get(TWIRP + "CreateCacheEntry"), 404, "bad_route")
        assert_twirp(
            await anonymous.post(TWIRP + "CreateCacheEntry", json={"key": "k", "version": "v"}), 401, "unauthenticated"
        )
        assert_twirp(
            await gone.post(TWIRP + "CreateCacheEntry", json={"key": "k", "version": "v"}), 403, "permission_denied"
        )
        bad_json = await a1.post(TWIRP + "CreateCacheEntry", content=b"{", headers={"content-type": "application/json"})
        assert_twirp(bad_json, 400, "malformed")
        protobuf = await a1.post(
            TWIRP + "CreateCacheEntry", content=b"\x0a", headers={"content-type": "application/protobuf"}
        )
        assert_twirp(protobuf, 400, "malformed")
        for body in (
            {"key": "a,b", "version": "v"},
            {"key": "k" * 513, "version": "v"},
            {"key": "", "version": "v"},
            {"key": "k", "version": "v" * 513},
            {"key": "k"},
        ):
            assert_twirp(await a1.post(TWIRP + "CreateCacheEntry", json=body), 400, "invalid_argument")
        too_many = {"key": "k", "version": "v", "restore_keys": [f"r{n}" for n in range(10)]}
        assert_twirp(await a1.post(TWIRP + "GetCacheEntryDownloadURL", json=too_many), 400, "invalid_argument")
        # Finalize: nothing reserved; reserved but nothing uploaded; a size that is not the blob's.
        body = {"key": "f-1", "version": "v", "size_bytes": "3"}
        assert_twirp(await a1.post(TWIRP + "FinalizeCacheEntryUpload", json=body), 404, "not_found")
        created = await a1.post(TWIRP + "CreateCacheEntry", json={"key": "f-1", "version": "v"})
        assert_twirp(await a1.post(TWIRP + "FinalizeCacheEntryUpload", json=body), 412, "failed_precondition")
        created = await a1.post(
            TWIRP + "CreateCacheEntry", json={"key": "f-1", "version": "v"}
        )  # the failed one is gone
        await upload(created.json()["signed_upload_url"], b"12345")
        assert_twirp(await a1.post(TWIRP + "FinalizeCacheEntryUpload", json=body), 400, "invalid_argument")
        # Above --cache-max-entry-bytes (1000 here): refused at finalize, the blob deleted.
        created = await a1.post(TWIRP + "CreateCacheEntry", json={"key": "big", "version": "v"})
        await upload(created.json()["signed_upload_url"], b"x" * 1001)
        big = {"key": "big", "version": "v", "size_bytes": "1001"}
        assert_twirp(await a1.post(TWIRP + "FinalizeCacheEntryUpload", json=big), 400, "invalid_argument")
        assert app[1].store.size(urlsplit(created.json()["signed_upload_url"]).path.rsplit("/", 1)[1]) is None


async def test_uploads_in_progress_are_bounded(tmp_path: Path, azurite: Azurite) -> None:
    app, service = build(tmp_path, store_for(azurite, "pending"), CacheLimits(max_pending=2))
    async with client(app, "a1") as a1:
        for key in ("p-1", "p-2"):
            assert (await a1.post(TWIRP + "CreateCacheEntry", json={"key": key, "version": "v"})).json()["ok"]
        third = await a1.post(TWIRP + "CreateCacheEntry", json={"key": "p-3", "version": "v"})
        assert_twirp(third, 429, "resource_exhausted")
        assert_envelope(await a1.post(V1 + "caches", json={"key": "p-3", "version": "v"}), 429, "too_many_uploads")
    service.index.close()


async def test_v2_store_down_is_json_unavailable(tmp_path: Path) -> None:
    dead = BlobStore(f"http://127.0.0.1:{free_port()}/{AZURITE_ACCOUNT}", AZURITE_ACCOUNT, azurite_key(), "c")
    app, service = build(tmp_path, dead)
    async with client(app, "a1") as a1:
        await a1.post(TWIRP + "CreateCacheEntry", json={"key": "k", "version": "v"})
        body = {"key": "k", "version": "v", "size_bytes": "1"}
        answer = await a1.post(TWIRP + "FinalizeCacheEntryUpload", json=body)
        assert_twirp(answer, 503, "unavailable")
        assert "127.0.0.1" not in answer.text and "refused" not in answer.text.lower()  # not how it failed
    service.index.close()


async def test_v1_round_trip_in_blocks(app: tuple[Starlette, CacheService]) -> None:
    async with client(app[0], "a1") as a1, client(app[0], "a2") as a2:
        query = {"keys": "v1-key,v1-", "version": "ver"}
        assert (await a1.get(V1 + "cache", params=query)).status_code == 204
        reserved = await a1.post(V1 + "caches", json={"key": "v1-key", "version": "ver", "cacheSize": 10})
        assert reserved.status_code == 201
        entry = reserved.json()["cacheId"]
        # Chunks out of order, as the client's parallel uploads send them.
        for start, data in ((6, b"wxyz"), (0, b"abcdef")):
            headers = {"Content-Range": f"bytes {start}-{start + len(data) - 1}/*"}
            assert (await a1.patch(f"{V1}caches/{entry}", content=data, headers=headers)).status_code == 204
        assert (await a1.post(f"{V1}caches/{entry}", json={"size": 10})).status_code == 204
        hit = await a2.get(V1 + "cache", params={"keys": "nope,v1-", "version": "ver"})
        assert hit.status_code == 200
        assert hit.json()["cacheKey"] == "v1-key" and hit.json()["cacheVersion"] == "ver"
        async with httpx.AsyncClient() as http:
            assert (await http.get(hit.json()["archiveLocation"])).content == b"abcdefwxyz"
        again = await a1.post(V1 + "caches", json={"key": "v1-key", "version": "ver"})
        assert_envelope(again, 409, "already_exists")
        assert_envelope(await a1.post(f"{V1}caches/{entry}", json={"size": 10}), 409, "already_committed")


async def test_v1_errors_are_json(app: tuple[Starlette, CacheService]) -> None:
    async with client(app[0], "a1") as a1, client(app[0], "b1") as b1, client(app[0], None) as anonymous:
        assert_envelope(await a1.get(V1 + "cache", params={"keys": "a,", "version": "v"}), 400, "bad_request")
        assert_envelope(await a1.get(V1 + "cache", params={"keys": "a"}), 400, "bad_request")
        assert_envelope(await anonymous.get(V1 + "cache", params={"keys": "a", "version": "v"}), 401, "invalid_token")
        too_big = {"key": "k", "version": "v", "cacheSize": 1001}
        assert_envelope(await a1.post(V1 + "caches", json=too_big), 400, "entry_too_large")
        entry = (await a1.post(V1 + "caches", json={"key": "k", "version": "v"})).json()["cacheId"]
        # Another scope's VM can neither write to nor commit the entry: it does not exist for it.
        chunk = {"Content-Range": "bytes 0-2/*"}
        assert_envelope(await b1.patch(f"{V1}caches/{entry}", content=b"abc", headers=chunk), 404, "not_found")
        assert_envelope(await b1.post(f"{V1}caches/{entry}", json={"size": 3}), 404, "not_found")
        assert_envelope(await a1.patch(f"{V1}caches/{entry}", content=b"abc"), 400, "bad_request")
        short = {"Content-Range": "bytes 0-9/*"}
        assert_envelope(await a1.patch(f"{V1}caches/{entry}", content=b"abc", headers=short), 400, "bad_request")
        beyond = {"Content-Range": "bytes 1000-1002/*"}
        assert_envelope(await a1.patch(f"{V1}caches/{entry}", content=b"abc", headers=beyond), 400, "entry_too_large")
        assert_envelope(await a1.patch(f"{V1}caches/99999999", content=b"abc", headers=chunk), 404, "not_found")
        assert (await a1.patch(f"{V1}caches/{entry}", content=b"abc", headers=chunk)).status_code == 204
        # A gap: bytes 3..5 never came. Refused, and the entry is gone (the key is free again).
        assert_envelope(await a1.post(f"{V1}caches/{entry}", json={"size": 6}), 400, "bad_request")
        assert (await a1.post(V1 + "caches", json={"key": "k", "version": "v"})).status_code == 201
        assert_envelope(await a1.get(V1 + "nothing"), 404, "not_found")
        assert_envelope(await a1.delete(V1 + "caches"), 405, "method_not_allowed")


async def test_quota_evicts_least_recently_used_with_blob(app: tuple[Starlette, CacheService]) -> None:
    _, service = app
    async with client(app[0], "a1") as a1:
        blobs = []
        for n in range(6):  # 6 x 900 bytes in a 5000-byte scope
            created = await a1.post(TWIRP + "CreateCacheEntry", json={"key": f"q-{n}", "version": "v"})
            url = created.json()["signed_upload_url"]
            blobs.append(urlsplit(url).path.rsplit("/", 1)[1])
            await upload(url, b"q" * 900)
            body = {"key": f"q-{n}", "version": "v", "size_bytes": "900"}
            assert (await a1.post(TWIRP + "FinalizeCacheEntryUpload", json=body)).json()["ok"] is True
        assert service.store.size(blobs[0]) is None  # evicted with its entry
        assert all(service.store.size(blob) == 900 for blob in blobs[1:])
        miss = await a1.post(TWIRP + "GetCacheEntryDownloadURL", json={"key": "q-0", "version": "v"})
        assert miss.json()["ok"] is False


async def test_sweep_expires_with_an_injected_clock(tmp_path: Path, azurite: Azurite) -> None:
    app, service = build(tmp_path, store_for(azurite, "sweep"))
    now = [time.time()]
    service.clock = lambda: now[0]
    async with client(app, "a1") as a1:
        created = await a1.post(TWIRP + "CreateCacheEntry", json={"key": "old", "version": "v"})
        url = created.json()["signed_upload_url"]
        await upload(url, b"old")
        await a1.post(TWIRP + "FinalizeCacheEntryUpload", json={"key": "old", "version": "v", "size_bytes": "3"})
        abandoned = await a1.post(TWIRP + "CreateCacheEntry", json={"key": "abandoned", "version": "v"})
        await upload(abandoned.json()["signed_upload_url"], b"half")
        now[0] += 7 * 86400 + 1  # a week unused (and the upload long abandoned)
        await service.sweep(force=True)
        for signed in (url, abandoned.json()["signed_upload_url"]):
            assert service.store.size(urlsplit(signed).path.rsplit("/", 1)[1]) is None
        miss = await a1.post(TWIRP + "GetCacheEntryDownloadURL", json={"key": "old", "version": "v"})
        assert miss.json()["ok"] is False
    service.index.close()


async def test_a_blob_rewritten_after_finalize_is_removed(tmp_path: Path, azurite: Azurite) -> None:
    """v2: the guest keeps its write URL for 10 minutes after the create; once that has expired,
    an entry whose blob changed after finalize goes (blob included), an unchanged one stays."""
    app, service = build(tmp_path, store_for(azurite, "rewrite"))
    now = [time.time()]
    service.clock = lambda: now[0]
    async with client(app, "a1") as a1:
        urls = {}
        for key in ("kept", "rewritten"):
            created = await a1.post(TWIRP + "CreateCacheEntry", json={"key": key, "version": "v"})
            urls[key] = created.json()["signed_upload_url"]
            await upload(urls[key], b"12345")
            body = {"key": key, "version": "v", "size_bytes": "5"}
            assert (await a1.post(TWIRP + "FinalizeCacheEntryUpload", json=body)).json()["ok"] is True
        await upload(urls["rewritten"], b"much more than was finalized")
        await service.sweep(force=True)  # the write URL is still valid: nothing decided yet
        assert len(service.index.unverified(now[0] + 1)) == 2
        now[0] += 601
        await service.sweep(force=True)
        assert service.index.unverified(now[0]) == []
        blob = urlsplit(urls["rewritten"]).path.rsplit("/", 1)[1]
        assert service.store.size(blob) is None
        miss = await a1.post(TWIRP + "GetCacheEntryDownloadURL", json={"key": "rewritten", "version": "v"})
        assert miss.json()["ok"] is False
        hit = await a1.post(TWIRP + "GetCacheEntryDownloadURL", json={"key": "kept", "version": "v"})
        assert hit.json()["ok"] is True
    service.index.close()


async def test_without_blob_url_the_endpoints_answer_404() -> None:
    app = create_app(Verifier(SECRETS))
    async with client(app, "a1") as a1:
        assert_envelope(await a1.post(TWIRP + "CreateCacheEntry", json={"key": "k", "version": "v"}), 404, "not_found")
        assert_envelope(await a1.get(V1 + "cache", params={"keys": "k", "version": "v"}), 404, "not_found")


def test_sas_urls_as_the_store_sees_them(azurite: Azurite) -> None:
    store = store_for(azurite, "sas")
    name = "dir/ünï cødé+%"
    write = store.sas_url(name, "cw")
    assert httpx.put(write, content=b"data", headers={"x-ms-blob-type": "BlockBlob"}).status_code == 201
    read = store.sas_url(name, "r")
    assert httpx.get(read).content == b"data"
    assert httpx.put(read, content=b"x", headers={"x-ms-blob-type": "BlockBlob"}).status_code == 403  # read only
    assert httpx.get(write).status_code == 403  # write only
    # One blob each: the signature does not carry over to another blob's path.
    other = read.replace(urlsplit(read).path, urlsplit(store.sas_url("other", "r")).path)
    assert httpx.get(other).status_code == 403
    wrong_key = BlobStore(store.url, store.account, b"not the key", store.container)
    assert httpx.get(wrong_key.sas_url(name, "r")).status_code == 403
    query = parse_qs(urlsplit(store.sas_url(name, "r", now=1_800_000_000)).query)
    assert query["se"] == ["2027-01-15T08:10:00Z"] and query["st"] == ["2027-01-15T07:55:00Z"]


def test_sas_urls_of_an_https_store_are_for_https_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store reached over https (Azure's only way by default) signs `spr=https` into every
    URL, service and account SAS alike; the store accepts the signature, and a URL whose
    protocol is widened to http no longer verifies."""
    ca = trustme.CA()
    cert, key, ca_file = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    leaf = ca.issue_cert("127.0.0.1")
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    ca.cert_pem.write_to_path(str(ca_file))
    # The control plane's own calls (the container's creation: an account SAS) trust the
    # system's CAs, as in production; here that is the test's CA.
    monkeypatch.setenv("SSL_CERT_FILE", str(ca_file))
    server = Azurite(tmp_path, tls=(cert, key)).start()
    try:
        store = store_for(server, "tls")
        assert store.url.startswith("https://")
        write, read = store.sas_url("blob", "cw"), store.sas_url("blob", "r")
        assert parse_qs(urlsplit(write).query)["spr"] == ["https"] == parse_qs(urlsplit(read).query)["spr"]
        headers, trust = {"x-ms-blob-type": "BlockBlob"}, ssl.create_default_context(cafile=ca_file)
        assert httpx.put(write, content=b"data", headers=headers, verify=trust).status_code == 201
        assert httpx.get(read, verify=trust).content == b"data"
        widened = read.replace("spr=https", "spr=https%2Chttp")
        assert httpx.get(widened, verify=trust).status_code == 403
    finally:
        server.stop()
    # An http store (Azurite as the other tests run it) signs no protocol.
    assert "spr" not in parse_qs(urlsplit(BlobStore("http://127.0.0.1:1/a", "a", b"k").sas_url("b", "r")).query)


def test_two_replicas_share_one_postgresql_index(tmp_path: Path, azurite: Azurite, postgres: Postgres) -> None:
    """Two `controlplane serve --database` processes on one PostgreSQL database: of 16 concurrent
    creates of one key, spread over both, exactly one wins; an entry created on one replica is
    finalized on the other and found by the first."""
    database = f"r{uuid.uuid4().hex[:12]}"
    with contextlib.closing(psycopg.connect(postgres.url, autocommit=True)) as admin:
        admin.execute(f"CREATE DATABASE {database}")
    url = postgres.url.replace("/postgres?", f"/{database}?")
    options = (
        "--blob-url", azurite.url, "--blob-account", AZURITE_ACCOUNT, "--blob-key-file", str(azurite.key_file()),
        "--blob-container", "replicas", "--database", url,
    )  # fmt: skip
    replicas = [ControlPlane(tmp_path, extra=options).start() for _ in range(2)]
    try:
        headers = {"Authorization": f"Bearer {replicas[0].mint('vm-r')}"}
        with ThreadPoolExecutor(16) as pool:
            answers = list(
                pool.map(
                    lambda n: httpx.post(
                        replicas[n % 2].url + TWIRP + "CreateCacheEntry",
                        json={"key": "race", "version": "v"},
                        headers=headers,
                        timeout=30,
                    ),
                    range(16),
                )
            )
        assert sorted(answer.status_code for answer in answers) == [200] + [409] * 15
        [won] = [answer for answer in answers if answer.status_code == 200]
        uploaded = httpx.put(won.json()["signed_upload_url"], content=b"abc", headers={"x-ms-blob-type": "BlockBlob"})
        assert uploaded.status_code == 201
        body = {"key": "race", "version": "v", "size_bytes": "3"}
        done = httpx.post(replicas[1].url + TWIRP + "FinalizeCacheEntryUpload", json=body, headers=headers)
        assert done.json()["ok"] is True
        found = httpx.post(
            replicas[0].url + TWIRP + "GetCacheEntryDownloadURL", json={"key": "race", "version": "v"}, headers=headers
        )
        assert httpx.get(found.json()["signed_download_url"]).content == b"abc"
    finally:
        for replica in replicas:
            replica.stop()


def test_serve_cache_options_fail_in_one_line(tmp_path: Path, azurite: Azurite) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s" * 40)
    key = azurite.key_file()
    bad_key = tmp_path / "bad-key"
    bad_key.write_text("not base64!")
    base = [str(CONTROLPLANE), "serve", "--listen", "127.0.0.1:0", "--secret-file", str(secret)]
    cases = [
        (
            ["--blob-url", azurite.url, "--state-dir", str(tmp_path)],
            "--blob-url needs --blob-account and --blob-key-file",
        ),
        (
            ["--blob-url", azurite.url, "--blob-account", AZURITE_ACCOUNT, "--blob-key-file", str(bad_key)],
            "not base64",
        ),
        (
            ["--blob-url", f"http://127.0.0.1:{free_port()}/x", "--blob-account", "x", "--blob-key-file", str(key)],
            "blob container actions-cache: blob store unreachable",
        ),
        (
            ["--blob-url", azurite.url, "--blob-account", AZURITE_ACCOUNT, "--blob-key-file", str(key)],
            "the cache needs --state-dir DIR or --database URL",
        ),
        (
            [
                "--blob-url",
                azurite.url,
                "--blob-account",
                AZURITE_ACCOUNT,
                "--blob-key-file",
                str(key),
                "--database",
                "mysql://x",
            ],
            "--database must be a postgresql:// URL",
        ),
    ]
    for args, message in cases:
        result = subprocess.run([*base, *args], capture_output=True, text=True, timeout=30)
        assert result.returncode == 1, result.stderr
        assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
        assert base64.b64encode(azurite_key()).decode() not in result.stderr


@pytest.mark.parametrize(
    "url", ["postgresql://cp:hunter2-secret@db/cache", "postgresql:///cache?host=/run/pg&password=hunter2-secret"]
)
def test_serve_refuses_a_database_password_in_argv(tmp_path: Path, url: str) -> None:
    """argv is readable by every user: a password in --database is refused before anything is
    contacted, and the refusal does not repeat it."""
    secret = tmp_path / "secret"
    secret.write_text("s" * 40)
    key = tmp_path / "key"
    key.write_text(base64.b64encode(b"k" * 32).decode())
    blob_url = f"http://127.0.0.1:{free_port()}/x"  # nothing listens: the check comes first
    result = subprocess.run(
        [
            str(CONTROLPLANE), "serve", "--listen", "127.0.0.1:0", "--secret-file", str(secret),
            "--blob-url", blob_url, "--blob-account", "x", "--blob-key-file", str(key), "--database", url,
        ],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1 and "--database must not carry a password" in result.stderr
    assert "hunter2" not in result.stderr
