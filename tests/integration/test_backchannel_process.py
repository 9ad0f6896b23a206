"""Logout that reaches every session of a user (issue 16, items 5 and 6), with real processes: the demo IdP as
an OpenID provider that signs real logout tokens, ``gateway serve --workers 2`` on Redis, ``gateway sessions``.

Back-channel logout by ``sid`` ends exactly that session, by ``sub`` every session of the user, on both
workers, access tokens within their lifetime included; its WebSockets close; bad logout tokens are refused.
Logout through the gateway ends the IdP's session too (RP-initiated logout, a valid ``id_token_hint``).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
import yaml
from support.configs import demo_refresh, oidc_login
from support.servers import GatewayProcess, IdPProcess, set_cookies, start_gateway, start_idp, start_upstream
from support.workers import WorkerClients
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

SECRET = "backchannel-tests-secret"


@pytest.fixture(scope="module")
def idp() -> Iterator[IdPProcess]:
    with start_idp(algorithm="RS256", access_ttl=300) as server:
        yield server


@pytest.fixture(scope="module")
def store() -> dict[str, str]:
    return {"key_prefix": f"gwtest:{os.urandom(4).hex()}:", "secret": SECRET}


@pytest.fixture(scope="module")
def gateway(idp: IdPProcess, redis_url: str, store: dict[str, str]) -> Iterator[GatewayProcess]:
    with start_upstream() as upstream:

        def config(port: int) -> dict[str, Any]:
            return {
                "store": {"url": redis_url, **store},
                "tokens": {"algorithms": ["RS256"], "jwks_url": f"{idp.url}/jwks", "issuer": idp.url},
                "refresh": demo_refresh(idp),
                "cookies": {"secure": False},
                "login": oidc_login(idp, port),
                "logout": {"redirect": "/goodbye"},
                "routes": [{"name": "app", "path": "/", "upstream": upstream.url}],
            }

        with start_gateway(config, workers=2) as server:
            yield server


@dataclass
class Session:
    access: str
    refresh: str
    sid: str

    @property
    def cookie(self) -> str:
        return f"gw_access={self.access}; gw_refresh={self.refresh}"


def log_in(gateway: GatewayProcess, idp: IdPProcess, user: str) -> Session:
    """A browser's OIDC login through the gateway."""
    to_idp = httpx.get(f"{gateway.url}/.gateway/login", params={"next": "/"})
    done = httpx.get(
        idp.sign_in(to_idp.headers["location"], user), cookies={"gw_oidc": set_cookies(to_idp)["gw_oidc"].value}
    )
    assert done.status_code == 302, done.text
    cookies = set_cookies(done)
    access = cookies["gw_access"].value
    return Session(access, cookies["gw_refresh"].value, jwt.decode(access, options={"verify_signature": False})["sid"])


def logout_token(idp: IdPProcess, **claims: Any) -> str:
    response = httpx.post(f"{idp.url}/_admin/logout_token", json=claims, timeout=5)
    response.raise_for_status()
    return str(response.json()["logout_token"])


def back_channel(gateway: GatewayProcess, token: str) -> httpx.Response:
    return httpx.post(f"{gateway.url}/.gateway/backchannel-logout", data={"logout_token": token}, timeout=10)


def statuses(gateway: GatewayProcess, session: Session) -> set[int]:
    """What both workers answer the session's cookies and its access token as a Bearer token (several each)."""
    requests = [("GET", f"{gateway.url}/page", {"Cookie": session.cookie})] * 4
    requests += [("GET", f"{gateway.url}/api", {"Authorization": f"Bearer {session.access}"})] * 4
    with WorkerClients(gateway) as clients:
        found = clients.statuses(requests)
    assert len([w for w in found if w is not None]) == 2, f"not served by both workers: {found}"
    return set().union(*found.values())


def eventually(check: Callable[[], bool], within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.1)


def test_back_channel_logout_by_sid_ends_exactly_that_session_on_every_worker(
    gateway: GatewayProcess, idp: IdPProcess
) -> None:
    first, second, bob = log_in(gateway, idp, "alice"), log_in(gateway, idp, "alice"), log_in(gateway, idp, "bob")
    assert first.sid != second.sid
    for session in (first, second, bob):
        assert statuses(gateway, session) == {200}
    answer = back_channel(gateway, logout_token(idp, sid=first.sid))
    assert answer.status_code == 200 and answer.headers["cache-control"] == "no-store"
    eventually(lambda: statuses(gateway, first) == {401})  # its access token too, long before it expires
    assert statuses(gateway, second) == {200} and statuses(gateway, bob) == {200}
    browser = httpx.get(f"{gateway.url}/page", headers={"Cookie": first.cookie, "Accept": "text/html"})
    assert browser.status_code == 302 and browser.headers["location"].startswith("/.gateway/login")


def test_back_channel_logout_by_sub_ends_every_session_of_the_user(gateway: GatewayProcess, idp: IdPProcess) -> None:
    alice = [log_in(gateway, idp, "alice"), log_in(gateway, idp, "alice")]
    bob = log_in(gateway, idp, "bob")
    assert back_channel(gateway, logout_token(idp, sub="alice")).status_code == 200
    for session in alice:
        eventually(lambda session=session: statuses(gateway, session) == {401})  # type: ignore[misc]
    assert statuses(gateway, bob) == {200}


def test_a_websocket_of_an_ended_session_closes(gateway: GatewayProcess, idp: IdPProcess) -> None:
    session, bystander = log_in(gateway, idp, "alice"), log_in(gateway, idp, "bob")
    url = gateway.url.replace("http://", "ws://") + "/live"
    origin = {"Origin": gateway.url}
    with (
        connect(url, additional_headers={"Cookie": session.cookie, **origin}, open_timeout=10) as ws,
        connect(url, additional_headers={"Cookie": bystander.cookie, **origin}, open_timeout=10) as other,
    ):
        ws.recv(timeout=5), other.recv(timeout=5)  # the upstream's hello
        assert back_channel(gateway, logout_token(idp, sid=session.sid)).status_code == 200
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                ws.recv(timeout=5)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4401
        other.send("still here")
        assert other.recv(timeout=5) == "still here"


@pytest.mark.parametrize(
    ("knobs", "description"),
    [({"aud": "another-client"}, "aud"), ({"nonce": "n-1"}, "nonce"), ({"events": False}, "events")],
)
def test_bad_logout_tokens_are_refused_and_end_nothing(
    gateway: GatewayProcess, idp: IdPProcess, knobs: dict[str, Any], description: str
) -> None:
    session = log_in(gateway, idp, "alice")
    answer = back_channel(gateway, logout_token(idp, sid=session.sid, **knobs))
    assert answer.status_code == 400 and answer.json()["error"] == "invalid_request"
    assert description in answer.json()["error_description"]
    time.sleep(1.2)  # what a denylist entry would take to reach the other worker
    assert statuses(gateway, session) == {200}


def test_a_replayed_logout_token_is_refused(gateway: GatewayProcess, idp: IdPProcess) -> None:
    session = log_in(gateway, idp, "alice")
    token = logout_token(idp, sid=session.sid)
    assert back_channel(gateway, token).status_code == 200
    replay = back_channel(gateway, token)  # whichever worker takes it: the jti is shared
    assert replay.status_code == 400 and "already used" in replay.json()["error_description"]


def test_logout_ends_the_idp_session_too_with_a_valid_id_token_hint(gateway: GatewayProcess, idp: IdPProcess) -> None:
    session = log_in(gateway, idp, "alice")
    form = httpx.post(
        f"{gateway.url}/.gateway/logout",
        headers={"Cookie": session.cookie, "Origin": gateway.url},
        data={"go": "1"},
    )
    assert form.status_code == 303 and form.headers["cache-control"] == "no-store"
    target = urlsplit(form.headers["location"])
    assert f"{target.scheme}://{target.netloc}{target.path}" == f"{idp.url}/end_session"
    query = {k: v[0] for k, v in parse_qs(target.query).items()}
    assert query["client_id"] == "legacy-app" and query["post_logout_redirect_uri"] == f"{gateway.url}/goodbye"
    key = jwt.PyJWKClient(f"{idp.url}/jwks").get_signing_key_from_jwt(query["id_token_hint"]).key
    hint = jwt.decode(query["id_token_hint"], key, algorithms=["RS256"], audience="legacy-app", issuer=idp.url)
    assert hint["sub"] == "alice" and hint["sid"] == session.sid
    at_idp = httpx.get(form.headers["location"])  # the IdP takes the hint and sends the browser back
    assert at_idp.status_code == 302 and at_idp.headers["location"] == f"{gateway.url}/goodbye"
    ended = [f for f in idp.families() if f["sid"] == session.sid]
    assert ended and all(f["revoked"] for f in ended)
    eventually(lambda: statuses(gateway, session) == {401})
    # A script's logout keeps today's answer.
    other = log_in(gateway, idp, "bob")
    script = httpx.post(f"{gateway.url}/.gateway/logout", headers={"Cookie": other.cookie, "Origin": gateway.url})
    assert script.status_code == 204


def sessions_command(
    gateway: GatewayProcess, *args: str, config: str | None = None
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "gateway", "sessions", *args, "--config", config or gateway.config_path]
    return subprocess.run(command, capture_output=True, text=True, timeout=60)


def test_gateway_sessions_lists_and_ends_a_users_sessions(gateway: GatewayProcess, idp: IdPProcess) -> None:
    first, second = log_in(gateway, idp, "alice"), log_in(gateway, idp, "alice")
    listed = sessions_command(gateway, "list", "--sub", "alice")
    assert listed.returncode == 0, listed.stderr
    rows = [line.split("\t") for line in listed.stdout.splitlines()[1:-1]]
    assert {first.sid, second.sid} <= {row[2] for row in rows} and {row[1] for row in rows} == {"alice"}
    assert first.refresh not in listed.stdout and first.access not in listed.stdout
    by_sid = sessions_command(gateway, "list", "--sub", "alice", f"--sid={second.sid}")
    assert [line.split("\t")[5] for line in by_sid.stdout.splitlines()[1:-1]] == ["active"]
    ended = sessions_command(gateway, "end", "--sub", "alice", f"--sid={first.sid}")
    assert ended.returncode == 0 and ended.stdout.splitlines()[-1] == "1 session(s) ended", ended.stdout
    eventually(lambda: statuses(gateway, first) == {401})
    assert statuses(gateway, second) == {200}
    again = sessions_command(gateway, "list", f"--sid={first.sid}")
    assert "ended (session_ended)" in again.stdout


def test_gateway_sessions_says_why_it_cannot_reach_the_store(gateway: GatewayProcess, tmp_path: Any) -> None:
    with open(gateway.config_path) as handle:
        config = yaml.safe_load(handle)
    config["store"]["url"] = "redis://127.0.0.1:1/0"
    path = tmp_path / "unreachable.yaml"
    path.write_text(yaml.safe_dump(config))
    down = sessions_command(gateway, "list", "--sub", "alice", config=str(path))
    assert down.returncode == 1 and "unreachable" in down.stderr and "Traceback" not in down.stderr
    config["store"]["secret"] = None
    path.write_text(yaml.safe_dump({**config, "store": {"url": config["store"]["url"]}}))
    no_secret = sessions_command(gateway, "end", "--sub", "alice", config=str(path))
    assert no_secret.returncode == 1 and "store.secret" in no_secret.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("store: {url: 42, nonsense: 1}\n")
    invalid = sessions_command(gateway, "list", "--sub", "alice", config=str(bad))
    assert invalid.returncode == 1 and "invalid config" in invalid.stderr
