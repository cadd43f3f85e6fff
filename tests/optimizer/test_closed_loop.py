"""The simulator's closed loop: proposals drawn, gated, started, promoted, retired, no hand."""

from __future__ import annotations

import pytest

from optimizer.errors import ConfigError
from optimizer.scenario import parse_scenario
from optimizer.simulator import simulate


def _scenario(**proposer: object) -> dict[str, object]:
    return {
        "name": "loop",
        "sessions": 6000,
        "sessions_per_day": 600,
        "refit_every_hours": 12,
        "champion": "base",
        "holdback": 0.1,
        "delay": {"distribution": "exponential", "mean_days": 0.5},
        "policy": {"auto_promote": True, "burn_in": 50, "retire_min_sessions": 200},
        "kpi": {
            "terms": [
                {
                    "name": "conversion",
                    "source": "outcome:conversion",
                    "weight": 1.0,
                    "window_days": 3,
                }
            ],
            "guardrails": [{"metric": "error_rate", "max_delta": 0.05}],
        },
        "proposer": {
            "every_days": 1,
            "candidates": 2,
            "max_live": 2,
            "min_new_negative": 5,
            "lift_mean": 0.3,
            "lift_sd": 0.1,
            "harmful_share": 0.5,
            "broken_share": 1.0,
            "broken_error_rate": 0.5,
            **proposer,
        },
        "arms": [{"id": "base", "conversion": 0.05, "rate": 0.4, "thumbs_up": 0.7}],
    }


def test_one_arm_needs_a_proposer() -> None:
    data = _scenario()
    del data["proposer"]
    with pytest.raises(ConfigError, match="at least 2 arms, or 1 with a \\[proposer\\] table"):
        parse_scenario(data)


def test_the_loop_runs_without_a_hand() -> None:
    result = simulate(parse_scenario(_scenario()), policy="thompson", seed=3)
    loop = result.closed_loop
    assert loop["proposals_made"] >= 4 and loop["proposals_made"] % 2 == 0
    assert loop["gated_out"] >= 1  # broken harmful proposals fail the replay gate
    assert loop["started"] >= 1
    assert loop["started"] + loop["gated_out"] + loop["waiting"] == loop["proposals_made"]
    assert loop["manual_steps"] == 0
    assert loop["holdback_sessions"] > 0 and loop["true_kpi_holdback"] == pytest.approx(0.05)
    assert 0 <= loop["worse_than_parent_share"] <= 1
    # proposals that got traffic appear in the run's per-arm counts
    started_arms = [a for a, n in result.sessions_per_arm.items() if "+p" in a and n > 0]
    assert len(started_arms) >= 1
    assert loop["regret"] >= 0 and loop["baseline_regret"] >= 0


def test_without_auto_start_nothing_gets_traffic() -> None:
    result = simulate(parse_scenario(_scenario(auto_start=False)), policy="thompson", seed=1)
    loop = result.closed_loop
    assert loop["started"] == 0 and loop["waiting"] >= 1
    assert set(result.sessions_per_arm) - {"base"} <= {
        a for a, n in result.sessions_per_arm.items() if n == 0
    }
