"""chatbot.conversation: a session's turns end to end, with the fake LLM and a real store."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

import pytest
import sqlalchemy as sa

from chatbot.conversation import Conversation, TokenBatcher
from chatbot.llm.fake import call_count
from chatbot.llm.streaming import FRIENDLY_ERROR
from chatbot.runtime import Runtime
from optimizer.config import ActionConfig
from optimizer.errors import OwnershipError
from optimizer.store import Store, schema
from tests.support.chat_helpers import CONCISE, CONCISE_FIXED, RecordingTracer, make_runtime

TRIAL = ActionConfig(name="start_trial", label="Start free trial", outcome="conversion")


def _rows(store: Store, table: sa.Table) -> list[sa.Row]:
    with store.engine.connect() as conn:
        return list(conn.execute(sa.select(table)).all())


async def _start(runtime: Runtime, user: str = "alice") -> Conversation:
    return await Conversation.start(runtime, str(uuid.uuid4()), user, {"channel": "test"})


async def test_a_turn_is_streamed_and_recorded_with_every_field(store: Store) -> None:
    tracer = RecordingTracer()
    runtime = make_runtime(store, arms=[CONCISE_FIXED], champion=None, tracer=tracer)
    conversation = await _start(runtime)
    assert (conversation.assignment.arm_id, conversation.assignment.propensity) == (
        "concise+fixed",
        1.0,
    )
    tokens: list[str] = []

    async def on_token(token: str) -> None:
        tokens.append(token)

    reply = await conversation.reply("turn-1", "  How much is the Team plan?  ", on_token=on_token)

    assert reply.text == "You asked: How much is the Team plan?"
    assert len(tokens) > 1 and "".join(tokens) == reply.text
    (row,) = _rows(store, schema.turns)
    variant = runtime.prompts.variant("concise")
    assert (row.id, row.session_id, row.user_id) == ("turn-1", conversation.session_id, "alice")
    assert (row.experiment_id, row.arm_id) == ("exp", "concise+fixed")
    assert (row.prompt_id, row.prompt_hash) == ("concise", variant.hash)
    assert row.fewshot_ids == ["trial", "export"]
    assert (row.model, row.user_message, row.reply) == (
        "fake/echo",
        "How much is the Team plan?",
        reply.text,
    )
    assert 0 < row.ttft_ms <= row.latency_ms
    assert row.prompt_tokens > 0 and row.completion_tokens == len(tokens)
    assert row.cost == 0.0 and row.error is None
    assert row.trace_id == "trace-turn-1" and tracer.calls == [("trace_turn", "turn-1")]
    assert conversation.history == [
        {"role": "user", "content": "How much is the Team plan?"},
        {"role": "assistant", "content": reply.text},
    ]


async def test_a_resumed_session_keeps_its_arm_and_history(store: Store) -> None:
    runtime = make_runtime(store)
    first = await _start(runtime)
    await first.reply("turn-1", "Hello?")
    again = await Conversation.start(runtime, first.session_id, "alice")
    assert again.assignment == first.assignment
    assert again.history == first.history and len(again.history) == 2
    assert len(_rows(store, schema.assignments)) == 1


async def test_a_paused_arm_stops_serving_its_open_and_resumed_conversations(
    store: Store,
) -> None:
    runtime = make_runtime(store, arms=[CONCISE, CONCISE_FIXED], champion="concise")
    runtime.assigner.snapshot_ttl_s = 0  # see the pause at once
    conversations = [await _start(runtime, f"user-{i}") for i in range(12)]
    on_challenger = [c for c in conversations if c.assignment.arm_id == "concise+fixed"]
    assert on_challenger, "the uniform split gives the challenger some of twelve sessions"
    conversation = on_challenger[0]
    thread = conversation.session_id
    await conversation.reply("turn-1", "Hello?")
    store.record_arm_event("exp", "concise+fixed", "paused_guardrail", actor="test")

    await conversation.reply("turn-2", "Still there?")  # the open conversation moves ...
    moved = conversation.assignment
    assert (moved.arm_id, moved.propensity, moved.thread_id) == ("concise", 1.0, thread)
    assert moved.session_id == f"{thread}~1" and "paused_guardrail" in moved.context["reason"]
    old = store.get_assignment(thread)
    assert old is not None and old.arm_id == "concise+fixed"
    assert old.closed_at is not None and "moved to the champion 'concise'" in old.closed_reason
    turns = {r.id: r for r in _rows(store, schema.turns)}
    assert (turns["turn-1"].arm_id, turns["turn-1"].session_id) == ("concise+fixed", thread)
    assert (turns["turn-2"].arm_id, turns["turn-2"].session_id) == ("concise", moved.session_id)

    resumed = await Conversation.start(runtime, thread, conversation.user_id)  # ... and stays
    assert resumed.assignment == moved and len(resumed.history) == 4
    await resumed.reply("turn-3", "And now?")
    assert resumed.assignment == moved  # no second move: one arm, one propensity each

    other = on_challenger[1] if len(on_challenger) > 1 else None
    if other is not None:  # a resumed conversation that was idle during the pause moves too
        back = await Conversation.start(runtime, other.session_id, other.user_id)
        await back.reply("turn-4", "Hi again")
        assert back.assignment.arm_id == "concise"


async def test_a_session_cannot_be_opened_by_another_user(store: Store) -> None:
    runtime = make_runtime(store)
    first = await _start(runtime, "alice")
    with pytest.raises(ValueError, match="belongs to another user"):
        await Conversation.start(runtime, first.session_id, "mallory")


async def test_a_provider_error_ends_the_turn_politely_and_is_recorded(store: Store) -> None:
    runtime = make_runtime(store, model="fake/error-500")
    conversation = await _start(runtime)
    reply = await conversation.reply("turn-1", "Hello?")
    assert reply.failed and reply.text == FRIENDLY_ERROR
    (row,) = _rows(store, schema.turns)
    assert row.reply == FRIENDLY_ERROR and "InternalServerError" in row.error
    assert row.ttft_ms is None and row.latency_ms > 0
    assert conversation.history == []  # the apology is not context for the next turn


async def test_a_reply_cut_mid_stream_keeps_what_the_user_saw_and_says_sorry(store: Store) -> None:
    runtime = make_runtime(store, model="fake/echo?fail_after=2&status=500")
    conversation = await _start(runtime)
    seen: list[str] = []

    async def on_token(token: str) -> None:
        seen.append(token)

    reply = await conversation.reply("turn-1", "Tell me about exports", on_token=on_token)
    shown = f"You asked:\n\n{FRIENDLY_ERROR}"  # the streamed part, then the apology
    assert reply.failed and "".join(seen) == "You asked:" and reply.text == shown
    (row,) = _rows(store, schema.turns)
    assert row.reply == shown and row.error


async def test_an_over_long_message_is_refused_and_never_sent(store: Store) -> None:
    model = f"fake/echo?tag={uuid.uuid4().hex}"
    runtime = make_runtime(store, model=model, max_message_chars=20)
    conversation = await _start(runtime)
    reply = await conversation.reply("turn-1", "x" * 21)
    assert reply.turn is None and reply.refused == "message is 21 characters; the limit is 20"
    assert "limit is 20" in reply.text
    assert _rows(store, schema.turns) == [] and call_count(model) == 0
    assert (await conversation.reply("turn-2", "x" * 20)).turn is not None
    assert call_count(model) == 1


async def test_an_empty_message_is_refused(store: Store) -> None:
    conversation = await _start(make_runtime(store))
    reply = await conversation.reply("turn-1", "   ")
    assert reply.turn is None and reply.refused == "empty message"


async def test_a_call_to_action_counts_once_per_session(store: Store) -> None:
    tracer = RecordingTracer()
    runtime = make_runtime(store, tracer=tracer)
    conversation = await _start(runtime)
    first = await conversation.click(TRIAL, turn_id="turn-1")
    second = await conversation.click(TRIAL, turn_id="turn-1")
    assert (first.stored, second.stored) == (True, False)
    assert "already recorded" in second.message
    (row,) = _rows(store, schema.outcomes)
    assert (row.name, row.value, row.source) == ("conversion", 1.0, "chat")
    assert (row.session_id, row.user_id) == (conversation.session_id, "alice")
    assert row.extra == {"action": "start_trial", "turn_id": "turn-1"}
    assert [c for c, _ in tracer.calls] == ["score_outcome"]


async def test_resolving_records_the_support_time_since_the_session_began(store: Store) -> None:
    conversation = await _start(make_runtime(store))
    later = conversation.assignment.assigned_at + timedelta(minutes=7, seconds=30)
    result = await conversation.resolve(turn_id="turn-1", now=later)
    assert result.stored and "7.5 min" in result.message
    again = await conversation.resolve(now=later + timedelta(minutes=5))
    assert not again.stored
    rows = {r.name: r for r in _rows(store, schema.outcomes)}
    assert set(rows) == {"resolved", "support_minutes"}
    assert rows["resolved"].value == 1.0
    assert rows["support_minutes"].value == pytest.approx(7.5)
    assert rows["support_minutes"].extra["seconds"] == pytest.approx(450.0)


async def test_votes_are_the_session_users_own(store: Store) -> None:
    runtime = make_runtime(store)
    alice = await _start(runtime, "alice")
    await alice.reply("turn-1", "Hello?")
    await alice.vote("turn-1", 0, "too short")
    assert store.get_feedback("turn-1", "alice").value == 0
    mallory = await _start(runtime, "mallory")
    with pytest.raises(OwnershipError):
        await mallory.vote("turn-1", 1)
    assert [e.user_id for e in _rows(store, schema.feedback_events)] == ["alice"]


# -- token batching (one socket emit per batch) ------------------------------------------


async def test_batched_tokens_arrive_whole_and_in_order_and_match_the_stored_reply(
    store: Store,
) -> None:
    conversation = await _start(make_runtime(store))
    sent: list[str] = []

    async def send(text: str) -> None:
        sent.append(text)

    batcher = TokenBatcher(send, interval_s=60)  # longer than the stream: one batch after the first
    reply = await conversation.reply("turn-1", "How do I export my tasks?", on_token=batcher)
    await batcher.close()

    (row,) = _rows(store, schema.turns)
    assert "".join(sent) == reply.text == row.reply == "You asked: How do I export my tasks?"
    assert sent == ["You", " asked: How do I export my tasks?"]  # first at once, then the rest
    assert row.completion_tokens == len(reply.text.split())  # every token reached the store


async def test_a_batch_waits_at_most_the_interval_without_close() -> None:
    sent: list[str] = []

    async def send(text: str) -> None:
        sent.append(text)

    batcher = TokenBatcher(send, interval_s=0.05)
    await batcher("a")
    await batcher("b")
    await batcher("c")
    assert sent == ["a"]
    await asyncio.sleep(0.2)  # the model pauses: the batch goes out on its own
    assert sent == ["a", "bc"]
    await batcher("d")  # the interval has passed: at once
    assert sent == ["a", "bc", "d"]
    await batcher.close()
    assert sent == ["a", "bc", "d"]


async def test_with_no_interval_every_token_is_sent_at_once() -> None:
    sent: list[str] = []

    async def send(text: str) -> None:
        sent.append(text)

    batcher = TokenBatcher(send, interval_s=0)
    for token in ["You", " asked", ":"]:
        await batcher(token)
    assert sent == ["You", " asked", ":"]


async def test_a_failed_timed_send_is_raised_by_close() -> None:
    calls: list[str] = []

    async def send(text: str) -> None:
        calls.append(text)
        if len(calls) > 1:
            raise ConnectionError("socket gone")

    batcher = TokenBatcher(send, interval_s=0.01)
    await batcher("a")
    await batcher("b")
    await asyncio.sleep(0.1)
    with pytest.raises(ConnectionError, match="socket gone"):
        await batcher.close()
    assert calls == ["a", "b"]


@pytest.mark.parametrize("interval", [-0.1, float("nan"), float("inf")])
def test_a_bad_batch_interval_is_refused(interval: float) -> None:
    async def send(text: str) -> None:
        pass

    with pytest.raises(ValueError, match="interval_s must be a finite number ≥ 0, got"):
        TokenBatcher(send, interval_s=interval)
