"""``flywheel privacy``: opt a user out of (or back into) becoming data; delete a conversation.

Opted-out users and deleted conversations never enter a training set, an
export or the few-shot bank, and examples already mined from them leave the
bank (:mod:`optimizer.consent`, the same path as the chat's settings switch and
thread delete); their sessions still count for the experiment's statistics.
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
    from optimizer.consent import set_training_consent

    cfg = get_config(config)
    store = open_store(cfg, database_url)
    try:
        withdrawn = set_training_consent(store, user_id, undo, actor=actor)
    except ValueError as exc:
        fail(str(exc), 2)
    finally:
        store.dispose()
    console.print(
        f"[bold]{user_id}[/bold] opted {'in' if undo else 'out'}"
        + (f"; {len(withdrawn)} mined examples left the bank" if withdrawn else "")
    )


@app.command("delete-conversation")
def delete_conversation(
    thread_id: str = typer.Argument(..., help="The conversation (thread) id."),
    user_id: str = typer.Option(..., "--user", help="Whose conversation it is."),
    actor: str = ActorOption,
    config: str | None = ConfigOption,
    database_url: str | None = DatabaseOption,
) -> None:
    """Mark a conversation deleted: it is hidden from its user and never becomes data."""
    from optimizer.consent import delete_conversation as delete

    cfg = get_config(config)
    store = open_store(cfg, database_url)
    try:
        withdrawn = delete(store, thread_id, user_id=user_id, actor=actor)
    except ValueError as exc:
        fail(str(exc), 2)
    finally:
        store.dispose()
    console.print(
        f"conversation [bold]{thread_id}[/bold] deleted"
        + (f"; {len(withdrawn)} mined examples left the bank" if withdrawn else "")
    )
