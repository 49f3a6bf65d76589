"""Identity tokens (controlplane/identity.py): the endpoint through httpx.ASGITransport, the key
files and `controlplane keygen`, and tokens from a real `controlplane serve` verified by two
implementations we did not write, each fetching the key set over HTTP: PyJWT's `PyJWKClient`
(through the discovery document) and joserfc. Key rotation restarts the server with other
`--signing-key` options. The proxy's side (route matching, privileged ports) is at the end and
in tests/test_hostnet_identity.py.
"""

from __future__ import annotations

import os
import stat
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import jwt
import jwt.utils
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jwk as jose_jwk
from joserfc import jwt as jose_jwt
from joserfc.errors import BadSignatureError, ExpiredTokenError, InvalidClaimError, JoseError

from controlplane.app import create_app
from controlplane.identity import IdentityIssuer, SigningKey, SigningKeyError, SigningKeys, keygen, thumbprint
from controlplane.tokens import Secrets, Verifier, mint
from controlplane.vms import VmDirectory
from metadata_proxy import guards
from metadata_proxy.config import Route
from tests.harness import BIN, ControlPlane, Proxy, running

SECRET = b"identity-test-secret-".ljust(48, b"x")
ISSUER = "https://cp.example"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def error_code(response: httpx.Response) -> str:
    code: str = response.json()["error"]["code"]
    return code


def new_key(tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    keygen(path)
    return path


# --- keys ------------------------------------------------------------------------------------


def test_keygen_writes_a_p256_key_0600_and_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "signing.pem"
    old_umask = os.umask(0)  # even with a permissive umask the key is 0600
    try:
        key = keygen(path)
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    loaded = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey) and isinstance(loaded.curve, ec.SECP256R1)
    assert SigningKey.from_spec(str(path)).kid == key.kid
    before = path.read_bytes()
    with pytest.raises(SigningKeyError, match="already exists"):
        keygen(path)
    assert path.read_bytes() == before


def test_keygen_cli_prints_the_kid_only(tmp_path: Path) -> None:
    path = tmp_path / "cli.pem"
    result = subprocess.run([str(BIN / "controlplane"), "keygen", "--out", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == SigningKey.from_spec(str(path)).kid
    assert "PRIVATE" not in result.stdout + result.stderr
    again = subprocess.run([str(BIN / "controlplane"), "keygen", "--out", str(path)], capture_output=True, text=True)
    assert again.returncode == 1
    assert again.stderr.count("\n") == 1 and str(path) in again.stderr and "already exists" in again.stderr


def test_default_kid_is_the_rfc7638_thumbprint(tmp_path: Path) -> None:
    key = SigningKey.from_spec(str(new_key(tmp_path, "k.pem")))
    # joserfc computes the thumbprint on its own (RFC 7638 section 3).
    imported = jose_jwk.ECKey.import_key({k: v for k, v in key.public_jwk().items() if k in ("crv", "kty", "x", "y")})
    assert key.kid == imported.thumbprint() == thumbprint(key.private_key.public_key())
    named = SigningKey.from_spec(f"2026-12:{tmp_path / 'k.pem'}")
    assert named.kid == "2026-12" and repr(named) == "SigningKey(kid='2026-12')"


def test_unusable_keys_are_refused_naming_the_file(tmp_path: Path) -> None:
    world = new_key(tmp_path, "world.pem")
    world.chmod(0o644)
    rsa_key = tmp_path / "rsa.pem"
    rsa_key.write_bytes(
        rsa.generate_private_key(65537, 2048).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    rsa_key.chmod(0o600)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a key")
    garbage.chmod(0o600)
    cases = [
        (str(world), "accessible to every user"),
        (str(rsa_key), "P-256"),
        (str(garbage), "not a PEM private key"),
        (str(tmp_path / "absent.pem"), "cannot read"),
        (f":{world}", "empty key id"),
    ]
    for spec, reason in cases:
        with pytest.raises(SigningKeyError, match=reason):
            SigningKey.from_spec(spec)
    group = new_key(tmp_path, "group.pem")
    group.chmod(0o640)  # readable by the service's group: allowed
    SigningKey.from_spec(str(group))
    with pytest.raises(SigningKeyError, match="more than once"):
        SigningKeys.from_specs([f"a:{group}", f"a:{group}"])


# --- the endpoint through ASGITransport ------------------------------------------------------


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def keys(tmp_path: Path) -> SigningKeys:
    return SigningKeys.from_specs([str(new_key(tmp_path, "signing.pem"))])


@pytest.fixture
async def client(tmp_path: Path, keys: SigningKeys) -> AsyncIterator[httpx.AsyncClient]:
    vms_file = tmp_path / "vms"
    vms_file.write_text('vm-1\n{"vm_id": "vm-2", "scope": "team-a"}\n')
    vms = VmDirectory(vms_file)
    app = create_app(
        Verifier(Secrets([(None, SECRET)]), vm_exists=vms.exists),
        vms=vms,
        identity=IdentityIssuer(keys, ISSUER, lifetime=120),
    )
    transport = httpx.ASGITransport(app=app, client=("192.0.2.10", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://control-plane") as client:
        yield client


def verified(token: str, keys: SigningKeys, audience: str) -> dict[str, Any]:
    public = keys.signing.private_key.public_key()
    claims: dict[str, Any] = jwt.decode(token, public, algorithms=["ES256"], audience=audience, issuer=ISSUER)
    return claims


@pytest.mark.anyio
async def test_identity_token_claims_and_headers(client: httpx.AsyncClient, keys: SigningKeys) -> None:
    headers = bearer(mint("vm-2", (None, SECRET))) | {"X-Metadata-Proxy-Host": "host-a"}
    response = await client.get(
        "/runtime/identity", params={"audience": "https://vault.example", "nonce": "n-1"}, headers=headers
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/jwt"
    assert response.headers["cache-control"] == "no-store"
    token = response.text
    assert jwt.get_unverified_header(token) == {"alg": "ES256", "kid": keys.signing.kid, "typ": "JWT"}
    claims = verified(token, keys, "https://vault.example")
    assert set(claims) == {"iss", "sub", "aud", "iat", "exp", "jti", "nonce", "scope"}
    assert (claims["sub"], claims["nonce"], claims["scope"]) == ("vm-2", "n-1", "team-a")
    assert claims["aud"] == "https://vault.example"  # the one audience asked for, not a list naming others
    assert claims["exp"] - claims["iat"] == 120 and abs(claims["iat"] - time.time()) < 5
    assert "host" not in claims  # the header alone proves nothing: no client certificate here
    again = verified((await client.get("/runtime/identity", params={"audience": "a"}, headers=headers)).text, keys, "a")
    assert "nonce" not in again and again["jti"] != claims["jti"]
    assert again["scope"] == "team-a"
    bare = verified(
        (await client.get("/runtime/identity?audience=a", headers=bearer(mint("vm-1", (None, SECRET))))).text, keys, "a"
    )
    assert bare["scope"] == "vm-1"  # listed as a bare id: its own scope


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("", "invalid_audience"),
        ("audience=", "invalid_audience"),
        ("audience=a&audience=b", "invalid_audience"),
        ("audience=" + "a" * 257, "invalid_audience"),
        ("audience=caf%C3%A9", "invalid_audience"),
        ("audience=a%0Ab", "invalid_audience"),
        ("audience=a&nonce=", "invalid_nonce"),
        ("audience=a&nonce=" + "n" * 129, "invalid_nonce"),
        ("audience=a&nonce=x&nonce=y", "invalid_nonce"),
        ("audience=a&nonce=%7F", "invalid_nonce"),
    ],
)
async def test_bad_parameters(client: httpx.AsyncClient, query: str, code: str) -> None:
    response = await client.get(f"/runtime/identity?{query}", headers=bearer(mint("vm-1", (None, SECRET))))
    assert response.status_code == 400 and error_code(response) == code
    assert "eyJ" not in response.text


@pytest.mark.anyio
async def test_limits_are_inclusive(client: httpx.AsyncClient, keys: SigningKeys) -> None:
    audience, nonce = "~" + "a" * 254 + " ", "n" * 128  # printable ASCII, space and tilde included
    response = await client.get(
        "/runtime/identity", params={"audience": audience, "nonce": nonce}, headers=bearer(mint("vm-1", (None, SECRET)))
    )
    assert response.status_code == 200
    assert verified(response.text, keys, audience)["nonce"] == nonce


@pytest.mark.anyio
async def test_no_token_without_a_valid_runtime_token_or_for_a_vm_that_is_gone(
    client: httpx.AsyncClient, tmp_path: Path
) -> None:
    assert (await client.get("/runtime/identity?audience=a")).status_code == 401
    forged = mint("vm-1", (None, b"another-secret-".ljust(48, b"z")))
    assert error_code(await client.get("/runtime/identity?audience=a", headers=bearer(forged))) == "invalid_token"
    gone = await client.get("/runtime/identity?audience=a", headers=bearer(mint("vm-3", (None, SECRET))))
    assert gone.status_code == 403 and error_code(gone) == "unknown_vm"
    (tmp_path / "vms").write_text("vm-9\n")  # vm-1 removed
    removed = await client.get("/runtime/identity?audience=a", headers=bearer(mint("vm-1", (None, SECRET))))
    assert removed.status_code == 403 and error_code(removed) == "unknown_vm"


@pytest.mark.anyio
async def test_discovery_is_public(client: httpx.AsyncClient, keys: SigningKeys) -> None:
    config = await client.get("/.well-known/openid-configuration")
    assert config.status_code == 200
    assert config.json() == {
        "issuer": ISSUER,
        "jwks_uri": f"{ISSUER}/.well-known/jwks.json",
        "id_token_signing_alg_values_supported": ["ES256"],
        "subject_types_supported": ["public"],
        "response_types_supported": ["id_token"],
        "claims_supported": ["iss", "sub", "aud", "iat", "exp", "jti", "nonce", "host", "scope"],
    }
    key_set = (await client.get("/.well-known/jwks.json")).json()
    assert key_set == keys.jwks()
    assert [key["kid"] for key in key_set["keys"]] == [keys.signing.kid]
    assert not any("d" in key for key in key_set["keys"])  # never the private part


@pytest.mark.anyio
async def test_without_signing_keys_there_are_no_identity_endpoints() -> None:
    app = create_app(Verifier(Secrets([(None, SECRET)])))
    transport = httpx.ASGITransport(app=app, client=("192.0.2.10", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://cp") as client:
        for path in ("/runtime/identity?audience=a", "/.well-known/jwks.json", "/.well-known/openid-configuration"):
            response = await client.get(path, headers=bearer(mint("vm-1", (None, SECRET))))
            assert response.status_code == 404 and error_code(response) == "not_found"


def test_lifetime_and_issuer_bounds(keys: SigningKeys) -> None:
    with pytest.raises(ValueError, match="between 1 and 3600"):
        IdentityIssuer(keys, ISSUER, lifetime=3601)
    for issuer in ("ftp://cp", "https://", "https://cp/?x=1", "https://user:pw@cp", "cp.example"):
        with pytest.raises(ValueError, match="issuer"):
            IdentityIssuer(keys, issuer)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--signing-key", "k.pem"], "--signing-key and --issuer go together"),
        (["--issuer", ISSUER], "--signing-key and --issuer go together"),
        (["--identity-lifetime", "60"], "--identity-lifetime needs --signing-key"),
        (["--signing-key", "k.pem", "--issuer", ISSUER, "--identity-lifetime", "3601"], "from 1 to 3600"),
        (["--signing-key", "k.pem", "--issuer", "ftp://cp"], "not an http(s) URL"),
        (["--tls-cert", "c.pem"], "--tls-cert and --tls-key go together"),
        (["--client-ca", "ca.pem"], "--client-ca needs --tls-cert"),
    ],
)
def test_serve_usage_errors(tmp_path: Path, args: list[str], needle: str) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    result = subprocess.run(
        [str(BIN / "controlplane"), "serve", "--listen", "127.0.0.1:0", "--secret-file", str(secret), *args],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=30,
    )
    assert result.returncode == 2
    assert needle in result.stderr


def test_serve_refuses_an_unusable_key_in_one_line(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    world = new_key(tmp_path, "world.pem")
    world.chmod(0o604)
    result = subprocess.run(
        [str(BIN / "controlplane"), "serve", "--listen", "127.0.0.1:0", "--secret-file", str(secret)]
        + ["--signing-key", str(world), "--issuer", ISSUER],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and str(world) in result.stderr and "every user" in result.stderr


# --- a real `controlplane serve`, verified by libraries we did not write ------------------------


class IdentityServer(ControlPlane):
    """`controlplane serve` with signing keys; its issuer is its own URL, so discovery works as deployed."""

    def __init__(self, workdir: Path, keys: list[str], *, lifetime: int = 300, port: int | None = None) -> None:
        super().__init__(workdir, port=port)
        options = [option for key in keys for option in ("--signing-key", key)]
        self.extra = (*options, "--issuer", self.url, "--identity-lifetime", str(lifetime))

    def identity(self, vm_id: str, audience: str, nonce: str | None = None) -> str:
        params = {"audience": audience} | ({"nonce": nonce} if nonce is not None else {})
        token = mint(vm_id, Secrets.from_specs([str(self.secret_file)]))
        response = httpx.get(f"{self.url}/runtime/identity", params=params, headers=bearer(token), timeout=10)
        assert response.status_code == 200, response.text
        return response.text


def pyjwt_verify(server: ControlPlane, token: str, audience: str, *, leeway: int = 0) -> dict[str, Any]:
    """What a relying party using PyJWT does: discovery, then the JWKS it names, then every check."""
    config = httpx.get(f"{server.url}/.well-known/openid-configuration", timeout=10).json()
    client = jwt.PyJWKClient(config["jwks_uri"], cache_jwk_set=False)
    key = client.get_signing_key_from_jwt(token)
    claims: dict[str, Any] = jwt.decode(
        token,
        key,
        algorithms=config["id_token_signing_alg_values_supported"],
        audience=audience,
        issuer=config["issuer"],
        leeway=leeway,
        options={"require": ["iss", "sub", "aud", "iat", "exp", "jti"]},
    )
    return claims


def joserfc_verify(server: ControlPlane, token: str, audience: str, nonce: str | None) -> dict[str, Any]:
    """The same with joserfc: its own JWKS import, signature check and claims registry."""
    key_set = jose_jwk.KeySet.import_key_set(httpx.get(f"{server.url}/.well-known/jwks.json", timeout=10).json())
    decoded = jose_jwt.decode(token, key_set, algorithms=["ES256"])
    options: dict[str, Any] = {
        "iss": {"essential": True, "value": server.url},
        "aud": {"essential": True, "value": audience},
        "exp": {"essential": True},
        "sub": {"essential": True},
    }
    if nonce is not None:
        options["nonce"] = {"essential": True, "value": nonce}
    jose_jwt.JWTClaimsRegistry(**options).validate(decoded.claims)
    return decoded.claims


@pytest.fixture(scope="module")
def key_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("keys")
    for name in ("old.pem", "new.pem"):
        keygen(directory / name)
    return directory


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, key_dir: Path) -> Iterator[IdentityServer]:
    instance = IdentityServer(tmp_path_factory.mktemp("identity-cp"), [str(key_dir / "old.pem")]).start()
    with running(instance):
        yield instance


def test_tokens_verify_with_pyjwt_and_joserfc(server: IdentityServer) -> None:
    token = server.identity("vm-verified", "https://secrets.example", nonce="rp-nonce-1")
    by_pyjwt = pyjwt_verify(server, token, "https://secrets.example")
    by_joserfc = joserfc_verify(server, token, "https://secrets.example", "rp-nonce-1")
    assert by_pyjwt == by_joserfc
    assert by_pyjwt["sub"] == "vm-verified" and by_pyjwt["nonce"] == "rp-nonce-1"
    assert by_pyjwt["iss"] == server.url and by_pyjwt["exp"] - by_pyjwt["iat"] == 300


def test_verifiers_refuse_another_audience_a_wrong_nonce_and_a_tampered_token(server: IdentityServer) -> None:
    token = server.identity("vm-refused", "https://secrets.example", nonce="expected")
    with pytest.raises(jwt.InvalidAudienceError):
        pyjwt_verify(server, token, "https://registry.example")
    with pytest.raises(InvalidClaimError):
        joserfc_verify(server, token, "https://registry.example", "expected")
    with pytest.raises(InvalidClaimError):
        joserfc_verify(server, token, "https://secrets.example", "replayed")
    header, payload, signature = token.split(".")
    forged_claims = jwt.utils.base64url_encode(
        jwt.utils.base64url_decode(payload).replace(b"vm-refused", b"vm-attacker")
    ).decode()
    forged = f"{header}.{forged_claims}.{signature}"
    with pytest.raises(jwt.InvalidSignatureError):
        pyjwt_verify(server, forged, "https://secrets.example")
    with pytest.raises(BadSignatureError):
        joserfc_verify(server, forged, "https://secrets.example", "expected")


def test_expired_tokens_are_refused_by_both(tmp_path: Path, key_dir: Path) -> None:
    short = IdentityServer(tmp_path, [str(key_dir / "old.pem")], lifetime=1).start()
    with running(short):
        token = short.identity("vm-short", "aud")
        # The lifetime, read without verifying: a loaded machine may take the 1 s to verify it.
        claims = jwt.decode(token, options={"verify_signature": False})
        assert claims["exp"] - claims["iat"] == 1
        time.sleep(max(0.0, claims["exp"] + 1.1 - time.time()))  # past exp: the point of the test is time
        with pytest.raises(jwt.ExpiredSignatureError):
            pyjwt_verify(short, token, "aud")
        with pytest.raises(ExpiredTokenError):
            joserfc_verify(short, token, "aud", None)


def test_key_rotation_without_a_failed_verification(tmp_path: Path, key_dir: Path) -> None:
    old, new = str(key_dir / "old.pem"), str(key_dir / "new.pem")
    # 1. Only the old key; a token is issued.
    phase = IdentityServer(tmp_path, [old]).start()
    with running(phase):
        old_token = phase.identity("vm-rot", "aud")
    port = phase.port
    # 2. The new key signs; the old one is still published: the old token verifies, so does a new one.
    phase = IdentityServer(tmp_path, [new, old], port=port).start()
    with running(phase):
        new_token = phase.identity("vm-rot", "aud")
        assert jwt.get_unverified_header(new_token)["kid"] != jwt.get_unverified_header(old_token)["kid"]
        for token in (old_token, new_token):
            assert pyjwt_verify(phase, token, "aud")["sub"] == "vm-rot"
            assert joserfc_verify(phase, token, "aud", None)["sub"] == "vm-rot"
    # 3. The old key removed: its token no longer verifies anywhere; the new one does.
    phase = IdentityServer(tmp_path, [new], port=port).start()
    with running(phase):
        assert pyjwt_verify(phase, new_token, "aud")["sub"] == "vm-rot"
        with pytest.raises(jwt.PyJWKClientError):
            pyjwt_verify(phase, old_token, "aud")
        with pytest.raises(JoseError):
            joserfc_verify(phase, old_token, "aud", None)


def test_concurrent_calls_with_different_nonces_get_different_tokens(server: IdentityServer) -> None:
    tokens: dict[str, str] = {}
    barrier = threading.Barrier(8)

    def call(nonce: str) -> None:
        barrier.wait()
        tokens[nonce] = server.identity("vm-concurrent", "aud", nonce=nonce)

    threads = [threading.Thread(target=call, args=(f"nonce-{n}",)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(tokens) == 8 and len(set(tokens.values())) == 8
    for nonce, token in tokens.items():
        claims = joserfc_verify(server, token, "aud", nonce)
        assert claims["nonce"] == nonce
    assert len({joserfc_verify(server, token, "aud", None)["jti"] for token in tokens.values()}) == 8


# --- the proxy's route for the endpoint -------------------------------------------------------


def test_a_narrower_routes_own_name_is_that_routes() -> None:
    routes = [Route("/runtime/"), Route("/runtime/identity/", "session", True)]
    assert guards.match_route(b"/runtime/identity", routes) is routes[1]
    assert guards.match_route(b"/runtime/identity/x", routes) is routes[1]
    assert guards.match_route(b"/runtime/identityx", routes) is routes[0]
    assert guards.match_route(b"/runtime/whoami", routes) is routes[0]
    assert guards.match_route(b"/runtime", routes) is None  # no wider route covers it: not_found


def test_a_path_that_decodes_into_another_route_matches_none() -> None:
    routes = [Route("/runtime/"), Route("/runtime/identity/", "session", True)]
    for sneaky in (b"/runtime/%69dentity", b"/runtime/%2569dentity", b"/runtime/identit%79/x", b"/runtime/%69dentity/"):
        assert guards.match_route(sneaky, routes) is None, sneaky
    assert guards.match_route(b"/runtime/a%20b", routes) is routes[0]  # decodes within its own route
    assert guards.match_route(b"/runtime/identity/%41", routes) is routes[1]


# --- through the real proxy: never cached, never shared ---------------------------------------


def test_the_proxy_never_caches_or_shares_identity_answers(tmp_path: Path, key_dir: Path) -> None:
    (tmp_path / "cp").mkdir()
    cp = IdentityServer(tmp_path / "cp", [str(key_dir / "old.pem")]).start()
    proxy = Proxy(tmp_path, cp.url).start()
    with running(cp, proxy):
        proxy.add_vm("cached", "127.0.0.71", cp.mint("vm-cached"))
        params = {"audience": "https://vault.example", "nonce": "same"}
        before = cp.requests_seen("/runtime/identity")
        with proxy.guest("127.0.0.71") as guest:
            answers = [guest.get("/runtime/identity", params=params, headers={"Metadata": "true"}) for _ in range(3)]
        barrier = threading.Barrier(6)
        concurrent: list[httpx.Response] = []

        def call() -> None:
            with proxy.guest("127.0.0.71") as guest:
                barrier.wait()
                concurrent.append(guest.get("/runtime/identity", params=params, headers={"Metadata": "true"}))

        threads = [threading.Thread(target=call) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=30)
        reached = cp.requests_seen("/runtime/identity") - before
        answers += concurrent
        assert len(answers) == 9 and all(answer.status_code == 200 for answer in answers)
        jtis = {joserfc_verify(cp, answer.text, "https://vault.example", "same")["jti"] for answer in answers}
    assert all(answer.headers["cache-control"] == "no-store" and "age" not in answer.headers for answer in answers)
    assert len(jtis) == 9
    assert reached == 9  # every call, identical ones in flight together included, went to the control plane
