"""The Debian package under a real systemd: a Debian 12 container booted with systemd as
PID 1 (tests/container.py), the package built from this checkout by scripts/build-deb.

One container lives through the whole module, and the tests run in file order, each on
the state the previous ones left, as a host lives: install (the README's command, with no
network) -> configure (the README's commands) and boot -> guests in network namespaces
plumbed by `hostagent vm add --netns` -> socket activation, reload under traffic, drain on
stop, restart after a crash, journal priorities, the security rating of the running unit
-> reboot (registry kept, every VM's table restored by reconcile) -> upgrade to a rebuilt
package of a higher version under traffic -> remove -> purge. A second container follows
the README's pip route and its trial, literally.

Inside the container: the reference control plane (`controlplane serve`, a unit of its
own) on loopback; for each VM n a namespace vmN with a veth to the container's root
namespace (10.200.n.2, fd00:200:n::2: the VM's host-unique addresses) and a guest
namespace gN behind it with the same 10.0.0.2 / fd00:0:0:1::2 in every VM, created at
boot by a stand-in for the hypervisor tooling (a oneshot unit ordered before the host
unit, as real tooling that restores namespaces at boot would be).

Needs root, systemd-nspawn, mmdebstrap, dpkg-deb and PyPI (or a pip mirror) to build the
package; skips without them on a developer machine, fails under CI=true.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.container import REPO, Container, ContainerError

pytestmark = [pytest.mark.root, pytest.mark.container]

IN_CI = os.environ.get("CI") == "true"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
UPGRADE_VERSION = f"{VERSION}+upgrade.1"  # sorts above VERSION for dpkg
UNITS = ("metadata-proxy-host.service", "metadata-proxy.socket", "metadata-proxy.service")
README = (REPO / "README.md").read_text()
ADMIN = "curl -sS --unix-socket /run/metadata-proxy/admin.sock"

CONFIG = """\
host_id = "ct-host"
host_aliases = {aliases}

[control_plane]
url = "http://127.0.0.1:8080"
retry_budget = 1
"""

CONTROLPLANE_UNIT = """\
[Unit]
Description=reference control plane (test)
[Service]
ExecStart=/usr/bin/controlplane serve --listen 127.0.0.1:8080 --secret-file /etc/controlplane/secret
[Install]
WantedBy=multi-user.target
"""

# The hypervisor tooling's part, at boot: namespaces and links. hostagent adds the NAT.
HYPERVISOR_UNIT = """\
[Unit]
Description=stand-in for the hypervisor tooling: VM network namespaces (test)
Before=metadata-proxy-host.service
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/local/sbin/test-vm-netns
[Install]
WantedBy=multi-user.target
"""

VM_NETNS = """\
#!/bin/sh
set -e
for n in 1 2; do
    ip netns add vm$n
    ip netns add g$n
    ip link add hv$n type veth peer name eth0 netns vm$n
    ip addr add 10.200.$n.1/24 dev hv$n
    ip addr add fd00:200:$n::1/64 dev hv$n nodad
    ip link set hv$n up
    ip -n vm$n addr add 10.200.$n.2/24 dev eth0
    ip -n vm$n addr add fd00:200:$n::2/64 dev eth0 nodad
    ip -n vm$n link set eth0 up
    ip -n vm$n link set lo up
    ip -n vm$n route add default via 10.200.$n.1
    ip -n vm$n route add default via fd00:200:$n::1
    # the guest behind the VM's tap: the same private addresses in every VM
    ip -n vm$n link add tap0 type veth peer name eth0 netns g$n
    ip -n vm$n addr add 10.0.0.1/24 dev tap0
    ip -n vm$n addr add fd00:0:0:1::1/64 dev tap0 nodad
    ip -n vm$n link set tap0 up
    ip netns exec vm$n sh -c 'echo 1 >/proc/sys/net/ipv4/ip_forward; echo 1 >/proc/sys/net/ipv6/conf/all/forwarding'
    ip -n g$n addr add 10.0.0.2/24 dev eth0
    ip -n g$n addr add fd00:0:0:1::2/64 dev eth0 nodad
    ip -n g$n link set eth0 up
    ip -n g$n link set lo up
    ip -n g$n route add default via 10.0.0.1
    ip -n g$n route add default via fd00:0:0:1::1
done
"""

# Guest traffic: GET /runtime/whoami in a loop until the stop file appears (at most 60 s),
# on one kept-alive connection or a fresh one per request; prints what came back.
TRAFFIC = """\
import http.client, json, os, sys, time
host, vm_id, mode, stop = sys.argv[1:5]
ok, failures, conn = 0, [], None
deadline = time.monotonic() + 60
while not os.path.exists(stop) and time.monotonic() < deadline:
    try:
        if conn is None:
            conn = http.client.HTTPConnection(host, 80, timeout=20)
        conn.request("GET", "/runtime/whoami", headers={"Metadata": "true"})
        response = conn.getresponse()
        body = response.read()
        if response.status == 200 and json.loads(body)["vm_id"] == vm_id:
            ok += 1
        else:
            failures.append(f"{response.status} {body[:200]!r}")
        if mode == "fresh" or response.will_close:
            conn.close()
            conn = None
    except Exception as exc:
        failures.append(repr(exc))
        conn = None
    time.sleep(0.025)  # at most 40 requests/s: under the default per-VM rate limit (50/s)
print(json.dumps({"ok": ok, "failures": failures[:10], "failed": len(failures)}))
"""


def _missing(what: str) -> None:
    if IN_CI:
        pytest.fail(f"{what} (CI=true: nothing may skip; .ci/run must provide it)")
    pytest.skip(what)


def readme_block(name: str) -> str:
    """The ```sh block after `<!-- container-test: NAME -->` in the README, as written."""
    match = re.search(rf"<!-- container-test: {re.escape(name)} -->\n```sh\n(.*?)```", README, re.DOTALL)
    assert match, f"README has no block marked container-test: {name}"
    return match.group(1)


# pip's cache in the checkout, as scripts/setup keeps it: nothing outside the checkout changes.
PIP_ENV = {**os.environ, "PIP_CACHE_DIR": os.environ.get("PIP_CACHE_DIR", str(REPO / ".cache" / "pip"))}


def build_deb(out: Path, version: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(REPO / "scripts" / "build-deb"), "--version", version, "--out", str(out)],
        env=PIP_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@dataclass
class Debs:
    first: Path
    upgrade: Path


@pytest.fixture(scope="module")
def tools() -> None:
    for tool in ("systemd-nspawn", "mmdebstrap", "dpkg-deb", "nsenter"):
        if shutil.which(tool) is None:
            _missing(f"{tool} is not installed")


@pytest.fixture(scope="module")
def debs(tools: None, tmp_path_factory: pytest.TempPathFactory) -> Debs:
    out = tmp_path_factory.mktemp("debs")
    builds = [build_deb(out / "first", VERSION), build_deb(out / "upgrade", UPGRADE_VERSION)]
    paths = []
    for build in builds:
        stdout, stderr = build.communicate(timeout=600)
        assert build.returncode == 0, stderr
        paths.append(Path(stdout.strip().splitlines()[-1]))
    arch = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, check=True).stdout.strip()
    assert paths[0].name == f"metadata-proxy_{VERSION}_{arch}.deb"
    return Debs(*paths)


@pytest.fixture(scope="module")
def box(debs: Debs) -> Iterator[Container]:
    container = Container("deb")
    try:
        shutil.copy(debs.first, container.root / "root")
        (container.root / "root" / "upgrade").mkdir()
        shutil.copy(debs.upgrade, container.root / "root" / "upgrade")
        container.write("/usr/local/sbin/test-vm-netns", VM_NETNS, 0o755)
        container.write("/usr/local/lib/traffic.py", TRAFFIC)
        container.boot()
        yield container
    finally:
        container.close()


def show(box: Container, unit: str, prop: str) -> str:
    return box.run(f"systemctl show -P {prop} {unit}").stdout.strip()


def guest_curl(box: Container, n: int, args: str) -> subprocess.CompletedProcess[str]:
    return box.run(f"ip netns exec g{n} curl -sS -m 20 {args}", check=False)


def whoami(box: Container, n: int, address: str = "169.254.169.254") -> dict[str, str]:
    host = f"[{address}]" if ":" in address else address
    result = guest_curl(box, n, f"-H 'Metadata: true' http://{host}/runtime/whoami")
    assert result.returncode == 0, result.stderr
    answer: dict[str, str] = json.loads(result.stdout)
    return answer


def registry(box: Container) -> list[dict[str, object]]:
    listed: list[dict[str, object]] = json.loads(box.run("hostagent vm list --json").stdout)
    return listed


def metric(box: Container, name: str) -> float:
    text = box.run(f"{ADMIN} http://localhost/metrics").stdout
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


class Traffic:
    """traffic.py in guest gN, in the background; `finish` stops it and returns its report."""

    def __init__(self, box: Container, n: int, mode: str) -> None:
        self.box, self.stop = box, f"/run/traffic-{n}-{mode}.stop"
        self.process = box.spawn(
            f"rm -f {self.stop}; exec ip netns exec g{n} python3 /usr/local/lib/traffic.py "
            f"169.254.169.254 vm-000{n} {mode} {self.stop}"
        )

    def finish(self) -> dict[str, object]:
        self.box.run(f"touch {self.stop}")
        stdout, stderr = self.process.communicate(timeout=90)
        assert self.process.returncode == 0, stderr
        report: dict[str, object] = json.loads(stdout)
        return report


def wait_until(box: Container, condition: str, timeout: int = 20) -> None:
    box.run(f"for i in $(seq {timeout * 10}); do if {condition}; then exit 0; fi; sleep 0.1; done; exit 1")


# --- install, configure, boot --------------------------------------------------------


def test_install_with_no_network(box: Container) -> None:
    # The container's network namespace has loopback only: nothing can be downloaded.
    assert box.run("ip -j route show default").stdout.strip() == "[]"
    box.run(f"cd /root && {readme_block('deb-install')}", timeout=120)

    assert box.run("dpkg-query -W -f '${Version} ${db:Status-Status}' metadata-proxy").stdout == f"{VERSION} installed"
    depends = box.run("dpkg-query -W -f '${Depends}' metadata-proxy").stdout.split(", ")
    assert {"python3 (>= 3.11~)", "nftables", "iproute2", "conntrack"} <= set(depends)
    # Where Debian looks for them; the units run the packaged entry points.
    box.run(
        "cd /usr/lib && test -f systemd/system/metadata-proxy.socket -a -f systemd/system/metadata-proxy-host.service"
        " -a -f sysusers.d/metadata-proxy.conf -a -f tmpfiles.d/metadata-proxy.conf"
        " -a -f /usr/share/doc/metadata-proxy/examples/config.toml -a -f /usr/share/doc/metadata-proxy/copyright"
        # docs/ beside the README: its links to docs/*.md hold in the installed copy
        " -a -f /usr/share/doc/metadata-proxy/docs/configuration.md"
        " -a -f /usr/share/doc/metadata-proxy/docs/metadata.md"
    )
    assert (
        "ExecStart=/usr/bin/metadata-proxy serve"
        in box.run("cat /usr/lib/systemd/system/metadata-proxy.service").stdout
    )
    # The venv runs on Debian's interpreter, and the entry points are in /usr/bin.
    assert box.run("readlink -f /opt/metadata-proxy/bin/python").stdout.strip() == "/usr/bin/python3.11"
    for tool in ("metadata-proxy", "hostagent", "controlplane"):
        assert box.run(f"/usr/bin/{tool} --help").stdout.startswith("usage: ")
    # The user, the group and the directories exist right after install.
    passwd = box.run("getent passwd metadata-proxy").stdout.strip().split(":")
    assert passwd[5:] == ["/nonexistent", "/usr/sbin/nologin"]
    assert box.run("stat -c '%a %U %G' /var/lib/metadata-proxy /etc/metadata-proxy").stdout.split("\n")[:2] == [
        "750 root metadata-proxy",
        "755 root root",
    ]
    for unit in UNITS:
        assert box.run(f"systemctl is-enabled {unit}").stdout.strip() == "enabled"
        assert show(box, unit, "UnitFileState") == "enabled"
    # No config yet: the units were skipped by their condition, not failed.
    assert box.run("systemctl --failed --no-legend --plain").stdout.strip() == ""
    assert show(box, "metadata-proxy.service", "ConditionResult") == "no"


def test_configure_and_boot_in_order(box: Container) -> None:
    editor = f"#!/bin/sh\ncat >\"$1\" <<'EOF'\n{CONFIG.format(aliases='[]')}EOF\n"  # for the README's $EDITOR
    box.write("/usr/local/bin/test-editor", editor, 0o755)
    box.write("/etc/systemd/system/controlplane.service", CONTROLPLANE_UNIT)
    box.write("/etc/systemd/system/test-vm-netns.service", HYPERVISOR_UNIT)
    box.run(
        "install -d -m 0700 /etc/controlplane && head -c 32 /dev/urandom | base64 >/etc/controlplane/secret"
        " && systemctl daemon-reload && systemctl enable --now controlplane.service test-vm-netns.service"
        # Debian's firewall unit, whose `flush ruleset` at boot must not remove our table.
        " && systemctl enable nftables.service"
    )
    out = box.run(f"export EDITOR=test-editor\n{readme_block('configure-deb')}").stdout
    assert "/etc/metadata-proxy/config.toml: ok: host_id ct-host" in out
    assert box.run("systemctl is-active metadata-proxy.socket metadata-proxy.service").stdout.split() == ["active"] * 2

    box.reboot()
    for unit in UNITS:
        assert box.run(f"systemctl is-active {unit}").stdout.strip() == "active", unit
    # Boot order: the VM namespaces (the hypervisor's part), then the host unit's two steps,
    # both successful, and only then the sockets.
    host_steps = show(box, "metadata-proxy-host.service", "ExecStart")
    assert host_steps.count("code=exited ; status=0 }") == 2
    assert "host setup" in host_steps and "reconcile" in host_steps
    host_done = int(show(box, "metadata-proxy-host.service", "ActiveEnterTimestampMonotonic"))
    netns_done = int(show(box, "test-vm-netns.service", "ActiveEnterTimestampMonotonic"))
    host_started = int(show(box, "metadata-proxy-host.service", "InactiveExitTimestampMonotonic"))
    socket_up = int(show(box, "metadata-proxy.socket", "ActiveEnterTimestampMonotonic"))
    assert 0 < netns_done <= host_started < host_done <= socket_up
    firewall_done = int(show(box, "nftables.service", "ActiveEnterTimestampMonotonic"))
    assert 0 < firewall_done <= host_started
    assert "table inet metadata_proxy_host" in box.run("nft list tables").stdout
    journal = box.run("journalctl -b -u metadata-proxy-host -o cat").stdout
    assert "host setup: done" in journal and "reconcile: 0 applied, 0 missing, 0 failed" in journal
    assert "ordering cycle" not in box.run("journalctl -b -o cat").stdout.lower()


# --- guests ---------------------------------------------------------------------------


def test_guest_in_a_namespace_gets_its_identity(box: Container) -> None:
    for n in (1, 2):
        out = box.run(
            f"controlplane mint vm-000{n} --secret-file /etc/controlplane/secret"
            f" | hostagent vm add guest{n} --address 10.200.{n}.2 --address fd00:200:{n}::2"
            f" --netns vm{n} --token-file -"
        ).stdout
        assert out.startswith(f"guest{n}: added")
    # Both guests have the same private address; the proxy tells them apart by the NAT.
    assert whoami(box, 1) == {"vm_id": "vm-0001", "host_id": "ct-host", "address": "10.200.1.2"}
    assert whoami(box, 2) == {"vm_id": "vm-0002", "host_id": "ct-host", "address": "10.200.2.2"}
    assert whoami(box, 2, "fd00:a9fe::254") == {"vm_id": "vm-0002", "host_id": "ct-host", "address": "fd00:200:2::2"}
    refused = guest_curl(box, 1, "http://169.254.169.254/runtime/whoami")
    assert json.loads(refused.stdout)["error"]["code"] == "missing_metadata_header"


def test_socket_activation(box: Container) -> None:
    box.run("systemctl stop metadata-proxy.service")
    assert box.run("systemctl is-active metadata-proxy.service", check=False).stdout.strip() == "inactive"
    assert show(box, "metadata-proxy.socket", "Listen").split() == [
        "169.254.169.254:80",
        "(Stream)",
        "[fd00:a9fe::254]:80",
        "(Stream)",
    ]
    # A guest's connection starts the service, and is answered by it.
    assert whoami(box, 1)["vm_id"] == "vm-0001"
    assert box.run("systemctl is-active metadata-proxy.service").stdout.strip() == "active"


def test_reload_under_traffic_fails_no_request(box: Container) -> None:
    pid = show(box, "metadata-proxy.service", "MainPID")
    traffic = Traffic(box, 1, "keepalive")
    try:
        wait_until(box, f"{ADMIN} -s http://localhost/metrics | grep -q 'requests_total{{.*vm=\"guest1\"'")
        box.write("/etc/metadata-proxy/config.toml", CONFIG.format(aliases='["metadata.internal"]'))
        box.run("systemctl reload metadata-proxy.service")
        wait_until(box, f"{ADMIN} http://localhost/metrics | grep -q 'reloads_total{{result=\"applied\"}} 1.0'")
        box.run("sleep 1")  # more traffic on the reloaded config
    finally:
        report = traffic.finish()
    assert report["failed"] == 0, report
    assert isinstance(report["ok"], int) and report["ok"] > 20
    assert show(box, "metadata-proxy.service", "MainPID") == pid  # reloaded, not restarted
    # The new config is in effect: a Host the old one refused.
    aliased = guest_curl(
        box, 1, "-H 'Metadata: true' -H 'Host: metadata.internal' http://169.254.169.254/runtime/whoami"
    )
    assert json.loads(aliased.stdout)["vm_id"] == "vm-0001"


def test_stop_drains_requests_in_flight(box: Container) -> None:
    slow = box.spawn(
        # A long-poll held 2 s by the control plane (no --vms: the metadata is {} and never changes).
        "ip netns exec g1 curl -sS -m 30 -H 'Metadata: true' "
        "'http://169.254.169.254/runtime/metadata?wait_for_change=true&timeout_sec=2'"
    )
    try:
        wait_until(box, f"{ADMIN} http://localhost/metrics | grep -q '^metadata_proxy_in_flight 1.0'")
        box.run("systemctl stop metadata-proxy.service", timeout=60)
        stdout, stderr = slow.communicate(timeout=60)
    finally:
        slow.kill()
    assert slow.returncode == 0, stderr
    assert json.loads(stdout) == {}
    assert show(box, "metadata-proxy.service", "Result") == "success"
    box.run("systemctl start metadata-proxy.service")


def test_crash_is_restarted(box: Container) -> None:
    pid = show(box, "metadata-proxy.service", "MainPID")
    restarts = int(show(box, "metadata-proxy.service", "NRestarts"))
    box.run("systemctl kill --signal=SIGKILL metadata-proxy.service")
    wait_until(
        box,
        f'[ "$(systemctl show -P NRestarts metadata-proxy.service)" = {restarts + 1} ]'
        " && systemctl is-active -q metadata-proxy.service",
    )
    assert show(box, "metadata-proxy.service", "MainPID") != pid
    assert whoami(box, 2)["vm_id"] == "vm-0002"


def test_journal_has_request_lines_and_priorities(box: Container) -> None:
    # A warning: the control plane is down, the guest gets 502.
    box.run("systemctl stop controlplane.service")
    try:
        down = guest_curl(box, 1, "-H 'Metadata: true' http://169.254.169.254/runtime/whoami")
        assert json.loads(down.stdout)["error"]["code"] == "upstream_unavailable"
    finally:
        box.run("systemctl start controlplane.service")
    # An error: a reload with a config that does not validate is refused.
    box.write("/etc/metadata-proxy/config.toml", CONFIG.format(aliases='["metadata.internal"]') + "bogus = 1\n")
    try:
        box.run("systemctl reload metadata-proxy.service")
        wait_until(box, f"{ADMIN} http://localhost/metrics | grep -q 'reloads_total{{result=\"refused\"}} 1.0'")
    finally:
        box.write("/etc/metadata-proxy/config.toml", CONFIG.format(aliases='["metadata.internal"]'))
    box.run("sleep 0.2")

    entries = [json.loads(line) for line in box.run("journalctl -u metadata-proxy -o json").stdout.splitlines()]
    ours = [entry for entry in entries if entry.get("SYSLOG_IDENTIFIER") == "metadata-proxy"]
    lines = [(int(entry["PRIORITY"]), json.loads(entry["MESSAGE"])) for entry in ours]
    requests = [(priority, line) for priority, line in lines if "request_id" in line]
    assert {priority for priority, _ in requests} == {6}
    assert any(line["status"] == 200 and line["vm"] == "guest1" for _, line in requests)
    assert any(line["code"] == "upstream_unavailable" for _, line in requests)
    levels = {(priority, line["level"]) for priority, line in lines if "level" in line}
    assert {(6, "info"), (4, "warning"), (3, "error")} <= levels
    assert all((priority, level) in {(6, "info"), (4, "warning"), (3, "error")} for priority, level in levels)
    messages = [(priority, line["message"]) for priority, line in lines if "level" in line]
    assert any(priority == 4 and "upstream_unavailable" in message for priority, message in messages)
    assert any(priority == 3 and "reload refused" in message for priority, message in messages)


def test_security_rating_of_the_running_unit(box: Container) -> None:
    out = box.run("systemd-analyze security --no-pager metadata-proxy.service").stdout
    match = re.search(r"Overall exposure level for metadata-proxy\.service: (\d+\.\d+)", out)
    assert match, out
    assert float(match.group(1)) <= 1.5, out


# --- reboot, upgrade, remove, purge ---------------------------------------------------


def test_reboot_keeps_the_registry_and_reconcile_restores_every_table(box: Container) -> None:
    before = registry(box)
    assert [vm["name"] for vm in before] == ["guest1", "guest2"]
    box.reboot()
    assert registry(box) == before
    for n in (1, 2):
        tables = box.run(f"ip netns exec vm{n} nft list tables").stdout
        assert "table inet metadata_proxy" in tables
    assert "reconcile: 2 applied, 0 missing, 0 failed" in box.run("journalctl -b -u metadata-proxy-host -o cat").stdout
    # No `vm apply`: the guests are answered again because reconcile restored their NAT.
    assert whoami(box, 1)["vm_id"] == "vm-0001"
    assert whoami(box, 2, "fd00:a9fe::254")["address"] == "fd00:200:2::2"


def test_upgrade_under_traffic(box: Container, debs: Debs) -> None:
    before = registry(box)
    pid = show(box, "metadata-proxy.service", "MainPID")
    socket_since = show(box, "metadata-proxy.socket", "ActiveEnterTimestampMonotonic")
    traffic = [Traffic(box, 1, "fresh"), Traffic(box, 2, "fresh")]
    try:
        wait_until(box, f"{ADMIN} -s http://localhost/metrics | grep -q 'requests_total{{.*vm=\"guest2\"'")
        box.run(f"apt-get install -y /root/upgrade/{debs.upgrade.name}", timeout=180)
        box.run("sleep 1")
    finally:
        reports = [t.finish() for t in traffic]
    for report in reports:
        assert report["failed"] == 0, report
        assert isinstance(report["ok"], int) and report["ok"] > 0
    assert box.run("dpkg-query -W -f '${Version}' metadata-proxy").stdout == UPGRADE_VERSION
    assert show(box, "metadata-proxy.service", "MainPID") != pid  # the new code serves
    # The socket was not restarted: guests that connected meanwhile waited in its backlog.
    assert show(box, "metadata-proxy.socket", "ActiveEnterTimestampMonotonic") == socket_since
    assert registry(box) == before
    assert whoami(box, 1)["vm_id"] == "vm-0001"


def test_remove_stops_the_service_and_keeps_config_and_registry(box: Container) -> None:
    box.run("apt-get remove -y metadata-proxy", timeout=120)
    for unit in UNITS[1:]:
        assert box.run(f"systemctl is-active {unit}", check=False).stdout.strip() == "inactive"
    assert box.run("dpkg-query -W -f '${db:Status-Status}' metadata-proxy").stdout == "config-files"
    assert box.run("ls /usr/bin/metadata-proxy /opt/metadata-proxy", check=False).returncode != 0
    assert box.run("test -s /etc/metadata-proxy/config.toml && test -s /var/lib/metadata-proxy/registry.sqlite3")
    refused = guest_curl(box, 1, "-H 'Metadata: true' http://169.254.169.254/runtime/whoami")
    assert refused.returncode == 7  # nothing listens any more: connection refused


def test_purge_removes_config_and_registry(box: Container) -> None:
    box.run("dpkg --purge metadata-proxy", timeout=120)
    assert box.run("dpkg-query -W metadata-proxy", check=False).returncode != 0
    assert box.run("ls -d /etc/metadata-proxy /var/lib/metadata-proxy", check=False).stdout == ""
    assert box.run("find /etc/systemd/system -name 'metadata-proxy*'").stdout == ""
    assert box.run("systemctl list-unit-files --no-legend 'metadata-proxy*'", check=False).stdout.strip() == ""
    # Debian leaves system users behind on purge (files elsewhere may still carry the id).
    assert box.run("getent passwd metadata-proxy", check=False).returncode == 0


# --- the README's pip route and its trial, pasted ---------------------------------------


@pytest.fixture
def wheelhouse(tmp_path: Path) -> Path:
    """The project's wheel, its dependencies and the build backend, for a pip with no index."""
    wheels = tmp_path / "wheels"
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    constraints = str(REPO / "constraints.txt")
    subprocess.run([*pip, "wheel", "-w", str(wheels), "-c", constraints, str(REPO)], check=True, env=PIP_ENV)
    subprocess.run([*pip, "download", "-d", str(wheels), "hatchling"], check=True, env=PIP_ENV)
    return wheels


def test_readme_pip_route_and_trial(tools: None, wheelhouse: Path) -> None:
    container = Container("pip")
    try:
        checkout = container.root / "root" / "metadata-proxy"
        files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
        for name in filter(None, files.decode().split("\0")):
            if (REPO / name).is_file():
                (checkout / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / name, checkout / name)
        shutil.copytree(wheelhouse, container.root / "wheels")
        container.boot()
        # pip reads these from the environment: the README's commands stay as written.
        env = "export PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels PIP_DISABLE_PIP_VERSION_CHECK=1\n"
        container.run(f"{env}cd /root/metadata-proxy\n{readme_block('pip-install')}", timeout=300)
        for unit in UNITS:
            assert container.run(f"systemctl is-enabled {unit}").stdout.strip() == "enabled"
        assert container.run("stat -c '%a %U %G' /var/lib/metadata-proxy").stdout.strip() == "750 root metadata-proxy"

        out = container.run(readme_block("trial"), timeout=120).stdout
        answer = json.loads(out.strip().splitlines()[-1])
        assert answer == {"vm_id": "trial-vm", "host_id": "trial-host", "address": "10.99.0.2"}
        admin = container.run(readme_block("admin")).stdout
        assert "metadata_proxy_registry_vms 1.0" in admin
    except ContainerError as exc:
        raise AssertionError(f"{exc}\nconsole: {container.console_tail()}") from None
    finally:
        container.close()


def test_trial_config_in_the_readme_is_the_example_file() -> None:
    trial = readme_block("trial")
    match = re.search(r"<<'EOF'\n(.*?)EOF\n", trial, re.DOTALL)
    assert match, trial
    assert match.group(1) == (REPO / "examples" / "trial.toml").read_text()
