"""The report from kept sums equals the report from every session, on random event streams."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pandas as pd
import pytest

from optimizer.config import Config
from optimizer.report import experiment_report
from optimizer.store import Store
from tests.optimizer.test_fewshot_state import Stream
from tests.support.fewshot_scenario import START, make_config

EXACT = (
    "sessions",
    "complete_sessions",
    "conversions",
    "conversion_rate",
    "thumbs_up_rate",
    "thumbs_down_rate",
    "error_rate",
    "kpi_observed_mean",
    "cost_usd_total",
    "cost_per_session",
    "kpi_per_dollar",
)


def _config() -> Config:
    config = make_config()
    exp = config.experiment.model_copy(update={"segment_by": ("plan",)})
    return config.model_copy(update={"experiment": exp})


def _same(a: Any, b: Any, key: str) -> None:
    if a is None or b is None:
        assert a == b, key
    else:
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12), key


def _compare(full: dict[str, Any], kept: dict[str, Any]) -> None:
    assert kept["totals"] == full["totals"]
    assert [a["id"] for a in kept["arms"]] == [a["id"] for a in full["arms"]]
    for a, b in zip(full["arms"], kept["arms"], strict=True):
        for key in EXACT:
            _same(b[key], a[key], f"{a['id']}.{key}")
        if a["median_support_minutes"] is None:
            assert b["median_support_minutes"] is None
        else:  # from the histogram: within 0.1%
            assert b["median_support_minutes"] == pytest.approx(
                a["median_support_minutes"], rel=1.5e-3
            )
    assert len(kept["segments"]) == len(full["segments"])
    for a, b in zip(full["segments"], kept["segments"], strict=True):
        for key, value in a.items():
            if isinstance(value, float):
                _same(b[key], value, key)
            else:
                assert b[key] == value, key
    s, t = full["series"], kept["series"]
    assert (t["bucket"], t["times"]) == (s["bucket"], s["times"])
    for name in ("sessions", "traffic_share", "cumulative_kpi"):
        assert t[name].keys() == s[name].keys()
        for arm in s[name]:
            for x, y in zip(s[name][arm], t[name][arm], strict=True):
                _same(y, x, f"{name}.{arm}")


@pytest.mark.parametrize("seed", [0, 1])
def test_kept_report_equals_the_full_report(store: Store, seed: int) -> None:
    config = _config()
    stream = Stream(store, seed)
    for hour in range(10):
        at = pd.Timestamp(START + timedelta(hours=9 * hour))
        stream.step(at, count=6)
        now = at + timedelta(minutes=30 if hour % 3 else 90)
        _compare(
            experiment_report(store, config, now=now),
            experiment_report(store, config, now=now, kept=True),
        )
    # hourly buckets for two days, daily ones after; windows close without new events
    for days in (3, 9, 31):
        now = pd.Timestamp(START + timedelta(days=days))
        _compare(
            experiment_report(store, config, now=now),
            experiment_report(store, config, now=now, kept=True),
        )


def test_empty_store(store: Store) -> None:
    config = _config()
    kept = experiment_report(store, config, kept=True)
    full = experiment_report(store, config)
    assert kept["totals"] == full["totals"] == {"sessions": 0, "complete_sessions": 0, "users": 0}
    assert kept["series"]["times"] == [] and kept["arms"] == full["arms"]
