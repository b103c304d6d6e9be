"""The markdown tables of proxy_bench: issue 11's table side by side, then the scale curve."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

SIDES = ("direct", "nginx", "proxy")
Check = Callable[[float, float], bool]  # (proxy, direct) -> met

# (label, measurement, field, show the difference to direct, target text, check)
ROWS: list[tuple[str, str, str, bool, str, Check | None]] = [
    ("req/s, c=32", "c32", "rps", False, "≥ 2,500", lambda p, d: p >= 2500),
    ("CPU per request, ms (c=32)", "c32", "cpu_ms", False, "≤ 0.35", lambda p, d: p <= 0.35),
    ("p50, c=1, ms", "c1", "p50_ms", True, "added ≤ 0.5", lambda p, d: p - d <= 0.5),
    ("first byte, 20 tokens × 10 ms, ms", "ttfb", "median_ms", True, "added ≤ 1.0",
     lambda p, d: p - d <= 1.0),
    ("relayed lines/s, one 500-token stream", "relay", "best", False, "≥ 90,000, ≥ 0.6× direct",
     lambda p, d: p >= 90_000 and p >= 0.6 * d),
    ("errors", "c32", "errors", False, "0", None),
]  # fmt: skip


def number(value: float | None) -> str:
    """A number printed short: thousands separated, else four significant digits."""
    if value is None:
        return "—"
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"


def cell(results: dict[str, Any], side: str, measurement: str, field: str) -> float | None:
    """One figure of the results, or None if that side or measurement did not run."""
    return results.get(side, {}).get(measurement, {}).get(field)


def errors(results: dict[str, Any], side: str) -> int:
    """Failed and unfinished requests of every measurement of one side."""
    found = results.get(side, {}).values()
    return sum((m.get("errors") or 0) + (m.get("unfinished") or 0) for m in found)


def row(results: dict[str, Any], spec: tuple) -> list[str]:
    """One table row: label, direct, nginx, proxy, target, whether the proxy meets it."""
    label, measurement, field, show_delta, target, check = spec
    if field == "errors":
        cells = [str(errors(results, side)) if side in results else "—" for side in SIDES]
        return [label, *cells, target, "yes" if cells[2] == "0" else "**no**"]
    direct = cell(results, "direct", measurement, field)
    cells = []
    for side in SIDES:
        value = cell(results, side, measurement, field)
        text = number(value)
        if show_delta and side != "direct" and value is not None and direct is not None:
            text += f" ({value - direct:+.3g})"
        cells.append(text)
    proxy = cell(results, "proxy", measurement, field)
    met = ""
    if check is not None and proxy is not None:
        met = "yes" if check(proxy, direct or 0.0) else "**no**"
    return [label, *cells, target, met]


def held_rows(results: dict[str, Any]) -> list[list[str]]:
    """One row per count of held streams: served, wall against ideal, peak RSS."""
    rows = []
    for held in results.get("held", []):
        served = f"{held['ok']:,}/{held['clients']:,} served"
        ratio, rss = held.get("wall_vs_ideal"), held.get("rss_peak_mb")
        text = f"{served}, wall {number(ratio)}× ideal, {number(rss)} MB"
        ok = held["ok"] == held["clients"] and ratio is not None and ratio <= 1.05
        met = "yes" if ok and rss is not None and rss < 250 else "**no**"
        rows.append([f"{held['clients']:,} streams held (4 slots)", "", "", text,
                     "all, ≤ 1.05×, < 250 MB", met])  # fmt: skip
    return rows


def markdown(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table."""
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def scale_tables(results: dict[str, Any]) -> list[str]:
    """Grant cost by users and backends; CPU per request by concurrency; RSS by held clients."""
    grant = results.get("grant", [])
    backends = sorted({p["backends"] for p in grant})
    out = []
    for blocked in (False, True):
        rows = [
            [f"{users:,}"]
            + [number(p["us"]) for b in backends for p in grant
               if (p["users"], p["backends"], p["blocked"]) == (users, b, blocked)]
            for users in sorted({p["users"] for p in grant})
        ]  # fmt: skip
        what = "first user's model has no free slot" if blocked else "any backend fits"
        header = [f"grant µs ({what}): users"] + [f"{b} backends" for b in backends]
        out.append(markdown(header, rows))
    cpu = results.get("cpu", {})
    levels = sorted({p["concurrency"] for points in cpu.values() for p in points})
    rows = [[side] + [number(p["cpu_ms"]) for p in points] for side, points in cpu.items()]
    out.append(markdown(["CPU ms per request: server"] + [f"c={c}" for c in levels], rows))
    held = results.get("held", [])
    rows = [["proxy"] + [number(h.get("rss_peak_mb")) for h in held]]
    out.append(markdown(["peak RSS, MB: held clients"] + [f"{h['clients']:,}" for h in held], rows))
    return out


def tables(results: dict[str, Any]) -> str:
    """Issue 11's table, then the scale curve's tables."""
    header = ["", "direct", "nginx", "ollamamq", "target", "met"]
    main = markdown(header, [row(results, spec) for spec in ROWS] + held_rows(results))
    return "\n\n".join([main, *scale_tables(results)])
