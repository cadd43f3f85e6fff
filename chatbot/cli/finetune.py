"""``flywheel finetune``: train a model on the flywheel's own data, make it a challenger arm.

Here (chat side) because it hands the optimizer a provider that talks to
litellm; the loop itself is :mod:`optimizer.finetune`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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

__all__ = ["register"]

app = typer.Typer(
    help="Fine-tune on the scrubbed dataset; the result competes as a challenger arm.",
    no_args_is_help=True,
)


def _provider(cfg: Any, name: str | None) -> Any:
    from chatbot.llm.finetune import LiteLLMFineTuneProvider

    try:
        return LiteLLMFineTuneProvider(
            name or cfg.finetune.provider, api_base=cfg.finetune.api_base
        )
    except ValueError as exc:
        fail(str(exc), 2)


def _row(job: Any) -> dict[str, Any]:
    return {
        "id": job.id,
        "status": job.status,
        "provider": job.provider,
        "format": job.format,
        "provider_job_id": job.provider_job_id,
        "fine_tuned_model": job.fine_tuned_model,
        "arm_id": job.arm_id,
        "estimated_cost_usd": job.estimated_cost_usd,
        "trained_tokens": job.trained_tokens,
        "actual_cost_usd": job.actual_cost_usd,
        "sessions": job.manifest.get("sessions"),
        "rows": job.manifest.get("rows"),
        "error": job.error,
        "created_at": job.created_at.isoformat(),
    }


@app.command()
def start(
    fmt: str | None = typer.Option(None, "--format", help="openai-sft | dpo (default: config)."),
    provider: str | None = typer.Option(
        None, "--provider", help="openai | azure | vertex_ai (default: finetune.provider)."
    ),
    out: Path = typer.Option(
        Path("exports/finetune"), "--out", help="Where the uploaded dataset is kept."
    ),
    config: str | None = ConfigOption,
    database_url: str | None = DatabaseOption,
    as_json: bool = JsonOption,
) -> None:
    """Export the scrubbed training set, upload it, start the provider's job."""
    from optimizer.errors import FineTuneError
    from optimizer.finetune import start_job

    if fmt is not None and fmt not in ("openai-sft", "dpo"):
        fail(f"--format must be openai-sft or dpo, got {fmt!r}", 2)
    cfg = get_config(config)
    client = _provider(cfg, provider)
    store = open_store(cfg, database_url)
    try:
        job = start_job(store, cfg, client, out, fmt=fmt)
    except FineTuneError as exc:
        fail(str(exc), 1)
    finally:
        store.dispose()
    if as_json:
        print_json(_row(job))
        return
    console.print(
        f"job [bold]{job.id}[/bold] started ({job.provider} {job.provider_job_id}): "
        f"{job.manifest.get('rows')} rows from {job.manifest.get('sessions')} sessions, "
        f"estimated ${job.estimated_cost_usd:.2f}; follow with `flywheel finetune status`"
    )


@app.command()
def status(
    job_id: str | None = typer.Argument(None, help="One job (default: all of the experiment)."),
    provider: str | None = typer.Option(None, "--provider", help="Override finetune.provider."),
    watch: bool = typer.Option(
        False, "--watch", help="Poll every finetune.poll_interval_s until no job runs."
    ),
    config: str | None = ConfigOption,
    database_url: str | None = DatabaseOption,
    as_json: bool = JsonOption,
) -> None:
    """Ask the provider about running jobs; a finished one becomes a challenger arm."""
    import time

    from optimizer.errors import FineTuneError
    from optimizer.finetune import FINAL_STATES, jobs, poll_job

    cfg = get_config(config)
    client = _provider(cfg, provider)
    store = open_store(cfg, database_url)
    try:
        listed = jobs(store, cfg.experiment.id)
        if job_id is not None:
            listed = [j for j in listed if j.id == job_id]
            if not listed:
                fail(f"no fine-tuning job {job_id!r} in experiment {cfg.experiment.id!r}", 2)
        current = [poll_job(store, cfg, client, j.id) for j in listed]
        while watch and any(j.status not in FINAL_STATES for j in current):
            time.sleep(cfg.finetune.poll_interval_s)
            current = [poll_job(store, cfg, client, j.id) for j in current]
    except FineTuneError as exc:
        fail(str(exc), 1)
    finally:
        store.dispose()
    rows = [_row(j) for j in current]
    if as_json:
        print_json({"jobs": rows})
        return
    table = Table(title=f"Fine-tuning jobs of {cfg.experiment.id}")
    for col in ("job", "status", "model", "arm", "sessions", "est. $", "billed $", "error"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["id"],
            r["status"],
            str(r["fine_tuned_model"] or "—"),
            str(r["arm_id"] or "—"),
            str(r["sessions"]),
            f"{r['estimated_cost_usd']:.2f}",
            "—" if r["actual_cost_usd"] is None else f"{r['actual_cost_usd']:.2f}",
            str(r["error"] or ""),
        )
    console.print(table)


@app.command()
def tick(
    out: Path = typer.Option(Path("exports/finetune"), "--out", help="Dataset directory."),
    config: str | None = ConfigOption,
    database_url: str | None = DatabaseOption,
    as_json: bool = JsonOption,
) -> None:
    """Without a server (cron): follow running jobs, start the next one when retraining is due.

    ``flywheel serve`` does the same at every optimizer run (policy.refit_interval_s).
    """
    from optimizer.finetune import FineTuneHooks, finetune_step, jobs

    cfg = get_config(config)
    client = _provider(cfg, None)
    store = open_store(cfg, database_url)
    try:
        step = finetune_step(store, cfg, FineTuneHooks(client, out))
        listed = {j.id: j for j in jobs(store, cfg.experiment.id)}
    finally:
        store.dispose()
    if "error" in step:
        fail(step["error"], 1)
    reason = step["due"]
    started = listed.get(step["started"] or "")
    result = {"due": reason, "started": _row(started) if started else None}
    if as_json:
        print_json(result)
        return
    console.print(
        f"retraining due ({reason}): started job {started.id}" if started else "nothing due"
    )


def register(root: typer.Typer) -> None:
    """Add ``flywheel finetune …`` to the console script."""
    root.add_typer(app, name="finetune")
