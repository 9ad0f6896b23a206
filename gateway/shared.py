"""``Shared``: what every config generation uses and a reload keeps (gateway.app builds it once per process)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

from gateway.accesslog import RequestIds
from gateway.denylist import Denylist
from gateway.families import Families
from gateway.forwarder import Forwarder
from gateway.metrics import Metrics
from gateway.sealing import Sealer
from gateway.store import Store
from gateway.throttle import ClientThrottle
from gateway.tunnel import Sockets


@dataclass(frozen=True)
class Shared:
    """What every config generation uses and a reload keeps: connections, shared state, counters."""

    store: Store
    http: httpx.AsyncClient  # control plane (JWKS, IdP, OIDC); never follows redirects
    forwarder: Forwarder
    denylist: Denylist
    metrics: Metrics
    sealer: Sealer
    clock: Callable[[], float]
    request_ids: RequestIds
    sockets: Sockets
    families: Families
    throttle: ClientThrottle = field(default_factory=ClientThrottle)  # used with raw refresh cookies only
