"""Where the memory of a held long-poll goes: the real proxy in this process, measured.

    .venv/bin/python bench/held_memory.py [--vms 100] [--per-vm 10] [--trace FRAMES]

The reference control plane runs as a child process (as in bench/resilience.py), the guests
in another (one asyncio client); the proxy (`server.ProxyServer`, uvloop, one worker, the
same config as bench/run-resilience) runs here, so that what it holds can be counted. After
one GET per VM (its ETag: the per-VM state the first request builds), the guests hold
`vms x per_vm` `wait_for_change` requests; the report is the growth from before to while
they are held, per held request:

- RSS (VmRSS) and libc malloc's bytes in use (mallinfo2: uvloop/libuv handles, llhttp
  parsers, Python objects over 512 bytes), and, with `--trace`, tracemalloc's total;
- the objects the garbage collector tracks, counted by type (with their sys.getsizeof), and
  the bytes and str objects it does not track, found through them;
- with `--trace N`: tracemalloc's growth by allocating line, with N frames of traceback for
  the largest (tracemalloc's own bookkeeping inflates RSS: take RSS from a run without it).

Not a test and not part of bench/run-resilience: a tool to find what to cut.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import os
import shutil
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from pathlib import Path

import uvloop
from resilience import METADATA, proxy_config, raise_nofile, start_world, write_vms

from bench import ROOT, Processes, free_port, rss_mb
from metadata_proxy import systemd
from metadata_proxy.config import ListenAddress, load_config
from metadata_proxy.logs import AccessLog
from metadata_proxy.server import ProxyServer, bind_listen

# After the last request is held, before measuring: past the guest side's header deadline
# (protocol.HEADER_TIMEOUT), whose timer goes when it fires, as it has for most requests
# held in bench/run-resilience by the time it measures.
SETTLE_SECONDS = 6.0

CLIENT = r"""
import asyncio, sys, uvloop
port, vms, per_vm, metadata = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
def address(i): return f"127.0.{1 + i // 250}.{1 + i % 250}"
async def get(i, target):
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(address(i), 0))
    head = f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nMetadata: true\r\nConnection: close\r\n\r\n"
    writer.write(head.encode())
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    await reader.read()
    writer.close()
    for line in head.split("\r\n"):
        if line.lower().startswith("etag:"):
            return line.split(":", 1)[1].strip().strip('"')
    raise SystemExit(f"no etag for VM {i}: {head!r}")
async def main():
    etags = {}
    for i in range(vms):
        etags[i] = await get(i, metadata)
    print("warm", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    query = "?wait_for_change=true&timeout_sec=300&last_etag="
    held = [asyncio.create_task(get(k % vms, f"{metadata}{query}{etags[k % vms]}&n={k}")) for k in range(vms * per_vm)]
    print("sent", flush=True)
    await asyncio.gather(*held)
    print("answered", flush=True)
uvloop.run(main())
"""


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks")
    ] + [("keepcost", ctypes.c_size_t)]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _Mallinfo2


def malloc_in_use() -> int:
    info = _libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


def census() -> tuple[Counter[str], Counter[str]]:
    """Counts and sys.getsizeof bytes by type: gc-tracked objects, and the untracked bytes/str
    objects they refer to (each once)."""
    gc.collect()
    counts: Counter[str] = Counter()
    sizes: Counter[str] = Counter()
    seen: set[int] = set()
    objects = gc.get_objects()
    for obj in objects:
        kind = type(obj)
        name = f"{kind.__module__}.{kind.__qualname__}"
        counts[name] += 1
        sizes[name] += sys.getsizeof(obj)
        for ref in gc.get_referents(obj):
            if isinstance(ref, bytes | str | int | float) and id(ref) not in seen:
                seen.add(id(ref))
                rname = type(ref).__name__
                counts[rname] += 1
                sizes[rname] += sys.getsizeof(ref)
    del objects
    return counts, sizes


async def measure(args: argparse.Namespace, server: ProxyServer, port: int) -> dict[str, object]:
    total = args.vms * args.per_vm
    client = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CLIENT,
        str(port),
        str(args.vms),
        str(args.per_vm),
        METADATA,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert client.stdin is not None and client.stdout is not None
    if (await client.stdout.readline()).strip() != b"warm":
        raise SystemExit("the client failed")
    await asyncio.sleep(1)
    counts0, sizes0 = census() if args.census else (Counter(), Counter())
    snap0 = tracemalloc.take_snapshot() if args.trace else None
    rss0, malloc0 = rss_mb(os.getpid()), malloc_in_use()
    cpu0 = time.process_time()
    client.stdin.write(b"go\n")
    await client.stdin.drain()
    app, pool = server.app, server.app.client
    for _ in range(600):
        if app.in_flight >= total and pool.connections_open - pool.connections_idle >= total:
            break
        await asyncio.sleep(0.1)
    else:
        raise SystemExit(f"only {app.in_flight} held, {pool.connections_open} upstream connections")
    await asyncio.sleep(SETTLE_SECONDS)
    holding_cpu = time.process_time() - cpu0
    rss1, malloc1 = rss_mb(os.getpid()), malloc_in_use()
    snap1 = tracemalloc.take_snapshot() if args.trace else None
    counts1, sizes1 = census() if args.census else (Counter(), Counter())
    report: dict[str, object] = {
        "held": total,
        "rss_growth_bytes_per_held": round((rss1 - rss0) * 1e6 / total),
        "malloc_growth_bytes_per_held": round((malloc1 - malloc0) / total),
    }
    print(
        f"held {total}: RSS {rss0:.1f} -> {rss1:.1f} MB, {report['rss_growth_bytes_per_held']} B/held;"
        f" malloc in use +{report['malloc_growth_bytes_per_held']} B/held"
    )
    if args.census:
        print("\nper held request, by type (gc census; getsizeof):")
        rows = []
        for name in set(counts1) | set(counts0):
            dn = counts1[name] - counts0[name]
            ds = sizes1[name] - sizes0[name]
            if abs(dn) >= total // 2 or abs(ds) >= total * 16:
                rows.append((ds, dn, name))
        rows.sort(reverse=True)
        for ds, dn, name in rows:
            print(f"  {dn / total:6.2f} x {name:60s} {ds / total:8.0f} B")
        print(f"  {'total':>69s} {sum(r[0] for r in rows) / total:8.0f} B")
    if snap0 is not None and snap1 is not None:
        diff = snap1.compare_to(snap0, "traceback")
        grown = sum(stat.size_diff for stat in diff)
        print(f"\ntracemalloc: +{grown / total:.0f} B/held in all; by allocating traceback:")
        for stat in diff[: args.top]:
            if stat.size_diff < total * 8:
                break
            print(f"\n  {stat.size_diff / total:7.0f} B/held, {stat.count_diff / total:5.2f} blocks/held")
            for line in stat.traceback.format()[-2 * args.trace :]:
                print("     " + line)
        by_line = snap1.compare_to(snap0, "lineno")
        print("\ntracemalloc by allocating line:")
        for stat in by_line[: args.top]:
            if stat.size_diff < total * 8:
                break
            frame = stat.traceback[0]
            print(f"  {stat.size_diff / total:7.0f} B/held  {frame.filename}:{frame.lineno}")
    client.stdin.close()
    cpu = time.process_time()
    write_vms(args.vm_file, generation=1)
    await asyncio.wait_for(client.wait(), 60)
    answer_cpu = time.process_time() - cpu
    report["cpu_us"] = round((holding_cpu + answer_cpu) / total * 1e6, 1)
    print(
        f"\nCPU a request, from its arrival to its answer (every VM's metadata changed at once):"
        f" {report['cpu_us']} µs ({answer_cpu / total * 1e6:.1f} of them answering)"
    )
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vms", type=int, default=100)
    parser.add_argument("--per-vm", type=int, default=10)
    parser.add_argument("--trace", type=int, default=0, help="tracemalloc with this many frames (0: off)")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument(
        "--no-census",
        dest="census",
        action="store_false",
        help="skip the object census (its full collections move the garbage collector's next ones: for CPU)",
    )
    args = parser.parse_args()
    raise_nofile()
    if args.trace:
        tracemalloc.start(args.trace)
    os.chdir(ROOT)
    processes = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="metadata-proxy-held-memory-"))
    try:
        args.vm_file, registry, cp_port, _ = start_world(tmp, processes)
        port = free_port()
        config = load_config(str(proxy_config(tmp, "held", port, cp_port, registry)))
        sock = bind_listen(ListenAddress("127.0.0.1", port))
        result: list[dict[str, object]] = []

        def ready() -> None:
            async def go() -> None:
                try:
                    result.append(await measure(args, server, port))
                finally:
                    server.request_stop()

            asyncio.get_running_loop().create_task(go())

        server = ProxyServer(
            config,
            config_path=None,
            guest_sockets=[sock],
            admin_socket=None,
            notifier=systemd.Notifier.from_environ({}),
            access_log=AccessLog(open(os.devnull, "w")),  # noqa: SIM115
            on_ready=ready,
        )
        uvloop.run(server.run())
        return 0 if result else 1
    finally:
        processes.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
