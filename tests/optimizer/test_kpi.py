"""Per-session KPI from real events on SQLite and PostgreSQL."""

from __future__ import annotations

import math
from datetime import timedelta
from typing import Any

import numpy as np
import pandas as pd
import pytest

from optimizer import kpi
from optimizer.config import KPITermConfig
from optimizer.store import AssignmentRecord, OutcomeRecord, Store, TurnRecord
from tests.support.optimizer_events import EXPERIMENT, T0, add_sessions, make_config, register

DAY = timedelta(days=1)

TERMS = (
    KPITermConfig(name="conversion", source="outcome:conversion", weight=1.0, window_days=7),
    KPITermConfig(name="thumbs_up", source="feedback:up_rate", weight=0.2, window_days=1),
    KPITermConfig(
        name="support_minutes",
        source="outcome:support_minutes",
        weight=-0.02,
        cap=60,
        window_days=1,
        aggregate="sum",
    ),
    KPITermConfig(name="plan", source="outcome:plan", weight=1.0, window_days=3, aggregate="last"),
)


def assign(store: Store, sid: str, uid: str, arm: str, at: object) -> None:
    store.record_assignment(
        AssignmentRecord(sid, uid, EXPERIMENT, arm, 0.5, None, "*", {}, at)  # type: ignore[arg-type]
    )


def turn(store: Store, tid: str, sid: str, uid: str, arm: str, **kw: Any) -> None:
    kw.setdefault("created_at", T0)
    store.record_turn(TurnRecord(tid, sid, uid, EXPERIMENT, arm, arm, "h", "m", "q", "a", **kw))


def outcome(store: Store, key: str, name: str, value: float, at: object, **who: str) -> None:
    store.record_outcome(OutcomeRecord(key, name, value, occurred_at=at, **who))  # type: ignore[arg-type]


def test_counts_kept_by_the_store_equal_counting_as_of_now(store: Store) -> None:
    config = make_config(terms=TERMS)
    register(store, config)
    add_sessions(store, "a", 40, turns=3, ups=20, downs=10, errors=5, spread=DAY)
    add_sessions(store, "b", 30, turns=2, ups=5, downs=15, spread=DAY)
    now = T0 + 10 * DAY
    kept = kpi.session_frame(store, config, now=now)  # the counts on the assignments
    assert kept[["turns", "errors", "rated"]].sum().tolist() == [180, 5, 50]

    # A turn and a vote stamped after now: the frame is then counted as of now.
    later = now + DAY
    sid, uid = kept.session_id.iloc[0], kept.user_id.iloc[0]
    turn(store, "late", sid, uid, "a", error="timeout", created_at=later)
    store.record_feedback("late", uid, 1, at=later)
    pd.testing.assert_frame_equal(kpi.session_frame(store, config, now=now), kept)

    after = kpi.session_frame(store, config, now=later).set_index("session_id")
    before = kept.set_index("session_id")
    for column in ("turns", "errors", "rated", "thumbs_up"):
        assert after.loc[sid, column] == before.loc[sid, column] + 1, column


def test_rewards_by_hand(store: Store) -> None:
    config = make_config(terms=TERMS)
    register(store, config)
    assign(store, "s1", "u1", "a", T0)
    assign(store, "s2", "u2", "b", T0)
    assign(store, "s3", "u2", "b", T0 + 2 * DAY)  # u2's second session
    turn(store, "t1", "s1", "u1", "a")
    turn(store, "t2", "s1", "u1", "a")
    turn(store, "t3", "s1", "u1", "a", error="timeout")
    store.record_feedback("t1", "u1", 1, at=T0)
    store.record_feedback("t2", "u1", 0, at=T0)
    outcome(store, "c1", "conversion", 1, T0 + 3 * DAY, session_id="s1")
    outcome(store, "m1", "support_minutes", 50, T0 + DAY / 2, session_id="s1")
    outcome(store, "m2", "support_minutes", 30, T0 + DAY / 2, session_id="s1")  # sum 80, cap 60
    outcome(store, "c2", "conversion", 1, T0 + 8 * DAY, session_id="s2")  # after the 7-day window
    outcome(store, "c3", "conversion", 1, T0 + 2.5 * DAY, user_id="u2")  # → u2's latest: s3
    outcome(store, "p1", "plan", 3, T0 + 2.1 * DAY, user_id="u2")
    outcome(store, "p2", "plan", 2, T0 + 2.2 * DAY, user_id="u2")  # last wins
    frame = kpi.session_frame(store, config, now=T0 + 30 * DAY).set_index("session_id")

    s1, s2, s3 = frame.loc["s1"], frame.loc["s2"], frame.loc["s3"]
    assert (s1.turns, s1.errors, s1.rated, s1.thumbs_up, s1.thumbs_down) == (3, 1, 2, 1, 1)
    assert s1["conversion"] == 1 and s1["support_minutes"] == 60
    assert s1["kpi:thumbs_up"] == 0.5  # the term column is renamed: "thumbs_up" is the count
    assert s1.reward == pytest.approx(1 + 0.2 * 0.5 - 0.02 * 60)
    assert s2["conversion"] == 0 and s2["kpi:thumbs_up"] == 0  # unrated session: 0, not NaN
    assert s2.reward == 0
    assert s3["conversion"] == 1 and s3["plan"] == 2
    assert s3.reward == pytest.approx(1 + 2)
    assert frame["complete"].all()
    assert [t["column"] for t in frame.attrs["kpi_terms"]] == [
        "conversion",
        "kpi:thumbs_up",
        "support_minutes",
        "plan",
    ]


def test_open_window_is_not_a_failure(store: Store) -> None:
    config = make_config()
    register(store, config)
    assign(store, "s1", "u1", "a", T0)
    frame = kpi.session_frame(store, config, now=T0 + 3 * DAY)
    row = frame.iloc[0]
    assert math.isnan(row["conversion"]) and math.isnan(row["reward"]) and not row["complete"]
    assert row["conversion_observed"] == 0  # nothing yet, but that is not a "no"

    outcome(store, "c1", "conversion", 1, T0 + 5 * DAY, session_id="s1")
    later = kpi.session_frame(store, config, now=T0 + 7 * DAY).iloc[0]
    assert later["complete"] and later["reward"] == 1


def test_events_after_now_are_ignored(store: Store) -> None:
    config = make_config()
    register(store, config)
    assign(store, "s1", "u1", "a", T0)
    assign(store, "s2", "u2", "a", T0 + 20 * DAY)
    outcome(store, "c1", "conversion", 1, T0 + 9 * DAY, session_id="s1")
    frame = kpi.session_frame(store, config, now=T0 + 8 * DAY)
    assert frame["session_id"].tolist() == ["s1"]
    assert frame["conversion"].tolist() == [0.0]


def test_user_outcome_before_any_session_is_dropped(store: Store) -> None:
    config = make_config()
    register(store, config)
    assign(store, "s1", "u1", "a", T0)
    outcome(store, "c0", "conversion", 1, T0 - DAY, user_id="u1")
    outcome(store, "c1", "conversion", 1, T0 + DAY, user_id="nobody")
    frame = kpi.session_frame(store, config, now=T0 + 10 * DAY)
    assert frame["conversion"].tolist() == [0.0]


def test_exposure_follows_the_observed_delay_distribution(store: Store) -> None:
    config = make_config()
    register(store, config)
    # 40 old sessions, closed windows, converting after 1 day (20) or 3 days (20)
    add_sessions(store, "a", 20, at=T0, conversions=20, conversion_delay=DAY)
    add_sessions(store, "b", 20, at=T0, conversions=20, conversion_delay=3 * DAY)
    young = add_sessions(store, "a", 2, at=T0 + 10 * DAY)
    frame = kpi.session_frame(store, config, now=T0 + 12 * DAY).set_index("session_id")
    # age 2 days: half of the closed sessions' conversions had arrived by then
    assert frame.loc[young, "conversion_exposure"].tolist() == [0.5, 0.5]
    assert frame.loc[young, "conversion"].isna().all()
    old = frame.drop(index=young)
    assert (old["conversion_exposure"] == 1).all() and (old["conversion"] == 1).all()


def test_exposure_is_learnt_before_any_window_closes(store: Store) -> None:
    config = make_config()
    register(store, config)
    now = T0 + 5 * DAY
    # 100 sessions 2–5 days old (the 7-day window is open for all): 25 convert after
    # half a day, 25 after a day and a half
    add_sessions(store, "a", 50, spread=3 * DAY, conversions=25, conversion_delay=DAY / 2)
    add_sessions(store, "b", 50, spread=3 * DAY, conversions=25, conversion_delay=1.5 * DAY)
    (young,) = add_sessions(store, "a", 1, at=now - DAY)
    frame = kpi.session_frame(store, config, now=now).set_index("session_id")
    assert not frame["complete"].any()
    # half the conversions arrive within a day: a day-old session has had half its chance
    assert frame.loc[young, "conversion_exposure"] == pytest.approx(0.5)


def test_exposure_is_linear_until_enough_events(store: Store) -> None:
    config = make_config()
    register(store, config)
    (sid,) = add_sessions(store, "a", 1, at=T0)
    frame = kpi.session_frame(store, config, now=T0 + 3.5 * DAY)
    assert frame.set_index("session_id").loc[sid, "conversion_exposure"] == pytest.approx(0.5)


def test_empty_frame_has_every_column(store: Store) -> None:
    config = make_config(terms=TERMS)
    frame = kpi.session_frame(store, config)
    assert frame.empty
    assert list(frame.columns[: len(kpi.BASE_COLUMNS)]) == list(kpi.BASE_COLUMNS)
    assert {"conversion", "kpi:thumbs_up_observed", "plan_exposure"} <= set(frame.columns)


def test_arm_metrics_and_latencies(store: Store) -> None:
    config = make_config()
    register(store, config)
    add_sessions(
        store, "a", 10, conversions=2, turns=2, ups=3, downs=1, errors=1, latency_ms=[100, 300]
    )
    add_sessions(store, "b", 10, conversions=5, turns=1, latency_ms=200)
    frame = kpi.session_frame(store, config, now=T0 + 10 * DAY)
    m = kpi.arm_metrics(frame)
    assert m.loc["a", "conversion_rate"] == 0.2 and m.loc["b", "conversion_rate"] == 0.5
    assert m.loc["a", "thumbs_up_rate"] == 0.75 and m.loc["a", "error_rate"] == 1 / 20
    assert np.isnan(m.loc["b", "thumbs_up_rate"])
    lat = kpi.turn_latencies(store, EXPERIMENT, ["a", "b"], now=T0 + 10 * DAY)
    assert sorted(lat["a"].tolist()) == [100.0] * 10 + [300.0] * 10
    assert lat["b"].tolist() == [200.0] * 10
    add_sessions(store, "b", 3, at=T0 + DAY, turns=1, latency_ms=900)
    newest = kpi.turn_latencies(store, EXPERIMENT, ["b"], now=T0 + 10 * DAY, limit=3)
    assert newest["b"].tolist() == [900.0] * 3


def test_term_column() -> None:
    assert kpi.term_column("conversion") == "conversion"
    assert kpi.term_column("reward") == "kpi:reward"
