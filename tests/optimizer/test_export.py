"""Exports: scrubbed SFT and DPO JSONL that validate, flat tables that open in pandas, manifests."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from optimizer.export import FORMATS, export_dataset
from optimizer.privacy import SCRUBBER_VERSION
from optimizer.store import Store
from tests.support.fewshot_scenario import LATER, START, add_session, library, make_config

PII = ("Maria Lopez", "maria.lopez@example.com", "+44 7911 123456", "4111 1111 1111 1111")


def _scenario(store: Store) -> None:
    add_session(
        store,
        "s1",
        [
            (
                "Hi, I'm Maria Lopez. How do I export all my projects?",
                "Go to Settings > Data > Export and pick CSV or JSON, Maria.",
            )
        ],
        votes={0: 1},
        outcomes={"conversion": 1.0},
    )
    add_session(
        store,
        "s2",
        [("How do I export all of my projects?", "Exports are not supported, sorry.")],
        votes={0: 0},
        at=START + timedelta(hours=1),
    )
    add_session(
        store,
        "s3",
        [
            (
                "Call me on +44 7911 123456 about my refund, card 4111 1111 1111 1111.",
                "Refunds are possible within 30 days: email support@lumen.example "
                "with the invoice.",
            )
        ],
        votes={0: 1},
        at=START + timedelta(hours=2),
    )
    add_session(
        store,
        "s4",
        [
            ("Is there an audit log on Business?", "Yes, Business includes the audit log."),
            ("My email is maria.lopez@example.com", "Thanks, noted."),
        ],
        at=START + timedelta(hours=3),
    )


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _no_pii(text: str) -> None:
    for secret in PII:
        assert secret not in text


def test_sft_export_is_valid_chat_jsonl(store: Store, tmp_path: Path) -> None:
    _scenario(store)
    result = export_dataset(
        store, make_config(), "openai-sft", tmp_path, now=LATER, library=library()
    )
    rows = _jsonl(result.path)
    assert len(rows) == 2  # s1 (thumbs-up, converted) and s3 (thumbs-up); not the thumbed-down s2
    for row in rows:
        assert list(row) == ["messages"]
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
        assert all(isinstance(m["content"], str) and m["content"] for m in row["messages"])
        assert row["messages"][0]["content"].startswith(
            "You are the support assistant of Lumen Tasks"
        )
    text = result.path.read_text(encoding="utf-8")
    _no_pii(text)
    assert "<NAME>" in text and "<PHONE>" in text and "<CARD>" in text
    assert "support@lumen.example" in text  # a public fact, kept
    m = json.loads(result.manifest_path.read_text())
    assert (
        m["format"] == "openai-sft" and m["rows"] == 2 and m["scrubber_version"] == SCRUBBER_VERSION
    )
    assert m["counts"]["turns_considered"] == 5
    assert m["time_range"]["first"].startswith("2026-01-05T09:01") and m["time_range"][
        "last"
    ].startswith("2026-01-05T11:01")
    # --min-reward: only sessions whose complete reward reaches it (s1: 1.2; s3: 0.2).
    strict = export_dataset(
        store,
        make_config(),
        "openai-sft",
        tmp_path / "strict",
        min_reward=1.0,
        now=LATER,
        library=library(),
    )
    assert strict.manifest["rows"] == 1 and strict.manifest["filters"]["min_reward"] == 1.0


def test_dpo_export_pairs_similar_prompts(store: Store, tmp_path: Path) -> None:
    _scenario(store)
    result = export_dataset(store, make_config(), "dpo", tmp_path, now=LATER, library=library())
    (pair,) = _jsonl(result.path)
    assert sorted(pair) == ["chosen", "prompt", "rejected"]
    assert all(isinstance(v, str) and v for v in pair.values())
    assert pair["prompt"] == "How do I export all of my projects?"
    assert pair["rejected"] == "Exports are not supported, sorry."
    assert pair["chosen"] == "Go to Settings > Data > Export and pick CSV or JSON, <NAME>."
    assert (
        result.manifest["counts"]["thumbs_up"] == 2
        and result.manifest["counts"]["thumbs_down"] == 1
    )
    # With a threshold no two prompts reach, there are no pairs.
    none = export_dataset(
        store,
        make_config(pair_similarity=0.99),
        "dpo",
        tmp_path / "none",
        now=LATER,
        library=library(),
    )
    assert none.path.read_text() == "" and none.manifest["counts"]["unpaired_thumbs_down"] == 1


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_flat_tables_open_in_pandas(store: Store, tmp_path: Path, fmt: str) -> None:
    _scenario(store)
    result = export_dataset(store, make_config(), fmt, tmp_path, now=LATER, library=library())
    table = pd.read_csv(result.path) if fmt == "csv" else pd.read_parquet(result.path)
    assert len(table) == 5 == result.manifest["rows"]
    assert {
        "turn_id",
        "session_id",
        "user_hash",
        "arm_id",
        "thumbs",
        "session_reward",
        "qualifies",
    } <= set(table.columns)
    assert "user_id" not in table.columns and not table["user_hash"].str.startswith("user-").any()
    by_turn = table.set_index("turn_id")
    assert by_turn.loc["s1-t0", "session_reward"] == pytest.approx(1.2)
    assert by_turn.loc["s2-t0", "thumbs"] == 0 and pd.isna(by_turn.loc["s4-t0", "thumbs"])
    assert bool(by_turn.loc["s1-t0", "qualifies"]) and not bool(by_turn.loc["s2-t0", "qualifies"])
    _no_pii(table.to_csv())
    filtered = export_dataset(
        store, make_config(), fmt, tmp_path / "f", min_reward=1.0, now=LATER, library=library()
    )
    assert filtered.manifest["rows"] == 1


def test_empty_store_and_bad_format(sqlite_store: Store, tmp_path: Path) -> None:
    for fmt in FORMATS:
        result = export_dataset(
            sqlite_store, make_config(), fmt, tmp_path / fmt, now=LATER, library=library()
        )
        assert result.manifest["rows"] == 0 and result.manifest["time_range"] == {
            "first": None,
            "last": None,
        }
    assert pd.read_parquet(tmp_path / "parquet" / "turns.parquet").empty
    with pytest.raises(ValueError, match="fmt must be one of"):
        export_dataset(sqlite_store, make_config(), "xml", tmp_path)
    with pytest.raises(ValueError, match="min_reward must be a finite number"):
        export_dataset(sqlite_store, make_config(), "csv", tmp_path, min_reward=float("nan"))


def test_cli_export_and_fewshot_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from chatbot.cli import app

    db = f"sqlite:///{tmp_path / 'cli.db'}"
    config_file = tmp_path / "flywheel.toml"
    config_file.write_text(
        f'prompts_dir = "{Path(__file__).resolve().parents[2] / "prompts"}"\n'
        '[experiment]\nid = "exp"\nsalt = "exp"\nchampion = "concise"\n'
        '[[experiment.arms]]\nid = "concise"\nprompt = "concise"\n'
        "[fewshot]\npropose_after = 1\n",
        encoding="utf-8",
    )
    monkeypatch.delenv("FLYWHEEL_DATABASE_URL", raising=False)
    runner = CliRunner()
    common = ["--config", str(config_file), "--database-url", db]
    assert runner.invoke(app, ["db", "upgrade", *common]).exit_code == 0
    store = Store(db)
    now_ish = START.replace(year=2020)  # long closed windows for the real clock
    add_session(
        store,
        "s1",
        [
            (
                "Hi, I'm Maria Lopez. How do I export all my projects?",
                "Go to Settings > Data > Export and pick CSV or JSON.",
            )
        ],
        votes={0: 1},
        outcomes={"conversion": 1.0},
        at=now_ish,
    )
    store.dispose()

    out = runner.invoke(
        app, ["export", "--format", "openai-sft", "--out", str(tmp_path / "x"), "--json", *common]
    )
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["manifest"]["rows"] == 1
    bad = runner.invoke(app, ["export", "--format", "xml", *common])
    assert bad.exit_code == 2 and "--format must be one of" in bad.output

    mined = runner.invoke(app, ["fewshot", "mine", "--json", *common])
    assert mined.exit_code == 0, mined.output
    (example_id,) = json.loads(mined.output)["added"]
    listed = json.loads(
        runner.invoke(app, ["fewshot", "list", "--status", "candidate", "--json", *common]).output
    )
    assert [e["id"] for e in listed] == [example_id] and "Maria" not in listed[0]["user"]
    assert runner.invoke(app, ["fewshot", "approve", example_id, *common]).exit_code == 0
    proposal = json.loads(runner.invoke(app, ["fewshot", "propose", "--json", *common]).output)
    assert (
        proposal["arm"]["examples"][0] == example_id and "[[experiment.arms]]" in proposal["toml"]
    )
    assert runner.invoke(app, ["fewshot", "pin", example_id, *common]).exit_code == 0
    assert (
        runner.invoke(app, ["fewshot", "reject", example_id, "--reason", "tone", *common]).exit_code
        == 0
    )
    assert runner.invoke(app, ["fewshot", "reject", "nope", *common]).exit_code == 1
    assert runner.invoke(app, ["fewshot", "list", "--status", "great", *common]).exit_code == 2
