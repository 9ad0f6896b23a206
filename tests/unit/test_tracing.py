"""gateway/tracing.py: spans for a request and its stages when server.tracing is on; none when off."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import jwt
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from support.fakes import RecordingUpstream

from gateway.app import create_app
from gateway.config import parse_config

SECRET = "tracing-tests-secret-0123456789abcdef"
EXPORTER = InMemorySpanExporter()


@pytest.fixture(scope="module", autouse=True)
def provider() -> Iterator[None]:
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
    trace.set_tracer_provider(tracer_provider)  # once per process: OpenTelemetry refuses a second one
    yield


async def get(tracing: bool) -> httpx.Response:
    config = parse_config(
        {
            "server": {"tracing": tracing, "access_log": False},
            "tokens": {"algorithms": ["HS256"], "secret": SECRET},
            "routes": [{"name": "app", "path": "/", "upstream": "http://127.0.0.1:9"}],
        }
    )
    app = create_app(config, forwarder=RecordingUpstream())
    token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, SECRET, algorithm="HS256")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        return await client.get("/x", headers={"Authorization": f"Bearer {token}"})


async def test_spans_for_request_authenticate_and_upstream_without_secrets() -> None:
    EXPORTER.clear()
    response = await get(tracing=True)
    assert response.status_code == 200
    spans = {span.name: span for span in EXPORTER.get_finished_spans()}
    assert {"gateway.request", "gateway.authenticate", "gateway.upstream"} <= set(spans)
    request = spans["gateway.request"]
    assert request.attributes is not None
    assert request.attributes["gateway.route"] == "app" and request.attributes["http.response.status_code"] == 200
    assert spans["gateway.upstream"].parent is not None
    assert spans["gateway.upstream"].parent.span_id == request.context.span_id
    everything = str([dict(span.attributes or {}) for span in spans.values()])
    assert "alice" not in everything and "Bearer" not in everything


async def test_no_spans_when_tracing_is_off() -> None:
    EXPORTER.clear()
    assert (await get(tracing=False)).status_code == 200
    assert EXPORTER.get_finished_spans() == ()
