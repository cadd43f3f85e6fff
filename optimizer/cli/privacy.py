"""``flywheel privacy``: opt a user out of (or back into) becoming data; delete a conversation.

Opted-out users and deleted conversations never enter a training set, an
export or the few-shot bank (:mod:`optimizer.store.consent`); their sessions
still count for the experiment's statistics.
"""

from __future__ import annotations

import typer

from optimizer.cli.common import ConfigOption, DatabaseOption, console, fail, get_config, open_store

app = typer.Typer(
    help="Consent: opted-out users and deleted conversations never become data.",
    no_args_is_help=True,
)

ActorOption = typer.Option("operator", "--actor", help="Who is acting (audited).")


@app.command("opt-out")
def opt_out(
    user_id: str = typer.Argument(..., help="The user's id (login name)."),
    undo: bool = typer.Option(False, "--undo", help="Opt the user back in."),
    actor: str = ActorOption,
    config: str | None = ConfigOption,
    database_url: str | None = DatabaseOption,
) -> None:
    """Keep a user's conversations out of training sets, exports and the example bank."""
    cfg = get_config(config)
    store = open_store(cfg, database_url)
    try:
        store.set_opt_out(user_id, not undo, actor=actor)
    except ValueError as exc:
        fail(str(exc), 2)
    finally:
        store.dispose()
    console.print(f"[bold]{user_id}[/bold] opted {'in' if undo else 'out'}")


@app.command("delete-conversation")
def delete_conversation(
    thread_id: str = typer.Argument(..., help="The conversation (thread) id."),
    user_id: str = typer.Option(..., "--user", help="Whose conversation it is."),
    actor: str = ActorOption,
    config: str | None = ConfigOption,
    database_url: str | None = DatabaseOption,
) -> None:
    """Mark a conversation deleted: it is hidden from its user and never becomes data."""
    cfg = get_config(config)
    store = open_store(cfg, database_url)
    try:
        store.delete_conversation(thread_id, user_id=user_id, actor=actor)
    finally:
        store.dispose()
    console.print(f"conversation [bold]{thread_id}[/bold] deleted")
