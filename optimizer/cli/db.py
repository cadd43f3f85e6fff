"""``flywheel db``: schema migrations."""

from __future__ import annotations

import typer

from optimizer.cli.common import ConfigOption, DatabaseOption, console, get_config, open_store

app = typer.Typer(help="Database schema: migrations.", no_args_is_help=True)


@app.command()
def upgrade(config: str | None = ConfigOption, database_url: str | None = DatabaseOption) -> None:
    """Migrate the store to the newest schema (also done by `flywheel serve`)."""
    cfg = get_config(config)
    store = open_store(cfg, database_url)
    from optimizer.store.migrate import current_revision

    console.print(f"database at revision [bold]{current_revision(store.engine)}[/bold]")
