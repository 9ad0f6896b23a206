"""Prometheus metrics (prometheus-client), one registry per app.

Per-request metrics (requests, latency, upstream latency, denials) are counted in plain dicts
and handed to prometheus-client by a collector at scrape time: its ``Counter``/``Histogram``
take a lock and walk label dicts on every update, which measured ~7 % of a proxied request here.
Rare events (refresh outcomes, IdP latency, lock waits) use the library's types directly.

With ``--workers N`` each worker is its own process with its own numbers; so that any worker
can answer a scrape for all, every worker writes a snapshot of its samples to a directory the
supervisor creates (``$GATEWAY_METRICS_DIR``) every second and at scrape time, and the worker
answering adds them up. prometheus-client's own multiprocess mode would put a file-backed lock
on every increment of the hot path instead.
"""

from __future__ import annotations

import json
import os
from bisect import bisect_left
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _Histogram:
    """Bucket counts (non-cumulative until exported), sum and count for one label set."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(BUCKETS, value)] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*map(str, BUCKETS), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


class _RequestCollector(Collector):
    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}
        self.durations: dict[str, _Histogram] = {}
        self.upstream: dict[str, _Histogram] = {}
        self.denials: dict[str, int] = {}

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "gateway_requests", "Requests answered, by route, method and status", labels=["route", "method", "status"]
        )
        for (route, method, status), count in list(self.requests.items()):
            requests.add_metric([route, method, str(status)], count)
        yield requests
        for name, doc, series in (
            ("gateway_request_duration_seconds", "Time to answer, by route", self.durations),
            (
                "gateway_upstream_duration_seconds",
                "Time until the upstream's response headers, by route",
                self.upstream,
            ),
        ):
            family = HistogramMetricFamily(name, doc, labels=["route"])
            for route, histogram in list(series.items()):
                family.add_metric([route], histogram.buckets(), histogram.total)
            yield family
        denials = CounterMetricFamily(
            "gateway_denials", "Requests refused by the gateway, by reason", labels=["reason"]
        )
        for reason, count in list(self.denials.items()):
            denials.add_metric([reason], count)
        yield denials


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, shared_dir: str | None = None) -> None:
        # With several workers, each publishes snapshots into shared_dir ($GATEWAY_METRICS_DIR).
        self.shared_dir = shared_dir
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._fast = _RequestCollector()
        r.register(self._fast)
        self._refresh = Counter("gateway_refresh", "Refresh outcomes", ["outcome"], registry=r)
        self._refresh_by_outcome: dict[str, Any] = {}
        self._idp = Histogram("gateway_idp_duration_seconds", "IdP refresh call latency", buckets=BUCKETS, registry=r)
        self._generation = Gauge("gateway_config_generation", "Config generation serving (1 at start)", registry=r)
        self._reloads = Counter("gateway_config_reloads", "Config loads, by result", ["result"], registry=r)
        self._last_reload_ok = Gauge("gateway_config_last_reload_ok", "1 if the last config load worked", registry=r)
        self._jwks = Counter("gateway_jwks_fetches", "JWKS fetches, by result", ["result"], registry=r)
        self._introspection = Counter(
            "gateway_introspection_calls",
            "Opaque tokens asked about at the IdP (introspection or userinfo; cached answers not counted), by result",
            ["result"],
            registry=r,
        )
        self._store_errors = Counter(
            "gateway_store_errors", "Store (Redis) failures seen, by where they hit", ["where"], registry=r
        )
        self._lock_wait = Histogram(
            "gateway_refresh_wait_seconds", "Time a request waited for another's refresh", buckets=BUCKETS, registry=r
        )

        self._ws_open = Gauge("gateway_websocket_connections", "WebSockets open now", registry=r)
        messages = Counter(
            "gateway_websocket_messages", "WebSocket messages relayed, by direction", ["direction"], registry=r
        )
        self._ws_to_upstream = messages.labels("to_upstream")  # bound once: added to once a second per socket
        self._ws_to_client = messages.labels("to_client")
        self._ws_closed = Counter(
            "gateway_websocket_closed", "WebSockets closed, by who or what closed them", ["by"], registry=r
        )

    def websocket_opened(self) -> None:
        self._ws_open.inc()

    def websocket_messages(self, to_upstream: int, to_client: int) -> None:
        self._ws_to_upstream.inc(to_upstream)
        self._ws_to_client.inc(to_client)

    def websocket_closed(self, by: str) -> None:
        self._ws_open.dec()
        self._ws_closed.labels(by).inc()

    def jwks_fetch(self, ok: bool) -> None:
        self._jwks.labels("ok" if ok else "error").inc()

    def introspection(self, result: str) -> None:
        """An opaque token asked about: ``active``, ``inactive`` (or refused by the rules) or ``error``."""
        self._introspection.labels(result).inc()

    def store_error(self, where: str) -> None:
        self._store_errors.labels(where).inc()

    def config_loaded(self, generation: int, *, ok: bool) -> None:
        """A config (re)load: the generation now serving and whether the last attempt worked."""
        self._generation.set(generation)
        self._reloads.labels("ok" if ok else "refused").inc()
        self._last_reload_ok.set(1 if ok else 0)

    def request(self, route: str, method: str, status: int, seconds: float) -> None:
        fast = self._fast
        key = (route, method, status)
        fast.requests[key] = fast.requests.get(key, 0) + 1
        histogram = fast.durations.get(route)
        if histogram is None:
            histogram = fast.durations[route] = _Histogram()
        histogram.observe(seconds)

    def upstream(self, route: str, seconds: float) -> None:
        histogram = self._fast.upstream.get(route)
        if histogram is None:
            histogram = self._fast.upstream[route] = _Histogram()
        histogram.observe(seconds)

    def denial(self, reason: str) -> None:
        self._fast.denials[reason] = self._fast.denials.get(reason, 0) + 1

    def refresh(self, outcome: str) -> None:
        child = self._refresh_by_outcome.get(outcome)
        if child is None:  # labels() takes a lock and builds a key: once per outcome, not per refresh
            child = self._refresh_by_outcome[outcome] = self._refresh.labels(outcome)
        child.inc()

    def idp_latency(self, seconds: float) -> None:
        self._idp.observe(seconds)

    def lock_wait(self, seconds: float) -> None:
        self._lock_wait.observe(seconds)

    def render(self) -> bytes:
        """This process's metrics, or with ``--workers N`` every worker's, added up."""
        if self.shared_dir is None:
            return generate_latest(self.registry)
        self.publish()
        snapshots = []
        for path in Path(self.shared_dir).glob("*.json"):
            try:
                snapshots.append(json.loads(path.read_text()))
            except (OSError, ValueError):
                continue  # a worker writing right now: its previous numbers are a moment old anyway
        return generate_latest(_Merged(snapshots))

    def publish(self) -> None:
        """Write this worker's samples where the worker answering a scrape can add them up."""
        if self.shared_dir is None:
            return
        families = []
        for family in self.registry.collect():
            # *_created are per-process timestamps: they do not add up.
            samples = [[s.name, s.labels, s.value] for s in family.samples if not s.name.endswith("_created")]
            families.append([family.name, family.documentation, family.type, samples])
        target = Path(self.shared_dir) / f"{os.getpid()}.json"
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "families": families}))
        os.replace(tmp, target)


class _Merged(Collector):
    """Every worker's last snapshot summed: counters and histograms add up; gauges keep a ``pid`` label.

    Snapshots of workers that have exited stay, so counters never go backwards when one is replaced.
    """

    def __init__(self, snapshots: list[dict[str, Any]]) -> None:
        self._snapshots = snapshots

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        totals: dict[tuple[str, str, tuple[tuple[str, str], ...]], float] = {}
        for snapshot in self._snapshots:
            for name, documentation, kind, samples in snapshot["families"]:
                merged.setdefault(name, Metric(name, documentation, kind))
                for sample_name, labels, value in samples:
                    if kind == "gauge":
                        labels = {**labels, "pid": str(snapshot["pid"])}
                    key = (name, sample_name, tuple(sorted(labels.items())))
                    totals[key] = totals.get(key, 0.0) + value
        for (name, sample_name, labels), value in totals.items():
            merged[name].add_sample(sample_name, dict(labels), value)
        yield from merged.values()
