"""``flywheel demo``: a separate database with a simulated experiment, for a living first look.

Weeks of simulated sessions go through the real assignment, store and optimizer
(:mod:`optimizer.simulator`): one arm converts best but users dislike it, so a
guardrail pauses it; a winner emerges among the rest. Every assignment is
marked ``simulated``, the experiment id starts with ``sim-``, and the demo
refuses to write into a store that holds real (non-simulated) sessions.

Next to the database it writes ``demo.toml``, a configuration pointing at it,
so ``flywheel serve --config …/demo.toml`` shows the dashboard and
``flywheel report --config …/demo.toml`` the numbers.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import typer

from optimizer import settings
from optimizer.cli.common import JsonOption, console, err_console, fail, print_json

#: The truth of the demo: ``concise`` is the champion; ``proactive-upsell`` converts most
#: but earns many thumbs down (the guardrail fires); ``concise+fixed`` is the real winner
#: (``empathetic`` comes close among pro-plan users).
DEMO_SCENARIO: dict[str, Any] = {
    "name": "demo",
    "description": "Five prompt arms, a harmful upsell variant, a winner emerging.",
    "sessions_per_day": 900,
    "refit_every_hours": 24,
    "returning_share": 0.2,
    "turns_mean": 2.5,
    "champion": "concise",
    "segment_by": "plan",
    "delay": {"distribution": "exponential", "mean_days": 1.0, "max_days": 5},
    "kpi": {
        "terms": [
            {"name": "conversion", "source": "outcome:conversion", "weight": 1.0, "window_days": 5},
            {"name": "thumbs_up", "source": "feedback:up_rate", "weight": 0.2, "window_days": 1},
            {
                "name": "support_minutes",
                "source": "outcome:support_minutes",
                "weight": -0.01,
                "cap": 60,
                "window_days": 1,
                "aggregate": "sum",
            },
        ],
        "guardrails": [
            {"metric": "thumbs_down_rate", "max_delta": 0.05},
            {"metric": "error_rate", "max_delta": 0.05},
            {"metric": "latency_p95_ms", "max_ratio": 1.5},
        ],
    },
    "policy": {"burn_in": 150, "challenger_min_sessions": 300, "samples": 2000},
    "arms": [
        {"id": "concise", "conversion": 0.10, "thumbs_up": 0.72, "support_minutes": 6.0},
        {"id": "empathetic", "conversion": 0.10, "thumbs_up": 0.80, "support_minutes": 5.0},
        {"id": "proactive-upsell", "conversion": 0.16, "thumbs_up": 0.45, "support_minutes": 6.0},
        {"id": "concise+fixed", "conversion": 0.14, "thumbs_up": 0.78, "support_minutes": 4.0},
        {
            "id": "concise+retrieved",
            "conversion": 0.12,
            "thumbs_up": 0.75,
            "support_minutes": 4.5,
            "latency_ms": 950.0,
        },
    ],
    "segments": [
        {"value": "free", "share": 0.7},
        {
            "value": "pro",
            "share": 0.3,
            "arms": {"empathetic": {"conversion": 0.13, "thumbs_up": 0.85}},
        },
    ],
}
#: How the demo arms map to the prompt files in ``prompts/`` (as in the shipped flywheel.toml),
#: so a server started on the demo configuration can also chat.
DEMO_ARMS: dict[str, dict[str, Any]] = {
    "concise": {"prompt": "concise"},
    "empathetic": {"prompt": "empathetic"},
    "proactive-upsell": {"prompt": "proactive-upsell"},
    "concise+fixed": {
        "prompt": "concise",
        "fewshot": "fixed",
        "examples": ["password-reset", "trial", "export"],
    },
    "concise+retrieved": {"prompt": "concise", "fewshot": "retrieved", "k": 3},
}


def demo(
    database_url: str | None = typer.Option(
        None,
        "--database-url",
        help="Where to put the demo (default: $FLYWHEEL_HOME/demo.db). Never a real store.",
    ),
    days: int = typer.Option(21, "--days", min=2, max=365, help="Simulated days of traffic."),
    seed: int = typer.Option(1, "--seed", min=0, help="Seed of the simulation."),
    force: bool = typer.Option(False, "--force", help="Rebuild a demo SQLite file that exists."),
    as_json: bool = JsonOption,
) -> None:
    """Fill a separate demo database with a simulated experiment and say how to open it."""
    from optimizer.errors import FlywheelError

    home = settings.home_dir()
    url = database_url or f"sqlite:///{home / 'demo.db'}"
    try:
        result, config_path = build_demo(
            url, days=days, seed=seed, force=force, home=home, progress=not as_json
        )
    except FlywheelError as exc:
        fail(str(exc), 2)
    if as_json:
        print_json({**result.to_dict(), "config": str(config_path)})
        return
    console.print(
        f"Demo experiment: [bold]{result.sessions:,}[/bold] simulated sessions"
        f" over {result.days:g} days in {url}\n"
        f"  paused by a guardrail: {', '.join(result.paused_arms) or 'none'}\n"
        f"  stop rule winner: {result.winner or 'not yet'}\n"
        f"See it:  flywheel report --config {config_path}\n"
        f"         flywheel serve --config {config_path}   → /operator (operator / operator)"
    )


#: What simulated users say besides the seed examples: personal data the scrubber must remove
#: before a dataset leaves (``flywheel export``, ``flywheel finetune``).
DEMO_EXCHANGES = (
    (
        "Hi, I'm Maria Lopez (maria.lopez@example.com). How do I reset my password?",
        "Hi Maria Lopez! Use 'Forgot password' on the login page; the link goes to "
        "maria.lopez@example.com.",
    ),
    (
        "Call me on +44 7911 123456, can I get a refund for last month?",
        "Refunds are possible within 30 days: email support@lumen.example with the invoice.",
    ),
)


#: What a simulated user thumbed down was told instead of the good answer: the vague,
#: deflecting replies users vote down. The rejected side of the demo's DPO pairs.
DEMO_POOR_REPLIES = (
    "I'm not sure about that. Please check the help center.",
    "You'll have to contact support for that.",
    "That depends on your account. Anything else?",
)


def _fill_texts(store: Any, experiment_id: str, prompts: Any) -> None:
    """Give the simulated turns words (the simulator draws outcomes and votes, not text).

    Each turn gets one of the seed examples or :data:`DEMO_EXCHANGES`, chosen by
    its position, so exports and fine-tuning sets built from the demo have rows.
    A turn the simulated user thumbed down keeps the question but gets one of
    :data:`DEMO_POOR_REPLIES`, so the text agrees with the vote (and a DPO set
    built from the demo has pairs whose two replies differ).
    """
    import sqlalchemy as sa

    from optimizer.store import schema

    exchanges = [(e.user, e.assistant) for _, e in sorted(prompts.examples.items())]
    exchanges += list(DEMO_EXCHANGES)
    t, f = schema.turns, schema.feedback
    with store.engine.begin() as conn:
        ids = conn.execute(
            sa.select(t.c.id).where(t.c.experiment_id == experiment_id).order_by(t.c.id)
        ).scalars()
        down = set(
            conn.execute(
                sa.select(f.c.turn_id)
                .join(t, t.c.id == f.c.turn_id)
                .where(t.c.experiment_id == experiment_id, f.c.value == 0)
            ).scalars()
        )
        rows = [
            {
                "tid": tid,
                "u": exchanges[i % len(exchanges)][0],
                "r": (
                    DEMO_POOR_REPLIES[i % len(DEMO_POOR_REPLIES)]
                    if tid in down
                    else exchanges[i % len(exchanges)][1]
                ),
            }
            for i, tid in enumerate(ids)
        ]
        if rows:
            conn.execute(
                t.update()
                .where(t.c.id == sa.bindparam("tid"))
                .values(user_message=sa.bindparam("u"), reply=sa.bindparam("r")),
                rows,
            )


def build_demo(
    url: str,
    *,
    days: int = 21,
    seed: int = 1,
    force: bool = False,
    home: Path | None = None,
    progress: bool = False,
) -> tuple[Any, Path]:
    """Simulate the demo into ``url`` and write ``demo.toml`` beside it; (result, config path).

    Raises :class:`~optimizer.errors.ConfigError` when the store holds real
    sessions, or already holds this demo (unless ``force`` and it is a SQLite file).
    """
    import tomli_w

    from optimizer.config import ArmConfig
    from optimizer.errors import ConfigError
    from optimizer.prompt_library import arm_spec, load_prompts
    from optimizer.scenario import parse_scenario
    from optimizer.simulator import scenario_config, simulate

    scenario = parse_scenario(
        {**DEMO_SCENARIO, "sessions": int(DEMO_SCENARIO["sessions_per_day"] * days)},
        source="<demo>",
    )
    experiment_id = f"sim-{scenario.name}-thompson-{seed}"
    _check_target(url, experiment_id, force=force)
    config = scenario_config(scenario, "thompson", experiment_id=experiment_id)
    arms = tuple(
        ArmConfig.model_validate({**a.model_dump(), **DEMO_ARMS.get(a.id, {})})
        for a in config.experiment.arms
    )
    # The simulated arms serve the shipped prompt files, so a server started on the demo
    # finds the same arm versions (not edited prompts to version anew).
    prompts = load_prompts(config.prompts_dir)
    specs = {arm.id: arm_spec(arm, prompts) for arm in arms}
    if progress:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(
            TextColumn("[bold]demo"),
            BarColumn(),
            TextColumn("{task.completed:,}/{task.total:,} sessions"),
            TimeElapsedColumn(),
            console=err_console,
            transient=True,
        ) as bar:
            task = bar.add_task("demo", total=scenario.sessions)
            result = simulate(
                scenario,
                policy="thompson",
                seed=seed,
                database_url=url,
                progress=lambda done, _total: bar.update(task, completed=done),
                specs=specs,
            )
    else:
        result = simulate(scenario, policy="thompson", seed=seed, database_url=url, specs=specs)
    config = config.model_copy(
        update={
            "database_url": url,
            "experiment": config.experiment.model_copy(update={"arms": arms}),
            "source": "demo.toml",
        }
    )
    # One more fit once every attribution window has closed, so the dashboard opens on
    # the full picture (what the server's next refit would do).
    from optimizer.refit import run_optimizer
    from optimizer.store import Store

    longest = max(t.window_days for t in config.kpi.terms)
    settled = scenario.start + timedelta(days=scenario.days + longest + 1)
    store = Store(url)
    try:
        _fill_texts(store, experiment_id, prompts)
        run_optimizer(store, config, now=settled, random_state=seed)
    finally:
        store.dispose()
    path = (home or settings.home_dir()) / "demo.toml"
    data = config.model_dump(mode="json", exclude_none=True, exclude={"source"})
    header = "# Written by `flywheel demo`: a simulated experiment, not real traffic.\n"
    try:
        path.write_text(header + tomli_w.dumps(data), encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None
    return result, path


def _check_target(url: str, experiment_id: str, *, force: bool) -> None:
    """Refuse real stores; rebuild (``force``) or refuse a store that has this demo already."""
    import sqlalchemy as sa

    from optimizer.errors import ConfigError
    from optimizer.store import Store, schema

    store = Store(url)
    try:
        store.upgrade()
        a = schema.assignments
        with store.engine.connect() as conn:
            real = conn.execute(sa.select(sa.func.count()).where(a.c.simulated.is_(False))).scalar()
            mine = conn.execute(
                sa.select(sa.func.count()).where(a.c.experiment_id == experiment_id)
            ).scalar()
    finally:
        store.dispose()
    if real:
        raise ConfigError(
            f"{url} holds {real} real (non-simulated) sessions: the demo never writes into a real "
            "store. Give it its own --database-url."
        )
    if not mine:
        return
    database = sa.engine.make_url(url).database if url.startswith("sqlite") else None
    if not force or not database or database == ":memory:":
        raise ConfigError(
            f"{url} already holds the demo (experiment {experiment_id!r}); "
            + (
                "pass --force to rebuild it"
                if database
                else "use a fresh database or another --seed"
            )
        )
    for suffix in ("", "-wal", "-shm"):
        Path(database + suffix).unlink(missing_ok=True)
