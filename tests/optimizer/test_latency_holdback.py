"""The latency guardrail judges the bandit's traffic only: holdback turns are left out.

The holdback stays on the baseline arm outside the bandit (optimizer.holdback); the rate
guardrails already read the bandit's sessions only. Its turns must not move the baseline's
p95 either — a slow holdback would otherwise make a challenger look fast, or the reverse.
"""

from __future__ import annotations

from datetime import timedelta

import sqlalchemy as sa

from optimizer import kpi
from optimizer.config import GuardrailConfig
from optimizer.refit import run_optimizer
from optimizer.store import Store, schema
from tests.support.optimizer_events import EXPERIMENT, T0, add_sessions, make_config, register

DAY = timedelta(days=1)


def _into_holdback(store: Store, session_ids: list[str]) -> None:
    with store.engine.begin() as conn:
        conn.execute(
            sa.update(schema.assignments)
            .where(schema.assignments.c.session_id.in_(session_ids))
            .values(holdback=True)
        )


def test_turn_latencies_leave_the_holdback_out(store: Store) -> None:
    config = make_config()
    register(store, config)
    add_sessions(store, "a", 40, turns=1, latency_ms=200)
    held = add_sessions(store, "a", 10, turns=1, latency_ms=5000, at=T0 + timedelta(hours=1))
    _into_holdback(store, held)
    lat = kpi.turn_latencies(store, EXPERIMENT, ["a"], now=T0 + DAY)
    assert lat["a"].tolist() == [200.0] * 40
    # Without the holdback flag the same turns count: the filter is what removes them.
    with store.engine.begin() as conn:
        conn.execute(sa.update(schema.assignments).values(holdback=False))
    assert len(kpi.turn_latencies(store, EXPERIMENT, ["a"], now=T0 + DAY)["a"]) == 50


def test_slow_holdback_does_not_hide_a_slow_challenger(store: Store) -> None:
    """Baseline 200 ms in the bandit, 5 s in the holdback; the challenger 1 s: a 5× breach."""
    rails = [GuardrailConfig(metric="latency_p95_ms", max_ratio=2.0)]
    config = make_config(guardrails=rails)
    register(store, config)
    add_sessions(store, "a", 300, turns=2, latency_ms=200, spread=DAY)
    held = add_sessions(store, "a", 300, turns=2, latency_ms=5000, spread=DAY)
    _into_holdback(store, held)
    add_sessions(store, "b", 300, turns=2, latency_ms=1000, spread=DAY)
    run = run_optimizer(store, config, now=T0 + 2 * DAY, random_state=0, fewshot=False)
    check = run.summary["arms"]["b"]["guardrails"]["latency_p95_ms"]
    assert check["champion_value"] == 200.0 and check["champion_n"] == 600
    assert check["breached"], check
    assert run.paused == ("b",)
