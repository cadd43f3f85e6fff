"""An outcome of a conversation that moved arms counts for the assignment open when it happened.

A paused (or retired) arm stops serving: the conversation goes on under a new assignment
``<thread>~n`` on another arm (Store.reassign). The integrator only knows the chat's id, so
it reports outcomes with the thread id. What the user did after the move happened under the
new arm: the verdict (optimizer.attribution) and the KPI (optimizer.kpi) both credit it
there, and what happened before the move stays with the closed assignment.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import timedelta

import sqlalchemy as sa

from optimizer import kpi
from optimizer.attribution import attribute, reattribute
from optimizer.store import AssignmentRecord, OutcomeRecord, Store, schema
from tests.support.optimizer_events import EXPERIMENT, T0, make_config, register

HOUR = timedelta(hours=1)


def _moved_conversation(store: Store) -> None:
    """Thread ``t1`` on arm a from T0; moved to arm b (``t1~1``) at T0 + 1 h."""
    first = AssignmentRecord("t1", "u1", EXPERIMENT, "a", 0.5, None, "*", {}, T0)
    store.record_assignment(first)
    moved = replace(
        first, session_id="t1~1", arm_id="b", propensity=1.0, assigned_at=T0 + HOUR, thread_id="t1"
    )
    store.reassign(first, moved, "arm 'a' is paused_guardrail: moved to the champion 'b'")


def _verdict(store: Store, session_id: str, at: object) -> str | None:
    config = make_config()
    return attribute(
        store, config, session_id=session_id, user_id=None, name="conversion", occurred_at=at
    ).session_id  # type: ignore[arg-type]


def test_the_verdict_names_the_assignment_open_at_the_outcome(store: Store) -> None:
    register(store, make_config())
    _moved_conversation(store)
    assert _verdict(store, "t1", T0 + 2 * HOUR) == "t1~1"  # after the move: the new arm
    assert _verdict(store, "t1", T0 + 0.5 * HOUR) == "t1"  # before it: the closed one
    # Whichever id of the conversation is named, the time decides.
    assert _verdict(store, "t1~1", T0 + 0.5 * HOUR) == "t1"
    assert _verdict(store, "t1~1", T0 + 3 * HOUR) == "t1~1"
    # Before the conversation started: the named session, judged by the usual rules.
    config = make_config()
    early = attribute(
        store,
        config,
        session_id="t1",
        user_id=None,
        name="conversion",
        occurred_at=T0 - HOUR,
    )
    assert (early.attributed, early.reason, early.session_id) == (False, "before_session", "t1")


def test_the_kpi_credits_the_arm_serving_when_the_outcome_happened(store: Store) -> None:
    config = make_config()
    register(store, config)
    _moved_conversation(store)
    # An unmoved conversation on arm a, for contrast.
    store.record_assignment(AssignmentRecord("t2", "u2", EXPERIMENT, "a", 0.5, None, "*", {}, T0))
    for key, sid, at in (
        ("after-move", "t1", T0 + 2 * HOUR),
        ("plain", "t2", T0 + 2 * HOUR),
    ):
        store.record_outcome(OutcomeRecord(key, "conversion", 1.0, session_id=sid, occurred_at=at))
    frame = kpi.session_frame(store, config, now=T0 + 10 * 24 * HOUR).set_index("session_id")
    assert frame.loc["t1~1", "arm_id"] == "b" and frame.loc["t1~1", "conversion"] == 1.0
    assert frame.loc["t1", "conversion"] == 0.0  # the closed assignment is not credited
    assert frame.loc["t2", "conversion"] == 1.0

    # An outcome of the same thread from before the move stays with the closed assignment.
    store.record_outcome(
        OutcomeRecord("before-move", "conversion", 1.0, session_id="t1", occurred_at=T0 + HOUR / 2)
    )
    frame = kpi.session_frame(store, config, now=T0 + 10 * 24 * HOUR).set_index("session_id")
    assert frame.loc["t1", "conversion"] == 1.0 and frame.loc["t1~1", "conversion"] == 1.0


def test_reattribute_moves_the_stored_verdict_too(store: Store) -> None:
    """An outcome judged before the move (the thread's only session then) is re-judged."""
    config = make_config()
    register(store, config)
    first = AssignmentRecord("t1", "u1", EXPERIMENT, "a", 0.5, None, "*", {}, T0)
    store.record_assignment(first)
    # Reported ahead of the move being visible (another replica moved it a moment later).
    store.record_outcome(
        OutcomeRecord(
            "late",
            "conversion",
            1.0,
            session_id="t1",
            occurred_at=T0 + 2 * HOUR,
            attribution="unknown_session",
        )
    )
    moved = replace(
        first, session_id="t1~1", arm_id="b", propensity=1.0, assigned_at=T0 + HOUR, thread_id="t1"
    )
    store.reassign(first, moved, "moved")
    assert reattribute(store, config) == {"attributed": 1}
    o = schema.outcomes
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(o.c.attribution, o.c.attributed_session_id)).one()
    assert tuple(row) == ("attributed", "t1~1")
