"""The Actions cache end to end with software nobody here wrote: the unmodified ``@actions/cache``
(6.3.0 in v2 and v1 mode, 3.3.0) in node, saving and restoring real directories through a real
``metadata-proxy serve`` into a real ``controlplane serve``, blobs in Azurite.

Each "VM" is a loopback source address (tests/node/bind.cjs makes every connection of the node
process leave from it). The client turns most failures into warnings and exit 0, so the tests
assert what was saved and what was restored, byte for byte, never the exit code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from itertools import count
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from controlplane.azure_blob import BlobStore
from tests.cache_harness import AZURITE_ACCOUNT, Azurite, Runner, azurite, azurite_key
from tests.harness import ControlPlane, Proxy, running

__all__ = ["azurite"]  # the session fixture, imported for pytest

TWIRP = "/twirp/github.actions.results.api.v1.CacheService/"
# The cache routes as examples/config.toml has them: no Metadata header (the client cannot add
# one), a body limit above the v1 client's 32 MiB chunks, time for a large chunk to reach the store.
ROUTES = """
[[routes]]
prefix = "/runtime/"

[[routes]]
prefix = "/runtime/github/"
guard = "none"
max_body_bytes = 67108864
timeout = 120

[[routes]]
prefix = "/twirp/"
guard = "none"
max_body_bytes = 67108864
timeout = 120
"""
_addresses = count(40)
VMS = {
    "solo": None,  # its own scope
    "team-1": "team",
    "team-2": "team",
    "other": "other-team",
    "leaver": None,
    "v1": None,
    "legacy": None,
}


def tree_digest(root: Path) -> str:
    """A digest of every file's relative path and content under `root`."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def make_tree(root: Path, size: int, files: int = 3) -> str:
    """Random (incompressible) files of `size` bytes in all under `root`; returns the tree's digest."""
    shutil.rmtree(root, ignore_errors=True)
    (root / "sub").mkdir(parents=True)
    for n in range(files):
        with open(root / ("sub" if n % 2 else ".") / f"file-{n}.bin", "wb") as out:
            remaining = size // files
            while remaining:
                block = os.urandom(min(remaining, 1 << 20))
                out.write(block)
                remaining -= len(block)
    return tree_digest(root)


class World:
    """Azurite + a control plane with the cache + the proxy, and the VMs of VMS registered."""

    def __init__(self, workdir: Path, azurite: Azurite, *, container: str, extra: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.azurite = azurite
        self.container = container
        self.vms_file = workdir / "vms"
        lines = [json.dumps({"vm_id": vm, **({"scope": scope} if scope else {})}) for vm, scope in VMS.items()]
        self.vms_file.write_text("\n".join(lines) + "\n")
        self.cp = ControlPlane(
            workdir,
            extra=(
                "--vms",
                str(self.vms_file),
                "--blob-url",
                azurite.url,
                "--blob-account",
                AZURITE_ACCOUNT,
                "--blob-key-file",
                str(azurite.key_file()),
                "--blob-container",
                container,
                "--state-dir",
                str(workdir / "state"),
                *extra,
            ),
        )
        self.proxy = Proxy(workdir, self.cp.url, ROUTES, timeout=30)
        self.addresses: dict[str, str] = {}
        self.store = BlobStore(azurite.url, AZURITE_ACCOUNT, azurite_key(), container)

    def start(self) -> World:
        self.cp.start()
        self.proxy.start()
        for vm in VMS:
            self.addresses[vm] = f"127.0.0.{next(_addresses)}"
            self.proxy.add_vm(vm, self.addresses[vm], self.cp.mint(vm))
        return self

    def stop(self) -> None:
        self.proxy.stop()
        self.cp.stop()

    def runner(self, vm: str, **kwargs: str) -> Runner:
        workspace = self.workdir / "ws"  # one path for every VM: the cache version hashes the paths
        workspace.mkdir(exist_ok=True)
        return Runner(self.proxy.url, self.addresses[vm], workspace, **kwargs)

    def twirp(self, vm: str, method: str, body: dict[str, object]) -> httpx.Response:
        with self.proxy.guest(self.addresses[vm]) as guest:
            return guest.post(TWIRP + method, json=body)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory, azurite: Azurite) -> Iterator[World]:
    world = World(tmp_path_factory.mktemp("cache-e2e"), azurite, container="e2e").start()
    with running(world.proxy, world.cp):
        yield world


def data_dir(world: World) -> Path:
    return world.workdir / "ws" / "data"


def save(world: World, vm: str, key: str, size: int = 300_000, **kwargs: str) -> tuple[str, object, str]:
    digest = make_tree(data_dir(world), size)
    cache_id, output = world.runner(vm, **kwargs).save(key, "data")
    return digest, cache_id, output


def restore(world: World, vm: str, key: str, *restore_keys: str, **kwargs: str) -> tuple[object, str | None, str]:
    """(matched key, digest of what was restored or None, output); the directory is emptied first."""
    shutil.rmtree(data_dir(world), ignore_errors=True)
    matched, output = world.runner(vm, **kwargs).restore(key, "data", restore_keys=restore_keys)
    restored = tree_digest(data_dir(world)) if data_dir(world).exists() else None
    return matched, restored, output


def test_v2_hit_restores_identical_content(world: World) -> None:
    digest, cache_id, output = save(world, "solo", "hit-1")
    assert isinstance(cache_id, int) and cache_id > 0, output
    matched, restored, output = restore(world, "solo", "hit-1")
    assert matched == "hit-1", output
    assert restored == digest


def test_v2_restore_key_prefix_newest_first(world: World) -> None:
    save(world, "solo", "deps-linux-aaa")
    time.sleep(0.01)  # distinct finalize times
    newer, _, _ = save(world, "solo", "deps-linux-bbb")
    save(world, "solo", "other-linux-ccc")
    matched, restored, output = restore(world, "solo", "deps-linux-zzz", "nothing-", "deps-linux-")
    assert matched == "deps-linux-bbb", output
    assert restored == newer


def test_v2_miss_restores_nothing(world: World) -> None:
    matched, restored, output = restore(world, "solo", "never-saved", "never-")
    assert matched is None, output
    assert restored is None


def test_v2_large_entry_multi_block_upload(world: World) -> None:
    """150 MiB: above the client's 128 MiB single-shot limit, so Put Block x3 + Put Block List."""
    digest, cache_id, output = save(world, "solo", "large-1", size=150 * 1024 * 1024)
    assert isinstance(cache_id, int) and cache_id > 0, output
    matched, restored, output = restore(world, "solo", "large-1")
    assert matched == "large-1", output
    assert restored == digest
    shutil.rmtree(data_dir(world))


def test_vms_of_one_scope_share(world: World) -> None:
    digest, cache_id, output = save(world, "team-1", "shared-1")
    assert isinstance(cache_id, int) and cache_id > 0, output
    matched, restored, output = restore(world, "team-2", "shared-1")
    assert matched == "shared-1", output
    assert restored == digest


def test_scopes_are_isolated(world: World) -> None:
    team_digest, _, _ = save(world, "team-1", "isolated-1")
    # Another scope's VM: a miss for the exact key and as a prefix, and no URL at all.
    matched, restored, output = restore(world, "other", "isolated-1", "isolated-")
    assert matched is None, output
    assert restored is None
    answer = world.twirp("other", "GetCacheEntryDownloadURL", {"key": "isolated-1", "restore_keys": [], "version": "x"})
    assert answer.status_code == 200 and answer.json()["ok"] is False
    # It may save the same key in its own scope; the team's entry is untouched.
    other_digest, cache_id, output = save(world, "other", "isolated-1")
    assert isinstance(cache_id, int) and cache_id > 0, output
    assert restore(world, "team-2", "isolated-1")[1] == team_digest
    assert restore(world, "other", "isolated-1")[1] == other_digest != team_digest


def test_duplicate_save_is_refused_and_the_first_stays(world: World) -> None:
    first, cache_id, _ = save(world, "solo", "dup-1")
    assert isinstance(cache_id, int) and cache_id > 0
    _, again, output = save(world, "solo", "dup-1")
    assert again == -1, output
    assert "another job may be creating this cache" in output
    assert restore(world, "solo", "dup-1")[1] == first


def test_removed_vm_is_refused_by_the_proxy(world: World) -> None:
    save(world, "leaver", "leaver-1")
    world.proxy.hostagent("vm", "remove", "leaver")
    before = world.cp.requests_seen()
    matched, restored, output = restore(world, "leaver", "leaver-1")
    assert matched is None, output
    assert restored is None
    answer = world.twirp("leaver", "GetCacheEntryDownloadURL", {"key": "leaver-1", "version": "x"})
    assert answer.status_code == 403
    assert answer.json()["error"]["code"] == "unknown_vm"
    assert world.cp.requests_seen() == before


def test_sas_urls_one_blob_ten_minutes_and_expired_refused(world: World) -> None:
    digest, _, _ = save(world, "solo", "sas-1")
    version, _ = _index_row(world, "sas-1")
    answer = world.twirp("solo", "GetCacheEntryDownloadURL", {"key": "sas-1", "restore_keys": [], "version": version})
    url = answer.json()["signed_download_url"]
    query = parse_qs(urlsplit(url).query)
    assert query["sp"] == ["r"] and query["sr"] == ["b"]
    expiry = time.mktime(time.strptime(query["se"][0], "%Y-%m-%dT%H:%M:%SZ")) - time.timezone
    assert 590 <= expiry - time.time() <= 610
    assert httpx.get(url).status_code == 200
    # The same blob, signed as it would have been 11 minutes ago: the store refuses it
    # (signed 9 minutes ago, still inside its 10, it is served: the refusal is the expiry).
    blob = urlsplit(url).path.rsplit("/", 1)[1]
    assert httpx.get(world.store.sas_url(blob, "r", now=time.time() - 540)).status_code == 200
    refused = httpx.get(world.store.sas_url(blob, "r", now=time.time() - 660))
    assert refused.status_code == 403
    assert b"<Code>AuthorizationFailure</Code>" in refused.content
    # A read URL does not write.
    assert httpx.put(url, content=b"x", headers={"x-ms-blob-type": "BlockBlob"}).status_code == 403


def _index_row(world: World, key: str) -> tuple[str, str]:
    """(version, blob) of the entry for `key`, read from the control plane's SQLite index."""
    with contextlib.closing(sqlite3.connect(world.workdir / "state" / "cache-index.sqlite3")) as db:
        row = db.execute("SELECT version, blob FROM entries WHERE key = ?", (key,)).fetchone()
    assert row is not None, key
    return str(row[0]), str(row[1])


def test_v1_with_client_6_multi_chunk(world: World) -> None:
    """40 MiB in v1 mode: two PATCH chunks (32 MiB + the rest) through the proxy, blocks of one blob."""
    digest, cache_id, output = save(world, "v1", "v1-big", size=40 * 1024 * 1024, protocol="v1")
    assert isinstance(cache_id, int) and cache_id > 0, output
    matched, restored, output = restore(world, "v1", "v1-big", protocol="v1")
    assert matched == "v1-big", output
    assert restored == digest
    patches = [json.loads(line) for line in world.proxy.log_lines() if '"PATCH"' in line]
    assert [line["status"] for line in patches] == [204, 204]
    matched, _, output = restore(world, "v1", "v1-zzz", "v1-", protocol="v1")
    assert matched == "v1-big", output
    assert restore(world, "v1", "v1-none", protocol="v1")[0] is None


def test_v1_with_client_3(world: World) -> None:
    digest, cache_id, output = save(world, "legacy", "legacy-1", package="cache3", protocol="v1")
    assert isinstance(cache_id, int) and cache_id > 0, output
    matched, restored, output = restore(world, "legacy", "legacy-1", package="cache3", protocol="v1")
    assert matched == "legacy-1", output
    assert restored == digest
    _, again, output = save(world, "legacy", "legacy-1", package="cache3", protocol="v1")
    assert again == -1, output


@pytest.fixture
def small_world(tmp_path: Path, azurite: Azurite) -> Iterator[World]:
    """A control plane whose scopes hold at most 1 MB: the third 400 kB entry evicts the first."""
    world = World(tmp_path, azurite, container="eviction", extra=("--cache-scope-bytes", "1000000")).start()
    with running(world.proxy, world.cp):
        yield world


def test_evicted_entry_takes_its_blob(small_world: World) -> None:
    world = small_world
    save(world, "solo", "evict-1", size=400_000)
    _, first_blob = _index_row(world, "evict-1")
    save(world, "solo", "evict-2", size=400_000)
    assert sorted(world.store.list_blobs()) == sorted([first_blob, _index_row(world, "evict-2")[1]])
    third, cache_id, output = save(world, "solo", "evict-3", size=400_000)
    assert isinstance(cache_id, int) and cache_id > 0, output
    after = world.store.list_blobs()
    assert first_blob not in after
    assert sorted(after) == sorted([_index_row(world, "evict-2")[1], _index_row(world, "evict-3")[1]])
    assert restore(world, "solo", "evict-1")[0] is None
    assert restore(world, "solo", "evict-2")[0] == "evict-2"
    assert restore(world, "solo", "evict-3")[1] == third


def test_guard_none_still_refuses_what_ssrf_looks_like(world: World) -> None:
    """The cache routes have no Metadata header check, but a request relayed by a proxy inside the
    guest (forwarding headers) or aimed through DNS rebinding (foreign Host) never reaches the
    control plane; a plain request reaches only the caller's own scope."""
    before = world.cp.requests_seen()
    body = {"key": "k", "version": "v"}
    with world.proxy.guest(world.addresses["solo"]) as guest:
        relayed = guest.post(TWIRP + "CreateCacheEntry", json=body, headers={"X-Forwarded-For": "10.0.0.1"})
        assert relayed.status_code == 400 and relayed.json()["error"]["code"] == "forwarded_request"
        rebound = guest.post(TWIRP + "CreateCacheEntry", json=body, headers={"Host": "attacker.example"})
        assert rebound.status_code == 403 and rebound.json()["error"]["code"] == "bad_host"
        v1 = guest.get("/runtime/github/_apis/artifactcache/cache", params={"keys": "k", "version": "v"},
                       headers={"Forwarded": "for=10.0.0.1"})  # fmt: skip
        assert v1.status_code == 400 and v1.json()["error"]["code"] == "forwarded_request"
        # The header guard still holds on the other routes.
        assert guest.get("/runtime/whoami").json()["error"]["code"] == "missing_metadata_header"
    assert world.cp.requests_seen() == before
