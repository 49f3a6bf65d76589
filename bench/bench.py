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

Placement on a 2-core machine: the bars are judged with no CPU pinning, where haproxy does
best. Pinning the servers to CPU 0 and nginx and wrk to CPU 1 is measured too, for reference:
it caps haproxy at what one core of wrk and nginx can drive, and adds a cross-CPU wake-up to
every round trip at one connection; both flatter the proxy's ratios. The targets are measured
in turn, round after round, and medians reported, so that each sees the same moments of a
machine that may be doing other work; the report says how busy the machine was outside the
bench's own processes.
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
README = ROOT / "README.md"
README_BEGIN, README_END = "<!-- bench:begin -->", "<!-- bench:end -->"
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


def settled_group(pgid: int) -> list[int]:
    """The processes of a group once it stopped changing for a second (workers forked after
    the listening socket was bound, as nginx's are, count too); at most 10 s."""
    pids, stable_since, deadline = group_pids(pgid), time.monotonic(), time.monotonic() + 10
    while time.monotonic() - stable_since < 1 and time.monotonic() < deadline:
        time.sleep(0.1)
        if (now := group_pids(pgid)) != pids:
            pids, stable_since = now, time.monotonic()
    return pids


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
    return sorted(pids)


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


# -- measuring ---------------------------------------------------------------------------


@dataclass
class Options:
    warmup: float  # seconds of discarded load before a target's first measured run
    duration: float  # seconds per measured run
    rounds: int


@dataclass
class Target:
    label: str
    url: str
    pids: list[int]  # the server's processes, whose CPU time is counted


@dataclass
class Sample:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    cpu_s: float  # the server's CPU time during the run
    seconds: float
    other: float  # cores busy outside the bench's own processes (other work, kernel threads)


@dataclass
class Result:
    """The median of a target's rounds; CPU per request over all of them."""

    rps: float
    p50_ms: float
    p99_ms: float
    cpu: float  # cores, 1.0 = one core busy
    cpu_us_per_request: float
    other: float
    samples: list[Sample]  # one per round, in round order

    @classmethod
    def of(cls, samples: list[Sample]) -> Result:
        return cls(
            rps=statistics.median(s.rps for s in samples),
            p50_ms=statistics.median(s.p50_ms for s in samples),
            p99_ms=statistics.median(s.p99_ms for s in samples),
            cpu=statistics.median(s.cpu_s / s.seconds for s in samples),
            cpu_us_per_request=sum(s.cpu_s for s in samples) / sum(s.requests for s in samples) * 1e6,
            other=max(s.other for s in samples),
            samples=samples,
        )


def paired_ratio(base: Result, other: Result, attr: str) -> float:
    """`other` / `base` for a measure wrk reports (rps, p50_ms, p99_ms): the median over the
    rounds of each round's ratio. compare() measures two targets back to back in every
    round, so a disturbance of the machine falls on both sides of a round's ratio, and one
    disturbed round moves the median of the ratios less than it moves a ratio of medians."""
    pairs = zip(base.samples, other.samples, strict=True)
    return statistics.median(getattr(o, attr) / getattr(b, attr) for b, o in pairs)


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _latency_ms(text: str, percentile: str) -> float:
    match = re.search(rf"^\s*{percentile}%\s+([\d.]+)(us|ms|s)\s*$", text, re.MULTILINE)
    if not match:
        raise BenchError(f"no {percentile}% latency in wrk's output:\n{text}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def wrk(url: str, connections: int, seconds: float, cpus: str | None) -> str:
    """wrk's report; any failed request or non-2xx answer makes the run invalid."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency", "-H", "Metadata: true", url]
    if cpus is not None:
        argv = ["taskset", "-c", cpus, *argv]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30)
    out = result.stdout
    if result.returncode != 0:
        raise BenchError(f"wrk failed ({result.returncode}): {result.stderr.strip()}")
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if "Non-2xx or 3xx responses" in out or (errors and any(int(n) for n in errors.groups())):
        raise BenchError(f"wrk saw failed requests against {url}:\n{out}")
    return out


def busy_seconds() -> float:
    """CPU time all CPUs spent on anything but idle, from /proc/stat."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def children_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class Bench:
    """The machine's layout for load: which CPUs wrk runs on, and the upstream's processes."""

    def __init__(self, opts: Options, nginx_pids: list[int]) -> None:
        self.opts = opts
        self.nginx_pids = nginx_pids
        self.wrk_cpus: str | None = None

    def place(self, servers: list[int], pinned: bool) -> None:
        """Pinned: the servers alone on CPU 0, nginx and wrk on CPU 1. Else: all CPUs for all."""
        everything = os.sched_getaffinity(0)
        set_cpus(servers, {0} if pinned else everything)
        set_cpus(self.nginx_pids, {1} if pinned else everything)
        self.wrk_cpus = "1" if pinned else None

    def measure(self, target: Target, connections: int, seconds: float) -> Sample:
        """One measured wrk run, with the server's CPU time and everyone else's around it."""
        pids = [*target.pids, *self.nginx_pids]
        own_before = [cpu_seconds(pid) for pid in pids]
        busy_before, wrk_before, started = busy_seconds(), children_seconds(), time.monotonic()
        out = wrk(target.url, connections, seconds, self.wrk_cpus)
        elapsed = time.monotonic() - started
        own = [cpu_seconds(pid) - before for pid, before in zip(pids, own_before, strict=True)]
        ours = sum(own) + children_seconds() - wrk_before  # servers, nginx, wrk
        sample = Sample(
            rps=float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),  # type: ignore[union-attr]
            p50_ms=_latency_ms(out, "50"),
            p99_ms=_latency_ms(out, "99"),
            requests=int(re.search(r"(\d+) requests in", out).group(1)),  # type: ignore[union-attr]
            cpu_s=sum(own[: len(target.pids)]),
            seconds=elapsed,
            other=max(0.0, (busy_seconds() - busy_before - ours) / elapsed),
        )
        print(
            f"  {target.label:<26} {connections:>2} conn {sample.rps:>8.0f} req/s  p50 {sample.p50_ms:7.3f} ms  "
            f"p99 {sample.p99_ms:7.3f} ms  cpu {sample.cpu_s / elapsed:4.0%}  other load {sample.other:4.2f}",
            flush=True,
        )
        return sample

    def compare(self, targets: list[Target], connections: int) -> dict[str, Result]:
        """Warm every target up, then run them in turn, round after round, so that each sees
        the same moments of a machine that may be doing other work; the order flips each round
        (a, b, c then c, b, a: neighbours in `targets` are measured back to back every round)."""
        for target in targets:
            wrk(target.url, connections, self.opts.warmup, self.wrk_cpus)
        samples: dict[str, list[Sample]] = {target.label: [] for target in targets}
        for n in range(self.opts.rounds):
            for target in targets if n % 2 == 0 else targets[::-1]:
                samples[target.label].append(self.measure(target, connections, self.opts.duration))
        return {label: Result.of(runs) for label, runs in samples.items()}


@dataclass
class Stream:
    seconds: float
    rss_before: float
    rss_peak: float


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
    return Stream(seconds, rss_before, peak)


# -- the scenario -------------------------------------------------------------------------

HAPROXY, PROXY, PROXY_MANY = "haproxy", "proxy", f"proxy, {SYNC_VMS:,} VMs"
PROXY_W1, PROXY_W2 = "proxy, workers = 1", "proxy, workers = 2"
PATH = "/runtime/bench/instance-identity"


@dataclass
class Results:
    vs32: dict[str, Result]  # haproxy, proxy, proxy with SYNC_VMS; unpinned
    vs1: dict[str, Result]  # haproxy, proxy; unpinned
    pinned32: dict[str, Result] | None  # haproxy, proxy; pinned (None on one CPU)
    pinned1: dict[str, Result] | None
    sync_s: float
    reload_ms: float
    rss_one: float
    rss_runs: list[float]  # the proxy with SYNC_VMS: after the runs above, then after each repeat
    leak_seconds: float
    stream_h: Stream
    stream_p: Stream
    scaling: dict[str, Result] | None
    scaling_note: str


def start_proxy(processes: Processes, config: Path, log: Path) -> subprocess.Popen[bytes]:
    return processes.start([str(BIN / "metadata-proxy"), "serve", "--config", str(config)], stdout=log)


def scenario(tmp: Path, processes: Processes, opts: Options) -> Results:
    secret = secrets.token_bytes(32)
    token = make_token("bench-0", secret)
    with open(tmp / "big.bin", "wb") as f:
        f.truncate(BIG_BYTES)  # sparse: costs no disk, nginx still sends every byte

    nginx_port, haproxy_port = free_port(), free_port()
    (tmp / "nginx.conf").write_text(nginx_config(tmp, nginx_port))
    nginx_argv = ["nginx", "-e", str(tmp / "nginx-error.log"), "-p", str(tmp), "-c", str(tmp / "nginx.conf")]
    nginx = processes.start(nginx_argv, stdout=tmp / "nginx.out")
    wait_for_port(nginx_port, nginx, "nginx")

    (tmp / "haproxy.cfg").write_text(haproxy_config(haproxy_port, nginx_port, token))
    haproxy = processes.start(["haproxy", "-db", "-f", str(tmp / "haproxy.cfg")], stdout=tmp / "haproxy.out")
    wait_for_port(haproxy_port, haproxy, "haproxy")

    # Two proxies on two registries, both with the one VM at first: `one` keeps it, `many`
    # gets 10,000 VMs, and both are measured in the same rounds.
    proxies = {}
    for name in ("one", "many"):
        registry = tmp / f"registry-{name}.sqlite3"
        hostagent(registry, "vm", "add", "bench-0", "--address", "127.0.0.1", "--token-file", "-", stdin=token)
        port = free_port()
        process = start_proxy(
            processes, proxy_config(tmp, f"proxy-{name}", port, nginx_port, registry, 1), tmp / f"proxy-{name}.log"
        )
        wait_for_port(port, process, "metadata-proxy")
        proxies[name] = (f"http://127.0.0.1:{port}", process)
    (pbase, proxy), (mbase, many) = proxies["one"], proxies["many"]
    hbase = f"http://127.0.0.1:{haproxy_port}"
    for base, what in ((hbase, "haproxy"), (pbase, "metadata-proxy"), (mbase, "metadata-proxy")):
        check_forwarding(base, token, what)

    # 10,000 VMs: the sync's wall time as the control plane sees it (a hostagent process,
    # start-up included), then the first request, which reloads the proxy's snapshot.
    lines = [json.dumps({"name": "bench-0", "address": "127.0.0.1", "token": token})]
    for i in range(1, SYNC_VMS):
        name = f"vm-{i:05d}"
        address = f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}"
        lines.append(json.dumps({"name": name, "address": address, "token": make_token(name, secret)}))
    (tmp / "sync.jsonl").write_text("\n".join(lines) + "\n")
    started = time.monotonic()
    hostagent(tmp / "registry-many.sqlite3", "vm", "sync", str(tmp / "sync.jsonl"))
    sync_s = time.monotonic() - started
    started = time.monotonic()
    status, _ = curl(mbase + PATH)
    reload_ms = (time.monotonic() - started) * 1000
    if status != 200:
        raise BenchError(f"the proxy answered {status} after the {SYNC_VMS}-VM sync")
    print(f"bench: vm sync of {SYNC_VMS} VMs: {sync_s:.2f} s; first request after it: {reload_ms:.0f} ms")

    bench = Bench(opts, settled_group(nginx.pid))
    servers = [haproxy.pid, proxy.pid, many.pid]
    haproxy_t = Target(HAPROXY, hbase + PATH, [haproxy.pid])
    proxy_t = Target(PROXY, pbase + PATH, [proxy.pid])
    many_t = Target(PROXY_MANY, mbase + PATH, [many.pid])
    print(f"bench: per target a {opts.warmup:g} s warm-up, then {opts.rounds} round(s) of {opts.duration:g} s")
    print("bench: no CPU pinning", flush=True)
    bench.place(servers, pinned=False)
    vs32 = bench.compare([haproxy_t, proxy_t, many_t], 32)
    vs1 = bench.compare([haproxy_t, proxy_t], 1)
    pinned32 = pinned1 = None
    if len(os.sched_getaffinity(0)) >= 2 and {0, 1} <= os.sched_getaffinity(0):
        print("bench: pinned: haproxy and the proxy on CPU 0, nginx and wrk on CPU 1", flush=True)
        bench.place(servers, pinned=True)
        pinned32 = bench.compare([haproxy_t, proxy_t], 32)
        pinned1 = bench.compare([haproxy_t, proxy_t], 1)
        bench.place(servers, pinned=False)
    rss_one = rss_mb(proxy.pid)

    # Leaks: the 10,000-VM proxy's RSS after all the runs above, then after each of a few
    # more runs, twice as long.
    print("bench: repeated runs, no CPU pinning", flush=True)
    rss_runs = [rss_mb(many.pid)]
    for _ in range(LEAK_RUNS):
        bench.measure(many_t, 32, opts.duration * 2)
        rss_runs.append(rss_mb(many.pid))

    stream_h = stream_big(hbase, None)
    stream_p = stream_big(pbase, proxy.pid)
    print(f"bench: 256 MiB: haproxy {stream_h.seconds:.2f} s, proxy {stream_p.seconds:.2f} s, ", end="")
    print(f"proxy RSS {stream_p.rss_before:.1f} MB, peak {stream_p.rss_peak:.1f} MB", flush=True)

    processes.stop(many)
    processes.stop(haproxy)
    scaling, note = workers_scaling(tmp, processes, bench, proxy_t, nginx_port)
    return Results(
        vs32=vs32,
        vs1=vs1,
        pinned32=pinned32,
        pinned1=pinned1,
        sync_s=sync_s,
        reload_ms=reload_ms,
        rss_one=rss_one,
        rss_runs=rss_runs,
        leak_seconds=opts.duration * 2,
        stream_h=stream_h,
        stream_p=stream_p,
        scaling=scaling,
        scaling_note=note,
    )


def workers_scaling(
    tmp: Path, processes: Processes, bench: Bench, one_t: Target, nginx_port: int
) -> tuple[dict[str, Result] | None, str]:
    """workers = 1 against workers = 2 at 32 connections, unpinned: two workers need both cores."""
    port = free_port()
    config = proxy_config(tmp, "proxy-w2", port, nginx_port, tmp / "registry-one.sqlite3", workers=2)
    two = start_proxy(processes, config, tmp / "proxy-w2.log")
    try:
        wait_for_port(port, two, "metadata-proxy (workers = 2)")
    except BenchError as exc:
        processes.stop(two)
        print(f"bench: workers=2: not supported yet ({exc})", flush=True)
        return None, "not supported yet (the proxy does not start with workers = 2)"
    # However the workers come to be (forked by a supervisor or not), they are in the proxy's
    # process group.
    pids = settled_group(two.pid)
    if len(pids) < 2:
        processes.stop(two)
        print("bench: workers=2: not supported yet (one process serves)", flush=True)
        return None, "not supported yet (one process serves)"
    print("bench: workers = 2 against workers = 1, no CPU pinning", flush=True)
    two_t = Target(PROXY_W2, f"http://127.0.0.1:{port}{PATH}", pids)
    results = bench.compare([replace(one_t, label=PROXY_W1), two_t], 32)
    processes.stop(two)
    return results, f"{len(pids)} processes in the workers = 2 proxy's group"


def machine() -> dict[str, str]:
    def first_line(argv: list[str]) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except OSError:
            return "?"
        text = (done.stdout or done.stderr).strip()
        return text.splitlines()[0] if text else "?"

    model = "?"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    commit = first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    if subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", "HEAD"], capture_output=True).returncode:
        commit += " + uncommitted changes"
    libs = ", ".join(f"{name} {version(name)}" for name in ("uvicorn", "uvloop", "httptools", "prometheus-client"))
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "CPUs": f"{os.cpu_count()} × {model}",
        "kernel": platform.release(),
        "metadata-proxy": f"{version('metadata-proxy')} ({commit}), Python {platform.python_version()}, {libs}",
        "haproxy": first_line(["haproxy", "-v"]).split(" - ")[0],
        "nginx": first_line(["nginx", "-v"]).removeprefix("nginx version: "),
        "wrk": first_line(["wrk", "-v"]).split(" Copyright")[0],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short round per target: for trying the bench")
    parser.add_argument("--output", default=str(RESULTS), help="where to write the markdown (default: %(default)s)")
    args = parser.parse_args(argv)
    opts = Options(warmup=1, duration=2, rounds=1) if args.quick else Options(warmup=2, duration=3, rounds=5)

    # SIGTERM/SIGHUP become SystemExit, so the `finally` below stops everything.
    def exit_on(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, exit_on)
    processes = Processes()
    tmp = Path(tempfile.mkdtemp(prefix="metadata-proxy-bench-"))
    try:
        results = scenario(tmp, processes, opts)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        processes.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    report = render(machine(), opts, args.quick, results)
    Path(args.output).write_text(report)
    print()
    print(report, end="")
    print(f"(written to {args.output})")
    if not args.quick and args.output == str(RESULTS):
        if not update_readme(report):
            print(f"bench: {README} has no {README_BEGIN} ... {README_END} section to update", file=sys.stderr)
            return 1
        print(f"(and into {README}, between its bench markers)")
    return 0


def update_readme(report: str) -> bool:
    """Put the report into the README between its markers (False when they are missing): the
    numbers there are only ever this command's."""
    text = README.read_text()
    head, begin, rest = text.partition(README_BEGIN)
    _, end, tail = rest.partition(README_END)
    if not begin or not end:
        return False
    body = report.split("\n", 1)[1] if report.startswith("## ") else report  # the README has its own heading
    README.write_text(f"{head}{begin}\n{body.strip()}\n{end}{tail}")
    return True


# -- the report ---------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "**pass**" if ok else "**FAIL**"


def render(info: dict[str, str], opts: Options, quick: bool, r: Results) -> str:
    h32, p32, m32 = r.vs32[HAPROXY], r.vs32[PROXY], r.vs32[PROXY_MANY]
    h1, p1 = r.vs1[HAPROXY], r.vs1[PROXY]
    out: list[str] = []
    add = out.append
    add("## Benchmark: metadata-proxy beside haproxy\n")
    add("Produced by `bench/run`" + (" --quick (short runs: not for the README)" if quick else "") + ".\n")
    for key, value in info.items():
        add(f"- {key}: {value}")
    add(
        f"- load: wrk (1 thread) on loopback; per target a {opts.warmup:g} s warm-up, then {opts.rounds} "
        f"round(s) of {opts.duration:g} s taken in turn with the other targets; medians shown"
    )
    add("- haproxy: nbthread 1, no log; metadata-proxy: workers = 1, access log on (to a file)")
    every = [*r.vs32.values(), *r.vs1.values(), *(r.pinned32 or {}).values(), *(r.pinned1 or {}).values()]
    other = max(result.other for result in every)
    add(f"- CPU busy outside the bench's own processes during the runs: at most {other:.2f} cores")
    if other > 0.25:
        add("  (other work on the machine disturbed the runs: the ratios hold better than the absolute numbers)")
    add("")

    add("No CPU pinning (the bars are judged here):\n")
    add("| | haproxy | metadata-proxy | proxy / haproxy | bar | |")
    add("|---|---:|---:|---:|---:|---|")

    def row(label: str, h: float, p: float, ratio: float, fmt: str, bar: str = "", ok: bool | None = None) -> None:
        add(f"| {label} | {h:{fmt}} | {p:{fmt}} | {ratio:.3g} | {bar} | {'' if ok is None else verdict(ok)} |")

    def wrk_row(label: str, h: Result, p: Result, attr: str, fmt: str, bar: str = "", within: float = 0) -> None:
        ratio = paired_ratio(h, p, attr)
        ok = None if not bar else ratio >= within if bar.startswith("≥") else ratio <= within
        row(label, getattr(h, attr), getattr(p, attr), ratio, fmt, bar, ok)

    wrk_row("req/s, 32 connections", h32, p32, "rps", ",.0f", f"≥ {BAR_THROUGHPUT}", BAR_THROUGHPUT)
    wrk_row("p50 ms, 32 connections", h32, p32, "p50_ms", ".3f")
    wrk_row("p99 ms, 32 connections", h32, p32, "p99_ms", ".3f")
    row("server CPU, 32 connections (1.00 = one core)", h32.cpu, p32.cpu, p32.cpu / h32.cpu, ".2f")
    h_us, p_us = h32.cpu_us_per_request, p32.cpu_us_per_request
    row("server CPU µs per request, 32 connections", h_us, p_us, p_us / h_us, ".1f")
    wrk_row("req/s, 1 connection", h1, p1, "rps", ",.0f")
    wrk_row("p50 ms, 1 connection", h1, p1, "p50_ms", ".3f", f"≤ {BAR_P50}", BAR_P50)
    wrk_row("p99 ms, 1 connection", h1, p1, "p99_ms", ".3f")
    h_s, p_s = r.stream_h.seconds, r.stream_p.seconds
    row("256 MiB response streamed, seconds", h_s, p_s, p_s / h_s, ".2f")
    add("")
    add(
        "Columns: medians of the rounds; the ratio of a wrk measure is the median of each round's "
        "ratio (both measured back to back in every round).\n"
    )

    if r.pinned32 and r.pinned1:
        add("Pinned, for reference (haproxy and the proxy alone on CPU 0; nginx and wrk on CPU 1):\n")
        add("| | haproxy | metadata-proxy | proxy / haproxy |")
        add("|---|---:|---:|---:|")
        for label, results, attr, fmt in (
            ("req/s, 32 connections", r.pinned32, "rps", ",.0f"),
            ("server CPU, 32 connections", r.pinned32, "cpu", ".2f"),
            ("p50 ms, 1 connection", r.pinned1, "p50_ms", ".3f"),
            ("p99 ms, 1 connection", r.pinned1, "p99_ms", ".3f"),
        ):
            h, p = getattr(results[HAPROXY], attr), getattr(results[PROXY], attr)
            ratio = p / h if attr == "cpu" else paired_ratio(results[HAPROXY], results[PROXY], attr)
            add(f"| {label} | {h:{fmt}} | {p:{fmt}} | {ratio:.3g} |")
        add("")

    add("| metadata-proxy | value | bar | |")
    add("|---|---:|---:|---|")

    def line(label: str, value: str, bar: str = "", ok: bool | None = None) -> None:
        add(f"| {label} | {value} | {bar} | {'' if ok is None else verdict(ok)} |")

    line(f"`hostagent vm sync` of {SYNC_VMS:,} VMs", f"{r.sync_s:.2f} s", f"≤ {BAR_SYNC_S:g} s", r.sync_s <= BAR_SYNC_S)
    line("first request after that sync (snapshot reload)", f"{r.reload_ms:.0f} ms")
    change = paired_ratio(p32, m32, "rps") - 1
    line(
        f"req/s, 32 connections, {SYNC_VMS:,} VMs (same rounds as 1 VM)",
        f"{m32.rps:,.0f} ({change:+.1%} vs 1 VM; CPU per request {m32.cpu_us_per_request:.0f} µs vs "
        f"{p32.cpu_us_per_request:.0f} µs)",
        f"within {BAR_MANY_VMS:.0%}",
        abs(change) <= BAR_MANY_VMS,
    )
    rss_bar, rss_many = f"≤ {BAR_RSS_MB:g} MB", r.rss_runs[0]
    line("RSS, 1 VM (after the runs)", f"{r.rss_one:.1f} MB", rss_bar, r.rss_one <= BAR_RSS_MB)
    line(f"RSS, {SYNC_VMS:,} VMs (after the runs)", f"{rss_many:.1f} MB", rss_bar, rss_many <= BAR_RSS_MB)
    growth = r.stream_p.rss_peak - r.stream_p.rss_before
    stream_bar = f"≤ {BAR_STREAM_MB:g} MB"
    line("256 MiB response streamed: RSS growth (peak)", f"{growth:+.1f} MB", stream_bar, growth <= BAR_STREAM_MB)
    leak = r.rss_runs[-1] - r.rss_runs[0]
    line(
        f"RSS ({SYNC_VMS:,} VMs), then after each of {LEAK_RUNS} more {r.leak_seconds:g} s runs",
        " → ".join(f"{rss:.1f}" for rss in r.rss_runs) + f" MB ({leak:+.1f})",
        f"no growth (< {BAR_LEAK_MB:g} MB)",
        leak < BAR_LEAK_MB,
    )
    if r.scaling:
        one, two = r.scaling[PROXY_W1], r.scaling[PROXY_W2]
        line(
            "workers = 2: req/s, 32 connections, no pinning",
            f"{two.rps:,.0f} = {two.rps / one.rps:.2f}× workers = 1 ({one.rps:,.0f}); {r.scaling_note}",
        )
    else:
        line("workers = 2", r.scaling_note)
    add("")
    add("MB = 10^6 bytes, from VmRSS. Latencies are wrk's, in milliseconds.")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
