"""The proxy's p50 at one connection, this checkout against another, beside haproxy.

    .venv/bin/python bench/one_conn_ab.py ../other-checkout [--worlds 3] [--rounds 9] [--after-load]

The processes and configs are bench/run's (bench.py: nginx as the control plane, haproxy,
the proxy with one worker and its access log on); each checkout's proxy runs from its own
.venv (`scripts/setup` there first), both at once on the same nginx. In every round wrk
drives haproxy and the two proxies in turn, at one connection for 3 s, the order flipping
each round; `--after-load` first gives all three bench/run's 32-connection rounds, as
bench/run does before its one-connection rounds. A world (a fresh set of processes) is
started `--worlds` times, the order of the two proxies swapped each time.

Why it exists: at one connection the p50 is the sum of the three processes' CPU time per
request plus the cost of waking a CPU that went idle between them, and on a 2-CPU virtual
machine whose idle CPUs halt, both move far more with other work on the machine (it keeps
the CPUs from halting: p50 falls) than with the code. So every round records the cores
busy outside the bench's processes; the summary gives the rounds where neither proxy's
run saw more than 0.1 of a core of that, and how p50 follows it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench as B  # noqa: E402  (bench.py beside this file; not a package)

HERE, OTHER = "this", "other"
QUIET = 0.1  # cores busy outside the bench's processes, at most, for a quiet round


def start_proxy(processes: B.Processes, tmp: Path, name: str, tree: Path, nginx_port: int, token: str) -> B.Target:
    registry = tmp / f"registry-{name}.sqlite3"
    add = [str(tree / ".venv/bin/hostagent"), "--registry", str(registry), "vm", "add", "bench-0"]
    done = subprocess.run(
        [*add, "--address", "127.0.0.1", "--token-file", "-"], input=token, text=True, capture_output=True, timeout=60
    )
    if done.returncode != 0:
        raise B.BenchError(f"{tree}: hostagent vm add failed: {done.stderr.strip()}")
    port = B.free_port()
    config = B.proxy_config(tmp, f"proxy-{name}", port, nginx_port, registry, 1)
    serve = [str(tree / ".venv/bin/metadata-proxy"), "serve", "--config", str(config)]
    process = processes.start(serve, stdout=tmp / f"proxy-{name}.log")
    B.wait_for_port(port, process, f"metadata-proxy ({tree})")
    B.check_forwarding(f"http://127.0.0.1:{port}", token, f"metadata-proxy ({tree})")
    return B.Target(name, f"http://127.0.0.1:{port}{B.PATH}", [process.pid])


def world(trees: dict[str, Path], rounds: int, after_load: bool, swap: bool) -> list[dict[str, B.Sample]]:
    processes, tmp = B.Processes(), Path(tempfile.mkdtemp(prefix="metadata-proxy-ab-"))
    try:
        token = B.make_token("bench-0", os.urandom(32))
        nginx_port, haproxy_port = B.free_port(), B.free_port()
        (tmp / "nginx.conf").write_text(B.nginx_config(tmp, nginx_port))
        nginx = processes.start(
            ["nginx", "-e", str(tmp / "nginx-error.log"), "-p", str(tmp), "-c", str(tmp / "nginx.conf")]
        )
        B.wait_for_port(nginx_port, nginx, "nginx")
        (tmp / "haproxy.cfg").write_text(B.haproxy_config(haproxy_port, nginx_port, token))
        haproxy = processes.start(["haproxy", "-db", "-f", str(tmp / "haproxy.cfg")])
        B.wait_for_port(haproxy_port, haproxy, "haproxy")
        targets = [B.Target(B.HAPROXY, f"http://127.0.0.1:{haproxy_port}{B.PATH}", [haproxy.pid])]
        names = [OTHER, HERE] if swap else [HERE, OTHER]
        targets += [start_proxy(processes, tmp, name, trees[name], nginx_port, token) for name in names]
        bench = B.Bench(B.Options(warmup=2, duration=3, rounds=5), B.settled_group(nginx.pid))
        bench.place([pid for target in targets for pid in target.pids], pinned=False)
        if after_load:
            bench.compare(targets, 32)
        for target in targets:
            B.wrk(target.url, 1, 2, None)
        return [
            {target.label: bench.measure(target, 1, 3) for target in (targets if n % 2 == 0 else targets[::-1])}
            for n in range(rounds)
        ]
    finally:
        processes.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


def correlation(xs: list[float], ys: list[float]) -> float:
    mx, my = statistics.mean(xs), statistics.mean(ys)
    spread = math.sqrt(sum((x - mx) ** 2 for x in xs) * sum((y - my) ** 2 for y in ys))
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / spread if spread else 0.0


def summary(rows: list[dict[str, B.Sample]]) -> None:
    def line(what: str, chosen: list[dict[str, B.Sample]]) -> None:
        if not chosen:
            print(f"{what}: no rounds")
            return
        parts = [f"{what} ({len(chosen)} rounds):"]
        for name in (HERE, OTHER):
            p50 = statistics.median(r[name].p50_ms for r in chosen)
            ratio = statistics.median(r[name].p50_ms / r[B.HAPROXY].p50_ms for r in chosen)
            cpu = statistics.median(r[name].cpu_s / r[name].requests * 1e6 for r in chosen)
            parts.append(f"{name} p50 {p50:.3f} ms ({ratio:.2f}x haproxy), CPU {cpu:.0f} us/request;")
        diff = statistics.median((r[HERE].p50_ms - r[OTHER].p50_ms) * 1000 for r in chosen)
        parts.append(f"this - other, median of the rounds: {diff:+.1f} us")
        print(" ".join(parts))

    line("all", rows)
    line(
        f"quiet (other load <= {QUIET} during both proxies' runs)",
        [r for r in rows if max(r[HERE].other, r[OTHER].other) <= QUIET],
    )
    for name in (HERE, OTHER):
        c = correlation([r[name].other for r in rows], [r[name].p50_ms for r in rows])
        print(f"{name}: correlation of p50 with other load over the rounds: {c:+.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("other", type=Path, help="the other checkout (with its own .venv)")
    parser.add_argument("--worlds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--after-load", action="store_true", help="32-connection rounds first, as bench/run")
    parser.add_argument("--json", type=Path, help="append each round here (JSON lines)")
    args = parser.parse_args()
    trees = {HERE: B.ROOT, OTHER: args.other.resolve()}
    rows: list[dict[str, B.Sample]] = []
    try:
        for n in range(args.worlds):
            got = world(trees, args.rounds, args.after_load, swap=n % 2 == 1)
            rows += got
            if args.json:
                with args.json.open("a") as f:
                    for r in got:
                        f.write(json.dumps({k: vars(s) for k, s in r.items()}) + "\n")
    except B.BenchError as exc:
        print(f"one_conn_ab: {exc}", file=sys.stderr)
        return 1
    summary(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
