"""chatbot.web.server: one app for the API, feedback routes, operator pages and Chainlit."""

from __future__ import annotations

import asyncio
import logging

import pytest
import sqlalchemy as sa
from fastapi.testclient import TestClient

from chatbot.runtime import Runtime
from chatbot.web.server import run_optimizer_periodically
from optimizer.store import Store, TurnRecord, schema


def _login(client: TestClient, name: str = "demo", password: str = "demo") -> None:
    response = client.post("/login", data={"username": name, "password": password})
    assert response.status_code == 200, response.text


def _turn(store: Store, turn_id: str, user: str) -> None:
    store.record_turn(
        TurnRecord(turn_id, f"s-{user}", user, "exp", "concise", "concise", "h", "m", "q", "a")
    )


def _votes(store: Store) -> list[sa.Row]:
    with store.engine.connect() as conn:
        return list(conn.execute(sa.select(schema.feedback_events)).all())


def test_openapi_documents_the_outcomes_api(client: TestClient) -> None:
    schema_ = client.get("/api/openapi.json").json()
    post = schema_["paths"]["/api/outcomes"]["post"]
    body = post["requestBody"]["content"]["application/json"]["schema"]
    assert {"idempotency_key", "name"} <= set(body["required"])
    assert any(p["name"] == "X-API-Key" for p in post["parameters"])
    assert {"201", "200", "401", "413", "422", "429"} <= set(post["responses"])
    assert "/api/health" in schema_["paths"] and "/feedback" not in schema_["paths"]
    assert "swagger" in client.get("/api/docs").text.lower()


def test_our_routes_are_not_hidden_by_the_chat_ui(client: TestClient) -> None:
    assert client.get("/api/health").json()["database"] == "ok"
    assert "<title>" in client.get("/operator/login").text  # the dashboard's page, not Chainlit's
    assert client.get("/operator/login").headers["content-type"].startswith("text/html")
    ui = client.get("/")
    assert ui.status_code == 200 and 'id="root"' in ui.text
    assert client.get("/auth/config").json()["passwordAuth"] is True


def test_login_accepts_demo_credentials_only(client: TestClient) -> None:
    assert client.post("/login", data={"username": "demo", "password": "nope"}).status_code == 401
    _login(client)
    assert client.get("/user").json()["identifier"] == "demo"


def test_thumbs_on_ones_own_reply_are_recorded(client: TestClient, store: Store) -> None:
    _turn(store, "t-demo", "demo")
    _login(client)
    response = client.put(
        "/feedback",
        json={"sessionId": "x", "feedback": {"forId": "t-demo", "value": 1, "comment": "nice"}},
    )
    assert response.status_code == 200, response.text
    assert response.json() == {"success": True, "feedbackId": "t-demo:demo"}
    removed = client.request("DELETE", "/feedback", json={"feedbackId": "t-demo:demo"})
    assert removed.status_code == 200
    assert [(v.user_id, v.kind, v.value, v.comment) for v in _votes(store)] == [
        ("demo", "upsert", 1, "nice"),
        ("demo", "delete", None, None),
    ]


def test_thumbs_on_someone_elses_reply_get_403_with_a_reason(
    client: TestClient, store: Store
) -> None:
    _turn(store, "t-alice", "alice")
    _login(client)
    response = client.put(
        "/feedback", json={"sessionId": "x", "feedback": {"forId": "t-alice", "value": 0}}
    )
    assert response.status_code == 403
    assert "only replies in your own conversations" in response.json()["detail"]
    response = client.request("DELETE", "/feedback", json={"feedbackId": "t-alice:alice"})
    assert response.status_code == 403
    assert _votes(store) == []


def test_feedback_needs_a_login_and_a_valid_body(client: TestClient, store: Store) -> None:
    _turn(store, "t-demo", "demo")
    anonymous = client.put(
        "/feedback", json={"sessionId": "x", "feedback": {"forId": "t-demo", "value": 1}}
    )
    assert anonymous.status_code == 401
    _login(client)
    bad_value = client.put(
        "/feedback", json={"sessionId": "x", "feedback": {"forId": "t-demo", "value": 7}}
    )
    long_comment = client.put(
        "/feedback",
        json={"sessionId": "x", "feedback": {"forId": "t-demo", "value": 1, "comment": "x" * 5000}},
    )
    bad_id = client.request("DELETE", "/feedback", json={"feedbackId": "no-separator"})
    assert (bad_value.status_code, long_comment.status_code, bad_id.status_code) == (422, 422, 422)
    assert "at most 1000 characters" in long_comment.json()["detail"]
    assert _votes(store) == []


async def test_the_background_optimizer_writes_snapshots(runtime: Runtime, store: Store) -> None:
    task = asyncio.create_task(run_optimizer_periodically(runtime, 0.05))
    try:
        for _ in range(600):
            if store.latest_snapshot("exp") is not None:
                break
            await asyncio.sleep(0.1)
    finally:
        task.cancel()
    snapshot = store.latest_snapshot("exp")
    assert snapshot is not None and snapshot.allocation["segments"]["*"] == {"concise": 1.0}


async def test_a_failing_optimizer_run_is_logged_and_retried(
    runtime: Runtime, store: Store, caplog: pytest.LogCaptureFixture
) -> None:
    store.record_arm_event("exp", "concise", "retired", actor="test")  # no active arm: runs fail
    caplog.set_level(logging.ERROR, logger="chatbot.web.server")
    task = asyncio.create_task(run_optimizer_periodically(runtime, 0.05))
    try:
        for _ in range(600):
            if len([r for r in caplog.records if "optimizer run failed" in r.message]) >= 2:
                break
            await asyncio.sleep(0.1)
        assert not task.done()  # still running after failures
    finally:
        task.cancel()
    failures = [r for r in caplog.records if "optimizer run failed" in r.message]
    assert len(failures) >= 2 and store.latest_snapshot("exp") is None
