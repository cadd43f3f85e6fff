"""``flywheel candidates``: the proposer's candidates from the command line.

The same functions as the dashboard's candidates page
(:mod:`optimizer.proposer.review`): ``list`` with each candidate's gate results,
``show`` with its diff to the parent and its rationale, ``approve`` (starts the
arm at the trial cap, then refits so it gets traffic) and ``decline``. A
candidate is named by its id or a unique prefix of it (eight characters, as
listed, are enough).
"""

from __future__ import annotations

from typing import Any

import typer
from rich.markup import escape
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

app = typer.Typer(
    help="Proposed variants: list with gate results, show (diff, rationale), approve, decline.",
    no_args_is_help=True,
)

ActorOption = typer.Option("operator", "--actor", help="Who is deciding (audited).")
CandidateArg = typer.Argument(..., help="Candidate id or a unique prefix (from `list`).")


def _gates(gates: list[dict[str, Any]]) -> str:
    """``pii ok, format ok, replay FAIL`` — the gates in the order they ran."""
    return ", ".join(f"{g.get('name')} {'ok' if g.get('passed') else 'FAIL'}" for g in gates)


@app.command("list")
def list_candidates(
    status: str | None = typer.Option(
        None, "--status", help="waiting | started | rejected | duplicate | declined"
    ),
    config: str | None = ConfigOption,
    database_url: str | None = DatabaseOption,
    as_json: bool = JsonOption,
) -> None:
    """Candidates, newest first, with their source, status, gate results and reason."""
    from optimizer.proposer.records import CANDIDATE_STATUSES, candidates

    if status is not None and status not in CANDIDATE_STATUSES:
        fail(f"--status must be one of {list(CANDIDATE_STATUSES)}, got {status!r}", 2)
    cfg = get_config(config)
    store = open_store(cfg, database_url)
    try:
        found = candidates(store, cfg.experiment.id, status=status)
    finally:
        store.dispose()
    if as_json:
        print_json({"experiment_id": cfg.experiment.id, "candidates": [c.as_dict() for c in found]})
        return
    table = Table(title=f"Candidates of {cfg.experiment.id}")
    for col in ("id", "created", "source", "parent", "status", "gates", "reason / arm"):
        table.add_column(col)
    for c in found:
        table.add_row(
            c.id[:8],
            c.created_at.strftime("%Y-%m-%d %H:%M"),
            c.source,
            c.parent_arm_id,
            c.status,
            _gates(c.gates),
            escape(c.reason or c.arm_id or ""),
        )
    console.print(table)


@app.command()
def show(
    candidate: str = CandidateArg,
    config: str | None = ConfigOption,
    database_url: str | None = DatabaseOption,
    as_json: bool = JsonOption,
) -> None:
    """One candidate: its diff to the parent's prompt, rationale and every gate's detail."""
    from optimizer.proposer.review import CandidateNotFound, candidate_diff, find_candidate

    cfg = get_config(config)
    store = open_store(cfg, database_url)
    try:
        found = find_candidate(store, cfg.experiment.id, candidate)
        parent = next(
            (
                r.prompt_text or ""
                for r in store.arms(cfg.experiment.id)
                if r.id == found.parent_arm_id
            ),
            "",
        )
    except CandidateNotFound as exc:
        fail(str(exc), 2)
    finally:
        store.dispose()
    diff = candidate_diff(parent, found)
    if as_json:
        print_json({**found.as_dict(), "parent_text": parent, "diff": diff})
        return
    console.print(
        f"[bold]{found.id}[/bold] ({found.source}, {found.status}) for {found.parent_arm_id}"
        + (f" → arm {found.arm_id}" if found.arm_id else "")
    )
    if found.reason:
        console.print(f"reason: {escape(found.reason)}")
    console.print(f"rationale: {escape(found.rationale or '(none)')}")
    if found.fewshot != "none":
        console.print(f"few-shot: {found.fewshot} {found.fewshot_config}")
    console.print("gates:")
    for g in found.gates:
        mark = "[green]ok[/green]" if g.get("passed") else "[red]FAIL[/red]"
        console.print(f"  {g.get('name')}: {mark} {escape(str(g.get('detail') or ''))}")
    console.print("diff to the parent:")
    for line in diff or ["(no change to the prompt text)"]:
        style = "green" if line.startswith("+") else "red" if line.startswith("-") else ""
        console.print(f"[{style}]{escape(line)}[/{style}]" if style else escape(line))


def _decide(
    decision: str,
    candidate: str,
    config: str | None,
    database_url: str | None,
    actor: str,
    refit: bool,
    as_json: bool,
) -> None:
    from optimizer.errors import StoreError
    from optimizer.proposer.review import CandidateNotFound, decide_candidate

    cfg = get_config(config)
    store = open_store(cfg, database_url)
    version = None
    try:
        decided = decide_candidate(store, cfg, candidate, decision, actor=actor)
        if decision == "approve" and refit:
            from optimizer.refit import run_optimizer

            run = run_optimizer(store, cfg, actor=actor, fewshot=False)
            version = getattr(run, "snapshot_version", None) if run is not None else None
    except CandidateNotFound as exc:
        fail(str(exc), 2)
    except StoreError as exc:  # not waiting (decided already, rejected by the gates)
        fail(str(exc), 1)
    finally:
        store.dispose()
    if as_json:
        print_json({**decided.as_dict(), "snapshot_version": version})
        return
    if decision == "approve":
        note = f"; policy snapshot v{version} written" if version is not None else ""
        console.print(f"candidate {decided.id[:8]} approved: arm {decided.arm_id} started{note}")
    else:
        console.print(f"candidate {decided.id[:8]} declined")


@app.command()
def approve(
    candidate: str = CandidateArg,
    actor: str = ActorOption,
    refit: bool = typer.Option(True, "--refit/--no-refit", help="Refit now so it gets traffic."),
    config: str | None = ConfigOption,
    database_url: str | None = DatabaseOption,
    as_json: bool = JsonOption,
) -> None:
    """Start a waiting candidate as an arm (at ``proposer.trial_cap``), audited."""
    _decide("approve", candidate, config, database_url, actor, refit, as_json)


@app.command()
def decline(
    candidate: str = CandidateArg,
    actor: str = ActorOption,
    config: str | None = ConfigOption,
    database_url: str | None = DatabaseOption,
    as_json: bool = JsonOption,
) -> None:
    """Decline a waiting candidate (kept, with who declined it)."""
    _decide("decline", candidate, config, database_url, actor, False, as_json)
