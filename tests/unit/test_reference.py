"""gateway.reference: the committed docs/ references are what the code renders today, and staleness is caught."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import Counter

from gateway.config import GatewayConfig, ServerConfig
from gateway.metrics import Metrics
from gateway.reference import DENIALS, PAGES, main, render_configuration, render_metrics, render_reasons, stale

ROOT = Path(__file__).resolve().parents[2]  # tests/unit/ -> the checkout


def _committed(relative: str) -> str:
    return (ROOT / relative).read_text(encoding="utf-8")


@pytest.mark.parametrize("relative", sorted(PAGES))
def test_committed_page_is_current(relative: str) -> None:
    assert _committed(relative) == PAGES[relative](), f"{relative} is stale: run scripts/docs"


class _Server(ServerConfig):
    backlog: int = 2048
    """Connections the kernel queues before the gateway accepts them."""


class _Changed(GatewayConfig):
    server: _Server = _Server()


def test_a_new_config_key_makes_the_configuration_page_stale() -> None:
    rendered = render_configuration(_Changed)
    assert rendered != _committed("docs/configuration.md")
    assert "| `server.backlog` | integer | `2048` |  | Connections the kernel queues" in rendered


def test_every_config_key_has_a_row_and_a_description() -> None:
    page = _committed("docs/configuration.md")
    for key in ("server.port", "store.sentinel.hosts", "refresh.grace_period", "cookies.refresh.max_age"):
        assert f"| `{key}` |" in page, key
    assert "| `routes[].timeout.read` | number | `60` | > 0 |" in page
    assert "| `refresh.grace_period` | number | `30` | ≥ 0, ≤ 3600 |" in page
    rows = [line for line in page.splitlines() if line.startswith("| `")]
    assert rows and all(not line.rstrip().endswith("|  |") for line in rows), "a key without a description"


def test_a_new_metric_makes_the_metrics_page_stale() -> None:
    registry = Metrics().registry
    Counter("gateway_bogus", "A metric the page does not list", ["kind"], registry=registry)
    rendered = render_metrics(registry)
    assert rendered != _committed("docs/metrics.md")
    assert "| `gateway_bogus_total` | counter | `kind` | A metric the page does not list |" in rendered


def test_metrics_page_lists_labels_of_families_without_samples() -> None:
    page = _committed("docs/metrics.md")
    assert "| `gateway_refresh_total` | counter | `outcome` |" in page
    assert "| `gateway_requests_total` | counter | `route`, `method`, `status` |" in page
    assert "| `gateway_idp_duration_seconds` | histogram | none |" in page


def test_a_new_reason_makes_the_reasons_page_stale() -> None:
    rendered = render_reasons([*DENIALS, "made_up_reason"])
    assert rendered != _committed("docs/reasons.md")
    assert "| `made_up_reason` | 401 | `invalid_token` |" in rendered


def test_reasons_page_rows_come_from_the_answers() -> None:
    page = _committed("docs/reasons.md")
    assert "| `lock_timeout` | 503 | `service_unavailable` | `retry-after: 5`, `cache-control: no-store` |" in page
    assert "| any other reason | 401 | `invalid_token` |" in page and "302 to the login URL" in page


def test_check_names_the_stale_page_and_write_fixes_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--root", str(tmp_path)]) == 0  # writes every page
    assert stale(tmp_path) == []
    page = tmp_path / "docs" / "metrics.md"
    page.write_text(page.read_text(encoding="utf-8").replace("gateway_refresh_total", "gateway_renamed"))
    assert main(["--check", "--root", str(tmp_path)]) == 1
    assert "docs/metrics.md is stale" in capsys.readouterr().err
    assert page.read_text(encoding="utf-8").count("gateway_renamed") == 1  # --check writes nothing
    assert main(["--root", str(tmp_path)]) == 0
    assert main(["--check", "--root", str(tmp_path)]) == 0
