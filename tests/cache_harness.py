"""Real third-party parts for the Actions cache tests: Azurite, a throwaway PostgreSQL server,
and the unmodified ``@actions/cache`` client run by node.

The npm packages come from tests/node/package-lock.json (``npm ci`` in .ci/run). Everything
listens on loopback or a unix socket in a temporary directory, and is stopped afterwards.
"""

from __future__ import annotations

import base64
import json
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import free_port, stop, wait_for_port

NODE_DIR = Path(__file__).resolve().parent / "node"
# Azurite's well-known development account (documented; not a secret).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
PG_BIN = Path("/usr/lib/postgresql/15/bin")


def _need(path: Path, what: str) -> None:
    if not path.exists():
        if os.environ.get("CI") == "true":
            raise RuntimeError(f"{what} is missing ({path}): .ci/run installs it")
        pytest.skip(f"{what} is missing ({path})")


class Azurite:
    """Azurite's blob service on a loopback port, in memory."""

    def __init__(self, workdir: Path, *, tls: tuple[Path, Path] | None = None) -> None:
        """`tls`: a certificate and key (PEM) to serve https with, as Azure does."""
        _need(NODE_DIR / "node_modules" / ".bin" / "azurite-blob", "azurite (npm ci in tests/node)")
        self.workdir = workdir
        self.port = free_port()
        self.tls = tls
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}/{AZURITE_ACCOUNT}"

    def key_file(self) -> Path:
        path = self.workdir / "azurite-key"
        path.write_text(AZURITE_KEY)
        return path

    def start(self) -> Azurite:
        self.process = subprocess.Popen(
            [
                str(NODE_DIR / "node_modules" / ".bin" / "azurite-blob"),
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                str(self.port),
                "--inMemoryPersistence",
                "--disableTelemetry",
                "--skipApiVersionCheck",
                "--silent",
                *(["--cert", str(self.tls[0]), "--key", str(self.tls[1])] if self.tls else []),
            ],
            cwd=self.workdir,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port, self.process, timeout=30)
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop(self.process)
            self.process = None


def azurite_key() -> bytes:
    return base64.b64decode(AZURITE_KEY)


class Postgres:
    """A PostgreSQL 15 server of its own (initdb in a temporary directory), on a unix socket only.

    PostgreSQL refuses to run as root; as root (CI) the server runs as ``nobody`` in a directory
    handed to that user. The postmaster is this process's child with a parent-death signal
    (SIGQUIT: an immediate shutdown), so a test run that is killed leaves no server behind."""

    def __init__(self) -> None:
        _need(PG_BIN / "postgres", "PostgreSQL 15 (Debian's postgresql-15)")
        self.dir = Path(tempfile.mkdtemp(prefix="mp-pg-"))
        self.data = self.dir / "data"
        self.as_user = "nobody" if os.geteuid() == 0 else None
        self.process: subprocess.Popen[bytes] | None = None
        if self.as_user is not None:
            entry = pwd.getpwnam(self.as_user)
            os.chown(self.dir, entry.pw_uid, entry.pw_gid)

    def _run(self, *args: str) -> None:
        command = [*args] if self.as_user is None else ["runuser", "-u", self.as_user, "--", *args]
        subprocess.run(command, check=True, capture_output=True, timeout=60, cwd=self.dir)

    @property
    def url(self) -> str:
        return f"postgresql:///postgres?host={self.dir}&user=cache"

    def start(self) -> Postgres:
        self._run(str(PG_BIN / "initdb"), "-D", str(self.data), "-U", "cache", "--auth=trust", "-E", "UTF8")
        # setpriv execs the server in place (no daemon, unlike pg_ctl): it stays our child, and
        # dies with us. It changes the user before setting the signal, which a change of user clears.
        user = [] if self.as_user is None else [f"--reuid={self.as_user}", "--regid=nogroup", "--clear-groups"]
        server = [str(PG_BIN / "postgres"), "-D", str(self.data), "-k", str(self.dir)]
        settings = ["-c", "listen_addresses=", "-c", "fsync=off", "-c", "max_connections=200"]
        with open(self.dir / "log", "ab") as log:
            self.process = subprocess.Popen(
                ["setpriv", *user, "--pdeathsig=QUIT", *server, *settings],
                cwd=self.dir,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 30) -> None:
        """Until the server accepts connections on its socket (pg_isready), or it exited."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.process.returncode}: see {self.dir / 'log'}")
            check = [str(PG_BIN / "pg_isready"), "-q", "-h", str(self.dir), "-U", "cache", "-d", "postgres"]
            if subprocess.run(check, stdin=subprocess.DEVNULL, capture_output=True).returncode == 0:
                return
            time.sleep(0.1)
        raise RuntimeError(f"postgres not ready after {timeout} s: see {self.dir / 'log'}")

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGQUIT)  # immediate shutdown: the data is thrown away
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def azurite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Azurite]:
    server = Azurite(tmp_path_factory.mktemp("azurite")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    server = Postgres()
    try:
        yield server.start()
    finally:
        server.stop()


@dataclass
class Runner:
    """A guest's CI job: the unmodified client in node, its connections from ``address``."""

    proxy_url: str
    address: str
    workspace: Path
    package: str = "cache6"
    protocol: str = "v2"

    def env(self) -> dict[str, str]:
        temp = self.workspace / ".runner-temp"
        temp.mkdir(parents=True, exist_ok=True)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.workspace),
            "RUNNER_TEMP": str(temp),
            "GITHUB_WORKSPACE": str(self.workspace),
            "MP_SOURCE_ADDRESS": self.address,
            # Any value: the guest holds no secret; the proxy replaces the Authorization header.
            "ACTIONS_RUNTIME_TOKEN": "placeholder",
        }
        if self.protocol == "v2":
            # GITHUB_SERVER_URL stays unset: a non-github value would force v1.
            env["ACTIONS_CACHE_SERVICE_V2"] = "1"
            env["ACTIONS_RESULTS_URL"] = f"{self.proxy_url}/"
        else:
            env["ACTIONS_CACHE_URL"] = f"{self.proxy_url}/runtime/github/"
        return env

    def _node(self, *args: str) -> tuple[object, str]:
        result = subprocess.run(
            ["node", "--require", str(NODE_DIR / "bind.cjs"), str(NODE_DIR / "cache.mjs"), self.package, *args],
            cwd=self.workspace,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=240,
        )
        output = result.stdout + result.stderr
        for line in reversed(result.stdout.splitlines()):
            if line.startswith("RESULT "):
                return json.loads(line[len("RESULT ") :])["result"], output
        raise AssertionError(f"the client printed no result (exit {result.returncode}):\n{output}")

    def save(self, key: str, *paths: str) -> tuple[object, str]:
        """(the cache id saveCache returned: -1 when it did not save, the client's output)."""
        return self._node("save", key, *paths)

    def restore(self, key: str, *paths: str, restore_keys: tuple[str, ...] = ()) -> tuple[object, str]:
        """(the key restoreCache matched, None on a miss; the client's output)."""
        return self._node("restore", key, json.dumps(list(restore_keys)), *paths)
