"""Two ``flywheel serve`` replicas on one PostgreSQL database, as behind a load balancer.

Real processes (fake model, background optimizer every 2 s), one fresh schema,
a shared API key and session secret; clients speak Chainlit's socket.io
protocol (:mod:`tests.support.chainlit_client`). The replicas must agree on everything that
lives in the store: a user's arm, each event counted once, the newest policy
snapshot, and which of them may run the optimizer.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa

from optimizer import kpi
from optimizer.config import load_config
from optimizer.locks import job_lock
from optimizer.store import Store, schema
from tests.support.chainlit_client import ChatSession, login
from tests.support.flywheel_process import (
    API_KEY,
    PASSWORD,
    ServerProcess,
    postgres_schema,
    start_all,
    user_name,
    write_config,
)
from tests.support.pg_schema import postgres_url

pytestmark = pytest.mark.postgres

#: Replicas cache the newest snapshot this long (optimizer.assignment.Assigner.snapshot_ttl_s).
SNAPSHOT_TTL_S = 5.0
OPTIMIZE_EVERY_S = 2.0
#: Logins: the first 20 for the other tests, 20–99 as new users of an added arm, one operator.
USERS = 101
OPERATOR = user_name(USERS - 1)


class Deployment:
    def __init__(self, a: ServerProcess, b: ServerProcess, store: Store, config_path: Path):
        self.a, self.b, self.store = a, b, store
        self.config = load_config(config_path, environ=False)
        self.experiment = self.config.experiment.id

    def assignments(self, user: str) -> list[sa.Row]:
        a = schema.assignments
        with self.store.engine.connect() as conn:
            return list(
                conn.execute(sa.select(a).where(a.c.user_id == user).order_by(a.c.id)).all()
            )

    def count(self, table: sa.Table, where: sa.ColumnElement[bool] | None = None) -> int:
        query = sa.select(sa.func.count()).select_from(table)
        if where is not None:
            query = query.where(where)
        with self.store.engine.connect() as conn:
            return int(conn.execute(query).scalar_one())


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    base_url = postgres_url()
    root = tmp_path_factory.mktemp("replicas")
    config = write_config(
        root / "flywheel.toml",
        users=USERS,
        refit_interval_s=OPTIMIZE_EVERY_S,
        roles={OPERATOR: "operator"},
    )
    with postgres_schema(base_url, "replicas") as url:
        a = ServerProcess("replica-a", root / "a", config, url)
        b = ServerProcess("replica-b", root / "b", config, url)
        start_all([a, b])
        store = Store(url)
        try:
            yield Deployment(a, b, store, config)
        finally:
            a.stop()
            b.stop()
            store.dispose()


async def _wait_for(predicate: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.1)


async def _open(server: ServerProcess, http: httpx.AsyncClient, user: str) -> ChatSession:
    token = await login(http, user, PASSWORD)
    return await ChatSession.open(server.url, token)


async def test_a_user_keeps_one_arm_on_every_replica(deployment: Deployment) -> None:
    users = [user_name(i) for i in range(8)]
    async with httpx.AsyncClient(base_url=deployment.a.url, timeout=30) as http:
        for user in users:
            first = await _open(deployment.a, http, user)
            turn_a = await first.ask("How do I reset my password?")
            second = await _open(deployment.b, http, user)
            turn_b = await second.ask("And how do I export my tasks?")
            await first.close()
            # Failover: the first conversation continues on the other replica.
            resumed = await ChatSession.open(
                deployment.b.url, first.token, thread_id=first.thread_id
            )
            turn_c = await resumed.ask("Thanks, one more question")
            history = [s["output"] for s in resumed.resumed["steps"]]
            assert "How do I reset my password?" in history, history
            await second.close()
            await resumed.close()
            assert turn_a.turn_id and turn_b.turn_id and turn_c.turn_id
            assert not (turn_a.is_error or turn_b.is_error or turn_c.is_error)

    arms: dict[str, str] = {}
    for user in users:
        rows = deployment.assignments(user)
        assert len(rows) == 2, rows  # the resumed thread kept its assignment
        assert rows[0].arm_id == rows[1].arm_id, (user, rows)
        arms[user] = rows[0].arm_id
        t = schema.turns
        with deployment.store.engine.connect() as conn:
            turn_arms = conn.execute(sa.select(t.c.arm_id).where(t.c.user_id == user)).scalars()
            assert set(turn_arms) == {arms[user]}
    assert len(set(arms.values())) > 1, "every user on one arm: the check above proves little"


async def test_an_event_delivered_to_both_replicas_counts_once(deployment: Deployment) -> None:
    keys = [f"dup-{i}" for i in range(40)]
    headers = {"X-API-Key": API_KEY}

    async def post_twice(client_a: httpx.AsyncClient, client_b: httpx.AsyncClient, key: str):
        body = {"idempotency_key": key, "user_id": "crm-user", "name": "conversion"}
        return await asyncio.gather(
            client_a.post("/api/outcomes", json=body, headers=headers),
            client_b.post("/api/outcomes", json=body, headers=headers),
        )

    async with (
        httpx.AsyncClient(base_url=deployment.a.url, timeout=30) as client_a,
        httpx.AsyncClient(base_url=deployment.b.url, timeout=30) as client_b,
    ):
        pairs = await asyncio.gather(*(post_twice(client_a, client_b, k) for k in keys))
        for response_a, response_b in pairs:
            assert sorted([response_a.status_code, response_b.status_code]) == [200, 201]
            assert {response_a.json()["status"], response_b.json()["status"]} == {
                "stored",
                "duplicate",
            }
        o = schema.outcomes
        assert deployment.count(o, o.c.idempotency_key.in_(keys)) == len(keys)

        # The same thumbs-up arriving at both replicas is one vote.
        user = user_name(19)
        chat = await _open(deployment.a, client_a, user)
        turn = await chat.ask("Is there a student discount?")
        await chat.close()
        assert turn.turn_id is not None
        votes = await asyncio.gather(
            chat.vote(client_a, turn.turn_id, 1), chat.vote(client_b, turn.turn_id, 1)
        )
        assert [v.status_code for v in votes] == [200, 200], [v.text for v in votes]
    f = schema.feedback
    assert deployment.count(f, f.c.turn_id == turn.turn_id) == 1
    frame = kpi.session_frame(deployment.store, deployment.config)
    row = frame.loc[frame["session_id"] == turn.thread_id].iloc[0]
    assert (row["rated"], row["thumbs_up"], row["turns"]) == (1, 1, 1)


@contextmanager
def _holding(store: Store, name: str, timeout: float = 60) -> Iterator[None]:
    """Hold the optimizer's lock, waiting for a replica that is fitting right now to finish."""
    deadline = time.monotonic() + timeout
    while True:
        with job_lock(store, name) as held:
            if held:
                yield
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"a replica kept the lock {name!r} for {timeout:g} s")
        time.sleep(0.2)


async def test_replicas_serve_the_newest_snapshot_and_one_optimizer_fits_at_a_time(
    deployment: Deployment,
) -> None:
    store, experiment = deployment.store, deployment.experiment
    ps = schema.policy_snapshots
    await _wait_for(lambda: store.latest_snapshot(experiment) is not None)  # replicas optimize
    with _holding(store, f"optimizer:{experiment}"):
        optimizer_snapshots = deployment.count(ps, ps.c.policy != "test")
        logs_before = (len(deployment.a.log_text()), len(deployment.b.log_text()))
        users = iter(user_name(i) for i in range(8, 16))
        for arm in ("empathetic", "proactive-upsell"):
            version = store.save_snapshot(
                experiment, "test", {"segments": {"*": {arm: 1.0}}}, {"arms": {}}
            )
            await asyncio.sleep(SNAPSHOT_TTL_S + 0.5)  # each replica re-reads within its TTL
            async with httpx.AsyncClient(base_url=deployment.a.url, timeout=30) as http:
                for server in (deployment.a, deployment.b, deployment.a, deployment.b):
                    user = next(users)
                    chat = await _open(server, http, user)
                    assert not deployment.assignments(user)  # a page load is no session
                    await chat.ask("Hello?")  # the first message starts it
                    await _wait_for(lambda user=user: deployment.assignments(user))
                    await chat.close()
                    (row,) = deployment.assignments(user)
                    assert (row.arm_id, row.snapshot_version, row.propensity) == (
                        arm,
                        version,
                        1.0,
                    ), server.name
        # Both replicas tried to optimize while the lock was held; neither wrote a snapshot.
        assert deployment.count(ps, ps.c.policy != "test") == optimizer_snapshots
        for server, before in zip((deployment.a, deployment.b), logs_before, strict=True):
            assert "optimizer skipped" in server.log_text()[before:], server.name
    # Released: the next replica to try fits and writes a snapshot.
    await _wait_for(lambda: deployment.count(ps, ps.c.policy != "test") > optimizer_snapshots)


async def test_an_over_long_message_is_refused_on_the_socket_path(deployment: Deployment) -> None:
    limit = deployment.config.limits.max_message_chars
    async with httpx.AsyncClient(base_url=deployment.b.url, timeout=30) as http:
        chat = await _open(deployment.b, http, user_name(17))
        refused = await chat.ask("x" * (limit + 1))
        await chat.close()
    assert f"the limit is {limit:,}" in refused.text and refused.actions == 0
    t = schema.turns
    assert deployment.count(t, t.c.id == refused.turn_id) == 0  # nothing recorded


def _csrf(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, page[:500]
    return match.group(1)


async def test_an_arm_added_in_the_dashboard_is_served_by_both_replicas_without_restart(
    deployment: Deployment,
) -> None:
    """An operator adds a variant on replica A's dashboard; new users on replica B (never
    restarted) and on A get it within seconds, from the snapshot in the shared store."""
    pids = (deployment.a.proc.pid, deployment.b.proc.pid)  # type: ignore[union-attr]
    arm_id = "replica-fresh"
    async with httpx.AsyncClient(
        base_url=deployment.a.url, timeout=30, follow_redirects=True
    ) as ops:
        token = _csrf((await ops.get("/operator/login")).text)
        page = await ops.post(
            "/operator/login", data={"csrf": token, "username": OPERATOR, "password": PASSWORD}
        )
        assert page.status_code == 200, page.text[:500]
        added = await ops.post(
            "/operator/variants",
            data={
                "csrf": _csrf(page.text),
                "arm_id": arm_id,
                "prompt": "You are a brisk assistant. Answer in two sentences at most.",
                "fewshot": "none",
            },
        )
        assert added.status_code == 200 and arm_id in added.text, added.text[:500]
    added_at = time.monotonic()
    assert arm_id in deployment.store.arm_statuses(deployment.experiment)

    # New users, alternately on B and A until one has served the newcomer, then only on the
    # other: at its exploration share (~1/6) 80 users leave a miss chance below 1e-4.
    served: dict[str, float] = {}
    async with httpx.AsyncClient(base_url=deployment.b.url, timeout=30) as http:
        for i in range(20, USERS - 1):
            server = deployment.b if i % 2 == 0 else deployment.a
            if server.name in served:
                server = deployment.a if server is deployment.b else deployment.b
            chat = await _open(server, http, user_name(i))
            turn = await chat.ask("Which plan should I pick?")
            await chat.close()
            assert turn.turn_id and not turn.is_error
            (row,) = deployment.assignments(user_name(i))
            if row.arm_id == arm_id:
                served.setdefault(server.name, time.monotonic() - added_at)
            if len(served) == 2:
                break
    assert set(served) == {"replica-a", "replica-b"}, served
    # Within the snapshot cache time plus the chats it took to find a user for it.
    assert served["replica-b"] < 60, served
    assert (deployment.a.proc.pid, deployment.b.proc.pid) == pids  # type: ignore[union-attr]
    assert deployment.a.starts == deployment.b.starts == 1
    t = schema.turns
    with deployment.store.engine.connect() as conn:
        prompts = set(conn.execute(sa.select(t.c.prompt_id).where(t.c.arm_id == arm_id)).scalars())
    assert prompts == {arm_id}, prompts  # the stored prompt text served, on both replicas
