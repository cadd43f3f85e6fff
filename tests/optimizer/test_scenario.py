"""Scenario files: validation with errors naming file and field, and the closed-form truth."""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from optimizer.errors import ConfigError
from optimizer.scenario import DelaySpec, load_scenario, parse_scenario

ROOT = Path(__file__).resolve().parents[2]
# Simulator scenarios (bench/scenarios/ also holds other benchmarks' inputs).
NAMES = (
    "two_close_arms",
    "five_arms_one_winner",
    "guardrail_breach",
    "segments",
    "slow_conversions",
    "shipped_defaults",
    "two_day_delay",
    "newcomer",
)
SCENARIOS = [ROOT / "bench" / "scenarios" / f"{name}.toml" for name in NAMES]


def _base(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "name": "t",
        "sessions": 1000,
        "sessions_per_day": 500,
        "refit_every_hours": 12,
        "arms": [{"id": "a", "conversion": 0.03}, {"id": "b", "conversion": 0.05}],
    }
    data.update(overrides)
    return data


def test_shipped_scenarios_are_valid_and_realistic() -> None:
    composite = 0
    for path in SCENARIOS:
        sc = load_scenario(path)
        assert sc.name == path.stem
        conv = sorted(a.conversion for a in sc.arms)
        assert all(0.01 <= c <= 0.08 for c in conv), path  # a few percent
        assert all(b - a < 0.01 for a, b in itertools.pairwise(conv)), path  # < 1 point
        assert sc.sessions_per_day >= 1000, path
        assert sc.delay.distribution != "none", path  # multi-day delays
        composite += not sc.is_binary_kpi()
    assert composite >= 1


def test_shipped_defaults_scenario_runs_the_project_configuration() -> None:
    from optimizer.config import load_config

    sc = load_scenario(ROOT / "bench" / "scenarios" / "shipped_defaults.toml")
    shipped = load_config(ROOT / "flywheel.toml", environ=False)
    assert sc.kpi == shipped.kpi and sc.policy == shipped.policy
    assert sc.holdback == shipped.experiment.holdback
    assert sc.policy.delay == "model"  # learning from day one is the default
    assert len(sc.arms) == 5 and sc.days == 28 and sc.sessions_per_day == 2000


def test_config_and_kpi_are_exclusive_and_paths_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="either config"):
        parse_scenario(_base(config="flywheel.toml", kpi={}), source=str(tmp_path / "s.toml"))
    with pytest.raises(ConfigError, match="no such file"):
        parse_scenario(_base(config="nope.toml"), source=str(tmp_path / "s.toml"))
    (tmp_path / "f.toml").write_text("[policy]\nfloor = 0.05\n")
    sc = parse_scenario(
        _base(config="f.toml", policy={"burn_in": 7}), source=str(tmp_path / "s.toml")
    )
    assert (sc.policy.floor, sc.policy.burn_in) == (0.05, 7)


def test_arms_arrive_and_retire_mid_run() -> None:
    arms = [
        {"id": "a", "conversion": 0.03},
        {"id": "b", "conversion": 0.05, "arrives_day": 2, "retires_day": 3},
    ]
    sc = parse_scenario(_base(arms=arms))
    assert sc.has_arrivals
    assert sc.present(np.array([0.0, 2.0, 2.5, 3.0])).tolist() == [
        [True, False],
        [True, True],
        [True, True],
        [True, False],
    ]
    bad = [{"id": "a"}, {"id": "b", "arrives_day": 2, "retires_day": 1}]
    with pytest.raises(ConfigError, match="retires_day must be after arrives_day"):
        parse_scenario(_base(arms=bad))
    late_champion = [{"id": "a", "arrives_day": 1}, {"id": "b"}]
    with pytest.raises(ConfigError, match="from day 0"):
        parse_scenario(_base(arms=late_champion))


def test_name_defaults_to_file_stem(tmp_path: Path) -> None:
    path = tmp_path / "my_case.toml"
    path.write_text(
        "sessions = 10\nsessions_per_day = 10\nrefit_every_hours = 1\n"
        '[[arms]]\nid = "a"\n[[arms]]\nid = "b"\n'
    )
    assert load_scenario(path).name == "my_case"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("sessions = ", "not valid TOML"),
        (
            "sessions = 10\nsessions_per_day = 10\nrefit_every_hours = 1\n"
            '[[arms]]\nid = "a"\nconversion = 1.5\n[[arms]]\nid = "b"\n',
            "arms.0.conversion",
        ),
        (
            'sessions_per_day = 10\nrefit_every_hours = 1\n[[arms]]\nid = "a"\n'
            '[[arms]]\nid = "b"\n',
            "sessions: Field required",
        ),
        (
            "sessions = 10\nsessions_per_day = 10\nrefit_every_hours = 1\nturn = 3\n"
            '[[arms]]\nid = "a"\n[[arms]]\nid = "b"\n',
            "turn: Extra inputs are not permitted",
        ),
    ],
)
def test_file_errors_name_file_and_field(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_scenario(path)
    assert str(info.value).startswith(f"{path}: ")
    assert expected in str(info.value)


def test_missing_file() -> None:
    with pytest.raises(ConfigError, match="no such scenario file"):
        load_scenario("/nonexistent/scenario.toml")


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"arms": [{"id": "a"}]}, "arms: at least 2 arms, or 1 with a [proposer] table"),
        ({"arms": [{"id": "a"}, {"id": "a"}]}, "arm ids must be unique"),
        ({"champion": "zz"}, "champion must be one of the arm ids"),
        ({"sessions": 0}, "sessions: Input should be greater than 0"),
        ({"delay": {"distribution": "lognormal"}}, "delay: a lognormal delay needs median_days"),
        ({"delay": {"distribution": "exponential"}}, "needs mean_days"),
        (
            {"kpi": {"terms": [{"name": "x", "source": "outcome:refund", "weight": 1}]}},
            "kpi.terms.0.source: the simulator generates",
        ),
        (
            {"segments": [{"value": "free", "share": 1.0}]},
            "segments need segment_by",
        ),
        (
            {
                "segment_by": "plan",
                "segments": [{"value": "free", "share": 0.5}, {"value": "pro", "share": 0.4}],
            },
            "segment shares must sum to 1, got 0.9",
        ),
        (
            {
                "segment_by": "plan",
                "segments": [{"value": "free", "share": 1.0, "arms": {"zz": {"conversion": 0.1}}}],
            },
            "segments.0.arms: unknown arm ids ['zz']",
        ),
        (
            {
                "segment_by": "plan",
                "segments": [{"value": "free", "share": 1.0, "arms": {"a": {"conversion": 2}}}],
            },
            "segments.0.arms.a.conversion",
        ),
        ({"policy": {"floor": 1.5}}, "policy.floor"),
    ],
)
def test_validation_errors(overrides: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_scenario(_base(**overrides), source="sc.toml")
    assert str(info.value).startswith("sc.toml: ")
    assert expected in str(info.value)


def test_segment_overrides_inherit_unset_fields() -> None:
    sc = parse_scenario(
        _base(
            segment_by="plan",
            segments=[
                {"value": "free", "share": 0.6},
                {"value": "pro", "share": 0.4, "arms": {"a": {"conversion": 0.09}}},
            ],
        )
    )
    free, pro = sc.truths()
    assert sc.segment_keys == ["plan=free", "plan=pro"]
    assert free["a"].conversion == 0.03 and pro["a"].conversion == 0.09
    assert pro["a"].thumbs_up == free["a"].thumbs_up == 0.7
    assert sc.oracle_arms() == ["b", "a"]


def test_expected_reward_by_hand() -> None:
    # conversion 0.04 within the 7-day window; up_rate ×0.2 over rated turns (0 when unrated);
    # support minutes ~ Exp(mean 10) capped at 5; revenue ~ Exp(mean 50) per conversion.
    sc = parse_scenario(
        _base(
            turns_mean=1.0,
            delay={"distribution": "none"},
            kpi={
                "terms": [
                    {"name": "conversion", "source": "outcome:conversion", "weight": 1.0},
                    {"name": "up", "source": "feedback:up_rate", "weight": 0.2},
                    {
                        "name": "support",
                        "source": "outcome:support_minutes",
                        "weight": -0.02,
                        "cap": 5,
                        "window_days": 1,
                    },
                    {"name": "revenue", "source": "outcome:revenue", "weight": 0.001},
                ]
            },
            arms=[
                {
                    "id": "a",
                    "conversion": 0.04,
                    "rate": 0.5,
                    "thumbs_up": 0.8,
                    "support_minutes": 10,
                    "revenue": 50,
                },
                {"id": "b"},
            ],
        )
    )
    expected = 0.04 + 0.2 * 0.8 * 0.5 - 0.02 * 10 * (1 - math.exp(-0.5)) + 0.001 * 0.04 * 50
    assert sc.expected_reward(sc.arms[0]) == pytest.approx(expected)
    assert sc.expected_reward(sc.arms[1]) == pytest.approx(0.2 * 0.7 * 0.3)


def test_rating_probability_over_several_turns() -> None:
    sc = parse_scenario(_base(turns_mean=3.0))
    truth = sc.arms[0].model_copy(update={"rate": 0.2, "error_rate": 0.5})
    # turns = 1 + Poisson(2); a turn is rated with 0.2 × (1 - 0.5)
    p_none = sum(math.exp(-2) * 2**k / math.factorial(k) * 0.9 ** (k + 1) for k in range(60))
    assert sc.p_any_rating(truth) == pytest.approx(1 - p_none)


def test_a_shorter_window_sees_only_part_of_the_conversions() -> None:
    sc = parse_scenario(
        _base(
            delay={"distribution": "exponential", "mean_days": 2.0},
            kpi={
                "terms": [
                    {
                        "name": "conversion",
                        "source": "outcome:conversion",
                        "weight": 1.0,
                        "window_days": 7,
                    },
                    {
                        "name": "revenue",
                        "source": "outcome:revenue",
                        "weight": 1.0,
                        "window_days": 2,
                    },
                ]
            },
            arms=[{"id": "a", "conversion": 0.1, "revenue": 1.0}, {"id": "b"}],
        )
    )
    share = (1 - math.exp(-(2 - 60 / 86400) / 2)) / (1 - math.exp(-(7 - 120 / 86400) / 2))
    assert sc.expected_reward(sc.arms[0]) == pytest.approx(0.1 + 0.1 * share)


@pytest.mark.parametrize(
    "delay",
    [
        DelaySpec(distribution="exponential", mean_days=2.0),
        DelaySpec(distribution="lognormal", median_days=1.0, sigma=1.2),
    ],
)
def test_delay_sampling_is_truncated_to_the_window(delay: DelaySpec) -> None:
    u = np.random.default_rng(0).random(200_000)
    days = delay.sample(u, 7.0)
    assert days.min() >= 0 and days.max() < 7.0
    for x in (0.5, 1.0, 3.0):  # the empirical CDF matches the truncated one
        assert (days <= x).mean() == pytest.approx(delay.cdf(x) / delay.cdf(7.0), abs=0.005)


def test_guardrail_truth_excludes_the_harmful_arm_from_the_oracle() -> None:
    sc = parse_scenario(
        _base(
            champion="a",
            kpi={
                "terms": [{"name": "conversion", "source": "outcome:conversion", "weight": 1.0}],
                "guardrails": [{"metric": "thumbs_down_rate", "max_delta": 0.05}],
            },
            arms=[
                {"id": "a", "conversion": 0.03, "thumbs_up": 0.8},
                {"id": "b", "conversion": 0.04, "thumbs_up": 0.79},
                {"id": "c", "conversion": 0.06, "thumbs_up": 0.7},
            ],
        )
    )
    assert sc.allowed_arms() == ["a", "b"]
    assert sc.oracle_arms() == ["b"]
