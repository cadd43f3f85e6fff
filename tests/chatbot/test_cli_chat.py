"""chatbot.cli.chat: `flywheel chat` records what the web UI records; `serve` has its options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa
import tomli_w
from typer.testing import CliRunner

from chatbot.cli import app
from optimizer.store import Store, schema
from tests.support.chat_helpers import ROOT


@pytest.fixture
def config_file(tmp_path: Path, store_url: str) -> Path:
    path = tmp_path / "flywheel.toml"
    path.write_text(
        tomli_w.dumps(
            {
                "database_url": store_url,
                "prompts_dir": str(ROOT / "prompts"),
                "model": {"name": "fake/echo", "retries": 0},
                "experiment": {
                    "id": "cli",
                    "champion": "concise",
                    "arms": [{"id": "concise", "prompt": "concise"}],
                },
                "actions": [
                    {"name": "start_trial", "label": "Start free trial", "outcome": "conversion"}
                ],
            }
        )
    )
    return path


def test_the_repl_chats_rates_and_records_outcomes(
    config_file: Path, store_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path))
    lines = [
        "/up",  # nothing to rate yet
        "Can I export my data?",
        "/down too vague",
        "/trial",
        "/trial",
        "/solved",
        "/nonsense",
        "/quit",
    ]
    result = CliRunner().invoke(
        app, ["chat", "--user", "bob", "--config", str(config_file)], input="\n".join(lines) + "\n"
    )
    assert result.exit_code == 0, result.output
    assert "arm concise" in result.output
    assert "You asked: Can I export my data?" in result.output
    assert "already recorded" in result.output and "unknown command /nonsense" in result.output

    store = Store(store_url)
    try:
        with store.engine.connect() as conn:
            (turn,) = conn.execute(sa.select(schema.turns)).all()
            (vote,) = conn.execute(sa.select(schema.feedback)).all()
            outcomes = conn.execute(sa.select(schema.outcomes.c.name)).scalars().all()
            (assignment,) = conn.execute(sa.select(schema.assignments)).all()
    finally:
        store.dispose()
    assert (turn.user_id, turn.user_message, turn.error) == ("bob", "Can I export my data?", None)
    assert (vote.turn_id, vote.value, vote.comment) == (turn.id, 0, "too vague")
    assert sorted(outcomes) == ["conversion", "resolved", "support_minutes"]
    assert assignment.context == {"channel": "cli"} and assignment.session_id == turn.session_id


def test_serve_documents_host_port_and_config() -> None:
    result = CliRunner().invoke(app, ["serve", "--help"])
    assert result.exit_code == 0
    assert all(option in result.output for option in ("--host", "--port", "--config"))


@pytest.mark.parametrize("command", ["serve", "chat"])
def test_a_model_that_gives_no_tokens_stops_serve_and_chat_with_one_clear_line(
    config_file: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, command: str
) -> None:
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path))
    monkeypatch.setenv("FLYWHEEL_MODEL", "fake/error-401")
    result = CliRunner().invoke(app, [command, "--config", str(config_file)], input="/quit\n")
    assert result.exit_code == 1, result.output
    line = " ".join(result.output.split())  # Rich wraps long lines at the terminal width
    assert "model check failed for fake/error-401: fake/error-401: AuthenticationError 401" in line
    assert "Set the provider's API key (e.g. OPENAI_API_KEY)" in line


@pytest.mark.slow
def test_doctor_reports_the_build_the_load_options_and_the_speed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path))
    config = tmp_path / "flywheel.toml"
    config.write_text(tomli_w.dumps({"prompts_dir": str(ROOT / "prompts")}))
    result = CliRunner().invoke(app, ["doctor", "--json", "--config", str(config)])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{") :])
    assert report["model"] == "local/gemma3-270m" and report["error"] is None
    assert report["local"]["use_extra_bufts"] is False and "AVX2 = 1" in report["local"]["build"]
    assert report["tokens_per_s"] > 0 and report["ttft_ms"] > 0 and report["cpu"]
