"""The signed identity assertion through `gateway serve --workers 2`, checked by an upstream that verifies it with
PyJWT from the gateway's JWKS endpoint (support.verifying_upstream), as an app would."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from support.servers import GatewayProcess, ServerProcess, start_gateway
from support.verifying_upstream import VerifyingUpstream
from support.workers import WorkerClients
from websockets.sync.client import connect

SECRET = "assertion-integration-secret-0123456789"
JWKS = "/.gateway/.well-known/jwks.json"


@pytest.fixture(scope="module")
def verifier() -> Iterator[VerifyingUpstream]:
    with VerifyingUpstream() as server:
        yield server


@pytest.fixture(scope="module")
def gateway(
    verifier: VerifyingUpstream, upstream: ServerProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProcess]:
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path_factory.mktemp("assertion") / "signing.pem"
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    config: dict[str, Any] = {
        "tokens": {"algorithms": ["HS256"], "secret": SECRET},
        "identity": {
            "headers": {"X-Auth-User": "sub", "X-Auth-Roles": "roles"},
            "assertion": {"private_key_file": str(path), "issuer": "https://gateway.test"},
        },
        "routes": [
            {"name": "public", "path": "/public/", "upstream": verifier.url, "auth": "none"},
            {"name": "maybe", "path": "/maybe/", "upstream": verifier.url, "auth": "optional"},
            {"name": "live", "path": "/live", "upstream": upstream.url},  # the echo upstream: WebSockets
            {"name": "app", "path": "/", "upstream": verifier.url},
        ],
    }
    with start_gateway(config, workers=2) as server:
        verifier.jwks_url = server.url + JWKS
        yield server


def bearer(sub: str = "alice") -> dict[str, str]:
    claims = {"sub": sub, "roles": ["user"], "is_staff": True, "exp": int(time.time()) + 300}
    return {"Authorization": "Bearer " + jwt.encode(claims, SECRET, algorithm="HS256")}


def seen(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def test_the_upstream_verifies_the_assertion_with_pyjwt_from_the_jwks(
    gateway: GatewayProcess, verifier: VerifyingUpstream
) -> None:
    answer = seen(httpx.get(f"{gateway.url}/orders", headers=bearer("alice"), timeout=10))
    assert answer["assertions"] == 1 and answer["verified"], answer
    claims = answer["claims"]
    assert claims["sub"] == "alice" and claims["roles"] == ["user"] and "is_staff" not in claims
    assert claims["aud"] == verifier.url and claims["iss"] == "https://gateway.test"
    assert claims["exp"] - claims["iat"] == 60


def test_a_forged_assertion_from_the_client_never_reaches_the_upstream(gateway: GatewayProcess) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    forged = jwt.encode({"sub": "mallory", "exp": int(time.time()) + 60}, other, algorithm="ES256")
    for name in ("X-Gateway-Assertion", "x_gateway_assertion"):
        headers = {**bearer("alice"), name: forged}
        answer = seen(httpx.get(f"{gateway.url}/orders", headers=headers, timeout=10))
        assert answer["assertions"] == 1 and answer["verified"] and answer["claims"]["sub"] == "alice", answer
        public = seen(httpx.get(f"{gateway.url}/public/x", headers={name: forged}, timeout=10))
        assert public["assertions"] == 0  # stripped on auth: none too, and none added


def test_anonymous_requests_carry_no_assertion(gateway: GatewayProcess) -> None:
    assert seen(httpx.get(f"{gateway.url}/public/x", headers=bearer(), timeout=10))["assertions"] == 0
    assert seen(httpx.get(f"{gateway.url}/maybe/x", timeout=10))["assertions"] == 0
    with_token = seen(httpx.get(f"{gateway.url}/maybe/x", headers=bearer("bob"), timeout=10))
    assert with_token["verified"] and with_token["claims"]["sub"] == "bob"


def test_every_worker_signs_with_the_key_of_the_one_jwks(gateway: GatewayProcess) -> None:
    with WorkerClients(gateway) as workers:
        key_sets = workers.batch([("GET", gateway.url + JWKS, {})] * 2)
        assert {s.worker for s in key_sets} == set(workers.pids)
        assert key_sets[0].response.json() == key_sets[1].response.json()
        assert key_sets[0].response.headers["cache-control"] == "public, max-age=300"
        served = workers.batch([("GET", f"{gateway.url}/w{i}", bearer(f"user{i}")) for i in range(6)])
    assert {s.worker for s in served} == set(workers.pids)
    for i, s in enumerate(served):  # one upstream, one PyJWKClient: every worker's assertion verifies
        answer = seen(s.response)
        assert answer["verified"] and answer["claims"]["sub"] == f"user{i}", answer


def test_a_websocket_handshake_carries_the_assertion_for_its_upstream(
    gateway: GatewayProcess, verifier: VerifyingUpstream, upstream: ServerProcess
) -> None:
    url = gateway.url.replace("http://", "ws://") + "/live"
    with connect(url, additional_headers={**bearer("carol"), "X-Gateway-Assertion": "forged"}, open_timeout=10) as ws:
        headers = json.loads(ws.recv(timeout=5))["hello"]["headers"]
    values = [value for name, value in headers if name == "x-gateway-assertion"]
    assert len(values) == 1
    key = jwt.PyJWKClient(verifier.jwks_url).get_signing_key_from_jwt(values[0])
    claims = jwt.decode(values[0], key, algorithms=["ES256"], audience=upstream.url)
    assert claims["sub"] == "carol"
