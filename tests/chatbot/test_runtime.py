"""chatbot.runtime: building the runtime, syncing the experiment, recording votes and outcomes."""

from __future__ import annotations

import pytest
import sqlalchemy as sa

from chatbot.runtime import Runtime, experiment_arms
from optimizer.config import ArmConfig, Config
from optimizer.errors import ConfigError, OwnershipError
from optimizer.prompt_library import load_prompts
from optimizer.store import OutcomeRecord, Store, TurnRecord, schema
from tests.support.chat_helpers import (
    CONCISE,
    CONCISE_FIXED,
    RecordingTracer,
    chat_config,
    make_runtime,
)


def _count(store: Store, table: sa.Table) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(table)).scalar() or 0)


def _turn(store: Store, turn_id: str = "t1", user: str = "alice") -> None:
    store.record_turn(
        TurnRecord(turn_id, "s1", user, "exp", "concise", "concise", "h", "fake/echo", "hi", "yo")
    )


def test_default_arms_are_one_per_prompt_variant() -> None:
    prompts = load_prompts("prompts")
    arms = experiment_arms(Config(), prompts)
    assert sorted(arms) == sorted(prompts.variants)
    assert all(a.fewshot == "none" and a.prompt == a.id for a in arms.values())


def test_an_arm_naming_an_unknown_prompt_fails_at_build(store: Store) -> None:
    with pytest.raises(ConfigError, match=r"'typo'.*prompt 'nope' is not a variant"):
        make_runtime(store, arms=[ArmConfig(id="typo", prompt="nope")], champion=None)


def test_a_fixed_arm_with_an_unknown_example_fails_at_build(store: Store) -> None:
    bad = ArmConfig(id="bad", prompt="concise", fewshot="fixed", examples=("trial", "missing"))
    with pytest.raises(ConfigError, match=r"'bad'.*missing"):
        make_runtime(store, arms=[CONCISE, bad])


def test_build_registers_arms_with_prompt_hashes_and_promotes_the_champion_once(
    store: Store,
) -> None:
    runtime = make_runtime(store, arms=[CONCISE, CONCISE_FIXED])
    rows = {r.id: r for r in store.arms("exp")}
    assert set(rows) == {"concise", "concise+fixed"}
    assert rows["concise"].prompt_hash == runtime.prompts.variant("concise").hash
    assert rows["concise+fixed"].fewshot_config == {"examples": ["trial", "export"]}
    assert store.arm_statuses("exp") == {"concise": "champion", "concise+fixed": "active"}

    # An operator promotes the other arm; a restart must not undo it.
    store.record_arm_event("exp", "concise+fixed", "promoted", actor="ops")
    make_runtime(store, arms=[CONCISE, CONCISE_FIXED])
    assert store.arm_statuses("exp") == {"concise": "active", "concise+fixed": "champion"}
    ev = schema.arm_events
    with store.engine.connect() as conn:
        promoted = conn.execute(sa.select(ev.c.arm_id).where(ev.c.kind == "promoted")).all()
    assert [r.arm_id for r in promoted] == ["concise", "concise+fixed"]


def test_a_removed_arm_keeps_serving_on_the_champion(store: Store) -> None:
    runtime = make_runtime(store, arms=[CONCISE, CONCISE_FIXED])
    assert runtime.arm("concise+fixed") is runtime.arms["concise+fixed"]
    assert runtime.arm("gone") is runtime.arms["concise"]


def test_build_migrates_a_fresh_database(store_url: str) -> None:
    runtime = Runtime.build(chat_config(store_url), tracer=RecordingTracer())
    try:
        assert _count(runtime.store, schema.arms) == 1
    finally:
        runtime.close()


async def test_an_outcome_is_stored_and_mirrored_once(store: Store) -> None:
    tracer = RecordingTracer()
    runtime = make_runtime(store, tracer=tracer)
    outcome = OutcomeRecord("k1", "conversion", 1.0, session_id="s1")
    assert await runtime.record_outcome(outcome) is True
    assert await runtime.record_outcome(outcome) is False
    assert _count(store, schema.outcomes) == 1
    assert tracer.calls == [("score_outcome", "k1")]


async def test_a_vote_is_stored_then_mirrored(store: Store) -> None:
    tracer = RecordingTracer()
    runtime = make_runtime(store, tracer=tracer)
    _turn(store)
    await runtime.record_vote("t1", "alice", 1, "  helpful  ")
    row = store.get_feedback("t1", "alice")
    assert (row.value, row.comment) == (1, "helpful")
    assert tracer.calls == [("score_feedback", ("t1", "alice", 1, "helpful"))]


async def test_a_vote_on_another_users_turn_writes_and_mirrors_nothing(store: Store) -> None:
    tracer = RecordingTracer()
    runtime = make_runtime(store, tracer=tracer)
    _turn(store, user="alice")
    with pytest.raises(OwnershipError):
        await runtime.record_vote("t1", "mallory", 0)
    assert _count(store, schema.feedback_events) == 0 and tracer.calls == []


async def test_an_over_long_comment_is_refused_before_writing(store: Store) -> None:
    runtime = make_runtime(store, max_comment_chars=10)
    _turn(store)
    with pytest.raises(ValueError, match="at most 10 characters, got 11"):
        await runtime.record_vote("t1", "alice", 1, "x" * 11)
    assert _count(store, schema.feedback_events) == 0
