"""Segments from login attributes, end to end in a real browser (Debian's Chromium).

Two people log in through the login page in separate browser contexts: ``free`` users
carry ``plan = "free"`` and ``pro`` users ``plan = "pro"`` in the configuration's
``[[auth.users]] attributes``; ``experiment.segment_by = ["plan"]``. A policy snapshot
gives each segment a different arm. Each asks a question in the chat UI and sees the reply;
the store then shows each session in its segment, served from that segment's allocation,
with the snapshot's version. The model is the fake echo provider (the boundary): what is
under test is which arm serves whom, not the model; the local model's browser tests are in
``test_chat_browser.py``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from optimizer.config import load_config
from optimizer.store import Store, schema
from tests.e2e.test_chat_browser import ARTIFACTS, _chat_started, _wait_until
from tests.support.flywheel_process import PASSWORD, ServerProcess, user_name, write_config

pytestmark = [pytest.mark.e2e]

#: The server caches the newest snapshot this long (Assigner.snapshot_ttl_s).
SNAPSHOT_TTL_S = 5.0
FREE, PRO = user_name(0), user_name(1)


@pytest.fixture(scope="module")
def segmented(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, Path]]:
    root = tmp_path_factory.mktemp("segments-browser")
    config = write_config(
        root / "flywheel.toml",
        users=2,
        segment_by=["plan"],
        attributes={FREE: {"plan": "free"}, PRO: {"plan": "pro"}},
    )
    server = ServerProcess(
        "e2e-segments", root / "home", config, f"sqlite:///{root / 'flywheel.db'}"
    ).start()
    try:
        yield server, config
    finally:
        server.stop()


def _chat_as(browser: Any, url: str, user: str, question: str) -> str:
    """Log in through the page, send ``question``, wait for the reply; returns its text."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    frames: list[str] = []
    page.on(
        "websocket",
        lambda ws: ws.on(
            "framereceived",
            lambda f: frames.append(f if isinstance(f, str) else f.decode(errors="replace")),
        ),
    )
    try:
        page.goto(url)
        page.wait_for_url("**/login")
        page.fill("#email", user)
        page.fill("#password", PASSWORD)
        page.locator("button[type=submit]").click()
        page.wait_for_selector("#chat-input", timeout=60_000)
        _wait_until(page, lambda: _chat_started(frames), timeout_s=60)
        page.fill("#chat-input", question)
        page.keyboard.press("Enter")
        page.get_by_role("button", name="Start free trial").wait_for(timeout=60_000)
        return str(page.locator(".ai-message").last.inner_text())
    finally:
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / f"e2e-segments-{user}.png"), full_page=True)
        context.close()


def test_two_users_in_two_segments_are_served_from_their_segments_allocation(
    segmented: tuple[ServerProcess, Path], browser: Any
) -> None:
    server, config_path = segmented
    experiment = load_config(config_path, environ=False).experiment.id
    store = Store(server.database_url)
    try:
        allocation = {
            "segments": {
                "*": {"concise": 1.0},
                "plan=free": {"concise": 1.0},
                "plan=pro": {"empathetic": 1.0},
            }
        }
        version = store.save_snapshot(experiment, "test", allocation, {"arms": {}})
        time.sleep(SNAPSHOT_TTL_S + 0.5)  # the server re-reads within its snapshot cache time
        replies = {
            user: _chat_as(browser, server.url, user, f"Which plan suits me? ({user})")
            for user in (FREE, PRO)
        }
        a, t = schema.assignments, schema.turns
        with store.engine.connect() as conn:
            rows = {r.user_id: r for r in conn.execute(sa.select(a)).all()}
            turns = {r.user_id: r for r in conn.execute(sa.select(t)).all()}
    finally:
        store.dispose()
    assert set(rows) == {FREE, PRO}
    for user, (segment, arm) in {
        FREE: ("plan=free", "concise"),
        PRO: ("plan=pro", "empathetic"),
    }.items():
        row = rows[user]
        assert (row.segment, row.arm_id, row.snapshot_version) == (segment, arm, version)
        assert row.propensity == 1.0 and row.context["plan"] == segment.removeprefix("plan=")
        turn = turns[user]
        assert (turn.session_id, turn.arm_id) == (row.session_id, arm)
        assert turn.error is None and turn.reply.strip()
        assert replies[user].strip(), f"{user} saw no reply in the browser"
