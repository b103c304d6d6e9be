"""Numbers, sizes and times as people read them: the admin pages' Jinja filters."""

from __future__ import annotations

import time
from datetime import datetime

from flask import Flask

DASH = "—"


def duration(seconds: float | None) -> str:
    """4.2 s, 3 min 05 s, 2 h 03 min, 3 d 4 h."""
    if seconds is None:
        return DASH
    if seconds < 60:
        return f"{seconds:.1f} s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    if whole < 86400:
        return f"{whole // 3600} h {whole % 3600 // 60:02d} min"
    return f"{whole // 86400} d {whole % 86400 // 3600} h"


def millis(value: float | None) -> str:
    """230 ms, or 1.8 s past a second."""
    if value is None:
        return DASH
    return f"{value:.0f} ms" if value < 1000 else f"{value / 1000:.1f} s"


def size(count: int | None) -> str:
    """Bytes in decimal units, as Ollama shows them: 4.7 GB."""
    if not count:
        return "0 B"
    value = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def number(value: int | float | None) -> str:
    """Thousands separated: 2,400,000."""
    return DASH if value is None else f"{value:,}"


def epoch(moment: str | None) -> float | None:
    """Seconds since the epoch of an ISO 8601 "Z" time."""
    return None if not moment else datetime.fromisoformat(moment).timestamp()


def ago(moment: str | None) -> str:
    """How long ago an ISO 8601 time was: 12 s ago."""
    then = epoch(moment)
    if then is None:
        return DASH
    return f"{duration(max(0.0, time.time() - then))} ago"


def until(moment: str | None) -> str:
    """An ISO 8601 time and how far off it is: 2026-11-26 03:00 UTC (in 4 h 12 min)."""
    then = epoch(moment)
    if then is None:
        return DASH
    left = then - time.time()
    relative = f"in {duration(left)}" if left >= 0 else f"{duration(-left)} ago"
    return f"{moment[:10]} {moment[11:16]} UTC ({relative})"


FILTERS = {f.__name__: f for f in (duration, millis, size, number, ago, until)}


def register(app: Flask) -> None:
    """Make the filters available to every template."""
    app.jinja_env.filters.update(FILTERS)
