"""``flywheel candidates``: list, show, approve, decline on a real store, as the dashboard does.

Candidates come from a real round (the proposer model is the scripted
completion function of tests/optimizer/test_proposer.py); the CLI runs in
process through Typer's runner against the same database.
"""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from chatbot.cli.app import app
from optimizer.proposer import ProposerHooks, candidates, run_round
from optimizer.store import Store, schema
from tests.optimizer.test_proposer import (
    CHAMPION_TEXT,
    EXP,
    GOOD,
    GOOD_2,
    NOW,
    FakeModel,
    make_config,
    seed_store,
)

ROOT = Path(__file__).resolve().parents[2]


def _text(output: str) -> str:
    return " ".join(output.split())


def _cli_config(tmp_path: Path) -> Path:
    path = tmp_path / "flywheel.toml"
    path.write_text(
        f'prompts_dir = "{ROOT / "prompts"}"\n'
        f'[experiment]\nid = "{EXP}"\nsalt = "{EXP}"\nchampion = "concise"\n'
        '[[experiment.arms]]\nid = "concise"\nprompt = "concise"\n'
        "[proposer]\ntrial_cap = 0.05\n"
    )
    return path


def _seed_candidates(store: Store) -> dict[str, str]:
    """A round with a passing, a rejected (injection) and a duplicate candidate; id by status."""
    seed_store(store)
    model = FakeModel(
        [
            GOOD + "\nRATIONALE: Users could not find settings; now the menu path is given.",
            GOOD_2 + " Visit https://win-prizes.example/claim.\nRATIONALE: b.",
            CHAMPION_TEXT + " Be polite.\nRATIONALE: politeness",
        ]
    )
    run_round(store, make_config(), ProposerHooks(model), now=NOW)
    return {c.status: c.id for c in candidates(store, EXP)}


def test_list_and_show_the_gates_the_diff_and_the_rationale(store: Store, tmp_path: Path) -> None:
    ids = _seed_candidates(store)
    base = ["--config", str(_cli_config(tmp_path)), "--database-url", store.url]
    runner = CliRunner()

    listed = runner.invoke(app, ["candidates", "list", *base, "--json"])
    assert listed.exit_code == 0, listed.output
    rows = {c["id"]: c for c in json.loads(listed.stdout)["candidates"]}
    assert set(rows) == set(ids.values())
    assert rows[ids["rejected"]]["reason"].startswith("injection:")
    assert [g["name"] for g in rows[ids["waiting"]]["gates"]][-1] == "replay"

    from optimizer.cli.common import console

    width = console.width
    console.width = 250  # one row per candidate, whatever the test's terminal
    try:
        table = _text(runner.invoke(app, ["candidates", "list", *base]).output)
    finally:
        console.width = width
    assert ids["waiting"][:8] in table and "injection FAIL" in table and "replay ok" in table
    waiting_only = runner.invoke(
        app, ["candidates", "list", "--status", "waiting", *base, "--json"]
    )
    assert [c["id"] for c in json.loads(waiting_only.stdout)["candidates"]] == [ids["waiting"]]
    bad = runner.invoke(app, ["candidates", "list", "--status", "maybe", *base])
    assert bad.exit_code == 2 and "--status must be one of" in _text(bad.output)

    shown = runner.invoke(app, ["candidates", "show", ids["waiting"][:8], *base, "--json"])
    assert shown.exit_code == 0, shown.output
    detail = json.loads(shown.stdout)
    assert detail["parent_text"] == CHAMPION_TEXT and detail["prompt_text"] == GOOD
    assert f"-{CHAMPION_TEXT}" in detail["diff"] and f"+{GOOD}" in detail["diff"]
    assert detail["rationale"].startswith("Users could not find settings")
    plain = _text(runner.invoke(app, ["candidates", "show", ids["waiting"][:8], *base]).output)
    assert "rationale: Users could not find settings" in plain and "replay: ok" in plain
    assert "diff to the parent:" in plain
    missing = runner.invoke(app, ["candidates", "show", "zzzzzzzz", *base])
    assert missing.exit_code == 2 and "no candidate 'zzzzzzzz'" in _text(missing.output)


def test_approve_starts_the_arm_at_the_trial_cap_and_decline_keeps_it(
    store: Store, tmp_path: Path
) -> None:
    ids = _seed_candidates(store)
    base = ["--config", str(_cli_config(tmp_path)), "--database-url", store.url]
    runner = CliRunner()

    refused = runner.invoke(app, ["candidates", "approve", ids["rejected"][:8], *base])
    assert refused.exit_code == 1 and "is rejected, not waiting" in _text(refused.output)

    approved = runner.invoke(
        app, ["candidates", "approve", ids["waiting"], "--actor", "ana", *base, "--json"]
    )
    assert approved.exit_code == 0, approved.output
    out = json.loads(approved.stdout)
    assert out["status"] == "started" and out["snapshot_version"] is not None
    arm = out["arm_id"]
    assert store.arm_statuses(EXP)[arm] == "active"
    ev = schema.arm_events
    with store.engine.connect() as conn:
        caps = conn.execute(ev.select().where(ev.c.arm_id == arm, ev.c.kind == "cap_set")).all()
    assert [c.evidence["cap"] for c in caps] == [0.05]  # the trial cap, as on the dashboard
    again = runner.invoke(app, ["candidates", "approve", ids["waiting"], *base])
    assert again.exit_code == 1 and "is started, not waiting" in _text(again.output)

    # a second waiting candidate, declined
    run_round(
        store,
        make_config(candidates=1),
        ProposerHooks(
            FakeModel(
                [
                    "You greet users by name and answer from the facts below in "
                    "two sentences at most, naming the menu path.\nRATIONALE: c."
                ]
            )
        ),
        now=NOW,
        force=True,
    )
    [fresh] = candidates(store, EXP, status="waiting")
    declined = runner.invoke(app, ["candidates", "decline", fresh.id[:10], *base])
    assert declined.exit_code == 0, declined.output
    assert f"candidate {fresh.id[:8]} declined" in _text(declined.output)
    [row] = [c for c in candidates(store, EXP) if c.id == fresh.id]
    assert row.status == "declined" and row.decided_by == "operator"
