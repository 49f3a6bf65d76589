"""Micro-benchmark of the upstream client against a loopback HTTP/1.1 server (under uvloop).

    python bench/upstream_micro.py [--client upstream|aiohttp|httpx] [-n 20000] [-c 32]

The server runs in a child process (one core), the client in this one; the report gives
requests/s and the client's CPU time per request, for one task issuing requests back to
back and for `-c` concurrent tasks. aiohttp and httpx are only there to compare against:
run the same script with an interpreter that has them (aiohttp is not a project dependency).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

BODY = b'{"vm_id": "vm-0123456789", "host_id": "host-a", "address": "10.0.0.7"}'
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
    b"Date: Thu, 01 Jan 2026 00:00:00 GMT\r\nServer: bench\r\n\r\n%b" % (len(BODY), BODY)
)
# Roughly what the proxy sends: a JWT, the peer address, the host id, a request id.
HEADERS = [
    (b"Accept", b"*/*"),
    (b"User-Agent", b"curl/8.5.0"),
    (b"Metadata", b"true"),
    (b"Authorization", b"Bearer " + b"x" * 180),
    (b"X-Forwarded-For", b"10.0.0.7"),
    (b"X-Metadata-Proxy-Host", b"host-a"),
    (b"X-Request-Id", b"0123456789abcdef0123456789abcdef"),
]
TARGET = b"/runtime/whoami?x=1"


class _ServerProtocol(asyncio.Protocol):
    """Answers every request head (GET, no body) with RESPONSE; good enough for a benchmark."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        count = self.buffer.count(b"\r\n\r\n")
        if count:
            self.buffer = self.buffer[self.buffer.rindex(b"\r\n\r\n") + 4 :]
            self.transport.write(RESPONSE * count)  # type: ignore[attr-defined]


def serve(sock: socket.socket) -> None:
    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(_ServerProtocol, sock=sock, backlog=1024)
        await server.serve_forever()

    _run(main())


def _run(coro: Awaitable[None]) -> None:
    try:
        import uvloop

        uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]


async def _drive(n: int, concurrency: int, one: Callable[[], Awaitable[None]]) -> tuple[float, float]:
    remaining = n

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await one()

    for _ in range(200):  # warm up: connections, caches
        await one()
    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - wall, time.process_time() - cpu


async def bench(kind: str, url: str, n: int, concurrency: int) -> None:
    if kind == "upstream":
        sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
        from metadata_proxy.upstream import Upstream

        up = Upstream(url, timeout=10, retry_budget=5)

        async def one() -> None:
            resp = await up.request("GET", TARGET, HEADERS)
            try:
                assert await resp.read() == BODY
            finally:
                await resp.aclose()

        close: Callable[[], Awaitable[None]] = up.aclose
    elif kind == "aiohttp":
        import aiohttp

        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=256), auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
        )
        str_headers = {k.decode(): v.decode() for k, v in HEADERS}
        full = url + TARGET.decode()

        async def one() -> None:
            async with session.get(full, headers=str_headers, allow_redirects=False) as r:
                assert await r.read() == BODY

        close = session.close
    elif kind == "httpx":
        import httpx

        hx = httpx.AsyncClient(trust_env=False, limits=httpx.Limits(max_connections=256))
        str_headers = {k.decode(): v.decode() for k, v in HEADERS}
        full = url + TARGET.decode()

        async def one() -> None:
            r = await hx.get(full, headers=str_headers)
            assert r.content == BODY

        close = hx.aclose
    else:
        raise SystemExit(f"unknown client {kind!r}")
    for label, c in (("sequential", 1), (f"concurrent x{concurrency}", concurrency)):
        wall, cpu = await _drive(n, c, one)
        print(f"{kind:9} {label:15} {n / wall:8.0f} req/s  {cpu / n * 1e6:6.0f} us CPU/request", flush=True)
    await close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--client", default="upstream", choices=["upstream", "aiohttp", "httpx"])
    parser.add_argument("-n", type=int, default=20000)
    parser.add_argument("-c", type=int, default=32)
    parser.add_argument("--serve-fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_fd is not None:
        serve(socket.socket(fileno=args.serve_fd))
        return
    sock = socket.create_server(("127.0.0.1", 0))
    child = subprocess.Popen([sys.executable, __file__, "--serve-fd", str(sock.fileno())], pass_fds=[sock.fileno()])
    try:
        _run(bench(args.client, f"http://127.0.0.1:{sock.getsockname()[1]}", args.n, args.c))
    finally:
        child.terminate()
        child.wait()
        sock.close()


if __name__ == "__main__":
    main()
