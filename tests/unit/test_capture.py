"""gateway/capture.py: a JSON login response becomes httpOnly cookies; the page never sees the refresh token."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from http.cookies import SimpleCookie
from typing import Any

import jwt
import pytest

from gateway.capture import MAX_CAPTURE_BYTES, Captured, Capturer, capture_plan
from gateway.config import CaptureConfig, CookiesConfig, TokensConfig
from gateway.cookies import CookieJar
from gateway.keys import StaticKey
from gateway.sealing import Sealer
from gateway.tokens import Verifier

NOW = 1_700_000_000.0
SECRET = "capture-tests-secret-0123456789abcdef"
SPEC = CaptureConfig()
SEALER = Sealer("capture-tests-store-secret")
JSON_HEADERS = [(b"content-type", b"application/json"), (b"content-length", b"999"), (b"cache-control", b"private")]


def access_token(**extra: Any) -> str:
    claims = {"sub": "alice", "jti": "a1", "iat": NOW - 1, "exp": NOW + 300, "token_type": "access", **extra}
    return jwt.encode(claims, SECRET, algorithm="HS256")


def refresh_token(lifetime: int = 3600) -> str:
    claims = {"sub": "alice", "jti": "r1", "iat": NOW - 1, "exp": NOW + lifetime, "token_type": "refresh"}
    return jwt.encode(claims, SECRET, algorithm="HS256")


@pytest.fixture
def capturer() -> Capturer:
    jar = CookieJar.from_config(CookiesConfig(), SEALER)
    verifier = Verifier(TokensConfig(algorithms=("HS256",), secret=SECRET), StaticKey(SECRET), lambda: NOW)
    return Capturer(jar, verifier, lambda: NOW)


async def chunks(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def take(capturer: Capturer, body: bytes, spec: CaptureConfig = SPEC, split: int = 7) -> Captured:
    parts = [body[i : i + split] for i in range(0, len(body), split)] or [b""]
    return await capturer.take(spec, list(JSON_HEADERS), chunks(*parts), "login")


def header(captured: Captured, name: bytes) -> list[bytes]:
    return [v for n, v in captured.headers if n == name]


def cookies(captured: Captured) -> dict[str, Any]:
    jar: dict[str, Any] = {}
    for line in header(captured, b"set-cookie"):
        parsed: SimpleCookie = SimpleCookie()
        parsed.load(line.decode())
        jar.update(parsed)
    return jar


def unsealed(value: str) -> str | None:
    return SEALER.open_cookie(value, "__Host-gw_refresh")


async def test_simplejwt_login_becomes_cookies(capturer: Capturer) -> None:
    access, refresh = access_token(), refresh_token()
    body = json.dumps({"access": access, "refresh": refresh, "user": {"name": "Alice"}}).encode()
    captured = await take(capturer, body)
    assert captured.reason is None
    jar = cookies(captured)
    assert jar["__Host-gw_access"].value == access
    assert unsealed(jar["__Host-gw_refresh"].value) == refresh  # the browser holds it sealed
    assert refresh not in jar["__Host-gw_refresh"].value
    for morsel in jar.values():
        assert morsel["httponly"] and morsel["secure"] and morsel["path"] == "/"
    assert jar["__Host-gw_refresh"]["max-age"] == "3600"  # the refresh token's own exp
    assert json.loads(captured.body) == {"access": access, "user": {"name": "Alice"}}
    assert refresh.encode() not in captured.body
    assert header(captured, b"content-length") == [str(len(captured.body)).encode()]
    assert header(captured, b"cache-control") == [b"no-store"]
    assert header(captured, b"content-type") == [b"application/json"]


async def test_keep_access_false_removes_the_access_token_too(capturer: Capturer) -> None:
    access, refresh = access_token(), refresh_token()
    body = json.dumps({"access": access, "refresh": refresh, "detail": "ok"}).encode()
    captured = await take(capturer, body, CaptureConfig(keep_access=False))
    assert set(cookies(captured)) == {"__Host-gw_access", "__Host-gw_refresh"}
    assert json.loads(captured.body) == {"detail": "ok"}
    assert access.encode() not in captured.body and refresh.encode() not in captured.body
    assert header(captured, b"content-length") == [str(len(captured.body)).encode()]


async def test_custom_field_names(capturer: Capturer) -> None:
    access, refresh = access_token(), refresh_token()
    body = json.dumps({"access_token": access, "refresh_token": refresh, "expires_in": 300}).encode()
    captured = await take(capturer, body, CaptureConfig(access="access_token", refresh="refresh_token"))
    assert unsealed(cookies(captured)["__Host-gw_refresh"].value) == refresh
    assert json.loads(captured.body) == {"access_token": access, "expires_in": 300}


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"  \r\n",
        b'["a", "list"]',
        json.dumps({"access": access_token()}).encode(),  # no refresh field
        json.dumps({"access": access_token(), "refresh": None}).encode(),
        json.dumps({"access": access_token(), "refresh": ""}).encode(),  # an app that keeps it in its own cookie
        json.dumps({"detail": "No active account found"}).encode(),
    ],
)
async def test_nothing_to_capture_passes_through_unchanged(capturer: Capturer, body: bytes) -> None:
    captured = await take(capturer, body)
    assert captured.reason is None
    assert captured.body == body
    assert header(captured, b"set-cookie") == []
    assert header(captured, b"content-length") == [str(len(body)).encode()]
    assert header(captured, b"cache-control") == [b"private"]  # untouched


@pytest.mark.parametrize(
    "access",
    [
        jwt.encode({"sub": "alice", "exp": NOW + 300}, "another-secret-0123456789abcdefgh", algorithm="HS256"),
        access_token(exp=NOW - 3600),  # expired
        "not-a-jwt",
        None,
    ],
)
async def test_access_token_that_does_not_verify_sets_no_session(capturer: Capturer, access: str | None) -> None:
    body = json.dumps({"access": access, "refresh": refresh_token()}).encode()
    captured = await take(capturer, body)
    assert captured.reason == "idp_bad_response"
    assert captured.body == b"" and header(captured, b"set-cookie") == []


async def test_tokens_past_cookies_max_total_are_refused(capturer: Capturer, caplog: pytest.LogCaptureFixture) -> None:
    body = json.dumps({"access": access_token(), "refresh": "r" * 13000}).encode()
    captured = await take(capturer, body, split=1024)
    assert captured.reason == "cookie_too_large"
    assert captured.body == b"" and header(captured, b"set-cookie") == []
    assert "do not fit in cookies (cookies.max_total: 12288); use session: {mode: server}" in caplog.text


async def test_a_refresh_token_over_4_kb_once_sealed_is_set_as_numbered_cookies(capturer: Capturer) -> None:
    """Issue 16: a big token is split into cookies under the browser limit (it was refused: cookie_too_large)."""
    refresh = "r" * (4096 - len("__Host-gw_refresh="))  # fits raw, not once sealed
    captured = await take(capturer, json.dumps({"access": access_token(), "refresh": refresh}).encode(), split=1024)
    assert captured.reason is None
    lines = header(captured, b"set-cookie")
    assert all(len(line) < 4096 for line in lines)
    jar = cookies(captured)
    assert sorted(jar) == ["__Host-gw_access", "__Host-gw_refresh_0", "__Host-gw_refresh_1"]
    assert unsealed(jar["__Host-gw_refresh_0"].value + jar["__Host-gw_refresh_1"].value) == refresh


async def test_the_max_total_check_measures_the_sealed_cookie(capturer: Capturer) -> None:
    """Regression (issue 14, item 10): the size check measures the sealed cookie, not the raw token."""
    access = access_token()
    refresh = "r" * (12288 - len(access))  # fits raw, not once sealed
    captured = await take(capturer, json.dumps({"access": access, "refresh": refresh}).encode(), split=1024)
    assert captured.reason == "cookie_too_large"


async def test_a_login_clears_the_chunks_of_the_session_before(capturer: Capturer) -> None:
    """A new login over an old big session: the old chunks would read as garbage beside the new plain cookies."""
    body = json.dumps({"access": access_token(), "refresh": refresh_token()}).encode()
    old = [(b"cookie", b"__Host-gw_access_0=a; __Host-gw_access_1=b; __Host-gw_refresh_0=c; theme=dark")]
    captured = await capturer.take(SPEC, list(JSON_HEADERS), chunks(body), "login", old)
    jar = cookies(captured)
    assert {name for name, morsel in jar.items() if morsel["max-age"] == "0"} == {
        "__Host-gw_access_0",
        "__Host-gw_access_1",
        "__Host-gw_refresh_0",
    }
    assert jar["__Host-gw_access"].value and jar["__Host-gw_refresh"].value


async def test_body_over_a_mebibyte_is_refused(capturer: Capturer) -> None:
    padding = "x" * MAX_CAPTURE_BYTES
    body = json.dumps({"access": access_token(), "refresh": refresh_token(), "padding": padding}).encode()
    captured = await take(capturer, body, split=64 * 1024)
    assert captured.reason == "capture_too_large"
    assert captured.body == b"" and header(captured, b"set-cookie") == []


@pytest.mark.parametrize(
    "body",
    [
        b"<html>not json</html>",
        b'{"access": "truncated',
        b"\xff\xfe\x00{}",
        b"access=a.b.c&refresh=r.t.k",
    ],
)
async def test_a_2xx_body_that_is_not_json_is_refused_never_passed_on(capturer: Capturer, body: bytes) -> None:
    """Regression (issue 14, item 17): an unreadable login answer used to reach the page, tokens and all."""
    captured = await take(capturer, body)
    assert captured.reason == "capture_failed"
    assert captured.body == b"" and header(captured, b"set-cookie") == []


@pytest.mark.parametrize("refresh", [{"token": "r.t.k"}, ["r.t.k"], 42, True])
async def test_a_refresh_field_that_is_not_a_string_is_refused(capturer: Capturer, refresh: Any) -> None:
    body = json.dumps({"access": access_token(), "refresh": refresh}).encode()
    captured = await take(capturer, body)
    assert captured.reason == "capture_failed"
    assert captured.body == b"" and header(captured, b"set-cookie") == []


JSON = (b"content-type", b"application/json")


@pytest.mark.parametrize(
    ("method", "status", "headers", "expected"),
    [
        ("POST", 200, [JSON], "take"),
        ("POST", 201, [(b"content-type", b"application/json; charset=utf-8")], "take"),
        ("POST", 200, [JSON, (b"content-encoding", b"identity")], "take"),
        ("POST", 200, [(b"content-type", b"text/html; charset=utf-8")], "take"),  # read, then judged by its body
        ("POST", 200, [], "take"),
        ("POST", 401, [JSON], "pass"),  # a refused login passes through unchanged
        ("POST", 400, [JSON, (b"content-encoding", b"gzip")], "pass"),
        ("POST", 302, [JSON], "pass"),
        ("POST", 503, [JSON], "pass"),
        ("POST", 204, [], "pass"),
        ("POST", 200, [JSON, (b"content-length", b"0")], "pass"),
        ("HEAD", 200, [JSON, (b"content-length", b"120")], "pass"),
        ("POST", 200, [JSON, (b"content-encoding", b"gzip")], "capture_failed"),
        ("POST", 200, [JSON, (b"content-encoding", b"br")], "capture_failed"),
        ("POST", 201, [JSON, (b"content-encoding", b"GZIP ")], "capture_failed"),
        ("POST", 200, [JSON, (b"content-encoding", b"identity, gzip")], "capture_failed"),
    ],
)
def test_capture_plan(method: str, status: int, headers: list[tuple[bytes, bytes]], expected: str) -> None:
    """Regression (issue 14, item 17): a compressed 2xx login answer used to pass through (fail open)."""
    assert capture_plan(method, status, headers) == expected
