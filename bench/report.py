"""The markdown table of proxy_bench: direct and proxy side by side, with the targets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Check = Callable[[float, float], bool]  # (proxy, direct) -> met

TARGETS: dict[str, tuple[str, Check]] = {
    "added": ("added ≤ 1 ms", lambda proxy, direct: proxy - direct <= 1.0),
    "rps": ("≥ 2,000 req/s", lambda proxy, direct: proxy >= 2000),
    "chunks": ("≥ 25,000/s", lambda proxy, direct: proxy >= 25_000),
    "zero": ("0", lambda proxy, direct: proxy == 0),
    "rss": ("< 250 MB", lambda proxy, direct: proxy < 250),
}

# (label, measurement, field, show proxy - direct, target)
ROWS: list[tuple[str, str, str, bool, str | None]] = [
    ("(a) c=1 req/s", "c1", "rps", False, None),
    ("(a) c=1 p50 latency, ms", "c1", "p50_ms", True, "added"),
    ("(a) c=1 p99 latency, ms", "c1", "p99_ms", True, None),
    ("(a) c=1 errors", "c1", "errors", False, "zero"),
    ("(a) c=32 req/s", "c32", "rps", False, "rps"),
    ("(a) c=32 p50 latency, ms", "c32", "p50_ms", True, None),
    ("(a) c=32 p99 latency, ms", "c32", "p99_ms", True, None),
    ("(a) c=32 errors", "c32", "errors", False, "zero"),
    ("(b) streamed TTFB median, ms", "ttfb", "median_ms", True, "added"),
    ("(b) streamed TTFB p99, ms", "ttfb", "p99_ms", True, None),
    ("(c) relayed chunks/s, best", "chunks", "best", False, "chunks"),
    ("(c) relayed chunks/s, median", "chunks", "median", False, None),
    ("(d) {n} streams: completed", "clients", "ok", False, None),
    ("(d) {n} streams: errors", "clients", "errors", False, "zero"),
    ("(d) {n} streams: wall time, s", "clients", "seconds", False, None),
    ("(d) {n} streams: server peak RSS, MB", "clients", "rss_peak_mb", False, "rss"),
]


def number(value: float | None) -> str:
    """A number printed short: thousands separated, else four significant digits."""
    if value is None:
        return "—"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def cell(results: dict[str, Any], side: str, measurement: str, field: str) -> float | None:
    """One figure of the results, or None if that measurement did not run."""
    return results.get(side, {}).get(measurement, {}).get(field)


def row(results: dict[str, Any], spec: tuple[str, str, str, bool, str | None]) -> list[str]:
    """One table row: label, direct, proxy, difference, target, whether it is met."""
    label, measurement, field, show_delta, target = spec
    direct = cell(results, "direct", measurement, field)
    proxy = cell(results, "proxy", measurement, field)
    clients = cell(results, "proxy", "clients", "requests") or 0
    delta = "—"
    if show_delta and direct is not None and proxy is not None:
        delta = f"{proxy - direct:+.4g}"
    text, met = "", ""
    if target is not None:
        text, check = TARGETS[target]
        if proxy is not None:
            judged = proxy
            if target == "zero":  # requests the deadline cut off are not a clean run either
                judged += cell(results, "proxy", measurement, "unfinished") or 0
            met = "yes" if check(judged, direct or 0.0) else "**no**"
    values = [number(direct), number(proxy)]
    if field == "errors":
        values = [number(direct) + unfinished(results, "direct", measurement)]
        values.append(number(proxy) + unfinished(results, "proxy", measurement))
    return [label.format(n=f"{clients:,}"), *values, delta, text, met]


def unfinished(results: dict[str, Any], side: str, measurement: str) -> str:
    """A note of the requests the deadline cut off, if any."""
    count = cell(results, side, measurement, "unfinished")
    return f" (+{count:,} unfinished)" if count else ""


def cpu_row(results: dict[str, Any]) -> list[str]:
    """CPU use of each process during the c=32 run, as % of one core."""

    def shares(side: str) -> str:
        cpu = cell(results, side, "c32", "cpu_percent") or {}
        return " / ".join(f"{name} {value:.0f}" for name, value in cpu.items()) or "—"

    return ["(a) c=32 CPU % of a core", shares("direct"), shares("proxy"), "—", "", ""]


def table(results: dict[str, Any]) -> str:
    """The whole markdown table, rows of measurements that did not run left out."""
    header = ["measurement", "direct", "proxy", "proxy − direct", "target (proxy)", "met"]
    lines = [header, ["---"] * len(header)]
    for spec in ROWS:
        if any(spec[1] in results.get(side, {}) for side in ("direct", "proxy")):
            lines.append(row(results, spec))
        if spec[1] == "c32" and spec[2] == "errors" and "c32" in results.get("proxy", {}):
            lines.append(cpu_row(results))
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)
