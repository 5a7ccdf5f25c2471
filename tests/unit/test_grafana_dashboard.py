"""examples/grafana-dashboard.json: every panel queries metrics the proxy exports, with labels
they carry, and covers what the README promises (traffic, latency, TTFT, cost per model,
refusals, circuits)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from robota_proxy.observability.metrics import ProxyMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "examples" / "grafana-dashboard.json"
_METRIC = re.compile(r"\b(robota_[a-z_]+?)(_bucket|_total|_sum|_count)?\b")
_LABELS = re.compile(r"\b(?:by|without) \(([^)]*)\)|\{([^}]*)\}")


def exported() -> dict[str, set[str]]:
    """Metric family name -> the label names its samples can carry (from the metric's own
    definition: an empty registry lists no samples, so the labels are read from the
    collectors)."""
    metrics = ProxyMetrics()
    names: dict[str, set[str]] = {}
    for collector in list(metrics.registry._collector_to_names):
        labels = set(getattr(collector, "_labelnames", ()))
        for family in collector.describe():
            names[family.name] = labels | ({"le"} if family.type == "histogram" else set())
    return names


def test_every_query_names_an_exported_metric_and_its_labels() -> None:
    families = exported()
    panels = json.loads(DASHBOARD.read_text())["panels"]
    seen: set[str] = set()
    for panel in panels:
        for target in panel["targets"]:
            expr = target["expr"]
            used = {match.group(1) for match in _METRIC.finditer(expr)}
            assert used, (panel["title"], expr)
            for name in used:
                assert name in families, f"{panel['title']}: {name} is not exported"
                seen.add(name)
            labels = set()
            for by, matchers in _LABELS.findall(expr):
                labels |= {part.strip() for part in by.split(",") if part.strip()}
                labels |= {m.split("=")[0].rstrip("!~").strip() for m in matchers.split(",") if m}
            allowed = set().union(*(families[name] for name in used))
            assert labels <= allowed, (panel["title"], labels - allowed)
    assert {
        "robota_requests",
        "robota_request_duration_seconds",
        "robota_time_to_first_token_seconds",
        "robota_cost_usd",
        "robota_refusals",
        "robota_upstream_attempts",
    } <= seen


def test_panels_have_unique_ids_and_do_not_overlap() -> None:
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        mine = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not cells & mine, panel["title"]
        assert grid["x"] + grid["w"] <= 24
        cells |= mine


def test_the_exposition_parser_reads_the_names_the_dashboard_uses() -> None:
    """The ``_total``/``_bucket`` suffixes the queries use are the ones prometheus-client
    writes in the text format."""
    metrics = ProxyMetrics()
    from prometheus_client import generate_latest

    text = generate_latest(metrics.registry).decode()
    samples = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    assert "robota_streams_open" in samples
    assert all(name.startswith("robota_") for name in samples)
