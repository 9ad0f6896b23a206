"""IdPClient against the demo IdP (in-process) and small scripted IdPs: styles, client auth, classification."""

from __future__ import annotations

import asyncio
import base64
import socket
import struct
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from gateway.config import RefreshConfig, RefreshFields
from gateway.demo.idp import IdentityProvider, IdPSettings, create_idp_app
from gateway.errors import BadIdPResponse, IdPAnswerLost, IdPUnavailable, RefreshRejected
from gateway.idp_client import IdPClient, scopes_of

IDP = "http://idp.test"
CLIENT_ID, CLIENT_SECRET = "legacy-app", "demo-secret"


def oauth2(**overrides: Any) -> RefreshConfig:
    options: dict[str, Any] = {
        "endpoint": f"{IDP}/token",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "revocation_endpoint": f"{IDP}/revoke",
        "timeout": 0.2,
    }
    return RefreshConfig(**(options | overrides))


def json_style(**overrides: Any) -> RefreshConfig:
    return RefreshConfig(**({"endpoint": f"{IDP}/api/token/refresh/", "style": "json", "timeout": 0.2} | overrides))


@pytest.fixture
async def http() -> AsyncIterator[Callable[[Any], httpx.AsyncClient]]:
    """Makes clients over ASGITransport to a given app; closes them all afterwards."""
    clients: list[httpx.AsyncClient] = []

    def make(app: Any) -> httpx.AsyncClient:
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app))
        clients.append(client)
        return client

    yield make
    for client in clients:
        await client.aclose()


def demo(**settings: Any) -> tuple[Starlette, IdentityProvider]:
    app = create_idp_app(IdPSettings(**settings))
    return app, app.state.idp


class Scripted:
    """An IdP that answers every POST with ``answer(request)`` and records what it was sent."""

    def __init__(self, answer: Callable[[], Response]) -> None:
        self.seen: list[tuple[dict[str, str], bytes]] = []
        self.elsewhere_hits = 0

        async def endpoint(request: Request) -> Response:
            self.seen.append((dict(request.headers), await request.body()))
            return answer()

        async def elsewhere(request: Request) -> Response:
            self.elsewhere_hits += 1
            return JSONResponse({"access_token": "a", "access": "a"})

        self.app = Starlette(
            routes=[
                Route("/token", endpoint, methods=["POST"]),
                Route("/revoke", endpoint, methods=["POST"]),
                Route("/api/token/refresh/", endpoint, methods=["POST"]),
                Route("/elsewhere", elsewhere, methods=["GET", "POST"]),
            ]
        )


def form_of(body: bytes) -> dict[str, str]:
    return dict(httpx.QueryParams(body.decode()))


# --- oauth2 style against the demo IdP ---------------------------------------------------------------


@pytest.mark.parametrize("auth", ["post", "basic", "none"])
async def test_oauth2_client_auth_styles_are_accepted_by_a_strict_idp(
    auth: str, http: Callable[[Any], httpx.AsyncClient]
) -> None:
    app, idp = demo(client_auth=auth)
    pair = idp.start_session("alice")
    issued = await IdPClient(oauth2(client_auth=auth), http(app)).redeem(pair.refresh)
    assert issued.access and issued.refresh and issued.refresh != pair.refresh
    assert issued.expires_in == 300
    assert idp.counters.refresh_calls == 1 and idp.counters.refresh_ok == 1


async def test_basic_auth_form_urlencodes_id_and_secret(http: Callable[[Any], httpx.AsyncClient]) -> None:
    """Regression: RFC 6749 §2.3.1 encoding, so a secret with ':' or '+' still authenticates."""
    app, idp = demo(client_auth="basic", client_id="app:one", client_secret="p@ss:w rd+/&")
    pair = idp.start_session("alice")
    client = IdPClient(oauth2(client_auth="basic", client_id="app:one", client_secret="p@ss:w rd+/&"), http(app))
    assert (await client.redeem(pair.refresh)).refresh


@pytest.mark.parametrize(
    ("auth", "form_auth", "basic"),
    [
        ("post", {"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}, False),
        ("basic", {}, True),
        ("none", {"client_id": CLIENT_ID}, False),
    ],
)
async def test_oauth2_request_shape(
    auth: str, form_auth: dict[str, str], basic: bool, http: Callable[[Any], httpx.AsyncClient]
) -> None:
    idp = Scripted(lambda: JSONResponse({"access_token": "new-access"}))
    await IdPClient(oauth2(client_auth=auth), http(idp.app)).redeem("the-refresh-token")
    [(headers, body)] = idp.seen
    assert headers["content-type"] == "application/x-www-form-urlencoded"
    assert form_of(body) == {"grant_type": "refresh_token", "refresh_token": "the-refresh-token", **form_auth}
    if basic:
        expected = base64.b64encode(f"{CLIENT_ID}:{CLIENT_SECRET}".encode()).decode()
        assert headers["authorization"] == f"Basic {expected}"
    else:
        assert "authorization" not in headers


@pytest.mark.parametrize("auth", ["post", "basic"])
async def test_wrong_client_secret_is_our_misconfiguration_not_a_dead_session(
    auth: str, http: Callable[[Any], httpx.AsyncClient]
) -> None:
    app, idp = demo(client_auth=auth)
    pair = idp.start_session("alice")
    client = IdPClient(oauth2(client_auth=auth, client_secret="wrong"), http(app))
    with pytest.raises(IdPUnavailable, match="invalid_client"):
        await client.redeem(pair.refresh)
    # The session itself is untouched: with the right secret the same token still works.
    assert (await IdPClient(oauth2(client_auth=auth), http(app)).redeem(pair.refresh)).refresh


async def test_rotation_returns_a_new_refresh_token_and_the_old_one_is_then_rejected(
    http: Callable[[Any], httpx.AsyncClient],
) -> None:
    app, idp = demo()
    pair = idp.start_session("alice")
    client = IdPClient(oauth2(), http(app))
    first = await client.redeem(pair.refresh)
    second = await client.redeem(first.refresh or "")
    assert len({pair.refresh, first.refresh, second.refresh}) == 3
    with pytest.raises(RefreshRejected, match="invalid_grant"):
        await client.redeem(pair.refresh)
    assert idp.counters.reuse_detected == 1


@pytest.mark.parametrize("fail", ["503", "500", "invalid_client"])
async def test_demo_idp_failures_that_did_not_redeem_are_unavailable(
    fail: str, http: Callable[[Any], httpx.AsyncClient]
) -> None:
    app, idp = demo()
    pair = idp.start_session("alice")
    idp.behaviour.fail = fail
    with pytest.raises(IdPUnavailable):
        await IdPClient(oauth2(), http(app)).redeem(pair.refresh)


@pytest.mark.parametrize("fail", ["html", "garbage"])
async def test_a_200_that_is_not_json_may_have_redeemed_the_token(
    fail: str, http: Callable[[Any], httpx.AsyncClient]
) -> None:
    """Issue 12, failure 5: the gateway cannot tell that this IdP did not redeem, so it must assume it did."""
    app, idp = demo()
    pair = idp.start_session("alice")
    idp.behaviour.fail = fail
    with pytest.raises(IdPAnswerLost) as raised:
        await IdPClient(oauth2(), http(app)).redeem(pair.refresh)
    assert not isinstance(raised.value, BadIdPResponse)


async def test_demo_idp_200_without_access_token_is_a_bad_response(http: Callable[[Any], httpx.AsyncClient]) -> None:
    app, idp = demo()
    pair = idp.start_session("alice")
    idp.behaviour.fail = "no_access"
    with pytest.raises(BadIdPResponse):
        await IdPClient(oauth2(), http(app)).redeem(pair.refresh)


# --- json (SimpleJWT) style ----------------------------------------------------------------------------


async def test_json_style_against_simplejwt_dialect(http: Callable[[Any], httpx.AsyncClient]) -> None:
    app, idp = demo()
    pair = idp.start_session("bob")
    client = IdPClient(json_style(), http(app))
    issued = await client.redeem(pair.refresh)
    assert issued.access and issued.refresh and issued.refresh != pair.refresh
    assert issued.expires_in is None  # SimpleJWT sends no expires_in
    # Reuse: SimpleJWT answers 401 token_not_valid, which ends the session.
    with pytest.raises(RefreshRejected, match="token_not_valid"):
        await client.redeem(pair.refresh)


async def test_json_style_request_shape_and_custom_field_names(http: Callable[[Any], httpx.AsyncClient]) -> None:
    idp = Scripted(lambda: JSONResponse({"jwt": "new-access", "renew": "new-refresh", "access": "decoy"}))
    config = json_style(fields=RefreshFields(request="token", access="jwt", refresh="renew"))
    issued = await IdPClient(config, http(idp.app)).redeem("old-refresh")
    assert (issued.access, issued.refresh) == ("new-access", "new-refresh")
    [(headers, body)] = idp.seen
    assert headers["content-type"] == "application/json"
    assert httpx.Response(200, content=body).json() == {"token": "old-refresh"}
    assert "authorization" not in headers


@pytest.mark.parametrize(
    ("config", "body"),
    [(oauth2(), {"access_token": "new-access", "token_type": "Bearer"}), (json_style(), {"access": "new-access"})],
)
async def test_response_without_refresh_token_means_keep_the_current_one(
    config: RefreshConfig, body: dict[str, Any], http: Callable[[Any], httpx.AsyncClient]
) -> None:
    idp = Scripted(lambda: JSONResponse(body))
    issued = await IdPClient(config, http(idp.app)).redeem("old-refresh")
    assert issued.access == "new-access" and issued.refresh is None


# --- classification of answers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "response", "error"),
    [
        (oauth2(), JSONResponse({"error": "invalid_grant"}, status_code=400), RefreshRejected),
        (json_style(), JSONResponse({"detail": "x", "code": "token_not_valid"}, status_code=401), RefreshRejected),
        # SimpleJWT's answer to a misnamed request field: our misconfiguration, not the session's.
        (json_style(), JSONResponse({"refresh": ["This field is required."]}, status_code=400), IdPUnavailable),
        (oauth2(), JSONResponse({"error": "invalid_client"}, status_code=401), IdPUnavailable),
        (json_style(), JSONResponse({"error": "invalid_client"}, status_code=401), IdPUnavailable),
        (oauth2(), JSONResponse({"error": "invalid_request"}, status_code=400), IdPUnavailable),
        (oauth2(), JSONResponse({"error": "server_error"}, status_code=500), IdPUnavailable),
        (oauth2(), Response("down", status_code=503), IdPUnavailable),
        (json_style(), Response("down", status_code=503), IdPUnavailable),
        (json_style(), Response("<html>login</html>", status_code=401, media_type="text/html"), IdPUnavailable),
        (oauth2(), Response("<html>oops</html>", media_type="text/html"), IdPAnswerLost),
        (oauth2(), JSONResponse(["access_token"]), IdPAnswerLost),
        (oauth2(), Response("<html>Bad Gateway</html>", status_code=502, media_type="text/html"), IdPAnswerLost),
        (oauth2(), Response("<html>Gateway Timeout</html>", status_code=504, media_type="text/html"), IdPAnswerLost),
        (json_style(), Response("upstream timed out", status_code=504), IdPAnswerLost),
        (oauth2(), JSONResponse({"error": "temporarily_unavailable"}, status_code=429), IdPUnavailable),
        (oauth2(), JSONResponse({"token_type": "Bearer"}), BadIdPResponse),
        (oauth2(), JSONResponse({"access_token": ""}), BadIdPResponse),
        (oauth2(), JSONResponse({"access_token": "a", "refresh_token": 5}), BadIdPResponse),
        (json_style(), JSONResponse({"access_token": "a", "refresh": "r"}), BadIdPResponse),
    ],
)
async def test_answers_are_classified_by_status_and_error_code(
    config: RefreshConfig, response: Response, error: type[Exception], http: Callable[[Any], httpx.AsyncClient]
) -> None:
    idp = Scripted(lambda: response)
    with pytest.raises(error):
        await IdPClient(config, http(idp.app)).redeem("old-refresh")


@pytest.mark.parametrize("config", [oauth2(), json_style()])
async def test_redirects_are_unavailable_and_never_followed(
    config: RefreshConfig, http: Callable[[Any], httpx.AsyncClient]
) -> None:
    idp = Scripted(lambda: RedirectResponse(f"{IDP}/elsewhere", status_code=302))
    with pytest.raises(IdPUnavailable, match="302"):
        await IdPClient(config, http(idp.app)).redeem("old-refresh")
    assert len(idp.seen) == 1 and idp.elsewhere_hits == 0


async def test_redirects_are_not_followed_even_by_a_client_that_would(
    http: Callable[[Any], httpx.AsyncClient],
) -> None:
    idp = Scripted(lambda: RedirectResponse(f"{IDP}/elsewhere", status_code=307))
    following = httpx.AsyncClient(transport=httpx.ASGITransport(app=idp.app), follow_redirects=True)
    async with following:
        with pytest.raises(IdPUnavailable):
            await IdPClient(oauth2(), following).redeem("old-refresh")
    assert idp.elsewhere_hits == 0


@pytest.mark.parametrize(("expires_in", "parsed"), [(3600, 3600), (59.5, 59.5), ("3599", 3599), (None, None)])
async def test_expires_in(expires_in: Any, parsed: float | None, http: Callable[[Any], httpx.AsyncClient]) -> None:
    body: dict[str, Any] = {"access_token": "a"} | ({} if expires_in is None else {"expires_in": expires_in})
    idp = Scripted(lambda: JSONResponse(body))
    assert (await IdPClient(oauth2(), http(idp.app)).redeem("old-refresh")).expires_in == parsed


# --- answers the gateway cannot use (issue 14, item 14) ------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        {"token_type": "DPoP"},
        {"token_type": "N_A"},
        {"token_type": 1},
        {"expires_in": 0},
        {"expires_in": -60},
        {"expires_in": "soon"},
        {"expires_in": True},
        {"expires_in": "NaN"},
        {"expires_in": "inf"},
        {"expires_in": [300]},
    ],
)
@pytest.mark.parametrize("config", [oauth2(), json_style()])
async def test_a_200_with_another_token_type_or_a_lifetime_that_is_not_positive_is_a_bad_response(
    extra: dict[str, Any], config: RefreshConfig, http: Callable[[Any], httpx.AsyncClient]
) -> None:
    """Regression (issue 14, item 14): a DPoP-bound token or `expires_in: 0` was taken as a usable answer."""
    idp = Scripted(lambda: JSONResponse({"access_token": "a", "access": "a"} | extra))
    with pytest.raises(BadIdPResponse):
        await IdPClient(config, http(idp.app)).redeem("old-refresh")


@pytest.mark.parametrize("token_type", ["Bearer", "bearer", "BEARER", None])
async def test_bearer_in_any_case_or_no_token_type_is_usable(
    token_type: str | None, http: Callable[[Any], httpx.AsyncClient]
) -> None:
    body = {"access_token": "a", "token_type": token_type, "expires_in": "300"}
    idp = Scripted(lambda: JSONResponse(body))
    assert (await IdPClient(oauth2(), http(idp.app)).redeem("old-refresh")).expires_in == 300


GRANTED = frozenset({"openid", "profile"})


@pytest.mark.parametrize(
    ("scope", "granted", "usable"),
    [
        ("openid profile", GRANTED, True),
        ("openid", GRANTED, True),  # narrower is fine (RFC 6749 §6)
        ("", GRANTED, True),
        (["profile"], GRANTED, True),
        ("openid profile admin", GRANTED, False),
        ("openid  Profile", GRANTED, False),  # scopes are case-sensitive (RFC 6749 §3.3)
        (["openid", "admin"], GRANTED, False),
        (7, GRANTED, False),  # unreadable: counted as wider
        ("openid profile admin", None, True),  # the replaced token named no scope: nothing to compare
    ],
)
async def test_a_scope_wider_than_the_replaced_tokens_is_a_bad_response(
    scope: Any, granted: frozenset[str] | None, usable: bool, http: Callable[[Any], httpx.AsyncClient]
) -> None:
    """Regression (issue 14, item 14): an answer granting more scopes than the expired token had was accepted."""
    idp = Scripted(lambda: JSONResponse({"access_token": "a", "scope": scope}))
    redeeming = IdPClient(oauth2(), http(idp.app)).redeem("old-refresh", granted=granted)
    if usable:
        assert (await redeeming).access == "a"
    else:
        with pytest.raises(BadIdPResponse, match="scope"):
            await redeeming


@pytest.mark.parametrize(
    ("claims", "scopes"),
    [
        ({"scope": "openid profile"}, {"openid", "profile"}),
        ({"scp": ["read", "write"]}, {"read", "write"}),
        ({"scp": "read write"}, {"read", "write"}),
        ({"scope": "a", "scp": ["b"]}, {"a"}),
        ({}, None),
        ({"scope": ""}, None),
        ({"scp": [1]}, None),
    ],
)
def test_scopes_of_a_token(claims: dict[str, Any], scopes: set[str] | None) -> None:
    assert scopes_of(claims) == (frozenset(scopes) if scopes is not None else None)


class Endless(httpx.AsyncByteStream):
    """A body that never ends: 1 KiB chunks, counted."""

    def __init__(self) -> None:
        self.chunks = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        while True:
            self.chunks += 1
            await asyncio.sleep(0)  # a client that buffers it all meets refresh.timeout instead of hanging
            yield b" " * 1024


async def test_an_answer_over_64_kib_is_refused_while_it_is_read() -> None:
    """Regression (issue 14, item 14): any answer size was accepted (and buffered); reading stops past 64 KiB."""
    body = Endless()

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "application/json"}, stream=body)

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        with pytest.raises(BadIdPResponse, match="65536 bytes"):
            await IdPClient(oauth2(timeout=5), client).redeem("old-refresh")
    assert 64 <= body.chunks <= 66  # stopped at the cap, long before the timeout


@pytest.mark.parametrize(("status", "error"), [(200, BadIdPResponse), (400, IdPUnavailable), (502, IdPAnswerLost)])
async def test_a_declared_length_over_64_kib_is_not_read_at_all(
    status: int, error: type[Exception], http: Callable[[Any], httpx.AsyncClient]
) -> None:
    padding = "x" * (64 * 1024)
    idp = Scripted(lambda: JSONResponse({"access_token": "a", "error": "invalid_grant", "pad": padding}, status))
    with pytest.raises(error):
        await IdPClient(oauth2(), http(idp.app)).redeem("old-refresh")
    [(headers, _)] = idp.seen
    assert headers["accept-encoding"] == "identity"  # the cap counts what the IdP sent, not what it inflates to


@pytest.mark.parametrize("fail", ["oversize", "dpop", "expires_zero", "wider_scope"])
@pytest.mark.parametrize("config", [oauth2(), json_style()])
async def test_demo_idp_unusable_answers_redeem_the_token_and_are_bad_responses(
    fail: str, config: RefreshConfig, http: Callable[[Any], httpx.AsyncClient]
) -> None:
    app, idp = demo()
    pair = idp.start_session("alice", {"scope": "openid profile"})
    idp.behaviour.fail = fail
    with pytest.raises(BadIdPResponse):
        await IdPClient(config, http(app)).redeem(pair.refresh, granted=frozenset({"openid", "profile"}))
    assert idp.counters.refresh_ok == 1  # the IdP redeemed it: the gateway must never send it again


# --- transport failures (real sockets: ASGITransport has no timeouts) --------------------------------


async def test_a_timeout_after_the_request_was_sent_is_an_answer_lost() -> None:
    """Issue 12, failure 5: the IdP got the request and may have redeemed the token; it is never sent again."""
    done = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await done.wait()  # accept the request, never answer
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with httpx.AsyncClient() as http:
            client = IdPClient(oauth2(endpoint=f"http://127.0.0.1:{port}/token", timeout=0.2), http)
            started = asyncio.get_running_loop().time()
            with pytest.raises(IdPAnswerLost, match="after sending"):
                await client.redeem("old-refresh")
            assert asyncio.get_running_loop().time() - started < 2
    finally:
        done.set()
        server.close()
        await server.wait_closed()


async def test_connection_refused_is_unavailable(closed_port: int) -> None:
    async with httpx.AsyncClient() as http:
        client = IdPClient(oauth2(endpoint=f"http://127.0.0.1:{closed_port}/token"), http)
        with pytest.raises(IdPUnavailable, match="unreachable"):
            await client.redeem("old-refresh")


# --- revocation (RFC 7009) ------------------------------------------------------------------------------


@pytest.mark.parametrize("auth", ["post", "basic"])
async def test_revoke_ends_the_family_at_the_idp(auth: str, http: Callable[[Any], httpx.AsyncClient]) -> None:
    app, idp = demo(client_auth=auth)
    pair = idp.start_session("alice")
    client = IdPClient(oauth2(client_auth=auth), http(app))
    assert await client.revoke(pair.refresh) is True
    assert idp.counters.revocations == 1 and pair.family.revoked
    with pytest.raises(RefreshRejected):
        await client.redeem(pair.refresh)


async def test_revoke_request_shape(http: Callable[[Any], httpx.AsyncClient]) -> None:
    idp = Scripted(lambda: Response(status_code=200))
    assert await IdPClient(oauth2(), http(idp.app)).revoke("the-token") is True
    [(headers, body)] = idp.seen
    assert form_of(body) == {
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "token": "the-token",
        "token_type_hint": "refresh_token",
    }


async def test_revoke_unconfigured_or_failing_is_false(
    http: Callable[[Any], httpx.AsyncClient], closed_port: int
) -> None:
    app, idp = demo()
    pair = idp.start_session("alice")
    assert await IdPClient(oauth2(revocation_endpoint=None), http(app)).revoke(pair.refresh) is False
    assert await IdPClient(oauth2(client_secret="wrong"), http(app)).revoke(pair.refresh) is False
    assert idp.counters.revocations == 0 and not pair.family.revoked
    refusing = Scripted(lambda: JSONResponse({"error": "unsupported_token_type"}, status_code=400))
    assert await IdPClient(oauth2(), http(refusing.app)).revoke(pair.refresh) is False
    async with httpx.AsyncClient() as real:
        unreachable = oauth2(revocation_endpoint=f"http://127.0.0.1:{closed_port}/revoke")
        assert await IdPClient(unreachable, real).revoke(pair.refresh) is False


async def test_an_endpoint_is_required() -> None:
    async with httpx.AsyncClient() as http:
        with pytest.raises(ValueError, match="endpoint"):
            IdPClient(RefreshConfig(), http)


async def test_a_connection_reset_after_the_request_was_sent_is_an_answer_lost() -> None:
    seen = asyncio.Event()

    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        seen.set()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()  # RST: the request arrived, its answer never leaves

    server = await asyncio.start_server(reset, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with httpx.AsyncClient() as http:
            client = IdPClient(oauth2(endpoint=f"http://127.0.0.1:{port}/token", timeout=2), http)
            with pytest.raises(IdPAnswerLost):
                await client.redeem("old-refresh")
        assert seen.is_set()
    finally:
        server.close()
        await server.wait_closed()


async def test_each_redemption_asks_for_a_connection_of_its_own(http: Callable[[Any], httpx.AsyncClient]) -> None:
    """A pooled connection the IdP closed while idle would make "sent, then reset" ambiguous for nothing."""
    idp = Scripted(lambda: JSONResponse({"access_token": "new-access"}))
    await IdPClient(oauth2(), http(idp.app)).redeem("the-refresh-token")
    [(headers, _)] = idp.seen
    assert headers["connection"] == "close"


async def test_an_https_proxy_refusing_the_connect_is_not_a_sent_request() -> None:
    """Review finding: httpcore traces the proxy's CONNECT like the request; an IdP outage behind a
    proxy must not count as "sent, answer lost" (which ends the session)."""
    called = False

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def record() -> None:
        nonlocal called
        called = True

    server = await asyncio.start_server(proxy, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with httpx.AsyncClient(proxy=f"http://127.0.0.1:{port}") as http:
            client = IdPClient(oauth2(endpoint="https://idp.invalid/token", timeout=2), http)
            with pytest.raises(IdPUnavailable):
                await client.redeem("old-refresh", before_send=record)
        assert not called  # no attempt recorded: the token never left
    finally:
        server.close()
        await server.wait_closed()


async def test_an_answer_nested_past_the_json_parsers_depth_is_a_200_without_json_not_a_crash() -> None:
    """Regression: json.loads raises RecursionError (not ValueError) on deep nesting; it became a 500. It is a 200
    the gateway cannot read, which may have redeemed the token: never resent (docs/responses.md)."""
    nested = b"[" * 50_000 + b"]" * 50_000

    def answer(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, headers={"content-type": "application/json"}, content=nested[:60_000])

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        with pytest.raises(IdPAnswerLost):
            await IdPClient(oauth2(timeout=5), client).redeem("old-refresh")
