"""The event store on SQLite and PostgreSQL: every write lands once and reads back."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from optimizer.errors import OwnershipError, StoreError
from optimizer.store import ArmSpec, AssignmentRecord, OutcomeRecord, Store, TurnRecord, schema
from optimizer.store.migrate import current_revision, upgrade

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def turn(turn_id: str = "t1", *, session: str = "s1", user: str = "u1", **kw: object) -> TurnRecord:
    base: dict[str, object] = dict(
        id=turn_id,
        session_id=session,
        user_id=user,
        experiment_id="exp",
        arm_id="a",
        prompt_id="concise",
        prompt_hash="h1",
        model="fake/echo",
        user_message="hi",
        reply="hello",
        fewshot_ids=("trial",),
        latency_ms=12.5,
        ttft_ms=3.0,
        prompt_tokens=10,
        completion_tokens=4,
        cost=0.0,
    )
    base.update(kw)
    return TurnRecord(**base)  # type: ignore[arg-type]


def test_migrated_to_head(store: Store) -> None:
    assert current_revision(store.engine) == "0011_latency"
    store.upgrade()  # idempotent
    assert current_revision(store.engine) == "0011_latency"


def test_migrations_build_the_schema_the_code_declares(store: Store) -> None:
    with store.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), schema.metadata)
    assert diff == []


def _counts(store: Store) -> dict[str, tuple[int, ...]]:
    a = schema.assignments
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(a.c.session_id, *(a.c[c] for c in schema.SESSION_COUNTS))
        ).all()
    return {r[0]: tuple(r[1:]) for r in rows}


def _assign(store: Store, session: str, user: str = "u1") -> None:
    store.record_assignment(AssignmentRecord(session, user, "exp", "a", 0.5, None, "*", {}, T0))


def test_turns_and_votes_keep_the_session_counts(store: Store) -> None:
    _assign(store, "s1")
    _assign(store, "s2", "u2")
    assert _counts(store) == {"s1": (0, 0, 0, 0, 0), "s2": (0, 0, 0, 0, 0)}
    store.record_turn(turn("t1"))
    store.record_turn(turn("t1"))  # a retried turn counts once
    store.record_turn(turn("t2", error="timeout"))
    store.record_turn(turn("t3"))
    store.record_feedback("t1", "u1", 1)
    store.record_feedback("t3", "u1", 1)
    store.record_feedback("t3", "u1", 0)  # changed: one rated turn, now down
    store.record_feedback("t2", "u1", 0)
    store.record_feedback("t2", "u1", None)  # deleted: no longer rated
    with pytest.raises(OwnershipError):
        store.record_feedback("t1", "u2", 0)
    # (turns, errors, rated, thumbs_up, thumbs_down)
    assert _counts(store) == {"s1": (3, 1, 2, 1, 1), "s2": (0, 0, 0, 0, 0)}


def test_upgrade_counts_what_an_older_database_holds(store_url: str) -> None:
    store = Store(store_url)
    try:
        upgrade(store.engine, "0001")
        a, t, f = schema.assignments, schema.turns, schema.feedback
        old_columns = {k: v for k, v in vars(turn("t1")).items() if k != "fallback"}  # 0006
        turn_row = {**old_columns, "fewshot_ids": [], "created_at": T0}
        with store.engine.begin() as conn:  # written as 0001's code did: no counts
            conn.execute(
                sa.insert(a).values(
                    session_id="s1",
                    user_id="u1",
                    experiment_id="exp",
                    arm_id="a",
                    propensity=1.0,
                    segment="*",
                    context={},
                    simulated=False,
                    assigned_at=T0,
                )
            )
            conn.execute(sa.insert(t).values(turn_row))
            conn.execute(sa.insert(t).values({**turn_row, "id": "t2", "error": "boom"}))
            conn.execute(
                sa.insert(f).values(
                    turn_id="t1",
                    user_id="u1",
                    session_id="s1",
                    value=1,
                    created_at=T0,
                    updated_at=T0,
                )
            )
        store.upgrade()
        assert _counts(store) == {"s1": (2, 1, 1, 1, 0)}
    finally:
        store.dispose()


@pytest.mark.postgres
@pytest.mark.parametrize("store_url", ["postgres"], indirect=True)  # SQLite: one writer
def test_concurrent_turns_and_votes_of_one_session_are_all_counted(store: Store) -> None:
    _assign(store, "s1")
    ids = [f"t{i}" for i in range(16)]

    def at_once(work: Callable[[str], object]) -> None:
        barrier = threading.Barrier(8)

        def run(chunk: list[str]) -> None:
            barrier.wait()
            for turn_id in chunk:
                work(turn_id)

        threads = [threading.Thread(target=run, args=(ids[i::8],)) for i in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()

    at_once(lambda turn_id: store.record_turn(turn(turn_id, error="x" if turn_id < "t2" else None)))
    at_once(lambda turn_id: store.record_feedback(turn_id, "u1", 1))
    # (turns, errors, rated, thumbs_up, thumbs_down); "t0", "t1", "t10".."t15" failed
    assert _counts(store)["s1"] == (16, 8, 16, 16, 0)


def test_sync_experiment_registers_arms_once(store: Store) -> None:
    arms = [
        ArmSpec("a", "concise", "h1"),
        ArmSpec("b", "empathetic", "h2", "fixed", {"examples": ["x"]}),
    ]
    store.sync_experiment("exp", "salt", arms)
    store.sync_experiment("exp", "salt", arms)
    assert [r.id for r in store.arms("exp")] == ["a", "b"]
    assert store.arm_statuses("exp") == {"a": "active", "b": "active"}
    events = store.frame("arm_events")
    assert list(events.kind) == ["created", "created"]


def test_changed_prompt_is_a_new_version_that_retires_the_old(store: Store) -> None:
    store.sync_experiment("exp", "salt", [ArmSpec("a", "concise", "h1", prompt_text="v1")], at=T0)
    store.record_arm_event("exp", "a", "promoted", actor="config", at=T0)
    edited = ArmSpec("a", "concise", "h2", prompt_text="v2")
    store.sync_experiment("exp", "salt", [edited], at=T0 + timedelta(hours=1))
    rows = {r.id: r for r in store.arms("exp")}
    assert set(rows) == {"a", "a@v2"}  # history kept
    assert (rows["a"].version, rows["a@v2"].version) == (1, 2)
    assert rows["a@v2"].base_id == "a" and rows["a@v2"].prompt_text == "v2"
    assert rows["a"].prompt_hash == "h1"  # the old version is not edited in place
    # the old version is retired, the champion role follows the edit
    assert store.arm_statuses("exp") == {"a": "retired", "a@v2": "champion"}
    assert store.current_arm("exp", "a") == "a@v2"
    events = store.frame("arm_events").sort_values("id")
    retired = events.query("kind == 'retired'").evidence.iloc[0]
    assert retired == {"superseded_by": "a@v2"}


def test_known_content_never_flip_flops_between_versions(store: Store) -> None:
    old, new = ArmSpec("a", "concise", "h1"), ArmSpec("a", "concise", "h2")
    store.sync_experiment("exp", "salt", [old])
    store.sync_experiment("exp", "salt", [new])  # replica with the edited prompts/
    for _ in range(3):  # rolling deploy: replicas with old and new files restart in turn
        store.sync_experiment("exp", "salt", [old])
        store.sync_experiment("exp", "salt", [new])
    assert [r.id for r in store.arms("exp")] == ["a", "a@v2"]
    assert store.arm_statuses("exp") == {"a": "retired", "a@v2": "active"}
    assert len(store.frame("arm_events")) == 3  # created, created (v2), retired


def test_model_dimension_does_not_split_todays_arms(store: Store) -> None:
    store.sync_experiment("exp", "salt", [ArmSpec("a", "concise", "h1")])
    store.sync_experiment("exp", "salt", [ArmSpec("a", "concise", "h1", model=None)])
    assert [r.id for r in store.arms("exp")] == ["a"]
    arm_id, what = store.add_arm(
        "exp", ArmSpec("a", "concise", "h1", model="openai/gpt-4o-mini"), actor="op"
    )
    assert (arm_id, what) == ("a@v2", "version")


def test_add_arm_at_run_time_is_audited_and_checked(store: Store) -> None:
    with pytest.raises(StoreError, match="not registered"):
        store.add_arm("exp", ArmSpec("new", "p", "h"), actor="op")
    store.sync_experiment("exp", "salt", [ArmSpec("a", "concise", "h1")])
    spec = ArmSpec("fresh", "fresh", "h9", prompt_text="Be brief.", origin="operator")
    assert store.add_arm("exp", spec, actor="alice") == ("fresh", "created")
    assert store.add_arm("exp", spec, actor="alice") == ("fresh", "known")
    assert store.arm_statuses("exp")["fresh"] == "active"
    row = next(r for r in store.arms("exp") if r.id == "fresh")
    assert (row.origin, row.prompt_text) == ("operator", "Be brief.")
    audit = store.frame("audit_events")
    assert list(audit.action) == ["arm_added"] and audit.actor.iloc[0] == "alice"
    with pytest.raises(ValueError, match="no '@'"):
        store.add_arm("exp", ArmSpec("x@v3", "p", "h"), actor="op")


def test_arm_status_follows_latest_event(store: Store) -> None:
    store.sync_experiment("exp", "salt", [ArmSpec("a", "p", "h"), ArmSpec("b", "p", "h")])
    store.record_arm_event("exp", "a", "promoted", actor="op")
    store.record_arm_event(
        "exp", "b", "paused_guardrail", actor="optimizer", evidence={"metric": "x"}
    )
    assert store.arm_statuses("exp") == {"a": "champion", "b": "paused_guardrail"}
    store.record_arm_event("exp", "b", "promoted", actor="op")
    assert store.arm_statuses("exp") == {"a": "active", "b": "champion"}
    store.record_arm_event("exp", "a", "retired", actor="op")
    assert store.arm_statuses("exp")["a"] == "retired"


def test_assignment_once_per_session(store: Store) -> None:
    rec = AssignmentRecord("s1", "u1", "exp", "a", 0.5, None, "*", {"plan": "free"}, T0)
    assert store.record_assignment(rec) == rec
    other = AssignmentRecord("s1", "u1", "exp", "b", 0.5, None, "*", {}, T0)
    kept = store.record_assignment(other)
    assert kept.arm_id == "a"
    assert kept.context == {"plan": "free"}
    assert kept.assigned_at == T0
    assert len(store.frame("assignments")) == 1


def test_turn_roundtrip_and_duplicate(store: Store) -> None:
    assert store.record_turn(turn()) is True
    assert store.record_turn(turn()) is False
    row = store.get_turn("t1")
    assert row is not None
    assert row.fewshot_ids == ["trial"]
    assert row.latency_ms == 12.5
    store.set_turn_trace_id("t1", "abc")
    assert store.get_turn("t1").trace_id == "abc"  # type: ignore[union-attr]


def test_feedback_current_vote_and_history(store: Store) -> None:
    store.record_turn(turn())
    store.record_feedback("t1", "u1", 1, "great", at=T0)
    store.record_feedback("t1", "u1", 0, "changed my mind", at=T0 + timedelta(minutes=1))
    current = store.get_feedback("t1", "u1")
    assert current is not None
    assert (current.value, current.comment) == (0, "changed my mind")
    store.record_feedback("t1", "u1", None, at=T0 + timedelta(minutes=2))
    assert store.get_feedback("t1", "u1").value is None  # type: ignore[union-attr]
    history = store.frame("feedback_events").sort_values("id")
    assert list(history.kind) == ["upsert", "upsert", "delete"]
    assert len(store.frame("feedback")) == 1


def test_feedback_on_someone_elses_turn_refused(store: Store) -> None:
    store.record_turn(turn(user="alice"))
    with pytest.raises(OwnershipError, match="cannot rate"):
        store.record_feedback("t1", "mallory", 1)
    with pytest.raises(OwnershipError):
        store.record_feedback("missing-turn", "alice", 1)
    assert store.frame("feedback_events").empty


def test_feedback_value_checked(store: Store) -> None:
    store.record_turn(turn())
    with pytest.raises(ValueError, match="value must be"):
        store.record_feedback("t1", "u1", 5)


def test_outcome_idempotent(store: Store) -> None:
    rec = OutcomeRecord(
        "order-42", "conversion", 1.0, session_id="s1", occurred_at=T0, source="api"
    )
    assert store.record_outcome(rec) is True
    assert store.record_outcome(rec) is False
    df = store.frame("outcomes")
    assert len(df) == 1
    assert df.occurred_at.iloc[0] == T0


def test_outcome_needs_session_or_user(store: Store) -> None:
    with pytest.raises(ValueError, match="session_id or a user_id"):
        store.record_outcome(OutcomeRecord("k", "conversion", 1.0))


def test_snapshot_versions_increase(store: Store) -> None:
    assert store.latest_snapshot("exp") is None
    v1 = store.save_snapshot("exp", "uniform", {"segments": {"*": {"a": 1.0}}}, {})
    v2 = store.save_snapshot("exp", "thompson", {"segments": {"*": {"a": 0.4, "b": 0.6}}}, {"n": 3})
    assert (v1, v2) == (1, 2)
    latest = store.latest_snapshot("exp")
    assert latest is not None
    assert latest.version == 2
    assert latest.allocation["segments"]["*"]["b"] == 0.6


def test_frame_timestamps_are_utc(store: Store) -> None:
    store.record_turn(turn(created_at=T0))
    df = store.frame("turns")
    assert str(df.created_at.dt.tz) == "UTC"
    assert df.created_at.iloc[0] == T0


def test_audit(store: Store) -> None:
    store.audit("operator", "pause", "exp/a", {"reason": "test"})
    df = store.frame("audit_events")
    assert df.action.tolist() == ["pause"]
