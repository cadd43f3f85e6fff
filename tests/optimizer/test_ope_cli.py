"""``flywheel ope`` on external CSV logs and on the store."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from typer.testing import CliRunner

from chatbot.cli import app
from optimizer.ope import SyntheticEnvironment, make_logs
from optimizer.store import ArmSpec, AssignmentRecord, OutcomeRecord, Store

ROOT = Path(__file__).resolve().parents[2]
SCENARIO = SyntheticEnvironment.from_toml(ROOT / "bench" / "scenarios" / "ope_logged.toml")


@pytest.fixture
def csv_logs(tmp_path: Path) -> Path:
    path = tmp_path / "logged.csv"
    make_logs(SCENARIO, 6000, random_state=21).to_csv(path, index=False)
    return path


def ope(tmp_path: Path, *args: str) -> tuple[int, str, str]:
    """Run the command with the default configuration (no flywheel.toml)."""
    config = ["--config", str(tmp_path / "absent.toml")]
    result = CliRunner().invoke(app, ["ope", *config, *args])
    return result.exit_code, result.stdout, result.stderr


def test_json_on_a_csv_file(tmp_path: Path, csv_logs: Path) -> None:
    code, out, _ = ope(tmp_path, "--logged", str(csv_logs), "--target", "arm:empathetic", "--json")
    assert code == 0, out
    result = json.loads(out)
    truth = SCENARIO.true_value("arm:empathetic")
    assert result["n"] == 6000 and result["source"] == str(csv_logs)
    assert result["target"] == {"kind": "arm", "arm": "empathetic", "label": "arm:empathetic"}
    assert sorted(result["estimators"]) == ["dm", "dr", "ips", "snips"]
    for name, r in result["estimators"].items():
        lo, hi = r["ci"]
        assert lo <= r["estimate"] <= hi, name
        assert abs(r["estimate"] - truth) < 3 * r["std_error"], (name, r["estimate"], truth)
        assert 0 < r["ess"] < 6000 and r["warnings"] == [] and r["clipping"] is None
    # the naive logged mean is the logging policy's KPI, not the target's
    assert abs(result["logged_mean"] - truth) > 0.01


def test_table_on_a_csv_file(tmp_path: Path, csv_logs: Path) -> None:
    code, out, _ = ope(tmp_path, "--logged", str(csv_logs), "--target", "uniform")
    assert code == 0, out
    assert "Off-policy estimate of uniform" in out and "95% CI" in out
    for name in ("ips", "snips", "dm", "dr"):
        assert name in out


def test_allocation_file_clipping_and_a_subset_of_estimators(
    tmp_path: Path, csv_logs: Path
) -> None:
    proposal = tmp_path / "proposal.json"
    proposal.write_text(json.dumps({"segments": SCENARIO.targets["proposal"]}))
    args = ["--logged", str(csv_logs), "--target", f"allocation:{proposal}"]
    code, out, _ = ope(tmp_path, *args, "--estimators", "snips,dr", "--clip", "5", "--json")
    assert code == 0, out
    result = json.loads(out)
    assert sorted(result["estimators"]) == ["dr", "snips"]
    assert result["target"]["label"] == "allocation:proposal.json"
    clipped = result["estimators"]["snips"]["clipping"]
    assert clipped["threshold"] == 5.0 and clipped["clipped"] > 0
    assert any("clipped" in w for w in result["estimators"]["snips"]["warnings"])
    code, out, err = ope(tmp_path, *args, "--clip", "5")
    assert code == 0 and "warning" in err and "clipped" in err


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--estimators", "ips,magic"], 2, "--estimators must be a comma-separated subset"),
        (["--target", "everything"], 2, "target must be 'uniform', 'arm:NAME'"),
        (["--target", "arm:nobody"], 1, "target arm 'nobody' was never logged"),
        (["--bootstrap", "3"], 2, "n_bootstrap must be an integer >= 10, got 3"),
    ],
)
def test_usage_errors(
    tmp_path: Path, csv_logs: Path, args: list[str], code: int, message: str
) -> None:
    exit_code, _, err = ope(tmp_path, "--logged", str(csv_logs), *args)
    assert exit_code == code
    assert message in " ".join(err.split())


def test_bad_csv_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("arm,reward,propensity\na,1,0.5\nb,0,0\n")
    code, _, err = ope(tmp_path, "--logged", str(path))
    assert code == 1
    assert "column 'propensity' must be in (0, 1]: 1 of 2 rows, first at row 3" in " ".join(
        err.split()
    )
    path.write_text("arm,reward\na,1\n")
    code, _, err = ope(tmp_path, "--logged", str(path))
    assert code == 1 and "lack the column(s) ['propensity']" in " ".join(err.split())


def _seed_store(store: Store) -> None:
    store.sync_experiment(
        "exp", "exp", [ArmSpec("a", "concise", "h"), ArmSpec("b", "concise", "h")]
    )
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    for i, (arm, propensity, converted) in enumerate(
        [("a", 0.8, True), ("b", 0.2, False), ("a", 0.8, False), ("b", 0.2, True)]
    ):
        session = f"s{i}"
        store.record_assignment(
            AssignmentRecord(session, f"u{i}", "exp", arm, propensity, None, "*", {}, t0)
        )
        if converted:
            store.record_outcome(
                OutcomeRecord(f"k{i}", "conversion", 1.0, session_id=session, occurred_at=t0)
            )


def test_on_the_store(store: Store, tmp_path: Path) -> None:
    _seed_store(store)
    toml = tmp_path / "flywheel.toml"
    toml.write_text(
        '[experiment]\nid = "exp"\nsalt = "exp"\n'
        + "".join(f'[[experiment.arms]]\nid = "{a}"\nprompt = "concise"\n' for a in "ab")
        + '[[kpi.terms]]\nname = "conversion"\nsource = "outcome:conversion"\n'
        + "weight = 1.0\nwindow_days = 1\n"
    )
    base = ["ope", "--config", str(toml), "--database-url", store.url, "--bootstrap", "50"]
    result = CliRunner().invoke(app, [*base, "--target", "arm:b", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["n"] == 4 and out["source"] == "store, experiment 'exp'"
    assert out["estimators"]["ips"]["estimate"] == pytest.approx((1 / 0.2) / 4)
    assert out["estimators"]["snips"]["estimate"] == pytest.approx(0.5)
    # the current snapshot as the target
    missing = CliRunner().invoke(app, [*base, "--target", "snapshot"])
    assert missing.exit_code == 1 and "has no policy snapshot yet" in missing.stderr
    store.save_snapshot("exp", "thompson", {"segments": {"*": {"a": 0.5, "b": 0.5}}}, {})
    result = CliRunner().invoke(app, [*base, "--target", "snapshot", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["target"]["label"] == "snapshot:1"
    # IPS by hand: 0.5/0.8 × 1 (s0) + 0.5/0.2 × 1 (s3), over 4 sessions
    assert out["estimators"]["ips"]["estimate"] == pytest.approx((0.5 / 0.8 + 0.5 / 0.2) / 4)


def test_empty_store(sqlite_store: Store, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["ope", "--config", str(tmp_path / "absent.toml"), "--database-url", sqlite_store.url],
    )
    assert result.exit_code == 1
    assert "has no session with a complete KPI yet" in " ".join(result.stderr.split())
