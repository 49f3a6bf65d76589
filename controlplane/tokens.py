"""Runtime tokens: mint and verify the HS256 JWTs that name a VM (README "The control plane side").

A token carries ``sub`` (the VM id) and ``iat`` (integer seconds), optionally ``exp``, and an
optional ``kid`` header naming the secret that signed it, so secrets can rotate: the verifier
holds several, and a token is checked only against the one its kid names (the unnamed one
when it has no kid). A token is never shown anywhere: use ``fingerprint()``.

This module needs only the standard library and pyjwt, so a control plane can import it
without the proxy's other dependencies.

Exceptions::

    TokenError            base; every message is safe to show (never the token, never a secret)
    ├── InvalidToken      missing, malformed, bad signature, wrong alg, unknown kid, expired,
    │                     issued in the future, too old, sub or iat missing or mistyped
    ├── UnknownVM         well-formed and correctly signed, but the VM no longer exists
    └── SecretError       a secret that cannot be used: unreadable or empty file, shorter than
                          32 bytes, duplicate kid (raised while loading, never while verifying)
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import jwt
from jwt.exceptions import InvalidSubjectError

ALGORITHM = "HS256"
# RFC 7518 section 3.2: an HS256 key MUST be at least as long as the hash output.
MIN_SECRET_BYTES = 32


__all__ = [
    "Claims",
    "InvalidToken",
    "SecretError",
    "Secrets",
    "TokenError",
    "UnknownVM",
    "Verifier",
    "fingerprint",
    "load_secret_spec",
    "mint",
    "peek_claims",
]


class TokenError(Exception):
    """Base of this module's errors."""


class InvalidToken(TokenError):
    """The token is missing, malformed, wrongly signed or outside its validity window."""


class UnknownVM(TokenError):
    """The token is valid but names a VM that no longer exists."""


class SecretError(TokenError):
    """A secret (or a secret file) that cannot be used."""


def _checked_secret(secret: bytes, where: str) -> bytes:
    if not secret:
        raise SecretError(f"{where} is empty")
    if len(secret) < MIN_SECRET_BYTES:
        raise SecretError(f"{where} is {len(secret)} bytes long; HS256 needs at least {MIN_SECRET_BYTES}")
    return secret


def split_spec(spec: str, what: str) -> tuple[str | None, str]:
    """A key file option's spec, ``FILE`` or ``KID:FILE``, as ``(kid, path)``; ValueError
    naming `what` ("secret", "signing key") for an empty kid or path.

    The text before the first ``:`` is a kid only when the whole spec is not an existing
    path, so a file whose name contains ``:`` still works without a kid.
    """
    kid: str | None = None
    path = spec
    if ":" in spec and not os.path.exists(spec):
        kid, path = spec.split(":", 1)
        if not kid:
            raise ValueError(f"{what} spec {spec!r} has an empty key id before ':'")
    if not path:
        raise ValueError(f"a {what} spec names no file")
    return kid, path


def load_secret_spec(spec: str) -> tuple[str | None, bytes]:
    """Read a ``--secret-file`` spec, ``FILE`` or ``KID:FILE`` (`split_spec`), into ``(kid, secret)``.

    The file holds the raw secret; surrounding whitespace is ignored. Raises SecretError naming the file.
    """
    try:
        kid, path = split_spec(spec, "secret")
    except ValueError as exc:
        raise SecretError(str(exc)) from None
    try:
        secret = Path(path).read_bytes().strip()
    except OSError as exc:
        raise SecretError(f"cannot read secret file {path}: {exc.strerror or exc}") from None
    return kid, _checked_secret(secret, f"secret file {path}")


class Secrets:
    """An ordered, immutable set of HS256 secrets, each named by a kid or unnamed (kid None).

    The first one signs (``mint``); a token is verified by the one its kid names. At most one
    secret per kid, and at most one unnamed. The repr shows kids only.
    """

    __slots__ = ("_by_kid",)
    _by_kid: dict[str | None, bytes]

    def __init__(self, items: Iterable[tuple[str | None, bytes]]) -> None:
        by_kid: dict[str | None, bytes] = {}
        for kid, secret in items:
            if kid == "":
                raise SecretError("a key id must not be empty")
            name = "the unnamed secret" if kid is None else f"the secret for kid {kid!r}"
            if kid in by_kid:
                raise SecretError(f"{name} is given more than once")
            by_kid[kid] = _checked_secret(secret, name)
        if not by_kid:
            raise SecretError("no secret given")
        object.__setattr__(self, "_by_kid", by_kid)

    @classmethod
    def from_specs(cls, specs: Iterable[str]) -> Secrets:
        """Load ``--secret-file`` specs (see ``load_secret_spec``), in order."""
        return cls(load_secret_spec(spec) for spec in specs)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("Secrets is immutable")

    @property
    def signing(self) -> tuple[str | None, bytes]:
        """The first secret given, ``(kid, secret)``: the one that mints."""
        return next(iter(self._by_kid.items()))

    def get(self, kid: str | None) -> bytes | None:
        return self._by_kid.get(kid)

    @property
    def kids(self) -> tuple[str | None, ...]:
        return tuple(self._by_kid)

    def __len__(self) -> int:
        return len(self._by_kid)

    def __iter__(self) -> Iterator[str | None]:
        return iter(self._by_kid)

    def __repr__(self) -> str:
        return f"Secrets(kids={self.kids!r})"


@dataclass(frozen=True)
class Claims:
    """What a verified token says."""

    sub: str
    iat: int
    exp: int | None = None
    kid: str | None = None


def mint(
    vm_id: str,
    key: Secrets | tuple[str | None, bytes],
    *,
    lifetime: int | None = None,
    now: int | None = None,
) -> str:
    """Sign a runtime token for ``vm_id`` with the first secret of ``key`` (its kid, if any, in the header).

    ``exp`` is set to ``iat + lifetime`` when a lifetime is given; ``now`` overrides the clock.
    """
    if not isinstance(vm_id, str) or not vm_id:
        raise ValueError("vm_id must be a non-empty string")
    if lifetime is not None and lifetime <= 0:
        raise ValueError("lifetime must be a positive number of seconds")
    kid, secret = (key if isinstance(key, Secrets) else Secrets([key])).signing
    iat = int(time.time()) if now is None else int(now)
    claims: dict[str, object] = {"sub": vm_id, "iat": iat}
    if lifetime is not None:
        claims["exp"] = iat + lifetime
    return jwt.encode(claims, secret, algorithm=ALGORITHM, headers=None if kid is None else {"kid": kid})


class Verifier:
    """Verifies runtime tokens against a set of secrets (README "The control plane side").

    In order: alg is HS256 (nothing else, ``none`` included); the kid (or its absence) picks
    the one secret to try; signature; ``sub`` a non-empty string and ``iat`` an integer, both
    required; ``iat`` not more than ``leeway`` seconds in the future; ``exp``, when present,
    not more than ``leeway`` seconds past (pyjwt applies the one leeway to both); age since
    ``iat`` at most ``max_age``; finally ``vm_exists(sub)``, else UnknownVM.
    """

    def __init__(
        self,
        secrets: Secrets,
        *,
        vm_exists: Callable[[str], bool] | None = None,
        max_age: int | None = None,
        leeway: int = 60,
    ) -> None:
        self._secrets = secrets
        self._vm_exists = vm_exists
        self._max_age = max_age
        self._leeway = leeway

    def verify(self, token: str) -> Claims:
        """The claims of a valid token; raises InvalidToken, or UnknownVM when only the VM check fails."""
        if not token:
            raise InvalidToken("no token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise InvalidToken("token is not a well-formed JWT") from None
        if header.get("alg") != ALGORITHM:
            raise InvalidToken(f"token algorithm is not {ALGORITHM}")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise InvalidToken("token kid is not a string")
        secret = self._secrets.get(kid)
        if secret is None:
            raise InvalidToken("token kid is unknown" if kid is not None else "token has no kid and no unnamed secret")
        payload = self._decode(token, secret)

        sub, iat, exp = payload["sub"], payload["iat"], payload.get("exp")
        if not isinstance(sub, str) or not sub:
            raise InvalidToken("token sub is not a non-empty string")
        if isinstance(iat, bool) or not isinstance(iat, int):
            raise InvalidToken("token iat is not an integer")
        if exp is not None and (isinstance(exp, bool) or not isinstance(exp, int)):
            raise InvalidToken("token exp is not an integer")
        if self._max_age is not None and time.time() - iat > self._max_age:
            raise InvalidToken("token is older than the maximum age")
        if self._vm_exists is not None and not self._vm_exists(sub):
            raise UnknownVM(f"VM {sub!r} no longer exists")
        return Claims(sub=sub, iat=iat, exp=exp, kid=kid)

    def _decode(self, token: str, secret: bytes) -> dict[str, object]:
        # pyjwt's own messages are token-free too, but ours are fixed and say which rule failed.
        try:
            return jwt.decode(
                token,
                secret,
                algorithms=[ALGORITHM],
                options={"require": ["sub", "iat"], "enforce_minimum_key_length": True},
                leeway=self._leeway,
            )
        except jwt.InvalidSignatureError:
            raise InvalidToken("token signature does not verify") from None
        except jwt.ExpiredSignatureError:
            raise InvalidToken("token has expired") from None
        except jwt.ImmatureSignatureError:
            raise InvalidToken("token is issued in the future") from None
        except jwt.MissingRequiredClaimError as exc:
            raise InvalidToken(f"token has no {exc.claim} claim") from None
        except jwt.InvalidIssuedAtError:
            raise InvalidToken("token iat is not an integer") from None
        except InvalidSubjectError:
            raise InvalidToken("token sub is not a non-empty string") from None
        except jwt.DecodeError:
            raise InvalidToken("token is malformed") from None
        except jwt.InvalidTokenError:
            raise InvalidToken("token claims are invalid") from None


def fingerprint(token: str) -> str:
    """The only form in which a token is ever shown: ``sha256:`` and 16 hex digits of its hash."""
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()[:16]


def peek_claims(token: str) -> dict[str, object]:
    """Decode a token's claims WITHOUT checking its signature or times.

    For a holder of the token that has no secret (``hostagent``): it checks that the token
    parses as a JWT with a non-empty string ``sub`` and lets the caller read ``exp``.
    """
    try:
        claims: dict[str, object] = jwt.decode(token, options={"verify_signature": False})
    except jwt.InvalidTokenError:
        raise InvalidToken("token is not a well-formed JWT") from None
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise InvalidToken("token has no string sub claim")
    return claims
