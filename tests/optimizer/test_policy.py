"""Policies: posteriors by hand, safe-rollout rules that must and must not fire, determinism."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats
from sklearn.base import clone

from optimizer.config import PolicyConfig
from optimizer.errors import PolicyError
from optimizer.policy import (
    ThompsonSamplingPolicy,
    UniformPolicy,
    beta_posterior,
    make_policy,
    nig_posterior,
    rollout,
)


def binary_frame(
    counts: dict[str, tuple[int, int]], segment: str = "*", complete: bool = True
) -> pd.DataFrame:
    """``{arm: (sessions, successes)}`` → one row per session with a 0/1 reward."""
    rows = []
    for arm, (n, k) in counts.items():
        rows += [
            {"arm_id": arm, "segment": segment, "reward": float(i < k), "complete": complete}
            for i in range(n)
        ]
    frame = pd.DataFrame(rows)
    if not complete:
        frame["reward"] = np.nan
    return frame


def ts(**kw: object) -> ThompsonSamplingPolicy:
    params: dict[str, object] = {
        "burn_in": 0,
        "floor": 0.0,
        "challenger_min_sessions": 0,
        "random_state": 0,
    }
    params.update(kw)
    return ThompsonSamplingPolicy(**params)  # type: ignore[arg-type]


# -- posteriors by hand ---------------------------------------------------------------------


def test_beta_posterior_matches_hand_values() -> None:
    assert beta_posterior(3, 7) == (4.0, 8.0)
    policy = ts(samples=200_000).fit(binary_frame({"a": (10, 3), "b": (20, 10)}))
    assert policy.model_ == "beta"
    a, b = policy.summary_["a"], policy.summary_["b"]
    assert a["kpi_mean"] == pytest.approx(4 / 12) and b["kpi_mean"] == pytest.approx(11 / 22)
    assert a["kpi_ci"] == pytest.approx(stats.beta.ppf([0.025, 0.975], 4, 8), abs=0.005)
    exact = stats.beta(11, 11).expect(lambda x: stats.beta(4, 8).cdf(x))  # P(b > a)
    assert b["prob_best"] == pytest.approx(exact, abs=0.005)


def test_nig_posterior_matches_hand_values() -> None:
    # y = [1, 3] → n 2, mean 2, sse 2; prior mu0 0, kappa0 1, alpha0 2, beta0 1
    mu, kappa, alpha, beta = nig_posterior(2, 2.0, 2.0, mu0=0.0, kappa0=1.0, alpha0=2.0, beta0=1.0)
    assert (mu, kappa, alpha) == pytest.approx((4 / 3, 3.0, 3.0))
    assert beta == pytest.approx(1 + 1 + 1 * 2 * 4 / (2 * 3))
    with pytest.raises(ValueError, match="kappa0"):
        nig_posterior(1, 0.0, 0.0, mu0=0.0, kappa0=0.0, alpha0=1.0, beta0=1.0)


def test_composite_kpi_uses_nig_with_pooled_prior() -> None:
    frame = pd.DataFrame(
        {"arm_id": ["a", "a", "b", "b"], "reward": [1.0, 3.0, 0.5, 1.5], "complete": True}
    )
    policy = ts(samples=200_000, delay="wait").fit(frame)
    assert policy.model_ == "nig"
    # pooled prior: mu0 = 1.5, var0 = mean(y²) - 1.5² = 0.875; kappa0 = alpha0 = 1
    mu, kappa, alpha, beta = nig_posterior(
        2, 2.0, 2.0, mu0=1.5, kappa0=1.0, alpha0=1.0, beta0=0.875
    )
    a = policy.summary_["a"]
    assert a["kpi_mean"] == pytest.approx(mu)  # (1·1.5 + 2·2) / 3
    t = stats.t(2 * alpha, loc=mu, scale=np.sqrt(beta / (alpha * kappa)))
    assert a["kpi_ci"] == pytest.approx(t.ppf([0.025, 0.975]), rel=0.03)


def test_delay_model_counts_open_sessions_by_exposure() -> None:
    frame = pd.DataFrame(
        {
            "arm_id": ["a"] * 4,
            "reward": [1.0, 0.0, np.nan, np.nan],
            "complete": [True, True, False, False],
            "conversion": [1.0, 0.0, np.nan, np.nan],
            "conversion_observed": [1.0, 0.0, 1.0, 0.0],
            "conversion_exposure": [1.0, 1.0, 0.4, 0.25],
        }
    )
    frame.attrs["kpi_terms"] = [{"name": "conversion", "column": "conversion", "weight": 1.0}]
    wait = ts(delay="wait").fit(frame)
    model = ts(delay="model").fit(frame)
    assert wait.summary_["a"]["kpi_mean"] == pytest.approx(2 / 4)  # Beta(1 + 1, 1 + 1)
    # α = 1 + Σ observed = 3; β = 1 + Σ exposure·(1 − observed) = 1 + 1 + 0.25
    assert model.summary_["a"]["kpi_mean"] == pytest.approx(3 / (3 + 2.25))
    assert model.summary_["a"]["effective_sessions"] == pytest.approx(2.65)


def test_delayed_outcomes_do_not_count_as_failures() -> None:
    # "b" converts as often as "a" but half its sessions are still inside the window
    done = binary_frame({"a": (400, 40), "b": (200, 20)})
    open_ = binary_frame({"b": (200, 0)}, complete=False)
    policy = ts().fit(pd.concat([done, open_], ignore_index=True))
    assert policy.summary_["b"]["kpi_mean"] == pytest.approx(21 / 202)
    assert (
        policy.summary_["b"]["sessions"] == 400 and policy.summary_["b"]["complete_sessions"] == 200
    )


# -- safe rollout ---------------------------------------------------------------------------

STRONG = {"a": (1000, 200), "b": (1000, 50), "c": (1000, 40)}


def test_allocations_sum_to_one_in_every_segment() -> None:
    frame = pd.concat(
        [binary_frame(STRONG, "plan=free"), binary_frame({"a": (30, 3), "b": (30, 9)}, "plan=pro")]
    )
    for policy in (ts(floor=0.05), UniformPolicy(random_state=0)):
        policy.fit(frame, ["a", "b", "c"])
        assert set(policy.allocation_) == {"*", "plan=free", "plan=pro"}
        for alloc in policy.allocation_.values():
            assert sum(alloc.values()) == pytest.approx(1.0)
            assert set(alloc) == {"a", "b", "c"}


def test_burn_in_is_uniform_while_no_arm_has_enough() -> None:
    frame = binary_frame({"a": (99, 20), "b": (99, 5), "c": (50, 0)})
    held = ts(burn_in=100).fit(frame)
    assert not held.burn_in_complete_
    assert held.allocation_["*"] == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    assert held.recommendation_ is None  # no stop during burn-in


def test_burn_in_is_per_arm_a_newcomer_leaves_the_others_shares_in_place() -> None:
    close = {"a": (1000, 60), "b": (1000, 50)}
    before = ts(burn_in=100, challenger_cap=0.2, samples=20_000).fit(binary_frame(close))
    frame = binary_frame({**close, "c": (10, 0)})
    after = ts(burn_in=100, challenger_cap=0.2, samples=20_000).fit(frame)
    assert not after.burn_in_complete_ and after.recommendation_ is None
    alloc = after.allocation_["*"]
    assert alloc["c"] == pytest.approx(0.2)  # its exploration share: 1/3, capped at 0.2
    # a and b keep their Thompson shares, scaled to the 80% left
    assert alloc["a"] == pytest.approx(0.8 * before.allocation_["*"]["a"], abs=0.01)
    assert alloc["b"] == pytest.approx(0.8 * before.allocation_["*"]["b"], abs=0.01)
    assert ts(burn_in=10).fit(frame).burn_in_complete_


def test_burn_in_share_of_a_newcomer_without_cap_is_one_over_k() -> None:
    frame = binary_frame({"a": (1000, 200), "b": (1000, 50), "c": (10, 0), "d": (5, 1)})
    alloc = ts(burn_in=100, challenger_cap=1.0).fit(frame).allocation_["*"]
    assert alloc["c"] == pytest.approx(0.25) and alloc["d"] == pytest.approx(0.25)
    assert alloc["a"] == pytest.approx(0.5, abs=0.01)


def test_floor_keeps_a_losing_arm_alive() -> None:
    floored = ts(floor=0.05, floor_decay_sessions=0).fit(binary_frame(STRONG))
    assert floored.allocation_["*"]["c"] == pytest.approx(0.05)
    assert floored.allocation_["*"]["b"] == pytest.approx(0.05)
    bare = ts(floor=0.0).fit(binary_frame(STRONG))
    assert bare.allocation_["*"]["c"] < 0.001


def test_floor_decays_with_evidence() -> None:
    policy = ts(floor=0.04, floor_decay_sessions=1000).fit(binary_frame(STRONG))
    assert policy.allocation_["*"]["c"] == pytest.approx(0.04 / (1 + 1000 / 1000))
    assert policy.floor_shares(np.array([0, 3000])).tolist() == pytest.approx([0.04, 0.01])


def test_challenger_cap_limits_a_new_arm_until_it_has_data() -> None:
    frame = binary_frame({"a": (1000, 50), "b": (150, 60)})  # b is new and looks great
    capped = ts(challenger_cap=0.2, challenger_min_sessions=200).fit(frame, champion="a")
    assert capped.allocation_["*"]["b"] == pytest.approx(0.2)
    grown = ts(challenger_cap=0.2, challenger_min_sessions=150).fit(frame, champion="a")
    assert grown.allocation_["*"]["b"] > 0.9
    # the champion itself is never capped
    assert ts(challenger_min_sessions=2000).fit(frame, champion="b").allocation_["*"]["b"] > 0.9


def test_operator_cap_binds_any_arm_and_frees_the_rest() -> None:
    frame = binary_frame({"a": (1000, 50), "b": (1000, 150)})  # b is clearly better
    free = ts().fit(frame, champion="a")
    assert free.allocation_["*"]["b"] > 0.9
    capped = ts().fit(frame, champion="a", caps={"b": 0.3})
    assert capped.allocation_["*"]["b"] == pytest.approx(0.3)
    assert capped.allocation_["*"]["a"] == pytest.approx(0.7)
    with pytest.raises(ValueError, match="cap for arm 'b'"):
        ts().fit(frame, caps={"b": 0.0})


def test_stop_rule_recommends_a_clear_winner_only() -> None:
    clear = ts(stop_expected_loss=0.001).fit(binary_frame(STRONG))
    assert clear.recommendation_ is not None and clear.recommendation_["arm"] == "a"
    assert clear.recommendation_["prob_best"] >= 0.95
    close = ts(stop_expected_loss=0.001).fit(binary_frame({"a": (1000, 52), "b": (1000, 50)}))
    assert close.recommendation_ is None
    # probability alone is not enough: the expected loss (~0.00014 here) must be small too
    likely = binary_frame({"a": (1000, 200), "b": (1000, 165)})
    strict = ts(stop_expected_loss=0.0001).fit(likely)
    assert strict.summary_["a"]["prob_best"] >= 0.95 and strict.recommendation_ is None
    per_look = ts(stop_expected_loss=0.001, stop_rule="posterior").fit(likely)
    assert per_look.recommendation_ is not None and per_look.recommendation_["arm"] == "a"
    # 20% vs 16.5% on 1000 sessions each is z ≈ 2: enough for one look, not for the
    # always-valid bound that holds over every refit (the default rule) ...
    default = ts(stop_expected_loss=0.001).fit(likely)
    assert default.recommendation_ is None
    assert default.stop_candidates_["posterior"]["arm"] == "a"
    # ... which names the same gap once it has five times the evidence.
    more = ts(stop_expected_loss=0.001).fit(binary_frame({"a": (5000, 1000), "b": (5000, 825)}))
    assert more.recommendation_ is not None and more.recommendation_["arm"] == "a"
    assert more.recommendation_["always_valid_lower"] > 0
    assert more.recommendation_["rule"] == "always_valid"


def test_the_always_valid_stop_rule_names_no_winner_of_an_aa_test_however_often_it_looks() -> None:
    """Equal arms, refit after every 200 sessions: the per-look rule ends up naming a winner
    in some runs, the always-valid rule in (almost) none."""
    rng = np.random.default_rng(7)
    runs, named = 40, {"posterior": 0, "always_valid": 0}
    for _ in range(runs):
        hits = {"a": 0, "b": 0}
        seen = dict.fromkeys(named, False)
        for look in range(1, 31):
            for arm in hits:
                hits[arm] += int(rng.binomial(100, 0.2))
            frame = binary_frame({arm: (100 * look, h) for arm, h in hits.items()})
            fitted = ts(stop_expected_loss=0.01, samples=1000).fit(frame)
            for rule in named:
                seen[rule] = seen[rule] or fitted.stop_candidates_[rule] is not None
        for rule in named:
            named[rule] += seen[rule]
    assert named["always_valid"] <= 2  # alpha = 5%: at most ~2 of 40
    assert named["posterior"] > named["always_valid"]


def test_inactive_arms_are_summarised_but_get_no_traffic() -> None:
    policy = ts().fit(binary_frame(STRONG), ["b", "c"])
    assert set(policy.allocation_["*"]) == {"b", "c"}
    assert policy.summary_["a"]["prob_best"] is None
    assert policy.summary_["a"]["kpi_mean"] == pytest.approx(201 / 1002)


def test_segments_get_their_own_best_arm_with_partial_pooling() -> None:
    free = binary_frame({"a": (2000, 200), "b": (2000, 100)}, "plan=free")
    pro = binary_frame({"a": (2000, 100), "b": (2000, 200)}, "plan=pro")
    tiny = binary_frame({"a": (4, 0), "b": (4, 4)}, "plan=tiny")
    policy = ts(segment_prior_sessions=50).fit(pd.concat([free, pro, tiny], ignore_index=True))
    assert policy.allocation_["plan=free"]["a"] > 0.95
    assert policy.allocation_["plan=pro"]["b"] > 0.95
    seg = policy.segment_summary_["plan=tiny"]
    # 4/4 on its own would say b ≈ 0.83; the pooled prior (worth 50 sessions) pulls it to ~0.15
    assert 0.1 < seg["b"]["kpi_mean"] < 0.3
    assert seg["a"]["sessions"] == 4
    no_pool = ts(segment_prior_sessions=1e-6).fit(pd.concat([free, pro, tiny], ignore_index=True))
    assert no_pool.segment_summary_["plan=tiny"]["b"]["kpi_mean"] == pytest.approx(5 / 6, abs=1e-3)


def test_rollout_respects_bounds() -> None:
    out = rollout(
        np.array([0.97, 0.03, 0.0]), np.array([0.05, 0.05, 0.05]), np.array([1.0, 0.2, 0.2])
    )
    assert out.sum() == pytest.approx(1) and (out >= 0.05 - 1e-12).all()
    assert out[0] == pytest.approx(0.9)
    # every arm capped: the caps cannot all hold, so they are dropped
    assert rollout(np.array([0.5, 0.5]), np.zeros(2), np.array([0.2, 0.2])).tolist() == [0.5, 0.5]
    # floors summing above one are scaled down
    assert rollout(np.array([1.0, 0, 0]), np.full(3, 0.5), np.ones(3)) == pytest.approx([1 / 3] * 3)


def test_uniform_policy_reads_out_like_thompson() -> None:
    policy = UniformPolicy(random_state=0).fit(binary_frame(STRONG))
    assert policy.allocation_["*"] == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3})
    assert policy.recommendation_ is not None and policy.recommendation_["arm"] == "a"


# -- conventions ------------------------------------------------------------------------------


def test_seeded_fits_are_identical() -> None:
    frame = binary_frame({"a": (300, 30), "b": (300, 27)})
    one, two = ts(random_state=7).fit(frame), ts(random_state=7).fit(frame)
    assert one.allocation_ == two.allocation_ and one.summary_ == two.summary_
    other = ts(random_state=8).fit(frame)
    assert other.allocation_ != one.allocation_  # the seed is really used


def test_estimator_conventions() -> None:
    policy = ThompsonSamplingPolicy(burn_in=7, floor=0.01, random_state=3)
    assert policy.get_params()["burn_in"] == 7 and not hasattr(policy, "allocation_")
    assert clone(policy).get_params() == policy.get_params()
    assert policy.fit(binary_frame(STRONG)) is policy
    config = PolicyConfig(kind="thompson", burn_in=5, floor=0.03, delay="model")
    made = make_policy(config, random_state=1)
    assert isinstance(made, ThompsonSamplingPolicy)
    assert (made.burn_in, made.floor, made.delay) == (5, 0.03, "model")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"burn_in": -1}, "burn_in must be an integer >= 0, got -1"),
        ({"floor": 1.0}, r"floor must be in \[0, 1\), got 1.0"),
        ({"challenger_cap": 0}, r"challenger_cap must be in \(0, 1\], got 0"),
        ({"samples": 10}, "samples must be an integer >= 100, got 10"),
        ({"delay": "soon"}, "delay must be 'wait' or 'model', got 'soon'"),
    ],
)
def test_bad_hyper_parameters_are_named(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ThompsonSamplingPolicy(**kwargs).fit(binary_frame(STRONG))  # type: ignore[arg-type]


def test_no_active_arm_is_a_policy_error() -> None:
    with pytest.raises(PolicyError, match="no active arm"):
        ts().fit(binary_frame(STRONG).iloc[:0], [])
    with pytest.raises(PolicyError, match="lacks columns"):
        ts().fit(pd.DataFrame({"arm_id": ["a"]}))


def test_delay_model_composite_uses_ratio_estimators() -> None:
    frame = pd.DataFrame(
        {
            "arm_id": ["a", "a", "a", "b", "b"],
            "reward": np.nan,
            "complete": False,
            "conv_observed": [1.0, 0.0, 0.0, 0.0, 0.0],
            "conv_exposure": [1.0, 1.0, 0.5, 1.0, 0.2],
            "up_observed": [1.0, 0.5, 0.0, 0.0, 1.0],
            "up_exposure": 1.0,
            "conv": np.nan,
            "up": np.nan,
        }
    )
    frame.attrs["kpi_terms"] = [
        {"name": "conv", "column": "conv", "weight": 1.0},
        {"name": "up", "column": "up", "weight": 0.5},
    ]
    policy = ts(delay="model", samples=100_000).fit(frame)
    assert policy.model_ == "normal"
    m_conv, m_up = 1 / 3.7, 2.5 / 5  # pooled means: one pseudo-session each
    a = (1 + m_conv) / (2.5 + 1) + 0.5 * (1.5 + m_up) / (3 + 1)
    b = (0 + m_conv) / (1.2 + 1) + 0.5 * (1 + m_up) / (2 + 1)
    assert policy.summary_["a"]["kpi_mean"] == pytest.approx(a)
    assert policy.summary_["b"]["kpi_mean"] == pytest.approx(b)
    lo, hi = policy.summary_["a"]["kpi_ci"]
    assert lo < a < hi


def test_pooled_figures_weight_segments_by_traffic_no_simpsons_paradox() -> None:
    """b beats a in both segments, but a was served mostly where people convert anyway:
    raw pooled counts would crown a; traffic-weighted pooling keeps b ahead."""
    frame = pd.concat(
        [
            binary_frame({"a": (1000, 20), "b": (9000, 270)}, segment="plan=free"),  # 2% vs 3%
            binary_frame({"a": (9000, 1800), "b": (1000, 250)}, segment="plan=pro"),  # 20% vs 25%
        ],
        ignore_index=True,
    )
    raw = frame.groupby("arm_id")["reward"].mean()
    assert raw["a"] > raw["b"]  # the paradox, in the raw data
    fitted = ts().fit(frame)
    pooled = fitted.summary_
    assert pooled["b"]["kpi_mean"] > pooled["a"]["kpi_mean"]
    assert pooled["b"]["prob_best"] > 0.9
    # half the traffic in each segment: the pooled mean is the average of the segments'
    expected = 0.5 * (
        fitted.segment_summary_["plan=free"]["b"]["kpi_mean"]
        + fitted.segment_summary_["plan=pro"]["b"]["kpi_mean"]
    )
    assert pooled["b"]["kpi_mean"] == pytest.approx(expected)
