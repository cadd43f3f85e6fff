"""The guardrail floor: a suspect arm and the champion keep their share until the check decides.

A valid guardrail pauses on votes; a bandit that starves a breaching arm (or the champion)
leaves the breach undecided. An arm whose check is undecided and more likely than not in
breach — a *suspect* — keeps ``policy.guardrail_floor`` without decay, and so does the
champion it is compared with (bench/aa.py measures the power this buys).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from optimizer.config import GuardrailConfig
from optimizer.guardrails import check_guardrails
from optimizer.policy import ThompsonSamplingPolicy
from optimizer.refit import run_optimizer
from optimizer.store import Store
from tests.support.optimizer_events import T0, add_sessions, make_config, register

RAILS = [GuardrailConfig(metric="thumbs_down_rate", max_delta=0.05)]


def _check(arm_votes: int, arm_downs: int, champ_votes: int = 4000, champ_downs: int = 800):
    frame = pd.DataFrame(
        {
            "arm_id": ["champ", "arm"],
            "rated": [champ_votes, arm_votes],
            "thumbs_down": [champ_downs, arm_downs],
        }
    )
    (check,) = check_guardrails(
        frame, RAILS, champion="champ", arms=["arm"], pause_probability=0.95, random_state=0
    )
    return check


def test_suspect_undecided_and_decided() -> None:
    breach_so_far = _check(200, 58)  # 29% vs 20%: looks like a breach, too few votes to pause
    assert not breach_so_far.breached and breach_so_far.undecided and breach_so_far.suspect
    assert breach_so_far.upper_bound > breach_so_far.lower_bound
    assert breach_so_far.evidence()["suspect"] is True
    healthy = _check(3000, 600)  # as good as the champion, with plenty of votes: shown within
    assert not healthy.undecided and not healthy.suspect
    assert healthy.upper_bound is not None and healthy.upper_bound <= 0.05
    paused = _check(4000, 1200)  # 30% vs 20% on 4,000 votes: decided the other way
    assert paused.breached and not paused.undecided and not paused.suspect
    too_few = _check(20, 10)  # under the minimum sample: no bounds, never a suspect
    assert too_few.upper_bound is None and not too_few.suspect


def _frame() -> pd.DataFrame:
    rng = np.random.default_rng(0)
    arms = ["a"] * 3000 + ["b"] * 3000 + ["c"] * 3000
    p = {"a": 0.03, "b": 0.02, "c": 0.06}
    return pd.DataFrame(
        {"arm_id": arms, "reward": [float(rng.random() < p[x]) for x in arms], "complete": True}
    )


def test_a_suspect_and_the_champion_keep_the_guardrail_floor() -> None:
    frame = _frame()  # c wins clearly; a (champion) and b would get only the decayed floor
    plain = ThompsonSamplingPolicy(random_state=0).fit(frame, champion="a")
    assert plain.allocation_["*"]["b"] < 0.01 and plain.allocation_["*"]["a"] < 0.05
    held = ThompsonSamplingPolicy(guardrail_floor=0.1, random_state=0).fit(
        frame, champion="a", guardrail_suspects=["b", "gone"]
    )
    assert held.guardrail_held_ == ["a", "b"]  # the champion too; inactive names ignored
    assert held.allocation_["*"]["b"] >= 0.1 - 1e-9 and held.allocation_["*"]["a"] >= 0.1 - 1e-9
    off = ThompsonSamplingPolicy(guardrail_floor=0.0, random_state=0).fit(
        frame, champion="a", guardrail_suspects=["b"]
    )
    assert off.allocation_["*"] == plain.allocation_["*"]


def test_the_optimizer_holds_a_suspect_until_its_check_decides(store: Store) -> None:
    config = make_config(("a", "b"), guardrails=RAILS, burn_in=0, challenger_min_sessions=0)
    register(store, config)
    add_sessions(store, "a", 1500, turns=1, ups=1200, downs=300, conversions=90)  # 20% thumbs-down
    add_sessions(store, "b", 150, turns=1, ups=105, downs=45, conversions=3)  # 30%, 150 votes
    run = run_optimizer(store, config, now=T0 + pd.Timedelta(days=10), random_state=0)
    check = run.summary["arms"]["b"]["guardrails"]["thumbs_down_rate"]
    assert check["suspect"] and not check["breached"]
    assert run.summary["guardrail_held"] == ["a", "b"]
    assert run.allocation["segments"]["*"]["b"] >= 0.1 - 1e-9
    assert run.paused == ()
