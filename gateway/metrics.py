"""Prometheus metrics (prometheus-client), one registry per app.

Label children are looked up once and memoised: ``labels()`` costs a lock and a dict walk,
and this runs on every request.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._requests = Counter(
            "gateway_requests_total",
            "Requests answered, by route, method and status",
            ["route", "method", "status"],
            registry=r,
        )
        self._duration = Histogram(
            "gateway_request_duration_seconds",
            "Time to answer, by route",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._upstream = Histogram(
            "gateway_upstream_duration_seconds",
            "Time until the upstream's response headers, by route",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._denials = Counter(
            "gateway_denials_total", "Requests refused by the gateway, by reason", ["reason"], registry=r
        )
        self._refresh = Counter("gateway_refresh_total", "Refresh outcomes", ["outcome"], registry=r)
        self._idp = Histogram(
            "gateway_idp_duration_seconds", "IdP refresh call latency", buckets=_LATENCY_BUCKETS, registry=r
        )
        self._lock_wait = Histogram(
            "gateway_refresh_wait_seconds",
            "Time a request waited for another's refresh",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._children: dict[tuple[Any, ...], Any] = {}

    def _child(self, metric: Any, *labels: str) -> Any:
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        self._child(self._requests, route, method, str(status)).inc()
        self._child(self._duration, route).observe(seconds)

    def upstream(self, route: str, seconds: float) -> None:
        self._child(self._upstream, route).observe(seconds)

    def denial(self, reason: str) -> None:
        self._child(self._denials, reason).inc()

    def refresh(self, outcome: str) -> None:
        self._child(self._refresh, outcome).inc()

    def idp_latency(self, seconds: float) -> None:
        self._idp.observe(seconds)

    def lock_wait(self, seconds: float) -> None:
        self._lock_wait.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
