"""An operator's first hour with the proxy (issue 12, item 5), each with real processes:
versions, the start-up line and build_info, check-config on TLS material and on what the
service's user can read, the control plane's reachability in the log, the admin socket's
file after a stop and after a failed start, and the metric series at many VMs."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import trustme
from prometheus_client.parser import text_string_to_metric_families

from metadata_proxy.version import version
from tests.harness import BIN, REPO, ControlPlane, Proxy, free_port, run, running, stop

META = {"Metadata": "true"}
IN_CI = os.environ.get("CI") == "true"


def _messages(proxy: Proxy) -> list[str]:
    return [str(entry["message"]) for line in proxy.log_lines() if "message" in (entry := json.loads(line))]


def _wait_for(predicate: object, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def _samples(proxy: Proxy) -> list[tuple[str, dict[str, str], float]]:
    transport = httpx.HTTPTransport(uds=str(proxy.admin))
    with httpx.Client(transport=transport, base_url="http://admin", timeout=10) as admin:
        text = admin.get("/metrics").text
    return [
        (sample.name, dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


# -- versions -------------------------------------------------------------------------------


@pytest.mark.parametrize("tool", ["metadata-proxy", "hostagent", "controlplane"])
def test_every_cli_prints_its_version(tool: str) -> None:
    result = run(tool, "--version")
    assert result.stdout == f"{tool} {version()}\n"
    assert version() != "unknown"  # the test environment installs the distribution


def test_the_start_up_line_and_build_info_carry_the_version_and_stop_removes_the_admin_socket(
    tmp_path: Path, cp: ControlPlane
) -> None:
    proxy = Proxy(tmp_path, cp.url).start()
    with running(proxy):
        assert proxy.admin.exists()
        _wait_for(lambda: any("serving guests" in m for m in _messages(proxy)), "the start-up line")
        started = next(m for m in _messages(proxy) if "serving guests" in m)
        assert started.startswith(f"serving guests on 127.0.0.1:{proxy.port}, admin on {proxy.admin}, pid ")
        assert started.endswith(f", metadata-proxy {version()}")
        build = [(labels, value) for name, labels, value in _samples(proxy) if name == "metadata_proxy_build_info"]
        assert len(build) == 1
        assert build[0][0]["version"] == version() and build[0][1] == 1
        assert proxy.stop() == 0
    assert not proxy.admin.exists()  # a stale socket file looks like a service to scrape


def test_the_admin_socket_is_removed_after_a_failed_start(tmp_path: Path, cp: ControlPlane) -> None:
    # systemd passes a datagram socket: the proxy binds its admin socket, then cannot serve.
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        if IN_CI:
            pytest.fail("systemd-socket-activate is not installed (CI=true: nothing may skip)")
        pytest.skip("systemd-socket-activate is not installed")
    proxy = Proxy(tmp_path, cp.url)
    port = free_port()
    process = subprocess.Popen(
        [
            activate,
            "--datagram",
            "-l",
            f"127.0.0.1:{port}",
            str(BIN / "metadata-proxy"),
            "serve",
            "--config",
            str(proxy.config),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while process.poll() is None and time.monotonic() < deadline:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:  # activates the service
                udp.sendto(b"x", ("127.0.0.1", port))
            time.sleep(0.1)
        _, stderr = process.communicate(timeout=20)
    finally:
        if process.poll() is None:
            stop(process)
    assert process.returncode == 1, stderr
    failure = [line for line in stderr.splitlines() if line.startswith("metadata-proxy: ")]
    assert len(failure) == 1 and "Traceback" not in stderr, stderr
    assert not proxy.admin.exists()


# -- the control plane's reachability -------------------------------------------------------


def test_the_first_failed_probe_and_every_change_of_reachability_are_logged(tmp_path: Path) -> None:
    control_plane = ControlPlane(tmp_path)  # not started yet: its port refuses
    (tmp_path / "proxy").mkdir()
    proxy = Proxy(tmp_path / "proxy", control_plane.url).start()
    with running(proxy):
        unreachable = f"control plane {control_plane.url} unreachable"
        reachable = f"control plane {control_plane.url} reachable"
        _wait_for(lambda: any(m.startswith(unreachable) for m in _messages(proxy)), "the first failed probe")
        control_plane.start()
        try:
            _wait_for(lambda: reachable in _messages(proxy), "the probe to succeed")
        finally:
            control_plane.stop()
        _wait_for(lambda: sum(m.startswith(unreachable) for m in _messages(proxy)) == 2, "the second change")
        time.sleep(2.5)  # more failed probes: they change nothing, so they log nothing
        changes = [m.split(": ")[0] for m in _messages(proxy) if m.startswith("control plane ")]
        assert changes == [unreachable, reachable, unreachable]
        levels = {
            json.loads(line)["message"].split(": ")[0]: json.loads(line)["level"]
            for line in proxy.log_lines()
            if "control plane" in line
        }
        assert levels[unreachable].lower().startswith("warn") and levels[reachable].lower() == "info"


# -- metrics at many VMs --------------------------------------------------------------------


def test_per_vm_labels_can_be_turned_off_and_expired_tokens_are_not_expiring_soon(
    tmp_path: Path, cp: ControlPlane
) -> None:
    proxy = Proxy(tmp_path, cp.url, "[limits]\nrequests_per_second = 1000\nburst = 1000\n", "per_vm_metrics = false")
    addresses = ["127.0.0.61", "127.0.0.62"]
    proxy.add_vm("first", addresses[0], cp.mint(f"vm-first-{os.getpid()}"))
    proxy.add_vm("soon", addresses[1], cp.mint(f"vm-soon-{os.getpid()}", "--lifetime", "3"))
    with running(proxy.start()):
        for address in addresses:
            with proxy.guest(address) as guest:
                assert guest.get("/runtime/whoami", headers=META).status_code == 200
        samples = _samples(proxy)
        requests = [(labels, value) for name, labels, value in samples if name == "metadata_proxy_requests_total"]
        assert requests == [({"vm": "", "route": "/runtime/", "status": "200"}, 2.0)]  # one series for all VMs
        gauges = {name: value for name, _, value in samples}
        assert (gauges["metadata_proxy_tokens_expiring_soon"], gauges["metadata_proxy_tokens_expired"]) == (1, 0)
        time.sleep(3.5)  # the short token expires
        gauges = {name: value for name, _, value in _samples(proxy)}
        assert (gauges["metadata_proxy_tokens_expiring_soon"], gauges["metadata_proxy_tokens_expired"]) == (0, 1)


# -- check-config ---------------------------------------------------------------------------


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory any user can enter (pytest's own are 0700), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="mp-first-hour-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def _tls_config(directory: Path, **files: Path) -> Path:
    config = directory / "config.toml"
    lines = [
        'host_id = "h"',
        f'registry = "{directory}/registry.sqlite3"',
        "[control_plane]",
        'url = "https://cp.example"',
    ]
    lines += [f'{key} = "{path}"' for key, path in files.items()]
    config.write_text("\n".join(lines) + "\n")
    config.chmod(0o644)
    return config


def test_check_config_loads_the_tls_material_and_names_the_bad_file(shared_dir: Path) -> None:
    ca = trustme.CA()
    leaf, other = ca.issue_cert("host-a"), ca.issue_cert("host-b")
    paths = {name: shared_dir / f"{name}.pem" for name in ("ca", "cert", "key", "other_key", "garbage")}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    leaf.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    leaf.private_key_pem.write_to_path(str(paths["key"]))
    other.private_key_pem.write_to_path(str(paths["other_key"]))
    paths["garbage"].write_text("not a certificate\n")
    for path in paths.values():
        path.chmod(0o644)

    def check(**files: Path) -> subprocess.CompletedProcess[str]:
        return run(
            "metadata-proxy",
            "check-config",
            "--config",
            str(_tls_config(shared_dir, **files)),
            "--user",
            "nobody",
            check=False,
        )

    good = check(ca_file=paths["ca"], client_cert=paths["cert"], client_key=paths["key"])
    assert good.returncode == 0, good.stderr
    assert "files readable by nobody" in good.stdout
    for files, expected in (
        ({"ca_file": paths["garbage"]}, f'control_plane.ca_file = "{paths["garbage"]}": not a PEM CA bundle'),
        (
            {"client_cert": paths["garbage"], "client_key": paths["key"]},
            f'control_plane.client_cert = "{paths["garbage"]}": not a PEM certificate',
        ),
        (
            {"client_cert": paths["cert"], "client_key": paths["garbage"]},
            f'control_plane.client_key = "{paths["garbage"]}": not a PEM private key',
        ),
        (
            {"client_cert": paths["cert"], "client_key": paths["other_key"]},
            f'control_plane.client_key = "{paths["other_key"]}": does not belong to the certificate in {paths["cert"]}',
        ),
    ):
        result = check(**files)
        assert result.returncode == 1, result
        assert result.stdout == "" and len(result.stderr.splitlines()) == 1, result.stderr
        assert expected in result.stderr, result.stderr


def test_the_production_example_passes_check_config(shared_dir: Path) -> None:
    """examples/config.toml as shipped, with only its /etc/metadata-proxy files (and the
    registry) placed here: every key and value it spells out is valid."""
    ca = trustme.CA()
    leaf = ca.issue_cert("hv-042")
    ca.cert_pem.write_to_path(str(shared_dir / "ca.pem"))
    leaf.cert_chain_pems[0].write_to_path(str(shared_dir / "host.pem"))
    leaf.private_key_pem.write_to_path(str(shared_dir / "host.key"))
    for path in shared_dir.iterdir():
        path.chmod(0o644)
    text = (REPO / "examples" / "config.toml").read_text()
    moved = text.replace("/etc/metadata-proxy/", f"{shared_dir}/").replace("/var/lib/metadata-proxy/", f"{shared_dir}/")
    assert moved.count(f'"{shared_dir}/') == 4  # ca_file, client_cert, client_key, registry
    config = shared_dir / "config.toml"
    config.write_text(moved)
    config.chmod(0o644)
    result = run("metadata-proxy", "check-config", "--config", str(config), "--user", "nobody", check=False)
    assert result.returncode == 0, result.stderr
    assert "routes /runtime/ (header), /runtime/identity/ (session), /twirp/ (none), /runtime/github/ (none)" in (
        result.stdout
    )


def test_check_config_reports_a_file_the_service_user_cannot_read(shared_dir: Path) -> None:
    ca = trustme.CA()
    ca_file = shared_dir / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    ca_file.chmod(0o600)  # readable by root (who runs check-config), not by the service's user
    config = _tls_config(shared_dir, ca_file=ca_file)
    owner = f"{ca_file.owner()}:{ca_file.group()}"
    result = run("metadata-proxy", "check-config", "--config", str(config), "--user", "nobody", check=False)
    assert result.returncode == 1
    assert result.stderr == (
        f'metadata-proxy: {config}: control_plane.ca_file = "{ca_file}": '
        f"the service user nobody cannot read it (mode 0600, owner {owner})\n"
    )
    ca_file.chmod(0o644)
    hidden = shared_dir / "private"
    hidden.mkdir(mode=0o700)
    (shared_dir / "registry.sqlite3").symlink_to(hidden / "registry.sqlite3")
    (hidden / "registry.sqlite3").write_bytes(b"")
    result = run("metadata-proxy", "check-config", "--config", str(config), "--user", "nobody", check=False)
    assert result.returncode == 1
    assert (
        f'registry = "{shared_dir}/registry.sqlite3": the service user nobody cannot enter its directory {hidden}'
        in result.stderr
    )
    config.chmod(0o600)
    result = run("metadata-proxy", "check-config", "--config", str(config), "--user", "nobody", check=False)
    assert (
        result.stderr
        == f"metadata-proxy: {config}: the service user nobody cannot read it (mode 0600, owner {owner})\n"
    )
    config.chmod(0o644)
    result = run("metadata-proxy", "check-config", "--config", str(config), "--user", "no-such-user-here", check=False)
    assert result.returncode == 1 and result.stderr == "metadata-proxy: user no-such-user-here: no such user\n"


# -- a bug's traceback is never lost --------------------------------------------------------


# A fault no code path expects, injected at start-up through `sitecustomize` (the standard
# library's own hook), into a third-party or standard-library call each command makes.
# Only calls that name `only` fail, when given: coverage's own data file is SQLite too.
def _fault(module: str, function: str, only: str = "", message: str = "injected fault") -> str:
    real = f"_real = {module}.{function}\n"
    spare = f"    if {only!r} not in str(a[:1]):\n        return _real(*a, **k)\n" if only else ""
    body = f"    raise ZeroDivisionError({message!r})"
    return f"import {module}\n{real}def fault(*a, **k):\n{spare}{body}\n{module}.{function} = fault\n"


_FAULTS = {
    "metadata-proxy": (_fault("tomllib", "load"), ("check-config", "--config", "{config}")),
    "hostagent": (_fault("sqlite3", "connect", only="registry"), ("--registry", "{registry}", "vm", "list")),
    "controlplane": (_fault("jwt", "encode"), ("mint", "vm-1", "--secret-file", "{secret}")),
}


@pytest.mark.parametrize("tool", sorted(_FAULTS))
def test_an_unexpected_error_is_one_line_and_its_traceback_is_kept(tool: str, tmp_path: Path) -> None:
    code, template = _FAULTS[tool]
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(code)
    (tmp_path / "config.toml").write_text('host_id = "h"\n[control_plane]\nurl = "http://127.0.0.1:9"\n')
    (tmp_path / "secret").write_text("s" * 32)
    (tmp_path / "registry.sqlite3").write_bytes(b"")
    values = {
        "config": tmp_path / "config.toml",
        "registry": tmp_path / "registry.sqlite3",
        "secret": tmp_path / "secret",
    }
    args = [part.format(**values) for part in template]
    env = {**os.environ, "PYTHONPATH": str(hook), "TMPDIR": str(tmp_path)}

    plain = subprocess.run([str(BIN / tool), *args], capture_output=True, text=True, timeout=60, env=env, check=False)
    assert plain.returncode == 1
    assert plain.stdout == ""
    line = f"{tool}: internal error: ZeroDivisionError: injected fault (traceback in "
    assert plain.stderr.startswith(line) and plain.stderr.count("\n") == 1, plain.stderr
    kept = Path(plain.stderr[len(line) :].rstrip(")\n"))
    assert kept.parent == tmp_path and oct(kept.stat().st_mode & 0o777) == oct(0o600)
    assert "Traceback (most recent call last)" in kept.read_text() and "injected fault" in kept.read_text()

    debug = subprocess.run(
        [str(BIN / tool), "--debug", *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )
    assert debug.returncode == 1
    assert debug.stderr.startswith("Traceback (most recent call last)")
    assert (
        debug.stderr.splitlines()[-1] == f"{tool}: internal error: ZeroDivisionError: injected fault (traceback above)"
    )


# A runtime token's shape (header, claims, signature); no real token.
_LEAKED = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ2bS0xIn0.c2lnbmF0dXJl"


@pytest.mark.parametrize("tool", sorted(_FAULTS))
def test_an_unexpected_error_never_shows_a_token(tool: str, tmp_path: Path) -> None:
    """A token that reached an exception's message is redacted, in the line and the
    traceback, by every command line (serve's traceback goes to the journal)."""
    _, template = _FAULTS[tool]
    module, function, only = {
        "metadata-proxy": ("tomllib", "load", ""),
        "hostagent": ("sqlite3", "connect", "registry"),
        "controlplane": ("jwt", "encode", ""),
    }[tool]
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_fault(module, function, only, message=f"bad header {_LEAKED}"))
    (tmp_path / "config.toml").write_text('host_id = "h"\n[control_plane]\nurl = "http://127.0.0.1:9"\n')
    (tmp_path / "secret").write_text("s" * 32)
    (tmp_path / "registry.sqlite3").write_bytes(b"")
    values = {
        "config": tmp_path / "config.toml",
        "registry": tmp_path / "registry.sqlite3",
        "secret": tmp_path / "secret",
    }
    args = [part.format(**values) for part in template]
    env = {**os.environ, "PYTHONPATH": str(hook), "TMPDIR": str(tmp_path)}
    for debug in ([], ["--debug"]):
        result = subprocess.run(
            [str(BIN / tool), *debug, *args], capture_output=True, text=True, timeout=60, env=env, check=False
        )
        assert result.returncode == 1
        assert "<token redacted>" in result.stderr.splitlines()[-1], result.stderr
        assert _LEAKED not in result.stderr
        for kept in tmp_path.glob(f"{tool}-traceback-*.txt"):
            assert "Traceback" in kept.read_text() and _LEAKED not in kept.read_text()
