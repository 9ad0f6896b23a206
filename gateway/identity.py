"""Identity: claims turned into the headers an upstream trusts, and route rules on claims.

Claim paths are dotted (``realm_access.roles``). Lists join with ``,``; booleans are ``true`` /
``false``; numbers are their decimal text; objects are compact JSON. A value that would split a
header (CR, LF, NUL) is refused outright rather than cleaned: the request is denied (403).
"""

from __future__ import annotations

import json
from typing import Any

from gateway.errors import UnsafeClaim

_MISSING = object()


def claim_at(claims: dict[str, Any], path: str) -> Any:
    """The value at a dotted claim path, or ``_MISSING``. An exact key with dots wins."""
    if path in claims:
        return claims[path]
    node: Any = claims
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list | tuple):
        items = [_text(v) for v in value]
        # The upstream splits on ",": ["viewer,admin"] would read as two roles (issue 14, point 5).
        if any("," in item for item in items):
            raise UnsafeClaim("a list item holds the separator ','")  # build names the claim
        return ",".join(items)
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


class IdentityHeaders:
    """Builds the identity headers for one set of claims."""

    def __init__(self, mapping: dict[str, str]) -> None:
        self._mapping = [(name.lower().encode("latin-1"), path) for name, path in mapping.items()]

    @property
    def names(self) -> list[bytes]:
        return [name for name, _ in self._mapping]

    def build(self, claims: dict[str, Any]) -> list[tuple[bytes, bytes]]:
        out = []
        for name, path in self._mapping:
            value = claim_at(claims, path)
            if value is _MISSING or value is None:
                continue
            try:
                text = _text(value)
            except UnsafeClaim as exc:
                raise UnsafeClaim(f"{path}: {exc}") from None
            if "\r" in text or "\n" in text or "\0" in text:
                raise UnsafeClaim(f"{path}: CR, LF or NUL")
            out.append((name, text.encode("utf-8")))
        return out


def _accepts(value: Any, wanted: Any) -> bool:
    accepted = wanted if isinstance(wanted, list) else [wanted]
    if isinstance(value, list):
        return any(_equal(v, a) for v in value for a in accepted)
    return any(_equal(value, a) for a in accepted)


def _equal(value: Any, wanted: Any) -> bool:
    if isinstance(value, bool) or isinstance(wanted, bool):
        # True == 1 in Python; a rule "is_staff: true" must not pass on is_staff: 1.
        return type(value) is type(wanted) and value == wanted
    return bool(value == wanted)


def claims_allowed(claims: dict[str, Any], rules: dict[str, Any]) -> bool:
    """Every rule passes: the claim equals the value, is one of a list, or (a list claim) contains one."""
    for path, wanted in rules.items():
        value = claim_at(claims, path)
        if value is _MISSING or not _accepts(value, wanted):
            return False
    return True


def index_claims(access: dict[str, Any], id_token: dict[str, Any]) -> dict[str, Any]:
    """The access token's claims with the ID token's ``sub`` and ``sid``, which a session is indexed under: logout
    tokens name those (OIDC Back-Channel Logout §2.4), and with pairwise subjects or opaque access tokens the access
    token's differ."""
    named = {key: id_token[key] for key in ("sub", "sid") if isinstance(id_token.get(key), str)}
    return access | named
