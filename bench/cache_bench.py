"""The Actions cache benchmark: GetCacheEntryDownloadURL through the proxy against an index of
100,000 entries in 1,000 scopes, beside `whoami` through the same proxy in the same run.

    .venv/bin/python bench/cache_bench.py [--seconds 8] [--rounds 3] [--connections 8] [--postgres | --database URL]

Needs tests/node's Azurite (``npm ci --prefix tests/node``): the control plane creates its
container at start and signs URLs for it (the benchmark never downloads a blob). The index is
SQLite under a temp dir (``--postgres``: a throwaway PostgreSQL 15 server; ``--database``: an
existing empty PostgreSQL database),
filled directly: 1,000 scopes x 100 finalized entries, keys ``deps-G-N`` (10 groups of 10).
Each VM of the run belongs to one scope. Three targets, measured in turn round after round:

    whoami   GET /runtime/whoami (Metadata: true): the proxy + control-plane floor
    exact    GetCacheEntryDownloadURL, the key of an existing entry
    prefix   GetCacheEntryDownloadURL, a missing key and one restore key matching 10 entries

The load is closed-loop: ``--connections`` kept-alive connections, each from its VM's loopback
address, one request at a time. Prints p50/p99 latency and requests/s per target and the
ratios to whoami. Everything binds loopback and lives in one temp dir; every process started
here is stopped on exit.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from controlplane.cache_index import PostgresIndex, SqliteIndex  # noqa: E402
from tests.cache_harness import AZURITE_ACCOUNT, Azurite, Postgres  # noqa: E402
from tests.harness import ControlPlane, Proxy  # noqa: E402

SCOPES = 1000
PER_SCOPE = 100
VERSION = "b" * 64
TWIRP = "/twirp/github.actions.results.api.v1.CacheService/GetCacheEntryDownloadURL"
ROUTES = """
[limits]
requests_per_second = 1000000
burst = 1000000
max_concurrent = 1000

[[routes]]
prefix = "/runtime/"

[[routes]]
prefix = "/twirp/"
guard = "none"
max_body_bytes = 67108864
timeout = 30
"""


def fill(index_rows: list[tuple[object, ...]], *, sqlite_path: Path | None, database: str | None) -> None:
    insert = (
        "INSERT INTO entries (scope, key, version, blob, size, created, finalized, last_used)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
    )
    if sqlite_path is not None:
        SqliteIndex(sqlite_path).close()  # the schema
        with sqlite3.connect(sqlite_path) as db:
            db.executemany(insert, index_rows)
        return
    assert database is not None
    index = PostgresIndex(database)
    with index._connection().cursor() as cur:
        cur.executemany(insert.replace("?", "%s"), index_rows)
    index.close()


def rows() -> list[tuple[object, ...]]:
    now = time.time()
    out: list[tuple[object, ...]] = []
    for scope in range(SCOPES):
        for n in range(PER_SCOPE):
            at = now - 3600 + n
            out.append((f"scope-{scope}", f"deps-{n // 10}-{n:03d}", VERSION, f"blob-{scope}-{n}", 1000, at, at, at))
    return out


def request_bytes(target: str, rng: random.Random) -> bytes:
    if target == "whoami":
        return b"GET /runtime/whoami HTTP/1.1\r\nHost: 127.0.0.1\r\nMetadata: true\r\n\r\n"
    if target == "exact":
        n = rng.randrange(PER_SCOPE)
        body = {"key": f"deps-{n // 10}-{n:03d}", "restore_keys": [], "version": VERSION}
    else:
        group = rng.randrange(10)
        body = {"key": f"deps-{group}-zzz", "restore_keys": [f"deps-{group}-"], "version": VERSION}
    data = json.dumps(body).encode()
    head = (
        f"POST {TWIRP} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


async def one_connection(
    port: int, address: str, target: str, deadline: float, latencies: list[float], seed: int
) -> None:
    rng = random.Random(seed)
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(address, 0))
    try:
        while time.perf_counter() < deadline:
            request = request_bytes(target, rng)
            start = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            body = await reader.readexactly(length)
            latencies.append(time.perf_counter() - start)
            if not head.startswith(b"HTTP/1.1 200") or (target != "whoami" and b'"ok":true' not in body):
                raise RuntimeError(f"{target}: unexpected answer {head[:40]!r} {body[:200]!r}")
    finally:
        writer.close()


async def measure(
    port: int, addresses: list[str], target: str, seconds: float, connections: int
) -> tuple[float, float, float]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    started = time.perf_counter()
    await asyncio.gather(
        *(
            one_connection(port, addresses[n % len(addresses)], target, deadline, latencies, n)
            for n in range(connections)
        )
    )
    elapsed = time.perf_counter() - started
    latencies.sort()
    p50 = latencies[len(latencies) // 2]
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return p50 * 1000, p99 * 1000, len(latencies) / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--database", help="an empty PostgreSQL database (postgresql://...) instead of SQLite")
    parser.add_argument("--postgres", action="store_true", help="start a throwaway PostgreSQL 15 and use it")
    args = parser.parse_args()
    postgres = Postgres().start() if args.postgres else None
    if postgres is not None:
        args.database = postgres.url

    work = Path(tempfile.mkdtemp(prefix="cache-bench-"))
    azurite = Azurite(work).start()
    state = work / "state"
    state.mkdir()
    started = time.perf_counter()
    fill(rows(), sqlite_path=None if args.database else state / "cache-index.sqlite3", database=args.database)
    print(f"index: {SCOPES * PER_SCOPE} entries in {SCOPES} scopes, filled in {time.perf_counter() - started:.1f} s")

    vms = work / "vms"
    vms.write_text("".join(json.dumps({"vm_id": f"vm-{n}", "scope": f"scope-{n}"}) + "\n" for n in range(SCOPES)))
    where = ("--database", args.database) if args.database else ("--state-dir", str(state))
    cp = ControlPlane(
        work,
        extra=(
            "--vms", str(vms), "--blob-url", azurite.url, "--blob-account", AZURITE_ACCOUNT,
            "--blob-key-file", str(azurite.key_file()), *where,
        ),
    )  # fmt: skip
    proxy = Proxy(work, cp.url, ROUTES, timeout=30)
    results: dict[str, list[tuple[float, float, float]]] = {"whoami": [], "exact": [], "prefix": []}
    try:
        cp.start()
        proxy.start()
        addresses = []
        lines = []
        for n in range(args.connections):  # one VM (and scope) per connection, spread over the 1,000 scopes
            vm = n * (SCOPES // args.connections)
            addresses.append(f"127.0.1.{n + 1}")
            lines.append(json.dumps({"name": f"vm-{vm}", "address": addresses[-1], "token": cp.mint(f"vm-{vm}")}))
        proxy.hostagent("vm", "sync", "-", input="\n".join(lines) + "\n")
        for target in results:  # warm-up
            asyncio.run(measure(proxy.port, addresses, target, 1.0, args.connections))
        for _ in range(args.rounds):
            for target in results:
                results[target].append(
                    asyncio.run(measure(proxy.port, addresses, target, args.seconds, args.connections))
                )
    finally:
        proxy.stop()
        cp.stop()
        azurite.stop()
        if postgres is not None:
            postgres.stop()

    backend = "PostgreSQL" if args.database else "SQLite"
    print(
        f"index backend: {backend}; {args.connections} connections, {args.rounds} rounds of {args.seconds:g} s, medians"
    )
    print(f"{'target':8} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'req/s vs whoami':>16}")
    base = statistics.median(r[2] for r in results["whoami"])
    for target, runs in results.items():
        p50 = statistics.median(r[0] for r in runs)
        p99 = statistics.median(r[1] for r in runs)
        rps = statistics.median(r[2] for r in runs)
        print(f"{target:8} {p50:8.2f} {p99:8.2f} {rps:8.0f} {rps / base:16.2f}")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
