"""``flywheel ope``: estimate a candidate policy's KPI from logged sessions before it serves one."""

from __future__ import annotations

import math
from pathlib import Path
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

TargetOption = typer.Option(
    "uniform",
    "--target",
    help="Policy to evaluate: 'arm:NAME' (one arm at 100%), 'uniform' (over the logged arms), "
    "'snapshot' or 'snapshot:VERSION' (a policy snapshot of the store), "
    "'allocation:FILE.json' ({segment: {arm: p}} or a snapshot's JSON).",
)
EstimatorsOption = typer.Option(
    "ips,snips,dm,dr", "--estimators", help="Comma-separated subset of ips, snips, dm, dr."
)
LoggedOption = typer.Option(
    None,
    "--logged",
    help="CSV of external logs (columns arm, reward, propensity; optional segment and context "
    "columns) instead of the store's complete sessions.",
    dir_okay=False,
)
ClipOption = typer.Option(
    None, "--clip", help="Cap importance weights at this value (reported when applied)."
)
BootstrapOption = typer.Option(500, "--bootstrap", help="Bootstrap replicates per interval.")
AlphaOption = typer.Option(0.05, "--alpha", help="1 - confidence level of the intervals.")
MinEssOption = typer.Option(
    100.0, "--min-ess", help="Warn when the effective sample size is below this."
)
SeedOption = typer.Option(0, "--seed", help="Seed of the bootstrap.")


def ope(
    target: str = TargetOption,
    estimators: str = EstimatorsOption,
    logged: Path | None = LoggedOption,
    clip: float | None = ClipOption,
    n_bootstrap: int = BootstrapOption,
    alpha: float = AlphaOption,
    min_ess: float = MinEssOption,
    seed: int = SeedOption,
    config: str | None = ConfigOption,
    database_url: str | None = DatabaseOption,
    as_json: bool = JsonOption,
) -> None:
    """Off-policy evaluation: the KPI a target policy would earn, from logged propensities."""
    from optimizer.errors import FlywheelError
    from optimizer.ope import (
        ESTIMATORS,
        evaluate_target,
        logs_from_store,
        parse_target,
        read_logged_csv,
    )

    names = [e.strip() for e in estimators.split(",") if e.strip()]
    unknown = [e for e in names if e not in ESTIMATORS]
    if unknown or not names:
        fail(
            f"--estimators must be a comma-separated subset of {', '.join(ESTIMATORS)}, "
            f"got {estimators!r}",
            2,
        )
    cfg = get_config(config)
    needs_store = logged is None or target.strip().startswith("snapshot")
    store = open_store(cfg, database_url) if needs_store else None
    try:
        if logged is not None:
            logs, source = read_logged_csv(logged), str(logged)
        else:
            assert store is not None
            logs, source = logs_from_store(store, cfg), f"store, experiment {cfg.experiment.id!r}"
            if logs.empty:
                fail(f"experiment {cfg.experiment.id!r} has no session with a complete KPI yet")
        policy = parse_target(target, store=store, experiment_id=cfg.experiment.id)
        with console.status(f"estimating on {len(logs):,} sessions…", spinner="dots"):
            out = evaluate_target(
                logs,
                policy,
                estimators=names,
                clip=clip,
                n_bootstrap=n_bootstrap,
                alpha=alpha,
                min_ess=min_ess,
                random_state=seed,
            )
    except ValueError as exc:
        fail(str(exc), 2)
    except FlywheelError as exc:
        fail(str(exc))
    finally:
        if store is not None:
            store.dispose()
    out["source"] = source
    if as_json:
        print_json(_finite(out))
        return
    _print(out)


def _finite(value: Any) -> Any:
    """JSON has no NaN: non-finite floats become null."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _print(out: dict[str, Any]) -> None:
    target = out["target"]
    title = (
        f"Off-policy estimate of [bold]{target['label']}[/bold] · {out['n']:,} logged sessions "
        f"({out['source']}) · logged mean reward {out['logged_mean']:.4g}"
    )
    confidence = next(iter(out["estimators"].values()))["confidence"]
    table = Table(title=title, title_justify="left")
    table.add_column("Estimator")
    for name in ("Estimate", f"{confidence:.0%} CI", "ESS", "Clipped"):
        table.add_column(name, justify="right")
    table.add_column("Warnings", justify="right")
    for name, r in out["estimators"].items():
        lo, hi = r["ci"]
        clipping = r["clipping"]
        table.add_row(
            name,
            f"{r['estimate']:.4g}",
            f"[{lo:.4g}, {hi:.4g}]",
            f"{r['ess']:,.0f} ({r['ess_fraction']:.0%})",
            "—" if clipping is None else f"{clipping['clipped']:,} > {clipping['threshold']:g}",
            f"[yellow]{len(r['warnings'])}[/yellow]" if r["warnings"] else "—",
        )
    console.print(table)
    if target.get("kind") == "allocation":
        for segment, alloc in target["segments"].items():
            shares = ", ".join(f"{arm} {p:.0%}" for arm, p in alloc.items())
            console.print(f"  target {segment}: {shares}")
    seen: set[str] = set()
    for name, r in out["estimators"].items():
        for message in r["warnings"]:
            if message not in seen:  # the ESS warning is the same for every estimator
                seen.add(message)
                err_console.print(f"[yellow]warning[/yellow] ({name}): {message}")
