"""``flywheel demo``: a simulated experiment in its own database, never mixed with real data."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from chatbot.cli import app
from chatbot.runtime import experiment_arms
from optimizer.cli.demo import DEMO_POOR_REPLIES, build_demo
from optimizer.config import load_config
from optimizer.errors import ConfigError
from optimizer.export import export_dataset
from optimizer.prompt_library import load_prompts
from optimizer.report import experiment_report
from optimizer.store import AssignmentRecord, Store, schema

ROOT = Path(__file__).resolve().parents[2]


def test_demo_command_fills_a_separate_simulated_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path))
    result = CliRunner().invoke(app, ["demo", "--days", "3", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["database_url"] == f"sqlite:///{tmp_path / 'demo.db'}"
    assert out["sessions"] == 2700 and out["paused_arms"] == ["proactive-upsell"]

    config = load_config(out["config"], environ=False)
    assert config.database_url == out["database_url"]
    assert config.experiment.id == "sim-demo-thompson-1"
    # The demo's arms are the project's prompt files, so `flywheel serve` can chat on it.
    assert set(experiment_arms(config, load_prompts(ROOT / "prompts"))) == set(
        out["sessions_per_arm"]
    )

    store = Store(config.database_url)
    try:
        a = schema.assignments
        with store.engine.connect() as conn:
            flags = conn.execute(
                sa.select(a.c.simulated, sa.func.count()).group_by(a.c.simulated)
            ).all()
        assert [(bool(f), n) for f, n in flags] == [(True, 2700)]
        report = experiment_report(store, config)
        pairs = export_dataset(store, config, "dpo", tmp_path / "dpo", now=datetime.now(UTC))
    finally:
        store.dispose()
    # thumbed-down turns were told something worse than the liked answer: DPO pairs exist
    rows = [json.loads(line) for line in pairs.path.read_text().splitlines()]
    assert len(rows) > 0 and pairs.manifest["counts"]["thumbs_down"] > 0
    assert all(r["rejected"] in DEMO_POOR_REPLIES for r in rows)
    assert all(r["chosen"] not in DEMO_POOR_REPLIES for r in rows)
    assert report["simulated"] is True
    assert report["snapshot"]["version"] == out["refits"] + 1  # the last fit is at today's date
    assert [f["arm"] for f in report["guardrail_firings"]] == ["proactive-upsell"]
    assert report["totals"]["complete_sessions"] == 2700  # every window has closed since


def test_demo_refuses_a_store_with_real_sessions(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'real.db'}"
    store = Store(url)
    store.upgrade()
    store.record_assignment(
        AssignmentRecord("s1", "u1", "support-v1", "concise", 1.0, None, "*", {}, datetime.now(UTC))
    )
    result = CliRunner().invoke(app, ["demo", "--database-url", url, "--days", "2"])
    assert result.exit_code == 2
    assert "holds 1 real (non-simulated) sessions" in " ".join(result.output.split())
    with store.engine.connect() as conn:
        assert (
            conn.execute(sa.select(sa.func.count()).select_from(schema.assignments)).scalar() == 1
        )
        assert conn.execute(sa.select(sa.func.count()).select_from(schema.turns)).scalar() == 0
    store.dispose()


def test_demo_is_not_built_twice_unless_forced(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'demo.db'}"
    build_demo(url, days=2, home=tmp_path)
    with pytest.raises(ConfigError, match=r"already holds the demo .* pass --force to rebuild it"):
        build_demo(url, days=2, home=tmp_path)
    result, _ = build_demo(url, days=2, home=tmp_path, force=True)
    assert result.sessions == 1800
    store = Store(url)
    with store.engine.connect() as conn:  # rebuilt, not appended
        assert (
            conn.execute(sa.select(sa.func.count()).select_from(schema.assignments)).scalar()
            == 1800
        )
    store.dispose()
