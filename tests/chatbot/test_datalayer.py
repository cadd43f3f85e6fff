"""chatbot.web.datalayer: Chainlit's persistence on our store; only owners give thumbs."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import sqlalchemy as sa
from chainlit.context import ChainlitContext, context_var
from chainlit.session import HTTPSession
from chainlit.types import Feedback, Pagination, ThreadFilter
from chainlit.user import User

from chatbot.web.datalayer import FlywheelDataLayer, acting_as, feedback_id, parse_feedback_id
from chatbot.web.ratelimit import RateLimitExceeded
from optimizer.errors import OwnershipError
from optimizer.store import Store, TurnRecord, schema
from tests.support.chat_helpers import RecordingTracer, make_runtime


@pytest.fixture
async def http_context() -> AsyncIterator[None]:
    """A Chainlit HTTP context, as Chainlit's routes have (steps are written at once)."""
    token = context_var.set(
        ChainlitContext(HTTPSession(id="s", thread_id="t", client_type="webapp"))
    )
    yield
    context_var.reset(token)


@pytest.fixture
def tracer() -> RecordingTracer:
    return RecordingTracer()


@pytest.fixture
async def layer(store: Store, tracer: RecordingTracer) -> AsyncIterator[FlywheelDataLayer]:
    layer = FlywheelDataLayer(make_runtime(store, tracer=tracer, votes_per_minute_per_user=5))
    yield layer
    # The step writer's thread must be done before the store (a PostgreSQL schema) is
    # dropped: a flush still running then deadlocks with DROP SCHEMA.
    await layer.close()


def _count(store: Store, table: sa.Table) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar() or 0)


async def _user(layer: FlywheelDataLayer, name: str) -> str:
    persisted = await layer.create_user(User(identifier=name, metadata={"role": "user"}))
    assert persisted is not None
    return persisted.id


def _step(thread_id: str, step_id: str, kind: str, text: str, at: str, **extra: Any) -> Any:
    return {
        "id": step_id,
        "threadId": thread_id,
        "name": kind,
        "type": kind,
        "output": text,
        "createdAt": at,
        "metadata": {},
        **extra,
    }


async def _thread_with_turn(layer: FlywheelDataLayer, store: Store, owner: str) -> tuple[str, str]:
    """A thread of ``owner`` holding one answered turn (run step id = turn id)."""
    thread_id = str(uuid.uuid4())
    turn_id = str(uuid.uuid4())
    user_id = await _user(layer, owner)
    await layer.update_thread(thread_id, name="Refunds?", user_id=user_id)
    await layer.create_step(
        _step(thread_id, str(uuid.uuid4()), "user_message", "Refunds?", "2026-01-01T10:00:00Z")
    )
    await layer.create_step(
        _step(thread_id, turn_id, "run", "", "2026-01-01T10:00:01Z", name="on_message")
    )
    await layer.create_step(
        _step(
            thread_id,
            str(uuid.uuid4()),
            "assistant_message",
            "Within 30 days.",
            "2026-01-01T10:00:02Z",
            parentId=turn_id,
        )
    )
    store.record_turn(
        TurnRecord(
            turn_id,
            thread_id,
            owner,
            "exp",
            "concise",
            "concise",
            "h",
            "fake/echo",
            "Refunds?",
            "Within 30 days.",
        )
    )
    return thread_id, turn_id


async def test_users_are_created_once_and_their_metadata_updated(layer: FlywheelDataLayer) -> None:
    first = await layer.create_user(User(identifier="alice", metadata={"role": "user"}))
    again = await layer.create_user(User(identifier="alice", metadata={"role": "operator"}))
    assert first is not None and again is not None and first.id == again.id
    fetched = await layer.get_user("alice")
    assert fetched is not None and fetched.metadata == {"role": "operator"}
    assert await layer.get_user("nobody") is None


async def test_thread_and_step_crud(
    layer: FlywheelDataLayer, store: Store, http_context: None
) -> None:
    thread_id, turn_id = await _thread_with_turn(layer, store, "alice")
    assert await layer.get_thread_author(thread_id) == "alice"
    await layer.update_thread(thread_id, metadata={"chat_profile": None, "env": {}, "k": 1})
    await layer.update_thread(thread_id, metadata={"k": None, "j": 2})

    # A late "create" of an updated step must not undo the update (tasks race).
    reply_id = str(uuid.uuid4())
    await layer.update_step(
        _step(thread_id, reply_id, "assistant_message", "final", "2026-01-01T10:00:03Z", end="x")
    )
    await layer.create_step(
        _step(thread_id, reply_id, "assistant_message", "final", "2026-01-01T10:00:03Z", end=None)
    )

    thread = await layer.get_thread(thread_id)
    assert thread is not None
    assert (thread["name"], thread["userIdentifier"]) == ("Refunds?", "alice")
    assert thread["metadata"] == {"env": {}, "j": 2}
    assert [s["type"] for s in thread["steps"]] == [
        "user_message",
        "run",
        "assistant_message",
        "assistant_message",
    ]
    assert thread["steps"][1]["id"] == turn_id
    assert thread["steps"][3]["end"] == "x"

    await layer.delete_step(reply_id)
    thread = await layer.get_thread(thread_id)
    assert thread is not None and len(thread["steps"]) == 3

    await layer.delete_thread(thread_id)
    assert await layer.get_thread(thread_id) is None
    assert await layer.get_thread_author(thread_id) == ""
    assert _count(store, schema.turns) == 1  # the event log keeps the turn


async def test_list_threads_pages_searches_and_filters_by_vote(
    layer: FlywheelDataLayer, store: Store, http_context: None
) -> None:
    threads = [await _thread_with_turn(layer, store, "alice") for _ in range(3)]
    await _thread_with_turn(layer, store, "bob")
    alice = await layer.get_user("alice")
    assert alice is not None

    page1 = await layer.list_threads(Pagination(first=2), ThreadFilter(userId=alice.id))
    assert len(page1.data) == 2 and page1.pageInfo.hasNextPage
    page2 = await layer.list_threads(
        Pagination(first=2, cursor=page1.pageInfo.endCursor), ThreadFilter(userId=alice.id)
    )
    assert len(page2.data) == 1 and not page2.pageInfo.hasNextPage
    seen = {t["id"] for t in page1.data + page2.data}
    assert seen == {t for t, _ in threads}

    found = await layer.list_threads(
        Pagination(first=10), ThreadFilter(userId=alice.id, search="30 DAYS")
    )
    assert len(found.data) == 3
    assert not (
        await layer.list_threads(
            Pagination(first=10), ThreadFilter(userId=alice.id, search="pizza")
        )
    ).data

    with acting_as("alice"):
        await layer.upsert_feedback(Feedback(forId=threads[1][1], value=1))
    liked = await layer.list_threads(
        Pagination(first=10), ThreadFilter(userId=alice.id, feedback=1)
    )
    assert [t["id"] for t in liked.data] == [threads[1][0]]


async def test_a_vote_is_recorded_shown_on_the_thread_and_deletable(
    layer: FlywheelDataLayer, store: Store, tracer: RecordingTracer, http_context: None
) -> None:
    thread_id, turn_id = await _thread_with_turn(layer, store, "alice")
    with acting_as("alice"):
        fid = await layer.upsert_feedback(Feedback(forId=turn_id, value=1, comment="great"))
        assert fid == feedback_id(turn_id, "alice") and parse_feedback_id(fid) == (turn_id, "alice")
        await layer.upsert_feedback(Feedback(forId=turn_id, value=0, comment="on second thought"))
        thread = await layer.get_thread(thread_id)
        assert thread is not None
        run = next(s for s in thread["steps"] if s["id"] == turn_id)
        assert run["feedback"] == {
            "forId": turn_id,
            "id": fid,
            "value": 0,
            "comment": "on second thought",
        }

        assert await layer.delete_feedback(fid) is True
    thread = await layer.get_thread(thread_id)
    assert thread is not None and all("feedback" not in s for s in thread["steps"])
    with store.engine.connect() as conn:
        events = conn.execute(
            sa.select(schema.feedback_events).order_by(schema.feedback_events.c.id)
        ).all()
    assert [(e.kind, e.value, e.comment) for e in events] == [
        ("upsert", 1, "great"),
        ("upsert", 0, "on second thought"),
        ("delete", None, None),
    ]
    assert [c for c, _ in tracer.calls] == ["score_feedback"] * 3


async def test_a_vote_on_another_users_step_is_refused_and_nothing_is_written(
    layer: FlywheelDataLayer, store: Store, tracer: RecordingTracer, http_context: None
) -> None:
    _, alices_turn = await _thread_with_turn(layer, store, "alice")
    with acting_as("mallory"), pytest.raises(OwnershipError, match="not a turn of theirs"):
        await layer.upsert_feedback(Feedback(forId=alices_turn, value=0, comment="spam"))
    with acting_as("mallory"), pytest.raises(OwnershipError, match="another user"):
        await layer.delete_feedback(feedback_id(alices_turn, "alice"))
    with acting_as("mallory"), pytest.raises(OwnershipError):  # a forged id naming the caller
        await layer.delete_feedback(feedback_id(alices_turn, "mallory"))
    assert _count(store, schema.feedback_events) == 0 and _count(store, schema.feedback) == 0
    assert tracer.calls == []


async def test_a_vote_without_a_signed_in_caller_is_refused(
    layer: FlywheelDataLayer, store: Store
) -> None:
    store.record_turn(
        TurnRecord("t1", "s1", "alice", "exp", "concise", "concise", "h", "m", "q", "a")
    )
    with pytest.raises(OwnershipError, match="signed-in user"):  # no Chainlit context, no route
        await layer.upsert_feedback(Feedback(forId="t1", value=1))
    assert _count(store, schema.feedback_events) == 0


async def test_bad_votes_are_refused_before_writing(
    layer: FlywheelDataLayer, store: Store, http_context: None
) -> None:
    _, turn_id = await _thread_with_turn(layer, store, "alice")
    with acting_as("alice"):
        with pytest.raises(ValueError, match="0 or 1"):
            await layer.upsert_feedback(Feedback(forId=turn_id, value=5))  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="at most 1000 characters"):
            await layer.upsert_feedback(Feedback(forId=turn_id, value=1, comment="x" * 1001))
        with pytest.raises(ValueError, match="feedback id must look like"):
            await layer.delete_feedback("no-separator")
    assert _count(store, schema.feedback_events) == 0


async def test_votes_are_rate_limited_per_user(
    layer: FlywheelDataLayer, store: Store, http_context: None
) -> None:
    _, turn_id = await _thread_with_turn(layer, store, "alice")
    with acting_as("alice"):
        for i in range(5):
            await layer.upsert_feedback(Feedback(forId=turn_id, value=i % 2))
        with pytest.raises(RateLimitExceeded, match="more than 5 requests per minute"):
            await layer.upsert_feedback(Feedback(forId=turn_id, value=1))
    assert _count(store, schema.feedback_events) == 5


async def test_steps_written_before_their_thread_create_it_once_even_after_it_is_hidden(
    layer: FlywheelDataLayer, store: Store, http_context: None
) -> None:
    thread_id = str(uuid.uuid4())
    await layer.create_step(_step(thread_id, str(uuid.uuid4()), "run", "", "2026-01-01T10:00:00Z"))
    await layer.create_step(_step(thread_id, str(uuid.uuid4()), "run", "", "2026-01-01T10:00:01Z"))
    layer.steps.flush()  # step writes are queued and batched (chatbot.web.step_writer)
    assert _count(store, schema.threads) == 1 and _count(store, schema.steps) == 2
    await layer.delete_thread(thread_id)  # hidden, its steps dropped; the row stays
    await layer.create_step(_step(thread_id, str(uuid.uuid4()), "run", "", "2026-01-01T10:00:02Z"))
    layer.steps.flush()
    assert _count(store, schema.threads) == 1 and _count(store, schema.steps) == 1
    await layer.close()  # the step writers finish what is queued
