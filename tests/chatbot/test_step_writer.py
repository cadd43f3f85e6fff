"""chatbot.web.step_writer: Chainlit's step bookkeeping, queued and written in batches."""

from __future__ import annotations

import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import sqlalchemy as sa

from chatbot.web.step_writer import StepWriter
from optimizer.clock import utcnow
from optimizer.store import Store, schema
from tests.support.chat_helpers import commit_counter


@pytest.fixture
def writer(store: Store) -> Iterator[StepWriter]:
    writer = StepWriter(store.engine)
    yield writer
    writer.close()


def _step(thread_id: str, step_id: str, **fields: Any) -> dict[str, Any]:
    return {
        "id": step_id,
        "threadId": thread_id,
        "type": "assistant_message",
        "output": "",
        "createdAt": "2026-01-01T10:00:00Z",
        **fields,
    }


def _steps(store: Store, thread_id: str) -> dict[str, dict[str, Any]]:
    s = schema.steps
    with store.engine.connect() as conn:
        rows = conn.execute(sa.select(s.c.id, s.c.data).where(s.c.thread_id == thread_id))
        return {row.id: dict(row.data) for row in rows}


def test_flush_makes_every_queued_write_visible_and_threads_are_created(
    writer: StepWriter, store: Store
) -> None:
    thread_id = str(uuid.uuid4())
    ids = [str(uuid.uuid4()) for _ in range(20)]
    for i, step_id in enumerate(ids):
        writer.upsert(_step(thread_id, step_id, output=f"step {i}"))
    writer.flush()
    stored = _steps(store, thread_id)
    assert sorted(stored) == sorted(ids)
    assert {stored[step_id]["output"] for step_id in ids} == {f"step {i}" for i in range(20)}
    with store.engine.connect() as conn:
        threads = conn.execute(
            sa.select(sa.func.count()).where(schema.threads.c.id == thread_id)
        ).scalar()
    assert threads == 1


def test_many_writes_share_few_transactions(store: Store) -> None:
    commits = commit_counter(store.engine)
    writer = StepWriter(store.engine, linger_s=0.05)
    try:
        thread_id = str(uuid.uuid4())
        for _ in range(200):
            writer.upsert(_step(thread_id, str(uuid.uuid4())))
        writer.flush()
    finally:
        writer.close()
    assert len(_steps(store, thread_id)) == 200
    assert 1 <= commits[0] <= 5, commits[0]  # one per batch, not one per write


def test_a_field_never_goes_back_to_none_whatever_the_order(
    writer: StepWriter, store: Store
) -> None:
    thread_id, late, split = str(uuid.uuid4()), str(uuid.uuid4()), str(uuid.uuid4())
    # In one batch: the update lands before the create (Chainlit's tasks race).
    writer.upsert(_step(thread_id, late, output="final", end="10:00:03"))
    writer.upsert(_step(thread_id, late, output="", end=None))
    # In two batches: the stored row is merged.
    writer.upsert(_step(thread_id, split, output="partial", end=None))
    writer.flush()
    writer.upsert(_step(thread_id, split, output="whole", end="10:00:04", start=None))
    writer.flush()
    stored = _steps(store, thread_id)
    assert stored[late]["end"] == "10:00:03" and stored[late]["output"] == ""
    assert stored[split]["output"] == "whole" and stored[split]["end"] == "10:00:04"


def test_deletes_apply_in_order_and_feedback_is_not_kept(writer: StepWriter, store: Store) -> None:
    thread_id = str(uuid.uuid4())
    gone, back, kept = (str(uuid.uuid4()) for _ in range(3))
    writer.upsert(_step(thread_id, gone))
    writer.upsert(_step(thread_id, back, output="old"))
    writer.upsert(_step(thread_id, kept, feedback={"value": 1}))
    writer.flush()
    writer.delete(gone)
    writer.delete(back)
    writer.upsert(_step(thread_id, back, output="new"))
    writer.flush()
    stored = _steps(store, thread_id)
    assert sorted(stored) == sorted([back, kept])
    assert stored[back]["output"] == "new"
    assert "feedback" not in stored[kept]  # votes live in the feedback tables


def test_steps_without_ids_are_skipped(writer: StepWriter, store: Store) -> None:
    thread_id = str(uuid.uuid4())
    writer.upsert({"threadId": thread_id, "output": "no id"})
    writer.upsert({"id": str(uuid.uuid4()), "output": "no thread"})
    writer.flush()
    assert _steps(store, thread_id) == {}


def test_a_thread_created_meanwhile_is_retried_not_lost(store: Store) -> None:
    """The thread row can appear between the batch's check and its insert (another writer)."""
    thread_id = str(uuid.uuid4())
    raced = threading.Event()

    @sa.event.listens_for(store.engine, "before_cursor_execute")
    def create_the_thread_first(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO THREADS") and not raced.is_set():
            raced.set()
            with store.engine.begin() as other:  # as update_thread would, on another thread
                other.execute(
                    schema.threads.insert().values(id=thread_id, name="raced", created_at=utcnow())
                )

    writer = StepWriter(store.engine)
    try:
        writer.upsert(_step(thread_id, str(uuid.uuid4())))
        writer.flush()
    finally:
        writer.close()
        sa.event.remove(store.engine, "before_cursor_execute", create_the_thread_first)
    assert raced.is_set()
    assert len(_steps(store, thread_id)) == 1


def test_close_writes_what_is_queued_and_refuses_more(store: Store) -> None:
    writer = StepWriter(store.engine, linger_s=0.2)
    thread_id = str(uuid.uuid4())
    writer.upsert(_step(thread_id, str(uuid.uuid4())))
    writer.close()
    assert len(_steps(store, thread_id)) == 1
    with pytest.raises(RuntimeError, match="closed"):
        writer.upsert(_step(thread_id, str(uuid.uuid4())))


@pytest.mark.parametrize(("option", "value"), [("linger_s", -1.0), ("max_batch", 0)])
def test_bad_settings_are_named(store: Store, option: str, value: float) -> None:
    with pytest.raises(ValueError, match=option):
        StepWriter(store.engine, **{option: value})  # type: ignore[arg-type]


def test_a_process_that_exits_writes_what_is_queued(tmp_path: Any) -> None:
    """A server stopped normally (SIGTERM ends uvicorn, then the interpreter) loses no step."""
    url = f"sqlite:///{tmp_path / 'exit.db'}"
    Store(url).upgrade()
    program = (
        "from chatbot.web.step_writer import StepWriter\n"
        "from optimizer.store import Store\n"
        f"writer = StepWriter(Store({url!r}).engine, linger_s=0.5)\n"
        "writer.upsert({'id': 's1', 'threadId': 't1', 'output': 'kept'})\n"
    )
    subprocess.run([sys.executable, "-c", program], check=True, timeout=120)
    assert _steps(Store(url), "t1")["s1"]["output"] == "kept"
