"""The experiment report: its numbers are the optimizer's, and the HTML shows exactly those.

A seeded simulated experiment goes through the real assignment, store and
optimizer; the report is then compared with the newest policy snapshot (the
optimizer's own posterior numbers) and with :func:`optimizer.kpi.arm_metrics`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from datetime import timedelta
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from typer.testing import CliRunner

from optimizer import kpi
from optimizer.assignment import ALL_SEGMENTS, Assigner
from optimizer.clock import utcnow
from optimizer.config import Config, load_config
from optimizer.plots import FIGURE_TITLES, figures
from optimizer.refit import run_optimizer
from optimizer.report import experiment_report, recent_sessions
from optimizer.report_html import interval, num, pct, render_standalone
from optimizer.scenario import parse_scenario
from optimizer.simulator import scenario_config, simulate
from optimizer.store import ArmSpec, AssignmentRecord, OutcomeRecord, Store, TurnRecord
from tests.support.pg_schema import postgres_schema, postgres_url

SCENARIO = {
    "name": "report",
    "sessions": 2400,
    "sessions_per_day": 400,
    "refit_every_hours": 24,
    "champion": "a",
    "segment_by": "plan",
    "delay": {"distribution": "exponential", "mean_days": 0.5, "max_days": 2},
    "kpi": {
        "terms": [
            {"name": "conversion", "source": "outcome:conversion", "weight": 1.0, "window_days": 2},
            {"name": "thumbs_up", "source": "feedback:up_rate", "weight": 0.2, "window_days": 1},
            {
                "name": "support_minutes",
                "source": "outcome:support_minutes",
                "weight": -0.01,
                "window_days": 1,
                "aggregate": "sum",
            },
        ],
        "guardrails": [{"metric": "thumbs_down_rate", "max_delta": 0.05}],
    },
    "policy": {"burn_in": 50, "samples": 1000},
    "arms": [
        {"id": "a", "conversion": 0.08, "thumbs_up": 0.75, "support_minutes": 5},
        {"id": "b", "conversion": 0.12, "thumbs_up": 0.78, "support_minutes": 4},
        {"id": "c", "conversion": 0.15, "thumbs_up": 0.40, "support_minutes": 5},
    ],
    "segments": [{"value": "free", "share": 0.6}, {"value": "pro", "share": 0.4}],
}


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def seeded(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Store, Config]]:
    """A finished simulated experiment plus a fresh optimizer run, once per backend.

    Module-scoped (the simulation takes seconds); the tests only read it.
    """
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite:///{tmp_path_factory.mktemp('report') / 'flywheel.db'}"
        else:
            url = stack.enter_context(postgres_schema(postgres_url()))
        scenario = parse_scenario(SCENARIO)
        simulate(scenario, policy="thompson", seed=3, database_url=url)
        config = scenario_config(scenario, "thompson", experiment_id="sim-report-thompson-3")
        store = Store(url)
        stack.callback(store.dispose)
        run_optimizer(store, config, random_state=0)
        yield store, config


@pytest.fixture(scope="module")
def report(seeded: tuple[Store, Config]) -> dict[str, Any]:
    store, config = seeded
    return experiment_report(store, config)


class _Cells(HTMLParser):
    """Text of each ``<td data-col>`` of each ``<tr data-arm>`` in a page."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[str, dict[str, str]] = {}
        self._arm: str | None = None
        self._col: str | None = None
        self._depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "tr" and a.get("data-arm"):
            self._arm = a["data-arm"]
            self.cells[self._arm] = {}
        elif tag == "td" and self._arm and a.get("data-col"):
            self._col, self._depth = a["data-col"], 0
            self.cells[self._arm][self._col] = ""
        elif self._col and tag in ("span", "div"):
            self._depth += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._col = None
        elif tag == "tr":
            self._arm = None

    def handle_data(self, data: str) -> None:
        if self._arm and self._col:
            cell = self.cells[self._arm]
            cell[self._col] = " ".join((cell[self._col] + " " + data).split())


def snapshot_checks(store: Store, config: Config) -> list[dict[str, Any]]:
    snapshot = store.latest_snapshot(config.experiment.id)
    return [c for c in snapshot.summary["guardrails"] if c["metric"] == "thumbs_down_rate"]


def table_cells(html: str) -> dict[str, dict[str, str]]:
    parser = _Cells()
    parser.feed(html)
    return parser.cells


def expected_cells(arm: dict[str, Any]) -> dict[str, str]:
    """How the page must show the optimizer's numbers for one arm."""
    return {
        "kpi_mean": f"{num(arm['kpi_mean'], 4)} {interval(arm['kpi_ci'], lambda v: num(v, 4))}",
        "prob_best": pct(arm["prob_best"]),
        "expected_loss": num(arm["expected_loss"], 4),
        "conversion_rate": f"{pct(arm['conversion_rate'])} {interval(arm['conversion_ci'], pct)}",
        "thumbs_up_rate": pct(arm["thumbs_up_rate"]),
        "thumbs_down_rate": pct(arm["thumbs_down_rate"]),
        "median_support_minutes": num(arm["median_support_minutes"], 1),
    }


def test_report_numbers_equal_the_optimizers(
    seeded: tuple[Store, Config], report: dict[str, Any]
) -> None:
    store, config = seeded
    snapshot = store.latest_snapshot(config.experiment.id)
    assert snapshot is not None
    summary = snapshot.summary["arms"]

    assert report["snapshot"]["version"] == snapshot.version
    assert [a["id"] for a in report["arms"]] == ["a", "b", "c"]
    for arm in report["arms"]:
        theirs = summary[arm["id"]]
        for key in ("kpi_mean", "kpi_ci", "prob_best", "expected_loss", "conversion_ci"):
            assert arm[key] == theirs[key], (arm["id"], key)
        # Live figures use the optimizer's definitions: identical while no new data arrived.
        for key in ("sessions", "complete_sessions"):
            assert arm[key] == theirs[key], (arm["id"], key)
        for key in (
            "conversion_rate",
            "thumbs_up_rate",
            "thumbs_down_rate",
            "median_support_minutes",
        ):
            assert arm[key] == pytest.approx(theirs[key], rel=1e-12), (arm["id"], key)
    assert report["srm"] == snapshot.summary["srm"]
    assert report["leader"]["arm"] == max(summary, key=lambda a: summary[a]["prob_best"] or -1)
    # Allocation now is what the Assigner would serve.
    exp = config.experiment
    serving = Assigner(store, exp.id, salt=exp.salt, segment_by=exp.segment_by).allocation()
    for arm in report["arms"]:
        assert arm["allocation"] == pytest.approx(
            serving.for_segment(ALL_SEGMENTS).get(arm["id"], 0.0)
        )


def test_page_shows_the_report_numbers(report: dict[str, Any]) -> None:
    cells = table_cells(render_standalone(report))
    assert set(cells) == {"a", "b", "c"}
    for arm in report["arms"]:
        shown = cells[arm["id"]]
        for col, text in expected_cells(arm).items():
            assert shown[col] == text.strip(), (arm["id"], col)
        assert shown["sessions"].split()[0] == str(arm["sessions"])
        assert shown["conversions"] == str(int(arm["conversions"]))


def test_report_is_strict_json_and_series_add_up(
    seeded: tuple[Store, Config], report: dict[str, Any]
) -> None:
    store, config = seeded
    json.dumps(report, allow_nan=False)  # NaN would be invalid JSON for the page and --json
    series = report["series"]
    assert series["bucket"] == "day"
    total = sum(sum(v for v in values if v is not None) for values in series["sessions"].values())
    assert total == report["totals"]["sessions"] == 2400
    for i in range(len(series["times"])):
        shares = [series["traffic_share"][arm][i] for arm in series["traffic_share"]]
        if any(s is not None for s in shares):
            assert sum(s or 0 for s in shares) == pytest.approx(1.0)
    # The running mean ends at the mean KPI of all complete sessions of the arm.
    frame = kpi.session_frame(store, config)
    final = frame[frame["complete"]].groupby("arm_id")["reward"].mean()
    for arm, values in series["cumulative_kpi"].items():
        last = [v for v in values if v is not None][-1]
        assert last == pytest.approx(final[arm])
    # Guardrail series: what each optimizer run checked, the newest equal to the snapshot's checks.
    guard = series["guardrails"]
    assert guard["times"] == series["policy_allocation"]["times"]
    down = guard["metrics"]["thumbs_down_rate"]
    for check in snapshot_checks(store, config):
        assert down["arms"][check["arm"]][-1] == pytest.approx(check["arm_value"])
        assert down["champion"][-1] == pytest.approx(check["champion_value"])
        assert down["limit"][-1] == pytest.approx(check["champion_value"] + check["limit"])
    # One policy allocation per snapshot, the newest equal to the snapshot's.
    snapshot = store.latest_snapshot(config.experiment.id)
    policy = series["policy_allocation"]
    assert policy["versions"][-1] == snapshot.version
    for arm, p in snapshot.allocation["segments"][ALL_SEGMENTS].items():
        assert policy["arms"][arm][-1] == pytest.approx(p)


def test_segments_and_guardrail_firings(
    seeded: tuple[Store, Config], report: dict[str, Any]
) -> None:
    store, config = seeded
    segments = {(s["segment"], s["arm"]): s for s in report["segments"]}
    assert {seg for seg, _ in segments} == {"plan=free", "plan=pro"}
    frame = kpi.session_frame(store, config)
    counts = frame.groupby(["segment", "arm_id"]).size()
    posterior = store.latest_snapshot(config.experiment.id).summary["segments"]
    for (seg, arm), row in segments.items():
        assert row["sessions"] == counts[(seg, arm)]
        assert row["kpi_mean"] == posterior[seg][arm]["kpi_mean"]
        assert row["prob_best"] == posterior[seg][arm]["prob_best"]
    # Arm c earns many thumbs down: the optimizer paused it with evidence, and the report says so.
    statuses = {a["id"]: a for a in report["arms"]}
    assert statuses["c"]["status"] == "paused_guardrail"
    assert statuses["c"]["status_label"] == "paused by guardrail"
    assert statuses["c"]["allocation"] == 0.0
    fired = [f for f in report["guardrail_firings"] if f["arm"] == "c"]
    assert fired and fired[0]["metric"] == "thumbs_down_rate"
    assert fired[0]["evidence"]["probability"] >= config.policy.pause_probability
    html = render_standalone(report)
    assert "paused by <b>thumbs_down_rate</b>" in html


def test_empty_store_report(store: Store) -> None:
    config = load_config("/nonexistent.toml", environ=False)
    report = experiment_report(store, config)
    assert report["totals"] == {"sessions": 0, "complete_sessions": 0, "users": 0}
    assert report["snapshot"] is None and report["leader"] is None and report["srm"] is None
    json.dumps(report, allow_nan=False)
    html = render_standalone(report)
    assert "no posterior yet" in html
    assert all(fig.layout.annotations for fig in figures(report).values())  # "no data" notes


def test_plots_have_one_trace_per_arm(report: dict[str, Any]) -> None:
    figs = figures(report)
    assert set(figs) == set(FIGURE_TITLES)
    assert {t.name for t in figs["allocation"].data if not t.name.endswith("(policy)")} == {
        "a",
        "b",
        "c",
    }
    assert {t.name for t in figs["posterior"].data} == {"a", "b", "c"}
    posterior = {t.name: t for t in figs["posterior"].data}
    for arm in report["arms"]:
        trace = posterior[arm["id"]]
        assert trace.x[0] == arm["kpi_mean"]
        assert trace.x[0] + trace.error_x.array[0] == pytest.approx(arm["kpi_ci"][1])
        assert trace.x[0] - trace.error_x.arrayminus[0] == pytest.approx(arm["kpi_ci"][0])
    assert len(figs["cumulative_kpi"].data) == 3
    names = {t.name for t in figs["guardrails"].data}
    assert {
        "b",
        "champion",
        "limit (vs champion)",
    } <= names and "a" not in names  # champion unchecked


def test_standalone_html_has_no_external_assets(report: dict[str, Any]) -> None:
    html = render_standalone(report)
    # Scripts are inline and nothing is linked: the file works offline.
    assert "<script src=" not in html and "<link" not in html
    assert html.count("Plotly.newPlot") == len(FIGURE_TITLES)
    assert "plotly.js v" in html or "plotly.js" in html  # the library itself, inlined


def test_recent_sessions_drill_down(store: Store) -> None:
    config = load_config("/nonexistent.toml", environ=False).model_copy(deep=True)
    exp = config.experiment
    store.sync_experiment(exp.id, exp.salt, [ArmSpec("x", "p", "h"), ArmSpec("y", "p", "h")])
    t0 = utcnow() - timedelta(hours=3)
    for i, arm in enumerate(["x", "y", "x"]):
        store.record_assignment(
            AssignmentRecord(
                f"s{i}",
                f"u{i}",
                exp.id,
                arm,
                0.5,
                None,
                ALL_SEGMENTS,
                {},
                t0 + timedelta(minutes=i),
            )
        )
        store.record_turn(
            TurnRecord(
                f"t{i}",
                f"s{i}",
                f"u{i}",
                exp.id,
                arm,
                "p",
                "h",
                "fake",
                f"hello {i}",
                f"reply {i}",
                latency_ms=100.0 + i,
                trace_id=f"trace{i}",
                created_at=t0 + timedelta(minutes=i, seconds=5),
            )
        )
    store.record_feedback("t0", "u0", 1, "great")
    store.record_outcome(OutcomeRecord("k0", "conversion", 1.0, session_id="s0"))
    store.record_outcome(OutcomeRecord("k1", "revenue", 30.0, user_id="u2"))
    sessions = recent_sessions(store, config, "x", limit=10)
    assert [s["session_id"] for s in sessions] == ["s2", "s0"]  # newest first, only arm x
    s0 = sessions[1]
    assert s0["turns"][0]["user_message"] == "hello 0" and s0["turns"][0]["trace_id"] == "trace0"
    assert s0["turns"][0]["votes"] == [{"value": 1, "comment": "great"}]
    assert [(o["name"], o["scope"]) for o in s0["outcomes"]] == [("conversion", "session")]
    assert [(o["name"], o["scope"]) for o in sessions[0]["outcomes"]] == [("revenue", "user")]
    with pytest.raises(ValueError, match="limit must be between 1 and 500, got 0"):
        recent_sessions(store, config, "x", limit=0)


def test_report_command_json_and_html(seeded: tuple[Store, Config], tmp_path: Path) -> None:
    from chatbot.cli import app

    store, config = seeded
    config_path = tmp_path / "flywheel.toml"
    config_path.write_text(
        tomli_w.dumps(config.model_dump(mode="json", exclude_none=True, exclude={"source"}))
    )
    out = tmp_path / "report.html"
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "report",
            "--config",
            str(config_path),
            "--database-url",
            store.url,
            "--json",
            "--html",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [a["id"] for a in data["arms"]] == ["a", "b", "c"]
    assert data["snapshot"]["version"] == store.latest_snapshot(config.experiment.id).version
    cells = table_cells(out.read_text())
    for arm in data["arms"]:
        assert cells[arm["id"]]["prob_best"] == pct(arm["prob_best"])
    table = runner.invoke(
        app, ["report", "--config", str(config_path), "--database-url", store.url]
    )
    assert table.exit_code == 0, table.output
    assert "Guardrail thumbs_down_rate paused c" in " ".join(table.stdout.split())


def test_report_rejects_bad_history_limit(store: Store) -> None:
    with pytest.raises(ValueError, match="history_limit must be >= 0, got -1"):
        experiment_report(store, load_config("/nonexistent.toml", environ=False), history_limit=-1)
