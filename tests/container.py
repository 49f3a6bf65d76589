"""Debian 12 containers with systemd as PID 1, for the package tests (test_package.py).

- The root file system: `mmdebstrap --variant=minbase` of bookworm with systemd and what
  the tests run, as a tarball in the checkout's `.cache/containers/` (named after its
  package list; rebuilt when a week old), so a second run on one machine skips the ~20 s
  bootstrap. A bare machine builds it.
- A container: that tarball unpacked into a temporary directory, booted with
  `systemd-nspawn --boot` on a private network: its addresses, nftables tables, network
  namespaces and files are its own, nothing of the machine's changes. Commands run inside
  with `nsenter` into its namespaces (`--register=no` leaves no machined registration to
  use `machinectl` with).
- `close()` powers it off (or kills it) and deletes the directory, whatever happened.

The nspawn flags are the ones that work on these machines (cgroup v2 without a delegated
scope: `--keep-unit`, the unified hierarchy forced; systemd 252's own units need `bpf`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "containers"
SUITE = "bookworm"
# systemd and dbus: PID 1 and `systemd-analyze security` on the running unit; python3,
# nftables, iproute2, conntrack: the package's Depends (installed beforehand, so that
# `apt-get install ./x.deb` needs no network); curl: the guests; python3-venv: the pip route.
PACKAGES = ("conntrack", "curl", "dbus", "iproute2", "nftables", "python3", "python3-venv", "systemd")
MAX_AGE = 7 * 24 * 3600
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# `systemctl reboot` inside makes systemd-nspawn exit with this status.
REBOOT_STATUS = 133
# What `systemctl is-system-running --wait` prints before systemd inside is up.
NOT_YET = ("", "offline")


class ContainerError(Exception):
    pass


def root_tarball() -> Path:
    """The cached root file system, built first if missing or stale."""
    key = hashlib.sha256(f"{SUITE} minbase {' '.join(PACKAGES)}".encode()).hexdigest()[:12]
    tarball = CACHE / f"debian-{SUITE}-{key}.tar"
    if tarball.is_file() and time.time() - tarball.stat().st_mtime < MAX_AGE:
        return tarball
    CACHE.mkdir(parents=True, exist_ok=True)
    # mmdebstrap picks the output format by the name's extension: keep ".tar" at the end.
    partial = CACHE / f"{tarball.stem}.{os.getpid()}.partial.tar"
    try:
        subprocess.run(
            ["mmdebstrap", "--quiet", "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(partial)],
            check=True,
            stdin=subprocess.DEVNULL,
            timeout=600,
        )
        partial.rename(tarball)
    finally:
        partial.unlink(missing_ok=True)
    for old in CACHE.glob(f"debian-{SUITE}-*.tar"):
        if old != tarball and ".partial" not in old.name:
            old.unlink(missing_ok=True)
    return tarball


class Container:
    """One booted container; `run` executes a bash script inside it, as root."""

    def __init__(self, name: str) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix=f"mpt-{name}-"))
        # mkdtemp's suffix may hold "_" or end in "-", neither valid in a machine name.
        self.machine = f"mpt-{name}-{secrets.token_hex(4)}"
        self.root = self.directory / "root"
        self.console = self.directory / "console.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.leader = 0
        try:
            self.root.mkdir()
            subprocess.run(["tar", "-xf", str(root_tarball()), "-C", str(self.root)], check=True, timeout=120)
        except BaseException:
            shutil.rmtree(self.directory, ignore_errors=True)
            raise

    def boot(self, timeout: float = 60) -> None:
        """Start systemd-nspawn and wait until systemd inside reports `running`."""
        with open(self.console, "ab") as console:
            self.process = subprocess.Popen(
                [
                    "systemd-nspawn",
                    "--quiet",
                    "--boot",
                    f"--directory={self.root}",
                    f"--machine={self.machine}",
                    "--register=no",
                    "--keep-unit",
                    "--system-call-filter=bpf",
                    "--private-network",
                    "--console=read-only",
                ],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                env={**os.environ, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1"},
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        self.leader = self._find_leader(deadline)
        # Until systemd has set the container up, entering it may fail (no output), and
        # systemctl answers "offline" until PID 1 has created /run/systemd/system: both
        # mean "not yet", so ask again until the deadline.
        while True:
            result = self.run("systemctl is-system-running --wait", check=False, timeout=timeout)
            state = result.stdout.strip()
            if state not in NOT_YET or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        if state != "running":
            failed = self.run("systemctl --failed --no-legend --plain", check=False).stdout
            raise ContainerError(f"container booted to {state!r} ({result.stderr.strip()}); failed units: {failed}")

    def _find_leader(self, deadline: float) -> int:
        """The container's PID 1 as the machine sees it: systemd-nspawn's child running systemd."""
        assert self.process is not None
        pid = self.process.pid
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ContainerError(f"systemd-nspawn exited with {self.process.returncode}: {self.console_tail()}")
            try:
                children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
                for child in children:
                    if Path(f"/proc/{child}/comm").read_text().strip() == "systemd":
                        return int(child)
            except OSError:
                pass
            time.sleep(0.05)
        raise ContainerError(f"no systemd in the container after the timeout: {self.console_tail()}")

    def console_tail(self) -> str:
        try:
            return self.console.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def command(self, script: str) -> list[str]:
        """argv that runs `script` with bash inside the container, in a clean environment."""
        enter = ["nsenter", f"--target={self.leader}", "--all", "--root", "--wd"]
        environment = ["env", "-i", f"PATH={PATH}", "LANG=C.UTF-8", "HOME=/root"]
        return [*enter, *environment, "bash", "-euo", "pipefail", "-c", script]

    def run(
        self, script: str, *, check: bool = True, timeout: float = 60, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            self.command(script),
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise ContainerError(f"{script!r} -> {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}")
        return proc

    def spawn(self, script: str) -> subprocess.Popen[str]:
        """Run `script` inside, in the background; the caller waits for it."""
        return subprocess.Popen(
            self.command(script), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        target = self.root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)

    def reboot(self, timeout: float = 60) -> None:
        """`systemctl reboot` inside; systemd-nspawn exits 133 for that, and is started again."""
        assert self.process is not None
        self.run("systemctl reboot", check=False)
        status = self.process.wait(timeout=timeout)
        if status != REBOOT_STATUS:
            raise ContainerError(f"systemd-nspawn exited {status} on reboot: {self.console_tail()}")
        self.boot(timeout)

    def close(self) -> None:
        """Power off (SIGTERM makes nspawn shut the container down), kill if that hangs, delete."""
        try:
            if self.process is not None and self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    # Killing a PID namespace's init kills everything in it.
                    for pid in (self.leader, self.process.pid):
                        if pid:
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(pid, signal.SIGKILL)
                    self.process.wait(timeout=30)
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)
