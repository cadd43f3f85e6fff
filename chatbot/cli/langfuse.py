"""``flywheel langfuse …`` and ``flywheel outcomes import``: the CLI around Langfuse.

``register(app)`` adds both groups to the ``flywheel`` app. Heavy imports
(the Langfuse SDK, pandas) happen inside the commands so ``--help`` stays fast.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import typer

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

if TYPE_CHECKING:
    from chatbot.langfuse.credentials import LangfuseCredentials

__all__ = ["langfuse_app", "outcomes_app", "parse_since", "register"]

langfuse_app = typer.Typer(
    help="Langfuse: prompt sync and KPI reward scores.", no_args_is_help=True
)
outcomes_app = typer.Typer(
    help="Business outcomes: import from files or Langfuse; unattributed ones, re-attribution.",
    no_args_is_help=True,
)

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhdw])$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def register(app: typer.Typer) -> None:
    """Add the ``langfuse`` and ``outcomes`` groups to ``app``.

    The ``outcomes`` group also carries the optimizer's ``unattributed`` and
    ``reattribute`` (:mod:`optimizer.cli.outcomes`).
    """
    from optimizer.cli import outcomes

    if not any(c.name == "reattribute" for c in outcomes_app.registered_commands):
        outcomes_app.command("unattributed")(outcomes.unattributed)
        outcomes_app.command("reattribute")(outcomes.reattribute)
    app.add_typer(langfuse_app, name="langfuse")
    app.add_typer(outcomes_app, name="outcomes")


def parse_since(text: str, *, now: datetime | None = None) -> datetime:
    """An ISO date/time (naive = UTC) or a duration back from now: ``30m``, ``12h``, ``7d``, ``2w``.

    >>> parse_since("2024-05-01").isoformat()
    '2024-05-01T00:00:00+00:00'
    >>> parse_since("2d", now=datetime(2024, 5, 3, tzinfo=UTC)).isoformat()
    '2024-05-01T00:00:00+00:00'
    """
    text = text.strip()
    if match := _DURATION.match(text):
        delta = timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})
        return (now or datetime.now(UTC)) - delta
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"--since must be an ISO date/time or a duration like 7d or 12h, got {text!r}"
        ) from None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _credentials() -> LangfuseCredentials:
    from chatbot.langfuse.credentials import (
        LANGFUSE_PUBLIC_KEY,
        LANGFUSE_SECRET_KEY,
        LangfuseCredentials,
    )

    creds = LangfuseCredentials.from_env()
    if creds is None:
        fail(f"Langfuse is not configured: set {LANGFUSE_PUBLIC_KEY} and {LANGFUSE_SECRET_KEY}", 2)
    return creds


@langfuse_app.command("sync-prompts")
def sync_prompts_cmd(
    config: str | None = ConfigOption,
    database_url: str | None = DatabaseOption,
    json_out: bool = JsonOption,
) -> None:
    """Push every prompt variant to Langfuse; a new version only when its content changed."""
    from chatbot.langfuse.credentials import rest_client
    from chatbot.langfuse.prompt_sync import prompt_cache_path, sync_prompts
    from optimizer.errors import FlywheelError
    from optimizer.prompt_library import load_prompts

    cfg = get_config(config)
    creds = _credentials()
    try:
        library = load_prompts(cfg.prompts_dir)
    except FlywheelError as exc:
        fail(str(exc), 2)
    store = open_store(cfg, database_url)
    statuses = store.arm_statuses(cfg.experiment.id)
    champion = next((a for a, s in statuses.items() if s == "champion"), cfg.experiment.champion)
    arms = list(cfg.experiment.arms)
    try:
        with rest_client(creds, timeout_s=cfg.langfuse.request_timeout_s * 3) as api:
            results = sync_prompts(api, library, arms, champion_arm=champion)
    except Exception as exc:  # the SDK raises its own API and transport errors
        fail(f"Langfuse at {creds.base_url} refused the sync: {exc}")
    for r in results:
        if r.action != "unchanged":
            store.audit(
                "cli",
                "langfuse_prompt_sync",
                r.prompt_id,
                {
                    "action": r.action,
                    "version": r.version,
                    "hash": r.hash,
                    "labels": list(r.labels),
                },
            )
    if json_out:
        print_json({"prompts": [r.__dict__ for r in results], "cache": str(prompt_cache_path())})
        return
    from rich.table import Table

    table = Table(title=f"Langfuse prompts at {creds.base_url}")
    for col in ("variant", "version", "action", "labels", "tags"):
        table.add_column(col)
    for r in results:
        table.add_row(r.prompt_id, str(r.version), r.action, ", ".join(r.labels), ", ".join(r.tags))
    console.print(table)


@langfuse_app.command("score-rewards")
def score_rewards_cmd(
    config: str | None = ConfigOption,
    database_url: str | None = DatabaseOption,
    json_out: bool = JsonOption,
) -> None:
    """Send `kpi_reward` for sessions whose attribution window closed since the last run."""
    from chatbot.langfuse.scores import score_session_rewards
    from chatbot.langfuse.tracer import make_tracer

    cfg = get_config(config)
    _credentials()
    store = open_store(cfg, database_url)
    tracer = make_tracer(cfg)
    try:
        sent = score_session_rewards(store, cfg, tracer)
        flushed = tracer.flush(cfg.langfuse.flush_timeout_s * 5)
    finally:
        tracer.shutdown()
    if json_out:
        print_json({"sessions": sent, "flushed": flushed})
    else:
        console.print(
            f"queued {sent} session reward(s); {'sent' if flushed else 'not all sent yet'}"
        )


@outcomes_app.command("import")
def import_cmd(
    file: Path | None = typer.Argument(
        None, help="CSV or JSONL file of outcomes.", show_default=False
    ),
    from_langfuse: bool = typer.Option(
        False, "--from-langfuse", help="Import scores made in Langfuse."
    ),
    since: str | None = typer.Option(
        None, "--since", help="With --from-langfuse: ISO time or duration (7d)."
    ),
    source: list[str] = typer.Option(
        ["ANNOTATION", "EVAL"], "--source", help="With --from-langfuse: score sources to import."
    ),
    config: str | None = ConfigOption,
    database_url: str | None = DatabaseOption,
    json_out: bool = JsonOption,
) -> None:
    """Import outcomes from a CSV/JSONL FILE, or scores from Langfuse (--from-langfuse)."""
    from chatbot.langfuse.score_import import import_langfuse_scores, import_outcome_file

    if (file is None) == (not from_langfuse):
        fail("give either a FILE or --from-langfuse (not both)", 2)
    if since is not None and not from_langfuse:
        fail("--since applies to --from-langfuse only", 2)
    cfg = get_config(config)
    if from_langfuse:
        from chatbot.langfuse.credentials import rest_client

        try:
            start = parse_since(since) if since else None
        except ValueError as exc:
            fail(str(exc), 2)
        creds = _credentials()
        store = open_store(cfg, database_url)
        try:
            with rest_client(creds, timeout_s=cfg.langfuse.request_timeout_s * 3) as api:
                report = import_langfuse_scores(store, api, since=start, sources=source)
        except Exception as exc:
            fail(f"could not read scores from Langfuse at {creds.base_url}: {exc}")
    else:
        from chatbot.langfuse.tracer import make_tracer

        assert file is not None
        if not file.is_file():
            fail(f"{file}: no such file", 2)
        store = open_store(cfg, database_url)
        tracer = make_tracer(cfg)
        try:
            report = import_outcome_file(store, file, tracer=tracer)
        except ValueError as exc:
            fail(str(exc), 2)
        finally:
            tracer.shutdown()
    if json_out:
        print_json(report.as_dict())
        return
    console.print(
        f"read {report.read}, imported [bold]{report.imported}[/bold], "
        f"duplicates {report.duplicates}, skipped {sum(report.skipped.values())}"
    )
    for reason, count in sorted(report.skipped.items()):
        console.print(f"  skipped {count}: {reason}")
    for error in report.errors:
        console.print(f"  [yellow]{error}[/yellow]")
