"""Simulator: a fine-tuned arm with a better hidden truth arrives mid-run and takes the traffic;
the run reports what each arm spent, and the KPI can count spend."""

from __future__ import annotations

import pytest

from optimizer.scenario import parse_scenario
from optimizer.simulator import simulate


def _scenario(sessions: int = 8000) -> dict:
    return {
        "name": "finetune_arrives",
        "sessions": sessions,
        "sessions_per_day": 1000,
        "refit_every_hours": 12,
        "champion": "local",
        "turns_mean": 3.0,
        "delay": {"distribution": "none"},
        "policy": {"burn_in": 50, "challenger_min_sessions": 100},
        "kpi": {
            "terms": [
                {
                    "name": "conversion",
                    "source": "outcome:conversion",
                    "weight": 1.0,
                    "window_days": 1,
                },
                {"name": "spend", "source": "cost:usd", "weight": -5.0, "window_days": 0},
            ],
            "guardrails": [],
        },
        "arms": [
            {"id": "local", "conversion": 0.03},
            {"id": "hosted", "conversion": 0.036, "cost_per_turn": 0.002},
            {"id": "finetuned", "conversion": 0.07, "cost_per_turn": 0.0004, "arrives_day": 3},
        ],
    }


def test_expected_kpi_counts_spend() -> None:
    sc = parse_scenario(_scenario())
    kpi = dict(zip(sc.arm_ids, sc.expected_rewards()[0], strict=True))
    assert kpi["local"] == pytest.approx(0.03 * 1.0)  # no delay: every conversion in window
    assert kpi["hosted"] == pytest.approx(0.036 - 5 * 0.002 * 3)
    assert kpi["finetuned"] == pytest.approx(0.07 - 5 * 0.0004 * 3)


def test_a_fine_tuned_arm_arriving_mid_run_takes_the_traffic() -> None:
    sc = parse_scenario(_scenario())
    result = simulate(sc, policy="thompson", seed=0)
    (arrival,) = result.arrivals
    assert arrival["arm"] == "finetuned"
    final = result.final_allocation["*"]
    assert final["finetuned"] > 0.6, final
    assert final["finetuned"] > final["local"] > 0 and final["hosted"] < 0.1
    # it earned its traffic after arriving: most sessions of the last days are its
    assert result.sessions_per_arm["finetuned"] > result.sessions_per_arm["hosted"]
    # cost figures: what each paid arm spent (the free local model spends nothing)
    costs = result.cost_per_arm
    assert "local" not in costs
    assert costs["hosted"]["usd_per_session"] == pytest.approx(0.006, rel=0.1)
    assert costs["finetuned"]["usd_per_session"] == pytest.approx(0.0012, rel=0.1)
    assert costs["hosted"]["usd"] == pytest.approx(
        costs["hosted"]["usd_per_session"] * result.sessions_per_arm["hosted"], rel=1e-3
    )
