"""Off-policy evaluation: estimators against known truth, targets, logs, degenerate cases.

Ground truth comes from :mod:`optimizer.ope.synthetic`: logs drawn by a known
stochastic logging policy, true values summed exactly over the context cells.
Every random draw is seeded, so each test is deterministic.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression, Ridge

from optimizer.config import (
    ArmConfig,
    Config,
    ExperimentConfig,
    KPIConfig,
    KPITermConfig,
)
from optimizer.errors import EstimationError
from optimizer.ope import (
    ESTIMATORS,
    IPS,
    SNIPS,
    AllocationTarget,
    ArmTarget,
    DirectMethod,
    DoublyRobust,
    SyntheticEnvironment,
    UniformTarget,
    demo_environment,
    evaluate_target,
    kish_ess,
    logs_from_store,
    make_logs,
    parse_target,
    read_logged_csv,
    snapshot_target,
    validate_logs,
)
from optimizer.ope.reward_model import RewardModel
from optimizer.store import ArmSpec, AssignmentRecord, OutcomeRecord, Store

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = SyntheticEnvironment.from_toml(ROOT / "bench" / "scenarios" / "ope_logged.toml")
# A target far from the demo's logging policy (free: a 60%, pro: a/b 40%).
CHALLENGER = AllocationTarget(
    {"plan=free": {"a": 0.2, "b": 0.2, "c": 0.6}, "plan=pro": {"a": 0.1, "b": 0.8, "c": 0.1}}
)


def test_public_names() -> None:
    import optimizer.ope

    assert optimizer.ope.__all__ == [
        "ESTIMATORS",
        "IPS",
        "LOG_COLUMNS",
        "SNIPS",
        "AllocationTarget",
        "ArmTarget",
        "DirectMethod",
        "DoublyRobust",
        "SyntheticEnvironment",
        "TargetPolicy",
        "UniformTarget",
        "as_target",
        "demo_environment",
        "evaluate_target",
        "kish_ess",
        "logs_from_store",
        "make_logs",
        "parse_target",
        "read_logged_csv",
        "snapshot_target",
        "validate_logs",
    ]


# -- ground truth --------------------------------------------------------------------------


def test_scenario_truth_matches_simulation() -> None:
    """The analytic truth and the generator agree: the logged mean estimates the logging value."""
    logs = make_logs(SCENARIO, 200_000, random_state=11)
    truth = SCENARIO.true_value(SCENARIO.logging)
    se = logs["reward"].std() / np.sqrt(len(logs))
    assert abs(logs["reward"].mean() - truth) < 3 * se
    # and the logged propensities are the allocation's
    free = logs[logs["plan"] == "free"]
    shares = free["arm"].value_counts(normalize=True)
    assert shares["concise"] == pytest.approx(0.6, abs=0.01)
    assert set(free["propensity"].round(6)) == {0.6, 0.25, 0.15}


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_estimators_recover_a_target_far_from_logging(name: str) -> None:
    scenario = demo_environment()
    truth = scenario.true_value(CHALLENGER)
    logged_value = scenario.true_value(scenario.logging)
    assert truth - logged_value > 0.05  # the naive logged mean would be far off
    logs = make_logs(scenario, 20_000, random_state=2)
    est = ESTIMATORS[name](CHALLENGER, n_bootstrap=300).fit(logs)
    assert est.ci_[0] < truth < est.ci_[1]
    assert abs(est.estimate_ - truth) < 0.015
    assert abs(logs["reward"].mean() - truth) > 0.05
    assert est.ci_[1] - est.ci_[0] < 0.05


def test_intervals_cover_the_truth_at_the_stated_rate() -> None:
    """100 seeded replications: 95% intervals hold the truth 88-99% of the time
    (binomial sd ≈ 2.2 points), and are not wide enough to pass trivially."""
    scenario = demo_environment()
    truth = scenario.true_value(CHALLENGER)
    hits = {name: 0 for name in ESTIMATORS}
    widths: dict[str, list[float]] = {name: [] for name in ESTIMATORS}
    for rep in range(100):
        logs = make_logs(scenario, 1000, random_state=1000 + rep)
        for name, cls in ESTIMATORS.items():
            est = cls(CHALLENGER, n_bootstrap=200, random_state=rep).fit(logs)
            hits[name] += est.ci_[0] <= truth <= est.ci_[1]
            widths[name].append(est.ci_[1] - est.ci_[0])
    for name in ESTIMATORS:
        assert 88 <= hits[name] <= 99, (name, hits[name])
        # ~4 standard errors wide: an SE of ~0.026 at n=1000 with ESS ≈ 270
        assert np.mean(widths[name]) < 0.13, (name, np.mean(widths[name]))


def test_error_shrinks_with_more_sessions() -> None:
    scenario = demo_environment()
    truth = scenario.true_value(CHALLENGER)
    errors: dict[int, dict[str, float]] = {}
    for n in (400, 6400):
        errs: dict[str, list[float]] = {name: [] for name in ESTIMATORS}
        for rep in range(20):
            logs = make_logs(scenario, n, random_state=50_000 + 100 * rep + n)
            for name, cls in ESTIMATORS.items():
                errs[name].append(abs(cls(CHALLENGER, n_bootstrap=10).fit(logs).estimate_ - truth))
        errors[n] = {name: float(np.mean(v)) for name, v in errs.items()}
    for name in ESTIMATORS:
        # 16x the data: error should fall ~4x (1/sqrt(n)); demand at least 2.5x
        assert errors[6400][name] < errors[400][name] / 2.5, (name, errors)


def test_linearised_bootstrap_matches_refitting_the_model() -> None:
    """DM/DR intervals include the reward model's own error: their bootstrap spread equals
    that of refitting the model on each resample."""
    scenario = SyntheticEnvironment(
        arms=("a", "b", "c"),
        contexts={"plan": {"free": 0.6, "pro": 0.4}, "channel": {"web": 0.7, "mobile": 0.3}},
        segment_by=("plan",),
        logging=demo_environment().logging,
        rate_by="plan",
        rates=demo_environment().rates,
        effects={"channel": {"mobile": 0.5}},
    )
    logs = make_logs(scenario, 1500, random_state=5)
    rng = np.random.default_rng(1)
    for cls, model in ((DirectMethod, "logistic"), (DoublyRobust, "ridge")):
        est = cls("arm:c", model=model, n_bootstrap=2000).fit(logs)
        refits = [
            cls("arm:c", model=model, n_bootstrap=10)
            .fit(logs.iloc[rng.integers(0, len(logs), len(logs))].reset_index(drop=True))
            .estimate_
            for _ in range(40)
        ]
        ratio = est.std_error_ / np.std(refits, ddof=1)
        assert 0.75 < ratio < 1.33, (cls.name, ratio)


def test_direct_method_is_biased_when_the_model_cannot_see_the_cause() -> None:
    """DR's correction removes the bias a misspecified model leaves in DM."""
    scenario = SyntheticEnvironment(
        arms=("a", "b"),
        contexts={"plan": {"free": 0.5, "pro": 0.5}, "device": {"x": 0.5, "y": 0.5}},
        segment_by=("plan", "device"),
        logging={
            "plan=free|device=x": {"a": 0.9, "b": 0.1},
            "plan=free|device=y": {"a": 0.1, "b": 0.9},
            "plan=pro|device=x": {"a": 0.5, "b": 0.5},
            "plan=pro|device=y": {"a": 0.5, "b": 0.5},
        },
        rate_by="plan",
        rates={"free": {"a": 0.1, "b": 0.1}, "pro": {"a": 0.3, "b": 0.3}},
        effects={"device": {"x": 0.2, "y": 1.8}},
    )
    # Only plan is visible to the model (no device column, no segment column).
    logs = make_logs(scenario, 40_000, random_state=3).drop(columns=["device"])
    logs["segment"] = "*"  # the propensities still carry the device dependence
    truth = scenario.true_value("arm:b")
    dm = DirectMethod("arm:b", n_bootstrap=200).fit(logs)
    dr = DoublyRobust("arm:b", n_bootstrap=200).fit(logs)
    assert not (dm.ci_[0] <= truth <= dm.ci_[1])
    assert dr.ci_[0] <= truth <= dr.ci_[1]


# -- warnings, clipping, ESS ---------------------------------------------------------------


def test_kish_ess() -> None:
    assert kish_ess(np.ones(10)) == pytest.approx(10)
    assert kish_ess(np.r_[np.ones(9), 0.0]) == pytest.approx(9)
    assert kish_ess(np.zeros(3)) == 0.0


def test_tiny_propensities_warn_about_effective_sample_size() -> None:
    scenario = SyntheticEnvironment(
        arms=("a", "b"),
        contexts={"plan": {"free": 1.0}},
        logging={"*": {"a": 0.995, "b": 0.005}},
        rate_by="plan",
        rates={"free": {"a": 0.2, "b": 0.3}},
    )
    logs = make_logs(scenario, 4000, random_state=0)
    assert (logs["arm"] == "b").sum() > 0
    for cls in ESTIMATORS.values():
        est = cls("arm:b", n_bootstrap=50).fit(logs)
        assert est.ess_ < 100
        assert any("effective sample size" in w for w in est.warnings_), est.warnings_
    # the same logs evaluate the logging arm without a warning
    assert IPS("arm:a", n_bootstrap=50).fit(logs).warnings_ == []
    # thresholds are hyper-parameters
    assert IPS("arm:b", n_bootstrap=50, min_ess=0, min_ess_fraction=0).fit(logs).warnings_ == []


def test_ess_fraction_threshold() -> None:
    logs = make_logs(demo_environment(), 50_000, random_state=1)
    ess = IPS("arm:c", n_bootstrap=20).fit(logs).ess_
    assert ess > 100
    strict = IPS("arm:c", n_bootstrap=20, min_ess_fraction=0.5).fit(logs)
    assert ess < 0.5 * len(logs) and strict.warnings_


@pytest.mark.parametrize("cls", [IPS, SNIPS, DoublyRobust])
def test_clipping_is_applied_and_reported(cls: type) -> None:
    logs = make_logs(demo_environment(), 3000, random_state=4)
    raw = cls("arm:c", n_bootstrap=50).fit(logs)
    clipped = cls("arm:c", n_bootstrap=50, clip=6.0).fit(logs)
    weights = 1.0 / logs.loc[logs["arm"] == "c", "propensity"]
    expected = int((weights > 6.0).sum())
    assert expected > 0 and raw.n_clipped_ == 0
    assert clipped.n_clipped_ == expected
    assert clipped.summary_["clipping"] == {"threshold": 6.0, "clipped": expected}
    assert any(f"clipped {expected} of 3000 weights above 6" in w for w in clipped.warnings_)
    assert clipped.estimate_ != raw.estimate_
    assert raw.summary_["clipping"] is None


# -- degenerate logs -----------------------------------------------------------------------


def test_single_arm() -> None:
    rng = np.random.default_rng(0)
    logs = pd.DataFrame(
        {"arm": "only", "reward": (rng.random(500) < 0.3).astype(float), "propensity": 1.0}
    )
    for name, cls in ESTIMATORS.items():
        est = cls("arm:only", n_bootstrap=200).fit(logs)
        assert est.estimate_ == pytest.approx(logs["reward"].mean()), name
        assert est.ci_[0] < est.estimate_ < est.ci_[1]
        assert est.ess_ == pytest.approx(500)
        assert est.warnings_ == []
    assert IPS("uniform").fit(logs).estimate_ == pytest.approx(logs["reward"].mean())
    with pytest.raises(EstimationError, match="'other' was never logged"):
        IPS("arm:other").fit(logs)


def test_all_rewards_zero() -> None:
    logs = make_logs(demo_environment(), 2000, random_state=0).assign(reward=0.0)
    for cls in ESTIMATORS.values():
        est = cls(CHALLENGER, n_bootstrap=50).fit(logs)
        assert est.estimate_ == 0.0
        assert est.ci_ == (0.0, 0.0)


def test_continuous_rewards_use_ridge_and_numeric_context() -> None:
    """A composite KPI (any real number) and a numeric context column."""
    rng = np.random.default_rng(0)
    n = 6000
    tenure = rng.exponential(12.0, n)
    arm = np.where(rng.random(n) < 0.7, "a", "b")
    propensity = np.where(arm == "a", 0.7, 0.3)
    reward = 0.5 + 0.02 * tenure + np.where(arm == "b", 0.3, 0.0) + rng.normal(0, 0.5, n)
    logs = pd.DataFrame({"arm": arm, "reward": reward, "propensity": propensity, "tenure": tenure})
    truth = 0.5 + 0.02 * 12.0 + 0.3
    for cls in (DirectMethod, DoublyRobust):
        est = cls("arm:b", n_bootstrap=300).fit(logs)
        assert est.ci_[0] < truth < est.ci_[1], cls.name
        assert isinstance(est.reward_model_.estimator, Ridge)
    with pytest.raises(ValueError, match="logistic reward model needs 0/1 rewards"):
        DirectMethod("arm:b", model="logistic").fit(logs)


def test_json_like_context_values() -> None:
    """Context from the store may hold bools, None, lists: compared as text, not crashing."""
    logs = make_logs(demo_environment(), 1000, random_state=0)
    logs["returning"] = [True if i % 3 == 0 else None for i in range(1000)]
    logs["tags"] = [["x"] if i % 2 else [] for i in range(1000)]
    est = DoublyRobust("arm:b", n_bootstrap=50).fit(logs)
    assert np.isfinite(est.estimate_)


def test_reward_model_choices() -> None:
    logs = make_logs(demo_environment(), 1000, random_state=0)
    fitted = DirectMethod("arm:b", model=LogisticRegression(C=0.5), n_bootstrap=20).fit(logs)
    assert fitted.reward_model_.estimator.C == 0.5
    assert DirectMethod("arm:b", model="ridge", n_bootstrap=20).fit(logs).estimate_ > 0
    with pytest.raises(ValueError, match="model must be a LogisticRegression or Ridge"):
        DirectMethod("arm:b", model=object()).fit(logs)
    with pytest.raises(ValueError, match="model must be 'auto', 'logistic', 'ridge'"):
        DirectMethod("arm:b", model="forest").fit(logs)
    with pytest.raises(ValueError, match="fit_intercept=True"):
        DirectMethod("arm:b", model=Ridge(fit_intercept=False)).fit(logs)


def test_reward_model_matches_a_fit_on_every_row() -> None:
    """Grouping rows by (pattern, arm) with counts as weights is the same model."""
    logs = make_logs(SCENARIO, 3000, random_state=9)
    context = logs[["plan", "channel"]]
    arms = pd.Categorical(logs["arm"], categories=list(SCENARIO.arms)).codes.astype(np.int64)
    model = RewardModel("logistic", context, arms, logs["reward"].to_numpy(), 3)
    mine = logs["arm"] == "empathetic"
    features = pd.get_dummies(context[mine], dtype=float)
    direct = LogisticRegression(max_iter=1000).fit(features, logs.loc[mine, "reward"])
    expected = direct.predict_proba(pd.get_dummies(context, dtype=float))[:, 1]
    assert np.allclose(model.predicted()[:, 1], expected, atol=1e-4)


# -- validation ----------------------------------------------------------------------------


def _logs(**overrides: object) -> pd.DataFrame:
    base = {"arm": ["a", "b", "a"], "reward": [1.0, 0.0, 0.0], "propensity": [0.5, 0.5, 0.5]}
    base.update(overrides)
    return pd.DataFrame(base)


@pytest.mark.parametrize(
    ("logs", "message"),
    [
        (
            _logs(propensity=[0.5, 0.0, 0.5]),
            r"'propensity' must be in \(0, 1\]: 1 of 3 rows, first at row 1 with value 0.0",
        ),
        (_logs(propensity=[0.5, 1.5, 0.5]), r"'propensity' must be in \(0, 1\].*value 1.5"),
        (_logs(propensity=[0.5, -0.1, 0.5]), r"'propensity' must be in \(0, 1\].*value -0.1"),
        (
            _logs(propensity=[0.5, None, np.nan]),
            r"'propensity' is missing or not a number: 2 of 3 rows, first at row 1",
        ),
        (_logs(propensity=["0.5", "x", "0.5"]), r"'propensity' is missing or not a number.*'x'"),
        (_logs(reward=[1.0, np.inf, 0.0]), r"'reward' must be finite"),
        (_logs(reward=[1.0, None, 0.0]), r"'reward' is missing"),
        (_logs(arm=["a", None, "a"]), r"'arm' is missing: 1 of 3 rows"),
        (pd.DataFrame({"arm": ["a"], "reward": [1.0]}), r"lack the column\(s\) \['propensity'\]"),
        (pd.DataFrame({"arm": [], "reward": [], "propensity": []}), "no rows"),
    ],
)
def test_bad_logs_are_refused_with_the_column_and_row(logs: pd.DataFrame, message: str) -> None:
    with pytest.raises(EstimationError, match=message):
        validate_logs(logs)
    with pytest.raises(EstimationError, match=message):
        SNIPS("uniform").fit(logs)


def test_logs_must_be_a_dataframe() -> None:
    with pytest.raises(TypeError, match="logs must be a pandas DataFrame, got dict"):
        validate_logs({"arm": ["a"]})


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"clip": 0.0}, "clip must be a positive finite weight or None, got 0.0"),
        ({"clip": float("inf")}, "clip must be a positive finite weight"),
        ({"n_bootstrap": 5}, "n_bootstrap must be an integer >= 10, got 5"),
        ({"alpha": 1.5}, r"alpha must be in \(0, 1\), got 1.5"),
        ({"min_ess": -1}, "min_ess must be >= 0, got -1"),
        ({"min_ess_fraction": 1.0}, r"min_ess_fraction must be in \[0, 1\), got 1.0"),
    ],
)
def test_bad_hyper_parameters(params: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        IPS("uniform", **params).fit(_logs())  # type: ignore[arg-type]


def test_target_on_unlogged_arm_is_an_error() -> None:
    logs = make_logs(demo_environment(), 500, random_state=0)
    logs = logs[logs["arm"] != "c"]
    for cls in ESTIMATORS.values():
        with pytest.raises(EstimationError, match=r"target arm 'c' was never logged"):
            cls("arm:c").fit(logs)
    with pytest.raises(EstimationError, match=r"puts mass on arms never logged: \['c'\]"):
        SNIPS({"a": 0.5, "c": 0.5}).fit(logs)


def test_target_on_arm_unlogged_in_a_segment_is_an_error() -> None:
    logs = make_logs(demo_environment(), 2000, random_state=0)
    logs = logs[~((logs["arm"] == "c") & (logs["segment"] == "plan=pro"))]
    with pytest.raises(EstimationError, match=r"arm 'c' in segment 'plan=pro', where it was never"):
        DoublyRobust("arm:c").fit(logs)
    # a target that keeps "c" to the free plan is fine
    target = {"plan=free": {"c": 1.0}, "*": {"a": 0.5, "b": 0.5}}
    assert SNIPS(target).fit(logs).estimate_ > 0


# -- conventions ---------------------------------------------------------------------------


def test_estimator_conventions() -> None:
    est = DoublyRobust("arm:b", clip=10.0, n_bootstrap=50, random_state=3)
    assert est.get_params() == {
        "target": "arm:b",
        "model": "auto",
        "clip": 10.0,
        "n_bootstrap": 50,
        "alpha": 0.05,
        "min_ess": 100,
        "min_ess_fraction": 0.01,
        "random_state": 3,
    }
    logs = make_logs(demo_environment(), 800, random_state=0)
    assert est.fit(logs) is est
    assert clone(est).get_params() == est.get_params()
    assert not hasattr(clone(est), "estimate_")


def test_seeded_and_deterministic() -> None:
    logs = make_logs(demo_environment(), 800, random_state=0)
    a = SNIPS("arm:b", random_state=7).fit(logs)
    b = SNIPS("arm:b", random_state=7).fit(logs)
    c = SNIPS("arm:b", random_state=8).fit(logs)
    assert a.ci_ == b.ci_
    assert a.ci_ != c.ci_
    assert a.estimate_ == c.estimate_  # only the interval is random


# -- targets -------------------------------------------------------------------------------


def test_targets() -> None:
    frame = pd.DataFrame({"segment": ["plan=free", "plan=pro", "plan=team"]})
    arms = ["a", "b", "c"]
    assert ArmTarget("b").probabilities(frame, arms)[:, 1].tolist() == [1, 1, 1]
    assert np.allclose(UniformTarget().probabilities(frame, arms), 1 / 3)
    alloc = AllocationTarget({"*": {"a": 1.0}, "plan=pro": {"b": 0.3, "c": 0.7}})
    assert alloc.probabilities(frame, arms).tolist() == [[1, 0, 0], [0, 0.3, 0.7], [1, 0, 0]]
    # normalised within the tolerance, like serving normalises a snapshot
    nearly = AllocationTarget({"*": {"a": 0.333, "b": 0.333, "c": 0.333}})
    assert np.allclose(nearly.probabilities(frame, arms), 1 / 3)
    with pytest.raises(EstimationError, match="no allocation for segment 'plan=free'"):
        AllocationTarget({"plan=pro": {"a": 1.0}}).probabilities(frame, arms)


@pytest.mark.parametrize(
    ("segments", "message"),
    [
        ({"*": {"a": 0.5, "b": 0.4}}, r"segment '\*' must sum to 1 \(±0.01\), got 0.9"),
        ({"*": {"a": -0.5, "b": 1.5}}, "'a' in segment '\\*' must be finite and >= 0, got -0.5"),
        ({"*": {"a": float("nan"), "b": 1.0}}, "must be finite and >= 0, got nan"),
        ({"*": {"a": "lots"}}, "must be a number, got 'lots'"),
        ({"*": {}}, "must be a non-empty"),
        ({}, "allocation must be a non-empty mapping"),
    ],
)
def test_bad_allocations(segments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        AllocationTarget(segments)


def test_allocation_from_json_forms() -> None:
    expected = {"*": {"a": 0.25, "b": 0.75}}
    snapshot = {"version": 4, "allocation": {"segments": expected}, "summary": {}}
    assert AllocationTarget.from_json(snapshot).describe()["segments"] == expected
    assert AllocationTarget.from_json(snapshot).version == 4
    assert AllocationTarget.from_json({"segments": expected}).describe()["segments"] == expected
    assert AllocationTarget.from_json(expected).describe()["segments"] == expected
    assert AllocationTarget.from_json({"a": 0.25, "b": 0.75}).describe()["segments"] == expected


def test_parse_target(tmp_path: Path) -> None:
    assert parse_target("uniform") == UniformTarget()
    assert parse_target("arm:concise+fixed") == ArmTarget("concise+fixed")
    path = tmp_path / "proposal.json"
    path.write_text(json.dumps({"*": {"a": 0.5, "b": 0.5}}))
    target = parse_target(f"allocation:{path}")
    assert isinstance(target, AllocationTarget) and target.label == "allocation:proposal.json"
    with pytest.raises(ValueError, match="target must be 'uniform', 'arm:NAME'"):
        parse_target("arm:")
    with pytest.raises(ValueError, match="cannot be read"):
        parse_target(f"allocation:{tmp_path / 'missing.json'}")
    path.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        parse_target(f"allocation:{path}")
    path.write_text(json.dumps({"*": {"a": 0.5}}))
    with pytest.raises(ValueError, match=r"proposal.json: probabilities in segment '\*' must sum"):
        parse_target(f"allocation:{path}")
    with pytest.raises(ValueError, match="needs a store"):
        parse_target("snapshot")


def test_snapshot_targets(store: Store) -> None:
    with pytest.raises(EstimationError, match="has no policy snapshot yet"):
        snapshot_target(store, "exp")
    store.save_snapshot("exp", "thompson", {"segments": {"*": {"a": 0.5, "b": 0.5}}}, {})
    store.save_snapshot("exp", "thompson", {"segments": {"*": {"a": 0.9, "b": 0.1}}}, {})
    latest = parse_target("snapshot", store=store, experiment_id="exp")
    first = parse_target("snapshot:1", store=store, experiment_id="exp")
    assert isinstance(latest, AllocationTarget) and isinstance(first, AllocationTarget)
    assert latest.version == 2 and latest.describe()["segments"] == {"*": {"a": 0.9, "b": 0.1}}
    assert first.version == 1 and first.label == "snapshot:1"
    with pytest.raises(EstimationError, match="has no policy snapshot version 7"):
        parse_target("snapshot:7", store=store, experiment_id="exp")
    with pytest.raises(ValueError, match="snapshot version must be a positive integer, got 'x'"):
        parse_target("snapshot:x", store=store, experiment_id="exp")


# -- logs from the store and from CSV ------------------------------------------------------


def _config() -> Config:
    return Config(
        experiment=ExperimentConfig(
            id="exp",
            salt="exp",
            segment_by=("plan",),
            arms=(ArmConfig(id="a", prompt="concise"), ArmConfig(id="b", prompt="concise")),
        ),
        kpi=KPIConfig(
            terms=(
                KPITermConfig(
                    name="conversion", source="outcome:conversion", weight=1.0, window_days=1
                ),
            ),
            guardrails=(),
        ),
    )


def test_logs_from_store(store: Store) -> None:
    """Complete sessions with their propensity, segment, KPI reward and context columns."""
    config = _config()
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    now = t0 + timedelta(days=3)
    store.sync_experiment(
        "exp", "exp", [ArmSpec("a", "concise", "h"), ArmSpec("b", "concise", "h")]
    )
    rows = [  # session, arm, propensity, plan, converted, assigned
        ("s1", "a", 0.8, "free", True, t0),
        ("s2", "b", 0.2, "free", False, t0),
        ("s3", "a", 0.5, "pro", False, t0),
        ("s4", "b", 0.5, "pro", True, t0),
        ("s5", "a", 0.8, "free", True, now - timedelta(hours=6)),  # window still open
    ]
    for session, arm, propensity, plan, converted, at in rows:
        store.record_assignment(
            AssignmentRecord(
                session_id=session,
                user_id=f"u-{session}",
                experiment_id="exp",
                arm_id=arm,
                propensity=propensity,
                snapshot_version=None,
                segment=f"plan={plan}",
                context={"plan": plan, "reward": "clash"},
                assigned_at=at,
            )
        )
        if converted:
            store.record_outcome(
                OutcomeRecord(f"k-{session}", "conversion", 1.0, session_id=session, occurred_at=at)
            )
    logs = logs_from_store(store, config, now=now)
    assert sorted(logs.index) == ["s1", "s2", "s3", "s4"]  # s5's window is open: not a zero
    assert list(logs.columns[:4]) == ["arm", "reward", "propensity", "segment"]
    assert logs.loc["s1", "reward"] == 1.0 and logs.loc["s2", "reward"] == 0.0
    assert logs.loc["s2", "propensity"] == 0.2
    assert logs.loc["s3", "segment"] == "plan=pro"
    assert logs.loc["s4", "plan"] == "pro"
    assert logs.loc["s4", "context.reward"] == "clash"  # a context key never shadows the reward
    out = evaluate_target(logs, "arm:a", n_bootstrap=20)
    # IPS by hand: (1/0.8 + 0) / 4 sessions
    assert out["estimators"]["ips"]["estimate"] == pytest.approx((1 / 0.8) / 4)
    assert out["n"] == 4


def test_logs_from_an_empty_store(sqlite_store: Store) -> None:
    logs = logs_from_store(sqlite_store, _config())
    assert logs.empty and list(logs.columns) == ["arm", "reward", "propensity", "segment"]


def test_read_logged_csv(tmp_path: Path) -> None:
    path = tmp_path / "logs.csv"
    path.write_text("arm,reward,propensity,country\na,1,0.5,de\nb,0,0.5,fr\nb,1,0,fr\n")
    with pytest.raises(EstimationError, match=r"logs.csv: column 'propensity' .* first at row 4"):
        read_logged_csv(path)  # row = line number in the file
    path.write_text(",arm,reward,propensity,country\n0,a,1,0.5,de\n1,b,0,0.5,fr\n")
    logs = read_logged_csv(path)
    assert list(logs["segment"]) == ["*", "*"] and list(logs["country"]) == ["de", "fr"]
    assert list(logs.columns) == ["arm", "reward", "propensity", "country", "segment"]
    with pytest.raises(EstimationError, match="does not exist"):
        read_logged_csv(tmp_path / "nope.csv")


# -- evaluate_target -----------------------------------------------------------------------


def test_evaluate_target() -> None:
    logs = make_logs(demo_environment(), 3000, random_state=0)
    out = evaluate_target(logs, CHALLENGER, n_bootstrap=100, clip=50.0)
    assert out["n"] == 3000
    assert out["target"]["kind"] == "allocation"
    assert out["logged_mean"] == pytest.approx(logs["reward"].mean())
    assert list(out["estimators"]) == ["ips", "snips", "dm", "dr"]
    for name, r in out["estimators"].items():
        assert r["estimator"] == name
        assert r["ci"][0] <= r["estimate"] <= r["ci"][1]
        assert set(r) >= {"estimate", "ci", "ess", "warnings", "clipping", "std_error"}
    assert out["estimators"]["dm"]["clipping"] is None
    assert out["estimators"]["ips"]["clipping"] == {"threshold": 50.0, "clipped": 0}
    json.dumps(out, allow_nan=False)  # plain, finite JSON for the dashboard
    with pytest.raises(ValueError, match=r"estimators must be a non-empty subset of \['ips'"):
        evaluate_target(logs, "uniform", estimators=["ips", "magic"])
    with pytest.raises(TypeError, match="target must be a TargetPolicy"):
        evaluate_target(logs, 42)  # type: ignore[arg-type]
