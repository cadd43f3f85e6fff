"""chatbot.web.outcomes_api: POST /api/outcomes (key, validation, size, duplicates), health."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI

from chatbot.web.outcomes_api import api_router
from optimizer.store import ArmSpec, AssignmentRecord, OutcomeRecord, Store, schema
from tests.support.chat_helpers import RecordingTracer, make_runtime

KEY = "s3cret-key"
GOOD = {"idempotency_key": "order-1", "session_id": "s1", "name": "revenue", "value": 96.5}

Client = Callable[..., httpx.AsyncClient]


@pytest.fixture
def client(store: Store) -> Client:
    """An HTTP client for the API over ``store``; keyword arguments go to the runtime's limits."""

    def make(*, api_key: str | None = KEY, **limits: Any) -> httpx.AsyncClient:
        runtime = make_runtime(store, **limits)
        app = FastAPI()
        app.include_router(api_router(runtime, api_key=api_key))
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")

    return make


def _outcomes(store: Store) -> list[sa.Row]:
    with store.engine.connect() as conn:
        return list(conn.execute(sa.select(schema.outcomes)).all())


async def _post(client: httpx.AsyncClient, body: Any, key: str | None = KEY) -> httpx.Response:
    headers = {"X-API-Key": key} if key is not None else {}
    return await client.post("/api/outcomes", json=body, headers=headers)


async def test_a_new_outcome_is_stored_and_a_repeat_acknowledged_once(
    client: Client, store: Store
) -> None:
    async with client() as c:
        first = await _post(c, GOOD)
        again = await _post(c, GOOD)  # a redelivery counts once
    assert (first.status_code, first.json()) == (
        201,
        {
            "status": "stored",
            "idempotency_key": "order-1",
            "attributed": False,  # no session "s1" in this store
            "session_id": None,
            "reason": "unknown_session",
            "detail": "no session of the experiment has this session_id",
        },
    )
    assert (again.status_code, again.json()["status"]) == (200, "duplicate")
    (row,) = _outcomes(store)
    assert (row.name, row.value, row.session_id, row.user_id, row.source) == (
        "revenue",
        96.5,
        "s1",
        None,
        "api",
    )
    assert row.attribution == "unknown_session"  # kept, with its reason, for the dashboard


async def test_a_reused_key_with_another_payload_is_a_conflict(
    client: Client, store: Store
) -> None:
    async with client() as c:
        assert (await _post(c, GOOD)).status_code == 201
        changed = await _post(c, {**GOOD, "value": 1000})
    assert changed.status_code == 409
    assert "value 96.5 != 1000.0" in changed.json()["detail"]
    (row,) = _outcomes(store)
    assert row.value == 96.5


def _session(store: Store, session_id: str, user: str, at: datetime) -> None:
    store.sync_experiment("exp", "salt", [ArmSpec("concise", "concise", "h")])
    store.record_assignment(
        AssignmentRecord(
            session_id=session_id,
            user_id=user,
            experiment_id="exp",
            arm_id="concise",
            propensity=1.0,
            snapshot_version=None,
            segment="*",
            context={},
            assigned_at=at,
        )
    )


async def test_each_answer_says_whether_the_outcome_counts(client: Client, store: Store) -> None:
    start = datetime.now(UTC) - timedelta(days=10)
    _session(store, "s1", "alice", start)
    iso = lambda dt: dt.isoformat()  # noqa: E731
    cases = [
        ({"session_id": "s1", "occurred_at": iso(start + timedelta(hours=1))}, True, None),
        ({"session_id": "s1", "occurred_at": iso(start - timedelta(minutes=2))}, True, None),
        (
            {"session_id": "s1", "occurred_at": iso(start - timedelta(hours=1))},
            False,
            "before_session",
        ),
        (
            {"session_id": "s1", "occurred_at": iso(start + timedelta(days=9))},
            False,
            "outside_window",
        ),
        ({"session_id": "s1", "name": "bogus"}, False, "unused_name"),
        ({"session_id": "nope"}, False, "unknown_session"),
        ({"user_id": "alice", "occurred_at": iso(start + timedelta(days=1))}, True, None),
        (
            {"user_id": "alice", "occurred_at": iso(start - timedelta(days=1))},
            False,
            "no_session_before",
        ),
        ({"user_id": "bob"}, False, "no_session_before"),
    ]
    async with client() as c:
        for i, (fields, attributed, reason) in enumerate(cases):
            body = {"idempotency_key": f"k{i}", "name": "conversion", **fields}
            response = await _post(c, body)
            assert response.status_code == 201, response.text
            got = response.json()
            assert (got["attributed"], got["reason"]) == (attributed, reason), fields
            if attributed:
                assert got["session_id"] == "s1"
    assert len(_outcomes(store)) == len(cases)  # unattributed ones are kept too


def test_the_kpi_never_credits_an_outcome_before_its_session(store: Store) -> None:
    from optimizer.config import KPIConfig, KPITermConfig
    from optimizer.kpi import session_frame

    start = datetime(2026, 1, 10, tzinfo=UTC)
    _session(store, "s1", "alice", start)
    _session(store, "s2", "bob", start)
    for key, sid, when in (
        ("early", "s1", start - timedelta(hours=1)),  # before the session: never counts
        ("skew", "s2", start - timedelta(minutes=2)),  # clock skew: counts, delay 0
    ):
        store.record_outcome(
            OutcomeRecord(
                idempotency_key=key, name="conversion", value=1, session_id=sid, occurred_at=when
            )
        )
    config = make_runtime(store).config.model_copy(
        update={
            "kpi": KPIConfig(
                terms=(KPITermConfig(name="conversion", source="outcome:conversion", weight=1.0),)
            )
        }
    )
    frame = session_frame(store, config, now=start + timedelta(days=30)).set_index("session_id")
    assert frame.loc["s1", "reward"] == 0.0
    assert frame.loc["s2", "reward"] == 1.0


async def test_a_user_outcome_with_time_and_extra(client: Client, store: Store) -> None:
    body = {
        "idempotency_key": "crm-7",
        "user_id": "alice",
        "name": "conversion",
        "occurred_at": "2026-01-02T03:04:05",  # no offset: UTC
        "extra": {"plan": "team"},
    }
    async with client() as c:
        assert (await _post(c, body)).status_code == 201
    (row,) = _outcomes(store)
    assert (row.user_id, row.session_id, row.value) == ("alice", None, 1.0)
    assert row.occurred_at.replace(tzinfo=UTC) == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert row.extra == {"plan": "team"}


@pytest.mark.parametrize(
    ("key", "reason"),
    [
        (None, "missing X-API-Key header"),
        ("wrong", "wrong X-API-Key"),
        ("", "missing X-API-Key header"),
    ],
)
async def test_without_the_right_key_nothing_is_stored(
    client: Client, store: Store, key: str | None, reason: str
) -> None:
    async with client() as c:
        response = await _post(c, GOOD, key=key)
    assert (response.status_code, response.json()["detail"]) == (401, reason)
    assert _outcomes(store) == []


async def test_with_no_key_configured_the_api_is_closed(client: Client, store: Store) -> None:
    async with client(api_key=None) as c:
        for key in (None, "", "anything"):
            response = await _post(c, GOOD, key=key)
            assert response.status_code == 401
            assert "no FLYWHEEL_API_KEY" in response.json()["detail"]
    assert _outcomes(store) == []


async def test_authentication_comes_before_reading_the_body(client: Client) -> None:
    async with client() as c:
        response = await c.post("/api/outcomes", content=b"not json", headers={"X-API-Key": "x"})
    assert response.status_code == 401


@pytest.mark.parametrize(
    ("body", "where", "message"),
    [
        (
            {k: v for k, v in GOOD.items() if k != "idempotency_key"},
            ["body", "idempotency_key"],
            "Field required",
        ),
        ({**GOOD, "idempotency_key": ""}, ["body", "idempotency_key"], "at least 1 character"),
        (
            {"idempotency_key": "k", "name": "x", "value": 1},
            ["body"],
            "give a session_id or a user_id",
        ),
        ({**GOOD, "value": "NaN"}, ["body", "value"], "finite number"),
        ({**GOOD, "value": "1e999"}, ["body", "value"], "finite number"),
        ({**GOOD, "value": "lots"}, ["body", "value"], "valid number"),
        ({**GOOD, "occurred_at": "yesterday"}, ["body", "occurred_at"], "ISO 8601 date-time"),
        ({**GOOD, "occurred_at": -947913}, ["body", "occurred_at"], "ISO 8601 date-time"),
        # Digits in a string are Unix seconds to pydantic; the schema says date-time.
        ({**GOOD, "occurred_at": "0"}, ["body", "occurred_at"], "ISO 8601 date-time"),
        ({**GOOD, "occurred_at": "2026-01-02"}, ["body", "occurred_at"], "ISO 8601 date-time"),
        ({**GOOD, "occurred_at": "2026-13-02T00:00:00Z"}, ["body", "occurred_at"], "datetime"),
        (
            {**GOOD, "occurred_at": "2999-01-01T00:00:00Z"},
            ["body", "occurred_at"],
            "not be in the future",
        ),
        ({**GOOD, "name": "has spaces"}, ["body", "name"], "pattern"),
        ({**GOOD, "extra": {"blob": "x" * 3000}}, ["body", "extra"], "at most 2048 bytes"),
        ({**GOOD, "extra": [1, 2]}, ["body", "extra"], "valid dictionary"),
        ({**GOOD, "surprise": 1}, ["body", "surprise"], "Extra inputs"),
        ([GOOD], ["body"], "valid dictionary"),
    ],
)
async def test_a_bad_body_is_refused_with_its_reason(
    client: Client, store: Store, body: Any, where: list[str], message: str
) -> None:
    async with client() as c:
        response = await _post(c, body)
    assert response.status_code == 422, response.text
    problems = response.json()["detail"]
    assert any(p["loc"] == where and message in p["msg"] for p in problems), problems
    assert _outcomes(store) == []


@pytest.mark.parametrize("raw", [b'{"value": NaN}', b"{not json", b"\xff\xfe", b""])
async def test_a_body_that_is_not_json_is_refused(client: Client, raw: bytes) -> None:
    async with client() as c:
        response = await c.post("/api/outcomes", content=raw, headers={"X-API-Key": KEY})
    assert response.status_code == 422
    assert response.json()["detail"][0]["type"] == "json_invalid"


async def test_an_oversized_body_is_refused_declared_or_streamed(
    client: Client, store: Store
) -> None:
    padding = {**GOOD, "extra": {"pad": "x" * 400}}

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while reading
        for _ in range(10):
            yield b" " * 100

    async with client(max_body_bytes=300) as c:
        declared = await _post(c, padding)
        streamed = await c.post("/api/outcomes", content=chunks(), headers={"X-API-Key": KEY})
        small = await _post(c, GOOD)
    assert declared.status_code == 413 and "at most 300 bytes" in declared.json()["detail"]
    assert streamed.status_code == 413
    assert small.status_code == 201
    assert len(_outcomes(store)) == 1


async def test_requests_over_the_rate_limit_get_429(client: Client, store: Store) -> None:
    async with client(outcomes_per_minute_per_key=2) as c:
        codes = [
            (await _post(c, {**GOOD, "idempotency_key": f"k{i}"})).status_code for i in range(3)
        ]
        limited = await _post(c, {**GOOD, "idempotency_key": "k9"})
    assert codes == [201, 201, 429]
    assert limited.status_code == 429 and "Retry-After" in limited.headers
    assert len(_outcomes(store)) == 2


async def test_stored_outcomes_are_mirrored_after_commit(store: Store) -> None:
    tracer = RecordingTracer()
    app = FastAPI()
    app.include_router(api_router(make_runtime(store, tracer=tracer), api_key=KEY))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        await _post(c, GOOD)
        await _post(c, GOOD)
    assert tracer.calls == [("score_outcome", "order-1")]


async def test_health_reports_database_model_and_version(client: Client) -> None:
    async with client() as c:
        response = await c.get("/api/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == body["database"] == "ok"
    assert body["model"] == "fake/echo" and body["experiment"] == "exp" and body["version"]


async def test_health_says_when_the_database_is_unreachable(store: Store) -> None:
    runtime = make_runtime(store)
    runtime.store = Store("postgresql://nobody:x@127.0.0.1:1/none")  # nothing listens on port 1
    app = FastAPI()
    app.include_router(api_router(runtime, api_key=KEY))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        response = await c.get("/api/health")
    assert response.status_code == 503
    assert response.json()["status"] == "degraded"
    assert response.json()["database"].startswith("unreachable")


def test_future_limit_is_relative_to_now() -> None:
    from chatbot.web.outcomes_api import MAX_FUTURE, OutcomeIn

    soon = datetime.now(UTC) + MAX_FUTURE / 2
    assert (
        OutcomeIn(idempotency_key="k", user_id="u", name="x", occurred_at=soon).occurred_at == soon
    )
    with pytest.raises(ValueError, match="future"):
        OutcomeIn(idempotency_key="k", user_id="u", name="x", occurred_at=soon + timedelta(hours=1))
