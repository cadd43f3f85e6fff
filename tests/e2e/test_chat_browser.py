"""End to end in a real browser, against the real local model.

Log in as demo/demo, ask a question, watch the reply stream in (socket.io
``stream_start`` / ``stream_token`` frames), rate it thumbs up with a comment,
click "Start free trial"; then read the store: the assignment with its
propensity, the turn with its measurements, the vote with its comment and
the conversion outcome, all tied to the same session, user and turn.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from optimizer.config import load_config
from optimizer.store import schema

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

QUESTION = "How long is the free trial of the Team plan?"
COMMENT = "Clear and short, thanks"
#: Loading the model on the first reply and generating on a shared 2-core machine.
REPLY_TIMEOUT_MS = 180_000


def _socket_events(frames: list[str]) -> list[tuple[str, dict[str, Any]]]:
    """Decode socket.io event frames (``42["name", {...}]``)."""
    events = []
    for frame in frames:
        if frame.startswith("42"):
            payload = json.loads(frame[2:])
            if isinstance(payload, list) and len(payload) == 2 and isinstance(payload[1], dict):
                events.append((payload[0], payload[1]))
    return events


def _chat_started(frames: list[str]) -> bool:
    """on_chat_start has run (the session is assigned): its run step was updated."""
    return any(
        name == "update_message" and e.get("name") == "on_chat_start"
        for name, e in _socket_events(frames)
    )


def _wait_until(page: Any, condition: Any, *, timeout_s: float) -> None:
    for _ in range(int(timeout_s * 10)):
        if condition():
            return
        page.wait_for_timeout(100)  # lets Playwright deliver websocket frames meanwhile
    pytest.fail(f"condition not met within {timeout_s} s")


def test_chat_rate_and_convert_in_the_browser(served: Any, browser: Any) -> None:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    frames: list[str] = []
    page.on(
        "websocket",
        lambda ws: ws.on(
            "framereceived",
            lambda f: frames.append(f if isinstance(f, str) else f.decode(errors="replace")),
        ),
    )
    try:
        page.goto(served.url)
        page.wait_for_url("**/login")
        page.fill("#email", "demo")
        page.fill("#password", "demo")
        page.locator("button[type=submit]").click()
        page.wait_for_selector("#chat-input", timeout=60_000)
        # The input shows before the websocket is up; a message typed earlier is lost.
        _wait_until(page, lambda: _chat_started(frames), timeout_s=60)

        page.fill("#chat-input", QUESTION)
        page.keyboard.press("Enter")
        # Actions are attached when the reply is complete.
        trial = page.get_by_role("button", name="Start free trial")
        trial.wait_for(timeout=REPLY_TIMEOUT_MS)
        reply_text = page.locator(".ai-message").last.inner_text()

        page.locator(".positive-feedback-off").last.click()
        page.get_by_placeholder("Your feedback...").fill(COMMENT)
        page.get_by_role("button", name="Submit feedback").click()
        page.locator(".positive-feedback-on").last.wait_for(timeout=30_000)

        trial.click()
        page.get_by_text("Start free trial” is recorded").wait_for(timeout=30_000)
    finally:
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "e2e-chat.png"), full_page=True)
        page.close()

    # The reply was streamed: a stream_start and further tokens for one message.
    events = _socket_events(frames)
    starts = [e for name, e in events if name == "stream_start"]
    assert len(starts) == 1, [name for name, _ in events]
    streamed = [
        e["token"] for name, e in events if name == "stream_token" and e["id"] == starts[0]["id"]
    ]
    assert streamed, "the reply arrived in one piece, not streamed"

    engine = sa.create_engine(served.database_url)
    with engine.connect() as conn:
        assignments = conn.execute(sa.select(schema.assignments)).all()
        turns = conn.execute(sa.select(schema.turns)).all()
        votes = conn.execute(sa.select(schema.feedback)).all()
        vote_events = conn.execute(sa.select(schema.feedback_events)).all()
        outcomes = conn.execute(sa.select(schema.outcomes)).all()
        threads = conn.execute(sa.select(schema.threads)).all()
    engine.dispose()

    config = load_config(ROOT / "flywheel.toml", environ=False)
    arm_ids = {a.id for a in config.experiment.arms}
    assert len(assignments) == 1
    (a,) = assignments
    assert a.user_id == "demo" and a.arm_id in arm_ids
    assert a.propensity == pytest.approx(1 / len(arm_ids))  # uniform before any snapshot
    assert a.snapshot_version is None and a.context["channel"] == "web"
    assert [t.id for t in threads] == [a.session_id] and threads[0].user_identifier == "demo"

    assert len(turns) == 1
    (t,) = turns
    assert (t.session_id, t.user_id, t.arm_id) == (a.session_id, "demo", a.arm_id)
    assert t.user_message == QUESTION
    assert t.error is None, t.error
    assert t.model == "local/gemma3-270m"
    words = re.findall(r"[A-Za-z]{3,}", t.reply)[:3]
    assert words and all(w in reply_text for w in words), (t.reply, reply_text)
    assert "".join(streamed) in t.reply  # the tokens the browser saw are the recorded reply
    assert t.prompt_id and len(t.prompt_hash) == 16
    assert 0 < t.ttft_ms <= t.latency_ms
    assert t.prompt_tokens > 0 and 0 < t.completion_tokens <= 32 and t.cost == 0.0

    assert [(v.turn_id, v.user_id, v.value, v.comment) for v in votes] == [
        (t.id, "demo", 1, COMMENT)
    ]
    assert [(e.kind, e.value) for e in vote_events] == [("upsert", 1)]

    assert len(outcomes) == 1
    (o,) = outcomes
    assert (o.name, o.value, o.source) == ("conversion", 1.0, "chat")
    assert (o.session_id, o.user_id) == (a.session_id, "demo")
    assert o.extra["turn_id"] == t.id
