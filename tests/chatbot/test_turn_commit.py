"""Group commit of chat turns: Store.record_turns and chatbot.runtime.TurnCommitter."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import sqlalchemy as sa

from chatbot.runtime import TurnCommitter
from optimizer.clock import utcnow
from optimizer.store import AssignmentRecord, Store, schema
from tests.optimizer.test_store import turn


def _assign(store: Store, session: str) -> None:
    store.record_assignment(
        AssignmentRecord(session, "u1", "exp", "a", 0.5, None, "*", {}, utcnow())
    )


def _session_counts(store: Store) -> dict[str, tuple[int, int]]:
    a = schema.assignments
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(a.c.session_id, a.c.turns, a.c.errors)).all()
    return {r.session_id: (r.turns, r.errors) for r in rows}


def _stored_turns(store: Store) -> list[str]:
    with store.engine.connect() as conn:
        return sorted(conn.execute(sa.select(schema.turns.c.id)).scalars())


def _commits(engine: sa.Engine) -> list[int]:
    count = [0]

    @sa.event.listens_for(engine, "commit")
    def on_commit(_conn: Any) -> None:
        count[0] += 1

    return count


def test_record_turns_stores_a_batch_and_keeps_the_session_counts(store: Store) -> None:
    _assign(store, "s1")
    _assign(store, "s2")
    batch = [turn("t1"), turn("t2", error="timeout"), turn("t3", session="s2")]
    assert store.record_turns(batch) == [True, True, True]
    assert _stored_turns(store) == ["t1", "t2", "t3"]
    assert _session_counts(store) == {"s1": (2, 1), "s2": (1, 0)}
    assert store.record_turns([]) == []


def test_a_batch_with_a_duplicate_stores_each_turn_once(store: Store) -> None:
    _assign(store, "s1")
    store.record_turn(turn("t1"))
    assert store.record_turns([turn("t2"), turn("t1"), turn("t3"), turn("t3")]) == [
        True,
        False,
        True,
        False,
    ]
    assert _stored_turns(store) == ["t1", "t2", "t3"]
    assert _session_counts(store) == {"s1": (3, 0)}  # a retried turn counts once


async def test_turns_finishing_together_share_few_commits(store: Store) -> None:
    _assign(store, "s1")
    committer = TurnCommitter(store)
    commits = _commits(store.engine)
    ids = [f"t{i:02d}" for i in range(50)]
    results = await asyncio.gather(*(committer.record(turn(i)) for i in ids))
    assert results == [True] * 50
    assert _stored_turns(store) == ids  # each answered only once committed
    assert _session_counts(store) == {"s1": (50, 0)}
    assert commits[0] < 50  # one transaction per batch, not per turn
    assert await committer.record(turn("t00")) is False  # a retried turn counts once


async def test_a_failed_commit_is_raised_to_every_caller_and_the_next_one_works(
    store: Store,
) -> None:
    _assign(store, "s1")
    committer = TurnCommitter(store)
    with store.engine.begin() as conn:  # the table is gone: the transaction fails
        conn.execute(sa.text("ALTER TABLE turns RENAME TO turns_away"))
    results = await asyncio.gather(
        *(committer.record(turn(f"t{i}")) for i in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, sa.exc.SQLAlchemyError) for r in results)
    with store.engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE turns_away RENAME TO turns"))
    assert await committer.record(turn("t9")) is True
    assert _stored_turns(store) == ["t9"]


def test_bad_batch_size_is_named(store: Store) -> None:
    with pytest.raises(ValueError, match="max_batch"):
        TurnCommitter(store, max_batch=0)
