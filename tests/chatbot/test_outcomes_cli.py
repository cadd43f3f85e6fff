"""``flywheel outcomes unattributed`` and ``flywheel outcomes reattribute`` on a real store."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import sqlalchemy as sa
from typer.testing import CliRunner, Result

from chatbot.cli import app
from optimizer.store import AssignmentRecord, OutcomeRecord, Store, schema

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "flywheel.toml")


def _run(*args: str) -> Result:
    result = CliRunner().invoke(app, ["outcomes", *args, "--config", CONFIG])
    assert result.exit_code == 0, result.output
    return result


def test_list_then_reattribute_a_late_session(store: Store, store_url: str) -> None:
    from optimizer.config import load_config

    experiment = load_config(CONFIG, environ=False).experiment.id
    now = datetime.now(UTC)
    store.record_outcome(
        OutcomeRecord(
            "k-late",
            "conversion",
            1.0,
            session_id="s-late",
            occurred_at=now,
            attribution="unknown_session",
        )
    )
    store.record_outcome(OutcomeRecord("k-old", "conversion", 1.0, session_id="s-none"))
    listed = json.loads(_run("unattributed", "--database-url", store_url, "--json").output)
    assert listed["total"] == 2
    assert listed["counts"] == {"unjudged": 1, "unknown_session": 1}
    assert {o["idempotency_key"] for o in listed["outcomes"]} == {"k-late", "k-old"}
    table = _run("unattributed", "--database-url", store_url).output
    assert "2 outcome(s) not attributed: unjudged 1, unknown_session 1" in table

    store.record_assignment(
        AssignmentRecord(
            "s-late", "u1", experiment, "concise", 0.2, None, "*", {}, now - timedelta(minutes=1)
        )
    )
    out = json.loads(_run("reattribute", "--database-url", store_url, "--json").output)
    assert out == {"verdicts": {"attributed": 1, "unknown_session": 1}}
    o = schema.outcomes
    with store.engine.connect() as conn:
        rows = dict(conn.execute(sa.select(o.c.idempotency_key, o.c.attributed_session_id)).all())
    assert rows["k-late"] == "s-late" and rows["k-old"] is None
    left = json.loads(_run("unattributed", "--database-url", store_url, "--json").output)
    assert left["counts"] == {"unknown_session": 1}
    assert "re-judged attributed" not in _run("reattribute", "--database-url", store_url).output


def test_limit_is_validated(sqlite_store: Store, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'flywheel.db'}"
    result = CliRunner().invoke(
        app, ["outcomes", "unattributed", "--limit", "0", "--database-url", url, "--config", CONFIG]
    )
    assert result.exit_code == 2 and "--limit must be >= 1, got 0" in result.output
