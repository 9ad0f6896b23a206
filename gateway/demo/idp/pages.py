"""The pages the demo IdP's OIDC login shows a browser: the login form and the sign-in error."""

from __future__ import annotations

import html

from starlette.responses import HTMLResponse, Response

from gateway.demo.idp.common import NO_STORE


def error_page(message: str, status: int) -> Response:
    """An error shown to the user instead of redirecting (the client or its redirect URI is not trusted)."""
    body = f"<!doctype html><title>Sign-in error</title><h1>Sign-in error</h1><p id=error>{html.escape(message)}</p>"
    return HTMLResponse(body, status_code=status, headers=NO_STORE)


def login_page(
    client_id: str, fields: list[tuple[str, str]], username: str = "", message: str = "", status: int = 200
) -> Response:
    """The login form for ``client_id``; ``fields`` (the authorization request) ride along hidden."""
    hidden = "\n".join(f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">' for k, v in fields)
    alert = f'<p id="error" role="alert">{html.escape(message)}</p>' if message else ""
    body = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Sign in - demo IdP</title></head>
<body>
<h1>Sign in to {html.escape(client_id)}</h1>
{alert}
<form method="post" action="authorize">
{hidden}
<p><label>Username <input id="username" name="username" autocomplete="username" value="{html.escape(username)}"
required autofocus></label></p>
<p><label>Password <input id="password" name="password" type="password" autocomplete="current-password"
required></label></p>
<p><button id="login" type="submit">Sign in</button></p>
</form>
</body></html>
"""
    return HTMLResponse(body, status_code=status, headers=NO_STORE)
