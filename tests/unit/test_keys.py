"""gateway.keys: JWKS against a real HTTP server on loopback, and PEM public key files."""

from __future__ import annotations

import asyncio
import json
import threading
import warnings
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import RSAAlgorithm
from support.waiting import until

from gateway.config import TokensConfig
from gateway.errors import ConfigError, KeyFetchError
from gateway.keys import JWKSKeys, StaticKey, build_key_source, load_public_key
from gateway.tokens import Verifier


@pytest.fixture(scope="module")
def keys() -> dict[str, rsa.RSAPrivateKey]:
    return {kid: rsa.generate_private_key(public_exponent=65537, key_size=2048) for kid in ("k1", "k2", "evil")}


def jwk(key: rsa.RSAPrivateKey, kid: str, **extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    data.update(kid=kid, **extra)
    return data


class JWKSServer:
    """A real HTTP server on 127.0.0.1 serving ``jwks`` at /jwks (and anything at other paths); counts hits."""

    def __init__(self) -> None:
        self.jwks: dict[str, Any] = {"keys": []}
        self.status = 200
        self.headers: dict[str, str] = {}
        self.hits: dict[str, int] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                server.hits[self.path] = server.hits.get(self.path, 0) + 1
                body = json.dumps(server.jwks).encode()
                self.send_response(server.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for name, value in server.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}/jwks"
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.01,), daemon=True)
        self._thread.start()
        self.running = True

    @property
    def fetches(self) -> int:
        return self.hits.get("/jwks", 0)

    def stop(self) -> None:
        if self.running:
            self.running = False
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(5)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def server(keys: dict[str, rsa.RSAPrivateKey]) -> Iterator[JWKSServer]:
    srv = JWKSServer()
    srv.jwks = {"keys": [jwk(keys["k1"], "k1", alg="RS256", use="sig")]}
    yield srv
    srv.stop()


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient() as c:
        yield c


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def source(server: JWKSServer, client: httpx.AsyncClient, clock: Clock) -> AsyncIterator[JWKSKeys]:
    src = JWKSKeys(server.url, client, min_refetch=5.0, clock=clock)
    await src.start()
    assert server.fetches == 1
    yield src
    await src.close()


def public_numbers(key: Any) -> Any:
    return key.public_numbers()


async def test_known_kid_resolves_without_refetch(
    source: JWKSKeys, server: JWKSServer, keys: dict[str, rsa.RSAPrivateKey], clock: Clock
) -> None:
    clock.now += 60
    key = await source.key_for("k1", "RS256")
    assert public_numbers(key) == keys["k1"].public_key().public_numbers()
    assert server.fetches == 1


async def test_token_verifies_through_jwks(
    source: JWKSKeys, server: JWKSServer, keys: dict[str, rsa.RSAPrivateKey]
) -> None:
    verifier = Verifier(TokensConfig(algorithms=("RS256",), jwks_url=server.url), source)
    good = jwt.encode({"sub": "a", "exp": 4_000_000_000}, keys["k1"], algorithm="RS256", headers={"kid": "k1"})
    assert (await verifier.verify(good)).ok
    forged = jwt.encode({"sub": "a", "exp": 4_000_000_000}, keys["evil"], algorithm="RS256", headers={"kid": "k1"})
    assert (await verifier.verify(forged)).reason == "bad_signature"


async def test_jku_header_is_never_fetched(
    source: JWKSKeys, server: JWKSServer, keys: dict[str, rsa.RSAPrivateKey]
) -> None:
    verifier = Verifier(TokensConfig(algorithms=("RS256",), jwks_url=server.url), source)
    attacker_jwks = server.url.replace("/jwks", "/attacker")
    headers = {"kid": "k1", "jku": attacker_jwks, "x5u": attacker_jwks, "jwk": jwk(keys["evil"], "k1")}
    token = jwt.encode({"sub": "a", "exp": 4_000_000_000}, keys["evil"], algorithm="RS256", headers=headers)
    assert (await verifier.verify(token)).reason == "bad_signature"
    assert server.hits.get("/attacker", 0) == 0


async def test_unknown_kid_refetches_once_then_waits_min_refetch(
    source: JWKSKeys, server: JWKSServer, keys: dict[str, rsa.RSAPrivateKey], clock: Clock
) -> None:
    server.jwks = {"keys": [jwk(keys["k1"], "k1"), jwk(keys["k2"], "k2")]}  # the IdP rotated in k2
    clock.now += 10
    key = await source.key_for("k2", "RS256")
    assert key is not None and public_numbers(key) == keys["k2"].public_key().public_numbers()
    assert server.fetches == 2
    clock.now += 1
    assert await source.key_for("forged-1", "RS256") is None
    assert await source.key_for("forged-2", "RS256") is None
    assert server.fetches == 2  # within min_refetch: no hammering the IdP
    clock.now += 5
    assert await source.key_for("forged-3", "RS256") is None
    assert server.fetches == 3


async def test_concurrent_unknown_kids_cause_one_fetch(source: JWKSKeys, server: JWKSServer, clock: Clock) -> None:
    clock.now += 10
    results = await asyncio.gather(*(source.key_for(f"forged-{i}", "RS256") for i in range(20)))
    assert results == [None] * 20
    assert server.fetches == 2


async def test_server_down_keeps_last_good_keys(
    source: JWKSKeys, server: JWKSServer, keys: dict[str, rsa.RSAPrivateKey], clock: Clock
) -> None:
    server.stop()
    clock.now += 10
    with pytest.raises(KeyFetchError):  # refetch fails: the new kid may be genuine (503, not 401)
        await source.key_for("k-new", "RS256")
    clock.now += 10
    key = await source.key_for("k1", "RS256")
    assert key is not None and public_numbers(key) == keys["k1"].public_key().public_numbers()


async def test_server_error_keeps_last_good_keys(
    source: JWKSKeys, server: JWKSServer, keys: dict[str, rsa.RSAPrivateKey], clock: Clock
) -> None:
    server.status = 503
    server.jwks = {"keys": []}
    clock.now += 10
    with pytest.raises(KeyFetchError):
        await source.key_for("k-new", "RS256")
    assert server.fetches == 2
    assert await source.key_for("k1", "RS256") is not None


async def test_garbage_jwks_keeps_last_good_keys(
    source: JWKSKeys, server: JWKSServer, keys: dict[str, rsa.RSAPrivateKey], clock: Clock
) -> None:
    server.jwks = {"not": "a jwks"}
    clock.now += 10
    with pytest.raises(KeyFetchError):
        await source.key_for("k-new", "RS256")
    assert server.fetches == 2
    assert await source.key_for("k1", "RS256") is not None


async def test_start_with_server_down_does_not_raise(client: httpx.AsyncClient, clock: Clock) -> None:
    srv = JWKSServer()
    srv.stop()
    src = JWKSKeys(srv.url, client, clock=clock)
    await src.start()
    with pytest.raises(KeyFetchError):
        await src.key_for("k1", "RS256")
    await src.close()


async def test_encryption_keys_and_alg_mismatch_are_not_used(
    server: JWKSServer, client: httpx.AsyncClient, keys: dict[str, rsa.RSAPrivateKey], clock: Clock
) -> None:
    server.jwks = {"keys": [jwk(keys["k1"], "enc", use="enc"), jwk(keys["k2"], "rs384", alg="RS384")]}
    src = JWKSKeys(server.url, client, clock=clock)
    await src.start()
    assert await src.key_for("enc", "RS256") is None
    assert await src.key_for("rs384", "RS256") is None
    assert await src.key_for("rs384", "RS384") is not None
    await src.close()


async def test_an_unknown_kid_while_the_jwks_is_down_stays_unavailable_until_a_fetch_succeeds(
    source: JWKSKeys, server: JWKSServer, keys: dict[str, rsa.RSAPrivateKey], clock: Clock
) -> None:
    """Regression (issue 14, item 13): an unknown kid with the JWKS down was a 401, which logs the user out."""
    server.status = 503
    clock.now += 10
    with pytest.raises(KeyFetchError):
        await source.key_for("k2", "RS256")
    clock.now += 1
    with pytest.raises(KeyFetchError):  # within min_refetch: not fetched again, still not known to be forged
        await source.key_for("forged", "RS256")
    assert server.fetches == 2
    server.status = 200
    clock.now += 5
    assert await source.key_for("forged", "RS256") is None  # the JWKS answered: now a plain unknown kid (401)
    assert server.fetches == 3


async def test_weak_keys_in_a_jwks_are_ignored_with_a_warning(
    server: JWKSServer,
    client: httpx.AsyncClient,
    keys: dict[str, rsa.RSAPrivateKey],
    clock: Clock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Issue 14, item 12: a 1024-bit RSA key (or a symmetric key) published in a JWKS is never used."""
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    oct_key = {"kty": "oct", "kid": "shared", "k": "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LXNlY3JldA"}
    server.jwks = {"keys": [jwk(keys["k1"], "k1"), jwk(weak, "weak", alg="RS256"), oct_key]}
    src = JWKSKeys(server.url, client, clock=clock)
    with caplog.at_level("WARNING", logger="gateway.keys"):
        await src.start()
    try:
        assert await src.key_for("weak", "RS256") is None
        assert await src.key_for("shared", "RS256") is None
        assert await src.key_for("k1", "RS256") is not None
        assert "kid=weak" in caplog.text and "1024-bit RSA" in caplog.text and "kid=shared" in caplog.text
        verifier = Verifier(TokensConfig(algorithms=("RS256",), jwks_url=server.url), src)
        with warnings.catch_warnings():  # PyJWT warns when signing with a short key (the attacker's problem)
            warnings.simplefilter("ignore")
            signed = jwt.encode({"sub": "a", "exp": 4_000_000_000}, weak, algorithm="RS256", headers={"kid": "weak"})
        assert (await verifier.verify(signed)).reason == "unknown_key"
    finally:
        await src.close()


@pytest.mark.parametrize(
    ("headers", "refresh_in"),
    [
        ({}, 600),  # nothing said: tokens.jwks_max_age
        ({"Cache-Control": "public, max-age=300"}, 300),
        ({"Cache-Control": "max-age=300", "Age": "100"}, 200),  # a cache in front already held it 100 s
        ({"Cache-Control": "max-age=5"}, 60),  # never more often than MIN_MAX_AGE
        ({"Cache-Control": "no-cache"}, 60),
        ({"Cache-Control": "max-age=86400"}, 600),  # never longer than tokens.jwks_max_age
        ({"Cache-Control": "max-age=soon"}, 600),
    ],
)
async def test_the_next_fetch_follows_cache_control_max_age_within_bounds(
    server: JWKSServer, client: httpx.AsyncClient, clock: Clock, headers: dict[str, str], refresh_in: float
) -> None:
    server.headers = headers
    src = JWKSKeys(server.url, client, max_age=600, clock=clock)
    await src.start()
    await src.close()
    assert src.refresh_in == refresh_in


async def test_a_failed_fetch_is_retried_within_a_minute(server: JWKSServer, client: httpx.AsyncClient) -> None:
    server.status = 503
    src = JWKSKeys(server.url, client, max_age=600)
    await src.start()
    await src.close()
    assert src.refresh_in == 60


async def test_the_jwks_is_fetched_again_on_a_timer_and_a_removed_key_stops_being_trusted(
    server: JWKSServer, client: httpx.AsyncClient, keys: dict[str, rsa.RSAPrivateKey]
) -> None:
    """Regression (issue 14, item 13): the JWKS was fetched only on an unknown kid, so a key the IdP removed
    stayed trusted until restart, and so did every token the verifier had cached."""
    src = JWKSKeys(server.url, client, max_age=0.05, min_refetch=3600)
    verifier = Verifier(TokensConfig(algorithms=("RS256",), jwks_url=server.url), src)
    changes: list[int] = []
    src.on_change(lambda: changes.append(server.fetches))
    await src.start()
    try:
        old = jwt.encode({"sub": "a", "exp": 4_000_000_000}, keys["k1"], algorithm="RS256", headers={"kid": "k1"})
        assert (await verifier.verify(old)).ok
        server.jwks = {"keys": [jwk(keys["k2"], "k2")]}  # the IdP dropped k1
        await until(lambda: server.fetches >= 2, "a scheduled fetch")
        await until(lambda: bool(changes), "the removal noticed")
        assert (await verifier.verify(old)).reason == "unknown_key"  # the cached verdict went with the key
        new = jwt.encode({"sub": "a", "exp": 4_000_000_000}, keys["k2"], algorithm="RS256", headers={"kid": "k2"})
        assert (await verifier.verify(new)).ok
        server.status = 503  # an outage keeps the last good keys
        fetched = server.fetches
        await until(lambda: server.fetches >= fetched + 2, "fetches through the outage")
        assert (await verifier.verify(new)).ok
    finally:
        await src.close()
    stopped = server.fetches
    await asyncio.sleep(0.2)
    assert server.fetches == stopped  # close() stops the timer


async def test_single_key_serves_tokens_without_kid(source: JWKSKeys) -> None:
    assert await source.key_for(None, "RS256") is not None


# --- PEM files ---


def _pem_public(key: Any) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_load_public_key_from_pem(tmp_path: Path, keys: dict[str, rsa.RSAPrivateKey]) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(_pem_public(keys["k1"]))
    key = load_public_key(str(path), ("RS256",))
    assert key.public_numbers() == keys["k1"].public_key().public_numbers()


def test_load_ec_public_key(tmp_path: Path) -> None:
    path = tmp_path / "ec.pem"
    path.write_bytes(_pem_public(ec.generate_private_key(ec.SECP256R1())))
    assert load_public_key(str(path), ("ES256",)) is not None


def test_missing_key_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_public_key(str(tmp_path / "missing.pem"), ("RS256",))
    assert info.value.problems[0].startswith("tokens.public_key_file")


@pytest.mark.parametrize(
    "content", [b"not a key at all", b"", b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"]
)
def test_key_file_that_is_not_a_key_is_a_config_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.pem"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_public_key(str(path), ("RS256",))
    assert info.value.problems[0].startswith("tokens.public_key_file")


def test_private_key_file_is_a_config_error(tmp_path: Path, keys: dict[str, rsa.RSAPrivateKey]) -> None:
    """Regression: a private key in public_key_file made every verification raise AttributeError (500)."""
    path = tmp_path / "private.pem"
    path.write_bytes(
        keys["k1"].private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(ConfigError) as info:
        load_public_key(str(path), ("RS256",))
    assert info.value.problems[0].startswith("tokens.public_key_file")


def test_ec_key_for_rs_algorithms_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "ec.pem"
    path.write_bytes(_pem_public(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(ConfigError):
        load_public_key(str(path), ("RS256",))


async def test_build_key_source_picks_the_configured_source(tmp_path: Path, client: httpx.AsyncClient) -> None:
    secret = build_key_source(TokensConfig(algorithms=("HS256",), secret="s" * 32), client)
    assert isinstance(secret, StaticKey) and await secret.key_for("any", "HS256") == b"s" * 32
    jwks = build_key_source(TokensConfig(algorithms=("RS256",), jwks_url="http://127.0.0.1:1/jwks"), client)
    assert isinstance(jwks, JWKSKeys)
    with pytest.raises(ConfigError) as info:
        build_key_source(TokensConfig(algorithms=("RS256",), public_key_file=str(tmp_path / "nope.pem")), client)
    assert "tokens.public_key_file" in str(info.value)


async def test_a_jwks_nested_past_the_json_parsers_depth_is_a_failed_fetch_not_a_crash(clock: Clock) -> None:
    """Regression: a deeply nested JWKS raised RecursionError out of key_for: a 500 on every unknown kid."""
    nested = b'{"keys": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "application/json"}, content=nested)

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        src = JWKSKeys("https://idp.test/jwks", http, clock=clock)
        with pytest.raises(KeyFetchError):
            await src._fetch()
