"""The control plane over TLS (controlplane/tls.py): a real `controlplane serve --tls-cert --tls-key
[--client-ca]` with certificates from a private CA. With `--client-ca` the host is its client
certificate's CN (else first DNS name), `X-Metadata-Proxy-Host` is checked against it (403
`host_mismatch` on every route) and identity tokens carry it as `host`; without, the header is
informational and tokens have no `host`. Through the real proxy, the README's smallest config
(`ca_file`, `client_cert`) works as written.

uvicorn 0.54 does not put the client certificate in the ASGI scope; tls.TLSProtocol does. The
tests that read the host from the certificate (whoami without the header, the `host` claim)
are what pins that seam, and the app's refusal when a required certificate is missing from the
scope is tested on its own.
"""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest
import trustme

from controlplane.app import create_app
from controlplane.identity import keygen
from controlplane.tokens import Secrets, Verifier, mint
from tests.harness import BIN, Proxy, TLSControlPlane, running

META = {"Metadata": "true"}


def bearer(cp: TLSControlPlane, vm_id: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {mint(vm_id, Secrets.from_specs([str(cp.secret_file)]))}"}


def error_code(response: httpx.Response) -> str:
    code: str = response.json()["error"]["code"]
    return code


def identity_options(workdir: Path) -> tuple[str, ...]:
    key = workdir / "signing.pem"
    keygen(key)
    return ("--signing-key", str(key), "--issuer", "https://cp.example")


def claims_of(token: str) -> dict[str, object]:
    claims: dict[str, object] = jwt.decode(token, options={"verify_signature": False})
    return claims


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def mtls(tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA) -> Iterator[TLSControlPlane]:
    """Client certificates required; ours names hv-042 as its CN and another name as its DNS SAN."""
    workdir = tmp_path_factory.mktemp("mtls")
    server = TLSControlPlane(
        workdir, ca, require_client_cert=True, host="san.example", common_name="hv-042", extra=identity_options(workdir)
    ).start()
    with running(server):
        yield server


@pytest.fixture(scope="module")
def tls_only(tmp_path_factory: pytest.TempPathFactory, ca: trustme.CA) -> Iterator[TLSControlPlane]:
    workdir = tmp_path_factory.mktemp("tls-only")
    server = TLSControlPlane(workdir, ca, require_client_cert=False, extra=identity_options(workdir)).start()
    with running(server):
        yield server


def test_host_is_the_certificates_cn(mtls: TLSControlPlane) -> None:
    with mtls.client() as client:
        # No header at all: the host still comes from the certificate, so it reached the app.
        anonymous = client.get("/runtime/whoami", headers=bearer(mtls, "vm-1"))
        named = client.get("/runtime/whoami", headers=bearer(mtls, "vm-1") | {"X-Metadata-Proxy-Host": "hv-042"})
    assert anonymous.status_code == 200 and anonymous.json()["host_id"] == "hv-042"
    assert named.status_code == 200 and named.json()["host_id"] == "hv-042"


def test_host_is_the_first_dns_name_without_a_cn(tmp_path: Path, ca: trustme.CA) -> None:
    server = TLSControlPlane(tmp_path, ca, require_client_cert=True, host="host-by-san").start()
    with running(server), server.client() as client:
        response = client.get("/runtime/whoami", headers=bearer(server, "vm-1"))
    assert response.status_code == 200 and response.json()["host_id"] == "host-by-san"


@pytest.mark.parametrize(
    "target", ["/runtime/whoami", "/runtime/identity?audience=a", "/runtime/echo/x", "/runtime/no-such-route"]
)
def test_a_header_naming_another_host_is_403_host_mismatch(mtls: TLSControlPlane, target: str) -> None:
    with mtls.client() as client:
        for lie in (["hv-043"], ["hv-042", "hv-043"], ["san.example"]):
            headers = [*bearer(mtls, "vm-1").items(), *(("X-Metadata-Proxy-Host", value) for value in lie)]
            response = client.get(target, headers=headers)
            assert response.status_code == 403 and error_code(response) == "host_mismatch", (target, lie)
            assert "eyJ" not in response.text


def test_identity_tokens_carry_the_proven_host(mtls: TLSControlPlane, tls_only: TLSControlPlane) -> None:
    with mtls.client() as client:
        proven = client.get("/runtime/identity?audience=a", headers=bearer(mtls, "vm-1"))
    assert proven.status_code == 200 and claims_of(proven.text)["host"] == "hv-042"
    with tls_only.client() as client:
        # The header alone proves nothing: no host claim, whatever it says.
        unproven = client.get(
            "/runtime/identity?audience=a", headers=bearer(tls_only, "vm-1") | {"X-Metadata-Proxy-Host": "hv-042"}
        )
        whoami = client.get("/runtime/whoami", headers=bearer(tls_only, "vm-1") | {"X-Metadata-Proxy-Host": "any"})
    assert unproven.status_code == 200 and "host" not in claims_of(unproven.text)
    assert whoami.json()["host_id"] == "any"  # informational, as over plain HTTP


def test_connections_without_a_trusted_client_certificate_are_refused(mtls: TLSControlPlane, tmp_path: Path) -> None:
    with mtls.client(with_cert=False) as client, pytest.raises(httpx.TransportError):
        client.get("/runtime/whoami", headers=bearer(mtls, "vm-1"))
    stranger = trustme.CA().issue_cert("hv-042", common_name="hv-042")
    stranger.cert_chain_pems[0].write_to_path(str(tmp_path / "stranger.pem"))
    stranger.private_key_pem.write_to_path(str(tmp_path / "stranger.key"))
    context = ssl.create_default_context(cafile=str(mtls.ca_file))
    context.load_cert_chain(str(tmp_path / "stranger.pem"), str(tmp_path / "stranger.key"))
    with httpx.Client(verify=context, timeout=5) as client, pytest.raises(httpx.TransportError):
        client.get(f"{mtls.url}/runtime/whoami", headers=bearer(mtls, "vm-1"))


def test_public_documents_need_no_client_certificate_only_tls(tls_only: TLSControlPlane) -> None:
    with tls_only.client(with_cert=False) as client:
        response = client.get("/.well-known/jwks.json")
    assert response.status_code == 200 and response.json()["keys"]


@pytest.mark.anyio
async def test_a_required_certificate_missing_from_the_scope_fails_closed() -> None:
    secret = b"fail-closed-secret-".ljust(48, b"x")
    # What the app sees when the server did not pass the certificate on (no TLS extension).
    app = create_app(Verifier(Secrets([(None, secret)])), require_client_certificate=True)
    transport = httpx.ASGITransport(app=app, client=("192.0.2.10", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="https://cp") as client:
        response = await client.get(
            "/runtime/whoami", headers={"Authorization": f"Bearer {mint('vm-1', (None, secret))}"}
        )
    assert response.status_code == 500 and error_code(response) == "internal_error"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_bad_tls_files_fail_in_one_line(tmp_path: Path, ca: trustme.CA) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"x" * 48)
    cert = tmp_path / "cert.pem"
    ca.issue_cert("127.0.0.1").cert_chain_pems[0].write_to_path(str(cert))
    other_key = tmp_path / "other.key"
    ca.issue_cert("127.0.0.1").private_key_pem.write_to_path(str(other_key))
    cases = [
        (["--tls-cert", str(tmp_path / "absent.pem"), "--tls-key", str(other_key)], "absent.pem"),
        (["--tls-cert", str(cert), "--tls-key", str(other_key)], "cert.pem"),  # a key of another certificate
        (["--tls-cert", str(cert), "--tls-key", str(other_key), "--client-ca", str(secret)], "--"),
    ]
    for args, named in cases:
        result = subprocess.run(
            [str(BIN / "controlplane"), "serve", "--listen", "127.0.0.1:0", "--secret-file", str(secret), *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert result.returncode == 1, result.stderr
        assert result.stderr.count("\n") == 1 and named in result.stderr and "Traceback" not in result.stderr


# --- through the real proxy ------------------------------------------------------------------


def test_the_readmes_smallest_config_works_with_the_reference_control_plane(
    tmp_path: Path, mtls: TLSControlPlane
) -> None:
    # host_id, url, ca_file, client_cert, client_key: the README's file, with this machine's paths.
    proxy = Proxy(tmp_path, mtls.url, mtls.toml(client_cert=True))
    proxy.config.write_text(proxy.config.read_text().replace('host_id = "host-test"', 'host_id = "hv-042"'))
    proxy.start()
    with running(proxy):
        proxy.add_vm("readme", "127.0.0.61", mtls.mint("vm-readme"))
        with proxy.guest("127.0.0.61") as guest:
            whoami = guest.get("/runtime/whoami", headers=META)
            token = guest.get("/runtime/identity", params={"audience": "https://vault.example"}, headers=META)
    assert whoami.status_code == 200, whoami.text
    assert whoami.json() == {"vm_id": "vm-readme", "host_id": "hv-042", "address": "127.0.0.61"}
    assert token.status_code == 200 and token.headers["cache-control"] == "no-store"
    assert claims_of(token.text)["host"] == "hv-042" and claims_of(token.text)["sub"] == "vm-readme"


def test_a_proxy_whose_host_id_is_not_its_certificates_is_refused(tmp_path: Path, mtls: TLSControlPlane) -> None:
    proxy = Proxy(tmp_path, mtls.url, mtls.toml(client_cert=True)).start()  # host_id "host-test", cert hv-042
    with running(proxy):
        proxy.add_vm("liar", "127.0.0.62", mtls.mint("vm-liar"))
        with proxy.guest("127.0.0.62") as guest:
            response = guest.get("/runtime/whoami", headers=META)
    assert response.status_code == 403 and error_code(response) == "host_mismatch"
