"""The simulator drives the real assigner, store and optimizer in simulated time.

Scenarios here are small and decisive (large gaps, short windows) so each run
takes a second or two; the realistic ones live in bench/scenarios/.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from chatbot.cli import app
from optimizer import kpi
from optimizer.errors import ConfigError
from optimizer.scenario import Scenario, parse_scenario
from optimizer.simulator import scenario_config, simulate
from optimizer.store import Store, schema

ROOT = Path(__file__).resolve().parents[2]
_TIMING = {"elapsed_s", "sessions_per_s", "timings_s"}


def _scenario(**overrides: Any) -> Scenario:
    """Three arms, 0.5-day window, fast delays: Thompson can tell them apart in a day."""
    data: dict[str, Any] = {
        "name": "easy",
        "sessions": 2400,
        "sessions_per_day": 800,
        "refit_every_hours": 6,
        "turns_mean": 1.0,
        "delay": {"distribution": "exponential", "mean_days": 0.05},
        "kpi": {
            "terms": [
                {
                    "name": "conversion",
                    "source": "outcome:conversion",
                    "weight": 1.0,
                    "window_days": 0.25,
                }
            ],
            "guardrails": [],
        },
        "policy": {"burn_in": 30, "challenger_min_sessions": 0, "samples": 1000},
        "arms": [
            {"id": "a", "conversion": 0.05},
            {"id": "b", "conversion": 0.10},
            {"id": "c", "conversion": 0.30},
        ],
    }
    data.update(overrides)
    return parse_scenario(data)


def _without_timing(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in _TIMING}


def test_json_fields_from_the_cli(tmp_path: Path) -> None:
    path = tmp_path / "easy.toml"
    path.write_text(
        """
sessions = 600
sessions_per_day = 600
refit_every_hours = 8
turns_mean = 1.0
[policy]
samples = 500
[[arms]]
id = "a"
conversion = 0.02
[[arms]]
id = "b"
conversion = 0.04
"""
    )
    result = CliRunner().invoke(
        app, ["simulate", "--scenario", str(path), "--policy", "uniform", "--seed", "3", "--json"]
    )
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    for key in (
        "policy",
        "sessions",
        "expected_kpi_total",
        "oracle_kpi_total",
        "regret",
        "sessions_per_arm",
        "final_allocation",
        "paused_arms",
        "winner",
    ):
        assert key in out, key
    assert out["policy"] == "uniform" and out["sessions"] == 600 and out["refits"] == 3
    assert sum(out["sessions_per_arm"].values()) == 600
    assert out["regret"] == pytest.approx(out["oracle_kpi_total"] - out["expected_kpi_total"])
    # uniform over a (0.02) and b (0.04): the regret is about half the sessions × 0.02
    assert 0.3 * 600 * 0.02 < out["regret"] < 0.7 * 600 * 0.02
    assert out["final_allocation"] == {"*": {"a": 0.5, "b": 0.5}}


def test_cli_prints_a_table_and_rejects_bad_input(tmp_path: Path) -> None:
    scenario = ROOT / "bench" / "scenarios" / "guardrail_breach.toml"
    runner = CliRunner()
    bad_policy = runner.invoke(app, ["simulate", "--scenario", str(scenario), "--policy", "greedy"])
    assert bad_policy.exit_code == 2 and "--policy must be one of" in bad_policy.output
    bad = tmp_path / "bad.toml"
    bad.write_text(
        'sessions = 10\nsessions_per_day = 10\nrefit_every_hours = 1\n[[arms]]\nid = "a"\n'
    )
    broken = runner.invoke(app, ["simulate", "--scenario", str(bad), "--policy", "oracle"])
    assert broken.exit_code == 2 and str(bad) in broken.output and "arms" in broken.output
    small = tmp_path / "small.toml"
    small.write_text(
        "sessions = 300\nsessions_per_day = 300\nrefit_every_hours = 24\n"
        '[[arms]]\nid = "a"\nconversion = 0.02\n[[arms]]\nid = "b"\nconversion = 0.05\n'
    )
    table = runner.invoke(app, ["simulate", "--scenario", str(small), "--policy", "oracle"])
    assert table.exit_code == 0, table.output
    assert "regret 0.00" in table.output and "winner" in table.output


def test_same_seed_same_result_other_seed_other_result() -> None:
    sc = _scenario(sessions=1200)
    first = simulate(sc, policy="thompson", seed=7).to_dict()
    again = simulate(sc, policy="thompson", seed=7).to_dict()
    other = simulate(sc, policy="thompson", seed=8).to_dict()
    assert _without_timing(first) == _without_timing(again)
    assert first["sessions_per_arm"] != other["sessions_per_arm"]


def test_bulk_writes_match_the_store_one_event_at_a_time() -> None:
    sc = _scenario(sessions=500, refit_every_hours=8)
    bulk = simulate(sc, policy="thompson", seed=2, bulk=True).to_dict()
    single = simulate(sc, policy="thompson", seed=2, bulk=False).to_dict()
    assert _without_timing(bulk) == _without_timing(single)


def test_events_are_written_only_once_they_have_happened(tmp_path: Path) -> None:
    # Conversions up to 6 days after the chat (mean 2 days); a refit a day.
    sc = _scenario(
        sessions=3000,
        sessions_per_day=500,
        refit_every_hours=24,
        delay={"distribution": "exponential", "mean_days": 2.0},
        kpi={
            "terms": [
                {
                    "name": "conversion",
                    "source": "outcome:conversion",
                    "weight": 1,
                    "window_days": 6,
                }
            ],
            "guardrails": [],
        },
        arms=[{"id": "a", "conversion": 0.3, "rate": 0.5}, {"id": "b", "conversion": 0.3}],
    )
    url = f"sqlite:///{tmp_path / 'sim.db'}"
    store = Store(url)
    seen: list[tuple[int, int]] = []

    def check(done: int, total: int) -> None:
        now = sc.start + timedelta(hours=sc.refit_every_hours * (len(seen) + 1))
        with store.engine.connect() as conn:
            latest = [
                conn.execute(sa.select(sa.func.max(col))).scalar()
                for col in (
                    schema.outcomes.c.occurred_at,
                    schema.turns.c.created_at,
                    schema.feedback_events.c.created_at,
                    schema.assignments.c.assigned_at,
                )
            ]
            # conversions of the first day's sessions known so far
            first_day = conn.execute(
                sa.select(sa.func.count())
                .select_from(
                    schema.outcomes.join(
                        schema.assignments,
                        schema.outcomes.c.session_id == schema.assignments.c.session_id,
                    )
                )
                .where(schema.assignments.c.assigned_at < sc.start + timedelta(days=1))
            ).scalar()
        assert all(t is not None and t <= now.replace(tzinfo=None) for t in latest), (now, latest)
        seen.append((done, int(first_day)))

    result = simulate(sc, policy="uniform", seed=1, database_url=url, progress=check)
    store.dispose()
    first_day_conversions = [c for _, c in seen]
    assert [d for d, _ in seen][-1] == 3000 and len(seen) == result.refits == 6
    # The first day's conversions keep arriving on later days, never all at once.
    assert first_day_conversions[0] < first_day_conversions[2] < first_day_conversions[5]
    assert first_day_conversions[0] > 0
    drawn = 500 * 0.3
    assert first_day_conversions[5] == pytest.approx(drawn, rel=0.3)


def test_thompson_moves_traffic_to_the_best_arm_and_beats_uniform() -> None:
    sc = _scenario()
    thompson = simulate(sc, policy="thompson", seed=4)
    uniform = simulate(sc, policy="uniform", seed=4)
    assert thompson.sessions_per_arm["c"] > 0.6 * sc.sessions
    assert thompson.final_allocation["*"]["c"] > 0.8
    assert thompson.regret < 0.5 * uniform.regret
    assert uniform.regret > 0


def test_oracle_has_no_regret_in_every_segment() -> None:
    sc = _scenario(
        segment_by="plan",
        segments=[
            {"value": "free", "share": 0.6},
            {"value": "pro", "share": 0.4, "arms": {"a": {"conversion": 0.5}}},
        ],
    )
    result = simulate(sc, policy="oracle", seed=0)
    assert result.regret == 0.0
    assert result.oracle_arms == {"plan=free": "c", "plan=pro": "a"}
    assert result.sessions_per_segment_arm["plan=free"]["c"] > 0
    assert result.sessions_per_segment_arm["plan=free"]["a"] == 0
    assert result.sessions_per_segment_arm["plan=pro"]["c"] == 0
    assert result.refits == 0


def test_guardrail_breach_ends_with_the_harmful_arm_paused() -> None:
    # "c" converts best but its thumbs-down rate is 50 points above the champion's.
    sc = _scenario(
        sessions=1600,
        champion="a",
        kpi={
            "terms": [
                {
                    "name": "conversion",
                    "source": "outcome:conversion",
                    "weight": 1,
                    "window_days": 0.25,
                }
            ],
            "guardrails": [{"metric": "thumbs_down_rate", "max_delta": 0.05}],
        },
        arms=[
            {"id": "a", "conversion": 0.05, "rate": 0.5, "thumbs_up": 0.9},
            {"id": "b", "conversion": 0.10, "rate": 0.5, "thumbs_up": 0.9},
            {"id": "c", "conversion": 0.30, "rate": 0.5, "thumbs_up": 0.4},
        ],
    )
    assert sc.oracle_arms() == ["b"]
    for policy in ("thompson", "uniform"):
        result = simulate(sc, policy=policy, seed=5)
        assert result.paused_arms == ["c"], policy
        assert "c" not in result.final_allocation["*"]
        # The always-valid rule waits for evidence that holds over every refit: ~20% of
        # the traffic before the pause (the per-look rule paused sooner, and healthy arms too).
        assert result.sessions_per_arm["c"] < 0.25 * sc.sessions


def test_segments_get_their_own_allocation() -> None:
    sc = _scenario(
        sessions=3200,
        segment_by="plan",
        policy={"burn_in": 30, "challenger_min_sessions": 0, "samples": 1000},
        segments=[
            {"value": "free", "share": 0.5},
            {
                "value": "pro",
                "share": 0.5,
                "arms": {"a": {"conversion": 0.45}, "c": {"conversion": 0.05}},
            },
        ],
    )
    result = simulate(sc, policy="thompson", seed=6)
    free, pro = result.final_allocation["plan=free"], result.final_allocation["plan=pro"]
    assert max(free, key=free.__getitem__) == "c" and free["c"] > 0.6
    assert max(pro, key=pro.__getitem__) == "a" and pro["a"] > 0.6
    assert (
        result.sessions_per_segment_arm["plan=pro"]["a"]
        > result.sessions_per_segment_arm["plan=pro"]["c"]
    )
    uniform = simulate(sc, policy="uniform", seed=6)
    assert result.regret < uniform.regret


def test_true_expected_kpi_matches_what_the_optimizer_measures(tmp_path: Path) -> None:
    """The closed-form truth regret is measured against equals the KPI the optimizer computes."""
    sc = parse_scenario(
        {
            "name": "truth",
            "sessions": 9000,
            "sessions_per_day": 3000,
            "refit_every_hours": 24,
            "segment_by": "plan",
            "delay": {"distribution": "lognormal", "median_days": 0.3, "sigma": 1.0},
            "kpi": {
                "terms": [
                    {
                        "name": "conversion",
                        "source": "outcome:conversion",
                        "weight": 1.0,
                        "window_days": 1,
                    },
                    {"name": "up", "source": "feedback:up_rate", "weight": 0.5, "window_days": 1},
                    {
                        "name": "support",
                        "source": "outcome:support_minutes",
                        "weight": -0.02,
                        "cap": 10,
                        "window_days": 1,
                    },
                    {
                        "name": "revenue",
                        "source": "outcome:revenue",
                        "weight": 0.001,
                        "window_days": 0.5,
                    },
                ],
                "guardrails": [],
            },
            "arms": [
                {
                    "id": "a",
                    "conversion": 0.2,
                    "rate": 0.4,
                    "thumbs_up": 0.8,
                    "support_minutes": 6,
                    "revenue": 100,
                    "error_rate": 0.1,
                },
                {"id": "b", "conversion": 0.1, "rate": 0.2, "thumbs_up": 0.5, "support_minutes": 2},
            ],
            "segments": [
                {"value": "free", "share": 0.5},
                {"value": "pro", "share": 0.5, "arms": {"b": {"conversion": 0.4, "revenue": 300}}},
            ],
        }
    )
    url = f"sqlite:///{tmp_path / 'sim.db'}"
    simulate(sc, policy="uniform", seed=9, database_url=url)
    config = scenario_config(sc, "uniform", experiment_id="sim-truth-uniform-9")
    store = Store(url)
    frame = kpi.session_frame(store, config, now=sc.start + timedelta(days=3))
    store.dispose()
    frame = frame[frame["complete"]]
    expected = sc.expected_rewards()
    stats = frame.groupby(["segment", "arm_id"])["reward"].agg(["mean", "std", "size"])
    assert len(stats) == 4
    for (segment, arm), row in stats.iterrows():
        truth = expected[sc.segment_keys.index(segment), sc.arm_ids.index(arm)]
        z = (row["mean"] - truth) / (row["std"] / np.sqrt(row["size"]))
        assert abs(z) < 4, (segment, arm, row["mean"], truth)


def test_simulating_into_a_store_keeps_the_events(store_url: str) -> None:
    sc = _scenario(sessions=400, refit_every_hours=12)
    result = simulate(sc, policy="thompson", seed=3, database_url=store_url)
    assert result.database_url == store_url
    store = Store(store_url)
    try:
        with store.engine.connect() as conn:
            counts = {
                name: conn.execute(sa.select(sa.func.count()).select_from(table)).scalar()
                for name, table in (
                    ("assignments", schema.assignments),
                    ("turns", schema.turns),
                    ("votes", schema.feedback),
                    ("outcomes", schema.outcomes),
                )
            }
            simulated = conn.execute(
                sa.select(sa.func.count())
                .select_from(schema.assignments)
                .where(schema.assignments.c.simulated)
            ).scalar()
        assert counts == result.events_written
        assert simulated == 400
        assert store.latest_snapshot("sim-easy-thompson-3") is not None
    finally:
        store.dispose()
    with pytest.raises(ConfigError, match="already has 400 assignments"):
        simulate(sc, policy="thompson", seed=3, database_url=store_url)


def test_bad_arguments() -> None:
    sc = _scenario(sessions=10)
    with pytest.raises(ValueError, match="policy must be one of"):
        simulate(sc, policy="greedy")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seed must be a non-negative integer, got -1"):
        simulate(sc, seed=-1)


def test_a_newcomer_arrives_and_a_loser_retires_mid_run() -> None:
    sc = parse_scenario(
        {
            "name": "arrivals",
            "sessions": 6000,
            "sessions_per_day": 1000,
            "refit_every_hours": 12,
            "champion": "a",
            "delay": {"distribution": "none"},
            "policy": {"burn_in": 50, "challenger_min_sessions": 100},
            "arms": [
                {"id": "a", "conversion": 0.02},
                {"id": "b", "conversion": 0.08},
                {"id": "c", "conversion": 0.01, "retires_day": 4},
                {"id": "d", "conversion": 0.03, "arrives_day": 3},
            ],
        }
    )
    for policy in ("thompson", "oracle"):
        result = simulate(sc, policy=policy, seed=0)  # type: ignore[arg-type]
        assert result.arm_statuses["c"] == "retired" and result.arm_statuses["d"] == "active"
        (arrival,) = result.arrivals
        assert arrival["arm"] == "d" and arrival["incumbent"] == "b"
    assert result.regret == 0  # the oracle: b throughout, whatever comes and goes
    ts = simulate(sc, policy="thompson", seed=0)
    (arrival,) = ts.arrivals
    # the known winner keeps most of its traffic when d arrives, d gets its exploration share
    assert arrival["incumbent_share_after"] > 0.6 and 0 < arrival["newcomer_share_after"] <= 0.25
