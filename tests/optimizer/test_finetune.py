"""Fine-tuning against a recording OpenAI-compatible server on 127.0.0.1, through real litellm.

The server records every request (file upload, job creation, polling, chat
completions) and plays a scripted job life. Checks: the uploaded dataset is
exactly the export, nothing unscrubbed leaves, opted-out users, deleted and
still-open sessions stay out, the arm appears with its manifest and its model
answers, a failed job leaves the experiment untouched, the spending cap holds,
retraining becomes due on schedule.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from chatbot.llm.finetune import LiteLLMFineTuneProvider
from optimizer.config import (
    ArmConfig,
    Config,
    ExperimentConfig,
    FineTuneConfig,
    KPIConfig,
    KPITermConfig,
    load_config,
)
from optimizer.errors import FineTuneError
from optimizer.finetune import jobs, poll_job, qualifying_sessions, retrain_due, start_job
from optimizer.prompt_library import arm_spec, load_prompts
from optimizer.store import AssignmentRecord, OutcomeRecord, Store, TurnRecord, schema
from tests.support.openai_recorder import FT_MODEL, Recorder

ROOT = Path(__file__).resolve().parents[2]
START = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
NOW = START + timedelta(days=20)
PII = ("Maria Lopez", "maria.lopez@example.com", "+44 7911 123456")


@pytest.fixture
def server() -> Iterator[Recorder]:
    srv = Recorder()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-secret")


def _config(base: str, **finetune: Any) -> Config:
    cfg = load_config("/nonexistent.toml", environ=False)
    return cfg.model_copy(
        update={
            "prompts_dir": str(ROOT / "prompts"),
            "experiment": ExperimentConfig(
                id="exp",
                salt="exp",
                champion="concise",
                arms=(
                    ArmConfig(id="concise", prompt="concise"),
                    ArmConfig(id="empathetic", prompt="empathetic"),
                ),
            ),
            "kpi": KPIConfig(
                terms=(
                    KPITermConfig(
                        name="conversion", source="outcome:conversion", weight=1.0, window_days=7
                    ),
                    KPITermConfig(
                        name="thumbs_up", source="feedback:up_rate", weight=0.2, window_days=1
                    ),
                ),
                guardrails=(),
            ),
            "model": cfg.model.model_copy(update={"allowed_api_bases": (base,)}),
            "finetune": FineTuneConfig(
                **{"api_base": base, "min_sessions": 2, "qualify": ("conversion",), **finetune}
            ),
        }
    )


def _session(
    store: Store,
    sid: str,
    question: str,
    reply: str,
    *,
    at: datetime = START,
    user: str | None = None,
    converted: bool = False,
) -> None:
    user = user or f"user-{sid}"
    store.record_assignment(AssignmentRecord(sid, user, "exp", "concise", 0.5, None, "*", {}, at))
    store.record_turn(
        TurnRecord(
            id=f"{sid}-t0",
            session_id=sid,
            user_id=user,
            experiment_id="exp",
            arm_id="concise",
            prompt_id="concise",
            prompt_hash="h",
            model="local/gemma3-270m",
            user_message=question,
            reply=reply,
            created_at=at + timedelta(minutes=1),
        )
    )
    if converted:
        store.record_outcome(
            OutcomeRecord(
                f"{sid}-conv",
                "conversion",
                1.0,
                session_id=sid,
                occurred_at=at + timedelta(minutes=5),
            )
        )


def _seed(store: Store, cfg: Config) -> None:
    prompts = load_prompts(ROOT / "prompts")
    store.sync_experiment("exp", "exp", [arm_spec(a, prompts) for a in cfg.experiment.arms])
    _session(
        store,
        "s1",
        "Hi, I'm Maria Lopez (maria.lopez@example.com). How do I export my projects?",
        "Go to Settings > Data > Export, Maria Lopez.",
        converted=True,
    )
    _session(
        store,
        "s2",
        "Call me on +44 7911 123456: can I start a trial?",
        "Yes, click Start free trial.",
        at=START + timedelta(hours=2),
        converted=True,
    )
    _session(store, "s3", "walrus question", "walrus answer")  # no conversion
    _session(store, "s4", "pineapple question", "pineapple answer", user="quitter", converted=True)
    store.set_opt_out("quitter", actor="quitter")
    _session(store, "s5", "mango question", "mango answer", converted=True)
    store.delete_conversation("s5", user_id="user-s5", actor="user-s5")
    # converted, but its 7-day window is still open at NOW
    _session(
        store, "s6", "kiwi question", "kiwi answer", at=NOW - timedelta(days=2), converted=True
    )


def _counts(store: Store) -> tuple[int, int, int]:
    with store.engine.connect() as conn:
        return tuple(  # type: ignore[return-value]
            conn.execute(sa.select(sa.func.count()).select_from(t)).scalar()
            for t in (schema.arms, schema.arm_events, schema.policy_snapshots)
        )


def test_qualifying_sessions_wait_for_windows_and_respect_consent(store: Store) -> None:
    cfg = _config("http://127.0.0.1:9/v1")
    _seed(store, cfg)
    assert qualifying_sessions(store, cfg, now=NOW)["session_id"].tolist() == ["s1", "s2"]
    later = qualifying_sessions(store, cfg, now=NOW + timedelta(days=6))
    assert later["session_id"].tolist() == ["s1", "s2", "s6"]


def test_job_uploads_exactly_the_scrubbed_export_and_the_model_becomes_an_arm(
    store: Store, server: Recorder, tmp_path: Path
) -> None:
    import litellm

    cfg = _config(server.base)
    _seed(store, cfg)
    provider = LiteLLMFineTuneProvider("openai", api_base=server.base)
    job = start_job(store, cfg, provider, tmp_path, now=NOW)
    assert job.status == "running" and job.provider_job_id == "ftjob-1"
    assert server.paths() == ["POST /v1/files", "POST /v1/fine_tuning/jobs"]
    uploaded = server.files[job.provider_file_id or ""]
    on_disk = (tmp_path / job.id / "sft.jsonl").read_bytes()
    assert uploaded == on_disk
    assert hashlib.sha256(uploaded).hexdigest() == job.manifest["dataset_sha256"]
    text = uploaded.decode()
    for secret in PII:
        assert secret not in text
    for kept_out in ("walrus", "pineapple", "mango", "kiwi"):
        assert kept_out not in text
    lines = [json.loads(line) for line in text.splitlines()]
    assert len(lines) == 2 and lines[0]["messages"][2]["content"].startswith("Go to Settings")
    created = json.loads(server.requests[1]["body"])
    assert created["model"] == cfg.finetune.base_model
    assert created["hyperparameters"] == {"n_epochs": cfg.finetune.epochs}
    assert job.manifest["sessions"] == 2 and job.manifest["scrubber_version"]
    assert job.manifest["sessions_from"].startswith("2026-01-05")
    before = _counts(store)

    assert poll_job(store, cfg, provider, job.id, now=NOW).status == "running"
    assert _counts(store) == before  # nothing registered while it runs
    done = poll_job(store, cfg, provider, job.id, now=NOW + timedelta(hours=1))
    assert done.status == "succeeded" and done.fine_tuned_model == FT_MODEL
    arms = {r.id: r for r in store.arms("exp")}
    arm = arms[done.arm_id or ""]
    champion = arms["concise"]
    assert arm.model == f"openai/{FT_MODEL}" and arm.origin == "finetune"
    assert (arm.prompt_hash, arm.fewshot, arm.prompt_text) == (
        champion.prompt_hash,
        champion.fewshot,
        champion.prompt_text,
    )
    assert arm.model_params == {"api_base": server.base}
    assert arm.manifest["dataset_sha256"] == job.manifest["dataset_sha256"]
    assert arm.manifest["sessions"] == 2 and arm.manifest["parent_arm"] == "concise"
    assert store.arm_statuses("exp")[arm.id] == "active"
    # polling again changes nothing
    assert poll_job(store, cfg, provider, job.id).arm_id == arm.id
    assert len(store.arms("exp")) == len(arms)

    # the fine-tuned model answers chat completions through litellm, at the arm's api_base
    reply = litellm.completion(
        model=arm.model,
        messages=[{"role": "user", "content": "hello"}],
        api_base=arm.model_params["api_base"],
        api_key="sk-test-not-a-secret",
    )
    assert reply.choices[0].message.content == "Tuned hello."
    chat = json.loads(server.requests[-1]["body"])
    assert server.requests[-1]["path"] == "/v1/chat/completions" and chat["model"] == FT_MODEL


def test_a_failed_job_leaves_the_experiment_untouched(
    sqlite_store: Store, server: Recorder, tmp_path: Path
) -> None:
    store = sqlite_store
    cfg = _config(server.base)
    _seed(store, cfg)
    provider = LiteLLMFineTuneProvider("openai", api_base=server.base)
    server.script = ["running", "failed"]
    before = _counts(store)
    job = start_job(store, cfg, provider, tmp_path, now=NOW)
    poll_job(store, cfg, provider, job.id, now=NOW)
    failed = poll_job(store, cfg, provider, job.id, now=NOW)
    assert failed.status == "failed" and "too few examples" in (failed.error or "")
    assert failed.arm_id is None and _counts(store) == before

    server.fail_create = True
    with pytest.raises(FineTuneError, match="failed to start"):
        start_job(store, cfg, provider, tmp_path, now=NOW)
    newest = jobs(store, "exp")[0]
    assert newest.status == "failed" and newest.provider_job_id is None
    assert _counts(store) == before


def test_spending_cap_and_minimum_size_stop_before_anything_leaves(
    sqlite_store: Store, server: Recorder, tmp_path: Path
) -> None:
    store = sqlite_store
    cfg = _config(server.base, spend_cap_usd=0.0001)
    _seed(store, cfg)
    provider = LiteLLMFineTuneProvider("openai", api_base=server.base)
    with pytest.raises(FineTuneError, match="spend_cap_usd"):
        start_job(store, cfg, provider, tmp_path, now=NOW)
    small = _config(server.base, min_sessions=3)
    with pytest.raises(FineTuneError, match="min_sessions is 3"):
        start_job(store, small, provider, tmp_path, now=NOW)
    assert server.requests == [] and jobs(store, "exp") == []
    # two jobs within the window: the second counts the first's estimate
    cfg2 = _config(server.base)
    first = start_job(store, cfg2, provider, tmp_path, now=NOW)
    tight = _config(server.base, spend_cap_usd=first.estimated_cost_usd * 1.5)
    with pytest.raises(FineTuneError, match="spent"):
        start_job(store, tight, provider, tmp_path, now=NOW)
    assert start_job(store, tight, provider, tmp_path, now=NOW + timedelta(days=31)).status == (
        "running"
    )


def test_retraining_is_due_by_interval_or_new_sessions(
    sqlite_store: Store, server: Recorder, tmp_path: Path
) -> None:
    store = sqlite_store
    cfg = _config(server.base, retrain_interval_days=14, retrain_after_sessions=2)
    _seed(store, cfg)
    provider = LiteLLMFineTuneProvider("openai", api_base=server.base)
    assert retrain_due(store, cfg, now=NOW) is None  # the first job is an operator's call
    job = start_job(store, cfg, provider, tmp_path, now=NOW)
    assert retrain_due(store, cfg, now=NOW) is None  # a job runs
    poll_job(store, cfg, provider, job.id, now=NOW)
    poll_job(store, cfg, provider, job.id, now=NOW)
    assert retrain_due(store, cfg, now=NOW + timedelta(days=1)) is None
    for i in range(2):
        _session(store, f"n{i}", "q", "a", at=NOW + timedelta(days=1, hours=i), converted=True)
    reason = retrain_due(store, cfg, now=NOW + timedelta(days=9))
    # s6 (window closed by now), n0 and n1 qualified after the last job's newest session
    assert reason is not None and "3 new qualifying sessions" in reason
    assert "retrain_interval_days" in (retrain_due(store, cfg, now=NOW + timedelta(days=15)) or "")
    # the previous fine-tune keeps serving: a new job never retires it
    second = start_job(store, cfg, provider, tmp_path, now=NOW + timedelta(days=15))
    poll_job(store, cfg, provider, second.id)
    poll_job(store, cfg, provider, second.id)
    statuses = store.arm_statuses("exp")
    assert statuses[job.id] == "active" and statuses[second.id] == "active"


def test_cli_start_and_status(sqlite_store: Store, server: Recorder, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from chatbot.cli import app

    cfg = _config(server.base)
    _seed(sqlite_store, cfg)
    toml = tmp_path / "flywheel.toml"
    toml.write_text(
        f'prompts_dir = "{ROOT / "prompts"}"\n'
        f'[model]\nallowed_api_bases = ["{server.base}"]\n'
        '[experiment]\nid = "exp"\nchampion = "concise"\n'
        '[[experiment.arms]]\nid = "concise"\nprompt = "concise"\n'
        '[[experiment.arms]]\nid = "empathetic"\nprompt = "empathetic"\n'
        '[[kpi.terms]]\nname = "conversion"\nsource = "outcome:conversion"\nweight = 1.0\n'
        f'[finetune]\napi_base = "{server.base}"\nmin_sessions = 2\nqualify = ["conversion"]\n'
        "poll_interval_s = 0.05\n",
        encoding="utf-8",
    )
    common = ["--config", str(toml), "--database-url", sqlite_store.url]
    runner = CliRunner()
    started = runner.invoke(
        app,
        [
            "finetune",
            "start",
            "--format",
            "openai-sft",
            "--provider",
            "openai",
            "--out",
            str(tmp_path / "ft"),
            "--json",
            *common,
        ],
    )
    assert started.exit_code == 0, started.output
    job = json.loads(started.output)
    assert job["status"] == "running" and job["sessions"] >= 2
    status = runner.invoke(app, ["finetune", "status", "--watch", "--json", *common])
    assert status.exit_code == 0, status.output
    final = json.loads(status.output)["jobs"][0]
    assert final["status"] == "succeeded" and final["arm_id"] == job["id"]
    bad = runner.invoke(app, ["finetune", "start", "--format", "csv", *common])
    assert bad.exit_code == 2 and "--format" in bad.output


def test_dpo_set_skips_text_less_turns(sqlite_store: Store, tmp_path: Path) -> None:
    from optimizer.export import export_dataset

    cfg = _config("http://127.0.0.1:9/v1")
    _session(sqlite_store, "e1", "", "", converted=True)  # a simulated turn: no words
    _session(sqlite_store, "e2", "How do I export?", "")
    sqlite_store.record_feedback("e1-t0", "user-e1", 1)
    sqlite_store.record_feedback("e2-t0", "user-e2", 0)
    result = export_dataset(sqlite_store, cfg, "dpo", tmp_path, now=NOW)
    assert result.manifest["rows"] == 0 and result.manifest["counts"]["thumbs_up"] == 0
