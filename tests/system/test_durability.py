"""Crashes and outages: what was acknowledged is in the store exactly once, and service resumes.

A real ``flywheel serve`` (fake model streaming a token every 120 ms) on a
PostgreSQL server of its own (:mod:`tests.support.private_postgres`, so that stopping it
cuts no one else), mirroring to a Langfuse that hangs (accepts connections,
never answers) for the whole module. The faults:

- ``kill -9`` of the server while a reply is streaming, and in the middle of
  a burst of outcome posts and votes;
- PostgreSQL stopped and started again under load (a restart or failover);
- Langfuse refusing or hanging (here for the server process, and in-process
  for both modes in :func:`test_langfuse_down_never_loses_or_delays_an_event`).

"Acknowledged" is a 2xx answer: every acknowledged outcome key and vote is in
the store once; what was not acknowledged is there at most once, and a client
retry then stores it exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from chatbot.conversation import Conversation
from chatbot.langfuse.credentials import LangfuseCredentials
from chatbot.langfuse.tracer import LangfuseTracer
from chatbot.llm.streaming import FRIENDLY_ERROR
from optimizer.config import LangfuseConfig
from optimizer.store import Store, schema
from tests.support.chainlit_client import ChatSession, login
from tests.support.chat_helpers import make_runtime
from tests.support.flywheel_process import API_KEY, PASSWORD, ServerProcess, user_name, write_config
from tests.support.langfuse_recorder import LangfuseRecorder, Mode
from tests.support.pg_schema import postgres_url
from tests.support.private_postgres import PrivatePostgres

pytestmark = pytest.mark.postgres

HEADERS = {"X-API-Key": API_KEY}
#: Enough for the bursts: these tests are about durability, not rate limits.
LIMITS = {"outcomes_per_minute_per_key": 1_000_000, "votes_per_minute_per_user": 1_000_000}
SLOW_MODEL = "fake/echo?delay_ms=120"


@dataclass
class Served:
    server: ServerProcess
    postgres: PrivatePostgres
    store: Store

    def rows(self, table: sa.Table, column: sa.Column, values: list[str]) -> Counter[str]:
        """How many rows of ``table`` hold each of ``values`` in ``column``."""
        with self.store.engine.connect() as conn:
            found = conn.execute(sa.select(column).where(column.in_(values))).scalars().all()
        return Counter(found)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    postgres_url()  # runs its own server, but only where PostgreSQL tests are on
    root = tmp_path_factory.mktemp("durability")
    config = write_config(root / "flywheel.toml", model=SLOW_MODEL, users=4, limits=LIMITS)
    postgres = PrivatePostgres()
    try:
        postgres.start()
        with LangfuseRecorder("hang", public_key="pk-lf-durability") as langfuse:
            server = ServerProcess(
                "durability",
                root / "home",
                config,
                postgres.url,
                env={
                    "LANGFUSE_PUBLIC_KEY": langfuse.public_key,
                    "LANGFUSE_SECRET_KEY": langfuse.secret_key,
                    "LANGFUSE_BASE_URL": langfuse.base_url,
                },
            )
            store = Store(postgres.url)
            try:
                server.start()
                yield Served(server, postgres, store)
            finally:
                server.kill()
                store.dispose()
    finally:
        postgres.close()


async def _close(chat: ChatSession) -> None:
    with contextlib.suppress(Exception):
        await asyncio.wait_for(chat.close(), 5)


# -- kill -9 while a reply streams -----------------------------------------------------------


async def test_kill_while_streaming_keeps_history_votes_and_arm(served: Served) -> None:
    server, store = served.server, served.store
    user = user_name(0)
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        token = await login(http, user, PASSWORD)
        chat = await ChatSession.open(server.url, token)
        first = await chat.ask("How do I reset my password?")
        assert not first.is_error and first.turn_id is not None
        vote = await chat.vote(http, first.turn_id, 1, "clear")
        assert vote.status_code == 200, vote.text  # acknowledged: committed
        await chat.send("Please explain the export feature of the Team plan in detail")
        await chat.wait_for_event("stream_token", 3)  # mid-stream: some tokens are out
        server.kill()
        await _close(chat)

    (assignment,) = _assignments(store, user)
    assert _turn_messages(store, user) == ["How do I reset my password?"]  # nothing half-written
    assert store.get_feedback(first.turn_id, user).value == 1

    server.start()
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        resumed = await ChatSession.open(server.url, token, thread_id=chat.thread_id)
        shown = [step.get("output") for step in resumed.resumed["steps"]]
        assert "How do I reset my password?" in shown and first.text in shown
        again = await resumed.ask("How do I reset my password again?")
        await _close(resumed)
        fresh = await ChatSession.open(server.url, await login(http, user, PASSWORD))
        other = await fresh.ask("Another conversation")
        await _close(fresh)
    assert not again.is_error and not other.is_error
    rows = _assignments(store, user)
    assert len(rows) == 2 and rows[0] == assignment  # the resumed thread kept its assignment
    assert {r.arm_id for r in rows} == {assignment.arm_id}  # and a new one the same arm
    turns = schema.turns
    with store.engine.connect() as conn:
        sessions = conn.execute(
            sa.select(turns.c.session_id).where(turns.c.id.in_([again.turn_id, other.turn_id]))
        ).scalars()
        assert set(sessions) == {r.session_id for r in rows}


def _assignments(store: Store, user: str) -> list[sa.Row]:
    """The user's assignments, without the turn and vote counts that grow with the session."""
    a = schema.assignments
    columns = [c for c in a.c if c.name not in schema.SESSION_COUNTS]
    with store.engine.connect() as conn:
        return list(conn.execute(sa.select(*columns).where(a.c.user_id == user).order_by(a.c.id)))


def _turn_messages(store: Store, user: str) -> list[str]:
    t = schema.turns
    with store.engine.connect() as conn:
        query = sa.select(t.c.user_message).where(t.c.user_id == user).order_by(t.c.created_at)
        return list(conn.execute(query).scalars())


# -- kill -9 during a burst ------------------------------------------------------------------


@dataclass
class Burst:
    """What clients sent and which requests were acknowledged (2xx)."""

    sent: list[str] = field(default_factory=list)
    acked: list[str] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)  # transport errors, by type

    def record(self, key: str, response: httpx.Response | Exception) -> None:
        self.sent.append(key)
        if isinstance(response, Exception):
            self.failures[type(response).__name__] += 1
            return
        self.statuses[response.status_code] += 1
        if 200 <= response.status_code < 300:
            self.acked.append(key)


async def _outcome_worker(
    http: httpx.AsyncClient, burst: Burst, keys: Iterator[str], stop: asyncio.Event
) -> None:
    while not stop.is_set():
        key = next(keys)
        body = {"idempotency_key": key, "user_id": "crm", "name": "revenue", "value": 5}
        try:
            response: httpx.Response | Exception = await http.post(
                "/api/outcomes", json=body, headers=HEADERS
            )
        except httpx.HTTPError as exc:
            response = exc
        burst.record(key, response)
        if isinstance(response, Exception):
            await asyncio.sleep(0.05)


async def _vote_worker(
    http: httpx.AsyncClient,
    chat: ChatSession,
    turn_ids: list[str],
    burst: Burst,
    stop: asyncio.Event,
) -> None:
    for i in itertools.count():
        if stop.is_set():
            return
        comment = f"vote-{i}"  # votes carry no key: a unique comment identifies each one
        try:
            response: httpx.Response | Exception = await chat.vote(
                http, turn_ids[i % len(turn_ids)], i % 2, comment
            )
        except httpx.HTTPError as exc:
            response = exc
        burst.record(comment, response)
        if isinstance(response, Exception):
            await asyncio.sleep(0.05)


async def test_kill_during_a_burst_loses_no_acknowledged_outcome_or_vote(served: Served) -> None:
    server = served.server
    outcomes, votes = Burst(), Burst()
    keys = (f"burst-{i}" for i in itertools.count())
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        token = await login(http, user_name(1), PASSWORD)
        chat = await ChatSession.open(server.url, token)
        turn_ids = [str((await chat.ask(f"question {i}")).turn_id) for i in range(3)]
        workers = [
            asyncio.create_task(_outcome_worker(http, outcomes, keys, stop)) for _ in range(6)
        ] + [asyncio.create_task(_vote_worker(http, chat, turn_ids, votes, stop))]
        deadline = time.monotonic() + 60
        while len(outcomes.acked) < 60 or len(votes.acked) < 10:
            assert time.monotonic() < deadline, (outcomes.statuses, votes.statuses)
            await asyncio.sleep(0.01)
        server.kill()  # requests are in flight: some answered, some cut
        await asyncio.sleep(0.3)
        stop.set()
        await asyncio.gather(*workers)
        await _close(chat)

    assert outcomes.failures and set(outcomes.statuses) <= {201}, outcomes
    server.start()
    stored = served.rows(schema.outcomes, schema.outcomes.c.idempotency_key, outcomes.sent)
    assert all(stored[k] == 1 for k in outcomes.acked)  # acknowledged: there, once
    assert max(stored.values()) == 1  # nothing twice, acknowledged or not
    fe = schema.feedback_events
    stored_votes = served.rows(fe, fe.c.comment, votes.sent)
    assert all(stored_votes[c] == 1 for c in votes.acked) and max(stored_votes.values()) == 1

    # The clients retry what was not acknowledged: each is then stored exactly once.
    missing = sorted(set(outcomes.sent) - set(outcomes.acked))
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        for key in missing:
            body = {"idempotency_key": key, "user_id": "crm", "name": "revenue", "value": 5}
            response = await http.post("/api/outcomes", json=body, headers=HEADERS)
            # 200: it had been committed before the crash, but the answer never arrived
            assert response.status_code in (200, 201), response.text
    stored = served.rows(schema.outcomes, schema.outcomes.c.idempotency_key, outcomes.sent)
    assert set(stored) == set(outcomes.sent) and set(stored.values()) == {1}


# -- PostgreSQL restart under load -------------------------------------------------------------


async def test_postgres_restart_under_load_gives_503_then_recovers(served: Served) -> None:
    server, postgres = served.server, served.postgres
    outcomes = Burst()
    keys = (f"restart-{i}" for i in itertools.count())
    stop = asyncio.Event()
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        token = await login(http, user_name(2), PASSWORD)
        chat = await ChatSession.open(server.url, token)
        before = await chat.ask("Before the outage")
        workers = [
            asyncio.create_task(_outcome_worker(http, outcomes, keys, stop)) for _ in range(4)
        ]
        await asyncio.sleep(1.0)
        await asyncio.to_thread(postgres.stop)
        down = Burst()
        for i in range(5):  # while the database is down: a clean 503 with a reason
            key = f"down-{i}"
            body = {"idempotency_key": key, "user_id": "crm", "name": "revenue", "value": 1}
            response = await http.post("/api/outcomes", json=body, headers=HEADERS)
            down.record(key, response)
            assert response.status_code == 503, response.text
            assert "database is unavailable" in response.json()["detail"]
        vote = await chat.vote(http, str(before.turn_id), 1)
        assert vote.status_code == 503, vote.text
        health = await http.get("/api/health")
        assert health.status_code == 503 and health.json()["database"].startswith("unreachable")
        during = await chat.ask("During the outage")
        assert during.is_error and during.text == FRIENDLY_ERROR
        await asyncio.to_thread(postgres.start)
        await asyncio.sleep(2.0)  # load continues on the restarted database
        stop.set()
        await asyncio.gather(*workers)
        # Recovered by itself: pooled connections to the old server are replaced.
        after = await chat.ask("After the outage")
        vote = await chat.vote(http, str(after.turn_id), 1)
        await _close(chat)
    assert not after.is_error and vote.status_code == 200, vote.text
    assert not outcomes.failures, outcomes.failures  # the server never dropped a connection
    assert set(outcomes.statuses) <= {201, 503} and outcomes.statuses[503] > 0, outcomes.statuses
    assert outcomes.acked[-1] == outcomes.sent[-1]  # the last requests succeeded again
    stored = served.rows(schema.outcomes, schema.outcomes.c.idempotency_key, outcomes.sent)
    assert all(stored[k] == 1 for k in outcomes.acked) and max(stored.values()) == 1


# -- Langfuse refusing or hanging, in-process ----------------------------------------------------


@pytest.mark.parametrize("mode", ["refuse", "hang"])
async def test_langfuse_down_never_loses_or_delays_an_event(
    mode: Mode, store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from chainlit import data as chainlit_data

    from chatbot.web.server import create_app

    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path))
    monkeypatch.setenv("CHAINLIT_AUTH_SECRET", "test-secret-" + "x" * 32)
    monkeypatch.setenv("FLYWHEEL_API_KEY", API_KEY)
    monkeypatch.setattr(chainlit_data, "_data_layer", None)
    monkeypatch.setattr(chainlit_data, "_data_layer_initialized", False)
    with LangfuseRecorder(mode, public_key=f"pk-lf-{mode}") as langfuse:
        tracer = LangfuseTracer(
            LangfuseCredentials(langfuse.public_key, langfuse.secret_key, langfuse.base_url),
            LangfuseConfig(request_timeout_s=2.0, flush_timeout_s=0.5),
        )
        runtime = make_runtime(store, tracer=tracer)
        conversation = await Conversation.start(runtime, "s-demo", "demo")
        replies = [await conversation.reply(f"t-{i}", f"question {i}") for i in range(5)]
        with TestClient(create_app(runtime=runtime)) as client:
            assert client.post("/login", data={"username": "demo", "password": "demo"}).is_success
            codes = [
                client.post(
                    "/api/outcomes",
                    json={"idempotency_key": f"k-{i % 20}", "session_id": "s-demo", "name": "x"},
                    headers=HEADERS,
                ).status_code
                for i in range(40)
            ]
            votes = [
                client.put(
                    "/feedback",
                    json={"sessionId": "x", "feedback": {"forId": f"t-{i}", "value": 1}},
                ).status_code
                for i in range(5)
            ]
        tracer.shutdown()
    assert all(r.turn is not None and r.turn.error is None for r in replies)
    assert codes == [201] * 20 + [200] * 20 and votes == [200] * 5
    with store.engine.connect() as conn:
        count = conn.execute(sa.select(sa.func.count()).select_from(schema.outcomes)).scalar()
        turns = conn.execute(sa.select(sa.func.count()).select_from(schema.turns)).scalar()
        rated = conn.execute(sa.select(sa.func.count()).select_from(schema.feedback)).scalar()
    assert (count, turns, rated) == (20, 5, 5)
