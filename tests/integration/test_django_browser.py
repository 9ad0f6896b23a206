"""The Django recipe (docs/recipes.md#django), for real: a Django admin behind `gateway serve`, in headless Chromium.

Processes: the demo IdP (access tokens live ACCESS_TTL seconds), Redis, `gateway serve` with two
workers, and the Django project in tests/support/django_app/ under uvicorn (RemoteUserMiddleware on
X-Auth-User, mapped from the `email` claim; staff when X-Auth-Roles holds `admin`; sqlite in a
temporary directory). What a user notices, on one logged-in tab, in file order: the admin greets the
IdP's user, whatever names the page itself sends; an admin form posted after the access token has
expired is saved (one refresh at the IdP, Django's CSRF cookie and token intact); the admin's own
"Log out" button ends the gateway session.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import Browser, Page, Playwright, Request, sync_playwright
from support.servers import GatewayProcess, IdPProcess, ServerProcess, start_gateway, start_idp

CHROMIUM = "/usr/bin/chromium"  # as tests/integration/test_browser.py
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
TESTS = Path(__file__).resolve().parents[1]  # tests/: the directory `support` is imported from
USER = "alice@example.com"  # alice's email claim: X-Auth-User is mapped from `email`, not `sub`


# --- processes ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def idp() -> Iterator[IdPProcess]:
    with start_idp(algorithm="RS256", access_ttl=ACCESS_TTL) as server:
        yield server


@pytest.fixture(scope="module")
def django_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the app keeps its sqlite database."""
    return tmp_path_factory.mktemp("django-app")


@pytest.fixture(scope="module")
def django_app(django_dir: Path) -> Iterator[ServerProcess]:
    """`python -m support.django_app`: migrates, then serves the admin under uvicorn."""
    app = ServerProcess("support.django_app", lambda port: ["--port", str(port)], ready_path="/whoami")
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    app.env = {**os.environ, "PYTHONPATH": path, "DJANGO_APP_DIR": str(django_dir)}
    with app.start():
        yield app


@pytest.fixture(scope="module")
def gateway(idp: IdPProcess, django_app: ServerProcess, redis_url: str) -> Iterator[GatewayProcess]:
    prefix = f"gwtest:{os.urandom(4).hex()}:"

    def config(port: int) -> dict[str, Any]:
        return {
            "store": {"url": redis_url, "key_prefix": prefix, "secret": "django-tests-secret"},
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
                "client_id": "legacy-app",
                "client_secret": "demo-secret",
                "revocation_endpoint": f"{idp.url}/revoke",
            },
            "cookies": {"secure": False},
            "identity": {"headers": {"X-Auth-User": "email", "X-Auth-Email": "email", "X-Auth-Roles": "roles"}},
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
                    "name": "admin",
                    "path": "/admin/",
                    "upstream": django_app.url,
                    "require": {"claims": {"is_staff": True}},
                },
                {"name": "app", "path": "/", "upstream": django_app.url},
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


@pytest.fixture(scope="module")
def session(browser: Browser) -> Iterator[Page]:
    """One tab shared by the scenarios below, in file order: the first one logs in."""
    context = browser.new_context()
    yield context.new_page()
    context.close()


def session_cookies(page: Page) -> dict[str, str]:
    return {c["name"]: c["value"] for c in page.context.cookies() if c["name"] in (ACCESS, REFRESH)}


def greeted(page: Page) -> str:
    """The user Django's admin header greets ("Welcome, <user>.")."""
    return page.locator("#user-tools strong").inner_text()


WHOAMI = """async (headers) => (await fetch("/whoami", {headers})).json()"""
SPOOFED = {"X-Auth-User": "mallory", "X_Auth_User": "mallory", "HTTP-X-Auth-User": "mallory", "X-Auth-Roles": "admin"}


# --- scenarios ----------------------------------------------------------------------------


def test_the_admin_greets_the_idps_user_and_no_name_the_page_sends(
    session: Page, gateway: GatewayProcess, idp: IdPProcess, django_app: ServerProcess
) -> None:
    session.goto(f"{gateway.url}/admin/")
    assert session.url.startswith(f"{idp.url}/authorize?"), session.url
    session.fill("#username", "alice")
    session.fill("#password", "alice")
    with session.expect_navigation(url=f"{gateway.url}/admin/"):
        session.click("#login")
    assert greeted(session) == USER  # RemoteUserMiddleware logged in the header's user, staff by its roles
    assert session.locator("#site-name").inner_text() == "Django administration"
    # Names a page sends in every spelling Django could read as the user never arrive: Django sees the gateway's.
    seen = session.evaluate(WHOAMI, SPOOFED)
    assert seen == {
        "meta": {"HTTP_X_AUTH_USER": USER, "HTTP_X_AUTH_EMAIL": USER, "HTTP_X_AUTH_ROLES": "user,admin"},
        "user": USER,
    }
    # What they would do to an app reachable without the gateway: Django 5.2 under ASGI keeps HTTP-X-Auth-User
    # (its RemoteUserMiddleware's async path reads header "HTTP_X_AUTH_USER" there), and believes X-Auth-User.
    direct = httpx.get(f"{django_app.url}/whoami", headers=SPOOFED).json()
    assert direct["user"] == "mallory" and direct["meta"]["HTTP_HTTP_X_AUTH_USER"] == "mallory"


def test_an_admin_form_posted_after_expiry_is_saved_with_one_refresh(
    session: Page, gateway: GatewayProcess, idp: IdPProcess, django_dir: Path
) -> None:
    session.goto(f"{gateway.url}/admin/auth/group/add/")
    assert session.locator("input[name=csrfmiddlewaretoken]").count() == 1  # the form is CSRF-protected
    old = session_cookies(session)
    time.sleep(ACCESS_TTL + 1)  # the page's access token has expired: the POST carries only a valid refresh cookie
    off_site: list[str] = []

    def leaves_gateway(request: Request) -> None:
        if not request.url.startswith(gateway.url):
            off_site.append(request.url)

    session.on("request", leaves_gateway)
    before = idp.stats()
    session.fill("#id_name", "editors")
    with session.expect_navigation(url=f"{gateway.url}/admin/auth/group/"):
        session.click("input[name=_save]")
    session.remove_listener("request", leaves_gateway)
    assert "was added successfully" in session.locator(".messagelist .success").inner_text()
    assert greeted(session) == USER
    with sqlite3.connect(django_dir / "db.sqlite3") as db:
        assert db.execute("SELECT name FROM auth_group").fetchall() == [("editors",)]
    after = idp.stats()
    assert after["refresh_calls"] - before["refresh_calls"] == 1
    assert after["authorize_requests"] == before["authorize_requests"] and off_site == [], "sent to the login"
    rotated = session_cookies(session)
    assert rotated[ACCESS] != old[ACCESS] and rotated[REFRESH] != old[REFRESH]


def test_the_admins_log_out_button_ends_the_gateway_session(
    session: Page, gateway: GatewayProcess, idp: IdPProcess
) -> None:
    session.goto(f"{gateway.url}/admin/")
    revocations = idp.stats()["revocations"]
    with session.expect_navigation(url=f"{idp.url}/authorize?**"):  # 303 to logout.redirect (/), then the login
        session.click("#logout-form button")
    assert session_cookies(session) == {}
    assert idp.stats()["revocations"] == revocations + 1
    session.goto(f"{gateway.url}/admin/")
    assert session.url.startswith(f"{idp.url}/authorize?"), session.url
    assert session.locator("#login").is_visible()
