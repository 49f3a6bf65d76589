"""controlplane.tokens as pure functions: mint, verify, rotation, refusals, secret files."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from pathlib import Path

import jwt
import pytest

from controlplane.tokens import (
    Claims,
    InvalidToken,
    SecretError,
    Secrets,
    TokenError,
    UnknownVM,
    Verifier,
    fingerprint,
    load_secret_spec,
    mint,
    peek_claims,
)

# 64 bytes each, so that pyjwt signs HS512 with them too without a key-length warning.
S0 = b"unnamed-secret-".ljust(64, b"0")
S1 = b"kid-one-secret-".ljust(64, b"1")
S2 = b"kid-two-secret-".ljust(64, b"2")


def b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def sign(header: dict[str, object], claims: dict[str, object], secret: bytes = S0) -> str:
    """A token with any header at all, HMAC-SHA256 signed: shapes pyjwt refuses to encode."""
    signing_input = f"{b64(header)}.{b64(claims)}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def encode(claims: dict[str, object], secret: bytes = S0, **headers: object) -> str:
    """A token built by pyjwt directly, to make the shapes mint() never would."""
    return jwt.encode(claims, secret, algorithm="HS256", headers=headers or None)


def now() -> int:
    return int(time.time())


def test_round_trip() -> None:
    t = now()
    token = mint("vm-1", Secrets([(None, S0)]), now=t)
    assert Verifier(Secrets([(None, S0)])).verify(token) == Claims(sub="vm-1", iat=t, exp=None, kid=None)
    assert "kid" not in jwt.get_unverified_header(token)


def test_lifetime_sets_exp_and_tuple_key() -> None:
    token = mint("vm-1", ("k1", S1), lifetime=300)
    claims = Verifier(Secrets([("k1", S1)])).verify(token)
    assert claims.exp == claims.iat + 300 and claims.kid == "k1"
    assert jwt.get_unverified_header(token)["kid"] == "k1"


def test_mint_signs_with_first_secret() -> None:
    token = mint("vm-1", Secrets([("k2", S2), (None, S0), ("k1", S1)]))
    assert jwt.get_unverified_header(token)["kid"] == "k2"
    jwt.decode(token, S2, algorithms=["HS256"])  # raises if another secret signed it


def test_rotation_each_token_checked_only_against_its_secret() -> None:
    verifier = Verifier(Secrets([("k1", S1), ("k2", S2), (None, S0)]))
    for key in [("k1", S1), ("k2", S2), (None, S0)]:
        assert verifier.verify(mint("vm-1", key)).sub == "vm-1"
    claims = {"sub": "vm-1", "iat": now()}
    with pytest.raises(InvalidToken, match="signature"):
        verifier.verify(encode(claims, S2, kid="k1"))  # valid for k2, but it says k1
    with pytest.raises(InvalidToken, match="signature"):
        verifier.verify(encode(claims, S1))  # no kid: only the unnamed secret may verify it
    with pytest.raises(InvalidToken, match="kid is unknown"):
        verifier.verify(encode(claims, S1, kid="k9"))


def test_token_without_kid_refused_when_only_named_secrets() -> None:
    with pytest.raises(InvalidToken, match="no kid"):
        Verifier(Secrets([("k1", S1)])).verify(encode({"sub": "vm-1", "iat": now()}, S1))


def test_kid_not_a_string_refused() -> None:
    with pytest.raises(InvalidToken):
        Verifier(Secrets([(None, S0)])).verify(sign({"alg": "HS256", "kid": 7}, {"sub": "vm-1", "iat": now()}))


def test_other_algorithms_refused() -> None:
    verifier = Verifier(Secrets([(None, S0)]))
    claims: dict[str, object] = {"sub": "vm-1", "iat": now()}
    unsigned = jwt.encode(claims, "", algorithm="none")
    hs512 = jwt.encode(claims, S0, algorithm="HS512")
    # An RS256 header over an HMAC signature: the classic key-confusion attack.
    rs256 = sign({"alg": "RS256", "typ": "JWT"}, claims)
    for token in [unsigned, hs512, rs256]:
        with pytest.raises(InvalidToken, match="algorithm is not HS256"):
            verifier.verify(token)


@pytest.mark.parametrize("token", ["", "garbage", "a.b.c", "a.b", "Bearer x.y.z"])
def test_malformed_refused(token: str) -> None:
    with pytest.raises(InvalidToken):
        Verifier(Secrets([(None, S0)])).verify(token)


def test_tampered_payload_refused() -> None:
    header, _, signature = mint("vm-1", (None, S0)).split(".")
    forged = f"{header}.{b64({'sub': 'vm-2', 'iat': now()})}.{signature}"
    with pytest.raises(InvalidToken, match="signature"):
        Verifier(Secrets([(None, S0)])).verify(forged)


@pytest.mark.parametrize(
    ("claims", "message"),
    [
        ({"iat": 0}, "no sub claim"),
        ({"sub": "vm-1"}, "no iat claim"),
        ({"sub": "", "iat": 0}, "sub is not a non-empty string"),
        ({"sub": 42, "iat": 0}, "sub is not a non-empty string"),
        ({"sub": "vm-1", "iat": "soon"}, "iat is not an integer"),
        ({"sub": "vm-1", "iat": 0.5}, "iat is not an integer"),
        ({"sub": "vm-1", "iat": True}, "iat is not an integer"),
        ({"sub": "vm-1", "iat": 0, "exp": "later"}, "malformed"),
    ],
)
def test_claims_required_and_typed(claims: dict[str, object], message: str) -> None:
    claims = {k: now() + v if k in ("iat", "exp") and type(v) is int else v for k, v in claims.items()}
    with pytest.raises(InvalidToken, match=message):
        Verifier(Secrets([(None, S0)])).verify(encode(claims))


def test_iat_in_future_beyond_leeway_refused_within_accepted() -> None:
    verifier = Verifier(Secrets([(None, S0)]))
    assert verifier.verify(mint("vm-1", (None, S0), now=now() + 30)).sub == "vm-1"
    with pytest.raises(InvalidToken, match="future"):
        verifier.verify(mint("vm-1", (None, S0), now=now() + 120))
    with pytest.raises(InvalidToken, match="future"):
        Verifier(Secrets([(None, S0)]), leeway=0).verify(mint("vm-1", (None, S0), now=now() + 30))


def test_exp_passed_refused() -> None:
    verifier = Verifier(Secrets([(None, S0)]))
    with pytest.raises(InvalidToken, match="expired"):
        verifier.verify(mint("vm-1", (None, S0), lifetime=10, now=now() - 200))
    assert verifier.verify(mint("vm-1", (None, S0), lifetime=10, now=now() - 5)).sub == "vm-1"


def test_max_age() -> None:
    token = mint("vm-1", (None, S0), now=now() - 100)
    assert Verifier(Secrets([(None, S0)]), max_age=200).verify(token).sub == "vm-1"
    with pytest.raises(InvalidToken, match="older"):
        Verifier(Secrets([(None, S0)]), max_age=50).verify(token)


def test_vm_exists_callback() -> None:
    asked: list[str] = []

    def exists(vm_id: str) -> bool:
        asked.append(vm_id)
        return vm_id == "vm-1"

    verifier = Verifier(Secrets([(None, S0)]), vm_exists=exists)
    assert verifier.verify(mint("vm-1", (None, S0))).sub == "vm-1"
    with pytest.raises(UnknownVM, match="vm-2"):
        verifier.verify(mint("vm-2", (None, S0)))
    assert asked == ["vm-1", "vm-2"]
    # An invalid token never reaches the callback.
    with pytest.raises(InvalidToken):
        verifier.verify(mint("vm-3", (None, S1)))
    assert asked == ["vm-1", "vm-2"]


def test_hierarchy() -> None:
    assert issubclass(InvalidToken, TokenError) and issubclass(UnknownVM, TokenError)
    assert not issubclass(UnknownVM, InvalidToken) and issubclass(SecretError, TokenError)


def test_fingerprint() -> None:
    token = mint("vm-1", (None, S0))
    shown = fingerprint(token)
    assert re.fullmatch(r"sha256:[0-9a-f]{16}", shown)
    assert shown == fingerprint(token) != fingerprint(mint("vm-2", (None, S0)))
    assert not any(part in shown for part in token.split("."))


def test_peek_claims_does_not_verify() -> None:
    token = mint("vm-1", (None, S1), lifetime=1, now=1000)  # expired, and signed with a secret peek never sees
    assert peek_claims(token) == {"sub": "vm-1", "iat": 1000, "exp": 1001}
    for bad in ["", "not-a-jwt", encode({"iat": 1}), encode({"sub": 5, "iat": 1}), encode({"sub": "", "iat": 1})]:
        with pytest.raises(InvalidToken):
            peek_claims(bad)


def test_error_messages_never_contain_the_token() -> None:
    t = now()
    verifier = Verifier(Secrets([("k1", S1), (None, S0)]), vm_exists=lambda _: False, max_age=10)
    tokens = [
        "eyJhbGciOiJub25lIn0.eyJzdWIiOiJ2bS0xIn0.",
        encode({"sub": "vm-1", "iat": t}, S2),
        encode({"sub": "vm-1", "iat": t}, S1, kid="k2"),
        encode({"sub": "vm-1", "iat": t + 999}),
        encode({"sub": "vm-1", "iat": t - 500, "exp": t - 400}),
        encode({"sub": "vm-1", "iat": t - 50}),
        encode({"iat": t}),
        encode({"sub": "vm-1", "iat": t}),  # valid, but the VM is gone
    ]
    for token in tokens:
        with pytest.raises(TokenError) as caught:
            verifier.verify(token)
        shown = f"{caught.value} {caught.value!r}"
        assert not any(part and part in shown for part in token.split(".")), shown
        # No pyjwt exception chained on, whose text a traceback would print too.
        assert caught.value.__cause__ is None
        assert caught.value.__context__ is None or caught.value.__suppress_context__


def test_secret_file_strips_whitespace(tmp_path: Path) -> None:
    (tmp_path / "s").write_bytes(b"  \n" + S0 + b"\n\t ")
    assert load_secret_spec(str(tmp_path / "s")) == (None, S0)
    assert load_secret_spec(f"k1:{tmp_path / 's'}") == ("k1", S0)


def test_secret_file_path_with_colon(tmp_path: Path) -> None:
    (tmp_path / "a:b").write_bytes(S0)
    assert load_secret_spec(str(tmp_path / "a:b")) == (None, S0)  # an existing path wins
    (tmp_path / "b").write_bytes(S1)
    assert load_secret_spec(f"a:{tmp_path / 'b'}") == ("a", S1)


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "is empty"), (b" \n ", "is empty"), (b"short", "5 bytes long; HS256 needs at least 32")],
)
def test_secret_file_unusable(tmp_path: Path, content: bytes, message: str) -> None:
    (tmp_path / "s").write_bytes(content)
    with pytest.raises(SecretError, match=message) as caught:
        load_secret_spec(f"k1:{tmp_path / 's'}")
    assert str(tmp_path / "s") in str(caught.value)


def test_secret_file_missing_or_bad_spec(tmp_path: Path) -> None:
    missing = tmp_path / "missing"
    with pytest.raises(SecretError, match=f"cannot read secret file {missing}: No such file"):
        load_secret_spec(f"k1:{missing}")
    with pytest.raises(SecretError, match="empty key id"):
        load_secret_spec(f":{missing}")
    with pytest.raises(SecretError, match="names no file"):
        load_secret_spec("k1:")


def test_secrets_set(tmp_path: Path) -> None:
    (tmp_path / "s0").write_bytes(S0)
    (tmp_path / "s1").write_bytes(S1)
    secrets = Secrets.from_specs([f"k1:{tmp_path / 's1'}", str(tmp_path / "s0")])
    assert secrets.kids == ("k1", None) and secrets.signing == ("k1", S1) and secrets.get(None) == S0
    assert len(secrets) == 2 and list(secrets) == ["k1", None] and secrets.get("k2") is None
    assert repr(secrets) == "Secrets(kids=('k1', None))"
    with pytest.raises(AttributeError):
        secrets._by_kid = {}
    refused: list[tuple[list[tuple[str | None, bytes]], str]] = [
        ([], "no secret"),
        ([(None, S0), (None, S1)], "unnamed secret is given more than once"),
        ([("k1", S0), ("k1", S1)], "'k1' is given more than once"),
        ([("", S0)], "key id must not be empty"),
        ([("k1", b"x" * 31)], "31 bytes long"),
    ]
    for items, message in refused:
        with pytest.raises(SecretError, match=message):
            Secrets(items)


def test_mint_arguments() -> None:
    with pytest.raises(ValueError):
        mint("", (None, S0))
    with pytest.raises(ValueError):
        mint("vm-1", (None, S0), lifetime=0)
    with pytest.raises(SecretError):
        mint("vm-1", (None, b"short"))
