"""Segments in the product: a login's configured attributes pick its segment's allocation.

End to end on a real ``flywheel serve`` process (SQLite), through Chainlit's
websocket protocol: two users in different segments are each served from their
segment's allocation, and the first message — not the page load — starts the session.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest
import sqlalchemy as sa

from optimizer.config import load_config
from optimizer.store import Store, schema
from tests.support.chainlit_client import ChatSession, login
from tests.support.flywheel_process import PASSWORD, ServerProcess, user_name, write_config

#: The server caches the newest snapshot this long (Assigner.snapshot_ttl_s).
SNAPSHOT_TTL_S = 5.0


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Store, str]]:
    root = tmp_path_factory.mktemp("segments")
    config = write_config(
        root / "flywheel.toml",
        users=3,
        segment_by=["plan"],
        attributes={user_name(0): {"plan": "free"}, user_name(1): {"plan": "pro"}},
    )
    url = f"sqlite:///{root / 'flywheel.db'}"
    server = ServerProcess("segments", root / "home", config, url).start()
    store = Store(url)
    try:
        yield server, store, load_config(config, environ=False).experiment.id
    finally:
        server.stop()
        store.dispose()


def _assignments(store: Store, user: str) -> list[sa.Row]:
    a = schema.assignments
    with store.engine.connect() as conn:
        return list(conn.execute(sa.select(a).where(a.c.user_id == user)).all())


async def test_each_segment_is_served_from_its_own_allocation(
    served: tuple[ServerProcess, Store, str],
) -> None:
    server, store, experiment = served
    allocation = {
        "segments": {
            "*": {"concise": 1.0},
            "plan=free": {"concise": 1.0},
            "plan=pro": {"empathetic": 1.0},
        }
    }
    version = store.save_snapshot(experiment, "test", allocation, {"arms": {}})
    await asyncio.sleep(SNAPSHOT_TTL_S + 0.5)  # the server re-reads within its TTL
    expected = {
        user_name(0): ("plan=free", "concise"),
        user_name(1): ("plan=pro", "empathetic"),
        user_name(2): ("plan=", "concise"),
    }  # no attribute: "plan=", served from "*"
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        for user, (segment, arm) in expected.items():
            chat = await ChatSession.open(server.url, await login(http, user, PASSWORD))
            try:
                await asyncio.sleep(0.5)
                assert not _assignments(store, user), "a page load must not start a session"
                turn = await chat.ask("What does the Team plan cost?")
                assert turn.turn_id and not turn.is_error
            finally:
                await chat.close()
            deadline = time.monotonic() + 30
            while not (rows := _assignments(store, user)) and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            (row,) = rows
            assert (row.segment, row.arm_id, row.snapshot_version) == (segment, arm, version)
            assert row.context.get("plan", "") == segment.removeprefix("plan=")
