"""The operator dashboard in a real browser, on a store filled by ``flywheel demo``.

``build_demo`` simulates a few days of traffic through the real assignment,
store and optimizer (a guardrail fires on the harmful upsell arm);
``flywheel serve`` runs on that demo configuration with the fake model. In
Debian's Chromium we log in as operator, check the arms table against the
report's numbers, check every plot drew an SVG with data, pause an arm with
its button and see the effect on the page and on the next assignment. No
request may leave the server (plotly.js is served locally). Screenshots go to
``test-artifacts/``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from optimizer.assignment import Assigner
from optimizer.cli.demo import build_demo
from optimizer.config import load_config
from optimizer.report_html import pct
from optimizer.store import Store
from tests.support.flywheel_process import ServerProcess

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
PLOTS = ("allocation", "posterior", "cumulative_kpi", "guardrails")

pytestmark = [pytest.mark.e2e]


@dataclass(frozen=True)
class Dashboard:
    url: str
    config_path: Path
    result: Any


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dashboard]:
    home = tmp_path_factory.mktemp("demo-home")
    database_url = f"sqlite:///{home / 'demo.db'}"
    result, config_path = build_demo(database_url, days=4, seed=1, home=home)
    server = ServerProcess(
        "e2e-operator-server",
        home,
        config_path,
        database_url,
        env={"FLYWHEEL_MODEL": "fake/echo", "FLYWHEEL_OPTIMIZE_INTERVAL": "0"},
    )
    try:
        server.start()
        yield Dashboard(server.url, config_path, result)
    finally:
        server.stop()


def test_operator_dashboard_in_the_browser(dashboard: Dashboard, browser: Any) -> None:
    base = dashboard.url
    page = browser.new_page(viewport={"width": 1440, "height": 1000})
    outside: list[str] = []

    def only_local(route: Any) -> None:
        if route.request.url.startswith(base):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_local)
    try:
        page.goto(f"{base}/operator")
        page.wait_for_url("**/operator/login")
        page.fill("#username", "operator")
        page.fill("#password", "operator")
        page.click("#login button[type=submit]")
        page.wait_for_selector("#arms")

        # The table: five arms, the upsell arm paused by the guardrail, numbers as in the report.
        report = page.request.get(f"{base}/operator/report.json").json()
        rows = page.locator("#arms tbody tr")
        assert rows.count() == 5
        for arm in report["arms"]:
            row = page.locator(f'#arms tr[data-arm="{arm["id"]}"]')
            assert row.locator('[data-col="sessions"]').inner_text().split()[0] == str(
                arm["sessions"]
            )
            assert row.locator('[data-col="prob_best"]').inner_text() == pct(arm["prob_best"])
            assert row.locator('[data-col="allocation"]').inner_text() == pct(arm["allocation"])
        upsell = page.locator('#arms tr[data-arm="proactive-upsell"] [data-status]')
        assert upsell.get_attribute("data-status") == "paused_guardrail"
        assert "proactive-upsell" in page.locator("#guardrail-firings").inner_text()
        assert "thumbs_down_rate" in page.locator("#guardrail-firings").inner_text()

        # Every plot drew an SVG with at least one data trace.
        for name in PLOTS:
            page.wait_for_selector(f"#plot-{name} .main-svg", timeout=30_000)
            traces = page.locator(f"#plot-{name} .main-svg g.trace").count()
            assert traces > 0, f"plot {name} has no trace"
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "operator-dashboard.png"), full_page=True)

        # A control: pause "empathetic" with its button.
        page.click('#arms tr[data-arm="empathetic"] button[data-action="pause"]')
        page.wait_for_selector("#flash")
        assert "empathetic paused" in page.locator("#flash").inner_text()
        row = page.locator('#arms tr[data-arm="empathetic"]')
        assert row.locator("[data-status]").get_attribute("data-status") == "paused_operator"
        assert row.locator('[data-col="allocation"]').inner_text() == "0.0%"
        history = page.locator("#history").inner_text()
        assert "paused_operator" in history and "operator" in history
        page.screenshot(path=str(ARTIFACTS / "operator-dashboard-after-pause.png"), full_page=True)

        # The next assignments (any process reading the store) never get the paused arm.
        config = load_config(dashboard.config_path, environ=False)
        store = Store(config.database_url)
        try:
            exp = config.experiment
            assigner = Assigner(store, exp.id, salt=exp.salt, segment_by=exp.segment_by)
            arms = {
                assigner.assign(f"e2e-s{i}", f"e2e-u{i}", {"plan": "free"}).arm_id
                for i in range(40)
            }
        finally:
            store.dispose()
        assert "empathetic" not in arms and "proactive-upsell" not in arms and arms

        # Drill-down: recent sessions of an arm.
        page.click('#arms tr[data-arm="concise"] a')
        page.wait_for_selector(".session")
        assert page.locator(".session").count() == 20
        assert outside == [], f"requests left the server: {outside[:5]}"
    finally:
        page.close()
