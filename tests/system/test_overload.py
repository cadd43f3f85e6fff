"""Overload through the whole server: a message past ``limits.max_concurrent_turns`` is
refused at once with a friendly message; nothing is sent to the model or recorded."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import httpx
import pytest
import sqlalchemy as sa

from chatbot.web.overload import BUSY_MESSAGE
from optimizer.store import Store, schema
from tests.support.chainlit_client import ChatSession, login
from tests.support.flywheel_process import PASSWORD, ServerProcess, user_name, write_config

#: Slow enough that the first reply is still streaming when the second message arrives.
SLOW_MODEL = "fake/echo?delay_ms=150&first_ms=50"


@pytest.fixture(scope="module")
def busy_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Store]]:
    root = tmp_path_factory.mktemp("overload")
    config = write_config(
        root / "flywheel.toml", model=SLOW_MODEL, users=2, limits={"max_concurrent_turns": 1}
    )
    database_url = f"sqlite:///{root / 'overload.db'}"
    server = ServerProcess("overload", root / "home", config, database_url)
    store = Store(database_url)
    try:
        server.start()
        yield server, store
    finally:
        server.stop()
        store.dispose()


def _turns_of(store: Store, user: str) -> list[str]:
    t = schema.turns
    with store.engine.connect() as conn:
        return list(conn.execute(sa.select(t.c.user_message).where(t.c.user_id == user)).scalars())


async def test_a_message_past_capacity_gets_the_busy_message_and_can_be_sent_again(
    busy_server: tuple[ServerProcess, Store],
) -> None:
    server, store = busy_server
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
        first = await ChatSession.open(server.url, await login(http, user_name(0), PASSWORD))
        second = await ChatSession.open(server.url, await login(http, user_name(1), PASSWORD))
        try:
            ended = sum(1 for name, _ in first.events if name == "task_end")
            await first.send("How do I export my tasks?")
            await first.wait_for_event("stream_token", 1)  # the one place is taken

            refused = await second.ask("And how do I reset my password?", timeout=30)
            assert refused.is_error and refused.text == BUSY_MESSAGE
            assert refused.tokens == []  # nothing streamed: the model was never asked

            await first.wait_for_event("task_end", ended + 1)  # the first reply, at its pace
            answered = await second.ask("And how do I reset my password?", timeout=60)
            assert not answered.is_error
            assert answered.text == "You asked: And how do I reset my password?"
        finally:
            for chat in (first, second):
                with contextlib.suppress(Exception):
                    await chat.close()

    assert _turns_of(store, user_name(0)) == ["How do I export my tasks?"]
    assert _turns_of(store, user_name(1)) == ["And how do I reset my password?"]  # once
