"""Shared bits of the CLI: loading config and store, printing for people or machines."""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import typer
from rich.console import Console

from optimizer.config import Config, load_config
from optimizer.errors import FlywheelError
from optimizer.store import Store

console = Console()
err_console = Console(stderr=True)

ConfigOption = typer.Option(
    None, "--config", help="Path of flywheel.toml (default: ./flywheel.toml or $FLYWHEEL_CONFIG)."
)
DatabaseOption = typer.Option(
    None, "--database-url", help="Store URL (default: config or $FLYWHEEL_DATABASE_URL)."
)
JsonOption = typer.Option(
    False, "--json", help="Print one JSON object for machines instead of tables."
)


def fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code)


def get_config(path: str | None = None) -> Config:
    try:
        return load_config(path)
    except FlywheelError as exc:
        fail(str(exc), 2)


def open_store(config: Config, database_url: str | None = None, *, upgrade: bool = True) -> Store:
    """The configured store, migrated to the newest schema."""
    store = Store(database_url or config.database_url)
    if upgrade:
        store.upgrade()
    return store


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str, sort_keys=True)
    sys.stdout.write("\n")
