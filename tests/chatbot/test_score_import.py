"""`flywheel outcomes import`: scores made in Langfuse, and CSV/JSONL files, into the store."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import typer
from langfuse.api import LangfuseAPI
from typer.testing import CliRunner

from chatbot.cli.langfuse import parse_since, register
from chatbot.langfuse.credentials import LangfuseCredentials, rest_client
from chatbot.langfuse.ids import outcome_score_id, trace_id_for_turn
from chatbot.langfuse.score_import import import_langfuse_scores, import_outcome_file
from chatbot.langfuse.tracer import LangfuseTracer
from optimizer.config import LangfuseConfig
from optimizer.store import AssignmentRecord, Store, TurnRecord
from tests.support.langfuse_recorder import LangfuseRecorder

NOW = datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
def recorder() -> Iterator[LangfuseRecorder]:
    with LangfuseRecorder(public_key=f"pk-lf-{uuid.uuid4().hex[:12]}") as rec:
        yield rec


@pytest.fixture
def api(recorder: LangfuseRecorder) -> Iterator[LangfuseAPI]:
    creds = LangfuseCredentials(recorder.public_key, recorder.secret_key, recorder.base_url)
    with rest_client(creds) as client:
        yield client


def iso(when: datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


def remote_score(
    score_id: str,
    name: str,
    value: Any,
    data_type: str,
    source: str,
    subject: dict[str, Any],
    *,
    at: datetime = NOW,
    **extra: Any,
) -> dict[str, Any]:
    """A score as GET /api/public/v3/scores returns it (fields: details, subject, annotation)."""
    return {
        "id": score_id,
        "projectId": "project-1",
        "name": name,
        "value": value,
        "dataType": data_type,
        "source": source,
        "timestamp": iso(at),
        "environment": "default",
        "createdAt": iso(at),
        "updatedAt": iso(at),
        "subject": subject,
        **extra,
    }


def stored_turn(store: Store, turn_id: str, session_id: str, user_id: str) -> str:
    store.record_assignment(
        AssignmentRecord(session_id, user_id, "support-v1", "concise", 0.5, None, "*", {}, NOW)
    )
    store.record_turn(
        TurnRecord(
            turn_id,
            session_id,
            user_id,
            "support-v1",
            "concise",
            "concise",
            "h",
            "fake/echo",
            "hi",
            "hello",
        )
    )
    trace_id = trace_id_for_turn(turn_id)
    store.set_turn_trace_id(turn_id, trace_id)
    return trace_id


@pytest.fixture
def langfuse_scores(store: Store, recorder: LangfuseRecorder) -> dict[str, str]:
    """Scores people and evaluators made in Langfuse, on traces we know in different ways."""
    known_trace = stored_turn(store, "run-1", "thread-1", "ana")
    # A trace Langfuse has (we sent it) but whose id this store never kept.
    tracer = LangfuseTracer(
        LangfuseCredentials(recorder.public_key, recorder.secret_key, recorder.base_url),
        LangfuseConfig(),
        prompt_versions=lambda p, h: None,
    )
    elsewhere = tracer.trace_turn(
        TurnRecord(
            "run-3", "thread-3", "carl", "support-v1", "concise", "concise", "h", "m", "q", "a"
        ),
        AssignmentRecord("thread-3", "carl", "support-v1", "concise", 0.5, None, "*", {}, NOW),
        [],
    )
    assert tracer.flush(10)
    tracer.shutdown()
    assert elsewhere is not None
    recorder.remote_scores += [
        remote_score(
            "ann-1",
            "helpfulness",
            0.8,
            "NUMERIC",
            "ANNOTATION",
            {"kind": "trace", "id": known_trace},
            comment="clear answer",
            authorUserId="reviewer-7",
            queueId="queue-1",
        ),
        remote_score(
            "eval-1",
            "resolved_by_judge",
            True,
            "BOOLEAN",
            "EVAL",
            {"kind": "session", "id": "thread-2"},
        ),
        remote_score(
            "eval-2",
            "faithfulness",
            0.4,
            "NUMERIC",
            "EVAL",
            {"kind": "observation", "id": "0123456789abcdef", "traceId": elsewhere},
        ),
        remote_score(
            "cat-1",
            "tone",
            "friendly",
            "CATEGORICAL",
            "ANNOTATION",
            {"kind": "trace", "id": known_trace},
        ),
        remote_score(
            "api-1", "latency_ok", 1.0, "NUMERIC", "API", {"kind": "trace", "id": known_trace}
        ),
        remote_score(
            "orphan-1",
            "helpfulness",
            0.1,
            "NUMERIC",
            "ANNOTATION",
            {"kind": "trace", "id": "f" * 32},
        ),
        remote_score(
            "old-1",
            "helpfulness",
            0.3,
            "NUMERIC",
            "ANNOTATION",
            {"kind": "session", "id": "thread-1"},
            at=NOW - timedelta(days=30),
        ),
    ]
    return {"known": known_trace, "elsewhere": elsewhere}


def outcomes(store: Store) -> dict[str, Any]:
    frame = store.frame("outcomes")
    return {row.idempotency_key: row for row in frame.itertuples()}


def test_import_maps_scores_to_sessions_and_is_idempotent(
    store: Store, api: LangfuseAPI, langfuse_scores: dict[str, str]
) -> None:
    report = import_langfuse_scores(store, api, page_size=2)
    assert report.as_dict() == {
        "read": 6,  # the API-source score is filtered by Langfuse (source=ANNOTATION,EVAL)
        "imported": 4,
        "duplicates": 0,
        "skipped": {"CATEGORICAL value": 1, "no session": 1},
        "errors": [],
    }
    rows = outcomes(store)
    assert set(rows) == {"langfuse:ann-1", "langfuse:eval-1", "langfuse:eval-2", "langfuse:old-1"}
    ann = rows["langfuse:ann-1"]
    assert (ann.session_id, ann.user_id, ann.name, ann.value, ann.source) == (
        "thread-1",
        "ana",
        "helpfulness",
        0.8,
        "langfuse",
    )
    assert ann.extra["comment"] == "clear answer" and ann.extra["author_user_id"] == "reviewer-7"
    assert ann.extra["trace_id"] == langfuse_scores["known"]
    assert (rows["langfuse:eval-1"].session_id, rows["langfuse:eval-1"].value) == ("thread-2", 1.0)
    assert (
        rows["langfuse:eval-2"].session_id == "thread-3"
    )  # via Langfuse's observations of the trace
    assert rows["langfuse:old-1"].occurred_at.to_pydatetime() == NOW - timedelta(days=30)

    again = import_langfuse_scores(store, api, page_size=2)
    assert (again.imported, again.duplicates) == (0, 4)
    assert len(store.frame("outcomes")) == 4


def test_import_since_and_sources(
    store: Store, api: LangfuseAPI, langfuse_scores: dict[str, str]
) -> None:
    recent = import_langfuse_scores(store, api, since=NOW - timedelta(days=7))
    assert recent.read == 5 and "langfuse:old-1" not in outcomes(store)
    api_only = import_langfuse_scores(store, api, sources=["API"])
    assert (api_only.read, api_only.imported) == (1, 1)
    assert outcomes(store)["langfuse:api-1"].session_id == "thread-1"


def test_flywheels_own_scores_are_never_imported_back(
    sqlite_store: Store, recorder: LangfuseRecorder, api: LangfuseAPI
) -> None:
    recorder.remote_scores.append(
        remote_score(
            outcome_score_id("k1"),
            "conversion",
            1.0,
            "NUMERIC",
            "API",
            {"kind": "session", "id": "s"},
        )
    )
    report = import_langfuse_scores(sqlite_store, api, sources=["API"])
    assert report.imported == 0 and report.skipped == {"flywheel's own score": 1}


def test_page_size_is_validated(sqlite_store: Store, api: LangfuseAPI) -> None:
    with pytest.raises(ValueError, match="page_size must be between 1 and 100, got 500"):
        import_langfuse_scores(sqlite_store, api, page_size=500)


# -- files --------------------------------------------------------------------
CSV = """idempotency_key,session_id,user_id,name,value,occurred_at,order_id
crm-1,thread-1,,conversion,1,2025-03-01T10:00:00Z,A-17
,thread-2,bob,revenue,49.5,2025-03-02T09:00:00,
,thread-2,bob,revenue,49.5,2025-03-02T09:00:00,
crm-4,thread-3,,conversion,,2025-03-01T10:00:00Z,
crm-5,thread-3,,conversion,1,yesterday,
crm-6,,,conversion,1,,
"""


def test_csv_import(store: Store, tmp_path: Path) -> None:
    path = tmp_path / "outcomes.csv"
    path.write_text(CSV)
    report = import_outcome_file(store, path)
    assert (report.read, report.imported, report.duplicates) == (6, 2, 1)
    assert report.skipped == {"invalid row": 3}
    assert report.errors == [
        "outcomes.csv:5: value must be a number, got None",
        "outcomes.csv:6: occurred_at must be ISO 8601, got 'yesterday'",
        "outcomes.csv:7: needs a session_id or a user_id, got neither",
    ]
    rows = outcomes(store)
    crm = rows["crm-1"]
    assert (crm.session_id, crm.name, crm.value, crm.source) == (
        "thread-1",
        "conversion",
        1.0,
        "import",
    )
    assert crm.extra == {"order_id": "A-17"}
    assert crm.occurred_at.to_pydatetime() == datetime(2025, 3, 1, 10, tzinfo=UTC)
    [derived] = [k for k in rows if k.startswith("import:")]
    assert rows[derived].occurred_at.to_pydatetime() == datetime(
        2025, 3, 2, 9, tzinfo=UTC
    )  # naive = UTC

    again = import_outcome_file(store, path)
    assert (again.imported, again.duplicates) == (0, 3)


def test_jsonl_import_mirrors_to_langfuse(
    sqlite_store: Store, recorder: LangfuseRecorder, tmp_path: Path
) -> None:
    path = tmp_path / "outcomes.jsonl"
    lines = [
        {
            "idempotency_key": "t-1",
            "session_id": "thread-1",
            "name": "support_minutes",
            "value": 12.5,
        },
        {
            "idempotency_key": "t-2",
            "user_id": "ana",
            "name": "conversion",
            "value": 1,
            "source": "crm",
        },
        "not an object",
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n{broken\n\n")
    tracer = LangfuseTracer(
        LangfuseCredentials(recorder.public_key, recorder.secret_key, recorder.base_url),
        LangfuseConfig(),
        prompt_versions=lambda p, h: None,
    )
    report = import_outcome_file(sqlite_store, path, tracer=tracer)
    assert tracer.flush(10)
    tracer.shutdown()
    assert (report.read, report.imported, len(report.errors)) == (4, 2, 2)
    assert report.errors[0] == "outcomes.jsonl:3: each line must be a JSON object"
    assert report.errors[1].startswith("outcomes.jsonl:4: not valid JSON")
    assert outcomes(sqlite_store)["t-2"].source == "crm"
    # Only the session outcome can be a session score in Langfuse.
    assert [s["id"] for s in recorder.iter_score_bodies()] == [outcome_score_id("t-1")]


def test_unknown_file_type(sqlite_store: Store, tmp_path: Path) -> None:
    path = tmp_path / "outcomes.xlsx"
    path.write_text("x")
    with pytest.raises(ValueError, match=r"must end in \.csv, \.jsonl or \.ndjson"):
        import_outcome_file(sqlite_store, path)


# -- the command --------------------------------------------------------------
def cli() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, recorder: LangfuseRecorder) -> str:
    url = f"sqlite:///{tmp_path / 'fw.db'}"
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FLYWHEEL_DATABASE_URL", url)
    monkeypatch.setenv("FLYWHEEL_CONFIG", str(tmp_path / "none.toml"))
    monkeypatch.setenv("LANGFUSE_PUBLIC_KEY", recorder.public_key)
    monkeypatch.setenv("LANGFUSE_SECRET_KEY", recorder.secret_key)
    monkeypatch.setenv("LANGFUSE_BASE_URL", recorder.base_url)
    return url


def test_import_command_from_langfuse(cli_env: str, recorder: LangfuseRecorder) -> None:
    recorder.remote_scores += [
        remote_score(
            "a-1", "helpfulness", 0.9, "NUMERIC", "ANNOTATION", {"kind": "session", "id": "s-1"}
        ),
        remote_score(
            "a-0",
            "helpfulness",
            0.2,
            "NUMERIC",
            "ANNOTATION",
            {"kind": "session", "id": "s-0"},
            at=NOW - timedelta(days=10),
        ),
    ]
    runner = CliRunner()
    result = runner.invoke(
        cli(), ["outcomes", "import", "--from-langfuse", "--since", "7d", "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["imported"] == 1
    again = runner.invoke(cli(), ["outcomes", "import", "--from-langfuse"])
    assert again.exit_code == 0 and "imported 1" in again.stdout and "duplicates 1" in again.stdout
    assert sorted(Store(cli_env).frame("outcomes")["idempotency_key"]) == [
        "langfuse:a-0",
        "langfuse:a-1",
    ]


def test_import_command_from_a_file(cli_env: str, tmp_path: Path) -> None:
    path = tmp_path / "o.csv"
    path.write_text(CSV)
    result = CliRunner().invoke(cli(), ["outcomes", "import", str(path)])
    assert result.exit_code == 0, result.output
    assert "imported 2" in result.stdout and "outcomes.csv" not in result.stdout
    assert "o.csv:5: value must be a number" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["outcomes", "import"], "either a FILE or --from-langfuse"),
        (["outcomes", "import", "x.csv", "--from-langfuse"], "either a FILE or --from-langfuse"),
        (
            ["outcomes", "import", "x.csv", "--since", "7d"],
            "--since applies to --from-langfuse only",
        ),
        (
            ["outcomes", "import", "--from-langfuse", "--since", "last week"],
            "--since must be an ISO",
        ),
        (["outcomes", "import", "missing.csv"], "no such file"),
    ],
)
def test_import_command_rejects_bad_arguments(cli_env: str, args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli(), args)
    assert result.exit_code == 2
    assert message in result.output


def test_parse_since() -> None:
    now = datetime(2025, 3, 10, tzinfo=UTC)
    assert parse_since("12h", now=now) == datetime(2025, 3, 9, 12, tzinfo=UTC)
    assert parse_since("2025-03-01T08:00:00+02:00") == datetime(2025, 3, 1, 6, tzinfo=UTC)
    with pytest.raises(ValueError, match="got 'soon'"):
        parse_since("soon")
