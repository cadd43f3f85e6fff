"""``flywheel arms``: list, add and retire arms at run time (arms are data in the store).

Every replica serves an added arm from the next policy snapshot on, without a
restart; ``add`` refits at once (unless ``--no-refit``) so that is seconds, not
the refit interval. Undo an addition by retiring it.
"""

from __future__ import annotations

from pathlib import Path

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
    help="Arms as data: list, add (new arm or version), retire.", no_args_is_help=True
)

ActorOption = typer.Option("operator", "--actor", help="Who is acting (audited).")


@app.command("list")
def list_arms(
    config: str | None = ConfigOption,
    database_url: str | None = DatabaseOption,
    as_json: bool = JsonOption,
) -> None:
    """Every arm version with its status, origin and content hash (history included)."""
    cfg = get_config(config)
    store = open_store(cfg, database_url)
    try:
        exp = cfg.experiment.id
        rows = store.arms(exp)
        statuses = store.arm_statuses(exp)
    finally:
        store.dispose()
    items = [
        {
            "id": r.id,
            "base_id": r.base_id or r.id,
            "version": r.version,
            "status": statuses.get(r.id, "unknown"),
            "origin": r.origin,
            "prompt_id": r.prompt_id,
            "fewshot": r.fewshot,
            "model": r.model or cfg.model.name,
            "model_params": r.model_params or {},
            "manifest": r.manifest,
            "content_hash": r.content_hash,
            "created_at": r.created_at,
        }
        for r in sorted(rows, key=lambda r: (r.base_id or r.id, r.version))
    ]
    if as_json:
        print_json({"experiment_id": exp, "arms": items})
        return
    table = Table(title=f"Arms of {exp}")
    for col in (
        "arm",
        "version",
        "status",
        "origin",
        "prompt",
        "few-shot",
        "model",
        "hash",
        "created",
    ):
        table.add_column(col)
    for i in items:
        table.add_row(
            str(i["id"]),
            str(i["version"]),
            str(i["status"]),
            str(i["origin"]),
            str(i["prompt_id"]),
            str(i["fewshot"]),
            str(i["model"]),
            str(i["content_hash"] or "—"),
            str(i["created_at"])[:19],
        )
    console.print(table)


@app.command()
def add(
    arm_id: str = typer.Argument(..., help="Arm id; an existing id gets a new version."),
    prompt_file: Path = typer.Option(
        ..., "--prompt-file", help="Text file with the system prompt to serve."
    ),
    fewshot: str = typer.Option("none", "--fewshot", help="none | retrieved | fixed"),
    k: int = typer.Option(3, "--k", help="Examples retrieved per turn (--fewshot retrieved)."),
    examples: list[str] = typer.Option(
        [], "--example", help="Example id, repeatable (--fewshot fixed)."
    ),
    model: str | None = typer.Option(
        None, "--model", help="litellm model string (default: the configured model)."
    ),
    temperature: float | None = typer.Option(None, "--temperature", help="The model's own."),
    max_tokens: int | None = typer.Option(None, "--max-tokens", help="The model's own."),
    api_base: str | None = typer.Option(
        None, "--api-base", help="Where the model lives; must be in model.allowed_api_bases."
    ),
    refit: bool = typer.Option(True, "--refit/--no-refit", help="Refit now so it gets traffic."),
    actor: str = ActorOption,
    config: str | None = ConfigOption,
    database_url: str | None = DatabaseOption,
    as_json: bool = JsonOption,
) -> None:
    """Create an arm (or a new version of one) from a prompt text, served without restart."""
    from optimizer.config import ArmConfig
    from optimizer.errors import FlywheelError
    from optimizer.models import check_model_params
    from optimizer.prompt_library import content_hash
    from optimizer.store import ArmSpec

    cfg = get_config(config)
    try:
        text = prompt_file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        fail(f"--prompt-file: cannot read {str(prompt_file)!r}: {exc.strerror}", 2)
    if not text:
        fail(f"--prompt-file: {str(prompt_file)!r} is empty", 2)
    try:
        arm = ArmConfig.model_validate(
            {"id": arm_id, "prompt": arm_id, "fewshot": fewshot, "k": k, "examples": examples}
        )
        params = {"temperature": temperature, "max_tokens": max_tokens, "api_base": api_base}
        model_params = check_model_params(
            model, {k: v for k, v in params.items() if v is not None}, cfg.model.allowed_api_bases
        )
    except ValueError as exc:
        fail(f"invalid arm: {exc}", 2)
    settings: dict[str, object] = {}
    if arm.fewshot == "fixed":
        settings = {"examples": list(arm.examples)}
    elif arm.fewshot == "retrieved":
        settings = {"k": arm.k, "reward_weighted": arm.reward_weighted}
    spec = ArmSpec(
        arm.id,
        arm.id,
        content_hash(text),
        arm.fewshot,
        settings,
        prompt_text=text,
        origin="operator",
        model=model,
        model_params=model_params,
    )
    store = open_store(cfg, database_url)
    try:
        new_id, what = store.add_arm(cfg.experiment.id, spec, actor=actor)
        snapshot = None
        if refit and what != "known":
            from optimizer.refit import run_optimizer

            run = run_optimizer(store, cfg, actor=actor, fewshot=False)
            snapshot = run.snapshot_version if run is not None else None
    except (FlywheelError, ValueError) as exc:
        fail(str(exc), 2)
    finally:
        store.dispose()
    if as_json:
        print_json({"arm_id": new_id, "result": what, "snapshot_version": snapshot})
        return
    verb = {"created": "created", "version": "new version", "known": "already known"}[what]
    console.print(
        f"[bold]{new_id}[/bold]: {verb}" + (f" (snapshot {snapshot})" if snapshot else "")
    )


@app.command()
def retire(
    arm_id: str = typer.Argument(..., help="Arm id (a version id such as concise@v2 works)."),
    actor: str = ActorOption,
    config: str | None = ConfigOption,
    database_url: str | None = DatabaseOption,
) -> None:
    """Retire an arm: no more traffic, its returning users move on, its history stays."""
    cfg = get_config(config)
    store = open_store(cfg, database_url)
    try:
        exp = cfg.experiment.id
        status = store.arm_statuses(exp).get(arm_id)
        if status is None:
            fail(f"no arm {arm_id!r} in experiment {exp!r}", 2)
        if status == "retired":
            console.print(f"{arm_id} is already retired")
            return
        if status == "champion":
            fail(f"{arm_id!r} is the champion: promote another arm first", 2)
        store.record_arm_event(exp, arm_id, "retired", actor=actor, evidence={"source": "cli"})
        store.audit(actor, "arm_retired", f"{exp}/{arm_id}", {})
    finally:
        store.dispose()
    console.print(f"[bold]{arm_id}[/bold] retired")
