"""HTML for an experiment report: the Jinja2 environment and the self-contained file.

The templates under ``optimizer/templates/report/`` are the single place that
lays out the experiment view; ``flywheel report --html`` renders them into one
file with plotly.js inlined, and the operator dashboard imports the same macros
and adds its controls. Autoescaping is on: arm ids, messages and evidence are
user-influenced text.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

import jinja2

from optimizer.plots import FIGURE_TITLES, figure_divs

__all__ = [
    "ago",
    "environment",
    "evidence",
    "interval",
    "num",
    "pct",
    "render_standalone",
    "usd",
    "when",
]


def _missing(value: Any) -> bool:
    return value is None or isinstance(value, jinja2.Undefined)


def pct(value: Any, digits: int = 1) -> str:
    """``12.3%``, or ``—`` for a missing value."""
    return "—" if _missing(value) else f"{float(value):.{digits}%}"


def num(value: Any, digits: int = 3) -> str:
    """Fixed decimals, or ``—`` for a missing value."""
    return "—" if _missing(value) else f"{float(value):.{digits}f}"


def usd(value: Any) -> str:
    """``$0.00123`` (significant digits for sub-cent costs), or ``—`` for a missing value."""
    if _missing(value):
        return "—"
    v = float(value)
    return "$0" if v == 0 else f"${v:.2f}" if abs(v) >= 1 else f"${v:.3g}"


def _int_or_dash(value: Any) -> str:
    return "—" if _missing(value) else str(int(value))


def interval(pair: Any, fmt: Any = num) -> str:
    """``[lo, hi]`` formatted with ``fmt``; empty when there is no interval."""
    if not pair or len(pair) != 2 or pair[0] is None or pair[1] is None:
        return ""
    return f"[{fmt(pair[0])}, {fmt(pair[1])}]"


def when(value: Any) -> str:
    """An ISO timestamp as ``YYYY-MM-DD HH:MM UTC``."""
    if not value:
        return "—"
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.strftime("%Y-%m-%d %H:%M UTC")


def ago(seconds: Any) -> str:
    """Seconds as ``5 min ago``."""
    if seconds is None:
        return "—"
    s = max(0.0, float(seconds))
    if s < 90:
        return f"{s:.0f} s ago"
    if s < 5400:
        return f"{s / 60:.0f} min ago"
    if s < 172800:
        return f"{s / 3600:.1f} h ago"
    return f"{s / 86400:.1f} days ago"


def evidence(value: Any) -> str:
    """``key=value`` pairs of a flat dict; nested values as compact JSON."""
    if not isinstance(value, Mapping):
        return "" if value is None else str(value)
    parts = []
    for key, item in value.items():
        if isinstance(item, float):
            text = f"{item:.4g}"
        elif isinstance(item, Mapping | list):
            text = json.dumps(item, separators=(",", ":"), default=str)
        else:
            text = str(item)
        parts.append(f"{key}={text}")
    return ", ".join(parts)


def environment(loaders: Iterable[jinja2.BaseLoader] = ()) -> jinja2.Environment:
    """Autoescaping environment with the report templates and filters; ``loaders`` come first."""
    env = jinja2.Environment(
        loader=jinja2.ChoiceLoader([*loaders, jinja2.PackageLoader("optimizer", "templates")]),
        autoescape=True,
        undefined=jinja2.ChainableUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        pct=pct,
        num=num,
        int_or_dash=_int_or_dash,
        usd=usd,
        ci_pct=lambda pair: interval(pair, pct),
        ci_num=lambda pair: interval(pair, lambda v: num(v, 4)),
        when=when,
        ago=ago,
        evidence=evidence,
    )
    return env


def render_standalone(report: Mapping[str, Any]) -> str:
    """One HTML file with the numbers, tables and plots, plotly.js inlined (works offline)."""
    template = environment().get_template("report/standalone.html")
    return template.render(
        r=report, divs=figure_divs(report, include_plotlyjs=True), titles=FIGURE_TITLES
    )
