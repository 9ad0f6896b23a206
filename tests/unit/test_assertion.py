"""gateway.assertion: the signed identity assertion, its key set, its cache, and its config."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from support.fakes import RecordingUpstream

from gateway.app import Gateway, create_app
from gateway.assertion import Assertion, thumbprint
from gateway.config import AssertionConfig, parse_config, validate_files
from gateway.routing import compile_route

SECRET = "assertion-tests-secret-0123456789abcdef"
UPSTREAM = "http://127.0.0.1:9/base"
PATHS = ["sub", "email", "roles", "realm_access.roles"]


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def write_key(path: Path, key: Any) -> str:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    path.write_bytes(pem)
    return str(path)


@pytest.fixture
def ec_key(tmp_path: Path) -> str:
    return write_key(tmp_path / "ec.pem", ec.generate_private_key(ec.SECP256R1()))


def route(name: str = "app", upstream: str = UPSTREAM) -> Any:
    from gateway.config import RouteConfig

    return compile_route(RouteConfig(name=name, path="/", upstream=upstream))


def verify(value: str, jwks: dict[str, Any], audience: str = UPSTREAM, **options: Any) -> dict[str, Any]:
    """What an upstream does: the key from the JWKS by kid, the algorithm pinned, the audience its own."""
    kid = jwt.get_unverified_header(value)["kid"]
    jwk = next(k for k in jwks["keys"] if k["kid"] == kid)
    key = jwt.PyJWK(jwk)
    claims: dict[str, Any] = jwt.decode(value, key, algorithms=[jwk["alg"]], audience=audience, **options)
    return claims


CLAIMS = {
    "sub": "alice",
    "email": "alice@example.com",
    "roles": ["user", "admin"],
    "realm_access": {"roles": ["a"]},
    "is_staff": True,
    "exp": 4_000_000_000,
}


# --- signing ---


def test_the_assertion_verifies_with_the_jwks_and_carries_the_identity(ec_key: str) -> None:
    clock = Clock()
    signer = Assertion(AssertionConfig(private_key_file=ec_key, issuer="https://gw.example"), PATHS, clock)
    name, value = signer.header("token-1", CLAIMS, route())
    assert name == "x-gateway-assertion"
    claims = verify(value, signer.jwks, issuer="https://gw.example")
    assert claims["sub"] == "alice" and claims["email"] == "alice@example.com"
    assert claims["roles"] == ["user", "admin"] and claims["realm_access"] == {"roles": ["a"]}
    assert "is_staff" not in claims  # only what the identity headers are built from
    assert claims["aud"] == UPSTREAM and claims["exp"] - claims["iat"] == 60
    assert jwt.get_unverified_header(value)["alg"] == "ES256"


def test_the_audience_is_the_routes_upstream_and_another_upstream_refuses_it(ec_key: str) -> None:
    signer = Assertion(AssertionConfig(private_key_file=ec_key), PATHS, Clock())
    _, value = signer.header("token-1", CLAIMS, route())
    with pytest.raises(jwt.InvalidAudienceError):
        verify(value, signer.jwks, audience="http://127.0.0.1:9/other")
    assert "iss" not in verify(value, signer.jwks)


def test_the_jwks_holds_the_public_key_only_with_kid_alg_use(ec_key: str) -> None:
    signer = Assertion(AssertionConfig(private_key_file=ec_key), PATHS, Clock())
    (jwk,) = signer.jwks["keys"]
    assert jwk["kid"] == thumbprint(jwk) and jwk["alg"] == "ES256" and jwk["use"] == "sig"
    assert "d" not in jwk  # never the private part
    named = Assertion(AssertionConfig(private_key_file=ec_key, key_id="k1"), PATHS, Clock())
    assert named.jwks["keys"][0]["kid"] == "k1"


def test_thumbprint_matches_rfc_7638_example() -> None:
    n = (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjB"
        "ZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8"
        "KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_"
        "xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    )
    jwk = {"kty": "RSA", "e": "AQAB", "alg": "RS256", "kid": "2011-04-29", "n": n}
    assert thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


@pytest.mark.parametrize(
    ("algorithm", "make"),
    [
        ("RS256", lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        ("PS256", lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048)),
        ("ES384", lambda: ec.generate_private_key(ec.SECP384R1())),
        ("EdDSA", ed25519.Ed25519PrivateKey.generate),
    ],
)
def test_every_offered_algorithm_verifies_with_its_jwks(tmp_path: Path, algorithm: str, make: Any) -> None:
    key = write_key(tmp_path / "key.pem", make())
    signer = Assertion(AssertionConfig(private_key_file=key, algorithm=algorithm), PATHS, Clock())
    assert verify(signer.header("t", CLAIMS, route())[1], signer.jwks)["sub"] == "alice"


# --- the cache ---


def test_one_assertion_serves_until_half_its_ttl_then_a_new_one_is_signed(ec_key: str) -> None:
    clock = Clock()
    signer = Assertion(AssertionConfig(private_key_file=ec_key, ttl=60), PATHS, clock)
    first = signer.header("token-1", CLAIMS, route())
    clock.now += 29
    assert signer.header("token-1", CLAIMS, route()) == first  # kept: 31 s of it left
    clock.now += 2
    renewed = signer.header("token-1", CLAIMS, route())
    assert renewed != first
    assert verify(renewed[1], signer.jwks, options={"verify_exp": False, "verify_iat": False})["iat"] == int(clock.now)


def test_a_key_rollover_publishes_the_next_key_before_signing_with_it(tmp_path: Path, ec_key: str) -> None:
    """Upstreams cache the JWKS: a new key must be in it before the first assertion signed with it arrives."""
    next_key = ec.generate_private_key(ec.SECP256R1())
    next_private = write_key(tmp_path / "next.pem", next_key)
    next_public = tmp_path / "next.pub"
    next_public.write_bytes(
        next_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    before = Assertion(AssertionConfig(private_key_file=ec_key, publish_key_files=(str(next_public),)), PATHS, Clock())
    assert len(before.jwks["keys"]) == 2 and all("d" not in k for k in before.jwks["keys"])
    # The switch: the new key signs, the old one stays published; both JWKS verify what the new key signs.
    after = Assertion(AssertionConfig(private_key_file=next_private, publish_key_files=(ec_key,)), PATHS, Clock())
    signed = after.header("token", CLAIMS, route())[1]
    assert verify(signed, before.jwks)["sub"] == "alice"
    assert verify(before.header("token", CLAIMS, route())[1], after.jwks)["sub"] == "alice"
    assert {k["kid"] for k in before.jwks["keys"]} == {k["kid"] for k in after.jwks["keys"]}


def test_published_keys_are_checked_and_named(tmp_path: Path, ec_key: str) -> None:
    rsa_key = write_key(tmp_path / "rsa.pem", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    data = _config({"private_key_file": ec_key, "publish_key_files": [ec_key, rsa_key, str(tmp_path / "gone.pem")]})
    problems = validate_files(parse_config(data, env={}))
    assert problems[0].startswith("identity.assertion.publish_key_files[1]: ") and "ES256" in problems[0]
    assert problems[1].startswith("identity.assertion.publish_key_files[2]: ") and "cannot read" in problems[1]
    assert len(problems) == 2


def test_the_cache_is_per_token_and_per_route(ec_key: str) -> None:
    signer = Assertion(AssertionConfig(private_key_file=ec_key), PATHS, Clock())
    first = signer.header("token-1", CLAIMS, route())[1]
    assert signer.header("token-2", {**CLAIMS, "sub": "bob"}, route())[1] != first
    other = signer.header("token-1", CLAIMS, route("other", "http://127.0.0.1:8"))[1]
    assert verify(other, signer.jwks, audience="http://127.0.0.1:8")["sub"] == "alice"


# --- config ---


def _config(assertion: dict[str, Any], headers: dict[str, str] | None = None) -> dict[str, Any]:
    identity: dict[str, Any] = {"assertion": assertion}
    if headers is not None:
        identity["headers"] = headers
    return {
        "tokens": {"algorithms": ["HS256"], "secret": SECRET},
        "identity": identity,
        "routes": [{"name": "app", "path": "/", "upstream": UPSTREAM}],
    }


@pytest.mark.parametrize(
    ("assertion", "problem"),
    [
        ({"algorithm": "HS256"}, "identity.assertion.algorithm"),
        ({"algorithm": "none"}, "identity.assertion.algorithm"),
        ({"ttl": 0}, "identity.assertion.ttl"),
        ({"ttl": 7200}, "identity.assertion.ttl"),
        ({"header": "X Bad"}, "identity.assertion.header"),
        ({"private_key_file": None}, "identity.assertion.private_key_file"),
    ],
)
def test_bad_assertion_settings_are_named(assertion: dict[str, Any], problem: str) -> None:
    from gateway.errors import ConfigError

    data = {"private_key_file": "/k.pem", **assertion}
    with pytest.raises(ConfigError) as caught:
        parse_config(_config({k: v for k, v in data.items() if v is not None}), env={})
    assert any(p.startswith(problem + ":") for p in caught.value.problems), caught.value.problems


def test_key_files_are_checked_against_the_algorithm(tmp_path: Path, ec_key: str) -> None:
    rsa_key = write_key(tmp_path / "rsa.pem", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    weak = write_key(tmp_path / "weak.pem", rsa.generate_private_key(public_exponent=65537, key_size=1024))
    p384 = write_key(tmp_path / "p384.pem", ec.generate_private_key(ec.SECP384R1()))
    (tmp_path / "junk.pem").write_text("not a key")
    cases = {
        rsa_key: ("ES256", "is not a key for identity.assertion.algorithm ES256"),
        p384: ("ES256", "is not a key for identity.assertion.algorithm ES256"),
        weak: ("RS256", "1024-bit RSA key"),
        ec_key: ("RS256", "is not a key for identity.assertion.algorithm RS256"),
        str(tmp_path / "junk.pem"): ("ES256", "is not a PEM private key"),
        str(tmp_path / "missing.pem"): ("ES256", "cannot read"),
    }
    for path, (algorithm, message) in cases.items():
        config = parse_config(_config({"private_key_file": path, "algorithm": algorithm}), env={})
        (problem,) = validate_files(config)
        assert problem.startswith(f"identity.assertion.private_key_file: {path} ") or "cannot read" in problem
        assert message in problem, problem
    assert validate_files(parse_config(_config({"private_key_file": ec_key}), env={})) == []


def test_the_header_may_not_be_an_identity_header(ec_key: str) -> None:
    data = _config({"private_key_file": ec_key, "header": "x-auth-user"}, headers={"X-Auth-User": "sub"})
    assert validate_files(parse_config(data, env={})) == [
        "identity.assertion.header: x-auth-user is also an identity header"
    ]


def test_gateway_check_fails_with_exit_1_naming_the_key(tmp_path: Path) -> None:
    import yaml

    weak = write_key(tmp_path / "rsa.pem", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(_config({"private_key_file": weak})))
    done = subprocess.run([sys.executable, "-m", "gateway", "check", "--config", str(path)], capture_output=True)
    assert done.returncode == 1
    assert b"identity.assertion.private_key_file" in done.stderr and b"ES256" in done.stderr


# --- through the app ---


@pytest.fixture
def gateway(ec_key: str) -> tuple[Gateway, RecordingUpstream]:
    config = parse_config(
        {
            "server": {"access_log": False},
            "tokens": {"algorithms": ["HS256"], "secret": SECRET},
            "identity": {"assertion": {"private_key_file": ec_key}},
            "routes": [
                {"name": "public", "path": "/public/", "upstream": UPSTREAM, "auth": "none"},
                {"name": "maybe", "path": "/maybe/", "upstream": UPSTREAM, "auth": "optional"},
                {"name": "app", "path": "/", "upstream": UPSTREAM},
            ],
        },
        env={},
    )
    upstream = RecordingUpstream()
    return create_app(config, forwarder=upstream), upstream


async def get(app: Gateway, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        return await client.get(path, headers=headers)


def bearer(sub: str = "alice") -> dict[str, str]:
    token = jwt.encode({"sub": sub, "exp": int(time.time()) + 600}, SECRET, algorithm="HS256")
    return {"Authorization": f"Bearer {token}"}


async def test_authenticated_requests_carry_it_and_a_forged_one_is_replaced(
    gateway: tuple[Gateway, RecordingUpstream],
) -> None:
    app, upstream = gateway
    jwks = (await get(app, "/.gateway/.well-known/jwks.json")).json()
    forged = {"X-Gateway-Assertion": "forged", "x_gateway_assertion": "forged"}
    for _ in range(2):  # the second time from the admission fast path
        assert (await get(app, "/x", {**bearer(), **forged})).status_code == 200
        assert verify(upstream.seen[-1]["x-gateway-assertion"], jwks)["sub"] == "alice"
        assert "forged" not in upstream.seen[-1].values()
        assert not any(name.replace("_", "-") == "x-gateway-assertion" for name in upstream.seen[-1] if "_" in name)


async def test_anonymous_requests_carry_none(gateway: tuple[Gateway, RecordingUpstream]) -> None:
    app, upstream = gateway
    for path in ("/public/x", "/maybe/x"):
        assert (await get(app, path, {"X-Gateway-Assertion": "forged"})).status_code == 200
        assert "x-gateway-assertion" not in upstream.seen[-1]
    assert (await get(app, "/maybe/x", bearer("bob"))).status_code == 200
    assert "x-gateway-assertion" in upstream.seen[-1]  # optional, with a token: it does


async def test_the_jwks_endpoint_is_cacheable_and_absent_without_assertion(
    gateway: tuple[Gateway, RecordingUpstream],
) -> None:
    answer = await get(gateway[0], "/.gateway/.well-known/jwks.json")
    assert answer.status_code == 200 and answer.headers["cache-control"] == "public, max-age=300"
    plain = parse_config(
        {
            "tokens": {"algorithms": ["HS256"], "secret": SECRET},
            "routes": [{"name": "a", "path": "/", "upstream": UPSTREAM}],
        },
        env={},
    )
    assert (
        await get(create_app(plain, forwarder=RecordingUpstream()), "/.gateway/.well-known/jwks.json")
    ).status_code == 404
