"""gateway.tokens: access-token verification (algorithms and keys from config, never from the token)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from gateway.config import TokensConfig
from gateway.keys import StaticKey
from gateway.tokens import Verifier

NOW = 1_700_000_000.0
SECRET = "k" * 32
ISSUER = "https://idp.example/realms/main"


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def craft(header: dict[str, Any], payload: dict[str, Any], secret: bytes | None = None) -> str:
    """A JWT built by hand: HS256-signed with ``secret``, or with an empty signature."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}"
    signature = b"" if secret is None else hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def claims(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "alice", "exp": NOW + 300, "iat": NOW - 10}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def attacker_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def clock() -> Clock:
    return Clock()


Make = Callable[..., Verifier]


@pytest.fixture
def hs(clock: Clock) -> Make:
    def make(**config: Any) -> Verifier:
        tokens = TokensConfig(algorithms=("HS256",), secret=SECRET, leeway=30, refresh_before=30, **config)
        return Verifier(tokens, StaticKey(SECRET.encode()), clock)

    return make


@pytest.fixture
def rs(clock: Clock, rsa_key: rsa.RSAPrivateKey) -> Make:
    def make(**config: Any) -> Verifier:
        tokens = TokensConfig(algorithms=("RS256",), jwks_url="https://idp.example/jwks", **config)
        return Verifier(tokens, StaticKey(rsa_key.public_key()), clock)

    return make


def hs_token(payload: dict[str, Any], headers: dict[str, Any] | None = None) -> str:
    return jwt.encode(payload, SECRET, algorithm="HS256", headers=headers)


# --- valid tokens ---


async def test_valid_hs256(hs: Make) -> None:
    verdict = await hs().verify(hs_token(claims(email="a@example.com")))
    assert verdict.ok and verdict.reason is None and not verdict.refreshable
    assert verdict.claims is not None and verdict.claims["email"] == "a@example.com"
    assert verdict.exp == NOW + 300


async def test_valid_rs256(rs: Make, rsa_key: rsa.RSAPrivateKey) -> None:
    token = jwt.encode(claims(), rsa_key, algorithm="RS256", headers={"kid": "k1"})
    verdict = await rs().verify(token)
    assert verdict.ok and verdict.claims is not None and verdict.claims["sub"] == "alice"


@pytest.mark.parametrize("typ", ["JWT", "at+jwt", "application/at+jwt"])
async def test_access_token_types_accepted(hs: Make, typ: str) -> None:
    assert (await hs().verify(hs_token(claims(), {"typ": typ}))).ok


async def test_access_token_type_claim_accepted(hs: Make) -> None:
    assert (await hs().verify(hs_token(claims(token_type="access")))).ok


# --- algorithms come from config ---


@pytest.mark.parametrize("alg", ["none", "None", "nOnE", "NONE"])
async def test_alg_none_refused(hs: Make, alg: str) -> None:
    token = craft({"alg": alg, "typ": "JWT"}, claims())
    verdict = await hs().verify(token)
    assert not verdict.ok and verdict.reason == "alg_not_allowed"


async def test_alg_none_with_a_signature_refused(hs: Make) -> None:
    token = craft({"alg": "none"}, claims(), SECRET.encode())
    assert (await hs().verify(token)).reason == "alg_not_allowed"


@pytest.mark.parametrize("header", [{}, {"alg": None}, {"alg": ["HS256"]}, {"alg": "HS512"}])
async def test_missing_or_odd_alg_refused(hs: Make, header: dict[str, Any]) -> None:
    token = craft(header, claims(), SECRET.encode())
    assert (await hs().verify(token)).reason == "alg_not_allowed"


async def test_algorithm_confusion_hs256_with_rsa_public_key_refused(rs: Make, rsa_key: rsa.RSAPrivateKey) -> None:
    pem = rsa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    token = craft({"alg": "HS256", "typ": "JWT"}, claims(), pem)
    verdict = await rs().verify(token)
    assert not verdict.ok and verdict.reason == "alg_not_allowed"


async def test_bad_signature(hs: Make) -> None:
    token = jwt.encode(claims(), "x" * 32, algorithm="HS256")
    verdict = await hs().verify(token)
    assert not verdict.ok and verdict.reason == "bad_signature" and not verdict.refreshable


async def test_tampered_payload_refused(hs: Make) -> None:
    header, _, signature = hs_token(claims()).split(".")
    forged = f"{header}.{b64(json.dumps(claims(sub='admin')).encode())}.{signature}"
    assert (await hs().verify(forged)).reason == "bad_signature"


async def test_rs256_signed_by_another_key_refused(rs: Make, attacker_key: rsa.RSAPrivateKey) -> None:
    token = jwt.encode(claims(), attacker_key, algorithm="RS256")
    assert (await rs().verify(token)).reason == "bad_signature"


@pytest.mark.parametrize("field", ["jwk", "jku", "x5u"])
async def test_key_headers_from_the_token_are_ignored(rs: Make, attacker_key: rsa.RSAPrivateKey, field: str) -> None:
    value: Any = json.loads(RSAAlgorithm.to_jwk(attacker_key.public_key()))
    if field != "jwk":
        value = "https://attacker.example/keys"
    token = jwt.encode(claims(), attacker_key, algorithm="RS256", headers={field: value, "kid": "k1"})
    verdict = await rs().verify(token)
    assert not verdict.ok and verdict.reason == "bad_signature"


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        ({"crit": ["exp"], "exp": 1}, "malformed_token"),  # PyJWT itself refuses unknown crit names
        ({"crit": ["b64"], "b64": True}, "unsupported_crit"),  # PyJWT knows b64; we implement no extension
        ({"crit": "b64"}, "malformed_token"),
    ],
)
async def test_crit_header_refused(hs: Make, header: dict[str, Any], reason: str) -> None:
    token = craft({"alg": "HS256", **header}, claims(), SECRET.encode())
    verdict = await hs().verify(token)
    assert not verdict.ok and verdict.reason == reason


# --- issuer and audience ---


async def test_issuer_checked_when_configured(hs: Make) -> None:
    verifier = hs(issuer=ISSUER)
    assert (await verifier.verify(hs_token(claims(iss=ISSUER)))).ok
    assert (await verifier.verify(hs_token(claims(iss="https://evil.example")))).reason == "wrong_issuer"
    # Exact comparison, not substring (PyJWT 2.10.0, CVE-2024-53861).
    assert (await verifier.verify(hs_token(claims(iss=ISSUER[1:])))).reason == "wrong_issuer"
    assert not (await verifier.verify(hs_token(claims()))).ok


async def test_audience_checked_when_configured(hs: Make) -> None:
    verifier = hs(audience="legacy-app")
    assert (await verifier.verify(hs_token(claims(aud="legacy-app")))).ok
    assert (await verifier.verify(hs_token(claims(aud=["other", "legacy-app"])))).ok
    assert (await verifier.verify(hs_token(claims(aud="other-app")))).reason == "wrong_audience"
    missing = await verifier.verify(hs_token(claims()))
    assert not missing.ok and missing.reason == "missing_claim"


async def test_audience_not_checked_when_not_configured(hs: Make) -> None:
    assert (await hs().verify(hs_token(claims(aud="anything")))).ok


# --- time ---


async def test_missing_exp_refused(hs: Make) -> None:
    verdict = await hs().verify(hs_token(claims(exp=None)))
    assert not verdict.ok and verdict.reason == "missing_claim" and not verdict.refreshable


@pytest.mark.parametrize("sub", [None, "", "absent"])
async def test_token_without_sub_refused_by_default(hs: Make, sub: Any) -> None:
    """Regression (issue 14, item 12): an access token without `sub` was accepted and named nobody."""
    payload = claims()
    if sub == "absent":
        del payload["sub"]
    else:
        payload["sub"] = sub
    verdict = await hs().verify(hs_token(payload))
    assert not verdict.ok and verdict.reason == "missing_claim" and not verdict.refreshable


async def test_required_claims_are_configurable(hs: Make) -> None:
    assert (await hs(required_claims=("exp",)).verify(hs_token(claims(sub=None)))).ok
    strict = hs(required_claims=("exp", "sub", "jti"))
    assert (await strict.verify(hs_token(claims()))).reason == "missing_claim"
    assert (await strict.verify(hs_token(claims(jti="j1")))).ok


@pytest.mark.parametrize("exp", ["tomorrow", True, None])
async def test_non_numeric_exp_refused(hs: Make, exp: Any) -> None:
    payload = claims()
    payload["exp"] = exp
    assert not (await hs().verify(hs_token(payload))).ok


async def test_expired_is_refreshable(hs: Make) -> None:
    verdict = await hs().verify(hs_token(claims(exp=NOW - 31)))
    assert not verdict.ok and verdict.reason == "token_expired" and verdict.refreshable


async def test_expired_within_leeway_still_ok(hs: Make) -> None:
    verdict = await hs().verify(hs_token(claims(exp=NOW - 5)))
    assert verdict.ok and verdict.refreshable


async def test_expiring_within_refresh_before_is_ok_and_refreshable(hs: Make) -> None:
    verdict = await hs().verify(hs_token(claims(exp=NOW + 10, iat=NOW - 300)))
    assert verdict.ok and verdict.refreshable
    later = await hs().verify(hs_token(claims(exp=NOW + 31, iat=NOW - 300)))
    assert later.ok and not later.refreshable


async def test_short_lived_tokens_are_refreshed_at_half_their_life_not_always(
    hs: Make, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression (issue 12, failure 11): 10 s tokens with refresh_before 30 made every request call the IdP."""
    verifier = hs()
    fresh = await verifier.verify(hs_token(claims(iat=NOW - 2, exp=NOW + 8)))
    assert fresh.ok and not fresh.refreshable  # 8 s left of 10: not due yet
    due = await verifier.verify(hs_token(claims(iat=NOW - 6, exp=NOW + 4)))
    assert due.ok and due.refreshable  # under half its life left
    warnings = [r.getMessage() for r in caplog.records if "refresh_before" in r.getMessage()]
    assert warnings == [
        "access tokens live 10 s, less than tokens.refresh_before (30 s): refreshing 5 s before expiry instead; "
        "tokens.leeway (30 s) accepts them that long past expiry. Set refresh_before and leeway well below the "
        "token lifetime."
    ]  # once, with the numbers
    long_lived = await verifier.verify(hs_token(claims(iat=NOW - 10, exp=NOW + 50)))
    assert long_lived.ok and not long_lived.refreshable  # 60 s tokens keep the configured 30 s


async def test_nbf_beyond_leeway_refused_within_leeway_ok(hs: Make) -> None:
    future = await hs().verify(hs_token(claims(nbf=NOW + 31)))
    assert not future.ok and future.reason == "token_not_yet_valid"
    assert (await hs().verify(hs_token(claims(nbf=NOW + 29)))).ok


async def test_iat_far_in_the_future_refused(hs: Make) -> None:
    assert (await hs().verify(hs_token(claims(iat=NOW + 3600)))).reason == "token_not_yet_valid"


# --- garbage ---


@pytest.mark.parametrize(
    "token",
    [
        "",
        "abc",
        "a.b.c",
        "...",
        "..",
        "h\u00e9llo.w\u00f6rld.x",
        "\x00",
        "W10.e30.x",
        "e30.e30.",
        "Bearer x.y.z",
        "eyJhbGciOiJIUzI1NiJ9",
        "eyJhbGciOiJIUzI1NiJ9.!!!.###",
    ],
)
async def test_garbage_is_malformed_never_an_exception(hs: Make, token: str) -> None:
    verdict = await hs().verify(token)
    assert not verdict.ok and verdict.reason in {"malformed_token", "alg_not_allowed"}


async def test_non_object_payload_refused(hs: Make) -> None:
    header = b64(json.dumps({"alg": "HS256"}).encode())
    for payload in ("[1,2]", '"str"', "42"):
        signing_input = f"{header}.{b64(payload.encode())}"
        signature = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
        verdict = await hs().verify(f"{signing_input}.{b64(signature)}")
        assert not verdict.ok and verdict.reason == "malformed_token"


async def test_20kb_token_refused(hs: Make) -> None:
    token = hs_token(claims(padding="x" * 20_000))
    assert len(token) > 20_000
    verdict = await hs().verify(token)
    assert not verdict.ok and verdict.reason == "token_too_large"


# --- refresh tokens are not access tokens ---


@pytest.mark.parametrize("payload", [{"token_type": "refresh"}, {"typ": "Refresh"}, {"typ": "refresh"}])
async def test_refresh_token_claims_refused(hs: Make, payload: dict[str, Any]) -> None:
    verdict = await hs().verify(hs_token(claims(**payload)))
    assert not verdict.ok and verdict.reason == "wrong_token_type"


@pytest.mark.parametrize("typ", ["refresh", "Refresh", "JWE", 5])
async def test_refresh_typ_header_refused(hs: Make, typ: Any) -> None:
    verdict = await hs().verify(hs_token(claims(), {"typ": typ}))
    assert not verdict.ok and verdict.reason == "wrong_token_type"


# --- cache ---


@pytest.fixture
def decode_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    original = jwt.decode

    def counting(token: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(token)
        return original(token, *args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counting)
    return calls


async def test_repeated_token_skips_signature_check(hs: Make, decode_calls: list[str]) -> None:
    verifier = hs()
    token = hs_token(claims())
    first = await verifier.verify(token)
    second = await verifier.verify(token)
    assert first.ok and second.ok and second.claims == first.claims
    assert len(decode_calls) == 1


async def test_cached_token_expires_when_the_clock_moves(hs: Make, clock: Clock, decode_calls: list[str]) -> None:
    verifier = hs()
    token = hs_token(claims(exp=NOW + 100))
    assert (await verifier.verify(token)).ok
    clock.now = NOW + 80
    due = await verifier.verify(token)
    assert due.ok and due.refreshable
    clock.now = NOW + 131
    expired = await verifier.verify(token)
    assert not expired.ok and expired.reason == "token_expired" and expired.refreshable
    assert len(decode_calls) == 1


async def test_cache_is_keyed_on_the_whole_token(hs: Make, decode_calls: list[str]) -> None:
    verifier = hs()
    token = hs_token(claims())
    assert (await verifier.verify(token)).ok
    forged = token.rsplit(".", 1)[0] + "." + b64(b"\0" * 32)
    assert (await verifier.verify(forged)).reason == "bad_signature"


async def test_invalid_tokens_are_not_cached(hs: Make, decode_calls: list[str]) -> None:
    verifier = hs()
    token = jwt.encode(claims(), "y" * 32, algorithm="HS256")
    await verifier.verify(token)
    await verifier.verify(token)
    assert len(decode_calls) == 2
