"""The demo servers run as real processes; the upstream echoes requests and misbehaves on demand."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import jwt
import pytest
from support.servers import IdPProcess, ServerProcess, start_idp


@pytest.fixture(scope="module")
def idp() -> Iterator[IdPProcess]:
    with start_idp(algorithm="RS256", access_ttl=60) as server:
        yield server


def test_upstream_echoes_the_request(upstream: ServerProcess) -> None:
    body = b"payload" * 1000
    response = httpx.post(f"{upstream.url}/a%2Fb/c?x=1&y=%20", content=body, headers={"X-One": "1", "x-two": "2"})
    echo = response.json()
    assert (echo["method"], echo["path"], echo["raw_path"], echo["query_string"]) == (
        "POST",
        "/a/b/c",
        "/a%2Fb/c",
        "x=1&y=%20",
    )
    assert ["x-one", "1"] in echo["headers"] and ["x-two", "2"] in echo["headers"]
    assert (echo["body_length"], echo["body_sha256"]) == (len(body), hashlib.sha256(body).hexdigest())


def test_upstream_special_paths(upstream: ServerProcess) -> None:
    with httpx.Client(base_url=upstream.url) as client:
        streamed = client.get("/_stream/200000")
        assert streamed.content == b"x" * 200000 and "content-length" not in streamed.headers
        assert streamed.headers["transfer-encoding"] == "chunked"
        assert client.get("/_status/418").json() == {"status": 418}
        assert client.get("/_set-cookie/sid").headers.get_list("set-cookie") == [
            "sid=upstream; Path=/",
            "other=1; Path=/",
        ]
        hop = client.get("/_hop").headers
        assert (hop["x-secret-hop"], hop["keep-alive"], hop["x-normal"]) == ("1", "timeout=5", "yes")
        assert client.get("/_html").headers["content-type"].startswith("text/html")
        assert client.get("/_slow/0.1").status_code == 200


def test_idp_process_rotates_and_counts(idp: IdPProcess) -> None:
    idp.reset()
    session = idp.issue("alice", access_ttl=-5)
    public_key = Path(str(idp.public_key_path)).read_text()
    with pytest.raises(jwt.ExpiredSignatureError):
        jwt.decode(session["access"], public_key, algorithms=["RS256"], audience="legacy-app")
    data = {"refresh": session["refresh"]}
    assert httpx.post(f"{idp.url}/api/token/refresh/", json=data).status_code == 200
    idp.behaviour(fail="503", fail_count=1)
    assert httpx.post(f"{idp.url}/api/token/refresh/", json=data).status_code == 503
    assert httpx.post(f"{idp.url}/api/token/refresh/", json=data).status_code == 401
    counts = idp.stats()
    assert (counts["refresh_calls"], counts["refresh_ok"], counts["reuse_detected"]) == (3, 1, 1)
