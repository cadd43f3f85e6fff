"""``flywheel simulate``: run a scenario through the real assignment, store and optimizer."""

from __future__ import annotations

from pathlib import Path

import typer

from optimizer.cli.common import JsonOption, console, err_console, fail, print_json


def simulate(
    scenario: Path = typer.Option(
        ..., "--scenario", help="Scenario file (TOML), e.g. bench/scenarios/two_close_arms.toml."
    ),
    policy: str = typer.Option(
        "thompson", "--policy", help="thompson, uniform (A/B baseline) or oracle (best arm always)."
    ),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of every random draw of the run."),
    as_json: bool = JsonOption,
    into: str | None = typer.Option(
        None,
        "--into",
        metavar="DATABASE_URL",
        help="Keep the events in this store (default: a temporary SQLite file).",
    ),
) -> None:
    """Simulate an experiment in simulated time and report regret against the oracle."""
    from optimizer.errors import FlywheelError
    from optimizer.scenario import load_scenario
    from optimizer.simulator import POLICIES, SimulationResult
    from optimizer.simulator import simulate as run

    if policy not in POLICIES:
        fail(f"--policy must be one of {', '.join(POLICIES)}, got {policy!r}", 2)
    try:
        sc = load_scenario(scenario)
    except FlywheelError as exc:
        fail(str(exc), 2)

    result: SimulationResult
    try:
        if as_json:
            result = run(sc, policy=policy, seed=seed, database_url=into)  # type: ignore[arg-type]
        else:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            with Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.completed:,}/{task.total:,} sessions"),
                TimeElapsedColumn(),
                console=err_console,
                transient=True,
            ) as bar:
                task = bar.add_task(f"{sc.name} · {policy}", total=sc.sessions)
                result = run(
                    sc,
                    policy=policy,  # type: ignore[arg-type]
                    seed=seed,
                    database_url=into,
                    progress=lambda done, _total: bar.update(task, completed=done),
                )
    except FlywheelError as exc:
        fail(str(exc))

    if as_json:
        print_json(result.to_dict())
        return
    _print(result)


def _print(result: object) -> None:
    from rich.table import Table

    from optimizer.simulator import SimulationResult

    assert isinstance(result, SimulationResult)
    r = result
    console.print(
        f"[bold]{r.scenario}[/bold] · policy [bold]{r.policy}[/bold] · seed {r.seed} · "
        f"{r.sessions:,} sessions over {r.days:g} days · {r.refits} refits"
    )
    for key, alloc in sorted(r.final_allocation.items()):
        table = Table(title=f"segment {key}" if len(r.final_allocation) > 1 else None)
        table.add_column("arm")
        table.add_column("true E[KPI]", justify="right")
        table.add_column("sessions", justify="right")
        table.add_column("final share", justify="right")
        table.add_column("status")
        truths = r.expected_kpi_per_arm.get(key) or r.expected_kpi_per_arm.get("*") or {}
        counts = r.sessions_per_segment_arm.get(key) or r.sessions_per_arm
        oracle = r.oracle_arms.get(key)
        for arm in r.sessions_per_arm:
            mark = " [green]★[/green]" if arm == oracle else ""
            status = r.arm_statuses.get(arm, "")
            style = "red" if status.startswith("paused") else ""
            table.add_row(
                f"{arm}{mark}",
                f"{truths.get(arm, float('nan')):.5f}",
                f"{counts.get(arm, 0):,}",
                f"{alloc.get(arm, 0.0):.1%}",
                f"[{style}]{status}[/{style}]" if style else status,
            )
        console.print(table)
    console.print(
        f"expected KPI {r.expected_kpi_total:,.2f} · oracle {r.oracle_kpi_total:,.2f} · "
        f"[bold]regret {r.regret:,.2f}[/bold] ({r.regret_per_session:.5f}/session)"
    )
    console.print(
        f"paused: {', '.join(r.paused_arms) or '—'} · winner: {r.winner or '—'} · "
        f"{r.sessions_per_s:,.0f} sessions/s ({r.elapsed_s:.1f} s)"
    )
    if r.database_url:
        console.print(f"events kept in {r.database_url}")
