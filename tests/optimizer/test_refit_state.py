"""The incremental refit equals a full recomputation, on random event streams.

Streams mix sessions (segments, the holdback, returning users, re-assignments
``<thread>~n``, late back-dated assignments), turns with their cost (recorded, or
priced per token), votes that change or are withdrawn, session- and user-level
outcomes arriving late or twice, outcomes named by a moved conversation's first
session (they count for its assignment open at the event), sessions and outcomes a
simulation writes ahead of its clock, and refits at increasing times; at every refit
the sums kept and updated by :mod:`optimizer.refit_state` must equal the ones
recomputed from every session.
"""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from optimizer import refit_state
from optimizer.config import Config
from optimizer.policy import ThompsonSamplingPolicy
from optimizer.refit import run_optimizer
from optimizer.refit_state import refit_inputs
from optimizer.store import ArmSpec, AssignmentRecord, OutcomeRecord, Store, TurnRecord

START = datetime(2026, 1, 1, tzinfo=UTC)
ARMS = ("a", "b", "c")
EXPERIMENT = "eq"


def _config() -> Config:
    return Config.model_validate(
        {
            "experiment": {
                "id": EXPERIMENT,
                "salt": EXPERIMENT,
                "champion": "a",
                "holdback": 0.1,
                "arms": [{"id": a, "prompt": a} for a in ARMS],
            },
            "kpi": {
                "terms": [
                    {
                        "name": "conversion",
                        "source": "outcome:conversion",
                        "weight": 1.0,
                        "window_days": 2,
                    },
                    {
                        "name": "revenue",
                        "source": "outcome:revenue",
                        "weight": 0.01,
                        "window_days": 3,
                        "aggregate": "sum",
                        "cap": 500,
                    },
                    {
                        "name": "thumbs_up",
                        "source": "feedback:up_rate",
                        "weight": 0.2,
                        "window_days": 1,
                    },
                    {
                        "name": "support_minutes",
                        "source": "outcome:support_minutes",
                        "weight": -0.01,
                        "window_days": 1,
                        "aggregate": "last",
                    },
                    {"name": "spend", "source": "cost:usd", "weight": -1.0, "window_days": 0},
                ],
                "guardrails": [{"metric": "cost_per_session", "max_delta": 0.5}],
            },
            "model": {"prices": {"priced": {"input_usd_per_mtok": 3, "output_usd_per_mtok": 15}}},
        }
    )


_EVENT = st.tuples(
    st.sampled_from(
        [
            "assign",
            "assign",
            "assign",
            "turn",
            "turn",
            "vote",
            "outcome",
            "outcome",
            "user_outcome",
            "thread_outcome",
            "duplicate",
            "late_assign",
            "reassign",
            "ahead_assign",
            "ahead_outcome",
            "refit",
        ]
    ),
    st.floats(0, 1, allow_nan=False),  # how far back (share of a few days) the event happened
    st.integers(0, 40),  # which session / user / turn
    st.floats(-5, 400, allow_nan=False),  # a value
    st.integers(0, 2),  # arm / vote / outcome name
)


def _apply(store: Store, events: list[tuple[str, float, int, float, int]], check) -> int:
    """Play the stream; ``check(now)`` at every refit (and every simulated day). Returns checks."""
    now = START
    sessions: list[AssignmentRecord] = []
    turns: list[TurnRecord] = []
    keys: list[OutcomeRecord] = []
    checks = 0
    for kind, back, idx, value, pick in events:
        now += timedelta(hours=7)
        at = now - timedelta(days=3 * back)
        at = max(at, START)
        if kind in ("assign", "late_assign", "ahead_assign"):
            # a simulation writes ahead of its clock: seen once a refit's `now` passes it
            when = {"assign": now, "late_assign": at, "ahead_assign": now + (now - at)}[kind]
            holdback = pick == 2 and idx % 3 == 0
            rec = AssignmentRecord(
                session_id=f"s{len(sessions)}",
                user_id=f"u{idx % 12}",
                experiment_id=EXPERIMENT,
                arm_id="a" if holdback else ARMS[pick],
                propensity=1 / 3,
                snapshot_version=None,
                segment=("free", "pro")[idx % 2],
                context={},
                assigned_at=when,
                holdback=holdback,
            )
            sessions.append(store.record_assignment(rec))
        elif kind == "reassign" and sessions:
            old = sessions[idx % len(sessions)]
            n = sum(1 for s in sessions if s.thread == old.thread)
            new = AssignmentRecord(
                session_id=f"{old.thread}~{n}",
                user_id=old.user_id,
                experiment_id=EXPERIMENT,
                arm_id="a",
                propensity=1.0,
                snapshot_version=None,
                segment=old.segment,
                context={},
                assigned_at=max(now, old.assigned_at),
                thread_id=old.thread,
            )
            sessions.append(store.reassign(old, new, "paused"))
        elif kind == "turn" and sessions:
            s = sessions[idx % len(sessions)]
            t = TurnRecord(
                id=f"t{len(turns)}",
                session_id=s.session_id,
                user_id=s.user_id,
                experiment_id=EXPERIMENT,
                arm_id=s.arm_id,
                prompt_id="p",
                prompt_hash="h",
                model=("m", "priced", "free")[pick],
                user_message="",
                reply="",
                latency_ms=100.0 + value,
                prompt_tokens=int(abs(value)) * 10,
                completion_tokens=int(abs(value)) * 3,
                cost=abs(value) / 1000 if pick == 0 else None,
                error="boom" if pick == 2 and value > 300 else None,
                created_at=max(now, s.assigned_at),
            )
            store.record_turn(t)
            turns.append(t)
        elif kind == "vote" and turns:
            t = turns[idx % len(turns)]
            store.record_feedback(t.id, t.user_id, (None, 0, 1)[pick], at=max(now, t.created_at))
        elif kind in ("outcome", "user_outcome", "ahead_outcome") and sessions:
            s = sessions[idx % len(sessions)]
            name = ("conversion", "revenue", "support_minutes")[pick]
            rec = OutcomeRecord(
                idempotency_key=f"k{len(keys)}",
                name=name,
                value=1.0 if name == "conversion" else value,
                session_id=None
                if kind == "user_outcome" or (kind == "ahead_outcome" and idx % 2)
                else s.session_id,
                user_id=None if kind == "outcome" else s.user_id,
                # often days late; or, from a simulation, ahead of the clock
                occurred_at=max(at, START) if kind != "ahead_outcome" else now + (now - at),
            )
            store.record_outcome(rec, received_at=now)
            keys.append(rec)
        elif kind == "thread_outcome" and sessions:
            # the integrator names the conversation's first session, after a move or not
            s = sessions[idx % len(sessions)]
            rec = OutcomeRecord(
                idempotency_key=f"k{len(keys)}",
                name=("conversion", "revenue", "support_minutes")[pick],
                value=1.0 if pick == 0 else value,
                session_id=s.thread,
                occurred_at=max(now - timedelta(hours=3 * back), START),
            )
            store.record_outcome(rec, received_at=now)
            keys.append(rec)
        elif kind == "duplicate" and keys:
            rec = keys[idx % len(keys)]
            store.record_outcome(rec, received_at=now)  # a redelivery: counted once
            store.record_outcome(
                OutcomeRecord(**{**rec.__dict__, "idempotency_key": f"k{len(keys)}"}),
                received_at=now,
            )  # the same fact under a new key: a second event
            keys.append(rec)
        elif kind == "refit":
            check(now)
            checks += 1
    check(now + timedelta(days=5))  # everything old enough to be sealed
    return checks + 1


def _aligned(
    a: pd.DataFrame, b: pd.DataFrame, keys: list[str]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    cols = sorted((set(a.columns) | set(b.columns)) - set(keys))
    a = a.reindex(columns=[*keys, *cols]).fillna(0.0)
    b = b.reindex(columns=[*keys, *cols]).fillna(0.0)
    a = a[a.get("n", a.get("count", 1)) != 0] if len(a) else a
    b = b[b.get("n", b.get("count", 1)) != 0] if len(b) else b
    a = a.sort_values(keys, kind="stable").reset_index(drop=True)
    b = b.sort_values(keys, kind="stable").reset_index(drop=True)
    return a, b


def _compare(store: Store, config: Config, now: datetime) -> None:
    inc = refit_inputs(store, config, now=now, incremental=True)
    full = refit_inputs(store, config, now=now, incremental=False)
    keys = ["segment", "arm_id", "holdback"]
    a, b = _aligned(inc.moments, full.moments, keys)
    assert a[keys].astype(str).equals(b[keys].astype(str)), (a[keys], b[keys])
    np.testing.assert_allclose(
        a.drop(columns=keys).to_numpy(float),
        b.drop(columns=keys).to_numpy(float),
        rtol=1e-9,
        atol=1e-9,
    )
    a, b = _aligned(
        inc.moments.attrs["sketch"].frame, full.moments.attrs["sketch"].frame, [*keys, "bucket"]
    )
    np.testing.assert_allclose(a["count"].to_numpy(float), b["count"].to_numpy(float))
    srm_keys = ["version", "segment", "inactive", "arm_id"]
    a, b = _aligned(inc.srm_groups, full.srm_groups, srm_keys)
    assert a[srm_keys].astype(str).equals(b[srm_keys].astype(str))
    np.testing.assert_allclose(a["n"].to_numpy(float), b["n"].to_numpy(float))
    # the same fit from both
    fits = [
        ThompsonSamplingPolicy(random_state=0).fit(m[~m["holdback"]] if len(m) else m, list(ARMS))
        for m in (inc.moments, full.moments)
    ]
    for arm in ARMS:
        x, y = fits[0].summary_[arm], fits[1].summary_[arm]
        assert x["sessions"] == y["sessions"]
        assert x["kpi_mean"] == pytest.approx(y["kpi_mean"], rel=1e-7, abs=1e-9)


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(_EVENT, min_size=20, max_size=80))
def test_incremental_refit_equals_full_recomputation(events) -> None:
    config = _config()
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(f"sqlite:///{Path(tmp) / 'f.db'}")
        store.create_all()
        store.sync_experiment(EXPERIMENT, EXPERIMENT, [ArmSpec(a, a, "h") for a in ARMS], at=START)
        _apply(store, events, lambda now: _compare(store, config, now))
        store.dispose()


def test_closed_days_are_kept_and_only_touched_days_recomputed(store: Store) -> None:
    """After the first refit seals old days, a refit with no news recomputes none, a late
    outcome recomputes only its session's day, and the result still equals recomputation."""
    config = _config()
    store.sync_experiment(EXPERIMENT, EXPERIMENT, [ArmSpec(a, a, "h") for a in ARMS], at=START)
    for i in range(60):  # 15 days, 4 sessions a day
        store.record_assignment(
            AssignmentRecord(
                f"s{i}",
                f"u{i}",
                EXPERIMENT,
                ARMS[i % 3],
                1 / 3,
                None,
                "*",
                {},
                START + timedelta(hours=6 * i),
            )
        )
    now = START + timedelta(days=16)
    first = refit_inputs(store, config, now=now)
    assert first.stats["sealed_days"] > 0 and first.stats["recomputed_days"] == 0
    again = refit_inputs(store, config, now=now + timedelta(hours=1))
    assert again.stats["sealed_days"] == 0 and again.stats["recomputed_days"] == 0
    store.record_outcome(
        OutcomeRecord(
            "late", "conversion", 1.0, session_id="s1", occurred_at=START + timedelta(hours=8)
        ),
        received_at=now,
    )
    late = refit_inputs(store, config, now=now + timedelta(hours=2))
    assert late.stats["recomputed_days"] == 1
    _compare(store, config, now + timedelta(hours=2))


def test_a_warm_refit_reads_again_only_the_sessions_that_changed(store: Store) -> None:
    """Kept rows: a new session and a vote on a closed day's session are all a refit reads
    again (with the voter's other sessions, read along for attribution); the closed day
    is corrected by the difference and the result equals a recomputation."""
    config = _config()
    store.sync_experiment(EXPERIMENT, EXPERIMENT, [ArmSpec(a, a, "h") for a in ARMS], at=START)
    for i in range(80):  # 20 days, 4 sessions a day, users coming back
        at = START + timedelta(hours=6 * i)
        store.record_assignment(
            AssignmentRecord(
                f"s{i}",
                f"u{i % 30}",
                EXPERIMENT,
                ARMS[i % 3],
                1 / 3,
                None,
                ("free", "pro")[i % 2],
                {},
                at,
            )
        )
        store.record_turn(_turn(f"t{i}", f"s{i}", f"u{i % 30}", ARMS[i % 3], at))
    now = START + timedelta(days=21)
    first = refit_inputs(store, config, now=now)
    assert first.stats["sealed_days"] > 0 and "reread_sessions" not in first.stats
    store.record_assignment(
        AssignmentRecord(
            "late-comer",
            "u-new",
            EXPERIMENT,
            "b",
            1 / 3,
            None,
            "free",
            {},
            now + timedelta(minutes=30),
        )
    )
    store.record_feedback("t2", "u2", 1, at=now + timedelta(minutes=40))  # a day-0 session
    warm = refit_inputs(store, config, now=now + timedelta(hours=1))
    assert warm.stats["reread_sessions"] == 2  # the new session and the voted one
    assert warm.stats["recomputed_days"] == 1 and warm.stats["sealed_days"] == 0
    # the next refit reads them once more (a write committed late is not missed), then none
    again = refit_inputs(store, config, now=now + timedelta(hours=2))
    assert again.stats["reread_sessions"] == 2
    nothing = refit_inputs(store, config, now=now + timedelta(hours=3))
    assert nothing.stats["reread_sessions"] == 0
    _compare(store, config, now + timedelta(hours=3))


def _turn(turn_id: str, session_id: str, user_id: str, arm: str, at: datetime) -> TurnRecord:
    return TurnRecord(
        id=turn_id,
        session_id=session_id,
        user_id=user_id,
        experiment_id=EXPERIMENT,
        arm_id=arm,
        prompt_id="p",
        prompt_hash="h",
        model="m",
        user_message="",
        reply="",
        latency_ms=100.0,
        prompt_tokens=10,
        completion_tokens=3,
        cost=0.001,
        error=None,
        created_at=at,
    )


def test_kept_rows_survive_encoding() -> None:
    """A day of rows comes back from its bytes as it went in (strings of any script)."""
    from optimizer.refit_rows import Rows, decode_day, encode_day

    rows = pd.DataFrame(
        {
            "assignment_id": np.array([3, 9], dtype=np.int64),
            "user_key": np.array([-5, 7], dtype=np.int64),
            "arm_id": pd.Series(["a", "ç-β"], dtype=object),
            "segment": pd.Series(["*", "日本"], dtype=object),
            "holdback": [False, True],
            "version": np.array([-1, 4], dtype=np.int64),
            "assigned_s": [1.5e9 + 0.123456, 1.5e9 + 7.0],
            "turns": np.array([2, 0], dtype=np.int64),
            "srm_first": [True, False],
            "conversion__obs": [0.0, 1.0],
        }
    )
    delays = pd.DataFrame(
        {
            "column": pd.Series(["conversion"], dtype=object),
            "assignment_id": np.array([9], dtype=np.int64),
            "delay_s": [3600.5],
            "weight": [1.0],
        }
    )
    back = decode_day(encode_day(Rows(rows, delays)))
    pd.testing.assert_frame_equal(back.rows, rows, check_dtype=False)
    pd.testing.assert_frame_equal(back.delays, delays, check_dtype=False)
    assert back.rows["assigned_s"].tolist() == rows["assigned_s"].tolist()  # bit for bit


def test_run_optimizer_is_the_same_either_way(tmp_path: Path) -> None:
    """Two copies of one store: the snapshot of an incremental run equals a full one's."""
    config = _config()
    stores = [Store(f"sqlite:///{tmp_path / f'{k}.db'}") for k in ("inc", "full")]
    rng = np.random.default_rng(3)
    for store in stores:
        store.create_all()
        store.sync_experiment(EXPERIMENT, EXPERIMENT, [ArmSpec(a, a, "h") for a in ARMS], at=START)
    plan = [(i, int(rng.integers(3)), rng.random() < 0.3, rng.exponential(30)) for i in range(300)]
    for store in stores:
        for i, arm, converted, revenue in plan:
            at = START + timedelta(hours=i)
            store.record_assignment(
                AssignmentRecord(
                    f"s{i}",
                    f"u{i % 40}",
                    EXPERIMENT,
                    ARMS[arm],
                    1 / 3,
                    None,
                    ("free", "pro")[i % 2],
                    {},
                    at,
                )
            )
            if converted:
                store.record_outcome(
                    OutcomeRecord(
                        f"c{i}",
                        "conversion",
                        1.0,
                        session_id=f"s{i}",
                        occurred_at=at + timedelta(hours=5),
                    ),
                    received_at=at,
                )
                store.record_outcome(
                    OutcomeRecord(
                        f"r{i}",
                        "revenue",
                        revenue,
                        user_id=f"u{i % 40}",
                        occurred_at=at + timedelta(hours=9),
                    ),
                    received_at=at,
                )
    now = START + timedelta(days=14)
    runs = []
    for store, incremental in zip(stores, (True, False), strict=True):
        run_optimizer(
            store,
            config,
            now=now - timedelta(days=2),
            random_state=1,
            fewshot=False,
            incremental=incremental,
        )
        runs.append(
            run_optimizer(
                store, config, now=now, random_state=1, fewshot=False, incremental=incremental
            )
        )
    inc, full = runs
    assert inc is not None and full is not None
    assert inc.sessions == full.sessions == 300
    for arm in ARMS:
        x, y = inc.summary["arms"][arm], full.summary["arms"][arm]
        assert x["kpi_mean"] == pytest.approx(y["kpi_mean"], rel=1e-7)
        assert x["prob_best"] == pytest.approx(y["prob_best"], abs=1e-3)
    assert inc.srm == full.srm
    assert refit_state.SEAL_CHUNK_DAYS >= 1
