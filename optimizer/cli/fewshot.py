"""``flywheel fewshot``: mine, review and propose few-shot examples."""

from __future__ import annotations

from collections.abc import Callable

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

app = typer.Typer(
    help="The few-shot example bank: mine, list, approve, reject, pin, propose.",
    no_args_is_help=True,
)

ActorOption = typer.Option(
    "operator", "--actor", help="Who is acting (recorded in the example's history)."
)


@app.command()
def mine(
    config: str | None = ConfigOption,
    database_url: str | None = DatabaseOption,
    as_json: bool = JsonOption,
) -> None:
    """Add scrubbed examples from conversations that earned the KPI (also run by the optimizer)."""
    from optimizer.fewshot import mine_examples

    cfg = get_config(config)
    store = open_store(cfg, database_url)
    try:
        result = mine_examples(store, cfg, actor="cli")
    finally:
        store.dispose()
    if as_json:
        print_json(result.as_dict())
        return
    console.print(
        f"{result.considered} turns, {result.qualifying} qualifying → "
        f"[bold]{len(result.added)} added[/bold] ({result.duplicates} near-duplicates, "
        f"{result.too_short} too short, {result.too_long} too long); "
        f"status {'approved' if cfg.fewshot.auto_approve else 'candidate'}"
    )
    for example_id in result.added:
        console.print(f"  + {example_id}")


@app.command("list")
def list_examples(
    status: str | None = typer.Option(
        None, "--status", help="candidate | approved | rejected | pinned | demoted"
    ),
    config: str | None = ConfigOption,
    database_url: str | None = DatabaseOption,
    as_json: bool = JsonOption,
) -> None:
    """List the bank's examples with status, source and reward."""
    from optimizer.fewshot import ExampleBank

    cfg = get_config(config)
    store = open_store(cfg, database_url)
    try:
        examples = ExampleBank(store).list(status)
    except ValueError as exc:
        fail(str(exc), 2)
    finally:
        store.dispose()
    if as_json:
        print_json(
            [
                {
                    "id": e.id,
                    "status": e.status,
                    "source": e.source,
                    "reward": e.reward,
                    "user": e.user_text,
                    "assistant": e.assistant_text,
                    "session_id": e.session_id,
                    "turn_id": e.turn_id,
                    "provenance": dict(e.provenance),
                    "created_at": e.created_at,
                }
                for e in examples
            ]
        )
        return
    table = Table("id", "status", "source", "reward", "user", "assistant")
    for e in examples:
        table.add_row(
            e.id,
            e.status,
            e.source,
            "" if e.reward is None else f"{e.reward:.2f}",
            _short(e.user_text),
            _short(e.assistant_text),
        )
    console.print(table)


def _short(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


ReasonOption = typer.Option(None, "--reason", help="Why (kept in the example's history).")


def _status_command(status: str, doc: str) -> Callable[..., None]:
    """The command that sets an example's ``status`` (approve, reject and pin are alike)."""

    def command(
        example_id: str,
        actor: str = ActorOption,
        reason: str | None = ReasonOption,
        config: str | None = ConfigOption,
        database_url: str | None = DatabaseOption,
        as_json: bool = JsonOption,
    ) -> None:
        from optimizer.errors import StoreError
        from optimizer.fewshot import ExampleBank

        store = open_store(get_config(config), database_url)
        try:
            example = ExampleBank(store).set_status(example_id, status, actor=actor, reason=reason)
        except StoreError as exc:
            fail(str(exc), 1)
        finally:
            store.dispose()
        if as_json:
            print_json({"id": example.id, "status": example.status})
        else:
            console.print(f"{example.id}: [bold]{example.status}[/bold]")

    command.__doc__ = doc
    return command


for _name, _status, _doc in (
    ("approve", "approved", "Let retrieval use an example."),
    (
        "reject",
        "rejected",
        "Never serve this example, and never mine it (or a near-duplicate) again.",
    ),
    ("pin", "pinned", "Always include this example first in retrieved arms."),
):
    app.command(_name)(_status_command(_status, _doc))


@app.command()
def propose(
    force: bool = typer.Option(
        False, "--force", help="Propose even if the bank has not grown enough."
    ),
    config: str | None = ConfigOption,
    database_url: str | None = DatabaseOption,
    as_json: bool = JsonOption,
) -> None:
    """Propose a challenger arm (champion's prompt × best examples) through the proposer's gates.

    With the proposer on (the default) and the experiment registered, the proposal
    becomes a candidate; without a model here the replay gate cannot run, so it waits
    for one-click approval on /operator/candidates. Otherwise the TOML is printed.
    """
    from optimizer.fewshot import propose_challenger

    cfg = get_config(config)
    store = open_store(cfg, database_url)
    try:
        proposal = propose_challenger(store, cfg, actor="cli", force=force)
    finally:
        store.dispose()
    if as_json:
        print_json(proposal.as_dict() if proposal else None)
        return
    if proposal is None:
        console.print(
            f"no proposal: fewer than {cfg.fewshot.propose_after} newly approved examples "
            "since the last one"
        )
        return
    if proposal.candidate is not None:
        c = proposal.candidate
        console.print(
            f"candidate {c['id'][:8]}: {c['status']}"
            + (f" ({c['reason']})" if c.get("reason") else "")
            + (
                f"; arm {c['arm_id']}"
                if c.get("arm_id")
                else "; approve it on /operator/candidates"
            )
        )
        return
    console.print("Add this arm to flywheel.toml to let it compete (under the challenger cap):\n")
    console.print(proposal.toml, markup=False, highlight=False)
