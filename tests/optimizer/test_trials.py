"""A proposal's trial ends on futility, on enough sessions or on its deadline.

Real store, real candidate records and arm events; the policy summary is the
input the optimizer job hands :func:`manage_trials` (means and 95% intervals).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from optimizer.config import ProposerConfig
from optimizer.proposer import records
from optimizer.proposer.trials import TRIAL_CAP_FLOOR, manage_trials, trial_cap_for
from optimizer.store import ArmSpec, Store, schema
from tests.optimizer.test_proposer import EXP, GOOD, make_config

T0 = datetime(2025, 6, 2, 9, 0, tzinfo=UTC)


def started_proposal(store: Store) -> str:
    store.sync_experiment(EXP, EXP, [ArmSpec("concise", "concise", "h1", prompt_text="P")], at=T0)
    round_id = records.record_round(
        store, EXP, "concise", source="proposer", model="m", cost_usd=0.0, details={}, at=T0
    )
    cid = records.record_candidate(
        store,
        round_id=round_id,
        experiment_id=EXP,
        parent_arm_id="concise",
        source="proposer",
        prompt_text=GOOD,
        fewshot="none",
        fewshot_config={},
        rationale="r",
        status="waiting",
        reason=None,
        gates=[],
        at=T0,
    )
    candidate = records.get_candidate(store, cid)
    assert candidate is not None
    return records.start_candidate(
        store,
        candidate,
        prompt_id="concise",
        prompt_hash="h2",
        model=None,
        actor="optimizer",
        at=T0,
        trial_cap=0.05,
    )


def summary(arm: str, *, n: float, mean: float, half_width: float) -> dict[str, Any]:
    return {
        "champion": "concise",
        "arms": {
            "concise": {"kpi_mean": 0.04, "kpi_ci": [0.039, 0.041], "effective_sessions": 50000},
            arm: {
                "kpi_mean": mean,
                "kpi_ci": [mean - half_width, mean + half_width],
                "effective_sessions": n,
            },
        },
    }


def last_event(store: Store, arm: str) -> tuple[str, dict[str, Any]]:
    ev = schema.arm_events
    with store.engine.connect() as conn:
        row = conn.execute(
            ev.select().where(ev.c.arm_id == arm).order_by(ev.c.id.desc()).limit(1)
        ).first()
    assert row is not None
    return str(row.kind), dict(row.evidence or {})


CFG = make_config(trial_cap=0.05, trial_sessions=1500, trial_min_sessions=300, trial_days=14)


def test_a_clearly_worse_proposal_stops_early(store: Store) -> None:
    arm = started_proposal(store)
    worse = summary(arm, n=250, mean=0.025, half_width=0.01)  # P(above) ~ 0.002
    assert manage_trials(store, CFG, worse, now=T0 + timedelta(days=3)) == {
        "graduated": [],
        "retired": [],
        "capped": [arm],
    }  # under trial_min_sessions: too early to call, but its cap drops to the floor
    kind, evidence = last_event(store, arm)
    assert kind == "cap_set" and evidence["cap"] == pytest.approx(0.05 * TRIAL_CAP_FLOOR)
    worse["arms"][arm]["effective_sessions"] = 320
    out = manage_trials(store, CFG, worse, now=T0 + timedelta(days=4))
    assert out["retired"] == [arm]
    kind, evidence = last_event(store, arm)
    assert kind == "retired" and evidence["ended"] == "futility"
    assert evidence["probability_above_champion"] < 0.1


def test_a_merely_uncertain_proposal_is_not_stopped_before_its_end(store: Store) -> None:
    arm = started_proposal(store)
    unsure = summary(arm, n=800, mean=0.038, half_width=0.012)  # P(above) ~ 0.37
    assert manage_trials(store, CFG, unsure, now=T0 + timedelta(days=10))["retired"] == []


def test_the_deadline_ends_a_starved_trial(store: Store) -> None:
    arm = started_proposal(store)
    starved = summary(arm, n=700, mean=0.038, half_width=0.012)
    assert manage_trials(store, CFG, starved, now=T0 + timedelta(days=13))["retired"] == []
    out = manage_trials(store, CFG, starved, now=T0 + timedelta(days=14, hours=1))
    assert out["retired"] == [arm]
    kind, evidence = last_event(store, arm)
    assert kind == "retired"
    assert evidence["ended"] == "deadline" and evidence["trial_days"] == pytest.approx(14.04, 0.01)


def test_a_good_proposal_graduates_at_the_deadline_or_on_sessions(store: Store) -> None:
    arm = started_proposal(store)
    good = summary(arm, n=1500, mean=0.05, half_width=0.008)
    out = manage_trials(store, CFG, good, now=T0 + timedelta(days=6))
    assert out["graduated"] == [arm]
    kind, evidence = last_event(store, arm)
    assert kind == "cap_set" and evidence["cap"] == 1.0 and evidence["ended"] == "sessions"
    # graduated: never looked at again, even when it later looks worse
    bad = summary(arm, n=2000, mean=0.02, half_width=0.005)
    assert manage_trials(store, CFG, bad, now=T0 + timedelta(days=30)) == {
        "graduated": [],
        "retired": [],
        "capped": [],
    }


def test_a_running_trials_cap_follows_the_evidence(store: Store) -> None:
    arm = started_proposal(store)
    even = summary(arm, n=200, mean=0.04, half_width=0.012)  # P(above) 0.5: full cap kept
    assert manage_trials(store, CFG, even, now=T0 + timedelta(days=1))["capped"] == []
    leaning = summary(arm, n=500, mean=0.036, half_width=0.01)  # P(above) ~ 0.22
    assert manage_trials(store, CFG, leaning, now=T0 + timedelta(days=2))["capped"] == [arm]
    kind, evidence = last_event(store, arm)
    assert kind == "cap_set" and evidence["trial"] == "running"
    p = evidence["probability_above_champion"]
    assert evidence["cap"] == pytest.approx(trial_cap_for(p, 0.05)) and evidence["cap"] < 0.03
    # a small move is not recorded (no event per run) ...
    assert manage_trials(store, CFG, leaning, now=T0 + timedelta(days=2, hours=6))["capped"] == []
    # ... and recovering evidence gives the cap back; the deadline still counts from the start
    better = summary(arm, n=900, mean=0.043, half_width=0.008)
    assert manage_trials(store, CFG, better, now=T0 + timedelta(days=5))["capped"] == [arm]
    assert last_event(store, arm)[1]["cap"] == 0.05
    assert manage_trials(store, CFG, better, now=T0 + timedelta(days=14, hours=1))["retired"] == [
        arm
    ]  # P(above) ~ 0.73 < keep_probability 0.8 at the deadline


def test_stop_probability_must_be_below_keep_probability() -> None:
    with pytest.raises(ValueError, match="stop_probability"):
        ProposerConfig(stop_probability=0.8, keep_probability=0.8)
