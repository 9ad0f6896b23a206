"""gateway.authn: Bearer or cookie, verified; a reason (never an exception) when that fails."""

from __future__ import annotations

from typing import Any

import httpx
import jwt
import pytest

from gateway.authn import Authenticator, AuthResult, bearer_token, read_authorization
from gateway.config import CookiesConfig, IntrospectionConfig, RefreshCookieSpec, TokensConfig
from gateway.cookies import CookieJar
from gateway.errors import KeyFetchError
from gateway.introspection import build_verifier
from gateway.keys import StaticKey
from gateway.sealing import Sealer
from gateway.tokens import Verifier

NOW = 1_700_000_000.0
SECRET = "c" * 32
SEALER = Sealer("authn-tests-store-secret")
REFRESH = "__Host-gw_refresh"


def sealed(token: str, name: str = REFRESH, sealer: Sealer = SEALER) -> str:
    """A refresh cookie's value as the gateway sets it."""
    return sealer.seal_cookie(token, name)


def token(sub: str, exp: float = NOW + 300, key: str = SECRET) -> str:
    return jwt.encode({"sub": sub, "exp": exp}, key, algorithm="HS256")


@pytest.fixture
def jar() -> CookieJar:
    return CookieJar.from_config(CookiesConfig(), SEALER)


@pytest.fixture
def auth(jar: CookieJar) -> Authenticator:
    config = TokensConfig(algorithms=("HS256",), secret=SECRET)
    return Authenticator(Verifier(config, StaticKey(SECRET.encode()), lambda: NOW), jar)


def cookie(access: str | None = None, refresh: str | None = None) -> tuple[bytes, bytes]:
    parts = []
    if access is not None:
        parts.append(f"__Host-gw_access={access}")
    if refresh is not None:
        parts.append(f"__Host-gw_refresh={refresh}")
    return (b"cookie", "; ".join(parts).encode())


async def test_cookie_session(auth: Authenticator) -> None:
    access = token("alice")
    result = await auth.authenticate([cookie(access)])
    assert result.claims is not None and result.claims["sub"] == "alice"
    assert result.token == access and not result.bearer and result.set_cookies == []


async def test_bearer(auth: Authenticator) -> None:
    access = token("bob")
    result = await auth.authenticate([(b"authorization", b"Bearer " + access.encode())])
    assert result.claims is not None and result.claims["sub"] == "bob" and result.bearer


async def test_bearer_scheme_is_case_insensitive(auth: Authenticator) -> None:
    result = await auth.authenticate([(b"authorization", b"bearer " + token("bob").encode())])
    assert result.claims is not None


async def test_bearer_wins_over_cookie(auth: Authenticator) -> None:
    headers = [cookie(token("alice")), (b"authorization", b"Bearer " + token("bob").encode())]
    result = await auth.authenticate(headers)
    assert result.claims is not None and result.claims["sub"] == "bob"


async def test_bad_bearer_does_not_fall_back_to_cookie(auth: Authenticator) -> None:
    headers = [cookie(token("alice")), (b"authorization", b"Bearer " + token("bob", key="z" * 32).encode())]
    result = await auth.authenticate(headers)
    assert result.claims is None and result.reason == "bad_signature" and result.bearer
    assert result.set_cookies == []  # an API client's failure does not touch the browser's cookie


@pytest.mark.parametrize(
    "value",
    [b"Bearer", b"Bearer ", b"Bearer a b", b"Bearer \xff\xfe", b"BEARER  "],
)
async def test_malformed_authorization_is_a_reason(auth: Authenticator, value: bytes) -> None:
    result = await auth.authenticate([cookie(token("alice")), (b"authorization", value)])
    assert result.claims is None and result.reason is not None


async def test_two_bearer_headers_are_refused(auth: Authenticator) -> None:
    headers = [
        (b"authorization", b"Bearer " + token("a").encode()),
        (b"authorization", b"Bearer " + token("b").encode()),
    ]
    result = await auth.authenticate(headers)
    assert result.claims is None and result.reason == "invalid_request"  # RFC 6750 §3.1: 400


@pytest.mark.parametrize("garbage", [b"Bearer abc", b"Bearer a.b.c", b"Bearer ..."])
async def test_garbage_bearer_is_a_reason(auth: Authenticator, garbage: bytes) -> None:
    result = await auth.authenticate([(b"authorization", garbage)])
    assert result.claims is None and result.reason == "malformed_token"


@pytest.mark.parametrize("value", [b"Basic YWxpY2U6c2VjcmV0", b"Digest username=x", b"Negotiate abc"])
async def test_other_auth_schemes_are_ignored_cookie_used(auth: Authenticator, value: bytes) -> None:
    result = await auth.authenticate([(b"authorization", value), cookie(token("alice"))])
    assert result.claims is not None and result.claims["sub"] == "alice" and not result.bearer


async def test_basic_auth_alone_is_no_token(auth: Authenticator) -> None:
    result = await auth.authenticate([(b"authorization", b"Basic YWxpY2U6c2VjcmV0")])
    assert result.claims is None and result.reason == "no_token"


async def test_no_credentials(auth: Authenticator) -> None:
    result = await auth.authenticate([(b"accept", b"text/html")])
    assert result.claims is None and result.reason == "no_token" and result.set_cookies == []


@pytest.mark.parametrize(
    ("access", "reason"), [("garbage", "malformed_token"), (token("a", key="z" * 32), "bad_signature")]
)
async def test_bad_cookie_token_clears_the_access_cookie(
    auth: Authenticator, jar: CookieJar, access: str, reason: str
) -> None:
    result = await auth.authenticate([cookie(access)])
    assert result.claims is None and result.reason == reason
    assert result.set_cookies == [jar.clear_access()]


async def test_expired_cookie_token_is_not_cleared(auth: Authenticator) -> None:
    # Kept for the refresh stage: an expired but genuine token identifies the session to refresh.
    result = await auth.authenticate([cookie(token("alice", exp=NOW - 600))])
    assert result.claims is None and result.reason == "token_expired" and result.set_cookies == []


async def test_refresh_cookie_without_refresher_is_no_token(auth: Authenticator) -> None:
    result = await auth.authenticate([cookie(refresh=sealed("r1"))])
    assert result.claims is None and result.reason == "no_token"


def test_bearer_token_parsing() -> None:
    assert bearer_token([]) is None
    assert bearer_token([(b"authorization", b"Basic x")]) is None
    assert bearer_token([(b"authorization", b"Bearer   a.b.c  ")]) == "a.b.c"
    assert bearer_token([(b"authorization", b"Bearer")]) == ""


class CountingRefresher:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    async def refresh(self, refresh_token: str, old_access: str | None, *, client: str | None = None) -> Any:
        self.calls.append((refresh_token, old_access))
        return AuthResult(reason="invalid_grant")


def authenticator(jar: CookieJar, refresher: Any, denied: set[str] | None = None) -> Authenticator:
    config = TokensConfig(algorithms=("HS256",), secret=SECRET)
    return Authenticator(
        Verifier(config, StaticKey(SECRET.encode()), lambda: NOW, denied=denied or set()), jar, refresher
    )


async def test_forged_token_never_reaches_the_refresher(jar: CookieJar) -> None:
    refresher = CountingRefresher()
    config = TokensConfig(algorithms=("HS256",), secret=SECRET)
    auth = Authenticator(Verifier(config, StaticKey(SECRET.encode()), lambda: NOW), jar, refresher)
    forged = token("alice", exp=NOW - 600, key="z" * 32)
    result = await auth.authenticate([cookie(forged, sealed("r1"))])
    assert result.claims is None and result.reason == "bad_signature"
    assert refresher.calls == []
    expired = token("alice", exp=NOW - 600)
    await auth.authenticate([cookie(expired, sealed("r1"))])
    assert refresher.calls == [("r1", expired)]


async def test_revoked_cookie_token_goes_to_the_refresher(jar: CookieJar) -> None:
    """Regression: a superseded (denylisted) access token with its refresh cookie gets the grace successor, not 401."""
    refresher = CountingRefresher()
    config = TokensConfig(algorithms=("HS256",), secret=SECRET)
    revoked = jwt.encode({"sub": "alice", "exp": NOW + 300, "jti": "old"}, SECRET, algorithm="HS256")
    auth = Authenticator(Verifier(config, StaticKey(SECRET.encode()), lambda: NOW, denied={"old"}), jar, refresher)
    result = await auth.authenticate([cookie(revoked, sealed("r1"))])
    assert refresher.calls == [("r1", revoked)]
    assert result.claims is None and result.reason == "invalid_grant"  # the refresher's answer, not a pass
    alone = await auth.authenticate([cookie(revoked)])
    assert alone.claims is None and alone.reason == "token_revoked"
    bearer = await auth.authenticate([(b"authorization", b"Bearer " + revoked.encode())])
    assert bearer.reason == "token_revoked" and len(refresher.calls) == 1


class UnreachableKeys(StaticKey):
    """A JWKS that cannot be fetched while the token's kid is not among the cached keys."""

    async def key_for(self, kid: str | None, alg: str) -> Any:
        raise KeyFetchError("jwks down")


async def test_keys_unavailable_keeps_the_cookies_and_never_refreshes(jar: CookieJar) -> None:
    """Regression (issue 14, item 13): an unknown kid while the JWKS was down cleared the access cookie (a logout)."""
    refresher = CountingRefresher()
    config = TokensConfig(algorithms=("HS256",), secret=SECRET)
    auth = Authenticator(Verifier(config, UnreachableKeys(b""), lambda: NOW), jar, refresher)
    for headers in ([cookie(token("alice"))], [cookie(token("alice"), "r1")]):
        result = await auth.authenticate(headers)
        assert result.claims is None and result.reason == "keys_unavailable" and result.set_cookies == []
    bearer = await auth.authenticate([(b"authorization", b"Bearer " + token("bob").encode())])
    assert bearer.reason == "keys_unavailable"
    assert refresher.calls == []  # the token may be fine: nothing to refresh, nothing to clear


async def test_unreadable_access_cookie_is_absent_so_the_refresh_cookie_resumes_the_session() -> None:
    """Issue 4: an unparseable gateway cookie is treated as absent, never as an error."""

    class Refresher:
        calls = 0

        async def refresh(self, refresh_token: str, old_access: str | None, *, client: str | None = None) -> AuthResult:
            Refresher.calls += 1
            return AuthResult(claims={"sub": "alice"}, token="new", refreshed=True)

    config = TokensConfig(algorithms=("HS256",), secret="s" * 32)
    jar = CookieJar.from_config(CookiesConfig(), SEALER)
    auth = Authenticator(Verifier(config, StaticKey(b"s" * 32)), jar, Refresher())
    header = (b"cookie", f"{jar.access_name}=not-a-jwt; {jar.refresh_name}={sealed('r1')}".encode())
    result = await auth.authenticate([header])
    assert result.claims == {"sub": "alice"} and Refresher.calls == 1


@pytest.mark.parametrize(
    ("value", "kind", "bearer"),
    [
        (b"Bearer abc.def.ghi", "bearer", "abc.def.ghi"),
        (b"bearer\tabc", "bearer", "abc"),  # what Django's split() reads as a token, so do we
        (b"BEARER  abc ", "bearer", "abc"),
        (b"Bearer", "malformed", None),
        (b"Bearer ", "malformed", None),
        (b"Bearer a b", "malformed", None),
        (b"Bearer \xff", "malformed", None),
        (b"Basic dXNlcjpwYXNz", "other", None),
        (b"Bearerabc", "other", None),
        (b"", "other", None),
    ],
)
def test_authorization_is_read_as_the_app_would(value: bytes, kind: str, bearer: str | None) -> None:
    assert read_authorization(value) == (kind, bearer)
    assert read_authorization(value, count=2) == ("several", None)


# --- the sealed refresh cookie (issue 14, item 10) ----------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "r1",  # a raw token: a cookie from before sealing, or one an attacker made up
        token("alice", exp=NOW + 3600),  # a raw JWT refresh token
        sealed("r1", name="__Host-gw_access"),  # sealed for another cookie
        sealed("r1", name="gw_refresh"),  # sealed for the name without the __Host- prefix
        sealed("r1", sealer=Sealer("another-store-secret")),  # sealed under another secret
        sealed("r1")[:-2],  # truncated
        sealed("r1")[:-1] + ("A" if sealed("r1")[-1] != "A" else "B"),  # altered
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "not base64 at all!",
    ],
)
async def test_a_refresh_cookie_the_gateway_did_not_seal_never_reaches_the_refresher(
    jar: CookieJar, value: str
) -> None:
    """Regression (issue 14, item 10): any value in the refresh cookie used to be sent to the IdP."""
    refresher = CountingRefresher()
    auth = authenticator(jar, refresher)
    alone = await auth.authenticate([cookie(refresh=value)])
    assert alone.claims is None and alone.reason == "no_token"
    assert alone.set_cookies == [jar.clear_refresh()]  # the browser stops sending it
    expired = token("alice", exp=NOW - 600)
    with_expired = await auth.authenticate([cookie(expired, value)])
    assert with_expired.claims is None and with_expired.reason == "token_expired"
    assert with_expired.set_cookies == [jar.clear_refresh()]
    assert refresher.calls == []


async def test_a_sealed_refresh_cookie_reaches_the_refresher_unsealed(jar: CookieJar) -> None:
    refresher = CountingRefresher()
    expired = token("alice", exp=NOW - 600)
    await authenticator(jar, refresher).authenticate([cookie(expired, sealed("r.t.k"))])
    assert refresher.calls == [("r.t.k", expired)]


async def test_a_valid_access_token_with_a_junk_refresh_cookie_still_passes(jar: CookieJar) -> None:
    refresher = CountingRefresher()
    near_expiry = token("alice", exp=NOW + 10)  # within refresh_before: a refresh would be tried
    result = await authenticator(jar, refresher).authenticate([cookie(near_expiry, "junk")])
    assert result.claims is not None and result.token == near_expiry
    assert result.set_cookies == [jar.clear_refresh()] and refresher.calls == []


async def test_raw_refresh_cookies_are_read_as_they_are_when_sealing_is_off() -> None:
    raw = CookieJar.from_config(CookiesConfig(refresh=RefreshCookieSpec(name="gw_refresh", sealed=False)), SEALER)
    refresher = CountingRefresher()
    expired = token("alice", exp=NOW - 600)
    await authenticator(raw, refresher).authenticate([cookie(expired, "r1")])
    assert refresher.calls == [("r1", expired)]


# --- opaque access tokens (gateway.introspection) ---


class RecordingRefresher:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []

    async def refresh(self, refresh_token: str, old_access: str | None, *, client: str | None = None) -> AuthResult:
        self.calls.append((refresh_token, old_access))
        return AuthResult(claims={"username": "alice"}, token="new-opaque", refreshed=True)


def opaque_auth(jar: CookieJar, answer: Any, refresher: RecordingRefresher | None = None) -> Authenticator:
    config = TokensConfig(
        introspection=IntrospectionConfig(endpoint="https://idp.test/introspect", client_id="gw"),
        required_claims=("exp", "username"),
    )
    client = httpx.AsyncClient(transport=httpx.MockTransport(answer))
    verifier = build_verifier(
        config, StaticKey(None), lambda section: client, token_hash=SEALER.token_hash, clock=lambda: NOW
    )
    return Authenticator(verifier, jar, refresher)


async def test_an_inactive_opaque_token_with_a_refresh_cookie_is_refreshed(jar: CookieJar) -> None:
    refresher = RecordingRefresher()
    auth = opaque_auth(jar, lambda request: httpx.Response(200, json={"active": False}), refresher)
    result = await auth.authenticate([cookie("old-opaque", sealed("rt-1"))])
    assert result.refreshed and refresher.calls == [("rt-1", "old-opaque")]
    bearer = await auth.authenticate([(b"authorization", b"Bearer old-opaque")])
    assert bearer.claims is None and bearer.reason == "token_expired"


async def test_an_opaque_token_while_introspection_is_down_keeps_both_cookies(jar: CookieJar) -> None:
    refresher = RecordingRefresher()
    auth = opaque_auth(jar, lambda request: httpx.Response(503), refresher)
    result = await auth.authenticate([cookie("opaque", sealed("rt-1"))])
    assert result.reason == "introspection_unavailable" and result.set_cookies == [] and refresher.calls == []
