"""Identity tokens a VM can show to third parties: ES256 JWTs, their keys and discovery.

A VM asks for a token naming an audience (and, to defeat replay, the relying party's
nonce); anyone can verify it with the public keys this module publishes, the way OpenID
Connect relying parties verify ID tokens::

    GET /runtime/identity?audience=A[&nonce=N]   the JWT as the whole body (application/jwt, no-store)
    GET /.well-known/openid-configuration        public: issuer, jwks_uri, algorithms, claims
    GET /.well-known/jwks.json                   public: every signing key's public half

Keys are P-256 private keys in PEM files (``controlplane keygen``). Several may be loaded:
the first signs, all are published, so a retiring key's tokens keep verifying until they
expire. A key without a kid is named by its RFC 7638 thumbprint.

Exceptions::

    SigningKeyError       a key file that cannot be used: unreadable, not a P-256 private key,
                          readable by everyone, a duplicate kid; or keygen's target exists
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import stat
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from controlplane.app import authenticate, error_response
from controlplane.tls import client_identity
from controlplane.tokens import split_spec
from controlplane.vms import VmDirectory

__all__ = [
    "DEFAULT_LIFETIME",
    "MAX_LIFETIME",
    "IdentityIssuer",
    "SigningKey",
    "SigningKeyError",
    "SigningKeys",
    "identity_routes",
    "keygen",
    "thumbprint",
]

ALGORITHM = "ES256"
DEFAULT_LIFETIME = 300
MAX_LIFETIME = 3600
MAX_AUDIENCE = 256
MAX_NONCE = 128
# How long a relying party may cache the key set: short enough that a key added for
# rotation is seen well before it starts signing, long enough to spare the control plane.
JWKS_MAX_AGE = 300
CLAIMS = ("iss", "sub", "aud", "iat", "exp", "jti", "nonce", "host", "scope")


class SigningKeyError(Exception):
    """A signing key that cannot be used; the message names the file and the reason."""


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _public_members(key: ec.EllipticCurvePublicKey) -> dict[str, str]:
    numbers = key.public_numbers()
    return {
        "crv": "P-256",
        "kty": "EC",
        "x": _b64url(numbers.x.to_bytes(32, "big")),
        "y": _b64url(numbers.y.to_bytes(32, "big")),
    }


def thumbprint(key: ec.EllipticCurvePublicKey) -> str:
    """The RFC 7638 JWK thumbprint (SHA-256, base64url) of a P-256 public key."""
    # The required members only, in lexicographic order, without whitespace (RFC 7638 section 3).
    canonical = json.dumps(_public_members(key), sort_keys=True, separators=(",", ":"))
    return _b64url(hashlib.sha256(canonical.encode("ascii")).digest())


@dataclass(frozen=True)
class SigningKey:
    """A P-256 private key and the kid its tokens carry. The repr shows the kid only."""

    kid: str
    private_key: ec.EllipticCurvePrivateKey

    def __repr__(self) -> str:
        return f"SigningKey(kid={self.kid!r})"

    def public_jwk(self) -> dict[str, str]:
        return {**_public_members(self.private_key.public_key()), "kid": self.kid, "use": "sig", "alg": ALGORITHM}

    @classmethod
    def from_spec(cls, spec: str) -> SigningKey:
        """Load a ``--signing-key`` spec, ``FILE`` or ``KID:FILE``.

        Read as ``--secret-file`` is (tokens.split_spec). The file must not be readable by everyone.
        """
        try:
            kid, path = split_spec(spec, "signing key")
        except ValueError as exc:
            raise SigningKeyError(str(exc)) from None
        try:
            with open(path, "rb") as file:
                mode = os.fstat(file.fileno()).st_mode
                pem = file.read()
        except OSError as exc:
            raise SigningKeyError(f"cannot read signing key {path}: {exc.strerror or exc}") from None
        if mode & (stat.S_IROTH | stat.S_IWOTH):
            # A private key anyone on the machine can read signs for anyone: refuse to use it.
            raise SigningKeyError(f"signing key {path} is accessible to every user (mode {stat.S_IMODE(mode):04o})")
        try:
            private_key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            reason = "it is encrypted" if isinstance(exc, TypeError) else "it is not a PEM private key"
            raise SigningKeyError(f"cannot use signing key {path}: {reason}") from None
        if not isinstance(private_key, ec.EllipticCurvePrivateKey) or not isinstance(private_key.curve, ec.SECP256R1):
            raise SigningKeyError(f"cannot use signing key {path}: ES256 needs a P-256 (secp256r1) key")
        return cls(kid if kid is not None else thumbprint(private_key.public_key()), private_key)


class SigningKeys:
    """An ordered set of signing keys with distinct kids: the first signs, all are published."""

    def __init__(self, keys: Iterable[SigningKey]) -> None:
        self._keys = tuple(keys)
        if not self._keys:
            raise SigningKeyError("no signing key given")
        kids = [key.kid for key in self._keys]
        for kid in kids:
            if kids.count(kid) > 1:
                raise SigningKeyError(f"the signing key with kid {kid!r} is given more than once")

    @classmethod
    def from_specs(cls, specs: Iterable[str]) -> SigningKeys:
        return cls(SigningKey.from_spec(spec) for spec in specs)

    @property
    def signing(self) -> SigningKey:
        return self._keys[0]

    @property
    def kids(self) -> tuple[str, ...]:
        return tuple(key.kid for key in self._keys)

    def jwks(self) -> dict[str, list[dict[str, str]]]:
        return {"keys": [key.public_jwk() for key in self._keys]}

    def __repr__(self) -> str:
        return f"SigningKeys(kids={self.kids!r})"


def keygen(path: Path) -> SigningKey:
    """Write a new P-256 private key to ``path`` (PKCS#8 PEM, mode 0600) and return it.

    An existing file is never overwritten: it may be a key still in use, and a key lost is
    every token it signed refused. Raises SigningKeyError naming the file.
    """
    private_key = ec.generate_private_key(ec.SECP256R1())
    pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        # O_EXCL: never replace a file; 0600 from the start, so the key is never readable by others.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise SigningKeyError(f"{path} already exists; keygen never overwrites a key") from None
    except OSError as exc:
        raise SigningKeyError(f"cannot create {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "wb") as file:
        os.fchmod(file.fileno(), 0o600)  # whatever the umask allowed
        file.write(pem)
    return SigningKey(thumbprint(private_key.public_key()), private_key)


def check_issuer(url: str) -> str:
    """The ``--issuer`` URL as given: http(s), with a host, no credentials, query or fragment; else ValueError."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname or parts.query or parts.fragment:
        raise ValueError(f"issuer {url!r} is not an http(s) URL without query or fragment")
    if parts.username or parts.password:
        raise ValueError(f"issuer {url!r} must not carry credentials")
    return url


def _printable_ascii(text: str) -> bool:
    return all(" " <= char <= "~" for char in text)


class IdentityIssuer:
    """Signs identity tokens and answers the discovery documents (module docstring)."""

    def __init__(self, keys: SigningKeys, issuer: str, *, lifetime: int = DEFAULT_LIFETIME) -> None:
        if not 0 < lifetime <= MAX_LIFETIME:
            raise ValueError(f"identity lifetime {lifetime} is not between 1 and {MAX_LIFETIME} seconds")
        self.keys = keys
        self.issuer = check_issuer(issuer)
        self.lifetime = lifetime

    def issue(
        self,
        sub: str,
        audience: str,
        *,
        nonce: str | None = None,
        host: str | None = None,
        scope: str | None = None,
        now: int | None = None,
    ) -> str:
        """A token for VM ``sub`` towards ``audience``, signed by the first key."""
        iat = int(time.time()) if now is None else now
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "sub": sub,
            "aud": audience,
            "iat": iat,
            "exp": iat + self.lifetime,
            "jti": secrets.token_urlsafe(16),
        }
        for name, value in (("nonce", nonce), ("host", host), ("scope", scope)):
            if value is not None:
                claims[name] = value
        key = self.keys.signing
        return jwt.encode(claims, key.private_key, algorithm=ALGORITHM, headers={"kid": key.kid})

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "jwks_uri": self.issuer.rstrip("/") + "/.well-known/jwks.json",
            "id_token_signing_alg_values_supported": [ALGORITHM],
            "subject_types_supported": ["public"],
            "response_types_supported": ["id_token"],
            "claims_supported": list(CLAIMS),
        }


def _one_param(request: Request, name: str) -> str | None:
    """The parameter's only value; None when absent; ValueError when repeated."""
    values = request.query_params.getlist(name)
    if len(values) > 1:
        raise ValueError(name)
    return values[0] if values else None


async def identity(request: Request) -> Response:
    claims = authenticate(request)  # 401 invalid_token / 403 unknown_vm: no token for a VM that is gone
    issuer: IdentityIssuer = request.app.state.identity
    try:
        audience = _one_param(request, "audience")
    except ValueError:
        audience = None
    if audience is None or not 0 < len(audience) <= MAX_AUDIENCE or not _printable_ascii(audience):
        return error_response(
            400, "invalid_audience", f"audience must be given once, 1 to {MAX_AUDIENCE} printable ASCII characters"
        )
    try:
        nonce = _one_param(request, "nonce")
    except ValueError:
        nonce = ""
    # An empty nonce is refused rather than dropped: a relying party that sent one expects it back.
    if nonce is not None and (not 0 < len(nonce) <= MAX_NONCE or not _printable_ascii(nonce)):
        return error_response(
            400, "invalid_nonce", f"nonce must be given at most once, 1 to {MAX_NONCE} printable ASCII characters"
        )
    vms: VmDirectory | None = request.app.state.vms
    token = issuer.issue(
        claims.sub,
        audience,
        nonce=nonce,
        host=client_identity(request.scope),
        scope=vms.scope(claims.sub) if vms is not None else None,
    )
    return Response(token, media_type="application/jwt", headers={"Cache-Control": "no-store"})


async def openid_configuration(request: Request) -> Response:
    issuer: IdentityIssuer = request.app.state.identity
    return JSONResponse(issuer.discovery(), headers={"Cache-Control": f"public, max-age={JWKS_MAX_AGE}"})


async def jwks(request: Request) -> Response:
    issuer: IdentityIssuer = request.app.state.identity
    return JSONResponse(issuer.keys.jwks(), headers={"Cache-Control": f"public, max-age={JWKS_MAX_AGE}"})


def identity_routes() -> Sequence[BaseRoute]:
    """The identity endpoints; the app that mounts them holds the IdentityIssuer in ``state.identity``."""
    return (
        Route("/runtime/identity", identity, methods=["GET"]),
        Route("/.well-known/openid-configuration", openid_configuration, methods=["GET"]),
        Route("/.well-known/jwks.json", jwks, methods=["GET"]),
    )
