"""``flywheel export``: scrubbed datasets (SFT, DPO pairs, flat tables) with a manifest."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

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


def export(
    fmt: str = typer.Option(..., "--format", help="openai-sft | dpo | openai-dpo | csv | parquet"),
    out: Path = typer.Option(
        Path("exports"), "--out", help="Directory for the dataset and its manifest."
    ),
    min_reward: float | None = typer.Option(
        None, "--min-reward", help="Keep turns whose session reward is complete and at least this."
    ),
    since: datetime | None = typer.Option(
        None, "--since", help="Only turns at or after this time (UTC ISO date)."
    ),
    until: datetime | None = typer.Option(
        None, "--until", help="Only turns before this time (UTC ISO date)."
    ),
    config: str | None = ConfigOption,
    database_url: str | None = DatabaseOption,
    as_json: bool = JsonOption,
) -> None:
    """Write a scrubbed dataset of the experiment's conversations and its manifest."""
    from optimizer.export import FORMATS, export_dataset

    if fmt not in FORMATS:
        fail(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}", 2)
    cfg = get_config(config)
    store = open_store(cfg, database_url)
    try:
        result = export_dataset(
            store, cfg, fmt, out, min_reward=min_reward, since=since, until=until
        )
    except ValueError as exc:
        fail(str(exc), 2)
    finally:
        store.dispose()
    if as_json:
        print_json(
            {
                "path": str(result.path),
                "manifest_path": str(result.manifest_path),
                "manifest": result.manifest,
            }
        )
        return
    m = result.manifest
    console.print(
        f"wrote [bold]{m['rows']}[/bold] rows to [bold]{result.path}[/bold] "
        f"(from {m['counts']['turns_considered']} turns; manifest {result.manifest_path.name})"
    )
