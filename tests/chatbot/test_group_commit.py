"""Group commit of chat turns and votes: Store.record_turns, Store.record_votes and
chatbot.runtime.GroupCommitter."""

from __future__ import annotations

import asyncio

import pytest
import sqlalchemy as sa

from chatbot.runtime import GroupCommitter
from optimizer.clock import utcnow
from optimizer.errors import OwnershipError
from optimizer.store import AssignmentRecord, Store, VoteRecord, schema
from tests.optimizer.test_store import turn
from tests.support.chat_helpers import commit_counter


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
    committer = GroupCommitter(store.record_turns)
    commits = commit_counter(store.engine)
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
    committer = GroupCommitter(store.record_turns)
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
        GroupCommitter(store.record_turns, max_batch=0)


def _votes(store: Store) -> dict[str, tuple[int | None, str | None]]:
    f = schema.feedback
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(f.c.turn_id, f.c.value, f.c.comment)).all()
    return {r.turn_id: (r.value, r.comment) for r in rows}


def _vote_counts(store: Store) -> dict[str, tuple[int, int, int]]:
    a = schema.assignments
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(a.c.session_id, a.c.rated, a.c.thumbs_up, a.c.thumbs_down)
        ).all()
    return {r.session_id: (r.rated, r.thumbs_up, r.thumbs_down) for r in rows}


def test_record_votes_refuses_one_vote_without_holding_back_the_others(store: Store) -> None:
    _assign(store, "s1")
    _assign(store, "s2")
    store.record_turns([turn("t1"), turn("t2"), turn("t3", session="s2")])
    results = store.record_votes(
        [
            VoteRecord("t1", "u1", 1, "clear"),
            VoteRecord("t2", "mallory", 0),  # not her turn
            VoteRecord("t2", "u1", 0, "vague"),
            VoteRecord("t3", "u1", 7),  # not a vote value
            VoteRecord("missing", "u1", 1),
            VoteRecord("t1", "u1", 0, "changed my mind"),  # later in the batch wins
            VoteRecord("t3", "u1", 1),
        ]
    )
    assert [type(r).__name__ if r else None for r in results] == [
        None,
        "OwnershipError",
        None,
        "ValueError",
        "OwnershipError",
        None,
        None,
    ]
    assert _votes(store) == {"t1": (0, "changed my mind"), "t2": (0, "vague"), "t3": (1, None)}
    assert _vote_counts(store) == {"s1": (2, 0, 2), "s2": (1, 1, 0)}
    fe = schema.feedback_events
    with store.engine.connect() as conn:
        events = conn.execute(sa.select(sa.func.count()).select_from(fe)).scalar_one()
    assert events == 4  # one event per accepted vote, none for the refused ones
    assert store.record_votes([]) == []


async def test_votes_arriving_together_share_few_commits_and_each_hears_its_own_answer(
    store: Store,
) -> None:
    _assign(store, "s1")
    ids = [f"t{i:02d}" for i in range(40)]
    store.record_turns([turn(i) for i in ids])
    committer: GroupCommitter[VoteRecord, Exception | None] = GroupCommitter(store.record_votes)
    commits = commit_counter(store.engine)
    votes = [VoteRecord(i, "u1", n % 2) for n, i in enumerate(ids)]
    votes.append(VoteRecord("t00", "mallory", 1))
    results = await asyncio.gather(*(committer.record(v) for v in votes), return_exceptions=True)
    assert results[:40] == [None] * 40
    assert isinstance(results[40], OwnershipError)
    assert commits[0] < 40  # one transaction per batch, not per vote
    assert _vote_counts(store) == {"s1": (40, 20, 20)}
    assert _votes(store)["t00"] == (0, None)  # mallory's vote changed nothing
