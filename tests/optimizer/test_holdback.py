"""The holdback: a sticky share of users on the baseline, outside the bandit, and the lift."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from optimizer.assignment import Assigner
from optimizer.holdback import bandit_frame, holdback_lift
from optimizer.scenario import parse_scenario
from optimizer.simulator import simulate
from optimizer.store import ArmSpec, Store


def test_holdback_share_is_within_tolerance_over_10k_simulated_sessions(tmp_path: Path) -> None:
    scenario = parse_scenario(
        {
            "name": "holdback",
            "sessions": 10_000,
            "sessions_per_day": 2000,
            "refit_every_hours": 24,
            "holdback": 0.05,
            "champion": "a",
            "returning_share": 0.2,
            "delay": {"distribution": "none"},
            "arms": [{"id": "a", "conversion": 0.02}, {"id": "b", "conversion": 0.08}],
        }
    )
    url = f"sqlite:///{tmp_path / 'sim.db'}"
    result = simulate(scenario, policy="thompson", seed=3, database_url=url)
    store = Store(url)
    frame = store.frame("assignments")
    store.dispose()
    held = frame[frame["holdback"].astype(bool)]
    share = len(held) / len(frame)
    assert len(frame) == 10_000
    assert abs(share - 0.05) < 4 * math.sqrt(0.05 * 0.95 / 10_000)
    assert set(held["arm_id"]) == {"a"}  # the baseline, however the bandit moved
    # the bandit moved the rest of the traffic to b; holdback users stayed where they were
    assert result.sessions_per_arm["b"] > 0.8 * (10_000 - len(held))
    assert held.groupby("user_id")["holdback"].all().all()


def test_holdback_users_stay_on_the_baseline_whatever_is_promoted(store: Store) -> None:
    store.sync_experiment("exp", "salt", [ArmSpec("a", "p", "h"), ArmSpec("b", "p", "h")])
    store.save_snapshot("exp", "thompson", {"segments": {"*": {"b": 1.0}}}, {})
    store.record_arm_event("exp", "b", "promoted", actor="optimizer")
    assigner = Assigner(store, "exp", salt="salt", holdback=0.1, baseline="a")
    records = [assigner.assign(f"s{i}", f"u{i}") for i in range(4000)]
    held = [r for r in records if r.holdback]
    share = len(held) / len(records)
    assert abs(share - 0.1) < 4 * math.sqrt(0.1 * 0.9 / 4000)
    assert {r.arm_id for r in held} == {"a"} and {r.propensity for r in held} == {1.0}
    assert {r.arm_id for r in records if not r.holdback} == {"b"}
    # sticky: a user's next session is in the holdback again, on the baseline
    again = assigner.assign("s0-next", held[0].user_id)
    assert again.holdback and again.arm_id == "a"
    assert store.get_assignment(held[0].session_id).holdback  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="needs a baseline"):
        Assigner(store, "exp", salt="salt", holdback=0.1)


def test_lift_has_an_interval_and_the_bandit_never_sees_the_holdback() -> None:
    rng = np.random.default_rng(0)
    n = 20_000
    hold = rng.random(n) < 0.05
    reward = np.where(hold, rng.random(n) < 0.03, rng.random(n) < 0.05).astype(float)
    frame = pd.DataFrame(
        {"arm_id": np.where(hold, "a", "b"), "reward": reward, "complete": True, "holdback": hold}
    )
    lift = holdback_lift(frame, share=0.05, samples=20_000, random_state=0)
    assert lift["holdback_sessions"] == int(hold.sum())
    lo, hi = lift["lift_ci"]
    assert lo < lift["lift"] < hi and lo < 0.02 < hi and lo > 0  # it is a real lift
    assert lift["srm_p_value"] > 0.001
    assert not bandit_frame(frame)["holdback"].any() and len(bandit_frame(frame)) == (~hold).sum()
    empty = holdback_lift(frame.assign(holdback=False), share=0.05)
    assert empty["lift"] is None and empty["srm_p_value"] < 1e-6  # no holdback at all: mismatch
