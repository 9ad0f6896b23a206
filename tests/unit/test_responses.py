"""gateway/responses.py: the open-redirect defence, navigation detection, and the 401 answer for scripts."""

from __future__ import annotations

import json
from collections.abc import MutableMapping
from typing import Any

import pytest

from gateway.responses import safe_target, send_denial, wants_html

# oauth2-proxy's open-redirect cases (and a few more): each must fall back to "/".
OPEN_REDIRECTS = [
    "//evil.com",
    "///evil.com",
    "/\\evil.com",
    "\\/evil.com",
    "\\\\evil.com",
    "/\t/evil.com",
    "/\n/evil.com",
    "/%09/evil.com",
    "/%0a/evil.com",
    "/%2F%2Fevil.com",
    "/%2f/evil.com",
    "/%5Cevil.com",
    "/%5c/evil.com",
    "https://evil.com",
    "https://evil.com/path",
    "http:evil.com",
    "http:/evil.com",
    "//evil.com/%2F..",
    "javascript:alert(1)",
    "JavaScript:alert(1)",
    "data:text/html,<script>alert(1)</script>",
    "/%0d%0aLocation:evil",
    "/\r\nLocation: https://evil.com",
    "/%00evil",
    "",
    None,
    "/" + "a" * 5000,
    "evil.com",
    "evil.com/path",
    "./x",
    "?next=/",
    "#frag",
    "/..//evil.com",
    "/../evil.com",
    "/https://evil.com",
    " /path",
]


@pytest.mark.parametrize("value", OPEN_REDIRECTS)
def test_off_site_or_odd_targets_fall_back_to_root(value: str | None) -> None:
    assert safe_target(value) == "/"


@pytest.mark.parametrize(
    "value",
    ["/", "/app", "/app?x=1", "/a/b#frag", "/a/b?next=https://other.example/x", "/search?q=a%20b&page=2", "/%7Euser/"],
)
def test_relative_paths_on_this_site_are_kept(value: str) -> None:
    assert safe_target(value) == value


# --- wants_html -------------------------------------------------------------------------


def h(*pairs: tuple[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode(), v.encode()) for k, v in pairs]


BROWSER_ACCEPT = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"


@pytest.mark.parametrize(
    ("method", "headers", "expected"),
    [
        ("GET", h(("Sec-Fetch-Mode", "navigate"), ("Accept", BROWSER_ACCEPT)), True),
        ("GET", h(("Sec-Fetch-Mode", "navigate")), True),
        ("GET", h(("Sec-Fetch-Mode", "cors"), ("Accept", BROWSER_ACCEPT)), False),
        ("GET", h(("Sec-Fetch-Mode", "no-cors"), ("Accept", "*/*")), False),
        ("GET", h(("X-Requested-With", "XMLHttpRequest"), ("Accept", BROWSER_ACCEPT)), False),
        ("GET", h(("Accept", BROWSER_ACCEPT)), True),
        ("HEAD", h(("Accept", "text/html")), True),
        ("GET", h(("Accept", "application/json")), False),
        ("GET", h(("Accept", "*/*")), False),
        ("GET", [], False),
        ("POST", h(("Accept", BROWSER_ACCEPT)), False),
    ],
)
def test_wants_html(method: str, headers: list[tuple[bytes, bytes]], expected: bool) -> None:
    assert wants_html(method, headers) is expected


# --- send_denial ----------------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.messages: list[MutableMapping[str, Any]] = []

    async def __call__(self, message: MutableMapping[str, Any]) -> None:
        self.messages.append(message)

    @property
    def status(self) -> int:
        return int(self.messages[0]["status"])

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.messages[0]["headers"])

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.messages[1:])


LOGIN = "https://idp.example/login?next=%2Fapp"


async def test_401_json_carries_login_url() -> None:
    send = Recorder()
    await send_denial(send, "no_token", html=False, route="app", login_url=LOGIN)
    assert send.status == 401
    assert send.headers[b"content-type"] == b"application/json"
    assert send.headers[b"www-authenticate"] == b'Bearer error="invalid_token"'
    assert send.headers[b"cache-control"] == b"no-store"
    assert int(send.headers[b"content-length"]) == len(send.body)
    assert json.loads(send.body) == {"error": "invalid_token", "reason": "no_token", "route": "app", "login_url": LOGIN}


async def test_401_json_without_login_url_has_no_field() -> None:
    send = Recorder()
    await send_denial(send, "token_revoked", html=False)
    assert send.status == 401
    assert json.loads(send.body) == {"error": "invalid_token", "reason": "token_revoked"}


async def test_navigation_is_redirected_to_login() -> None:
    send = Recorder()
    await send_denial(send, "no_token", html=True, login_url=LOGIN)
    assert send.status == 302
    assert send.headers[b"location"] == LOGIN.encode()
    assert send.body == b""


async def test_403_has_no_login_url() -> None:
    send = Recorder()
    await send_denial(send, "csrf", html=False, login_url=LOGIN)
    assert send.status == 403
    assert json.loads(send.body) == {"error": "forbidden", "reason": "csrf"}
    html = Recorder()
    await send_denial(html, "csrf", html=True, login_url=LOGIN)
    assert html.status == 403 and b"location" not in html.headers
