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
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
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

    def start(self, argv: Sequence[str], *, cpus: str | None, stdout: Path | None = None) -> subprocess.Popen[bytes]:
        if cpus is not None:
            argv = ["taskset", "-c", cpus, *argv]  # taskset execs: the pid is the server's own
        out = open(stdout, "ab") if stdout else subprocess.DEVNULL  # noqa: SIM115 - the child holds it
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


def proxy_config(tmp: Path, name: str, port: int, upstream: int, workers: int) -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(
        f"""host_id = "bench-host"
listen = ["127.0.0.1:{port}"]
registry = "{tmp}/registry.sqlite3"
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


def curl(url: str, *args: str, timeout: float = 30) -> tuple[int, str]:
    """(status, body) of a GET with `Metadata: true`."""
    result = subprocess.run(
        ["curl", "-sS", "--max-time", str(timeout), "-H", "Metadata: true", "-w", "\n%{http_code}", *args, url],
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
    status, _ = curl(f"{base}/runtime/x", "-H", "Metadata:")  # the header removed
    if status != 400:
        raise BenchError(f"{what} forwarded a request without `Metadata: true` (status {status})")


# -- wrk ----------------------------------------------------------------------------------


@dataclass
class Run:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    cpu: float  # the server's CPU use during the run, 1.0 = one core


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _latency_ms(text: str, percentile: str) -> float:
    match = re.search(rf"^\s*{percentile}%\s+([\d.]+)(us|ms|s)\s*$", text, re.MULTILINE)
    if not match:
        raise BenchError(f"no {percentile}% latency in wrk's output:\n{text}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def wrk(url: str, connections: int, seconds: float, cpus: str | None) -> tuple[str, float, float, float, int]:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-H", "Metadata: true", url]
    if cpus is not None:
        argv = ["taskset", "-c", cpus, *argv]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    out = result.stdout
    if result.returncode != 0:
        raise BenchError(f"wrk failed ({result.returncode}): {result.stderr.strip()}")
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if bad or (errors and any(int(n) for n in errors.groups())):
        raise BenchError(f"wrk saw failed requests against {url}:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    return out, rps, _latency_ms(out, "50"), _latency_ms(out, "99"), requests


def drive(url: str, connections: int, pids: list[int], opts: Options, label: str) -> Run:
    """A discarded warm-up, then the measured run with the server's CPU time around it."""
    wrk(url, connections, opts.warmup, opts.wrk_cpus)
    before = sum(cpu_seconds(pid) for pid in pids)
    started = time.monotonic()
    _, rps, p50, p99, requests = wrk(url, connections, opts.duration, opts.wrk_cpus)
    cpu = (sum(cpu_seconds(pid) for pid in pids) - before) / (time.monotonic() - started)
    print(f"  {label:<34} {rps:>9.0f} req/s  p50 {p50:7.3f} ms  p99 {p99:7.3f} ms  cpu {cpu:4.0%}", flush=True)
    return Run(rps, p50, p99, requests, cpu)


# -- the scenario -------------------------------------------------------------------------


@dataclass
class Options:
    warmup: float
    duration: float
    server_cpus: str | None
    aux_cpus: str | None  # nginx
    wrk_cpus: str | None


@dataclass
class Stream:
    seconds: float
    rss_before: float
    rss_peak: float
    rss_after: float


def stream_big(base: str, pid: int | None) -> Stream:
    """Fetch /runtime/big with curl, sampling the server's RSS while it streams."""
    rss_before = rss_mb(pid) if pid else 0.0
    peak = rss_before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        deadline = time.monotonic() + 120
        while not done.is_set() and time.monotonic() < deadline:
            peak = max(peak, rss_mb(pid))  # type: ignore[arg-type]
            done.wait(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    if pid:
        sampler.start()
    started = time.monotonic()
    try:
        result = subprocess.run(
            ["curl", "-sS", "--max-time", "100", "-H", "Metadata: true", "-o", "/dev/null"]
            + ["-w", "%{http_code} %{size_download}", f"{base}/runtime/big"],
            capture_output=True,
            text=True,
            timeout=110,
        )
    finally:
        done.set()
        if pid:
            sampler.join(timeout=5)
    seconds = time.monotonic() - started
    if result.stdout.split() != ["200", str(BIG_BYTES)]:
        raise BenchError(f"streaming {BIG_BYTES} bytes through {base} failed: {result.stdout} {result.stderr}")
    return Stream(seconds, rss_before, peak, rss_mb(pid) if pid else 0.0)


def machine() -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except OSError:
            return "?"
        return (done.stdout or done.stderr).strip().splitlines()[0] if (done.stdout or done.stderr).strip() else "?"

    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    if subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD"], capture_output=True).returncode:
        commit += " + uncommitted changes"
    from importlib.metadata import version

    libs = ", ".join(f"{name} {version(name)}" for name in ("uvicorn", "uvloop", "httptools", "prometheus-client"))
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": f"{os.cpu_count()} × {model}",
        "kernel": platform.release(),
        "metadata-proxy": f"{version('metadata-proxy')} ({commit}), Python {platform.python_version()}, {libs}",
        "haproxy": first_line(["haproxy", "-v"]).split(" - ")[0],
        "nginx": first_line(["nginx", "-v"]),
        "wrk": first_line(["wrk", "-v"]).split(" Copyright")[0],
    }


def verdict(ok: bool) -> str:
    return "**pass**" if ok else "**FAIL**"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 s warm-up, 3 s runs: for trying the bench itself")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--output", default=str(RESULTS), help="where to write the markdown (default: %(default)s)")
    args = parser.parse_args(argv)
    pin = not args.no_pin and (os.cpu_count() or 1) >= 2 and shutil.which("taskset") is not None
    opts = Options(
        warmup=1 if args.quick else 2,
        duration=3 if args.quick else 10,
        server_cpus="0" if pin else None,
        aux_cpus="1" if pin else None,
        wrk_cpus="1" if pin else None,
    )

    # SIGTERM/SIGHUP become SystemExit, so the `finally` below stops everything.
    def exit_on(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, exit_on)
    processes = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="metadata-proxy-bench-"))
    try:
        report = render(machine(), opts, args.quick, scenario(tmp, processes, opts))
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        processes.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    Path(args.output).write_text(report)
    print()
    print(report, end="")
    print(f"(written to {args.output})")
    return 0


@dataclass
class Results:
    runs: dict[tuple[str, int], Run]  # (server, connections)
    sync_s: float
    reload_ms: float
    many: Run  # the proxy at 32 connections with SYNC_VMS registered
    rss_one: float
    rss_many: float
    rss_runs: list[float]  # after each repeated run
    stream_h: Stream
    stream_p: Stream
    scaling: Scaling


def scenario(tmp: Path, processes: Processes, opts: Options) -> Results:
    secret = secrets.token_bytes(32)
    token = make_token("bench-0", secret)
    registry = tmp / "registry.sqlite3"
    with open(tmp / "big.bin", "wb") as f:
        f.truncate(BIG_BYTES)  # sparse: costs no disk, nginx still sends every byte

    nginx_port, haproxy_port, proxy_port = free_port(), free_port(), free_port()
    (tmp / "nginx.conf").write_text(nginx_config(tmp, nginx_port))
    nginx = processes.start(
        ["nginx", "-e", str(tmp / "nginx-error.log"), "-p", str(tmp), "-c", str(tmp / "nginx.conf")],
        cpus=opts.aux_cpus,
        stdout=tmp / "nginx.out",
    )
    wait_for_port(nginx_port, nginx, "nginx")

    (tmp / "haproxy.cfg").write_text(haproxy_config(haproxy_port, nginx_port, token))
    haproxy = processes.start(
        ["haproxy", "-db", "-f", str(tmp / "haproxy.cfg")], cpus=opts.server_cpus, stdout=tmp / "haproxy.out"
    )
    wait_for_port(haproxy_port, haproxy, "haproxy")

    hostagent(registry, "vm", "add", "bench-0", "--address", "127.0.0.1", "--token-file", "-", stdin=token)
    config = proxy_config(tmp, "proxy", proxy_port, nginx_port, workers=1)
    proxy = processes.start(
        [str(BIN / "metadata-proxy"), "serve", "--config", str(config)],
        cpus=opts.server_cpus,
        stdout=tmp / "proxy.log",
    )
    wait_for_port(proxy_port, proxy, "metadata-proxy")

    hbase, pbase = f"http://127.0.0.1:{haproxy_port}", f"http://127.0.0.1:{proxy_port}"
    check_forwarding(hbase, token, "haproxy")
    check_forwarding(pbase, token, "metadata-proxy")
    url = "/runtime/bench/instance-identity"

    print(f"bench: wrk {opts.warmup:g} s warm-up + {opts.duration:g} s per run; ", end="")
    print("server on CPU 0, nginx and wrk on CPU 1" if opts.server_cpus else "no CPU pinning", flush=True)
    runs: dict[tuple[str, int], Run] = {}
    for n in (32, 1):
        runs["haproxy", n] = drive(hbase + url, n, [haproxy.pid], opts, f"haproxy, {n} conn")
        runs["proxy", n] = drive(pbase + url, n, [proxy.pid], opts, f"proxy, {n} conn")
    rss_one = rss_mb(proxy.pid)

    # 10,000 VMs: the sync's wall time as the control plane sees it (a hostagent process),
    # then the proxy with all of them registered.
    lines = [json.dumps({"name": "bench-0", "address": "127.0.0.1", "token": token})]
    for i in range(1, SYNC_VMS):
        name = f"vm-{i:05d}"
        address = f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}"
        lines.append(json.dumps({"name": name, "address": address, "token": make_token(name, secret)}))
    (tmp / "sync.jsonl").write_text("\n".join(lines) + "\n")
    started = time.monotonic()
    hostagent(registry, "vm", "sync", str(tmp / "sync.jsonl"))
    sync_s = time.monotonic() - started
    started = time.monotonic()
    status, _ = curl(pbase + url)  # the first request after the change reloads the snapshot
    reload_ms = (time.monotonic() - started) * 1000
    if status != 200:
        raise BenchError(f"the proxy answered {status} after the 10,000-VM sync")
    print(f"  vm sync of {SYNC_VMS} VMs: {sync_s:.2f} s; first request after it: {reload_ms:.0f} ms", flush=True)
    many = drive(pbase + url, 32, [proxy.pid], opts, f"proxy, 32 conn, {SYNC_VMS} VMs")
    rss_many = rss_mb(proxy.pid)

    # Repeated runs: RSS after each against RSS after the run above.
    rss_runs = []
    for n in range(LEAK_RUNS):
        drive(pbase + url, 32, [proxy.pid], opts, f"proxy, 32 conn, repeat {n + 1}")
        rss_runs.append(rss_mb(proxy.pid))

    stream_h = stream_big(hbase, None)
    stream_p = stream_big(pbase, proxy.pid)
    print(f"  256 MiB: haproxy {stream_h.seconds:.2f} s, proxy {stream_p.seconds:.2f} s", flush=True)
    print(f"           proxy RSS {stream_p.rss_before:.1f} -> peak {stream_p.rss_peak:.1f} MB", flush=True)

    processes.stop(proxy)
    processes.stop(haproxy)
    scaling = workers_scaling(tmp, processes, nginx_port, opts)

    return Results(runs, sync_s, reload_ms, many, rss_one, rss_many, rss_runs, stream_h, stream_p, scaling)


@dataclass
class Scaling:
    one: Run | None
    two: Run | None
    note: str


def workers_scaling(tmp: Path, processes: Processes, nginx_port: int, opts: Options) -> Scaling:
    """workers = 1 and workers = 2 at 32 connections, nothing pinned (two workers need both cores)."""
    unpinned = Options(opts.warmup, opts.duration, None, None, None)
    port = free_port()
    config = proxy_config(tmp, "proxy2", port, nginx_port, workers=2)
    two = processes.start([str(BIN / "metadata-proxy"), "serve", "--config", str(config)], cpus=None)
    try:
        wait_for_port(port, two, "metadata-proxy (workers = 2)")
    except BenchError as exc:
        processes.stop(two)
        print(f"  workers=2: not supported yet ({exc})", flush=True)
        return Scaling(None, None, "not supported yet (the proxy did not start with workers = 2)")
    time.sleep(1)  # workers fork after the parent binds
    pids = group_pids(two.pid)
    if len(pids) < 2:
        processes.stop(two)
        print("  workers=2: not supported yet (one process serves)", flush=True)
        return Scaling(None, None, "not supported yet (one process serves)")
    url = f"http://127.0.0.1:{port}/runtime/bench/instance-identity"
    run_two = drive(url, 32, pids, unpinned, "proxy, 32 conn, workers=2, unpinned")
    processes.stop(two)

    port = free_port()
    config = proxy_config(tmp, "proxy1", port, nginx_port, workers=1)
    one = processes.start([str(BIN / "metadata-proxy"), "serve", "--config", str(config)], cpus=None)
    wait_for_port(port, one, "metadata-proxy")
    url = f"http://127.0.0.1:{port}/runtime/bench/instance-identity"
    run_one = drive(url, 32, [one.pid], unpinned, "proxy, 32 conn, workers=1, unpinned")
    processes.stop(one)
    return Scaling(run_one, run_two, f"{len(pids)} processes")


# -- the report ---------------------------------------------------------------------------


def render(info: dict[str, str], opts: Options, quick: bool, r: Results) -> str:
    runs = r.runs
    leak = r.rss_runs[-1] - r.rss_many
    h32, p32, h1, p1 = runs["haproxy", 32], runs["proxy", 32], runs["haproxy", 1], runs["proxy", 1]
    out: list[str] = []
    add = out.append
    add("## Benchmark: metadata-proxy beside haproxy\n")
    add("Produced by `bench/run`" + (" --quick (short runs: not for the README)" if quick else "") + ".\n")
    for key, value in info.items():
        add(f"- {key}: {value}")
    placement = "haproxy / the proxy alone on CPU 0, nginx and wrk on CPU 1" if opts.server_cpus else "no CPU pinning"
    add(f"- load: wrk, 1 thread, {opts.warmup:g} s warm-up then {opts.duration:g} s per run; {placement}")
    add("- haproxy: nbthread 1, no log; metadata-proxy: workers = 1, access log on (to a file)\n")

    add("| | haproxy | metadata-proxy | proxy / haproxy | bar | |")
    add("|---|---:|---:|---:|---:|---|")

    def row(label: str, h: float, p: float, fmt: str, bar: str = "", ok: bool | None = None) -> None:
        add(f"| {label} | {h:{fmt}} | {p:{fmt}} | {p / h:.2f} | {bar} | {'' if ok is None else verdict(ok)} |")

    row("req/s, 32 connections", h32.rps, p32.rps, ",.0f", f"≥ {BAR_THROUGHPUT}", p32.rps / h32.rps >= BAR_THROUGHPUT)
    row("p50 ms, 32 connections", h32.p50_ms, p32.p50_ms, ".3f")
    row("p99 ms, 32 connections", h32.p99_ms, p32.p99_ms, ".3f")
    row("server CPU, 32 connections (1.00 = a core)", h32.cpu, p32.cpu, ".2f")
    row("req/s, 1 connection", h1.rps, p1.rps, ",.0f")
    row("p50 ms, 1 connection", h1.p50_ms, p1.p50_ms, ".3f", f"≤ {BAR_P50}", p1.p50_ms / h1.p50_ms <= BAR_P50)
    row("p99 ms, 1 connection", h1.p99_ms, p1.p99_ms, ".3f")
    row("CPU µs per request, 32 connections", h32.cpu / h32.rps * 1e6, p32.cpu / p32.rps * 1e6, ".1f")
    row("256 MiB streamed, seconds", r.stream_h.seconds, r.stream_p.seconds, ".2f")
    add("")

    add("| metadata-proxy | value | bar | |")
    add("|---|---:|---:|---|")

    def line(label: str, value: str, bar: str = "", ok: bool | None = None) -> None:
        add(f"| {label} | {value} | {bar} | {'' if ok is None else verdict(ok)} |")

    line(f"`hostagent vm sync` of {SYNC_VMS:,} VMs", f"{r.sync_s:.2f} s", f"≤ {BAR_SYNC_S:g} s", r.sync_s <= BAR_SYNC_S)
    line("first request after that sync (snapshot reload)", f"{r.reload_ms:.0f} ms")
    change = r.many.rps / p32.rps - 1
    line(
        f"req/s, 32 connections, {SYNC_VMS:,} VMs",
        f"{r.many.rps:,.0f} ({change:+.1%} vs 1 VM)",
        f"within {BAR_MANY_VMS:.0%}",
        abs(change) <= BAR_MANY_VMS,
    )
    line("RSS, 1 VM (after the runs above)", f"{r.rss_one:.1f} MB", f"≤ {BAR_RSS_MB:g} MB", r.rss_one <= BAR_RSS_MB)
    line(f"RSS, {SYNC_VMS:,} VMs", f"{r.rss_many:.1f} MB", f"≤ {BAR_RSS_MB:g} MB", r.rss_many <= BAR_RSS_MB)
    growth = r.stream_p.rss_peak - r.stream_p.rss_before
    line(
        "256 MiB response streamed: RSS growth (peak)",
        f"{growth:+.1f} MB",
        f"≤ {BAR_STREAM_MB:g} MB",
        growth <= BAR_STREAM_MB,
    )
    line(
        f"RSS after {SYNC_VMS:,}-VM run, then after each of {LEAK_RUNS} more",
        " → ".join(f"{rss:.1f}" for rss in [r.rss_many, *r.rss_runs]) + f" MB ({leak:+.1f})",
        f"no growth (< {BAR_LEAK_MB:g} MB)",
        leak < BAR_LEAK_MB,
    )
    if r.scaling.one and r.scaling.two:
        line(
            "workers = 2: req/s, 32 connections, unpinned",
            f"{r.scaling.two.rps:,.0f} = {r.scaling.two.rps / r.scaling.one.rps:.2f}× workers = 1 "
            f"({r.scaling.one.rps:,.0f}); {r.scaling.note}",
        )
    else:
        line("workers = 2", r.scaling.note)
    add("")
    add("MB = 10^6 bytes, from VmRSS. Latencies are wrk's, in milliseconds.")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
