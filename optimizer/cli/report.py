"""``flywheel report``: the experiment's numbers in the terminal, as JSON, or as one HTML file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from optimizer.cli.common import (
    ConfigOption,
    DatabaseOption,
    JsonOption,
    console,
    fail,
    get_config,
    open_store,
    print_json,
)

HtmlOption = typer.Option(
    None,
    "--html",
    help="Also write a self-contained HTML report (tables and plots, works offline) to this file.",
    dir_okay=False,
    writable=True,
)


def report(
    config: str | None = ConfigOption,
    database_url: str | None = DatabaseOption,
    html: Path | None = HtmlOption,
    as_json: bool = JsonOption,
) -> None:
    """Show the experiment: arms with uncertainty, guardrails, SRM, traffic now."""
    from optimizer.report import experiment_report

    cfg = get_config(config)
    store = open_store(cfg, database_url)
    try:
        rep = experiment_report(store, cfg)
    finally:
        store.dispose()
    if html is not None:
        from optimizer.report_html import render_standalone

        try:
            html.write_text(render_standalone(rep), encoding="utf-8")
        except OSError as exc:
            fail(f"cannot write {html}: {exc.strerror}")
    if as_json:
        print_json(rep)
        return
    _print(rep)
    if html is not None:
        console.print(f"HTML report written to [bold]{html}[/bold]")


def _print(rep: dict[str, Any]) -> None:
    from optimizer.report_html import ago, interval, num, pct, usd, when

    exp, snap = rep["experiment"], rep["snapshot"]
    title = f"Experiment [bold]{exp['id']}[/bold] · {rep['totals']['sessions']} sessions"
    if rep["simulated"]:
        title += " · [yellow]simulated data[/yellow]"
    table = Table(title=title, title_justify="left")
    table.add_column("Arm", no_wrap=True)
    table.add_column("Status")
    for name in (
        "Sessions",
        "Traffic",
        "Conversion",
        "Up",
        "Down",
        "Support min",
        "KPI",
        "$/session",
        "KPI per $",
        "P(best)",
        "E[loss]",
    ):
        table.add_column(name, justify="right")
    for a in rep["arms"]:
        model = a.get("model") or ""
        table.add_row(
            f"{a['id']}\n[dim]{model}[/dim]" if model else a["id"],
            a["status_label"],
            str(a["sessions"]),
            pct(a["allocation"]),
            f"{pct(a['conversion_rate'])}\n{interval(a['conversion_ci'], pct)}".strip(),
            pct(a["thumbs_up_rate"]),
            pct(a["thumbs_down_rate"]),
            num(a["median_support_minutes"], 1),
            f"{num(a['kpi_mean'], 4)}\n{interval(a['kpi_ci'], lambda v: num(v, 4))}".strip(),
            usd(a.get("cost_per_session")),
            num(a.get("kpi_per_dollar"), 1),
            pct(a["prob_best"]),
            num(a["expected_loss"], 4),
        )
    console.print(table)
    if snap is None:
        console.print("Posterior: [dim]no policy snapshot yet (run `flywheel optimize`)[/dim]")
    else:
        console.print(
            f"Posterior from snapshot v{snap['version']} ({snap['policy']}, {ago(snap['age_s'])})"
        )
    if leader := rep["leader"]:
        console.print(
            f"Leader: [bold]{leader['arm']}[/bold] · P(best) {pct(leader['prob_best'])}"
            f" · expected loss {num(leader['expected_loss'], 4)}"
        )
    if stop := rep["stop"]:
        rule = (
            f"P(best) ≥ {pct(stop.get('stop_probability_best'), 0)}"
            f" and expected loss < {stop.get('stop_expected_loss')}"
        )
        if stop.get("recommended"):
            console.print(
                f"Stop rule [green]met[/green]: [bold]{stop['recommended']}[/bold] ({rule})"
            )
        else:
            console.print(f"Stop rule not met yet: keep exploring ({rule})")
    if srm := rep["srm"]:
        state = "[red]MISMATCH[/red]" if srm.get("warning") else "[green]ok[/green]"
        console.print(f"SRM: {state} (p = {num(srm.get('p_value'), 4)})")
    hold = rep.get("holdback") or {}
    if hold.get("lift") is not None:
        lo, hi = hold["lift_ci"]
        console.print(
            f"Lift over the holdback: [bold]{hold['lift']:+.4f}[/bold] KPI per session "
            f"(95% CI {lo:+.4f} to {hi:+.4f}); optimised {num(hold['optimised_kpi'], 4)} vs "
            f"holdback {num(hold['holdback_kpi'], 4)} ({hold['holdback_sessions']} sessions, "
            f"{pct(hold['observed_share'])} of traffic, configured {pct(hold['share'])})"
        )
    elif hold.get("share"):
        console.print(
            f"Lift over the holdback: not yet ({hold.get('holdback_sessions', 0)} holdback "
            f"sessions, configured {pct(hold['share'])})"
        )
    for fired in rep["guardrail_firings"]:
        console.print(
            f"[red]Guardrail[/red] {fired['metric'] or ''} paused [bold]{fired['arm']}[/bold]"
            f" at {when(fired['at'])}: {_check(fired['evidence'])}"
        )


def _check(check: dict[str, Any]) -> str:
    """One guardrail check as a sentence (the evidence of a pause)."""
    from optimizer.report_html import evidence, num

    if "arm_value" not in check or "limit" not in check:
        return evidence(check)
    limit = f"+{check['limit']}" if check.get("limit_kind") == "max_delta" else f"×{check['limit']}"
    return (
        f"{num(check['arm_value'], 4)} vs champion {num(check.get('champion_value'), 4)}"
        f" (limit {limit}), P(breach) = {num(check.get('probability'), 3)},"
        f" always-valid bound = {num(check.get('lower_bound'), 4)}"
    )
