"""Sticky assignment with logged propensities, on both backends."""

from __future__ import annotations

from collections import Counter

import pytest

from optimizer.assignment import Assigner, choose_arm, segment_key, user_point
from optimizer.errors import PolicyError
from optimizer.store import ArmSpec, Store

ARMS = [ArmSpec(a, a, "h") for a in ("a", "b", "c")]


@pytest.fixture
def exp_store(store: Store) -> Store:
    store.sync_experiment("exp", "salt", ARMS)
    return store


def test_choose_arm_slices() -> None:
    alloc = {"b": 0.5, "a": 0.25, "c": 0.25}
    assert choose_arm(alloc, 0.0) == ("a", 0.25)
    assert choose_arm(alloc, 0.26) == ("b", 0.5)
    assert choose_arm(alloc, 0.99) == ("c", 0.25)
    assert choose_arm({"a": 0.0, "b": 1.0}, 0.0) == ("b", 1.0)
    with pytest.raises(PolicyError):
        choose_arm({"a": 0.0}, 0.5)


def test_user_point_is_stable_and_uniform() -> None:
    assert user_point("alice", "s") == user_point("alice", "s")
    assert user_point("alice", "s") != user_point("alice", "t")
    points = [user_point(f"user-{i}", "salt") for i in range(20_000)]
    assert all(0 <= p < 1 for p in points)
    deciles = Counter(int(p * 10) for p in points)
    assert min(deciles.values()) > 1800  # 2000 expected per decile


def test_segment_key() -> None:
    assert segment_key({"plan": "pro"}, ()) == "*"
    assert (
        segment_key({"plan": "pro", "channel": "web"}, ("plan", "channel"))
        == "plan=pro|channel=web"
    )
    assert segment_key({}, ("plan",)) == "plan="


def test_uniform_before_snapshot(exp_store: Store) -> None:
    assigner = Assigner(exp_store, "exp", salt="salt", snapshot_ttl_s=0)
    records = [assigner.assign(f"s{i}", f"u{i}") for i in range(300)]
    assert all(r.propensity == pytest.approx(1 / 3) for r in records)
    assert {r.snapshot_version for r in records} == {None}
    counts = Counter(r.arm_id for r in records)
    assert set(counts) == {"a", "b", "c"}
    assert min(counts.values()) > 60


def test_session_assigned_once(exp_store: Store) -> None:
    assigner = Assigner(exp_store, "exp", salt="salt")
    first = assigner.assign("s1", "u1", {"plan": "free"})
    again = assigner.assign("s1", "u1", {"plan": "pro"})
    assert again == first
    assert len(exp_store.frame("assignments")) == 1


def test_sticky_across_sessions_and_restarts(exp_store: Store) -> None:
    first = Assigner(exp_store, "exp", salt="salt").assign("s1", "alice")
    # A new process (new Assigner, new Store on the same database) keeps alice's arm.
    other = Store(exp_store.url)
    second = Assigner(other, "exp", salt="salt").assign("s2", "alice")
    other.dispose()
    assert second.arm_id == first.arm_id
    assert second.context.get("returning") is True


def test_snapshot_allocation_and_version_logged(exp_store: Store) -> None:
    exp_store.save_snapshot(
        "exp", "thompson", {"segments": {"*": {"a": 0.0, "b": 0.8, "c": 0.2}}}, {}
    )
    assigner = Assigner(exp_store, "exp", salt="salt", snapshot_ttl_s=0)
    records = [assigner.assign(f"s{i}", f"u{i}") for i in range(200)]
    assert {r.snapshot_version for r in records} == {1}
    assert "a" not in {r.arm_id for r in records}
    for r in records:
        assert r.propensity == pytest.approx({"b": 0.8, "c": 0.2}[r.arm_id])


def test_segment_allocation(exp_store: Store) -> None:
    alloc = {"segments": {"*": {"a": 1.0}, "plan=pro": {"c": 1.0}}}
    exp_store.save_snapshot("exp", "thompson", alloc, {})
    assigner = Assigner(exp_store, "exp", salt="salt", segment_by=("plan",), snapshot_ttl_s=0)
    assert assigner.assign("s1", "u1", {"plan": "pro"}).arm_id == "c"
    free = assigner.assign("s2", "u2", {"plan": "free"})
    assert (free.arm_id, free.segment) == ("a", "plan=free")


def test_paused_arm_not_served_even_if_snapshot_says_so(exp_store: Store) -> None:
    exp_store.save_snapshot("exp", "thompson", {"segments": {"*": {"a": 0.5, "b": 0.5}}}, {})
    exp_store.record_arm_event("exp", "a", "paused_operator", actor="op")
    assigner = Assigner(exp_store, "exp", salt="salt", snapshot_ttl_s=0)
    records = [assigner.assign(f"s{i}", f"u{i}") for i in range(50)]
    assert {r.arm_id for r in records} == {"b"}
    assert {r.propensity for r in records} == {1.0}


def test_returning_user_moves_when_arm_stops(exp_store: Store) -> None:
    assigner = Assigner(exp_store, "exp", salt="salt", snapshot_ttl_s=0)
    first = assigner.assign("s1", "alice")
    exp_store.record_arm_event("exp", first.arm_id, "retired", actor="op")
    assert assigner.assign("s2", "alice").arm_id != first.arm_id


def test_no_active_arm_is_an_error(exp_store: Store) -> None:
    for arm in ARMS:
        exp_store.record_arm_event("exp", arm.id, "retired", actor="op")
    with pytest.raises(PolicyError, match="no active arm"):
        Assigner(exp_store, "exp", salt="salt").assign("s1", "u1")
