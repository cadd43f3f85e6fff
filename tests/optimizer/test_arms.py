"""Arms as data: prompt edits make versions, run-time arms are served without restart."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

from chatbot.cli import app
from chatbot.runtime import Runtime
from optimizer.store import Store
from tests.support.chat_helpers import ROOT, RecordingTracer, chat_config


def _runtime(store: Store, prompts: Path) -> Runtime:
    config = chat_config(store.url).model_copy(update={"prompts_dir": str(prompts)})
    return Runtime.build(config, store=store, tracer=RecordingTracer(), migrate=False)


def test_a_prompt_edit_is_a_new_version_and_a_rolling_deploy_does_not_flip_flop(
    store: Store, tmp_path: Path
) -> None:
    old, new = tmp_path / "old", tmp_path / "new"
    shutil.copytree(ROOT / "prompts", old)
    shutil.copytree(ROOT / "prompts", new)
    edited = new / "variants" / "concise.md"
    edited.write_text(edited.read_text() + "\nAlways end with a question.\n")

    replica_a = _runtime(store, old)  # running with the old files
    assert [r.id for r in store.arms("exp")] == ["concise"]
    replica_b = _runtime(store, new)  # deployed with the edit
    assert [r.id for r in store.arms("exp")] == ["concise", "concise@v2"]
    assert store.arm_statuses("exp") == {"concise": "retired", "concise@v2": "champion"}

    # Replica A, not restarted, serves the new version to sessions of the old one.
    arm, variant = replica_a.serve("concise")
    assert variant.template.endswith("Always end with a question.")
    assert variant.hash == replica_b.prompts.variant("concise").hash
    assert arm.prompt == "concise"
    # A restarts with the old files (rolling deploy): nothing changes in the store.
    _runtime(store, old)
    assert [r.id for r in store.arms("exp")] == ["concise", "concise@v2"]
    assert store.arm_statuses("exp")["concise@v2"] == "champion"


def _text(output: str) -> str:
    """CLI output without Rich's line wrapping."""
    return " ".join(output.split())


def _cli_config(tmp_path: Path) -> Path:
    path = tmp_path / "flywheel.toml"
    path.write_text(
        f'prompts_dir = "{ROOT / "prompts"}"\n'
        '[experiment]\nid = "exp"\nsalt = "salt"\nchampion = "concise"\n'
        '[[experiment.arms]]\nid = "concise"\nprompt = "concise"\n'
    )
    return path


def test_an_arm_added_from_the_cli_is_served_by_a_running_replica(
    store: Store, tmp_path: Path
) -> None:
    replica = _runtime(store, ROOT / "prompts")
    text = "You are Flywheel's support bot. Answer in one sentence."
    prompt = tmp_path / "fresh.txt"
    prompt.write_text(text + "\n")
    base = ["--config", str(_cli_config(tmp_path)), "--database-url", store.url]
    runner = CliRunner()

    added = runner.invoke(
        app, ["arms", "add", "fresh", "--prompt-file", str(prompt), *base, "--json"]
    )
    assert added.exit_code == 0, added.output
    out = json.loads(added.stdout)
    assert (out["arm_id"], out["result"], out["snapshot_version"]) == ("fresh", "created", 1)
    again = runner.invoke(
        app, ["arms", "add", "fresh", "--prompt-file", str(prompt), *base, "--json"]
    )
    assert json.loads(again.stdout)["result"] == "known"

    replica.assigner.invalidate()  # its snapshot cache would expire within seconds anyway
    allocation = replica.assigner.allocation().segments["*"]
    assert allocation["fresh"] > 0  # the newcomer gets traffic at once
    users = [f"user-{i}" for i in range(40)]
    arms = {u: replica.assigner.assign(f"s-{u}", u).arm_id for u in users}
    assert "fresh" in arms.values()
    _arm, variant = replica.serve("fresh")
    assert variant.template == text

    listed = runner.invoke(app, ["arms", "list", *base, "--json"])
    rows = {a["id"]: a for a in json.loads(listed.stdout)["arms"]}
    assert rows["fresh"]["origin"] == "operator" and rows["fresh"]["status"] == "active"
    champion = runner.invoke(app, ["arms", "retire", "concise", *base])
    assert champion.exit_code == 2 and "champion" in _text(champion.output)
    retired = runner.invoke(app, ["arms", "retire", "fresh", *base])
    assert retired.exit_code == 0, retired.output
    assert store.arm_statuses("exp")["fresh"] == "retired"
    missing = runner.invoke(app, ["arms", "retire", "nope", *base])
    assert missing.exit_code == 2 and "no arm 'nope'" in _text(missing.output)


def test_arms_add_refuses_bad_input_with_a_reason(store: Store, tmp_path: Path) -> None:
    _runtime(store, ROOT / "prompts")
    base = ["--config", str(_cli_config(tmp_path)), "--database-url", store.url]
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    runner = CliRunner()
    result = runner.invoke(app, ["arms", "add", "x", "--prompt-file", str(empty), *base])
    assert result.exit_code == 2 and "is empty" in _text(result.output)
    result = runner.invoke(
        app, ["arms", "add", "x", "--prompt-file", str(tmp_path / "nope.txt"), *base]
    )
    assert result.exit_code == 2 and "cannot read" in _text(result.output)
    prompt = tmp_path / "p.txt"
    prompt.write_text("Be nice.")
    result = runner.invoke(app, ["arms", "add", "bad@v2", "--prompt-file", str(prompt), *base])
    assert result.exit_code == 2 and "invalid arm" in _text(result.output)
