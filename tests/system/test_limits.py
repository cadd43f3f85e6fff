"""Limits of the public surfaces, through the whole server (``create_app``) on both databases.

- Vote spam: one user can weigh on an arm's KPI with one vote per turn of
  their own, however often they click; votes on other people's turns are
  refused (403) and change nothing.
- Rate limits: votes per user, outcomes per API key (``config.limits``); the
  limiter is one per process, shared by all requests (per-process limits: see
  the README's deployment notes).
- Sizes: request bodies on every route (``limits.max_body_bytes``, declared or
  streamed), comments (``max_comment_chars``), messages (``max_message_chars``).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa
from chainlit import data as chainlit_data
from fastapi.testclient import TestClient

from chatbot.conversation import Conversation
from chatbot.runtime import Runtime
from chatbot.web.server import create_app
from optimizer import kpi
from optimizer.clock import utcnow
from optimizer.store import Store, TurnRecord, schema
from tests.support.chat_helpers import make_runtime

KEY = "limits-key"


@pytest.fixture
def make_client(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """``make_client(**limits)`` → (runtime, signed-in client factory) over ``store``."""
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path))
    monkeypatch.setenv("CHAINLIT_AUTH_SECRET", "test-secret-" + "x" * 32)
    monkeypatch.setenv("FLYWHEEL_API_KEY", KEY)
    clients: list[TestClient] = []

    def make(**limits: Any) -> tuple[Runtime, Any]:
        # Chainlit caches its data layer (and so the vote limiter) per process: one per app here.
        monkeypatch.setattr(chainlit_data, "_data_layer", None)
        monkeypatch.setattr(chainlit_data, "_data_layer_initialized", False)
        runtime = make_runtime(store, **limits)
        app = create_app(runtime=runtime)

        def client(user: str | None = None) -> TestClient:
            c = TestClient(app)
            c.__enter__()
            clients.append(c)
            if user is not None:
                login = c.post("/login", data={"username": user, "password": user})
                assert login.status_code == 200, login.text
            return c

        return runtime, client

    yield make
    for c in clients:
        c.__exit__(None, None, None)


def _vote(client: TestClient, turn_id: str, value: int, comment: str | None = None) -> Any:
    feedback: dict[str, Any] = {"forId": turn_id, "value": value}
    if comment is not None:
        feedback["comment"] = comment
    return client.put("/feedback", json={"sessionId": "x", "feedback": feedback})


def _kpi(runtime: Runtime) -> tuple[dict[str, float], dict[str, Any]]:
    """Each session's reward and the arm's thumbs figures, once every window has closed."""
    later = utcnow() + timedelta(days=60)
    frame = kpi.session_frame(runtime.store, runtime.config, now=later)
    arm = kpi.arm_metrics(frame).loc["concise"]
    rewards = dict(zip(frame["session_id"], frame["reward"], strict=True))
    return rewards, {k: arm[k] for k in ("rated", "thumbs_up", "thumbs_up_rate")}


async def test_500_up_votes_by_one_user_move_the_kpi_as_one_vote_does(
    make_client: Any, store: Store
) -> None:
    runtime, client = make_client(votes_per_minute_per_user=10_000)
    spammer = await Conversation.start(runtime, "s-demo", "demo")
    for i in range(2):
        await spammer.reply(f"t-demo-{i}", f"question {i}")
    honest = await Conversation.start(runtime, "s-alice", "alice")
    await honest.reply("t-alice", "a question")
    await honest.vote("t-alice", 0)
    demo = client("demo")

    before = _kpi(runtime)
    assert _vote(demo, "t-demo-0", 1).status_code == 200
    one_vote = _kpi(runtime)
    codes = {_vote(demo, "t-demo-0", 1).status_code for _ in range(499)}
    spammed = _kpi(runtime)
    # Spamming someone else's turn is refused and changes nothing.
    refused = {_vote(demo, "t-alice", 1).status_code for _ in range(20)}

    assert codes == {200} and refused == {403}
    assert one_vote != before  # one vote does move the KPI (else the check below proves little)
    assert spammed == one_vote == _kpi(runtime)
    assert one_vote[1] == {"rated": 2, "thumbs_up": 1, "thumbs_up_rate": 0.5}
    with store.engine.connect() as conn:
        events = conn.execute(
            sa.select(sa.func.count()).select_from(schema.feedback_events)
        ).scalar_one()
        votes = conn.execute(sa.select(schema.feedback.c.turn_id)).scalars().all()
    assert events == 1 + 500 and sorted(votes) == ["t-alice", "t-demo-0"]  # each click logged


async def test_votes_are_rate_limited_per_user_with_a_reason(make_client: Any) -> None:
    runtime, client = make_client(votes_per_minute_per_user=5)
    for user in ("demo", "operator"):
        conversation = await Conversation.start(runtime, f"s-{user}", user)
        await conversation.reply(f"t-{user}", "a question")
    demo, operator = client("demo"), client("operator")
    codes = [_vote(demo, "t-demo", i % 2).status_code for i in range(5)]
    limited = _vote(demo, "t-demo", 1)
    removal = demo.request("DELETE", "/feedback", json={"feedbackId": "t-demo:demo"})
    assert codes == [200] * 5
    assert limited.status_code == 429 and removal.status_code == 429
    assert "too many votes" in limited.json()["detail"] and "Retry-After" in limited.headers
    assert _vote(operator, "t-operator", 1).status_code == 200  # another user: own budget
    assert runtime.store.get_feedback("t-demo", "demo").value == 0  # the 5th vote stands


def test_outcomes_are_rate_limited_per_key_with_a_reason(make_client: Any, store: Store) -> None:
    _, client = make_client(outcomes_per_minute_per_key=3)
    c = client()
    codes = [
        c.post(
            "/api/outcomes",
            json={"idempotency_key": f"k{i}", "user_id": "u", "name": "conversion"},
            headers={"X-API-Key": KEY},
        )
        for i in range(4)
    ]
    assert [r.status_code for r in codes] == [201, 201, 201, 429]
    assert "per minute" in codes[-1].json()["detail"] and "Retry-After" in codes[-1].headers
    with store.engine.connect() as conn:
        keys = conn.execute(sa.select(schema.outcomes.c.idempotency_key)).scalars().all()
    assert sorted(keys) == ["k0", "k1", "k2"]


async def test_bodies_comments_and_messages_have_size_limits(
    make_client: Any, store: Store
) -> None:
    runtime, client = make_client(max_body_bytes=2048, max_comment_chars=100, max_message_chars=300)
    conversation = await Conversation.start(runtime, "s-demo", "demo")
    await conversation.reply("t-demo", "a question")
    long_message = await conversation.reply("t-long", "x" * 301)
    demo = client("demo")
    big = "x" * 3000

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must count what arrives
        yield b'{"sessionId": "x", "feedback": {"forId": "t-demo", "value": 1, "comment": "'
        for _ in range(30):
            yield b"y" * 100
        yield b'"}}'

    responses = {
        "vote, declared": demo.put(
            "/feedback",
            json={"sessionId": "x", "feedback": {"forId": "t-demo", "value": 1, "comment": big}},
        ),
        "vote, streamed": demo.put(
            "/feedback", content=chunks(), headers={"Content-Type": "application/json"}
        ),
        "outcome": demo.post(
            "/api/outcomes",
            json={"idempotency_key": "k", "user_id": "u", "name": "x", "extra": {"a": big}},
            headers={"X-API-Key": KEY},
        ),
        "login": demo.post("/login", data={"username": "demo", "password": big}),
    }
    for what, response in responses.items():
        assert response.status_code == 413, (what, response.text)
        assert response.json()["detail"].startswith("body must be at most 2048 bytes"), what
    long_comment = _vote(demo, "t-demo", 1, "z" * 101)
    assert long_comment.status_code == 422
    assert "at most 100 characters" in long_comment.json()["detail"]
    assert long_message.turn is None and "the limit is 300" in long_message.text
    small = _vote(demo, "t-demo", 1, "z" * 100)  # at the limits: accepted
    assert small.status_code == 200, small.text
    with store.engine.connect() as conn:
        rows = pd.read_sql(sa.select(schema.feedback_events), conn)
        turns = conn.execute(sa.select(schema.turns.c.id)).scalars().all()
    assert rows["comment"].tolist() == ["z" * 100] and turns == ["t-demo"]


async def test_text_a_database_cannot_store_is_cleaned_or_refused(
    make_client: Any, store: Store
) -> None:
    """NUL characters and lone surrogates (found by fuzzing on PostgreSQL): never a 500."""
    runtime, client = make_client()
    conversation = await Conversation.start(runtime, "s-demo", "demo")
    reply = await conversation.reply("t-demo", "a question\x00 with a NUL and \ud800")
    demo = client("demo")
    vote = _vote(demo, "t-demo", 1, "nice\x00")
    bad_turn = _vote(demo, "t-demo\x00", 1)
    outcome = demo.post(
        "/api/outcomes",
        json={"idempotency_key": "k", "user_id": "u", "name": "x", "extra": {"\x00": 1}},
        headers={"X-API-Key": KEY},
    )
    assert reply.turn is not None and reply.turn.error is None
    assert store.get_turn("t-demo").user_message == "a question with a NUL and ?"
    assert vote.status_code == 200 and store.get_feedback("t-demo", "demo").comment == "nice"
    assert bad_turn.status_code == 422 and "plain text" in bad_turn.json()["detail"]
    assert outcome.status_code == 422 and "NUL" in outcome.json()["detail"][0]["msg"]


def test_simultaneous_first_votes_on_one_turn_are_one_vote(store: Store) -> None:
    """Two tabs or two replicas racing to insert the first vote: one vote, every click logged."""
    runtime = make_runtime(store)
    store.record_turn(
        TurnRecord("t-race", "s-race", "demo", "exp", "concise", "concise", "h", "m", "q", "a")
    )
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def vote(i: int) -> None:
        barrier.wait()
        try:
            runtime.store.record_feedback("t-race", "demo", i % 2)
        except BaseException as exc:  # collected: the assertion below names them
            errors.append(exc)

    threads = [threading.Thread(target=vote, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    with store.engine.connect() as conn:
        events = conn.execute(
            sa.select(sa.func.count()).select_from(schema.feedback_events)
        ).scalar_one()
        rows = conn.execute(sa.select(schema.feedback)).all()
    assert events == 8 and len(rows) == 1
