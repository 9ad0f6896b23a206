"""Fixtures several unit modules share: the demo IdP in-process, the lean forwarder."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from starlette.applications import Starlette

from gateway import app as app_module
from gateway.demo.idp import IdentityProvider, IdPSettings, create_idp_app
from gateway.upstream_h1 import LeanForwarder


@pytest.fixture
def idp_app(monkeypatch: pytest.MonkeyPatch) -> Iterator[Starlette]:
    """The demo IdP in-process: the gateway's control-plane client reaches it over ASGITransport."""
    idp = create_idp_app(IdPSettings())
    monkeypatch.setattr(
        app_module, "control_client", lambda timeout, tls=None: httpx.AsyncClient(transport=httpx.ASGITransport(idp))
    )
    yield idp


@pytest.fixture
def idp(idp_app: Starlette) -> IdentityProvider:
    provider: IdentityProvider = idp_app.state.idp
    return provider


@pytest.fixture
async def lean() -> AsyncIterator[LeanForwarder]:
    forwarder = LeanForwarder()
    yield forwarder
    await forwarder.close()
