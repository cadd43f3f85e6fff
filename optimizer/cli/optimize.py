"""``flywheel optimize``: fit the policy on the events and write a new snapshot."""

from __future__ import annotations

from typing import Any

import typer
from rich.table import Table

from optimizer.cli.common import (
    ConfigOption,
    DatabaseOption,
    JsonOption,
    console,
    err_console,
    fail,
    get_config,
    open_store,
    print_json,
)

SeedOption = typer.Option(
    None, "--seed", help="Random seed of the Monte-Carlo draws (default: fresh)."
)


def optimize(
    config: str | None = ConfigOption,
    database_url: str | None = DatabaseOption,
    seed: int | None = SeedOption,
    as_json: bool = JsonOption,
) -> None:
    """Fit the policy on the events, check guardrails and SRM, write a policy snapshot."""
    from optimizer.errors import FlywheelError
    from optimizer.refit import run_optimizer

    cfg = get_config(config)
    store = open_store(cfg, database_url)
    try:
        with console.status("fitting the policy…", spinner="dots"):
            run = run_optimizer(store, cfg, random_state=seed, actor="cli")
    except FlywheelError as exc:
        fail(str(exc))
    finally:
        store.dispose()
    if run is None:
        if as_json:
            print_json({"ran": False, "reason": "another optimizer run holds the lock"})
        else:
            err_console.print("another optimizer run holds the lock; nothing done")
        raise typer.Exit(3)
    if as_json:
        print_json({"ran": True, **run.to_dict()})
        return
    _print(run.to_dict())


def _pct(value: Any) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"


def _num(value: Any, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def _print(run: dict[str, Any]) -> None:
    summary = run["summary"]
    title = (
        f"Snapshot [bold]v{run['snapshot_version']}[/bold] of [bold]{run['experiment_id']}[/bold]"
        f" · {run['policy']} ({summary['model']}) · {run['sessions']} sessions,"
        f" {run['complete_sessions']} complete · {run['duration_s']:.2f}s"
    )
    alloc = run["allocation"]["segments"]
    table = Table(title=title, title_justify="left")
    table.add_column("Arm")
    table.add_column("Status")
    for seg in alloc:
        table.add_column(f"Alloc. {seg}", justify="right")
    for name in (
        "Sessions",
        "Complete",
        "KPI [95% CI]",
        "P(best)",
        "Exp. loss",
        "Conv.",
        "Up",
        "Down",
    ):
        table.add_column(name, justify="right")
    for arm, s in summary["arms"].items():
        lo, hi = s["kpi_ci"]
        table.add_row(
            arm,
            s["status"],
            *[_pct(alloc[seg].get(arm)) for seg in alloc],
            str(s["sessions"]),
            str(s["complete_sessions"]),
            f"{_num(s['kpi_mean'])} [{_num(lo)}, {_num(hi)}]",
            _pct(s["prob_best"]),
            _num(s["expected_loss"], 2),
            _pct(s["conversion_rate"]),
            _pct(s["thumbs_up_rate"]),
            _pct(s["thumbs_down_rate"]),
        )
    console.print(table)
    if not summary["burn_in_complete"]:
        console.print(
            "burn-in: uniform traffic until every active arm has enough complete sessions"
        )
    for arm in run["paused"]:
        console.print(f"[red]paused[/red] {arm}: guardrail breached")
    stop = summary["stop"]
    if stop["recommended"]:
        verb = "promoted" if stop["promoted"] else "stop rule recommends"
        console.print(f"[green]{verb}[/green] {stop['recommended']}")
    srm = run["srm"]
    if srm.get("warning"):
        console.print(f"[yellow]sample ratio mismatch[/yellow]: p = {srm['p_value']:.2g}")
