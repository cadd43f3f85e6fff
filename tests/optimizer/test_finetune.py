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
from optimizer.finetune import (
    FineTuneHooks,
    JobState,
    finetune_step,
    jobs,
    poll_job,
    qualifying_sessions,
    retrain_due,
    spent,
    start_job,
)
from optimizer.locks import job_lock
from optimizer.prompt_library import arm_spec, load_prompts
from optimizer.refit import run_optimizer
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
    assert final["trained_tokens"] == 1234
    assert final["actual_cost_usd"] == pytest.approx(1234 * 3.0 / 1e6)
    tick = runner.invoke(
        app, ["finetune", "tick", "--out", str(tmp_path / "ft"), "--json", *common]
    )
    assert tick.exit_code == 0, tick.output
    assert json.loads(tick.output) == {"due": None, "started": None}
    bad = runner.invoke(app, ["finetune", "start", "--format", "csv", *common])
    assert bad.exit_code == 2 and "--format" in bad.output


def _seed_pairs(store: Store, cfg: Config) -> None:
    """Thumbed turns: two good pairs (one with personal data), one opted-out user's pair."""
    prompts = load_prompts(ROOT / "prompts")
    store.sync_experiment("exp", "exp", [arm_spec(a, prompts) for a in cfg.experiment.arms])
    votes = (
        ("u1", "How do I export my projects?", "Go to Settings > Data > Export.", 1, None),
        ("d1", "how can I export my projects", "Not sure, try the docs.", 0, None),
        (
            "u2",
            "Can I get a refund for last month?",
            "Yes, within 30 days: email support@lumen.example.",
            1,
            None,
        ),
        (
            "d2",
            "I'm Maria Lopez (maria.lopez@example.com): can I get a refund for last month?",
            "No refunds, Maria Lopez.",
            0,
            None,
        ),
        ("q1", "pineapple export question", "pineapple good", 1, "quitter"),
        ("q2", "pineapple export question", "pineapple bad", 0, "quitter"),
    )
    for sid, question, reply, vote, user in votes:
        _session(store, sid, question, reply, user=user)
        store.record_feedback(f"{sid}-t0", user or f"user-{sid}", vote)
    store.set_opt_out("quitter", actor="quitter")


def test_dpo_job_uploads_openai_preference_rows_and_sends_the_dpo_method(
    sqlite_store: Store, server: Recorder, tmp_path: Path
) -> None:
    store = sqlite_store
    cfg = _config(server.base, format="dpo", min_sessions=1, dpo_beta=0.2)
    _seed_pairs(store, cfg)
    provider = LiteLLMFineTuneProvider("openai", api_base=server.base)
    job = start_job(store, cfg, provider, tmp_path, now=NOW)
    assert job.status == "running" and job.format == "dpo"
    assert server.paths() == ["POST /v1/files", "POST /v1/fine_tuning/jobs"]
    created = json.loads(server.requests[1]["body"])
    assert created == {
        "model": cfg.finetune.base_model,
        "training_file": job.provider_file_id,
        "suffix": job.id,
        "method": {"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 3, "beta": 0.2}}},
    }
    assert server.requests[1]["headers"]["Authorization"] == "Bearer sk-test-not-a-secret"
    uploaded = server.files[job.provider_file_id or ""]
    assert uploaded == (tmp_path / job.id / "dpo_openai.jsonl").read_bytes()
    assert hashlib.sha256(uploaded).hexdigest() == job.manifest["dataset_sha256"]
    assert job.manifest["rows"] == job.manifest["sessions"] == 2
    assert "thumbed-down" in job.manifest["qualify"]["rule"]
    assert job.manifest["session_ids_sha256"] is None
    rows = [json.loads(line) for line in uploaded.decode().splitlines()]
    system = rows[0]["input"]["messages"][0]
    assert system["role"] == "system" and system["content"].startswith(
        load_prompts(ROOT / "prompts").variants["concise"].template
    )
    assert [
        (
            r["input"]["messages"][1],
            r["preferred_output"],
            r["non_preferred_output"],
            sorted(r),
            sorted(r["input"]),
        )
        for r in rows
    ] == [
        (
            {"role": "user", "content": "how can I export my projects"},
            [{"role": "assistant", "content": "Go to Settings > Data > Export."}],
            [{"role": "assistant", "content": "Not sure, try the docs."}],
            ["input", "non_preferred_output", "preferred_output"],
            ["messages"],
        ),
        (
            {"role": "user", "content": rows[1]["input"]["messages"][1]["content"]},
            [
                {
                    "role": "assistant",
                    "content": "Yes, within 30 days: email support@lumen.example.",
                }
            ],
            [{"role": "assistant", "content": rows[1]["non_preferred_output"][0]["content"]}],
            ["input", "non_preferred_output", "preferred_output"],
            ["messages"],
        ),
    ]
    text = uploaded.decode()
    for secret in (*PII, "pineapple"):
        assert secret not in text
    assert "refund for last month" in rows[1]["input"]["messages"][1]["content"]
    # the job follows like any other and its model becomes an arm
    poll_job(store, cfg, provider, job.id, now=NOW)
    done = poll_job(store, cfg, provider, job.id, now=NOW)
    assert done.status == "succeeded" and done.arm_id in store.arm_statuses("exp")
    arm = {r.id: r for r in store.arms("exp")}[done.arm_id or ""]
    assert arm.manifest["format"] == "openai-dpo" and arm.manifest["rows"] == 2


def test_dpo_is_refused_before_upload_where_the_provider_cannot_train_it(
    sqlite_store: Store, server: Recorder, tmp_path: Path
) -> None:
    cfg = _config(server.base, format="dpo", min_sessions=1)
    _seed_pairs(sqlite_store, cfg)
    azure = LiteLLMFineTuneProvider("azure", api_base=server.base)
    with pytest.raises(FineTuneError, match="cannot train on 'dpo'"):
        start_job(sqlite_store, cfg, azure, tmp_path, now=NOW)
    assert server.requests == [] and jobs(sqlite_store, "exp") == []
    server.fail_create = True  # the provider refuses: its reason is on the job
    provider = LiteLLMFineTuneProvider("openai", api_base=server.base)
    with pytest.raises(FineTuneError, match=r"400 .*invalid training file"):
        start_job(sqlite_store, cfg, provider, tmp_path, now=NOW)
    assert jobs(sqlite_store, "exp")[0].status == "failed"


def test_dpo_set_skips_text_less_turns(sqlite_store: Store, tmp_path: Path) -> None:
    from optimizer.export import export_dataset

    cfg = _config("http://127.0.0.1:9/v1")
    _session(sqlite_store, "e1", "", "", converted=True)  # a simulated turn: no words
    _session(sqlite_store, "e2", "How do I export?", "")
    sqlite_store.record_feedback("e1-t0", "user-e1", 1)
    sqlite_store.record_feedback("e2-t0", "user-e2", 0)
    result = export_dataset(sqlite_store, cfg, "dpo", tmp_path, now=NOW)
    assert result.manifest["rows"] == 0 and result.manifest["counts"]["thumbs_up"] == 0


def test_the_optimizer_job_follows_jobs_and_retrains_on_schedule(
    sqlite_store: Store, server: Recorder, tmp_path: Path
) -> None:
    store = sqlite_store
    cfg = _config(server.base, retrain_after_sessions=2, retrain_interval_days=30)
    _seed(store, cfg)
    provider = LiteLLMFineTuneProvider("openai", api_base=server.base)
    hooks = FineTuneHooks(provider, tmp_path)

    def optimize(at: datetime) -> dict[str, Any]:
        run = run_optimizer(store, cfg, now=at, random_state=0, fewshot=False, finetune=hooks)
        assert run is not None
        return run.finetune

    # nothing to follow, nothing due: the first job is an operator's call
    assert optimize(NOW) == {"polled": {}, "due": None, "started": None}
    assert server.requests == []
    first = start_job(store, cfg, provider, tmp_path, now=NOW)
    assert optimize(NOW)["polled"] == {first.id: "running"}
    assert optimize(NOW + timedelta(hours=1))["polled"] == {first.id: "succeeded"}
    first_arm = jobs(store, "exp")[0].arm_id
    assert first_arm == first.id and store.arm_statuses("exp")[first_arm] == "active"
    assert optimize(NOW + timedelta(hours=2)) == {"polled": {}, "due": None, "started": None}

    # two new qualifying sessions (+ s6, whose window closed): the loop starts the next job
    for i in range(2):
        _session(store, f"n{i}", "q", "a", at=NOW + timedelta(days=1, hours=i), converted=True)
    step = optimize(NOW + timedelta(days=9))
    assert "3 new qualifying sessions" in step["due"] and step["started"] is not None
    second = step["started"]
    creations = [r for r in server.requests if r["path"] == "/v1/fine_tuning/jobs"]
    assert len(creations) == 2
    new_rows = server.files[jobs(store, "exp")[0].provider_file_id or ""].decode()
    assert "walrus" not in new_rows and len(new_rows.splitlines()) == 5  # s1, s2, s6, n0, n1
    # another process (a replica, `flywheel finetune tick`) following the jobs: hands off
    asked = len(server.requests)
    with job_lock(store, "finetune:exp"):
        skipped = optimize(NOW + timedelta(days=9, minutes=30))
    assert "another process" in skipped["skipped"] and skipped["polled"] == {}
    assert len(server.requests) == asked
    # at most one job at a time: while it runs the loop follows it and starts nothing
    step = optimize(NOW + timedelta(days=9, hours=1))
    assert step == {"polled": {second: "running"}, "due": None, "started": None}
    assert len([r for r in server.requests if r["path"] == "/v1/fine_tuning/jobs"]) == 2
    assert optimize(NOW + timedelta(days=9, hours=2))["polled"] == {second: "succeeded"}

    # the previous fine-tune keeps serving beside the new one until the KPI decides
    run = run_optimizer(store, cfg, now=NOW + timedelta(days=9, hours=3), random_state=0)
    assert run is not None
    allocation = run.allocation["segments"]["*"]
    assert allocation[first_arm] > 0 and allocation[second] > 0
    assert store.arm_statuses("exp")[first_arm] == "active"

    # a provider outage never costs the optimizer its snapshot
    for i in range(2, 4):
        _session(store, f"n{i}", "q", "a", at=NOW + timedelta(days=10, hours=i), converted=True)
    server.fail_create = True
    before = run.snapshot_version
    failed = run_optimizer(
        store, cfg, now=NOW + timedelta(days=18), random_state=0, fewshot=False, finetune=hooks
    )
    assert failed is not None and failed.snapshot_version == before + 1
    assert "failed to start" in failed.finetune["error"]
    assert jobs(store, "exp")[0].status == "failed"


def test_the_spending_cap_counts_what_the_provider_billed(
    sqlite_store: Store, server: Recorder, tmp_path: Path
) -> None:
    store = sqlite_store
    cfg = _config(server.base, usd_per_mtok_trained=1000.0)
    _seed(store, cfg)
    provider = LiteLLMFineTuneProvider("openai", api_base=server.base)
    server.trained_tokens = 50_000  # the bill: $50 at $1000/M, far above the estimate
    first = start_job(store, cfg, provider, tmp_path, now=NOW)
    estimate = first.estimated_cost_usd
    assert first.trained_tokens is None and first.actual_cost_usd is None
    assert spent(store, cfg, now=NOW) == pytest.approx(estimate)  # running: the estimate
    poll_job(store, cfg, provider, first.id, now=NOW)
    done = poll_job(store, cfg, provider, first.id, now=NOW)
    assert done.trained_tokens == 50_000
    assert done.actual_cost_usd == pytest.approx(50.0)
    assert spent(store, cfg, now=NOW) == pytest.approx(50.0)
    # the next job: $50 billed + its own estimate must fit the cap
    tight = _config(server.base, usd_per_mtok_trained=1000.0, spend_cap_usd=50.0 + estimate / 2)
    with pytest.raises(FineTuneError, match=r"\(50\.00 spent"):
        start_job(store, tight, provider, tmp_path, now=NOW)
    roomy = _config(server.base, usd_per_mtok_trained=1000.0, spend_cap_usd=50.0 + estimate * 1.5)
    assert start_job(store, roomy, provider, tmp_path, now=NOW).status == "running"
    # a bill below the estimate frees room the estimate would have held
    server.trained_tokens = 1
    cheap = start_job(store, roomy, provider, tmp_path, now=NOW + timedelta(days=31))
    for _ in range(2):
        poll_job(store, roomy, provider, cheap.id, now=NOW + timedelta(days=31))
    assert jobs(store, "exp")[0].actual_cost_usd == pytest.approx(0.001)
    assert spent(store, roomy, now=NOW + timedelta(days=31)) == pytest.approx(0.001)


async def test_the_servers_optimizer_loop_follows_the_job_to_its_arm(
    sqlite_store: Store, server: Recorder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from chatbot.runtime import Runtime
    from chatbot.web.server import run_optimizer_periodically

    monkeypatch.chdir(tmp_path)  # finetune.out_dir is relative to the working directory
    cfg = _config(server.base)
    runtime = Runtime.build(cfg, store=sqlite_store)
    assert runtime.finetune_hooks is not None
    _seed(sqlite_store, cfg)
    job = start_job(sqlite_store, cfg, runtime.finetune_hooks.provider, tmp_path, now=NOW)
    task = asyncio.create_task(run_optimizer_periodically(runtime, 0.05))
    try:
        for _ in range(600):
            if jobs(sqlite_store, "exp")[0].status == "succeeded":
                break
            await asyncio.sleep(0.1)
    finally:
        task.cancel()
    done = jobs(sqlite_store, "exp")[0]
    assert done.id == job.id and done.status == "succeeded"
    assert sqlite_store.arm_statuses("exp")[job.id] == "active"
    runtime.close()


class _CrashingProvider:
    """A process that dies mid-upload (the provider never answers)."""

    name = "openai"
    formats = frozenset({"openai-sft"})

    def upload(self, path: Path) -> str:
        raise KeyboardInterrupt

    def create_job(self, **kwargs: Any) -> str:
        raise AssertionError("never reached")

    def retrieve(self, job_id: str) -> JobState:
        raise AssertionError("never reached")


def test_a_start_interrupted_by_a_crash_does_not_block_retraining_for_ever(
    sqlite_store: Store, server: Recorder, tmp_path: Path
) -> None:
    store = sqlite_store
    cfg = _config(server.base, retrain_interval_days=1)
    _seed(store, cfg)
    with pytest.raises(KeyboardInterrupt):
        start_job(store, cfg, _CrashingProvider(), tmp_path, now=NOW)
    stuck = jobs(store, "exp")[0]
    assert stuck.status == "created"
    hooks = FineTuneHooks(LiteLLMFineTuneProvider("openai", api_base=server.base), tmp_path)
    later = NOW + timedelta(days=2)  # retraining would be due, but a job "runs"
    assert retrain_due(store, cfg, now=later) is None
    assert "interrupted" not in finetune_step(store, cfg, hooks, now=NOW + timedelta(minutes=30))
    step = finetune_step(store, cfg, hooks, now=later)
    assert step["interrupted"] == [stuck.id] and step["started"] is not None
    failed = {j.id: j for j in jobs(store, "exp")}[stuck.id]
    assert failed.status == "failed" and "interrupted" in (failed.error or "")
