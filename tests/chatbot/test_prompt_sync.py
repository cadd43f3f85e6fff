"""`flywheel langfuse sync-prompts` against the recording server: versions only on change."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import typer
from langfuse.api import LangfuseAPI
from typer.testing import CliRunner

from chatbot.cli.langfuse import register
from chatbot.langfuse.credentials import LangfuseCredentials, rest_client
from chatbot.langfuse.prompt_sync import PromptVersionCache, sync_prompts
from chatbot.langfuse.tracer import LangfuseTracer
from optimizer.config import ArmConfig, LangfuseConfig
from optimizer.prompt_library import load_prompts
from optimizer.store import AssignmentRecord, TurnRecord
from tests.support.langfuse_recorder import LangfuseRecorder

ROOT = Path(__file__).resolve().parents[2]
ARMS = (
    ArmConfig(id="concise", prompt="concise"),
    ArmConfig(id="empathetic", prompt="empathetic"),
    ArmConfig(id="concise+fixed", prompt="concise", fewshot="fixed", examples=("trial",)),
)


@pytest.fixture
def recorder() -> Iterator[LangfuseRecorder]:
    with LangfuseRecorder(public_key=f"pk-lf-{uuid.uuid4().hex[:12]}") as rec:
        yield rec


@pytest.fixture
def prompts_dir(tmp_path: Path) -> Path:
    target = tmp_path / "prompts"
    shutil.copytree(ROOT / "prompts", target)
    return target


@pytest.fixture
def api(recorder: LangfuseRecorder) -> Iterator[LangfuseAPI]:
    creds = LangfuseCredentials(recorder.public_key, recorder.secret_key, recorder.base_url)
    with rest_client(creds) as client:
        yield client


def posts(rec: LangfuseRecorder) -> int:
    return sum(
        1 for method, path in rec.requests if method == "POST" and path == "/api/public/v2/prompts"
    )


def test_sync_creates_each_variant_once_then_only_on_change(
    api: LangfuseAPI, recorder: LangfuseRecorder, prompts_dir: Path, tmp_path: Path
) -> None:
    cache = PromptVersionCache(tmp_path / "versions.json")
    library = load_prompts(prompts_dir)
    first = sync_prompts(api, library, ARMS, champion_arm="concise+fixed", cache=cache)
    assert {r.prompt_id: (r.action, r.version) for r in first} == {
        "concise": ("created", 1),
        "empathetic": ("created", 1),
        "proactive-upsell": ("created", 1),
    }
    [concise] = recorder.prompt_versions("concise")
    assert concise["prompt"] == library.variant("concise").template
    assert concise["config"]["flywheel_hash"] == library.variant("concise").hash
    assert concise["labels"] == ["latest", "production"]  # the champion arm serves "concise"
    assert concise["tags"] == ["concise", "concise+fixed", "flywheel"]  # the arms serving it
    assert "production" not in recorder.prompt_versions("empathetic")[0]["labels"]
    assert recorder.prompt_versions("proactive-upsell")[0]["tags"] == ["flywheel"]  # no arm yet

    again = sync_prompts(
        api,
        load_prompts(prompts_dir),
        ARMS,
        champion_arm="concise+fixed",
        cache=cache,
    )
    assert {r.action for r in again} == {"unchanged"}
    assert posts(recorder) == 3, "an unchanged file must not create a version"

    path = prompts_dir / "variants" / "concise.md"
    path.write_text(path.read_text() + "\nNever promise refunds.\n")
    edited = load_prompts(prompts_dir)
    third = sync_prompts(api, edited, ARMS, champion_arm="concise+fixed", cache=cache)
    assert {r.prompt_id: r.action for r in third} == {
        "concise": "created",
        "empathetic": "unchanged",
        "proactive-upsell": "unchanged",
    }
    v1, v2 = recorder.prompt_versions("concise")
    assert v2["version"] == 2 and v2["prompt"].endswith("Never promise refunds.")
    assert v2["labels"] == ["latest", "production"] and v1["labels"] == []  # labels move
    assert posts(recorder) == 4
    # Both contents stay resolvable: old turns link to v1, new ones to v2.
    assert cache.lookup("concise", library.variant("concise").hash) == 1
    assert cache.lookup("concise", edited.variant("concise").hash) == 2


def test_new_champion_gets_production_without_a_new_version(
    api: LangfuseAPI, recorder: LangfuseRecorder, prompts_dir: Path, tmp_path: Path
) -> None:
    cache = PromptVersionCache(tmp_path / "versions.json")
    library = load_prompts(prompts_dir)
    sync_prompts(api, library, ARMS, champion_arm="concise", cache=cache)
    results = sync_prompts(api, library, ARMS, champion_arm="empathetic", cache=cache)
    assert {r.prompt_id: r.action for r in results}["empathetic"] == "labelled"
    [empathetic] = recorder.prompt_versions("empathetic")
    assert "production" in empathetic["labels"]
    assert posts(recorder) == 3
    patches = [p for m, p in recorder.requests if m == "PATCH"]
    assert patches == ["/api/public/v2/prompts/empathetic/versions/1"]


def test_generations_link_to_the_synced_version(
    api: LangfuseAPI, recorder: LangfuseRecorder, prompts_dir: Path, tmp_path: Path
) -> None:
    """The chat never fetches prompts: the tracer reads the versions the sync wrote."""
    cache_path = tmp_path / "versions.json"
    library = load_prompts(prompts_dir)
    sync_prompts(api, library, ARMS, cache=PromptVersionCache(cache_path))
    creds = LangfuseCredentials(recorder.public_key, recorder.secret_key, recorder.base_url)
    tracer = LangfuseTracer(
        creds, LangfuseConfig(), prompt_versions=PromptVersionCache(cache_path).lookup
    )
    variant = library.variant("empathetic")
    turn = TurnRecord(
        "run-9",
        "s-9",
        "ana",
        "support-v1",
        "empathetic",
        variant.id,
        variant.hash,
        "fake/echo",
        "hi",
        "hello",
    )
    from optimizer.clock import utcnow

    a = AssignmentRecord("s-9", "ana", "support-v1", "empathetic", 0.5, None, "*", {}, utcnow())
    trace_id = tracer.trace_turn(turn, a, [{"role": "user", "content": "hi"}])
    assert tracer.flush(10)
    tracer.shutdown()
    [gen] = [s for s in recorder.spans_of(trace_id or "") if s.name == "llm"]
    assert gen.attributes["langfuse.observation.prompt.name"] == "empathetic"
    assert gen.attributes["langfuse.observation.prompt.version"] == 1
    gets = [
        p for m, p in recorder.requests if m == "GET" and p.startswith("/api/public/v2/prompts")
    ]
    assert len(gets) == 3, "only the sync read prompts; tracing did not"


# -- the command --------------------------------------------------------------
@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, prompts_dir: Path) -> Path:
    config = tmp_path / "flywheel.toml"
    config.write_text(
        f'prompts_dir = "{prompts_dir}"\n'
        '[experiment]\nid = "exp"\nchampion = "concise"\n'
        '[[experiment.arms]]\nid = "concise"\nprompt = "concise"\n'
        '[[experiment.arms]]\nid = "empathetic"\nprompt = "empathetic"\n'
    )
    monkeypatch.setenv("FLYWHEEL_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FLYWHEEL_DATABASE_URL", f"sqlite:///{tmp_path / 'fw.db'}")
    monkeypatch.delenv("FLYWHEEL_PROMPTS_DIR", raising=False)
    return config


def cli() -> typer.Typer:
    app = typer.Typer()
    register(app)
    return app


def test_sync_prompts_command(
    recorder: LangfuseRecorder, cli_env: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LANGFUSE_PUBLIC_KEY", recorder.public_key)
    monkeypatch.setenv("LANGFUSE_SECRET_KEY", recorder.secret_key)
    monkeypatch.setenv("LANGFUSE_BASE_URL", recorder.base_url)
    runner = CliRunner()
    result = runner.invoke(cli(), ["langfuse", "sync-prompts", "--config", str(cli_env), "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert {p["prompt_id"]: p["action"] for p in out["prompts"]} == {
        "concise": "created",
        "empathetic": "created",
        "proactive-upsell": "created",
    }
    cache = json.loads((tmp_path / "home" / "langfuse-prompts.json").read_text())
    assert set(cache) == {"concise", "empathetic", "proactive-upsell"}
    assert "production" in recorder.prompt_versions("concise")[0]["labels"]
    again = runner.invoke(cli(), ["langfuse", "sync-prompts", "--config", str(cli_env)])
    assert again.exit_code == 0 and "unchanged" in again.output


def test_sync_prompts_command_reports_an_unreachable_langfuse(
    cli_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with LangfuseRecorder("refuse") as down:
        monkeypatch.setenv("LANGFUSE_PUBLIC_KEY", "pk")
        monkeypatch.setenv("LANGFUSE_SECRET_KEY", "sk")
        monkeypatch.setenv("LANGFUSE_BASE_URL", down.base_url)
        result = CliRunner().invoke(cli(), ["langfuse", "sync-prompts", "--config", str(cli_env)])
    assert result.exit_code == 1
    assert "refused the sync" in result.output


def test_sync_prompts_command_needs_keys(cli_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LANGFUSE_PUBLIC_KEY", raising=False)
    monkeypatch.delenv("LANGFUSE_SECRET_KEY", raising=False)
    result = CliRunner().invoke(cli(), ["langfuse", "sync-prompts", "--config", str(cli_env)])
    assert result.exit_code == 2 and "LANGFUSE_PUBLIC_KEY" in result.output
