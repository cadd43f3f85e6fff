"""The operator dashboard: who may see it, CSRF, and that every control changes the next assignment.

The router runs in a bare FastAPI app over a real :class:`chatbot.runtime.Runtime`
(real store on SQLite and PostgreSQL, real Assigner and optimizer); requests go
through Starlette's test client, cookies and all.
"""

from __future__ import annotations

import html
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import bcrypt
import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient

from chatbot.runtime import Runtime
from chatbot.web.operator import PREFIX, create_router
from chatbot.web.operator.routes import ReportCache
from chatbot.web.operator.security import COOKIE_NAME, OperatorSession, SessionSigner
from optimizer.config import UserConfig, load_config
from optimizer.fewshot import ExampleBank
from optimizer.store import OutcomeRecord, Store, TurnRecord, schema

ROOT = Path(__file__).resolve().parents[2]
SECRET = b"test-secret"
ARMS = ["concise", "concise+fixed", "concise+retrieved", "empathetic", "proactive-upsell"]


@pytest.fixture
def runtime(store: Store) -> Iterator[Runtime]:
    config = load_config(ROOT / "flywheel.toml", environ=False)
    users = (
        UserConfig(
            name="alice",
            password_hash=bcrypt.hashpw(b"alice-pw", bcrypt.gensalt(4)).decode(),
            role="operator",
        ),
        UserConfig(
            name="bob",
            password_hash=bcrypt.hashpw(b"bob-pw", bcrypt.gensalt(4)).decode(),
            role="user",
        ),
    )
    config = config.model_copy(
        update={
            "prompts_dir": str(ROOT / "prompts"),
            "auth": config.auth.model_copy(update={"users": users}),
            # the controls are about the bandit's traffic: no holdback user among "next users"
            "experiment": config.experiment.model_copy(update={"holdback": 0.0}),
            "policy": config.policy.model_copy(update={"burn_in": 0, "challenger_min_sessions": 0}),
        }
    )
    yield Runtime.build(config, store=store)


@pytest.fixture
def client(runtime: Runtime) -> TestClient:
    app = FastAPI()
    app.include_router(create_router(runtime, secret=SECRET))
    return TestClient(app, base_url="http://testserver")


def csrf_of(page: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', page)
    assert match, "page has no CSRF field"
    return match.group(1)


def login(client: TestClient, name: str = "operator", password: str = "operator") -> str:
    """Log in through the form; returns the CSRF token of the logged-in session."""
    token = csrf_of(client.get(f"{PREFIX}/login").text)
    response = client.post(
        f"{PREFIX}/login", data={"csrf": token, "username": name, "password": password}
    )
    assert response.status_code == 200, response.text
    return csrf_of(response.text)


def audit_actions(store: Store) -> list[tuple[str, str, str]]:
    au = schema.audit_events
    with store.engine.connect() as conn:
        return [
            tuple(r)
            for r in conn.execute(sa.select(au.c.actor, au.c.action, au.c.target).order_by(au.c.id))
        ]


def assigned_arms(runtime: Runtime, n: int = 60, prefix: str = "new") -> set[str]:
    """Arms the process's Assigner gives ``n`` new users (what the next chats would get)."""
    return {runtime.assigner.assign(f"{prefix}-s{i}", f"{prefix}-u{i}").arm_id for i in range(n)}


# -- who may see it ----------------------------------------------------------------------


def test_unauthenticated_requests_are_refused(client: TestClient, runtime: Runtime) -> None:
    before = runtime.store.arm_statuses(runtime.config.experiment.id)
    for path in ("", "/", "/arms/concise", "/examples", "/ope"):
        response = client.get(PREFIX + path, follow_redirects=False)
        assert response.status_code == 303 and response.headers["location"] == f"{PREFIX}/login", (
            path
        )
    assert client.get(f"{PREFIX}/report.json").status_code == 401
    for path in ("/arms/empathetic/pause", "/optimize", "/logout", "/examples/x/approve"):
        response = client.post(PREFIX + path, data={"csrf": "anything"})
        assert response.status_code == 401, path
        assert "operator login required" in response.text
    assert runtime.store.arm_statuses(runtime.config.experiment.id) == before
    assert not [a for a in audit_actions(runtime.store) if a[1].startswith("arm.")]


def test_chat_users_are_refused(client: TestClient, runtime: Runtime) -> None:
    for name, password in (("demo", "demo"), ("bob", "bob-pw")):
        token = csrf_of(client.get(f"{PREFIX}/login").text)
        response = client.post(
            f"{PREFIX}/login", data={"csrf": token, "username": name, "password": password}
        )
        assert response.status_code == 403
        assert "needs the operator role" in response.text
        assert client.get(PREFIX, follow_redirects=False).status_code == 303
    refused = [a for a in audit_actions(runtime.store) if a[1] == "operator.login_refused"]
    assert [a[0] for a in refused] == ["demo", "bob"]


def test_wrong_password_and_forged_cookie(client: TestClient) -> None:
    token = csrf_of(client.get(f"{PREFIX}/login").text)
    response = client.post(
        f"{PREFIX}/login", data={"csrf": token, "username": "operator", "password": "nope"}
    )
    assert response.status_code == 401 and "wrong name or password" in response.text
    forged = SessionSigner(b"another secret").dumps(
        OperatorSession(csrf="t", user="operator", role="operator", iat=9e9)
    )
    client.cookies.set(COOKIE_NAME, forged, path=PREFIX)
    assert client.get(PREFIX, follow_redirects=False).status_code == 303


def test_config_operator_logs_in_and_out(client: TestClient, runtime: Runtime) -> None:
    token = login(client, "alice", "alice-pw")
    page = client.get(PREFIX)
    assert page.status_code == 200 and "alice" in page.text and 'id="arms"' in page.text
    response = client.post(f"{PREFIX}/logout", data={"csrf": token}, follow_redirects=False)
    assert response.status_code == 303
    assert client.get(PREFIX, follow_redirects=False).status_code == 303
    actions = [a[1] for a in audit_actions(runtime.store) if a[0] == "alice"]
    assert actions == ["operator.login", "operator.logout"]


# -- CSRF -----------------------------------------------------------------------------------


def test_forms_without_a_valid_csrf_token_are_refused(client: TestClient, runtime: Runtime) -> None:
    stale = csrf_of(client.get(f"{PREFIX}/login").text)
    token = login(client)
    assert stale != token  # the token rotates at login
    exp = runtime.config.experiment.id
    for data in ({}, {"csrf": ""}, {"csrf": "forged"}, {"csrf": stale}):
        response = client.post(f"{PREFIX}/arms/empathetic/pause", data=data)
        assert response.status_code == 403, data
        assert "CSRF token" in response.text
    assert client.post(f"{PREFIX}/optimize", data={"csrf": "forged"}).status_code == 403
    # Not JSON either: a cross-site fetch cannot smuggle the token some other way.
    assert client.post(f"{PREFIX}/arms/empathetic/pause", json={"csrf": token}).status_code == 403
    assert runtime.store.arm_statuses(exp)["empathetic"] == "active"
    assert runtime.store.latest_snapshot(exp) is None
    # The login form needs its token too.
    client.cookies.clear()
    response = client.post(f"{PREFIX}/login", data={"username": "operator", "password": "operator"})
    assert response.status_code == 403


# -- controls change the next assignment ------------------------------------------------------


def test_pause_and_resume_change_the_next_assignment(client: TestClient, runtime: Runtime) -> None:
    exp = runtime.config.experiment.id
    assert "empathetic" in assigned_arms(
        runtime, prefix="before"
    )  # the cache now holds an allocation
    token = login(client)
    response = client.post(f"{PREFIX}/arms/empathetic/pause", data={"csrf": token})
    assert response.status_code == 200 and "empathetic paused" in response.text
    assert runtime.store.arm_statuses(exp)["empathetic"] == "paused_operator"
    assert "empathetic" not in assigned_arms(runtime, prefix="paused")
    snapshot = runtime.store.latest_snapshot(exp)
    assert snapshot is not None and "empathetic" not in snapshot.allocation["segments"]["*"]

    token = csrf_of(response.text)
    response = client.post(f"{PREFIX}/arms/empathetic/resume", data={"csrf": token})
    assert response.status_code == 200 and "empathetic resumed" in response.text
    assert "empathetic" in assigned_arms(runtime, prefix="resumed")
    assert ("operator", "arm.pause", "empathetic") in audit_actions(runtime.store)
    assert ("operator", "arm.resume", "empathetic") in audit_actions(runtime.store)
    history = client.get(PREFIX).text.split('id="history"')[1]
    assert "paused_operator" in history and "resumed" in history


def test_retire_and_promote_change_the_next_assignment(
    client: TestClient, runtime: Runtime
) -> None:
    exp = runtime.config.experiment.id
    token = login(client)
    response = client.post(f"{PREFIX}/arms/proactive-upsell/retire", data={"csrf": token})
    assert response.status_code == 200
    assert "proactive-upsell" not in assigned_arms(runtime, prefix="retired")
    # Promoting a retired arm brings it back, as the champion.
    response = client.post(
        f"{PREFIX}/arms/proactive-upsell/promote", data={"csrf": csrf_of(response.text)}
    )
    assert response.status_code == 200
    statuses = runtime.store.arm_statuses(exp)
    assert statuses["proactive-upsell"] == "champion" and statuses["concise"] == "active"
    assert "proactive-upsell" in assigned_arms(runtime, prefix="promoted")
    assert runtime.store.latest_snapshot(exp).summary["champion"] == "proactive-upsell"
    targets = [(a[1], a[2]) for a in audit_actions(runtime.store)]
    assert ("arm.retire", "proactive-upsell") in targets and (
        "arm.promote",
        "proactive-upsell",
    ) in targets


def test_a_new_variant_from_the_dashboard_is_served_at_once_and_undone_by_retiring(
    client: TestClient, runtime: Runtime
) -> None:
    exp = runtime.config.experiment.id
    token = login(client)
    text = "You are Lumen Tasks' support bot. Answer in two sentences at most."
    response = client.post(
        f"{PREFIX}/variants",
        data={"csrf": token, "arm_id": "brief", "prompt": text, "fewshot": "retrieved", "k": "2"},
    )
    assert response.status_code == 200 and "brief created" in response.text
    assert runtime.store.arm_statuses(exp)["brief"] == "active"
    assert "brief" in assigned_arms(runtime, n=120, prefix="variant")  # no restart
    arm, variant = runtime.serve("brief")
    assert variant.template == text and (arm.fewshot, arm.k) == ("retrieved", 2)
    assert ("operator", "arm_added", f"{exp}/brief") in audit_actions(runtime.store)
    token = csrf_of(response.text)
    again = client.post(
        f"{PREFIX}/variants",
        data={"csrf": token, "arm_id": "brief", "prompt": text, "fewshot": "retrieved", "k": "2"},
    )
    assert again.status_code == 409 and "already serves exactly this prompt" in again.text
    # the same prompt with a model of its own is another arm version, and shows its model
    token = csrf_of(again.text)
    hosted = client.post(
        f"{PREFIX}/variants",
        data={
            "csrf": token,
            "arm_id": "brief",
            "prompt": text,
            "fewshot": "retrieved",
            "k": "2",
            "model": "openai/gpt-4o-mini",
        },
    )
    assert hosted.status_code == 200 and "brief@v2 added as a new version" in hosted.text
    assert runtime.serve_model("brief@v2")[0].name == "openai/gpt-4o-mini"
    assert "model openai/gpt-4o-mini" in client.get(PREFIX).text
    token = csrf_of(hosted.text)
    for bad, reason in (
        ({"arm_id": "x", "prompt": "  "}, "prompt must not be empty"),
        ({"arm_id": "bad id!", "prompt": "Hi"}, "invalid variant: id"),
        ({"arm_id": "x", "prompt": "Hi", "fewshot": "fixed"}, "fewshot must be"),
        ({"arm_id": "x", "prompt": "Hi", "k": "many"}, "k must be a whole number"),
        (
            {"arm_id": "x", "prompt": "Hi", "model": "openai/x", "api_base": "http://x.io/v1"},
            "not in model.allowed_api_bases",
        ),
        ({"arm_id": "x", "prompt": "Hi", "api_base": "http://x.io/v1"}, "need its &#39;model"),
    ):
        refused = client.post(f"{PREFIX}/variants", data={"csrf": token, **bad})
        assert refused.status_code == 400 and reason in refused.text, (bad, refused.text)
    undo = client.post(f"{PREFIX}/arms/brief@v2/retire", data={"csrf": token})
    assert undo.status_code == 200 and runtime.store.arm_statuses(exp)["brief@v2"] == "retired"
    assert not {"brief", "brief@v2"} & assigned_arms(runtime, prefix="undone")
    assert 'id="holdback-lift"' in client.get(PREFIX).text


def test_run_optimizer_now_serves_the_new_snapshot(client: TestClient, runtime: Runtime) -> None:
    exp = runtime.config.experiment.id
    first = runtime.assigner.assign("s-before", "u-before")
    assert first.snapshot_version is None  # uniform before any snapshot
    token = login(client)
    response = client.post(f"{PREFIX}/optimize", data={"csrf": token})
    assert (
        response.status_code == 200 and "optimizer ran; policy snapshot v1 written" in response.text
    )
    assert runtime.assigner.assign("s-after", "u-after").snapshot_version == 1
    assert runtime.store.latest_snapshot(exp).version == 1
    assert ("operator", "optimizer.run", exp) in audit_actions(runtime.store)


def test_challenger_cap_limits_the_next_assignments(client: TestClient, runtime: Runtime) -> None:
    token = login(client)
    response = client.post(f"{PREFIX}/arms/empathetic/cap", data={"csrf": token, "cap": "5"})
    assert response.status_code == 200 and "empathetic capped at 5%" in response.text
    probs = runtime.assigner.allocation().for_segment("*")
    assert probs["empathetic"] <= 0.05 + 1e-9


def test_cap_action_is_recorded_and_validated(client: TestClient, runtime: Runtime) -> None:
    token = login(client)
    for bad in ("", "abc", "0", "150", "nan"):
        response = client.post(f"{PREFIX}/arms/empathetic/cap", data={"csrf": token, "cap": bad})
        assert response.status_code == 400, bad
        assert "cap" in response.text
    response = client.post(f"{PREFIX}/arms/empathetic/cap", data={"csrf": token, "cap": "10"})
    assert response.status_code == 200
    ev = schema.arm_events
    with runtime.store.engine.connect() as conn:
        row = conn.execute(sa.select(ev).where(ev.c.kind == "cap_set")).one()
    assert (
        row.arm_id == "empathetic"
        and row.evidence["cap"] == pytest.approx(0.1)
        and row.actor == "operator"
    )
    assert ("operator", "arm.cap", "empathetic") in audit_actions(runtime.store)


def test_actions_refused_with_a_reason(client: TestClient, runtime: Runtime) -> None:
    token = login(client)
    cases = [
        ("/arms/concise/pause", 409, "is the champion"),
        ("/arms/concise/retire", 409, "is the champion"),
        ("/arms/empathetic/resume", 409, "is not paused"),
        ("/arms/concise/promote", 409, "already the champion"),
        ("/arms/nope/pause", 404, "no arm 'nope'"),
        ("/arms/empathetic/explode", 400, "action must be one of"),
    ]
    for path, status, reason in cases:
        response = client.post(PREFIX + path, data={"csrf": token})
        assert response.status_code == status, path
        assert reason in html.unescape(response.text), path
    # Never leave the experiment without an arm to serve.
    for arm in ARMS[1:-1]:
        assert client.post(f"{PREFIX}/arms/{arm}/retire", data={"csrf": token}).status_code == 200
    response = client.post(f"{PREFIX}/arms/proactive-upsell/pause", data={"csrf": token})
    assert response.status_code == 200  # concise (champion) still serves
    assert assigned_arms(runtime, prefix="last") == {"concise"}


# -- pages --------------------------------------------------------------------------------------


def test_experiment_page_and_local_plotly(client: TestClient) -> None:
    login(client)
    page = client.get(PREFIX)
    assert page.status_code == 200
    assert page.headers["cache-control"] == "no-store"
    assert page.headers["x-frame-options"] == "DENY"
    assert f'<script src="{PREFIX}/static/plotly.min.js">' in page.text
    assert not re.search(r'<script[^>]+src="https?://', page.text)  # no CDN
    for name in ("allocation", "posterior", "cumulative_kpi", "guardrails"):
        assert f'id="plot-{name}"' in page.text
    js = client.get(f"{PREFIX}/static/plotly.min.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("application/javascript")
    assert len(js.content) > 1_000_000
    data = client.get(f"{PREFIX}/report.json").json()
    assert {a["id"] for a in data["arms"]} == set(ARMS)


def test_drill_down_shows_turns_votes_outcomes_and_trace_links(
    client: TestClient, runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    record = runtime.assigner.assign("sess-1", "user-1")
    exp = runtime.config.experiment.id
    runtime.store.record_turn(
        TurnRecord(
            "turn-1",
            "sess-1",
            "user-1",
            exp,
            record.arm_id,
            "p",
            "h",
            "fake/echo",
            "How do I <b>export</b>?",
            "Settings, then Export.",
            latency_ms=123.0,
            trace_id="abc123",
        )
    )
    runtime.store.record_feedback("turn-1", "user-1", 0, "too short")
    runtime.store.record_outcome(OutcomeRecord("k-1", "conversion", 1.0, session_id="sess-1"))
    login(client)
    monkeypatch.delenv("LANGFUSE_BASE_URL", raising=False)
    monkeypatch.delenv("LANGFUSE_HOST", raising=False)
    page = client.get(f"{PREFIX}/arms/{record.arm_id}")
    assert page.status_code == 200
    assert "How do I &lt;b&gt;export&lt;/b&gt;?" in page.text  # user text is escaped
    assert "thumbs down" in page.text and "too short" in page.text and "conversion" in page.text
    assert "/trace/" not in page.text
    monkeypatch.setenv("LANGFUSE_HOST", "http://127.0.0.1:3000/")
    page = client.get(f"{PREFIX}/arms/{record.arm_id}")
    assert 'href="http://127.0.0.1:3000/trace/abc123"' in page.text
    assert client.get(f"{PREFIX}/arms/nope").status_code == 404


def test_fewshot_review_approves_and_rejects(client: TestClient, runtime: Runtime) -> None:
    bank = ExampleBank(runtime.store)
    keep = bank.add(
        "How can I export invoices to PDF?",
        "Open Billing, pick the invoice, Export PDF.",
        source="mined",
    )
    drop = bank.add(
        "Can I get a refund after 90 days?", "Refunds are possible within 30 days.", source="mined"
    )
    assert keep and drop
    token = login(client)
    page = client.get(f"{PREFIX}/examples")
    assert page.status_code == 200 and "export invoices to PDF" in page.text
    assert client.post(f"{PREFIX}/examples/{keep}/approve", data={"csrf": token}).status_code == 200
    assert (
        client.post(
            f"{PREFIX}/examples/{drop}/reject", data={"csrf": token, "reason": "wrong"}
        ).status_code
        == 200
    )
    assert bank.get(keep).status == "approved" and bank.get(drop).status == "rejected"
    # The next retrieved turn can use the approved example, never the rejected one.
    retrieved = next(a for a in runtime.arms.values() if a.fewshot == "retrieved")
    chosen = [e.id for e in runtime.selector.select(retrieved, "export my invoices as pdf")]
    assert keep in chosen and drop not in chosen
    assert ("operator", "example.approve", keep) in audit_actions(runtime.store)
    assert ("operator", "example.reject", drop) in audit_actions(runtime.store)
    assert client.post(f"{PREFIX}/examples/nope/approve", data={"csrf": token}).status_code == 404
    assert (
        client.post(f"{PREFIX}/examples/{keep}/frobnicate", data={"csrf": token}).status_code == 400
    )


def test_off_policy_estimates_page(client: TestClient, runtime: Runtime) -> None:
    old = datetime.now(UTC) - timedelta(days=40)  # every attribution window has closed
    for i in range(400):
        record = runtime.assigner.assign(f"ope-s{i}", f"ope-u{i}", at=old + timedelta(minutes=i))
        if i % 5 == 0:
            runtime.store.record_outcome(
                OutcomeRecord(
                    f"ope-k{i}",
                    "conversion",
                    1.0,
                    session_id=record.session_id,
                    occurred_at=record.assigned_at,
                )
            )
    token = login(client)
    assert client.post(f"{PREFIX}/optimize", data={"csrf": token}).status_code == 200
    page = client.get(f"{PREFIX}/ope")
    assert page.status_code == 200
    text = html.unescape(page.text)
    assert "from 400 complete logged sessions" in text
    for arm in ARMS:
        assert f'data-target="arm:{arm}"' in page.text
    assert 'data-target="snapshot"' in page.text


def test_unattributed_outcomes_are_listed_and_rejudged(
    client: TestClient, runtime: Runtime
) -> None:
    """The dashboard lists what does not count, with the reason; re-judging is audited and
    credits an outcome whose session arrived late (written by another replica, say)."""
    now = datetime.now(UTC)
    store = runtime.store
    store.record_outcome(
        OutcomeRecord(
            "late-session",
            "conversion",
            1.0,
            session_id="later-s1",
            occurred_at=now,
            attribution="unknown_session",
        )
    )
    store.record_outcome(
        OutcomeRecord(
            "odd-name",
            "newsletter",
            1.0,
            session_id="later-s1",
            occurred_at=now,
            attribution="unused_name",
        )
    )
    store.record_outcome(
        OutcomeRecord("counted", "conversion", 1.0, user_id="u-x", attribution="attributed")
    )
    token = login(client)
    page = client.get(f"{PREFIX}/outcomes")
    assert page.status_code == 200
    text = html.unescape(page.text)
    assert "2 not attributed" in text and "unknown_session 1" in text.replace("</b>", "")
    assert 'data-key="late-session" data-reason="unknown_session"' in page.text
    assert 'data-key="odd-name" data-reason="unused_name"' in page.text
    assert 'data-key="counted"' not in page.text
    assert f'href="{PREFIX}/outcomes"' in client.get(PREFIX).text

    # The session arrives; an operator re-judges.
    runtime.assigner.assign("later-s1", "u-late", at=now - timedelta(minutes=1))
    response = client.post(f"{PREFIX}/outcomes/reattribute", data={"csrf": token})
    assert response.status_code == 200
    assert "re-judged outcomes: attributed 1, unused_name 1" in html.unescape(response.text)
    assert ("operator", "outcomes.reattribute", runtime.config.experiment.id) in audit_actions(
        store
    )
    page = client.get(f"{PREFIX}/outcomes")
    assert 'data-key="late-session"' not in page.text and 'data-key="odd-name"' in page.text
    # Without the CSRF token nothing is re-judged.
    assert client.post(f"{PREFIX}/outcomes/reattribute", data={}).status_code == 403


def test_report_cache_reuses_then_recomputes() -> None:
    calls: list[int] = []
    now = [0.0]
    cache = ReportCache(
        lambda: {"n": len(calls.append(1) or calls)}, ttl_s=30, clock=lambda: now[0]
    )
    assert cache.get() == {"n": 1} and cache.get() == {"n": 1}
    now[0] = 29.9
    assert cache.get() == {"n": 1}
    now[0] = 30.0
    assert cache.get() == {"n": 2}
    cache.clear()
    assert cache.get() == {"n": 3}
    with pytest.raises(ValueError, match="ttl_s must be >= 0 seconds, got -1"):
        ReportCache(dict, ttl_s=-1)


def test_public_names() -> None:
    import chatbot.web.operator

    assert chatbot.web.operator.__all__ == ["PREFIX", "create_router"]
