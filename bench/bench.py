"""The issue-6 benchmark: metadata-proxy beside haproxy doing the same job, same machine, same run.

Run it as `bench/run` (which installs haproxy, nginx and wrk and builds .venv first); it writes
bench/results.md and prints it. Everything binds loopback ports, lives in one temp dir, and
every process started here is stopped on exit, on Ctrl-C and on SIGTERM.

The job, done by both servers: accept a guest on loopback, admit it by its source address
(127.0.0.1 is the one registered VM), require `Metadata: true`, set `Authorization: Bearer
<token>`, add `X-Forwarded-For`, and forward to an nginx upstream over kept-alive connections.
haproxy runs with one thread and no logging; the proxy with one worker and its access log on
(one JSON line per request to a file), as deployed. The proxy's per-VM rate limits are raised
so that one VM can be driven flat out; the limiter still runs on every request.

CPU placement (with 2 or more CPUs, unless --no-pin): the server under test alone on CPU 0,
nginx and wrk together on CPU 1. Each server then gets one core to itself, as the bars assume,
and the load generator never takes its cycles. The table shows each server's CPU use during
the run: well under 100% means something else (wrk, nginx) was the limit.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import resource
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from importlib.metadata import version
from pathlib import Path

import jwt

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RESULTS = ROOT / "bench" / "results.md"
SMALL_ANSWER = '{"vm_id":"bench-0","region":"loopback","ok":true}'
BIG_BYTES = 256 * 1024 * 1024
SYNC_VMS = 10_000
LEAK_RUNS = 3

# The bars of issue 6.
BAR_THROUGHPUT = 0.15  # proxy req/s at 32 connections, as a fraction of haproxy's
BAR_P50 = 2.0  # proxy p50 at 1 connection, as a multiple of haproxy's
BAR_SYNC_S = 5.0
BAR_MANY_VMS = 0.10  # throughput with 10,000 VMs within this fraction of one VM's
BAR_RSS_MB = 120.0
BAR_STREAM_MB = 40.0
# "No growth" across repeated runs, allowing for allocator noise: a leak of even 100 bytes a
# request would add several MB over three runs of tens of thousands of requests each.
BAR_LEAK_MB = 1.0

# Every wait here is bounded.
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0


class BenchError(Exception):
    """The bench itself could not measure something (not a bar that failed)."""


# -- processes ----------------------------------------------------------------------------


class Processes:
    """Every process the bench starts, each in its own session so its children go with it."""

    def __init__(self) -> None:
        self._started: list[subprocess.Popen[bytes]] = []

    def start(self, argv: Sequence[str], *, stdout: Path | None = None) -> subprocess.Popen[bytes]:
        out = open(stdout, "ab") if stdout else subprocess.DEVNULL  # the child keeps its own copy
        try:
            process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        finally:
            if stdout:
                out.close()  # type: ignore[union-attr]
        self._started.append(process)
        return process

    def stop(self, process: subprocess.Popen[bytes]) -> None:
        """SIGTERM to the process's group (its workers too), SIGKILL if it lingers."""
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=STOP_TIMEOUT)
        # Workers outliving their parent would still hold the group.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        if process in self._started:
            self._started.remove(process)

    def stop_all(self) -> None:
        for process in reversed(list(self._started)):
            self.stop(process)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, process: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise BenchError(f"{what} exited with status {process.returncode} before listening on {port}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"{what} did not listen on port {port} within {START_TIMEOUT:g} s")


def _status_kb(pid: int, key: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise BenchError(f"no {key} in /proc/{pid}/status")


def rss_mb(pid: int) -> float:
    """Resident memory in MB (10^6 bytes), from VmRSS."""
    return _status_kb(pid, "VmRSS") * 1024 / 1e6


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def set_cpus(pids: list[int], cpus: set[int]) -> None:
    """Move every thread of these processes onto `cpus` (threads started later inherit it)."""
    for pid in pids:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(ProcessLookupError):
                os.sched_setaffinity(int(tid), cpus)


def group_pids(pgid: int) -> list[int]:
    """The live processes of a process group (a server and its workers)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                pids.append(int(entry))
    return pids


# -- the servers --------------------------------------------------------------------------


def nginx_config(tmp: Path, port: int) -> str:
    """One worker, loopback, a small JSON answer for any path; everything under `tmp`."""
    built = subprocess.run(["nginx", "-V"], capture_output=True, text=True, timeout=10).stderr
    temp_paths = [f"client_body_temp_path {tmp}/nginx-body;", f"proxy_temp_path {tmp}/nginx-proxy;"]
    # Each compiled-in module has a temp dir that nginx creates at start: keep them in tmp too.
    for module in ("fastcgi", "uwsgi", "scgi"):
        if f"--without-http_{module}_module" not in built:
            temp_paths.append(f"{module}_temp_path {tmp}/nginx-{module};")
    user = "user root;" if os.geteuid() == 0 else ""  # workers must read the temp dir (mode 0700)
    temps = "\n    ".join(temp_paths)
    return f"""
{user}
worker_processes 1;
daemon off;
master_process on;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    {temps}
    sendfile on;
    keepalive_timeout 75s;
    keepalive_requests 100000000;
    server {{
        listen 127.0.0.1:{port};
        location = /runtime/big {{
            alias {tmp}/big.bin;
            default_type application/octet-stream;
        }}
        location = /runtime/echo {{
            default_type application/json;
            return 200 '{{"authorization":"$http_authorization","x_forwarded_for":"$http_x_forwarded_for"}}';
        }}
        location / {{
            default_type application/json;
            return 200 '{SMALL_ANSWER}';
        }}
    }}
}}
"""


def haproxy_config(port: int, upstream: int, token: str) -> str:
    """The proxy's job in haproxy: source ACL, Metadata header, token, X-Forwarded-For, reuse."""
    return f"""
global
    nbthread 1
    maxconn 4096

defaults
    mode http
    option http-keep-alive
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    timeout http-keep-alive 5s

frontend guests
    bind 127.0.0.1:{port}
    acl registered_vm src 127.0.0.1
    http-request deny deny_status 403 unless registered_vm
    http-request deny deny_status 400 unless {{ req.hdr(metadata) -m str true }}
    http-request set-header Authorization "Bearer {token}"
    option forwardfor
    default_backend control_plane

backend control_plane
    http-reuse always
    server nginx 127.0.0.1:{upstream}
"""


def proxy_config(tmp: Path, name: str, port: int, upstream: int, registry: Path, workers: int) -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(
        f"""host_id = "bench-host"
listen = ["127.0.0.1:{port}"]
registry = "{registry}"
admin_listen = "{tmp}/{name}-admin.sock"
workers = {workers}

[control_plane]
url = "http://127.0.0.1:{upstream}"
timeout = 10
retry_budget = 1

# One VM driven flat out: far above the per-VM defaults (50/s, burst 100, 16 at once).
[limits]
requests_per_second = 1000000
burst = 1000000
max_concurrent = 1024
"""
    )
    return path


def make_token(name: str, secret: bytes) -> str:
    return jwt.encode({"sub": name, "iat": int(time.time())}, secret, algorithm="HS256")


def hostagent(registry: Path, *args: str, stdin: str | None = None) -> None:
    result = subprocess.run(
        [str(BIN / "hostagent"), "--registry", str(registry), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if result.returncode != 0:
        raise BenchError(f"hostagent {' '.join(args)} failed ({result.returncode}): {result.stderr.strip()}")


def curl(url: str, *, metadata: bool = True, timeout: float = 30) -> tuple[int, str]:
    """(status, body) of a GET, with `Metadata: true` unless told otherwise."""
    header = ["-H", "Metadata: true"] if metadata else []
    result = subprocess.run(
        ["curl", "-sS", "--max-time", str(timeout), *header, "-w", "\n%{http_code}", url],
        capture_output=True,
        text=True,
        timeout=timeout + 5,
    )
    if result.returncode != 0:
        raise BenchError(f"curl {url} failed: {result.stderr.strip()}")
    body, _, status = result.stdout.rpartition("\n")
    return int(status), body


def check_forwarding(base: str, token: str, what: str) -> None:
    """The server really does the job: the upstream sees the token and X-Forwarded-For."""
    status, body = curl(f"{base}/runtime/echo")
    seen = json.loads(body) if status == 200 else {}
    if seen.get("authorization") != f"Bearer {token}" or seen.get("x_forwarded_for") != "127.0.0.1":
        raise BenchError(f"{what} does not forward as configured: status {status}, upstream saw {body[:200]!r}")
    status, _ = curl(f"{base}/runtime/x", metadata=False)
    if status != 400:
        raise BenchError(f"{what} forwarded a request without `Metadata: true` (status {status})")


