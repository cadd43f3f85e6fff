"""Plotly figures from an experiment report (:func:`optimizer.report.experiment_report`).

Four figures answer the operator's questions: what traffic each arm gets over
time, how sure we are about each arm's KPI, how the KPI developed, and whether a
guardrail metric drifted. Figures are built from the report dict only, so the
page, ``flywheel report --html`` and tests draw the same thing. Plotly's
JavaScript comes from the installed package (:func:`plotly_js`), never a CDN.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

__all__ = [
    "FIGURE_TITLES",
    "allocation_figure",
    "cumulative_kpi_figure",
    "figure_divs",
    "figures",
    "guardrail_figure",
    "plotly_js",
    "posterior_figure",
]

FIGURE_TITLES = {
    "allocation": "Allocation share over time",
    "posterior": "KPI per arm: posterior mean and 95% interval",
    "cumulative_kpi": "Cumulative KPI per arm (running mean of complete sessions)",
    "guardrails": "Guardrail metrics at each optimizer run",
}
GUARDRAIL_TITLES = {
    "thumbs_down_rate": "thumbs-down rate",
    "error_rate": "error rate",
    "latency_p95_ms": "latency p95 (ms)",
}
_PALETTE = qualitative.Plotly + qualitative.D3
_HEIGHT = 340


def _colors(report: Mapping[str, Any]) -> dict[str, str]:
    """One stable colour per arm, in the report's arm order, shared by every figure."""
    return {arm["id"]: _PALETTE[i % len(_PALETTE)] for i, arm in enumerate(report["arms"])}


def _layout(fig: go.Figure, title: str, *, y_title: str = "", percent: bool = False) -> go.Figure:
    fig.update_layout(
        title={"text": title, "font": {"size": 15}},
        template="plotly_white",
        height=_HEIGHT,
        margin={"l": 60, "r": 20, "t": 50, "b": 40},
        legend={"orientation": "h", "y": -0.18},
        hovermode="x unified",
    )
    fig.update_yaxes(title_text=y_title, tickformat=".0%" if percent else None)
    return fig


def _empty(fig: go.Figure, message: str) -> go.Figure:
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return fig


def allocation_figure(report: Mapping[str, Any]) -> go.Figure:
    """Share of new sessions per arm in each period (solid) and the policy's allocation (dashed).

    >>> from optimizer.plots import allocation_figure
    >>> series = {"times": ["2025-01-01T00:00:00+00:00"], "traffic_share": {"a": [1.0]},
    ...           "policy_allocation": {"times": [], "arms": {}}}
    >>> fig = allocation_figure({"arms": [{"id": "a"}], "series": series})
    >>> [t.name for t in fig.data]
    ['a']
    """
    series = report["series"]
    colors = _colors(report)
    fig = _layout(
        go.Figure(), FIGURE_TITLES["allocation"], y_title="share of sessions", percent=True
    )
    for arm, values in series.get("traffic_share", {}).items():
        fig.add_trace(
            go.Scatter(
                x=series["times"],
                y=values,
                name=arm,
                mode="lines+markers",
                line={"color": colors.get(arm)},
                legendgroup=arm,
                connectgaps=False,
            )
        )
    policy = series.get("policy_allocation", {})
    for arm, values in policy.get("arms", {}).items():
        fig.add_trace(
            go.Scatter(
                x=policy["times"],
                y=values,
                name=f"{arm} (policy)",
                mode="lines",
                line={"color": colors.get(arm), "dash": "dash", "shape": "hv"},
                legendgroup=arm,
                showlegend=False,
            )
        )
    if not fig.data:
        return _empty(fig, "no sessions yet")
    fig.update_yaxes(range=[0, 1.02])
    return fig


def posterior_figure(report: Mapping[str, Any]) -> go.Figure:
    """Posterior KPI mean and 95% credible interval per arm, from the newest snapshot.

    Arms without a posterior yet (before the first optimizer run) are left out.
    """
    colors = _colors(report)
    arms = [a for a in report["arms"] if a.get("kpi_mean") is not None and a.get("kpi_ci")]
    fig = _layout(go.Figure(), FIGURE_TITLES["posterior"])
    fig.update_layout(hovermode="closest")
    for arm in arms:
        lo, hi = arm["kpi_ci"]
        mean = arm["kpi_mean"]
        fig.add_trace(
            go.Scatter(
                x=[mean],
                y=[arm["id"]],
                mode="markers",
                name=arm["id"],
                marker={"color": colors.get(arm["id"]), "size": 11},
                error_x={
                    "type": "data",
                    "symmetric": False,
                    "array": [hi - mean],
                    "arrayminus": [mean - lo],
                    "thickness": 2.5,
                    "width": 8,
                },
                hovertemplate=(
                    f"{arm['id']}<br>KPI %{{x:.4f}} [{lo:.4f}, {hi:.4f}]"
                    f"<br>P(best) {_pct(arm.get('prob_best'))}<extra></extra>"
                ),
                showlegend=False,
            )
        )
    if not fig.data:
        return _empty(fig, "no posterior yet: run the optimizer")
    fig.update_xaxes(title_text="KPI per session")
    fig.update_yaxes(autorange="reversed")
    return fig


def cumulative_kpi_figure(report: Mapping[str, Any]) -> go.Figure:
    """Running mean of the KPI over complete sessions, by assignment period."""
    series = report["series"]
    colors = _colors(report)
    fig = _layout(go.Figure(), FIGURE_TITLES["cumulative_kpi"], y_title="mean KPI per session")
    for arm, values in series.get("cumulative_kpi", {}).items():
        if all(v is None for v in values):
            continue
        fig.add_trace(
            go.Scatter(
                x=series["times"], y=values, name=arm, mode="lines", line={"color": colors.get(arm)}
            )
        )
    if not fig.data:
        return _empty(fig, "no complete sessions yet (attribution windows still open)")
    return fig


def guardrail_figure(report: Mapping[str, Any]) -> go.Figure:
    """One panel per guardrail metric at each optimizer run: every arm's value, the champion's,
    and the limit an arm may not cross (champion + delta, or champion × ratio)."""
    series = report["series"].get("guardrails") or {}
    metrics = series.get("metrics") or {}
    colors = _colors(report)
    if not metrics:
        return _empty(_layout(go.Figure(), FIGURE_TITLES["guardrails"]), "no guardrail check yet")
    names = list(metrics)
    titles = [GUARDRAIL_TITLES.get(m, m) for m in names]
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=titles)
    _layout(fig, FIGURE_TITLES["guardrails"])
    times = series["times"]
    for col, metric in enumerate(names, start=1):
        m = metrics[metric]
        for arm, values in m["arms"].items():
            fig.add_trace(
                go.Scatter(
                    x=times,
                    y=values,
                    name=arm,
                    mode="lines",
                    legendgroup=arm,
                    line={"color": colors.get(arm)},
                    showlegend=col == 1,
                    customdata=m["probability"].get(arm),
                    hovertemplate=f"{arm}: %{{y:.4g}}, P(breach) %{{customdata:.2f}}"
                    "<extra></extra>",
                ),
                row=1,
                col=col,
            )
        for name, values, line in (
            ("champion", m["champion"], {"color": "#52606d", "width": 2}),
            ("limit (vs champion)", m["limit"], {"color": "#c0392b", "dash": "dot"}),
        ):
            fig.add_trace(
                go.Scatter(
                    x=times,
                    y=values,
                    name=name,
                    mode="lines",
                    line=line,
                    legendgroup=name,
                    showlegend=col == 1,
                ),
                row=1,
                col=col,
            )
        if metric.endswith("_rate"):
            fig.update_yaxes(tickformat=".0%", row=1, col=col)
    return fig


def figures(report: Mapping[str, Any]) -> dict[str, go.Figure]:
    """Every figure of the report, keyed as in :data:`FIGURE_TITLES`."""
    report = {**report, "series": _arrays(report.get("series") or {})}
    return {
        "allocation": allocation_figure(report),
        "posterior": posterior_figure(report),
        "cumulative_kpi": cumulative_kpi_figure(report),
        "guardrails": guardrail_figure(report),
    }


def _arrays(series: Any) -> Any:
    """The report's series with numpy arrays for lists: plotly validates a list point by
    point, an array at once (a point per day and arm over a long history: ~20% of the page)."""
    if isinstance(series, Mapping):
        return {k: _arrays(v) for k, v in series.items()}
    if isinstance(series, list) and series:
        if all(isinstance(v, str) for v in series):
            return np.asarray(series)
        if all(
            v is None or (isinstance(v, int | float) and not isinstance(v, bool)) for v in series
        ):
            return np.array([np.nan if v is None else v for v in series], dtype=float)
    return series


def figure_divs(report: Mapping[str, Any], *, include_plotlyjs: bool = False) -> dict[str, str]:
    """HTML snippets (a div and the script that draws it) per figure.

    ``include_plotlyjs=True`` inlines plotly.js once, in the first snippet, for a
    self-contained file; otherwise the page must load :func:`plotly_js` itself.
    """
    divs = {}
    for i, (name, fig) in enumerate(figures(report).items()):
        divs[name] = fig.to_html(
            full_html=False,
            include_plotlyjs=include_plotlyjs and i == 0,
            div_id=f"plot-{name}",
            default_height=f"{_HEIGHT}px",
            config={"displaylogo": False, "responsive": True},
        )
    return divs


@functools.cache
def plotly_js() -> str:
    """plotly.js (minified) from the installed plotly package, for serving locally."""
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.1%}"
