"""chatbot.web.privacy: a chat user opts out and deletes their own conversations, over HTTP.

Through the real app (our routes in front of Chainlit, its cookie login) and the
real data layer on the store: what the user does reaches every dataset — the
consent tables, the export, the few-shot bank — and no one deletes another
user's conversation.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
import sqlalchemy as sa
from chainlit import data as chainlit_data
from chainlit.user import User
from fastapi.testclient import TestClient

from chatbot.runtime import Runtime
from chatbot.web.datalayer import FlywheelDataLayer
from chatbot.web.privacy import set_training, training_allowed
from optimizer.consent import is_opted_out
from optimizer.export import export_dataset
from optimizer.fewshot.bank import ExampleBank
from optimizer.store import AssignmentRecord, Store, TurnRecord, schema

START = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)


def _login(client: TestClient) -> None:
    response = client.post("/login", data={"username": "demo", "password": "demo"})
    assert response.status_code == 200, response.text


async def _conversation(store: Store, user: str, question: str, reply: str) -> tuple[str, str]:
    """A thread of ``user`` through the data layer, its session and turn, a mined example."""
    layer = chainlit_data.get_data_layer()
    assert isinstance(layer, FlywheelDataLayer)
    persisted = await layer.create_user(User(identifier=user, metadata={"role": "user"}))
    assert persisted is not None
    thread = str(uuid.uuid4())
    await layer.update_thread(thread, name=question, user_id=persisted.id)
    store.record_assignment(
        AssignmentRecord(thread, user, "exp", "concise", 1.0, None, "*", {}, START)
    )
    store.record_turn(
        TurnRecord(
            f"{thread}-t0",
            thread,
            user,
            "exp",
            "concise",
            "concise",
            "h",
            "m",
            question,
            reply,
            created_at=START + timedelta(minutes=1),
        )
    )
    example = ExampleBank(store).add(
        question, reply, source="mined", status="approved", session_id=thread
    )
    assert example is not None
    return thread, example


def _exported_questions(store: Store, runtime: Runtime, tmp_path: Path) -> set[str]:
    out = export_dataset(store, runtime.config, "csv", tmp_path / uuid.uuid4().hex)
    return set(pd.read_csv(out.path)["user_message"]) if out.manifest["rows"] else set()


def _status(store: Store, example_id: str) -> str:
    with store.engine.connect() as conn:
        ex = schema.examples
        return str(conn.execute(sa.select(ex.c.status).where(ex.c.id == example_id)).scalar())


async def test_a_user_deletes_only_their_own_conversations(
    client: TestClient, runtime: Runtime, store: Store, tmp_path: Path
) -> None:
    alices, alices_example = await _conversation(store, "alice", "alpaca question", "alpaca a")
    mine, my_example = await _conversation(store, "demo", "bison question", "bison answer")

    def delete(thread_id: str) -> tuple[int, str]:
        r = client.request("DELETE", "/project/thread", json={"threadId": thread_id})
        return r.status_code, r.text

    assert delete(mine)[0] == 401  # not signed in
    _login(client)
    status, text = delete(alices)
    assert status == 403 and "only your own conversations" in text
    assert delete("no-such-thread")[0] == 404
    assert client.request("DELETE", "/project/thread", json={}).status_code == 422
    assert store.excluded_sessions("exp") == set()
    assert _status(store, alices_example) == "approved"
    assert _exported_questions(store, runtime, tmp_path) == {"alpaca question", "bison question"}

    assert delete(mine) == (200, '{"success":true}')
    layer = chainlit_data.get_data_layer()
    assert await layer.get_thread_author(mine) == ""  # gone from the user's history
    assert await layer.get_thread_author(alices) == "alice"
    assert store.excluded_sessions("exp") == {mine}
    assert _status(store, my_example) == "rejected" and _status(store, alices_example) == (
        "approved"
    )
    assert _exported_questions(store, runtime, tmp_path) == {"alpaca question"}
    with store.engine.connect() as conn:
        a = schema.audit_events
        audited = conn.execute(
            sa.select(a.c.actor, a.c.action, a.c.target).where(a.c.action == "conversation_deleted")
        ).all()
    assert [tuple(r) for r in audited] == [("demo", "conversation_deleted", mine)]
    assert store.get_assignment(mine) is not None  # the session still counts for the KPI


async def test_a_user_opts_out_of_training_and_back_in(
    client: TestClient, runtime: Runtime, store: Store, tmp_path: Path
) -> None:
    await _conversation(store, "alice", "alpaca question", "alpaca a")
    _, mine = await _conversation(store, "demo", "bison question", "bison answer")
    assert client.get("/privacy").status_code == 401
    assert client.put("/privacy", json={"training": False}).status_code == 401
    _login(client)
    assert client.get("/privacy").json() == {"user": "demo", "training": True}
    for bad in ({"training": "no"}, {}, {"training": False, "extra": 1}):
        assert client.put("/privacy", json=bad).status_code == 422
    assert not is_opted_out(store, "demo")

    answer = client.put("/privacy", json={"training": False})
    assert answer.status_code == 200 and "1 examples" in answer.json()["message"]
    assert client.get("/privacy").json()["training"] is False
    assert is_opted_out(store, "demo") and not is_opted_out(store, "alice")
    assert _status(store, mine) == "rejected"
    assert _exported_questions(store, runtime, tmp_path) == {"alpaca question"}

    # the chat's settings switch takes the same path
    assert client.put("/privacy", json={"training": False}).json()["message"] == "unchanged"
    assert "may now help" in (set_training(runtime, "demo", True) or "")
    assert set_training(runtime, "demo", True) is None  # unchanged: nothing written
    assert training_allowed(runtime, "demo") is True
    assert client.get("/privacy").json()["training"] is True
    assert _exported_questions(store, runtime, tmp_path) == {"alpaca question", "bison question"}
    assert _status(store, mine) == "rejected"  # a withdrawn example does not come back


async def test_the_chat_settings_switch_opts_out_over_chainlits_websocket(
    tmp_path: Path,
) -> None:
    """A real ``flywheel serve``: the switch arrives at chat start, a change is recorded."""
    import asyncio

    import httpx

    from tests.support.chainlit_client import ChatSession, login
    from tests.support.flywheel_process import PASSWORD, ServerProcess, user_name, write_config

    config = write_config(tmp_path / "flywheel.toml", users=1)
    url = f"sqlite:///{tmp_path / 'flywheel.db'}"
    server = ServerProcess("privacy", tmp_path / "home", config, url).start()
    store = Store(url)
    user = user_name(0)

    def switch(chat: ChatSession) -> dict[str, object]:
        sent = [d for n, d in chat.events if n == "chat_settings"]
        return next(w for w in sent[-1] if w["id"] == "flywheel:training")

    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
            token = await login(http, user, PASSWORD)
            chat = await ChatSession.open(server.url, token)
            try:
                await chat.wait_for_event("chat_settings")
                assert switch(chat)["type"] == "switch" and switch(chat)["initial"] is True
                await chat._sio.emit("chat_settings_change", {"flywheel:training": False})

                def told() -> list[str]:
                    return [
                        str(d.get("output"))
                        for n, d in chat.events
                        if n == "new_message" and "will not be used to train" in d.get("output", "")
                    ]

                await chat._wait(lambda: bool(told()), 30, "the confirmation")
                assert is_opted_out(store, user)
                # confirming the form again with the same value writes nothing
                await chat._sio.emit("chat_settings_change", {"flywheel:training": False})
                await asyncio.sleep(1.0)
                assert len(told()) == 1
            finally:
                await chat.close()
            again = await ChatSession.open(server.url, token)
            try:
                await again.wait_for_event("chat_settings")
                assert switch(again)["initial"] is False  # the stored choice comes back
            finally:
                await again.close()
    finally:
        server.stop()
        store.dispose()
    with store.engine.connect() as conn:
        a = schema.audit_events
        actions = conn.execute(sa.select(a.c.actor, a.c.action).where(a.c.target == user)).all()
    assert [tuple(r) for r in actions] == [(user, "opt_out")]
