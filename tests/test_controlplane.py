"""The reference runtime API through httpx.ASGITransport, and the real `controlplane` CLI in subprocesses."""

from __future__ import annotations

import hashlib
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from controlplane.app import create_app
from controlplane.cli import main
from controlplane.tokens import Secrets, Verifier, fingerprint, mint
from tests.controlplane_server import CountRequests, counted, extra_routes

SECRET = b"reference-api-secret-".ljust(48, b"x")
OTHER = b"some-other-secret-".ljust(48, b"y")
CONTROLPLANE = Path(sys.executable).parent / "controlplane"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def app() -> CountRequests:
    verifier = Verifier(Secrets([("k1", SECRET)]), vm_exists=lambda vm_id: vm_id != "vm-gone")
    return counted(create_app(verifier, routes=extra_routes()))


@pytest.fixture
async def client(app: CountRequests) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, client=("192.0.2.10", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://control-plane") as client:
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["error"] and sorted(body["error"]) == ["code", "message"]
    assert body["error"]["code"] == code and body["error"]["message"]


# --- the app through ASGITransport -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_whoami(client: httpx.AsyncClient) -> None:
    headers = bearer(mint("vm-1", ("k1", SECRET))) | {"X-Metadata-Proxy-Host": "host-a", "X-Forwarded-For": "10.9.0.2"}
    response = await client.get("/runtime/whoami", headers=headers)
    assert response.status_code == 200
    assert response.json() == {"vm_id": "vm-1", "host_id": "host-a", "address": "10.9.0.2"}
    response = await client.get("/runtime/whoami", headers=bearer(mint("vm-1", ("k1", SECRET))))
    assert response.json() == {"vm_id": "vm-1", "host_id": None, "address": None}


@pytest.mark.anyio
@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "Basic dm0tMTpwdw==",
        "Bearer",
        "Bearer not-a-jwt",
        f"Bearer {mint('vm-1', ('k1', OTHER))}",  # wrongly signed
        f"Bearer {mint('vm-1', ('k9', SECRET))}",  # unknown kid
        f"Bearer {mint('vm-1', (None, SECRET))}",  # no kid, and no unnamed secret
        f"Bearer {mint('vm-1', ('k1', SECRET), lifetime=1, now=int(time.time()) - 300)}",  # expired
        f"Bearer {mint('vm-1', ('k1', SECRET), now=int(time.time()) + 300)}",  # future-dated
    ],
)
async def test_invalid_token(app: CountRequests, client: httpx.AsyncClient, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    for path in ["/runtime/whoami", "/runtime/echo", "/runtime/status/200", "/runtime/slow?seconds=5"]:
        response = await client.get(path, headers=headers)
        assert_error(response, 401, "invalid_token")
        assert response.headers["www-authenticate"].startswith("Bearer")
        if credentials := (authorization or "").partition(" ")[2]:
            assert credentials not in response.text
    assert app.seen == 4


@pytest.mark.anyio
async def test_two_authorization_headers_refused(client: httpx.AsyncClient) -> None:
    token = mint("vm-1", ("k1", SECRET))
    headers = [("Authorization", f"Bearer {token}"), ("Authorization", f"Bearer {token}")]
    assert_error(await client.get("/runtime/whoami", headers=headers), 401, "invalid_token")


@pytest.mark.anyio
async def test_unknown_vm(client: httpx.AsyncClient) -> None:
    response = await client.get("/runtime/whoami", headers=bearer(mint("vm-gone", ("k1", SECRET))))
    assert_error(response, 403, "unknown_vm")


@pytest.mark.anyio
async def test_not_found_and_method_not_allowed(client: httpx.AsyncClient) -> None:
    headers = bearer(mint("vm-1", ("k1", SECRET)))
    for path in ["/", "/runtime/", "/runtime/whoami/", "/runtime/nope", "/metadata/v1/instance"]:
        assert_error(await client.get(path, headers=headers), 404, "not_found")
    response = await client.post("/runtime/whoami", headers=headers)
    assert_error(response, 405, "method_not_allowed")
    assert "GET" in response.headers["allow"]


@pytest.mark.anyio
async def test_echo_shows_request_and_hides_token(client: httpx.AsyncClient) -> None:
    token = mint("vm-1", ("k1", SECRET))
    body = b"\x00payload\xff" * 100
    response = await client.request(
        "PROPFIND",
        "/runtime/echo/a%2Fb/%7Ex;p=1?y=%20&x=1&x=2&z",
        headers=bearer(token) | {"X-Custom": "one", "X-Forwarded-For": "10.9.0.2"},
        content=body,
    )
    assert response.status_code == 200
    echo = response.json()
    assert echo["method"] == "PROPFIND"
    assert echo["raw_path"] == "/runtime/echo/a%2Fb/%7Ex;p=1"
    assert echo["query_string"] == "y=%20&x=1&x=2&z"
    assert ["x-custom", "one"] in echo["headers"] and ["x-forwarded-for", "10.9.0.2"] in echo["headers"]
    assert ["authorization", f"Bearer {fingerprint(token)}"] in echo["headers"]
    assert echo["authorization_count"] == 1 and echo["token_fingerprint"] == fingerprint(token)
    assert echo["vm_id"] == "vm-1"
    assert echo["body_length"] == len(body) and echo["body_sha256"] == hashlib.sha256(body).hexdigest()
    assert not any(part in response.text for part in token.split("."))


@pytest.mark.anyio
async def test_echo_bare_path(client: httpx.AsyncClient) -> None:
    response = await client.get("/runtime/echo", headers=bearer(mint("vm-1", ("k1", SECRET))))
    assert response.json()["raw_path"] == "/runtime/echo" and response.json()["body_length"] == 0


@pytest.mark.anyio
async def test_status_passthrough(client: httpx.AsyncClient) -> None:
    headers = bearer(mint("vm-1", ("k1", SECRET)))
    for code in [200, 201, 418, 500, 503]:
        response = await client.post(f"/runtime/status/{code}", headers=headers)
        assert response.status_code == code and response.json() == {"status": code}
    response = await client.get("/runtime/status/204", headers=headers)
    assert response.status_code == 204 and response.content == b""
    assert_error(await client.get("/runtime/status/99", headers=headers), 404, "not_found")
    assert_error(await client.get("/runtime/status/600", headers=headers), 404, "not_found")


@pytest.mark.anyio
async def test_slow(client: httpx.AsyncClient) -> None:
    headers = bearer(mint("vm-1", ("k1", SECRET)))
    started = time.monotonic()
    response = await client.get("/runtime/slow", params={"seconds": "0.2"}, headers=headers)
    assert response.json() == {"slept": 0.2} and time.monotonic() - started >= 0.2
    for bad in ["-1", "nan", "soon", "inf"]:
        assert_error(await client.get("/runtime/slow", params={"seconds": bad}, headers=headers), 400, "bad_request")


@pytest.mark.anyio
async def test_request_counter(app: CountRequests, client: httpx.AsyncClient) -> None:
    assert (await client.get("/_test/requests")).json() == {"count": 0}
    await client.get("/nowhere")  # not the runtime API (the proxy's readiness probe is HEAD /)
    await client.get("/runtime/nowhere")
    await client.get("/runtime/whoami")
    await client.get("/runtime/whoami", headers=bearer(mint("vm-1", ("k1", SECRET))))
    assert (await client.get("/_test/requests")).json() == {"count": 3}  # its own reads are not counted
    assert app.seen == 3


# --- the real CLI ------------------------------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(CONTROLPLANE), *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret"
    path.write_bytes(b"\n" + SECRET + b"\n")
    return path


@contextmanager
def serving(tmp_path: Path, *args: str) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    """A real `controlplane serve`: yields its base URL (from its one stderr line), the process and its stderr file."""
    log = tmp_path / "serve.stderr"
    with log.open("wb") as stderr:
        proc = subprocess.Popen([str(CONTROLPLANE), "serve", *args], stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 20
        while not (found := re.search(rb"listening on (http://\S+)\n", log.read_bytes())):
            assert proc.poll() is None, f"serve exited: {log.read_text()}"
            assert time.monotonic() < deadline, "serve did not start within 20 s"
            time.sleep(0.05)
        yield found.group(1).decode(), proc, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_mint_prints_one_verifiable_token(secret_file: Path, tmp_path: Path) -> None:
    (tmp_path / "old").write_bytes(OTHER)
    result = run_cli("mint", "vm-7", "--secret-file", f"k2:{secret_file}", "--secret-file", f"k1:{tmp_path / 'old'}")
    assert result.returncode == 0 and result.stderr == ""
    assert re.fullmatch(r"[\w-]+\.[\w-]+\.[\w-]+\n", result.stdout)
    claims = Verifier(Secrets([("k2", SECRET)])).verify(result.stdout.strip())
    assert claims.sub == "vm-7" and claims.kid == "k2" and claims.exp is None
    assert SECRET.decode() not in result.stdout

    result = run_cli("mint", "vm-7", "--secret-file", str(secret_file), "--lifetime", "120")
    claims = Verifier(Secrets([(None, SECRET)])).verify(result.stdout.strip())
    assert claims.kid is None and claims.exp == claims.iat + 120

    # python -m controlplane is the same command line.
    module = subprocess.run(
        [sys.executable, "-m", "controlplane", "mint", "vm-7", "--secret-file", str(secret_file)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert module.returncode == 0 and Verifier(Secrets([(None, SECRET)])).verify(module.stdout.strip()).sub == "vm-7"


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "[::1]:0"])
def test_serve_answers_whoami(secret_file: Path, tmp_path: Path, listen: str) -> None:
    with serving(tmp_path, "--listen", listen, "--secret-file", f"k1:{secret_file}") as (url, proc, log):
        token = mint("any-vm", ("k1", SECRET))
        response = httpx.get(f"{url}/runtime/whoami", headers=bearer(token) | {"X-Forwarded-For": "10.9.0.2"})
        assert response.status_code == 200
        assert response.json() == {"vm_id": "any-vm", "host_id": None, "address": "10.9.0.2"}
        assert_error(httpx.get(f"{url}/runtime/whoami", headers=bearer(token + "x")), 401, "invalid_token")
        proc.terminate()  # uvicorn drains, then dies by the re-raised SIGTERM (a clean stop)
        assert proc.wait(timeout=10) in (0, -signal.SIGTERM)
    output = log.read_text()
    assert output.count("\n") == 1 and output.startswith(f"controlplane: listening on http://{listen[:-2]}:")
    assert token not in output and SECRET.decode() not in output


def test_serve_honours_vms_file(secret_file: Path, tmp_path: Path) -> None:
    vms = tmp_path / "vms"
    vms.write_text("# VMs on this control plane\nvm-1\n\nvm-2\n")
    args = ["--listen", "127.0.0.1:0", "--secret-file", str(secret_file), "--vms", str(vms)]
    with serving(tmp_path, *args) as (url, _, _):
        with httpx.Client(base_url=url, timeout=10) as client:

            def whoami(vm_id: str) -> httpx.Response:
                return client.get("/runtime/whoami", headers=bearer(mint(vm_id, (None, SECRET))))

            assert whoami("vm-1").json()["vm_id"] == "vm-1"
            assert_error(whoami("vm-3"), 403, "unknown_vm")
            vms.write_text("vm-2\n")  # vm-1 destroyed while the server runs
            assert_error(whoami("vm-1"), 403, "unknown_vm")
            assert whoami("vm-2").status_code == 200
            vms.unlink()  # an unreadable list counts no VM
            assert_error(whoami("vm-2"), 403, "unknown_vm")


def test_serve_max_age(secret_file: Path, tmp_path: Path) -> None:
    args = ["--listen", "127.0.0.1:0", "--secret-file", str(secret_file), "--max-age", "60"]
    with serving(tmp_path, *args) as (url, _, _):
        old = mint("vm-1", (None, SECRET), now=int(time.time()) - 120)
        assert_error(httpx.get(f"{url}/runtime/whoami", headers=bearer(old)), 401, "invalid_token")
        assert httpx.get(f"{url}/runtime/whoami", headers=bearer(mint("vm-1", (None, SECRET)))).status_code == 200


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["bogus"],
        ["serve"],
        ["serve", "--secret-file", "s"],
        ["serve", "--listen", "127.0.0.1", "--secret-file", "s"],
        ["serve", "--listen", "127.0.0.1:99999", "--secret-file", "s"],
        ["serve", "--listen", ":80", "--secret-file", "s"],
        ["serve", "--listen", "127.0.0.1:0", "--secret-file", "s", "--max-age", "0"],
        ["mint", "--secret-file", "s"],
        ["mint", "vm-1"],
        ["mint", "vm-1", "--secret-file", "s", "--lifetime", "-5"],
        ["mint", "vm-1", "--secret-file", "s", "--token", "x"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and "usage: controlplane" in captured.err


def test_usage_error_exit_2_from_the_real_command() -> None:
    result = run_cli("mint", "vm-1")
    assert result.returncode == 2 and "--secret-file" in result.stderr and result.stdout == ""


@pytest.mark.parametrize("command", [["mint", "vm-1"], ["serve", "--listen", "127.0.0.1:0"]])
def test_missing_secret_file_exits_1_with_one_line(tmp_path: Path, command: list[str]) -> None:
    missing = tmp_path / "missing"
    result = run_cli(*command, "--secret-file", f"k1:{missing}")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == f"controlplane: cannot read secret file {missing}: No such file or directory\n"


def test_failures_exit_1_with_one_line(secret_file: Path, tmp_path: Path) -> None:
    (tmp_path / "short").write_text("too-short\n")
    result = run_cli("mint", "vm-1", "--secret-file", str(tmp_path / "short"))
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "too-short" not in result.stderr
    assert "HS256 needs at least 32" in result.stderr

    result = run_cli("serve", "--listen", "127.0.0.1:0", "--secret-file", str(secret_file), "--vms", "/nonexistent")
    assert result.returncode == 1
    assert result.stderr == "controlplane: cannot read VM list /nonexistent: No such file or directory\n"

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = run_cli("serve", "--listen", f"127.0.0.1:{port}", "--secret-file", str(secret_file))
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"controlplane: cannot listen on 127.0.0.1:{port}: ")
