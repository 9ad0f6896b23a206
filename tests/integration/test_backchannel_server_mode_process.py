"""Back-channel and RP-initiated logout with server-side sessions (`session.mode: server`, issue 16 items 1, 5, 6):
`gateway serve --workers 2` on Redis, the demo IdP as an OpenID provider signing real logout tokens.

A logout token ends exactly the sessions of its `sid` (or every one of its `sub`) on both workers; a browser's
logout reaches the IdP's end-session endpoint with the session's own ID token as the hint.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
from support.configs import demo_refresh, oidc_login
from support.servers import GatewayProcess, IdPProcess, set_cookies, start_gateway, start_idp, start_upstream
from support.workers import WorkerClients
from test_backchannel_process import back_channel, eventually, logout_token

SECRET = "backchannel-server-mode-secret"


@pytest.fixture(scope="module")
def idp() -> Iterator[IdPProcess]:
    with start_idp(algorithm="RS256", access_ttl=300) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(idp: IdPProcess, redis_url: str) -> Iterator[GatewayProcess]:
    with start_upstream() as upstream:

        def config(port: int) -> dict[str, Any]:
            return {
                "store": {"url": redis_url, "key_prefix": f"gwtest:{os.urandom(4).hex()}:", "secret": SECRET},
                "tokens": {"algorithms": ["RS256"], "jwks_url": f"{idp.url}/jwks", "issuer": idp.url},
                "refresh": demo_refresh(idp),
                "session": {"mode": "server"},
                "cookies": {"secure": False},
                "login": oidc_login(idp, port),
                "logout": {"redirect": "/goodbye"},
                "routes": [{"name": "app", "path": "/", "upstream": upstream.url}],
            }

        with start_gateway(config, workers=2) as server:
            yield server


@dataclass
class Session:
    cookie: str
    sid: str


def log_in(gateway: GatewayProcess, idp: IdPProcess, user: str) -> Session:
    """A browser's OIDC login through the gateway: one session cookie, no token in any cookie."""
    before = _sids(idp, user)
    to_idp = httpx.get(f"{gateway.url}/.gateway/login", params={"next": "/"})
    done = httpx.get(
        idp.sign_in(to_idp.headers["location"], user), cookies={"gw_oidc": set_cookies(to_idp)["gw_oidc"].value}
    )
    assert done.status_code == 302, done.text
    jar = {name: morsel.value for name, morsel in set_cookies(done).items() if morsel.value}
    assert set(jar) == {"gw_session"}, jar
    (sid,) = _sids(idp, user) - before  # the IdP login session this login started
    return Session(f"gw_session={jar['gw_session']}", sid)


def _sids(idp: IdPProcess, user: str) -> set[str]:
    return {str(f["sid"]) for f in idp.families() if f["username"] == user}


def statuses(gateway: GatewayProcess, session: Session) -> set[int]:
    """What both workers answer the session cookie (several requests each)."""
    with WorkerClients(gateway) as clients:
        found = clients.statuses([("GET", f"{gateway.url}/page", {"Cookie": session.cookie})] * 8)
    assert len([w for w in found if w is not None]) == 2, f"not served by both workers: {found}"
    return set().union(*found.values())


def test_back_channel_logout_by_sid_ends_exactly_that_server_side_session_on_every_worker(
    gateway: GatewayProcess, idp: IdPProcess
) -> None:
    first, second, bob = log_in(gateway, idp, "alice"), log_in(gateway, idp, "alice"), log_in(gateway, idp, "bob")
    assert first.sid != second.sid
    for session in (first, second, bob):
        assert statuses(gateway, session) == {200}
    assert back_channel(gateway, logout_token(idp, sid=first.sid)).status_code == 200
    eventually(lambda: statuses(gateway, first) == {401})
    assert statuses(gateway, second) == {200} and statuses(gateway, bob) == {200}


def test_back_channel_logout_by_sub_ends_every_server_side_session_of_the_user(
    gateway: GatewayProcess, idp: IdPProcess
) -> None:
    alice = [log_in(gateway, idp, "alice"), log_in(gateway, idp, "alice")]
    bob = log_in(gateway, idp, "bob")
    assert back_channel(gateway, logout_token(idp, sub="alice")).status_code == 200
    for session in alice:
        eventually(lambda session=session: statuses(gateway, session) == {401})  # type: ignore[misc]
    assert statuses(gateway, bob) == {200}


def test_a_browsers_logout_ends_the_idp_session_with_the_sessions_own_id_token(
    gateway: GatewayProcess, idp: IdPProcess
) -> None:
    session = log_in(gateway, idp, "alice")
    form = httpx.post(
        f"{gateway.url}/.gateway/logout", headers={"Cookie": session.cookie, "Origin": gateway.url}, data={"go": "1"}
    )
    assert form.status_code == 303
    target = urlsplit(form.headers["location"])
    assert f"{target.scheme}://{target.netloc}{target.path}" == f"{idp.url}/end_session"
    query = {k: v[0] for k, v in parse_qs(target.query).items()}
    key = jwt.PyJWKClient(f"{idp.url}/jwks").get_signing_key_from_jwt(query["id_token_hint"]).key
    hint = jwt.decode(query["id_token_hint"], key, algorithms=["RS256"], audience="legacy-app", issuer=idp.url)
    assert hint["sub"] == "alice" and hint["sid"] == session.sid
    eventually(lambda: statuses(gateway, session) == {401})


def test_gateway_sessions_lists_and_ends_server_side_sessions(gateway: GatewayProcess, idp: IdPProcess) -> None:
    from test_backchannel_process import sessions_command

    first, second = log_in(gateway, idp, "bob"), log_in(gateway, idp, "bob")
    listed = sessions_command(gateway, "list", "--sub", "bob")
    assert listed.returncode == 0, listed.stderr
    rows = [line.split("\t") for line in listed.stdout.splitlines()[1:-1]]
    assert {first.sid, second.sid} <= {row[2] for row in rows}
    ended = sessions_command(gateway, "end", "--sub", "bob", f"--sid={first.sid}")
    assert ended.returncode == 0 and ended.stdout.splitlines()[-1] == "1 session(s) ended", ended.stdout
    eventually(lambda: statuses(gateway, first) == {401})
    assert statuses(gateway, second) == {200}
