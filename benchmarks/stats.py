"""Summaries of one load run: percentiles, throughput, resources."""

from __future__ import annotations

import math
from typing import Any

PERCENTILES = (50, 90, 99)


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an already sorted list (None when empty)."""
    if not sorted_values:
        return None
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def distribution(values: list[float]) -> dict[str, float | int | None]:
    ordered = sorted(values)
    out: dict[str, float | int | None] = {"n": len(ordered)}
    for q in PERCENTILES:
        out[f"p{q}"] = _round(percentile(ordered, q))
    out["max"] = _round(ordered[-1]) if ordered else None
    out["mean"] = _round(sum(ordered) / len(ordered)) if ordered else None
    return out


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def summarize(raw: dict[str, Any], peak_rss: int, cpu_s: float | None) -> dict[str, Any]:
    ok: int = raw["ok"]
    window: float = raw["window_s"]
    summary: dict[str, Any] = {
        "ok": ok,
        "errors": sum(raw["errors"].values()),
        "error_kinds": raw["errors"],
        "throughput_rps": round(raw["ok_in_window"] / window, 1) if window else None,
        "latency_ms": distribution(raw["latency_ms"]),
        "peak_in_flight": raw["peak_in_flight"],
    }
    if raw["ttft_ms"]:
        summary["ttft_ms"] = distribution(raw["ttft_ms"])
        summary["gap_ms"] = distribution(raw["gap_ms"])
        summary["peak_open_streams"] = raw["peak_open_streams"]
    for key in ("machine_cpu_pct", "loadavg_1m"):
        if key in raw:
            summary[key] = raw[key]
    if peak_rss:
        summary["peak_rss_mb"] = round(peak_rss / 2**20, 1)
    served = raw.get("ok_all") or ok  # the CPU time covers the warm-up's requests too
    if cpu_s is not None and served:
        summary["cpu_ms_per_request"] = round(cpu_s * 1000 / served, 3)
    return summary


def merge(raws: list[dict[str, Any]]) -> dict[str, Any]:
    """Several rounds of the same load as one."""
    merged: dict[str, Any] = {
        "latency_ms": [],
        "ttft_ms": [],
        "gap_ms": [],
        "ok": 0,
        "ok_in_window": 0,
        "ok_all": 0,
        "errors": {},
        "window_s": 0.0,
        "peak_open_streams": 0,
        "peak_in_flight": 0,
    }
    for raw in raws:
        for key in ("latency_ms", "ttft_ms", "gap_ms"):
            merged[key].extend(raw[key])
        merged["ok"] += raw["ok"]
        merged["ok_in_window"] += raw["ok_in_window"]
        merged["ok_all"] += raw.get("ok_all", raw["ok"])
        merged["window_s"] += raw["window_s"]
        for kind, count in raw["errors"].items():
            merged["errors"][kind] = merged["errors"].get(kind, 0) + count
        for key in ("peak_open_streams", "peak_in_flight"):
            merged[key] = max(merged[key], raw[key])
    return merged
