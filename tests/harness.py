"""Real processes for end-to-end tests: the reference control plane, the proxy, hostagent.

Everything binds loopback only. Guests are played by distinct loopback source addresses
(127.0.0.2, 127.0.0.3, ...), which Linux routes to itself without any set-up.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Self

import httpx
import trustme

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parent.parent


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, process: subprocess.Popen[Any], host: str = "127.0.0.1", timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}")
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{process.args!r} did not listen on {port} within {timeout} s")


def stop(process: subprocess.Popen[Any], sig: int = signal.SIGTERM, timeout: float = 25) -> int:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
    return process.returncode


def run(tool: str, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([str(BIN / tool), *args], input=input, capture_output=True, text=True, timeout=60)
    if check and result.returncode != 0:
        raise AssertionError(f"{tool} {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


class ControlPlane:
    """`controlplane serve` on a loopback port, with its secret in a file, and the test-only
    endpoints of tests/controlplane_server.py beside the runtime API."""

    def __init__(self, workdir: Path, port: int | None = None, extra: tuple[str, ...] = ()) -> None:
        self.workdir = workdir
        self.secret_file = workdir / "cp-secret"
        if not self.secret_file.exists():
            self.secret_file.write_text(os.urandom(24).hex())
        self.port = port or free_port()
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.controlplane_server",
                "serve",
                "--listen",
                f"127.0.0.1:{self.port}",
                "--secret-file",
                str(self.secret_file),
                *self.extra,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=REPO,
        )
        wait_for_port(self.port, self.process)
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.process = None

    def mint(self, vm_id: str, *args: str) -> str:
        return run("controlplane", "mint", vm_id, "--secret-file", str(self.secret_file), *args).stdout.strip()

    def requests_seen(self, path: str | None = None) -> int:
        """Requests the control plane received; with `path`, only those for that path."""
        params = {"path": path} if path is not None else None
        count: int = httpx.get(f"{self.url}/_test/requests", params=params, timeout=5).json()["count"]
        return count


class TLSControlPlane(ControlPlane):
    """`controlplane serve --tls-cert --tls-key [--client-ca]`: HTTPS with a certificate for
    127.0.0.1 from a private CA, with `require_client_cert` also requiring client certificates
    from it. `client_cert` is one for `host` (a DNS name; `common_name` sets a subject CN too)."""

    def __init__(
        self,
        workdir: Path,
        ca: trustme.CA,
        *,
        require_client_cert: bool,
        host: str = "host-test",
        common_name: str | None = None,
        extra: tuple[str, ...] = (),
    ) -> None:
        self.ca_file = workdir / "ca.pem"
        self.cert_file = workdir / "server.pem"
        self.key_file = workdir / "server.key"
        self.client_cert = workdir / "client.pem"
        self.client_key = workdir / "client.key"
        ca.cert_pem.write_to_path(str(self.ca_file))
        server = ca.issue_cert("127.0.0.1")
        server.cert_chain_pems[0].write_to_path(str(self.cert_file))
        server.private_key_pem.write_to_path(str(self.key_file))
        client = ca.issue_cert(host, common_name=common_name)
        client.cert_chain_pems[0].write_to_path(str(self.client_cert))
        client.private_key_pem.write_to_path(str(self.client_key))
        self.require_client_cert = require_client_cert
        tls: tuple[str, ...] = ("--tls-cert", str(self.cert_file), "--tls-key", str(self.key_file))
        if require_client_cert:
            tls += ("--client-ca", str(self.ca_file))
        super().__init__(workdir, extra=(*tls, *extra))

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def client(self, *, with_cert: bool = True, **kwargs: Any) -> httpx.Client:
        """An HTTPS client that trusts the private CA and, `with_cert`, presents the client certificate."""
        context = ssl.create_default_context(cafile=str(self.ca_file))
        if with_cert:
            context.load_cert_chain(str(self.client_cert), str(self.client_key))
        return httpx.Client(base_url=self.url, verify=context, timeout=5, **kwargs)

    def requests_seen(self, path: str | None = None) -> int:
        params = {"path": path} if path is not None else None
        with self.client() as client:
            count: int = client.get("/_test/requests", params=params).json()["count"]
        return count

    def toml(self, *, ca_file: bool = True, client_cert: bool = False) -> str:
        """The proxy's [control_plane] lines for this server."""
        lines = [f'ca_file = "{self.ca_file}"'] if ca_file else []
        if client_cert:
            lines += [f'client_cert = "{self.client_cert}"', f'client_key = "{self.client_key}"']
        return "\n".join(lines)


class Proxy:
    """`metadata-proxy serve --config` as a user runs it, on a loopback port."""

    def __init__(
        self,
        workdir: Path,
        control_plane_url: str,
        extra_toml: str = "",
        top_toml: str = "",
        *,
        timeout: float = 3,
        retry_budget: float = 0.5,
        listen: tuple[tuple[str, int], ...] = (),
        registry: Path | None = None,
    ) -> None:
        self.workdir = workdir
        self.port = free_port()
        # Where guests connect: a loopback port by default; (host, port) pairs when given.
        self.listen = listen or (("127.0.0.1", self.port),)
        self.admin = workdir / "admin.sock"
        self.registry = registry or workdir / "registry.sqlite3"
        self.config = workdir / "config.toml"
        self.log = workdir / "proxy.log"
        entries = ", ".join(f'"[{h}]:{p}"' if ":" in h else f'"{h}:{p}"' for h, p in self.listen)
        self.config.write_text(
            f'host_id = "host-test"\n'
            f"listen = [{entries}]\n"
            f'registry = "{self.registry}"\n'
            f'admin_listen = "{self.admin}"\n'
            f"{top_toml}\n"
            f"[control_plane]\n"
            f'url = "{control_plane_url}"\n'
            f"timeout = {timeout}\n"
            f"retry_budget = {retry_budget}\n"
            f"{extra_toml}\n"
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, env: dict[str, str] | None = None) -> Proxy:
        self._log = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [str(BIN / "metadata-proxy"), "serve", "--config", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        try:
            for host, port in self.listen:
                wait_for_port(port, self.process, host=host)
        except BaseException:
            self.stop()  # closes the log file too: a leaked one fails the run (filterwarnings = error)
            raise
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        code = 0
        if self.process is not None:
            code = stop(self.process, sig)
            self.process = None
            self._log.close()
        return code

    def hostagent(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        return run("hostagent", "--registry", str(self.registry), *args, input=input, check=check)

    def add_vm(self, name: str, address: str, token: str, *extra: str) -> None:
        self.hostagent("vm", "add", name, "--address", address, "--token-file", "-", *extra, input=token)

    def guest(self, address: str, **kwargs: Any) -> httpx.Client:
        """An HTTP client whose connections come from `address` (a loopback alias)."""
        transport = httpx.HTTPTransport(local_address=address, retries=0)
        return httpx.Client(base_url=self.url, transport=transport, timeout=10, **kwargs)

    def log_lines(self) -> list[str]:
        return self.log.read_text().splitlines() if self.log.exists() else []


@contextlib.contextmanager
def running(*things: ControlPlane | Proxy) -> Iterator[None]:
    try:
        yield
    finally:
        for thing in reversed(things):
            thing.stop()
