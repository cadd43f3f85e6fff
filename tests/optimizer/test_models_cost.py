"""Models as arms, cost in the KPI: identity, allow-list, prices, cost term, guardrail, report."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from optimizer import kpi
from optimizer.config import (
    ArmConfig,
    Config,
    ExperimentConfig,
    GuardrailConfig,
    KPIConfig,
    KPITermConfig,
    ModelPriceConfig,
    load_config,
)
from optimizer.errors import ConfigError
from optimizer.guardrails import check_guardrails
from optimizer.models import check_model_params, resolve
from optimizer.prompt_library import arm_spec, load_prompts
from optimizer.report import experiment_report
from optimizer.store import ArmSpec, AssignmentRecord, Store, TurnRecord
from optimizer.store.versions import arm_content_hash

ROOT = Path(__file__).resolve().parents[2]
START = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
LOCAL = "local/gemma3-270m"
BASE = "http://127.0.0.1:8999/v1"


def _config(tmp_path: Path, body: str) -> Config:
    path = tmp_path / "flywheel.toml"
    path.write_text(body, encoding="utf-8")
    return load_config(path, environ=False)


def _cfg(*, terms=None, guardrails=(), prices=None, arms=None) -> Config:
    base = load_config("/nonexistent.toml", environ=False)
    arms = arms or (
        ArmConfig(id="local", prompt="concise"),
        ArmConfig(id="gpt", prompt="concise", model="openai/gpt-4o-mini", temperature=0.2),
    )
    return base.model_copy(
        update={
            "prompts_dir": str(ROOT / "prompts"),
            "experiment": ExperimentConfig(id="exp", salt="exp", champion="local", arms=arms),
            "kpi": KPIConfig(
                terms=terms
                or (
                    KPITermConfig(name="conversion", source="outcome:conversion", weight=1.0),
                    KPITermConfig(name="spend", source="cost:usd", weight=-1.0, window_days=0),
                ),
                guardrails=guardrails,
            ),
            "model": base.model.model_copy(update={"prices": prices or {}}),
        }
    )


def _session(
    store: Store,
    sid: str,
    arm: str,
    model: str,
    *,
    cost: float | None = None,
    tokens: tuple[int, int] = (1000, 200),
    turns: int = 1,
    at: datetime = START,
    fallback: bool = False,
) -> None:
    store.record_assignment(AssignmentRecord(sid, f"u-{sid}", "exp", arm, 0.5, None, "*", {}, at))
    for i in range(turns):
        store.record_turn(
            TurnRecord(
                id=f"{sid}-{i}",
                session_id=sid,
                user_id=f"u-{sid}",
                experiment_id="exp",
                arm_id=arm,
                prompt_id="concise",
                prompt_hash="h",
                model=model,
                user_message="q",
                reply="a",
                prompt_tokens=tokens[0],
                completion_tokens=tokens[1],
                cost=cost,
                created_at=at + timedelta(minutes=i + 1),
                fallback=fallback,
            )
        )


# -- arms with a model ----------------------------------------------------------------------


def test_an_arm_without_a_model_keeps_its_identity() -> None:
    prompts = load_prompts(ROOT / "prompts")
    plain = arm_spec(ArmConfig(id="a", prompt="concise"), prompts)
    assert plain.model is None and dict(plain.model_params) == {}
    old = arm_content_hash(plain.prompt_hash, plain.fewshot, plain.fewshot_config)
    new = arm_content_hash(
        plain.prompt_hash, plain.fewshot, plain.fewshot_config, plain.model, plain.model_params
    )
    assert old == new


def test_model_and_its_parameters_are_part_of_the_arm(sqlite_store: Store) -> None:
    prompts = load_prompts(ROOT / "prompts")
    arm = ArmConfig(id="a", prompt="concise")
    sqlite_store.sync_experiment("exp", "s", [arm_spec(arm, prompts)])
    hot = ArmConfig(id="a", prompt="concise", model="openai/gpt-4o-mini", temperature=1.0)
    new_id, what = sqlite_store.add_arm("exp", arm_spec(hot, prompts), actor="op")
    assert (new_id, what) == ("a@v2", "version")
    cold = hot.model_copy(update={"temperature": 0.1})
    assert sqlite_store.add_arm("exp", arm_spec(cold, prompts), actor="op") == ("a@v3", "version")
    rows = {r.id: r for r in sqlite_store.arms("exp")}
    assert rows["a"].model is None and rows["a@v2"].model_params == {"temperature": 1.0}
    # the same content again changes nothing
    assert sqlite_store.add_arm("exp", arm_spec(hot, prompts), actor="op")[1] == "known"


def test_api_base_must_be_on_the_allow_list(tmp_path: Path) -> None:
    arm = (
        '[experiment]\nid = "e"\nchampion = "a"\n'
        '[[experiment.arms]]\nid = "a"\nprompt = "concise"\n'
        f'model = "openai/my-model"\napi_base = "{BASE}"\n'
    )
    with pytest.raises(ConfigError, match=r"experiment.arms.0.api_base .* not in model.allowed"):
        _config(tmp_path, arm)
    ok = _config(tmp_path, f'[model]\nallowed_api_bases = ["{BASE}/"]\n' + arm)
    assert ok.experiment.arms[0].api_base == BASE
    with pytest.raises(ConfigError, match="need its 'model'"):
        _config(tmp_path, '[[experiment.arms]]\nid = "a"\nprompt = "p"\ntemperature = 0.3\n')
    with pytest.raises(ValueError, match=r"not in model\.allowed_api_bases"):
        check_model_params("openai/x", {"api_base": "http://10.0.0.1/v1"}, (BASE,))
    # served arms are checked again: a store row with a base no longer allowed is refused
    cfg = load_config("/nonexistent.toml", environ=False)
    with pytest.raises(ConfigError, match="allowed_api_bases"):
        resolve("openai/x", {"api_base": BASE}, cfg.model)
    served = resolve("openai/x", {"temperature": 0.1}, cfg.model)
    assert (served.name, served.temperature, served.max_tokens, served.default) == (
        "openai/x",
        0.1,
        cfg.model.max_tokens,
        False,
    )


def test_arms_add_cli_takes_a_model_and_refuses_a_foreign_api_base(tmp_path: Path) -> None:
    from chatbot.cli.app import app

    db = f"sqlite:///{tmp_path / 'f.db'}"
    toml = tmp_path / "flywheel.toml"
    toml.write_text(
        f'prompts_dir = "{ROOT / "prompts"}"\n[model]\nallowed_api_bases = ["{BASE}"]\n'
        '[experiment]\nid = "exp"\nchampion = "concise"\n'
        '[[experiment.arms]]\nid = "concise"\nprompt = "concise"\n',
        encoding="utf-8",
    )
    prompt = tmp_path / "p.md"
    prompt.write_text("Be brief.", encoding="utf-8")
    store = Store(db)
    store.upgrade()
    store.sync_experiment(
        "exp",
        "exp",
        [arm_spec(ArmConfig(id="concise", prompt="concise"), load_prompts(ROOT / "prompts"))],
    )
    store.dispose()
    runner = CliRunner()
    common = ["--config", str(toml), "--database-url", db, "--prompt-file", str(prompt)]
    bad = runner.invoke(
        app, ["arms", "add", "big", *common, "--model", "openai/x", "--api-base", "http://x.io/v1"]
    )
    assert bad.exit_code == 2 and "allowed_api_bases" in bad.output
    good = runner.invoke(
        app,
        [
            "arms",
            "add",
            "big",
            *common,
            "--model",
            "openai/x",
            "--api-base",
            BASE,
            "--temperature",
            "0.3",
            "--no-refit",
            "--json",
        ],
    )
    assert good.exit_code == 0, good.output
    listed = runner.invoke(
        app, ["arms", "list", "--config", str(toml), "--database-url", db, "--json"]
    )
    arms = {a["id"]: a for a in json.loads(listed.output)["arms"]}
    assert arms["big"]["model"] == "openai/x"
    assert arms["big"]["model_params"] == {"temperature": 0.3, "api_base": BASE}
    assert arms["concise"]["model"] == LOCAL  # the default, shown


# -- cost ------------------------------------------------------------------------------------


def test_session_cost_uses_configured_prices_over_the_recorded_cost(store: Store) -> None:
    prices = {LOCAL: ModelPriceConfig(input_usd_per_mtok=0.5, output_usd_per_mtok=2.0)}
    cfg = _cfg(prices=prices)
    _session(store, "s1", "local", LOCAL, cost=0.0, turns=2)  # litellm says 0 for local
    _session(store, "s2", "gpt", "openai/gpt-4o-mini", cost=0.004, turns=3)
    _session(store, "s3", "gpt", "openai/gpt-4o-mini", cost=None)  # unknown: 0
    # a fallback turn stays the arm's; its model's price applies
    _session(store, "s4", "gpt", LOCAL, cost=0.0, fallback=True)
    frame = kpi.session_frame(store, cfg, now=START + timedelta(days=10)).set_index("session_id")
    per_local_turn = (1000 * 0.5 + 200 * 2.0) / 1e6
    assert frame.at["s1", "cost_usd"] == pytest.approx(2 * per_local_turn)
    assert frame.at["s2", "cost_usd"] == pytest.approx(0.012)
    assert frame.at["s3", "cost_usd"] == 0.0
    assert frame.at["s4", "cost_usd"] == pytest.approx(per_local_turn)
    assert frame.at["s4", "arm_id"] == "gpt"  # not another arm
    assert frame.at["s2", "spend"] == pytest.approx(0.012)  # the cost:usd term, summed
    # the reward is conversion (0) minus spend
    assert frame.at["s2", "reward"] == pytest.approx(-0.012, rel=1e-9, abs=0)
    turn = store.get_turn("s4-0")
    assert turn is not None and turn.fallback is True


def test_without_a_cost_term_the_frame_reads_no_costs(sqlite_store: Store) -> None:
    cfg = _cfg(terms=(KPITermConfig(name="conversion", source="outcome:conversion", weight=1.0),))
    _session(sqlite_store, "s1", "local", LOCAL, cost=0.5)
    assert "cost_usd" not in kpi.session_frame(sqlite_store, cfg).columns
    assert kpi.session_frame(sqlite_store, cfg, with_cost=True)["cost_usd"].tolist() == [0.5]


def _cost_frame(champion_cost: float, arm_cost: float, n: int = 400, seed: int = 0):
    import pandas as pd

    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "arm_id": ["champ"] * n + ["new"] * n,
            "cost_usd": np.concatenate(
                [rng.gamma(4.0, champion_cost / 4, n), rng.gamma(4.0, arm_cost / 4, n)]
            ),
        }
    )


def test_cost_guardrail_forbids_a_variant_that_doubles_the_bill() -> None:
    rail = [GuardrailConfig(metric="cost_per_session", max_ratio=1.5)]
    doubled = check_guardrails(
        _cost_frame(0.01, 0.02), rail, champion="champ", arms=["new"], pause_probability=0.95
    )[0]
    assert doubled.breached and (doubled.lower_bound or 0) > 1.5
    assert doubled.arm_value == pytest.approx(0.02, rel=0.1)
    same = check_guardrails(
        _cost_frame(0.01, 0.011), rail, champion="champ", arms=["new"], pause_probability=0.95
    )[0]
    assert not same.breached and same.probability < 0.5


def test_cost_guardrail_against_a_free_champion_needs_max_delta() -> None:
    frame = _cost_frame(0.0, 0.02)
    frame.loc[frame["arm_id"] == "champ", "cost_usd"] = 0.0
    ratio = check_guardrails(
        frame,
        [GuardrailConfig(metric="cost_per_session", max_ratio=2)],
        champion="champ",
        arms=["new"],
        pause_probability=0.95,
    )[0]
    assert not ratio.breached and ratio.lower_bound is None  # undefined, never a pause
    delta = check_guardrails(
        frame,
        [GuardrailConfig(metric="cost_per_session", max_delta=0.01)],
        champion="champ",
        arms=["new"],
        pause_probability=0.95,
    )[0]
    assert delta.breached


def test_report_shows_model_cost_and_kpi_per_dollar(sqlite_store: Store, tmp_path: Path) -> None:
    from optimizer.cli.report import _print
    from optimizer.report_html import render_standalone

    cfg = _cfg(
        terms=(
            KPITermConfig(
                name="conversion", source="outcome:conversion", weight=1.0, window_days=1
            ),
        )
    )
    prompts = load_prompts(ROOT / "prompts")
    sqlite_store.sync_experiment("exp", "exp", [arm_spec(a, prompts) for a in cfg.experiment.arms])
    from optimizer.store import OutcomeRecord

    for i in range(10):
        _session(sqlite_store, f"l{i}", "local", LOCAL, cost=0.0)
        _session(sqlite_store, f"g{i}", "gpt", "openai/gpt-4o-mini", cost=0.002)
        if i < 5:
            sqlite_store.record_outcome(
                OutcomeRecord(
                    f"k{i}",
                    "conversion",
                    1.0,
                    session_id=f"g{i}",
                    occurred_at=START + timedelta(minutes=5),
                )
            )
    rep = experiment_report(sqlite_store, cfg, now=START + timedelta(days=2))
    arms = {a["id"]: a for a in rep["arms"]}
    assert arms["gpt"]["model"] == "openai/gpt-4o-mini" and not arms["gpt"]["model_default"]
    assert arms["local"]["model"] == cfg.model.name and arms["local"]["model_default"]
    assert arms["gpt"]["cost_per_session"] == pytest.approx(0.002)
    assert arms["gpt"]["kpi_per_dollar"] == pytest.approx(0.5 / 0.002)  # observed mean / $
    assert arms["local"]["kpi_per_dollar"] is None  # free: no ratio
    html = render_standalone(rep)
    assert 'data-col="kpi_per_dollar">250.0<' in html
    assert "model openai/gpt-4o-mini" in html
    from rich.console import Console

    import optimizer.cli.common as common

    old = common.console
    try:
        common.console = Console(record=True, width=200)
        import optimizer.cli.report as cli_report

        cli_report.console = common.console
        _print(rep)
        text = common.console.export_text()
    finally:
        common.console = old
        cli_report.console = old
    assert "KPI per $" in text and "250.0" in text and "$0.002" in text


def test_migration_0006_on_both_backends(store: Store) -> None:
    """The store fixture upgrades to head: the new columns and tables take writes."""
    spec = ArmSpec(
        "ft",
        "concise",
        "h",
        model="openai/ft:x",
        model_params={"temperature": 0.1},
        manifest={"sessions": 3},
        origin="finetune",
    )
    store.sync_experiment("exp", "exp", [ArmSpec("a", "concise", "h")])
    store.add_arm("exp", spec, actor="finetune")
    row = {r.id: r for r in store.arms("exp")}["ft"]
    assert row.manifest == {"sessions": 3} and row.model_params == {"temperature": 0.1}
    store.set_opt_out("u1", actor="u1")
    _session(store, "s1", "a", LOCAL)
    store.record_assignment(AssignmentRecord("s2", "u2", "exp", "a", 0.5, None, "*", {}, START))
    store.delete_conversation("s2", user_id="u2", actor="u2")
    _session(store, "s3", "a", LOCAL)
    store.record_assignment(AssignmentRecord("s9", "u1", "exp", "a", 0.5, None, "*", {}, START))
    assert store.excluded_sessions("exp") == {"s2", "s9"}
    store.set_opt_out("u1", False, actor="u1")  # opting back in
    assert store.excluded_sessions("exp") == {"s2"}


def test_privacy_cli_opts_out_and_deletes(tmp_path: Path) -> None:
    from chatbot.cli.app import app

    db = f"sqlite:///{tmp_path / 'f.db'}"
    store = Store(db)
    store.upgrade()
    store.record_assignment(AssignmentRecord("s1", "ann", "exp", "a", 0.5, None, "*", {}, START))
    store.record_assignment(AssignmentRecord("s2", "bob", "exp", "a", 0.5, None, "*", {}, START))
    runner = CliRunner()
    common = ["--config", "/nonexistent.toml", "--database-url", db]
    assert runner.invoke(app, ["privacy", "opt-out", "ann", *common]).exit_code == 0
    done = runner.invoke(app, ["privacy", "delete-conversation", "s2", "--user", "bob", *common])
    assert done.exit_code == 0, done.output
    assert store.excluded_sessions("exp") == {"s1", "s2"}
    assert runner.invoke(app, ["privacy", "opt-out", "ann", "--undo", *common]).exit_code == 0
    assert store.excluded_sessions("exp") == {"s2"}
    store.dispose()
