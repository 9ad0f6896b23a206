"""A real browser (headless Chromium driven by Playwright) against real processes: gateway, demo IdP, Redis.

What a user of a legacy app notices: signing in through the gateway's OIDC login, pages and
parallel fetches that keep working across token expiry with one IdP refresh, reloads that never
bounce to the login page, no token readable by page JavaScript, a JSON login whose refresh token
never reaches the page, cross-origin form posts refused, a logout that really ends the session, and a
7 KB access token (Entra ID's size) that lives in numbered cookies, each under the browser's 4096 bytes.

The session-sharing scenarios (refresh, reloads, cookies, CSRF) run in file order on one
logged-in page; login, capture and logout each use a fresh browser context.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, Playwright, Request, sync_playwright
from support.ports import refused_port
from support.servers import (
    GatewayProcess,
    IdPProcess,
    ServerProcess,
    start_gateway,
    start_idp,
)
from support.workers import WorkerClients

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ACCESS_TTL = 4
ACCESS, REFRESH = "gw_access", "gw_refresh"  # cookies.secure is off (plain http): no __Host- prefix


# --- processes ----------------------------------------------------------------------------


class Recorder:
    """An upstream that remembers every request it got, to prove a refused one never arrived."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _answer(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                recorder.requests.append(
                    {"method": self.command, "path": self.path, "headers": dict(self.headers), "body": body}
                )
                out = b'{"ok":true}'
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            do_GET = do_POST = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Recorder:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


class SinglePage:
    """A single-page app's own server: another origin (another port) of the gateway's site, serving one page."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = b"<!doctype html><title>spa</title><p>an app on another origin"
                self.send_response(200)
                self.send_header("content-type", "text/html")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.origin = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> SinglePage:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def spa() -> Iterator[SinglePage]:
    with SinglePage() as server:
        yield server


@pytest.fixture(scope="module")
def idp() -> Iterator[IdPProcess]:
    with start_idp(algorithm="RS256", access_ttl=ACCESS_TTL) as server:
        yield server


@pytest.fixture(scope="module")
def recorder() -> Iterator[Recorder]:
    with Recorder() as server:
        yield server


@pytest.fixture(scope="module")
def gateway(
    idp: IdPProcess, upstream: ServerProcess, recorder: Recorder, spa: SinglePage, redis_url: str
) -> Iterator[GatewayProcess]:
    prefix = f"gwtest:{os.urandom(4).hex()}:"

    def config(port: int) -> dict[str, Any]:  # the gateway's own URL is in it: written for the port it gets
        return {
            "store": {"url": redis_url, "key_prefix": prefix, "secret": "browser-tests-secret"},
            "tokens": {
                "algorithms": ["RS256"],
                "jwks_url": f"{idp.url}/jwks",
                "issuer": idp.url,
                "audience": "legacy-app",
                "leeway": 0,
                "refresh_before": 1,
            },
            "refresh": {
                "endpoint": f"{idp.url}/token",
                "style": "oauth2",
                "client_id": "legacy-app",
                "client_secret": "demo-secret",
                "revocation_endpoint": f"{idp.url}/revoke",
            },
            "cookies": {"secure": False},
            "login": {
                "oidc": {
                    "issuer": idp.url,
                    "client_id": "legacy-app",
                    "client_secret": "demo-secret",
                    "redirect_url": f"http://127.0.0.1:{port}/.gateway/callback",
                }
            },
            "routes": [
                {
                    "name": "login",
                    "path": "/api/token/",
                    "upstream": idp.url,
                    "auth": "none",
                    "capture": {"access": "access", "refresh": "refresh"},
                },
                {"name": "transfer", "path": "/transfer", "upstream": recorder.url},
                {
                    "name": "spa-api",
                    "path": "/spa-api/",
                    "upstream": upstream.url,
                    "cors": {
                        "allowed_origins": [spa.origin],
                        "allowed_headers": ["Content-Type", "X-Spa"],
                        "allow_credentials": True,
                    },
                },
                {"name": "app", "path": "/", "upstream": upstream.url},
            ],
        }

    with start_gateway(config, workers=2) as server:
        yield server


# --- the browser --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"{CHROMIUM} not found: install Debian's chromium: apt-get install chromium", pytrace=False)
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
    yield browser
    browser.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    """A fresh browser profile: no cookies."""
    context = browser.new_context()
    yield context
    context.close()


@pytest.fixture(scope="module")
def session(browser: Browser, gateway: GatewayProcess, idp: IdPProcess) -> Iterator[Page]:
    """One logged-in tab shared by the scenarios that follow a session over time."""
    context = browser.new_context()
    page = context.new_page()
    log_in(page, gateway, idp)
    yield page
    context.close()


def log_in(page: Page, gateway: GatewayProcess, idp: IdPProcess, user: str = "alice") -> None:
    """What a user does: open a gateway page, get the IdP's form, sign in, land back on the page."""
    page.goto(f"{gateway.url}/home")
    assert page.url.startswith(f"{idp.url}/authorize?"), page.url
    page.fill("#username", user)
    page.fill("#password", user)
    with page.expect_navigation(url=f"{gateway.url}/home"):
        page.click("#login")
    assert shown_user(page) == user


def echo_of(page: Page) -> dict[str, Any]:
    """The echo upstream's JSON, as the browser shows it."""
    data: dict[str, Any] = json.loads(page.locator("pre").first.inner_text())
    return data


def shown_user(page: Page) -> str | None:
    return dict(echo_of(page)["headers"]).get("x-auth-user")


def session_cookies(context: BrowserContext) -> dict[str, dict[str, Any]]:
    return {c["name"]: dict(c) for c in context.cookies() if c["name"] in (ACCESS, REFRESH)}


def assert_tokens_hidden(page: Page) -> dict[str, dict[str, Any]]:
    """Both session cookies are httpOnly: page JavaScript cannot read either token."""
    cookies = session_cookies(page.context)
    assert set(cookies) == {ACCESS, REFRESH}
    visible = page.evaluate("document.cookie")
    for cookie in cookies.values():
        assert cookie["httpOnly"] is True, cookie["name"]
        assert cookie["value"] and cookie["value"] not in visible, cookie["name"]
    return cookies


FETCH_ALL = """async (count) => {
    const answers = await Promise.all(Array.from({length: count}, (_, i) => fetch("/api/x?i=" + i)));
    return Promise.all(answers.map(async (r) => {
        const body = await r.json();
        const headers = Object.fromEntries(body.headers || []);
        return {status: r.status, user: headers["x-auth-user"] || null, query: body.query_string || null};
    }));
}"""

FETCH = """async ([url, method, body]) => {
    const init = {method};
    if (body !== null) { init.body = JSON.stringify(body); init.headers = {"content-type": "application/json"}; }
    const r = await fetch(url, init);
    return {status: r.status, text: await r.text()};
}"""


CROSS_ORIGIN_FETCH = """async (url) => {
    try {
        const r = await fetch(url, {method: "PUT", credentials: "include", body: JSON.stringify({n: 1}),
                                    headers: {"content-type": "application/json", "x-spa": "1"}});
        const body = await r.json();
        return {status: r.status, user: Object.fromEntries(body.headers)["x-auth-user"] || null};
    } catch (e) {
        return {error: String(e)};
    }
}"""


OPEN_SOCKET = """(url) => new Promise((resolve) => {
    const socket = new WebSocket(url);
    window.__closed = new Promise((done) => { socket.onclose = (e) => done({code: e.code, reason: e.reason}); });
    socket.onmessage = (e) => resolve({opened: true, hello: JSON.parse(e.data).hello});
    socket.onerror = () => resolve({opened: false});
})"""

SOCKET_CLOSED = """() => Promise.race([window.__closed, new Promise((r) => setTimeout(() => r(null), 8000))])"""


def wait_for_expiry() -> None:
    """Sleep until the session's access token has expired (its cookie is only ever ACCESS_TTL long)."""
    time.sleep(ACCESS_TTL + 1)


# --- scenarios ----------------------------------------------------------------------------


def test_log_in_through_the_gateway(context: BrowserContext, gateway: GatewayProcess, idp: IdPProcess) -> None:
    before = idp.stats()
    page = context.new_page()
    log_in(page, gateway, idp)  # asserts the round trip: /home -> IdP form -> /home as alice
    assert page.url == f"{gateway.url}/home"
    after = idp.stats()
    assert after["logins"] - before["logins"] == 1
    assert after["code_exchanges"] - before["code_exchanges"] == 1
    assert set(session_cookies(context)) == {ACCESS, REFRESH}


def test_parallel_fetches_after_expiry_share_one_refresh(session: Page, idp: IdPProcess) -> None:
    old = session_cookies(session.context)
    wait_for_expiry()
    before = idp.stats()["refresh_calls"]
    results = session.evaluate(FETCH_ALL, 20)
    assert [r["status"] for r in results] == [200] * 20
    assert [r["user"] for r in results] == ["alice"] * 20
    assert sorted(r["query"] for r in results) == sorted(f"i={i}" for i in range(20))
    assert idp.stats()["refresh_calls"] - before == 1
    rotated = assert_tokens_hidden(session)
    assert rotated[ACCESS]["value"] != old[ACCESS]["value"]
    assert rotated[REFRESH]["value"] != old[REFRESH]["value"]


def test_ten_reloads_in_two_seconds_stay_logged_in(session: Page, gateway: GatewayProcess, idp: IdPProcess) -> None:
    # Start with an expired access token and a slow IdP, so the first reload's refresh is still running
    # when the next reloads cancel it: the browser never sees that response's Set-Cookie and comes back
    # with the refresh token the gateway has just spent.
    wait_for_expiry()
    off_site: list[str] = []
    cancelled: list[str] = []

    def leaves_gateway(request: Request) -> None:
        if not request.url.startswith(gateway.url):
            off_site.append(request.url)

    def cancelled_load(request: Request) -> None:
        if request.is_navigation_request() and request.failure == "net::ERR_ABORTED":
            cancelled.append(request.url)

    session.on("request", leaves_gateway)
    session.on("requestfailed", cancelled_load)
    before = idp.stats()
    cdp = session.context.new_cdp_session(session)
    idp.behaviour(latency=0.5)
    try:
        started = time.monotonic()
        for _ in range(10):
            # A user mashing the reload button: while a page loads it is a stop button, so every
            # other click cancels the load in flight. CDP's reload returns at once; page.reload() waits.
            cdp.send("Page.stopLoading")
            cdp.send("Page.reload")
            session.wait_for_timeout(140)
        elapsed = time.monotonic() - started
    finally:
        idp.behaviour(latency=0)
        cdp.detach()
    session.wait_for_load_state("load")
    session.reload()
    session.remove_listener("request", leaves_gateway)
    session.remove_listener("requestfailed", cancelled_load)
    assert elapsed < 2
    assert cancelled, "no load was cancelled: the scenario did not happen"
    assert session.url == f"{gateway.url}/home"
    assert shown_user(session) == "alice"
    assert off_site == [], "a reload was sent to the login page"
    after = idp.stats()
    assert after["authorize_requests"] == before["authorize_requests"] and after["logins"] == before["logins"]
    assert after["reuse_detected"] == before["reuse_detected"], "a cancelled reload made the gateway replay a token"
    assert after["families_revoked"] == before["families_revoked"]
    assert after["refresh_calls"] - before["refresh_calls"] == 1


def test_page_javascript_never_sees_a_token(session: Page) -> None:
    cookies = assert_tokens_hidden(session)
    assert session.evaluate("document.cookie") == ""
    # Nor does the upstream get them to reflect back: the gateway cuts its cookies from what it forwards.
    page_text = session.content()
    assert cookies[REFRESH]["value"] not in page_text and cookies[ACCESS]["value"] not in page_text
    assert not any(name.lower() == "cookie" and ACCESS in value for name, value in echo_of(session)["headers"])


def test_token_capture_keeps_the_refresh_token_from_the_page(context: BrowserContext, gateway: GatewayProcess) -> None:
    page = context.new_page()
    page.goto(f"{gateway.url}/.gateway/health")  # any page of the gateway's origin
    login = page.evaluate(FETCH, ["/api/token/", "POST", {"username": "alice", "password": "alice"}])
    assert login["status"] == 200
    body = json.loads(login["text"])
    assert "access" in body and "refresh" not in body
    cookies = session_cookies(context)
    assert set(cookies) == {ACCESS, REFRESH} and cookies[REFRESH]["httpOnly"] and cookies[ACCESS]["httpOnly"]
    assert cookies[REFRESH]["value"] not in login["text"]
    assert cookies[REFRESH]["value"] not in page.evaluate("document.cookie")
    me = page.evaluate(FETCH, ["/api/me", "GET", None])
    assert me["status"] == 200
    assert dict(json.loads(me["text"])["headers"])["x-auth-user"] == "alice"


def test_cross_origin_form_post_is_refused(session: Page, gateway: GatewayProcess, recorder: Recorder) -> None:
    # Another origin on the same host (another port): the same *site*, so SameSite=Lax still sends the
    # session cookies along and only the gateway's Origin check stands between the form and the app.
    with refused_port() as port:  # nothing answers there: the page comes from the route below
        attack = f"http://127.0.0.1:{port}/attack"
        form = f"""<!doctype html><title>win a prize</title>
<form method="post" action="{gateway.url}/transfer"><input name="amount" value="1000"></form>
<script>document.forms[0].submit()</script>"""
        session.route(attack, lambda route: route.fulfill(status=200, content_type="text/html", body=form))
        seen = len(recorder.requests)
        try:
            with session.expect_response(f"{gateway.url}/transfer") as posted:
                session.goto(attack)
            response = posted.value
            assert response.request.method == "POST"
            assert response.status == 403
            assert "csrf" in response.text()
        finally:
            session.unroute(attack)
        assert len(recorder.requests) == seen, "the refused POST reached the upstream"
        # The same browser, from the gateway's own page: passes, as the user.
        session.goto(f"{gateway.url}/home")
        same_origin = session.evaluate(FETCH, ["/transfer", "POST", {"amount": 5}])
        assert same_origin["status"] == 200
        assert len(recorder.requests) == seen + 1
        arrived = recorder.requests[-1]
        assert arrived["method"] == "POST" and arrived["body"] == b'{"amount":5}'
        assert {k.lower(): v for k, v in arrived["headers"].items()}["x-auth-user"] == "alice"


def test_a_page_on_another_origin_fetches_a_cors_route_as_the_user(
    session: Page, gateway: GatewayProcess, spa: SinglePage
) -> None:
    """A credentialed cross-origin PUT with a custom header: Chromium preflights it, the gateway answers, the PUT
    goes through as the user; on a route without cors the preflight is refused and the page sees a network error."""
    seen = len(gateway.log().splitlines())
    session.goto(f"{spa.origin}/")
    try:
        allowed = session.evaluate(CROSS_ORIGIN_FETCH, f"{gateway.url}/spa-api/items")
        refused = session.evaluate(CROSS_ORIGIN_FETCH, f"{gateway.url}/api/items")
    finally:
        session.goto(f"{gateway.url}/home")
    assert allowed == {"status": 200, "user": "alice"}
    assert refused == {"error": "TypeError: Failed to fetch"}
    lines = [json.loads(line) for line in gateway.log().splitlines()[seen:] if line.startswith("{")]
    requests = [(r["method"], r["path"], r["status"]) for r in lines if r.get("path", "").endswith("/items")]
    assert ("OPTIONS", "/spa-api/items", 204) in requests and ("PUT", "/spa-api/items", 200) in requests
    assert ("OPTIONS", "/api/items", 401) in requests and ("PUT", "/api/items", 200) not in requests


def test_cross_site_page_cannot_open_a_websocket_on_the_session(session: Page, gateway: GatewayProcess) -> None:
    """Cross-site WebSocket hijacking: the browser sends the session cookies along, the gateway refuses."""

    class Attack(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<!doctype html><title>win a prize</title>"
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            return None

    # Another origin on the same host (a real server on another port): the same site, so the
    # browser sends the session cookies with the handshake and only the Origin check stands.
    server = ThreadingHTTPServer(("127.0.0.1", 0), Attack)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    live = gateway.url.replace("http://", "ws://") + "/live"
    seen = len(gateway.log().splitlines())
    try:
        session.goto(f"http://127.0.0.1:{server.server_address[1]}/attack")
        assert session.evaluate(OPEN_SOCKET, live) == {"opened": False}
    finally:
        server.shutdown()
        server.server_close()
    deadline = time.monotonic() + 5
    while not any("reason=csrf" in line for line in gateway.log().splitlines()[seen:]):
        assert time.monotonic() < deadline, "the handshake did not reach the gateway, or was not refused as csrf"
        time.sleep(0.1)
    session.goto(f"{gateway.url}/home")  # from the gateway's own page: the same socket opens, as the user
    opened = session.evaluate(OPEN_SOCKET, live)
    assert opened["opened"] and dict(opened["hello"]["headers"])["x-auth-user"] == "alice"


def test_logout_ends_the_session_everywhere(context: BrowserContext, gateway: GatewayProcess, idp: IdPProcess) -> None:
    page = context.new_page()
    log_in(page, gateway, idp)
    old = session_cookies(context)
    revocations = idp.stats()["revocations"]
    with WorkerClients(gateway) as workers:  # a connection held by each of the gateway's workers
        out = page.evaluate(FETCH, ["/.gateway/logout", "POST", None])
        logged_out = time.monotonic()
        assert out["status"] == 204
        assert session_cookies(context) == {}
        assert idp.stats()["revocations"] == revocations + 1
        # A copy of the old access token, replayed outside the browser, is refused by every worker (the
        # others hear of it through the store: within a second).
        token = old[ACCESS]["value"]
        replays = [("GET", f"{gateway.url}/api/x", {"Authorization": f"Bearer {token}"})] * 4
        replays += [("GET", f"{gateway.url}/api/x", {"Cookie": f"{ACCESS}={token}"})] * 4
        while True:
            served = workers.batch(replays)
            if {s.worker for s in served} == set(workers.pids) and all(
                s.response.status_code == 401 and s.response.json()["reason"] == "token_revoked" for s in served
            ):
                break
            assert time.monotonic() - logged_out < 1.0, [(s.worker, s.response.text) for s in served]
    # So is the old refresh token.
    stale = httpx.get(f"{gateway.url}/api/x", headers={"Cookie": f"{REFRESH}={old[REFRESH]['value']}"})
    assert stale.status_code == 401
    # And the next navigation goes to the login page.
    page.goto(f"{gateway.url}/home")
    assert page.url.startswith(f"{idp.url}/authorize?"), page.url
    assert page.locator("#login").is_visible()


def test_a_pages_websocket_closes_when_the_user_logs_out(
    context: BrowserContext, gateway: GatewayProcess, idp: IdPProcess
) -> None:
    page = context.new_page()
    log_in(page, gateway, idp)
    opened = page.evaluate(OPEN_SOCKET, gateway.url.replace("http://", "ws://") + "/live")
    assert opened["opened"] and dict(opened["hello"]["headers"])["x-auth-user"] == "alice"
    assert page.evaluate(FETCH, ["/.gateway/logout", "POST", None])["status"] == 204
    assert page.evaluate(SOCKET_CLOSED) == {"code": 4401, "reason": "session ended"}


def test_a_7_kb_access_token_lives_in_numbered_cookies_and_survives_refreshes(
    context: BrowserContext, gateway: GatewayProcess, idp: IdPProcess
) -> None:
    """Issue 16, item 2: Entra ID / Keycloak tokens of 5-10 KB. A cookie over 4096 bytes is dropped by the browser
    (a silent logout, or a login loop); the gateway splits it into numbered cookies that Chromium keeps."""
    set_cookie_lines: list[str] = []

    def record(response: Any) -> None:
        if response.url.startswith(gateway.url):
            set_cookie_lines.extend(h["value"] for h in response.headers_array() if h["name"].lower() == "set-cookie")

    idp.behaviour(groups=120)  # RS256 access tokens of about 7 KB
    try:
        page = context.new_page()
        page.on("response", record)
        log_in(page, gateway, idp)  # through the OIDC callback
        jar = {c["name"]: c["value"] for c in context.cookies()}
        assert {f"{ACCESS}_0", f"{ACCESS}_1", REFRESH} <= set(jar) and ACCESS not in jar, sorted(jar)
        first = jar[f"{ACCESS}_0"] + jar[f"{ACCESS}_1"]
        assert len(first) > 7000
        before = idp.stats()
        for round in (1, 2):  # the access token expires: fetches and a reload refresh it, once
            wait_for_expiry()
            results = page.evaluate(FETCH_ALL, 5)
            assert [(r["status"], r["user"]) for r in results] == [(200, "alice")] * 5
            page.reload()
            assert page.url == f"{gateway.url}/home" and shown_user(page) == "alice"
            assert idp.stats()["refresh_calls"] - before["refresh_calls"] == round
        after = idp.stats()
        assert after["reuse_detected"] == before["reuse_detected"] and after["logins"] == before["logins"]
        jar = {c["name"]: c["value"] for c in context.cookies()}
        assert jar[f"{ACCESS}_0"] + jar[f"{ACCESS}_1"] != first  # rotated, still in two chunks
        upstream_cookie = dict(echo_of(page)["headers"]).get("cookie", "")
        assert "gw_" not in upstream_cookie  # the upstream never sees a chunk
    finally:
        idp.behaviour(groups=0)
    assert set_cookie_lines
    assert all(len(line.encode()) < 4096 for line in set_cookie_lines), max(map(len, set_cookie_lines))
    assert all(len(c["name"]) + len(c["value"]) < 4096 for c in context.cookies())
