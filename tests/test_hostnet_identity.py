"""Identity tokens through the whole host path in real namespaces (root only): guests behind
their VMs' namespaces call the real proxy on the metadata addresses, over IPv4 and IPv6, with
`curl` as a guest author would, on the route the example config gives the endpoint:

    [[routes]]  prefix = "/runtime/identity/"  guard = "session"  privileged_port = true

Only a caller on a source port below 1024 (root in the guest: `curl --local-port 600-700`)
gets a token; the same call from an ephemeral port is 403 `unprivileged_port` and never
reaches the control plane. Every module run twice: against a control plane that requires the
proxy's client certificate (tokens carry `host`) and one over plain HTTP (they do not).

The topology is test_hostnet.py's (see test_hostnet_proxy.py for the plain whoami path).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import trustme
from joserfc import jwk as jose_jwk
from joserfc import jwt as jose_jwt

from controlplane.identity import keygen
from tests.harness import ControlPlane, Proxy, TLSControlPlane, running
from tests.test_hostnet import HOSTAGENT, META4, META6, Topology, VMNet, leak_guard, lo_addresses, sh, tables

pytestmark = pytest.mark.root

ROUTES = """
[[routes]]
prefix = "/runtime/"

[[routes]]
prefix = "/runtime/identity/"
guard = "session"
privileged_port = true
"""
PRIVILEGED = ("--local-port", "600-700")  # curl binds a source port in this range: root in the guest


@dataclass
class Answer:
    status: int  # 0: nothing answered
    content_type: str
    body: str

    def code(self) -> str:
        code: str = json.loads(self.body)["error"]["code"]
        return code


class IdentityHost:
    def __init__(self, cp: ControlPlane, proxy: Proxy, vms_file: Path, mtls: bool) -> None:
        self.cp = cp
        self.proxy = proxy
        self.vms_file = vms_file
        self.mtls = mtls

    def add(self, name: str, vm: VMNet, vm_id: str, scope: str | None = None) -> None:
        line = json.dumps({"vm_id": vm_id, "scope": scope}) if scope else vm_id
        with self.vms_file.open("a") as file:
            file.write(line + "\n")
        result = sh(
            HOSTAGENT, "--registry", str(self.proxy.registry), "vm", "add", name, "--address", vm.addr4,
            "--address", vm.addr6, "--netns", vm.vmns, "--token-file", "-", stdin=self.cp.mint(vm_id), check=False,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr

    def verify(self, token: str, audience: str, nonce: str | None) -> dict[str, Any]:
        """joserfc with the key set fetched from the control plane, as a relying party would."""
        if isinstance(self.cp, TLSControlPlane):
            # --client-ca asks every connection for a certificate, the public documents' too.
            with self.cp.client() as client:
                key_set = client.get("/.well-known/jwks.json").json()
        else:
            key_set = httpx.get(f"{self.cp.url}/.well-known/jwks.json", timeout=5).json()
        decoded = jose_jwt.decode(token, jose_jwk.KeySet.import_key_set(key_set), algorithms=["ES256"])
        options: dict[str, Any] = {"iss": {"essential": True, "value": self.cp.url}, "aud": {"value": audience}}
        if nonce is not None:
            options["nonce"] = {"essential": True, "value": nonce}
        jose_jwt.JWTClaimsRegistry(**options).validate(decoded.claims)
        return decoded.claims


def curl(vm: VMNet, target: str, path: str, *extra: str, method: str = "GET", timeout: float = 5) -> Answer:
    """curl inside the guest namespace, as a guest author would call the proxy."""
    host = f"[{target}]" if ":" in target else target
    result = sh(
        "ip", "netns", "exec", vm.guest, "curl", "-sg", "-m", str(timeout), "-X", method, "-o", "-",
        "-w", "\n%{http_code} %{content_type}", *extra, f"http://{host}{path}", check=False,
    )  # fmt: skip
    body, _, tail = result.stdout.rpartition("\n")
    status, _, content_type = tail.partition(" ")
    return Answer(int(status or 0), content_type, body)


def session_token(vm: VMNet, target: str) -> str:
    ttl = ("-H", "Metadata: true", "-H", "X-Metadata-Token-TTL-Seconds: 60")
    answer = curl(vm, target, "/metadata/v1/token", *ttl, method="PUT")
    assert answer.status == 200, answer
    return answer.body


def identity(vm: VMNet, target: str, query: str, *extra: str, token: str | None = None, timeout: float = 5) -> Answer:
    headers = ("-H", f"X-Metadata-Token: {token}") if token else ()
    return curl(vm, target, f"/runtime/identity?{query}", *headers, *extra, timeout=timeout)


@pytest.fixture(scope="module", params=["mtls", "plain"])
def host(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[IdentityHost]:
    mtls = request.param == "mtls"
    workdir = tmp_path_factory.mktemp(f"hostnet-identity-{request.param}")
    registry = workdir / "lib" / "registry.sqlite3"
    vms_file = workdir / "vms"
    vms_file.write_text("")
    keygen(workdir / "signing.pem")
    cp: ControlPlane
    if mtls:
        cp = TLSControlPlane(workdir, trustme.CA(), require_client_cert=True)  # the proxy's certificate: host-test
    else:
        cp = ControlPlane(workdir)
    cp.extra += ("--vms", str(vms_file), "--signing-key", str(workdir / "signing.pem"), "--issuer", cp.url)
    tls_toml = cp.toml(client_cert=True) if isinstance(cp, TLSControlPlane) else ""
    proxy = Proxy(workdir, cp.url, tls_toml + "\n" + ROUTES, listen=((META4, 80), (META6, 80)), registry=registry)
    before_lo = lo_addresses()
    before_tables = tables(None)
    setup = sh(HOSTAGENT, "--registry", str(registry), "host", "setup", check=False)
    assert setup.returncode == 0, setup.stderr
    try:
        cp.start()
        proxy.start()
        with running(cp, proxy), leak_guard():
            yield IdentityHost(cp, proxy, vms_file, mtls)
    finally:
        for address, prefix in lo_addresses():
            if address in (META4, META6) and (address, prefix) not in before_lo:
                sh("ip", "addr", "del", f"{address}/{prefix}", "dev", "lo", check=False)
        if ("inet", "metadata_proxy_host") not in before_tables:
            sh("nft", "delete", "table", "inet", "metadata_proxy_host", check=False)


@pytest.fixture
def topo() -> Iterator[Topology]:
    topology = Topology()
    try:
        yield topology
    finally:
        topology.close()


def test_root_in_the_guest_gets_a_token_over_v4_and_v6(host: IdentityHost, topo: Topology) -> None:
    vm = topo.vm()
    host.add("id-root", vm, "vm-id-root", scope="team-a")
    for target in (META4, META6):
        token = session_token(vm, target)
        answer = identity(vm, target, "audience=https%3A%2F%2Fvault.example&nonce=n-42", *PRIVILEGED, token=token)
        assert answer.status == 200, answer
        assert answer.content_type == "application/jwt"
        claims = host.verify(answer.body, "https://vault.example", "n-42")
        assert (claims["sub"], claims["aud"], claims["scope"]) == ("vm-id-root", "https://vault.example", "team-a")
        if host.mtls:
            assert claims["host"] == "host-test"  # proven by the proxy's client certificate
        else:
            assert "host" not in claims  # a plain X-Metadata-Proxy-Host proves nothing


def test_an_ephemeral_port_is_403_unprivileged_port_and_reaches_nothing(host: IdentityHost, topo: Topology) -> None:
    vm = topo.vm()
    host.add("id-user", vm, "vm-id-user")
    before = host.cp.requests_seen("/runtime/identity")
    for target in (META4, META6):
        token = session_token(vm, target)
        refused = identity(vm, target, "audience=a&nonce=n", token=token)  # curl's own, ephemeral, port
        assert (refused.status, refused.code()) == (403, "unprivileged_port"), refused
        assert "eyJ" not in refused.body
        # The session guard comes first: a privileged port without a session token is not enough.
        no_session = identity(vm, target, "audience=a", *PRIVILEGED)
        assert (no_session.status, no_session.code()) == (401, "invalid_session_token"), no_session
        # Nor is a way round the route through the wider /runtime/ one, as sent or encoded.
        for path in ("/runtime/identity?audience=a", "/runtime/%69dentity?audience=a"):
            sneaky = curl(vm, target, path, "-H", "Metadata: true")
            assert sneaky.status in (401, 403, 404) and "eyJ" not in sneaky.body, (path, sneaky)
    assert host.cp.requests_seen("/runtime/identity") == before


def test_concurrent_calls_with_different_nonces_get_different_tokens(host: IdentityHost, topo: Topology) -> None:
    vm = topo.vm()
    host.add("id-concurrent", vm, "vm-id-concurrent")
    token = session_token(vm, META4)
    calls = {
        nonce: subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                vm.guest,
                "curl",
                "-sfg",
                "-m",
                "5",
                *PRIVILEGED,
                "-H",
                f"X-Metadata-Token: {token}",
                f"http://{META4}/runtime/identity?audience=a&nonce={nonce}",
            ],
            stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for nonce in ("first", "second", "third")
    }
    tokens = {}
    for nonce, process in calls.items():
        out, _ = process.communicate(timeout=20)
        assert process.returncode == 0
        tokens[nonce] = out
    assert len(set(tokens.values())) == 3
    for nonce, body in tokens.items():
        assert host.verify(body, "a", nonce)["nonce"] == nonce


def test_a_removed_vm_gets_no_token(host: IdentityHost, topo: Topology) -> None:
    vm = topo.vm()
    host.add("id-removed", vm, "vm-id-removed")
    token = session_token(vm, META6)
    assert identity(vm, META6, "audience=a", *PRIVILEGED, token=token).status == 200
    # Deleted by the control plane: it refuses the VM's (still valid) runtime token.
    host.vms_file.write_text(host.vms_file.read_text().replace("vm-id-removed\n", ""))
    gone = identity(vm, META6, "audience=a", *PRIVILEGED, token=token)
    assert (gone.status, gone.code()) == (403, "unknown_vm")
    # Removed from the host: nothing answers the guest at all.
    removed = sh(HOSTAGENT, "--registry", str(host.proxy.registry), "vm", "remove", "id-removed", check=False)
    assert removed.returncode == 0, removed.stderr
    assert identity(vm, META4, "audience=a", *PRIVILEGED, token=token, timeout=1).status == 0
