"""One browser session in either session mode, for tests whose body is the same in both.

``mode`` is ``"cookie"`` (the default: the access token in a cookie, the refresh token in a sealed
httpOnly cookie) or ``"server"`` (``session.mode: server``: one sealed session cookie, the tokens in the
store's session record). ``with_mode(config, mode)`` turns a cookie-mode config into the other mode.

``Browser`` starts a session from IdP-issued tokens as a login would (cookie mode: the cookies the
gateway would set, support.sealed; server mode: the record written with the gateway's own code,
support.sessions), sends requests with the cookies it holds, and keeps what each answer sets, as a
browser does. In server mode every answer is checked for the mode's promise: no token ever in a
``Set-Cookie``, only the session cookie.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import redis

from gateway.sealing import Sealer
from gateway.sessions import SessionRecord
from support.sealed import STORE_SECRET, refresh_cookie, refresh_token_in
from support.servers import GatewayProcess, set_cookies
from support.sessions import record_key, start_session

MODES = ("cookie", "server")
ACCESS, REFRESH = "__Host-gw_access", "__Host-gw_refresh"
SESSION = "__Host-gw_session"
# idle_timeout 16: a use is recorded (and the workers' cached copies refreshed) every 2 s.
SESSION_SETTINGS: dict[str, Any] = {"idle_timeout": 16}


def with_mode(config: dict[str, Any], mode: str) -> dict[str, Any]:
    """``config`` (cookie mode, ``cookies.secure: true``) in ``mode``."""
    if mode == "server":
        config["session"] = {"mode": "server", **SESSION_SETTINGS, **config.get("session", {})}
    return config


class Browser:
    """What one browser holds for one session of ``gw`` and how it uses it; see the module docstring."""

    def __init__(self, gw: GatewayProcess, mode: str, redis_url: str) -> None:
        self.gw, self.mode, self.redis_url = gw, mode, redis_url
        self.prefix = str(gw.config["store"]["key_prefix"])
        self.jar: dict[str, str] = {}
        self.first_refresh: str | None = None

    def start(self, tokens: dict[str, str], claims: dict[str, Any] | None = None) -> Browser:
        """A session holding IdP-issued ``tokens`` (``{"access", "refresh"}``), as just after a login."""
        self.first_refresh = tokens["refresh"]
        if self.mode == "server":
            cookie = start_session(self.redis_url, self.prefix, tokens, claims or {"sub": "alice"},
                                   session=SESSION_SETTINGS)  # fmt: skip
            name, _, value = cookie.partition("=")
            self.jar = {name: value}
        else:
            self.jar = {ACCESS: tokens["access"], REFRESH: refresh_cookie(tokens["refresh"], REFRESH)}
        return self

    def copy(self) -> Browser:
        """Another tab (or a copy of the browser's state): the same cookies, kept apart from now on."""
        other = Browser(self.gw, self.mode, self.redis_url)
        other.jar, other.first_refresh = dict(self.jar), self.first_refresh
        return other

    def drop_access(self) -> Browser:
        """Cookie mode: the access cookie gone (a browser back after a while); server mode: nothing to drop."""
        self.jar.pop(ACCESS, None)
        return self

    @property
    def cookie(self) -> str:
        return "; ".join(f"{name}={value}" for name, value in self.jar.items())

    def headers(self, **extra: str) -> dict[str, str]:
        return {"Cookie": self.cookie, **extra}

    def get(self, path: str = "/x", **headers: str) -> httpx.Response:
        return self.keep(httpx.get(f"{self.gw.url}{path}", headers=self.headers(**headers), timeout=30))

    def keep(self, response: httpx.Response) -> httpx.Response:
        """What the browser does with an answer: the cookies it sets are kept, the cleared ones dropped."""
        jar = set_cookies(check(response, self.mode))
        for name, morsel in jar.items():
            if morsel["max-age"] == "0":
                self.jar.pop(name, None)
            else:
                self.jar[name] = morsel.value
        return response

    # --- what the session holds -----------------------------------------------------------------

    def refresh_token(self) -> str | None:
        """The refresh token the session holds now (cookie mode: in the browser; server mode: in the store)."""
        if self.mode == "cookie":
            return refresh_token_in(self.jar[REFRESH], REFRESH) if REFRESH in self.jar else None
        record = self.record()
        return record.refresh if record is not None else None

    def record(self) -> SessionRecord | None:
        """Server mode: the session record in the store (None when it is gone)."""
        key = record_key(self.prefix, f"{SESSION}={self.jar[SESSION]}") if SESSION in self.jar else None
        if key is None:
            return None
        with redis.Redis.from_url(self.redis_url) as client:
            raw = client.get(key)
        if raw is None:
            return None
        return SessionRecord(**json.loads(Sealer(STORE_SECRET).unseal(raw, key[len(self.prefix) :])))


def check(response: httpx.Response, mode: str) -> httpx.Response:
    """Server mode's promise, on every answer: the only cookie set is the session's, never a token."""
    if mode == "server":
        names = set(set_cookies(response))
        assert names <= {SESSION}, f"a token cookie was set in session mode: {names}"
    return response


def kept(response: httpx.Response) -> bool:
    """The answer leaves what the browser holds as it is (a transient failure: nothing set, nothing cleared)."""
    return "set-cookie" not in response.headers


def cleared(response: httpx.Response, mode: str) -> bool:
    """The answer ends the session in the browser: its credentials cleared."""
    jar = set_cookies(check(response, mode))
    names = (SESSION,) if mode == "server" else (ACCESS, REFRESH)
    return all(name in jar and jar[name]["max-age"] == "0" for name in names)


def rotated(response: httpx.Response, mode: str) -> bool:
    """A successful refresh as the browser sees it: cookie mode, a new refresh cookie; server mode, nothing
    set at all (the successor lives in the record)."""
    check(response, mode)
    return REFRESH in set_cookies(response) if mode == "cookie" else kept(response)


def handed_out(responses: list[httpx.Response], browser: Browser) -> set[str | None]:
    """The refresh tokens a batch of answers left the session with: every answer's rotated cookie (cookie
    mode), or the record's one (server mode, where no answer sets anything)."""
    if browser.mode == "cookie":
        return {refresh_token_in(set_cookies(r)[REFRESH].value, REFRESH) for r in responses}
    assert all(kept(check(r, "server")) for r in responses)
    return {browser.refresh_token()}
