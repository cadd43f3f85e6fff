"""Sample-ratio mismatch against the allocation that was in force, on real assignments."""

from __future__ import annotations

from datetime import timedelta

import pandas as pd
import pytest

from optimizer import kpi, srm
from optimizer.assignment import Assigner
from optimizer.store import Store
from tests.support.optimizer_events import EXPERIMENT, T0, add_sessions, make_config, register


def result(store: Store, now_days: float = 30) -> srm.SRMResult:
    config = make_config(["a", "b", "c"])
    frame = kpi.session_frame(store, config, now=T0 + timedelta(days=now_days))
    versions = frame["snapshot_version"].dropna().unique().tolist()
    return srm.srm_check(
        frame,
        srm.load_allocations(store, EXPERIMENT, versions),
        activity=srm.arm_activity(store, EXPERIMENT),
    )


def assign_many(store: Store, n: int, *, start: int = 0, days: float = 0.0) -> None:
    assigner = Assigner(store, EXPERIMENT, salt=EXPERIMENT, snapshot_ttl_s=3600)
    for i in range(start, start + n):
        assigner.assign(f"s{i}", f"u{i}", at=T0 + timedelta(days=days, seconds=i))


def test_fair_split_from_the_real_assigner_passes(store: Store) -> None:
    register(store, make_config(["a", "b", "c"]))
    assign_many(store, 90)  # before any snapshot: uniform
    store.save_snapshot(
        EXPERIMENT, "thompson", {"segments": {"*": {"a": 0.7, "b": 0.2, "c": 0.1}}}, {}
    )
    assign_many(store, 210, start=90, days=1)
    res = result(store)
    assert res.p_value is not None and not res.warning
    assert res.sessions == 300
    assert res.expected["a"] == pytest.approx(30 + 0.7 * 210)


def test_skewed_split_is_flagged(store: Store) -> None:
    register(store, make_config(["a", "b", "c"]))
    add_sessions(store, "a", 500)  # uniform intended (no snapshot), but a got far more
    add_sessions(store, "b", 300)
    add_sessions(store, "c", 300)
    res = result(store)
    assert res.warning and res.p_value < 0.001
    assert res.observed == {"a": 500, "b": 300, "c": 300}


def test_split_against_a_snapshot_is_flagged_when_ignored(store: Store) -> None:
    register(store, make_config(["a", "b", "c"]))
    version = store.save_snapshot(
        EXPERIMENT, "thompson", {"segments": {"*": {"a": 0.8, "b": 0.1, "c": 0.1}}}, {}
    )
    for arm in "abc":  # logged under the snapshot, but split evenly
        add_sessions(store, arm, 200, version=version)
    assert result(store).warning


def test_returning_users_are_not_counted(store: Store) -> None:
    register(store, make_config(["a", "b", "c"]))
    for arm in "abc":
        add_sessions(store, arm, 200)
    loyal = [f"loyal-{i}" for i in range(50)]
    add_sessions(store, "a", 50, users=loyal, at=T0 - timedelta(days=1))
    add_sessions(store, "a", 300, users=loyal * 6)  # sticky: same arm again and again
    res = result(store)
    assert res.sessions == 650 and not res.warning


def test_arms_paused_mid_snapshot_are_taken_out_of_the_intended_split(store: Store) -> None:
    register(store, make_config(["a", "b", "c"]))
    add_sessions(store, "a", 300)
    add_sessions(store, "b", 300)
    add_sessions(store, "c", 300)
    store.record_arm_event(
        EXPERIMENT, "c", "paused_operator", actor="op", at=T0 + timedelta(days=1)
    )
    later = T0 + timedelta(days=2)
    add_sessions(store, "a", 300, at=later)
    add_sessions(store, "b", 300, at=later)
    res = result(store)
    assert not res.warning
    assert res.expected["c"] == 300


def test_too_few_sessions_are_not_tested() -> None:
    frame = pd.DataFrame(
        {
            "user_id": ["u1", "u2", "u3"],
            "arm_id": ["a", "a", "b"],
            "snapshot_version": None,
            "segment": "*",
            "assigned_at": pd.Timestamp(T0),
        }
    )
    res = srm.srm_check(frame, {})
    assert res.p_value is None and not res.warning
    assert res.to_dict()["sessions"] == 3
