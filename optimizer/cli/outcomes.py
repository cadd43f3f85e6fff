"""``flywheel outcomes unattributed`` and ``flywheel outcomes reattribute``.

Outcomes that could not count when they arrived are kept with their reason
(:mod:`optimizer.attribution`). These commands show them and re-judge them once
what they lacked exists (a session written late by another replica, a KPI term
added for their name). The ``outcomes`` group itself lives in ``chatbot.cli``
(its ``import`` command needs Langfuse); the group adds these two.
"""

from __future__ import annotations

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

__all__ = ["reattribute", "unattributed"]


def unattributed(
    limit: int = typer.Option(50, "--limit", help="Newest outcomes listed (counts cover all)."),
    config: str | None = ConfigOption,
    database_url: str | None = DatabaseOption,
    as_json: bool = JsonOption,
) -> None:
    """Outcomes that do not count, by reason, and the newest of them."""
    from optimizer.attribution import unattributed as list_unattributed

    if limit < 1:
        fail(f"--limit must be >= 1, got {limit}", 2)
    cfg = get_config(config)
    store = open_store(cfg, database_url)
    try:
        found = list_unattributed(store, limit=limit)
    finally:
        store.dispose()
    if as_json:
        print_json(found)
        return
    if not found["total"]:
        console.print("every stored outcome is attributed")
        return
    console.print(
        f"{found['total']} outcome(s) not attributed: "
        + ", ".join(f"{reason} {n}" for reason, n in found["counts"].items())
    )
    table = Table(title=f"Newest {len(found['outcomes'])}")
    for col in ("received", "occurred", "name", "value", "session / user", "reason", "key"):
        table.add_column(col)
    for o in found["outcomes"]:
        who = o["session_id"] or f"user {o['user_id']}"
        table.add_row(
            f"{o['received_at']:%Y-%m-%d %H:%M}",
            f"{o['occurred_at']:%Y-%m-%d %H:%M}",
            o["name"],
            f"{o['value']:g}",
            who,
            o["reason"],
            o["idempotency_key"],
        )
    console.print(table)


def reattribute(
    config: str | None = ConfigOption,
    database_url: str | None = DatabaseOption,
    as_json: bool = JsonOption,
) -> None:
    """Re-judge every outcome that is not attributed; prints the new verdicts' counts."""
    from optimizer.attribution import reattribute as rejudge

    cfg = get_config(config)
    store = open_store(cfg, database_url)
    try:
        counts = rejudge(store, cfg)
        store.audit("cli", "outcomes.reattribute", cfg.experiment.id, {"verdicts": counts})
    finally:
        store.dispose()
    if as_json:
        print_json({"verdicts": counts})
        return
    if not counts:
        console.print("nothing to re-judge: every stored outcome is attributed")
        return
    console.print(
        "re-judged "
        + ", ".join(f"{code} {n}" for code, n in sorted(counts.items()))
        + " (attributed ones count in the next refit)"
    )
