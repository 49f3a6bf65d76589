"""The proxy as a host service (README "Logs", issue 5; `workers`, issue 6), with real processes.

A real `systemd-socket-activate` passes the sockets, a real AF_UNIX datagram socket plays
systemd's notification socket, signals go to the real `metadata-proxy serve` process, and
the reference control plane answers upstream. Workers are told apart by stopping all but
one with SIGSTOP: the kernel then hands every new connection to the one left running.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from itertools import count
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.harness import BIN, ControlPlane, Proxy, free_port, run, wait_for_port

META = {"Metadata": "true"}
IN_CI = os.environ.get("CI") == "true"
# Each proxy gets its own registry, so addresses only need to be distinct within a test.
_addresses = count(100)
# Rate limits out of the way of the traffic these tests make.
OPEN_LIMITS = "[limits]\nrequests_per_second = 100000\nburst = 100000\n"
ECHO_ROUTE = '[[routes]]\nprefix = "/runtime/"\n'


def next_address() -> str:
    return f"127.0.0.{next(_addresses)}"


def _missing(what: str) -> None:
    if IN_CI:
        pytest.fail(f"{what} (CI=true: nothing may skip)")
    pytest.skip(what)


def wait_until(predicate: Callable[[], object], timeout: float = 10, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


# -- plumbing -------------------------------------------------------------------------------


class NotifySocket:
    """An AF_UNIX datagram socket standing in for systemd's $NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.received: list[str] = []

    def next(self, timeout: float = 10) -> str:
        """The next state's first assignment ("READY=1", "RELOADING=1", ...)."""
        self.sock.settimeout(timeout)
        message = self.sock.recv(4096).decode()
        self.received.append(message)
        return message.splitlines()[0]

    def expect(self, *states: str, timeout: float = 10) -> None:
        for state in states:
            assert self.next(timeout) == state, self.received

    def nothing_more(self, wait: float = 0.3) -> None:
        self.sock.settimeout(wait)
        with pytest.raises(TimeoutError):
            self.received.append(self.sock.recv(4096).decode())

    def close(self) -> None:
        self.sock.close()


class Service(Proxy):
    """`metadata-proxy serve` started as systemd would: optionally through a real
    `systemd-socket-activate` and with a notification socket."""

    def __init__(self, workdir: Path, cp: ControlPlane, *, top: str = "", extra: str = "") -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(workdir, cp.url, extra_toml=OPEN_LIMITS + extra, top_toml=top)
        self.cp = cp
        self.notify: NotifySocket | None = None
        self.seen_workers: set[int] = set()

    def start_service(
        self, *, notify: bool = True, activate: list[str] | None = None, trigger: tuple[str, int] | None = None
    ) -> Service:
        env: dict[str, str] = {}
        if notify:
            # A short path: sun_path holds 108 bytes, pytest's tmp paths can be long.
            self.notify = NotifySocket(self.workdir / "n.sock")
            env["NOTIFY_SOCKET"] = str(self.notify.path)
        command = [str(BIN / "metadata-proxy"), "serve", "--config", str(self.config)]
        if activate is not None:
            # systemd-socket-activate passes only its own variables and those given with -E.
            exec_env = [arg for name, value in env.items() for arg in ("-E", f"{name}={value}")]
            command = [activate[0], *activate[1:], *exec_env, *command]
        self._log = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        # systemd-socket-activate chats on stderr before it execs the service: keep that apart.
        stderr = (self.workdir / "activate.err").open("ab") if activate is not None else subprocess.STDOUT
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=self._log, stderr=stderr, env={**os.environ, **env}
        )
        if not isinstance(stderr, int):
            stderr.close()  # the child has its own copy
        if trigger is not None:
            # systemd-socket-activate execs the service at the first connection.
            wait_for_port(trigger[1], self.process, host=trigger[0])
        else:
            wait_for_port(self.port, self.process)
        if self.notify is not None:
            self.notify.expect("READY=1", timeout=15)
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process is not None and self.process.poll() is None:
            self.worker_pids()
        code = super().stop(sig)
        for pid in self.seen_workers:  # a worker must never outlive a test, whatever its supervisor did
            _kill_if_ours(pid)
        if self.notify is not None:
            self.notify.close()
            self.notify = None
        return code

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def wait(self, timeout: float = 15) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def rewrite_config(self, change: Callable[[str], str]) -> None:
        text = self.config.read_text()
        # Written whole and renamed: a reload never reads half a file.
        scratch = self.config.with_suffix(".new")
        scratch.write_text(change(text))
        scratch.rename(self.config)

    def register(self, name: str, lifetime: int | None = None) -> tuple[str, str, str]:
        """A new VM: (address, vm_id, token)."""
        address = next_address()
        vm_id = f"vm-{name}-{os.getpid()}"
        token = self.cp.mint(vm_id, *(("--lifetime", str(lifetime)) if lifetime else ()))
        self.add_vm(name, address, token)
        return address, vm_id, token

    def admin_client(self) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.admin)), base_url="http://admin", timeout=10)

    def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        with self.admin_client() as admin:
            text = admin.get("/metrics").text
        return parse_metrics(text)

    def worker_pids(self) -> list[int]:
        pids = children_of(self.pid)
        self.seen_workers.update(pids)
        return pids

    def json_log(self) -> list[dict[str, object]]:
        """Every line of the service's output, each of which must be a JSON object."""
        entries = []
        for line in self.log_lines():
            entry = json.loads(line)
            assert isinstance(entry, dict), line
            entries.append(entry)
        return entries

    def messages(self) -> list[str]:
        return [str(entry["message"]) for entry in self.json_log() if "message" in entry]


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metric(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses: fields follow the last ")".
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry))
    return sorted(found)


def process_state(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "gone"
    state = stat[stat.rindex(")") + 2]
    return "gone" if state in ("Z", "X") else state  # a zombie has exited


def _kill_if_ours(pid: int) -> None:
    try:
        if b"metadata-proxy" not in Path(f"/proc/{pid}/cmdline").read_bytes():
            return  # gone, and the pid already taken by something else
        os.kill(pid, signal.SIGCONT)
        os.kill(pid, signal.SIGKILL)
    except (OSError, ProcessLookupError):
        pass


@pytest.fixture
def service(tmp_path: Path, cp: ControlPlane) -> Iterator[Callable[..., Service]]:
    """A factory of services, every one stopped at teardown."""
    started: list[Service] = []

    def make(*, top: str = "", extra: str = ECHO_ROUTE) -> Service:
        started.append(Service(tmp_path / f"svc{len(started)}", cp, top=top, extra=extra))
        return started[-1]

    yield make
    for svc in started:
        svc.stop()


def assert_clean_log(svc: Service, *secrets: str) -> list[dict[str, object]]:
    """Every output line is a JSON object and none holds a secret; returns the entries."""
    entries = svc.json_log()
    text = svc.log.read_text()
    for secret in secrets:
        assert secret not in text
    return entries


# -- socket activation ----------------------------------------------------------------------


def _activate_tool() -> str:
    path = shutil.which("systemd-socket-activate")
    if path is None:
        _missing("systemd-socket-activate is not installed")
    assert path is not None
    return path


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"], ids=["ipv4", "ipv6"])
def test_socket_activation_serves_guests_on_the_passed_socket(service: Callable[..., Service], host: str) -> None:
    activate = _activate_tool()
    if host == "::1":
        try:
            free_port("::1")
        except OSError:
            _missing("no IPv6 loopback address (::1) on this machine")
    svc = service()
    passed_port = free_port(host)
    bracketed = f"[{host}]" if ":" in host else host
    svc.start_service(activate=[activate, "-l", f"{bracketed}:{passed_port}"], trigger=(host, passed_port))
    vm_id = f"vm-activated-{os.getpid()}"
    svc.add_vm("activated", host, svc.cp.mint(vm_id))

    # The Host check accepts the passed socket's address, which is not in `listen`.
    transport = httpx.HTTPTransport(local_address=host, retries=0)
    with httpx.Client(base_url=f"http://{bracketed}:{passed_port}", transport=transport, timeout=10) as guest:
        response = guest.get("/runtime/whoami", headers=META)
    assert response.status_code == 200, response.text
    assert response.json()["vm_id"] == vm_id
    # `listen` was not bound: the passed socket replaced it.
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", svc.port), timeout=2).close()
    assert svc.stop() == 0
    messages = [m for m in svc.messages() if m.startswith("serving guests on")]
    assert messages and f"{bracketed}:{passed_port}" in messages[0]


# -- sd_notify, reload ----------------------------------------------------------------------


def test_notify_ready_reloading_ready_stopping_in_order(service: Callable[..., Service]) -> None:
    svc = service().start_service()  # READY=1 already received
    assert svc.notify is not None
    svc.signal(signal.SIGHUP)
    svc.notify.expect("RELOADING=1", "READY=1")
    assert any(line.startswith("MONOTONIC_USEC=") for line in svc.notify.received[-2].splitlines())
    svc.signal(signal.SIGTERM)
    svc.notify.expect("STOPPING=1")
    assert svc.wait() == 0
    svc.notify.nothing_more()


def test_reload_under_traffic_fails_nothing_and_applies_the_new_route(service: Callable[..., Service]) -> None:
    svc = service(extra='[[routes]]\nprefix = "/runtime/echo/"\n').start_service()
    assert svc.notify is not None
    address, _, token = svc.register("flow")
    with svc.guest(address) as guest:
        before = guest.get("/runtime/status/201")
    assert before.status_code == 404 and before.json()["error"]["code"] == "not_found"

    results: list[str] = []
    done = threading.Event()

    def flow(fresh_connections: bool) -> None:
        with svc.guest(address) as keepalive:
            for _ in range(2000):  # bounded, whatever happens
                if done.is_set():
                    return
                try:
                    if fresh_connections:
                        with svc.guest(address) as guest:
                            response = guest.get("/runtime/echo/flow", headers=META)
                    else:
                        response = keepalive.get("/runtime/echo/flow", headers=META)
                    results.append(str(response.status_code))
                except httpx.HTTPError as exc:
                    results.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=flow, args=(fresh,)) for fresh in (False, True)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(results) >= 20, what="traffic before the reload")
        # First reload: a new route. Second: a new upstream timeout, so a new upstream
        # client replaces the one the requests in flight are using.
        svc.rewrite_config(lambda text: text + '[[routes]]\nprefix = "/runtime/status/"\nguard = "none"\n')
        svc.signal(signal.SIGHUP)
        svc.notify.expect("RELOADING=1", "READY=1")
        mark = len(results)
        wait_until(lambda: len(results) >= mark + 20, what="traffic between the reloads")
        svc.rewrite_config(lambda text: text.replace("timeout = 3\n", "timeout = 4\n"))
        svc.signal(signal.SIGHUP)
        svc.notify.expect("RELOADING=1", "READY=1")
        mark = len(results)
        wait_until(lambda: len(results) >= mark + 20, what="traffic after the reloads")
    finally:
        done.set()
        for thread in threads:
            thread.join(timeout=30)
    assert len(results) >= 60
    assert set(results) == {"200"}, [r for r in results if r != "200"][:5]

    with svc.guest(address) as guest:
        after = guest.get("/runtime/status/201")  # no Metadata header: the new route's guard is none
    assert after.status_code == 201 and after.json() == {"status": 201}
    assert metric(svc.metrics(), "metadata_proxy_reloads_total", result="applied") == 2
    assert svc.stop() == 0
    entries = assert_clean_log(svc, token)
    assert sum(1 for entry in entries if str(entry.get("message", "")).startswith("reloaded ")) == 2


def test_reload_refuses_a_config_that_no_longer_validates(service: Callable[..., Service]) -> None:
    svc = service().start_service()
    assert svc.notify is not None
    address, vm_id, token = svc.register("steady")
    svc.rewrite_config(lambda text: text + "[cache]\nmax_bytes = -5\n")
    svc.signal(signal.SIGHUP)
    svc.notify.expect("RELOADING=1", "READY=1")  # still ready: the old config serves on

    with svc.guest(address) as guest:
        response = guest.get("/runtime/whoami", headers=META)
    assert response.status_code == 200 and response.json()["vm_id"] == vm_id
    refused = [e for e in svc.json_log() if str(e.get("message", "")).startswith("reload refused")]
    assert len(refused) == 1
    assert refused[0]["level"] == "error"
    assert "cache.max_bytes = -5" in str(refused[0]["message"])
    samples = svc.metrics()
    assert metric(samples, "metadata_proxy_reloads_total", result="refused") == 1
    assert metric(samples, "metadata_proxy_reloads_total", result="applied") == 0
    assert svc.stop() == 0
    assert_clean_log(svc, token)


# -- SIGTERM --------------------------------------------------------------------------------


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except ConnectionRefusedError:
        return True
    return False


def _drain_across_sigterm(svc: Service) -> None:
    """A slow request in flight at SIGTERM completes; new connections are refused at once;
    the admin endpoint answers during the drain; the process exits 0 well within the bound."""
    assert svc.notify is not None
    address, _, token = svc.register("draining")
    answer: dict[str, httpx.Response | Exception] = {}

    def slow() -> None:
        try:
            with svc.guest(address) as guest:
                answer["slow"] = guest.get("/runtime/slow?seconds=2", headers=META)
        except httpx.HTTPError as exc:
            answer["slow"] = exc

    thread = threading.Thread(target=slow)
    thread.start()
    try:
        wait_until(lambda: metric(svc.metrics(), "metadata_proxy_in_flight") == 1, what="the slow request in flight")
        started = time.monotonic()
        svc.signal(signal.SIGTERM)
        svc.notify.expect("STOPPING=1")
        wait_until(lambda: _refused(svc.port), timeout=2, what="new connections refused")
        assert "slow" not in answer  # still draining
        with svc.admin_client() as admin:
            assert admin.get("/healthz").status_code == 200
    finally:
        thread.join(timeout=30)
    response = answer["slow"]
    assert isinstance(response, httpx.Response), response
    assert response.status_code == 200 and response.json() == {"slept": 2}
    assert svc.wait(timeout=15) == 0
    assert time.monotonic() - started < 8  # the bound is 20 s; nothing waited for it
    messages = svc.messages()
    assert any(m.startswith("stopping: draining") for m in messages)
    assert messages[-1] == "stopped"
    assert_clean_log(svc, token)


def test_sigterm_drains_in_flight_and_refuses_new_connections(service: Callable[..., Service]) -> None:
    _drain_across_sigterm(service().start_service())


@pytest.mark.parametrize(
    "before", [b"", b"GET /runtime/whoami HTTP/1.1\r\nHost: 127.0.0.1\r\n"], ids=["nothing", "half a head"]
)
def test_a_connection_accepted_before_sigterm_gets_its_first_request_answered(
    service: Callable[..., Service], before: bytes
) -> None:
    """Under socket activation a restart (an upgrade) happens under traffic: a guest whose
    connection was accepted just before SIGTERM, its request still on the way (none of it
    yet, or the first part of its head), is answered, not closed unanswered; then the
    connection closes and the process exits 0."""
    request = b"GET /runtime/whoami HTTP/1.1\r\nHost: 127.0.0.1\r\nMetadata: true\r\n\r\n"
    svc = service().start_service()
    assert svc.notify is not None
    address, vm_id, token = svc.register("late")
    with socket.create_connection(("127.0.0.1", svc.port), timeout=10, source_address=(address, 0)) as late:
        wait_until(lambda: metric(svc.metrics(), "metadata_proxy_in_flight") == 0, what="the connection accepted")
        late.sendall(before)
        svc.signal(signal.SIGTERM)
        svc.notify.expect("STOPPING=1")
        # New connections refused: the server has stopped accepting and told every open
        # connection to shut down; only now does the late request leave.
        wait_until(lambda: _refused(svc.port), timeout=5, what="new connections refused")
        late.sendall(request[len(before) :])
        answer = b""
        while chunk := late.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 "), answer  # and the loop above ended: closed after it
    assert json.loads(body)["vm_id"] == vm_id
    assert svc.wait(timeout=15) == 0
    assert_clean_log(svc, token)


# -- the admin endpoint ---------------------------------------------------------------------


def test_admin_metrics_and_health_answer_on_the_admin_address_only(service: Callable[..., Service]) -> None:
    svc = service()
    admin_port = free_port()
    unix_admin, tcp_admin = f'admin_listen = "{svc.admin}"', f'admin_listen = "127.0.0.1:{admin_port}"'
    svc.rewrite_config(lambda text: text.replace(unix_admin, tcp_admin))
    svc.start_service()
    assert svc.notify is not None
    address, vm_id, token = svc.register("watched", lifetime=600)  # expires within the hour
    fingerprint = json.loads(svc.hostagent("vm", "show", "watched", "--json").stdout)["token_fingerprint"]
    with svc.guest(address) as guest:
        assert guest.get("/runtime/whoami", headers=META).status_code == 200
        assert guest.get("/runtime/whoami").json()["error"]["code"] == "missing_metadata_header"
        for path in ("/healthz", "/readyz", "/metrics"):
            on_guest = guest.get(path, headers=META)
            assert on_guest.status_code == 404 and on_guest.json()["error"]["code"] == "not_found"
    svc.signal(signal.SIGHUP)
    svc.notify.expect("RELOADING=1", "READY=1")

    with httpx.Client(base_url=f"http://127.0.0.1:{admin_port}", timeout=10) as admin:
        assert admin.get("/healthz").json() == {"status": "ok"}
        wait_until(lambda: admin.get("/readyz").status_code == 200, what="/readyz")
        text = admin.get("/metrics").text
    samples = parse_metrics(text)
    assert metric(samples, "metadata_proxy_requests_total", vm="watched", route="/runtime/", status="200") == 1
    assert metric(samples, "metadata_proxy_requests_total", vm="watched", route="/runtime/", status="400") == 1
    assert metric(samples, "metadata_proxy_refusals_total", code="missing_metadata_header") == 1
    assert metric(samples, "metadata_proxy_upstream_seconds_count") == 1
    assert metric(samples, "metadata_proxy_upstream_seconds_bucket", le="10.0") == 1
    assert ("metadata_proxy_in_flight", frozenset()) in samples
    assert metric(samples, "metadata_proxy_registry_vms") == 1
    assert metric(samples, "metadata_proxy_reloads_total", result="applied") == 1
    assert metric(samples, "metadata_proxy_tokens_expiring_soon") == 1
    assert metric(samples, "metadata_proxy_upstream_reachable") == 1
    assert token not in text and fingerprint not in text and vm_id not in text
    assert svc.stop() == 0
    assert_clean_log(svc, token)


# -- logs -----------------------------------------------------------------------------------


def test_every_log_line_is_json_and_none_holds_a_token(service: Callable[..., Service]) -> None:
    svc = service().start_service()
    assert svc.notify is not None
    address, vm_id, token = svc.register("journal")
    with svc.guest(address) as guest:
        ok = guest.get("/runtime/echo", headers=META)
        guest.get("/runtime/echo", headers={**META, "Authorization": f"Bearer {token}"})
        guest.get("/runtime/whoami", headers={"X-Metadata-Token": token})
    assert ok.status_code == 200
    svc.rewrite_config(lambda text: text + "surprise = 1\n")
    svc.signal(signal.SIGHUP)
    svc.notify.expect("RELOADING=1", "READY=1")
    assert svc.stop() == 0

    entries = assert_clean_log(svc, token, token.split(".")[1], token.split(".")[2])
    requests = [entry for entry in entries if "request_id" in entry]
    lifecycle = [entry for entry in entries if "message" in entry]
    assert len(requests) == 3
    assert {"time", "request_id", "vm", "vm_id", "method", "path", "status", "duration_ms", "upstream_status"} <= set(
        requests[0]
    )
    assert requests[0]["vm_id"] == vm_id
    messages = [str(entry["message"]) for entry in lifecycle]
    for expected in ("serving guests on", "reload refused", "stopping: draining", "stopped"):
        assert any(m.startswith(expected) for m in messages), (expected, messages)
    assert all({"time", "level", "message"} <= set(entry) for entry in lifecycle)


# -- check-config ---------------------------------------------------------------------------


CP_TABLE = '[control_plane]\nurl = "http://127.0.0.1:1"\n'


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('host_id = "h"\nworkers = 0\n' + CP_TABLE, "workers = 0"),
        ('host_id = "h"\n' + CP_TABLE + "[limits]\nburst = -1\n", "limits.burst = -1"),
        ('host_id = "h"\nlisten = ["169.254.169.254"]\n' + CP_TABLE, 'listen[0] = "169.254.169.254": has no port'),
        ('host_id = "h"\nadmin_listen = "10.0.0.1:9169"\n' + CP_TABLE, 'admin_listen = "10.0.0.1:9169"'),
        ('host_id = "h"\nsurprise = 1\n' + CP_TABLE, "surprise"),
        ('host_id = "h"\n[control_plane]\nurl = "ftp://cp"\n', 'control_plane.url = "ftp://cp"'),
        (
            'host_id = "h"\n[control_plane]\nurl = "https://cp"\nca_file = "/nonexistent/ca.pem"\n',
            'control_plane.ca_file = "/nonexistent/ca.pem"',
        ),
        ('host_id = "h"\n' + CP_TABLE + '[[routes]]\nprefix = "/x/"\nguard = "maybe"\n', 'routes[0].guard = "maybe"'),
        (CP_TABLE, "host_id"),
    ],
    ids=["workers", "burst", "listen", "admin", "unknown", "url", "ca_file", "guard", "missing"],
)
def test_check_config_names_the_key_and_value(tmp_path: Path, text: str, named: str) -> None:
    path = tmp_path / "config.toml"
    path.write_text(text)
    result = run("metadata-proxy", "check-config", "--config", str(path), check=False)
    assert result.returncode == 1
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert named in result.stderr and str(path) in result.stderr


def test_check_config_accepts_a_valid_config(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('host_id = "h"\nworkers = 2\n' + CP_TABLE + '[[routes]]\nprefix = "/v1/"\nguard = "session"\n')
    result = run("metadata-proxy", "check-config", "--config", str(path), check=False)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout and result.stderr == ""


# -- workers --------------------------------------------------------------------------------

TWO_WORKERS = "workers = 2\n"


def start_workers(make: Callable[..., Service], **kwargs: str) -> tuple[Service, list[int]]:
    svc = make(top=TWO_WORKERS, **kwargs).start_service()  # READY=1 only once both are ready
    pids = svc.worker_pids()
    assert len(pids) == 2, pids
    return svc, pids


class OnlyWorker:
    """Every worker but `pid` stopped (SIGSTOP): new connections go to `pid`."""

    def __init__(self, svc: Service, pid: int) -> None:
        self.others = [other for other in svc.worker_pids() if other != pid]

    def __enter__(self) -> None:
        for other in self.others:
            os.kill(other, signal.SIGSTOP)
        for other in self.others:

            def stopped(pid: int = other) -> bool:
                return process_state(pid) in ("T", "t")

            wait_until(stopped, what=f"worker {other} stopped")

    def __exit__(self, *exc: object) -> None:
        for other in self.others:
            os.kill(other, signal.SIGCONT)


def test_workers_share_the_sockets_and_the_session_key(service: Callable[..., Service]) -> None:
    svc, (first, second) = start_workers(service, extra='[[routes]]\nprefix = "/runtime/"\nguard = "session"\n')
    address, vm_id, token = svc.register("sessions")
    with OnlyWorker(svc, first), svc.guest(address) as guest:
        issued = guest.put("/metadata/v1/token", headers={"X-Metadata-Token-TTL-Seconds": "60", **META})
    assert issued.status_code == 200, issued.text
    seen: dict[int, str] = {}
    for pid in (first, second):
        with OnlyWorker(svc, pid), svc.guest(address) as guest:
            response = guest.get("/runtime/whoami", headers={"X-Metadata-Token": issued.text})
            assert response.status_code == 200, response.text
            seen[pid] = response.json()["vm_id"]
    assert seen == {first: vm_id, second: vm_id}
    samples = svc.metrics()  # aggregated over both workers
    assert metric(samples, "metadata_proxy_requests_total", vm="sessions", route="/runtime/", status="200") == 2
    assert metric(samples, "metadata_proxy_registry_vms") == 1
    assert metric(samples, "metadata_proxy_in_flight") == 0
    wait_until(lambda: metric(svc.metrics(), "metadata_proxy_upstream_reachable") == 1, what="the probe")
    assert svc.stop() == 0
    assert_clean_log(svc, token, issued.text)


def test_workers_registry_changes_hold_in_every_worker(service: Callable[..., Service]) -> None:
    svc, pids = start_workers(service)
    address, old_id, token = svc.register("reused")
    open_sockets: dict[int, socket.socket] = {}
    try:
        for pid in pids:
            with OnlyWorker(svc, pid):
                with svc.guest(address) as guest:
                    assert guest.get("/runtime/whoami", headers=META).json()["vm_id"] == old_id
                # An idle keep-alive connection held by this worker.
                sock = socket.create_connection(("127.0.0.1", svc.port), source_address=(address, 0), timeout=5)
                open_sockets[pid] = sock
                head = f"GET /metadata/v1/instance HTTP/1.1\r\nHost: 127.0.0.1:{svc.port}\r\nMetadata: true\r\n\r\n"
                sock.sendall(head.encode())
                answer = b""
                while not answer.endswith(b"}"):
                    answer += sock.recv(65536)
                assert answer.startswith(b"HTTP/1.1 200")
        svc.hostagent("vm", "remove", "reused")
        # Every worker answers the next request on its connection from the removed VM's
        # address 403 unknown_vm, then closes it...
        for sock in open_sockets.values():
            sock.settimeout(5)
            sock.sendall(head.encode())
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 403") and b"unknown_vm" in answer, answer
            assert b"connection: close" in answer.lower()
        # ...and answers every new one as unknown, whichever worker takes it.
        codes: list[object] = []
        for pid in pids:
            with OnlyWorker(svc, pid):
                for _ in range(10):
                    with svc.guest(address) as guest:
                        codes.append(guest.get("/runtime/whoami", headers=META).json()["error"]["code"])
        for _ in range(40):
            with svc.guest(address) as guest:
                codes.append(guest.get("/runtime/whoami", headers=META).json()["error"]["code"])
        assert codes == ["unknown_vm"] * 60
        # The address handed on to a new VM never carries the old identity.
        svc.add_vm("successor", address, svc.cp.mint("vm-successor"))
        ids = []
        for pid in pids:
            with OnlyWorker(svc, pid), svc.guest(address) as guest:
                ids.append(guest.get("/runtime/whoami", headers=META).json()["vm_id"])
        for _ in range(20):
            with svc.guest(address) as guest:
                ids.append(guest.get("/runtime/whoami", headers=META).json()["vm_id"])
        assert ids == ["vm-successor"] * 22
    finally:
        for sock in open_sockets.values():
            sock.close()
    assert svc.stop() == 0
    assert_clean_log(svc, token)


def test_workers_notify_reload_and_count_once(service: Callable[..., Service]) -> None:
    svc, pids = start_workers(service)
    assert svc.notify is not None
    svc.notify.nothing_more()  # one READY=1 for the service, not one per worker
    svc.rewrite_config(lambda text: text.replace(ECHO_ROUTE, ECHO_ROUTE + 'guard = "none"\n'))
    svc.signal(signal.SIGHUP)
    svc.notify.expect("RELOADING=1", "READY=1")
    address, _, _ = svc.register("reloaded")
    for pid in pids:  # both workers took the new route
        with OnlyWorker(svc, pid), svc.guest(address) as guest:
            response = guest.get("/runtime/status/201")  # no Metadata header: the guard is now none
            assert response.status_code == 201, response.text
    svc.rewrite_config(lambda text: text + "[cache]\nmax_entries_per_vm = -1\n")
    svc.signal(signal.SIGHUP)
    svc.notify.expect("RELOADING=1", "READY=1")
    samples = svc.metrics()
    assert metric(samples, "metadata_proxy_reloads_total", result="applied") == 1
    assert metric(samples, "metadata_proxy_reloads_total", result="refused") == 1
    assert svc.worker_pids() == pids
    refused = [m for m in svc.messages() if m.startswith("reload refused")]
    assert len(refused) == 1 and "cache.max_entries_per_vm = -1" in refused[0]


def test_workers_drain_on_sigterm(service: Callable[..., Service]) -> None:
    svc, pids = start_workers(service)
    _drain_across_sigterm(svc)
    wait_until(lambda: all(process_state(pid) == "gone" for pid in pids), timeout=5, what="workers gone")


def test_workers_restart_when_one_dies_and_give_up_when_they_keep_dying(service: Callable[..., Service]) -> None:
    svc, pids = start_workers(service)
    address, vm_id, _ = svc.register("survivor")
    served = {"vm": "survivor", "route": "/runtime/", "status": "200"}
    with svc.guest(address) as guest:
        assert guest.get("/runtime/whoami", headers=META).status_code == 200
    # Counted (after the answer) before the worker that served it may be the one killed.
    wait_until(lambda: metric(svc.metrics(), "metadata_proxy_requests_total", **served) == 1, what="the count")
    os.kill(pids[0], signal.SIGKILL)  # the first worker serves the admin endpoint
    wait_until(lambda: len(set(svc.worker_pids()) - set(pids)) == 1, what="a replacement worker")
    for _ in range(10):
        with svc.guest(address) as guest:
            assert guest.get("/runtime/whoami", headers=META).json()["vm_id"] == vm_id
    # Counted by the worker that served, the dead one's included, and summed.
    wait_until(lambda: metric(svc.metrics(), "metadata_proxy_requests_total", **served) == 11, what="the counts")
    assert any("died" in m and "restarting" in m for m in svc.messages())

    # A worker that keeps dying: the supervisor stops restarting and fails the service.
    deadline = time.monotonic() + 20
    while svc.process is not None and svc.process.poll() is None and time.monotonic() < deadline:
        current = svc.worker_pids()
        if current:
            os.kill(current[-1], signal.SIGKILL)
        time.sleep(0.05)
    assert svc.wait(timeout=10) == 1
    messages = svc.messages()
    assert sum("restarting it" in m for m in messages) == 5  # RESTART_LIMIT within the minute
    assert sum("giving up" in m for m in messages) == 1
    assert all(process_state(pid) == "gone" for pid in svc.seen_workers)  # stopped and reaped


def test_workers_stop_when_the_supervisor_is_killed(service: Callable[..., Service]) -> None:
    svc, pids = start_workers(service)
    svc.signal(signal.SIGKILL)
    svc.wait()
    wait_until(lambda: all(process_state(pid) == "gone" for pid in pids), timeout=5, what="orphaned workers to exit")
