"""The latency guardrail's window equals a straightforward recomputation, on random stores.

:func:`optimizer.kpi.turn_latencies` walks an index per arm and checks the holdback
only on arms that have holdback sessions, once per distinct session, fetching more
turns when the holdback left too few (:mod:`optimizer.latencies`). The reference
here reads every turn and assignment and filters in Python: the newest ``limit``
answered turns of the arm up to ``now`` (after ``since``), holdback sessions left
out. Random stores mix holdback sessions (from the start, and flagged later), turns
without a latency, turns after ``now``, another experiment, and turns written out of
time order; limits small enough that the holdback forces one or more extra fetches.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa

from optimizer import kpi
from optimizer.clock import as_utc
from optimizer.latencies import newest_latencies
from optimizer.store import Store, schema

T0 = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)
ARMS = ["base", "b", "c", "idle"]  # "idle" has no turns


def _random_store(store: Store, rng: np.random.Generator, sessions: int) -> None:
    """Sessions on random arms of two experiments; a random share of the baseline's held."""
    held_share = rng.uniform(0.1, 0.9)
    assignments: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for i in range(sessions):
        exp = "exp" if rng.random() < 0.9 else "other"
        arm = str(rng.choice(ARMS[:3], p=[0.5, 0.3, 0.2]))
        holdback = arm == "base" and rng.random() < held_share
        # Microsecond offsets, distinct across sessions: the newest-first order is total.
        start = T0 + timedelta(seconds=int(rng.integers(0, 10 * 86_400)), microseconds=i)
        sid = f"s{i}"
        assignments.append(
            dict(
                session_id=sid,
                user_id=f"u{i}",
                experiment_id=exp,
                arm_id=arm,
                propensity=0.5,
                snapshot_version=None,
                segment="*",
                context={},
                simulated=False,
                assigned_at=start,
                holdback=holdback,
            )
        )
        for j in range(int(rng.integers(0, 4))):
            turns.append(
                dict(
                    id=f"{sid}-t{j}",
                    session_id=sid,
                    user_id=f"u{i}",
                    experiment_id=exp,
                    arm_id=arm,
                    prompt_id=arm,
                    prompt_hash="hash",
                    fewshot_ids=[],
                    model="fake",
                    user_message="q",
                    reply="a",
                    latency_ms=None if rng.random() < 0.1 else float(rng.gamma(2.0, 300.0)),
                    created_at=start + timedelta(minutes=j),
                )
            )
    order = rng.permutation(len(turns))  # written out of time order (replays, replicas)
    with store.engine.begin() as conn:
        conn.execute(schema.assignments.insert(), assignments)
        conn.execute(schema.turns.insert(), [turns[k] for k in order])


def _flag_more_holdback(store: Store, rng: np.random.Generator) -> None:
    """Some baseline sessions join the holdback after their turns were written."""
    a = schema.assignments
    with store.engine.begin() as conn:
        ids = [r[0] for r in conn.execute(sa.select(a.c.session_id).where(a.c.arm_id == "base"))]
        picked = [s for s in ids if rng.random() < 0.2]
        conn.execute(sa.update(a).where(a.c.session_id.in_(picked)).values(holdback=True))


def _reference(
    store: Store,
    experiment_id: str,
    arms: list[str],
    now: datetime,
    limit: int,
    since: dict[str, datetime],
) -> dict[str, np.ndarray]:
    t, a = schema.turns, schema.assignments
    with store.engine.connect() as conn:
        held = {r[0] for r in conn.execute(sa.select(a.c.session_id).where(a.c.holdback))}
        rows = conn.execute(
            sa.select(t.c.arm_id, t.c.session_id, t.c.latency_ms, t.c.created_at).where(
                t.c.experiment_id == experiment_id
            )
        ).all()
    out = {}
    for arm in arms:
        mine = [
            (as_utc(r.created_at), r.latency_ms)
            for r in rows
            if r.arm_id == arm
            and r.latency_ms is not None
            and r.session_id not in held
            and as_utc(r.created_at) <= now
            and (arm not in since or as_utc(r.created_at) > since[arm])
        ]
        mine.sort(key=lambda x: x[0], reverse=True)
        out[arm] = np.array([lat for _, lat in mine[:limit]], dtype=float)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_window_equals_the_reference_on_random_stores(store: Store, seed: int) -> None:
    rng = np.random.default_rng(seed)
    _random_store(store, rng, sessions=int(rng.integers(300, 900)))
    cases = 0
    for step in range(2):
        if step == 1:
            _flag_more_holdback(store, rng)
        for limit in (1, 7, 40, 150, 10_000):
            now = T0 + timedelta(days=float(rng.uniform(3, 11)))
            since = {
                arm: T0 + timedelta(days=float(rng.uniform(0, 4)))
                for arm in ("base", "b")
                if rng.random() < 0.5
            }
            got = kpi.turn_latencies(store, "exp", ARMS, now=now, limit=limit, since=since)
            want = _reference(store, "exp", ARMS, now, limit, since)
            assert set(got) == set(ARMS)
            for arm in ARMS:
                # The guardrail needs the multiset; timestamps are distinct, so it is exact.
                np.testing.assert_array_equal(np.sort(got[arm]), np.sort(want[arm]), err_msg=arm)
            cases += 1
    assert cases == 10


def test_holdback_arm_fetches_more_until_the_limit_is_met(store: Store) -> None:
    """Nine turns in ten held: the first window (1.5 × limit) cannot hold the limit."""
    rows_a, rows_t = [], []
    for i in range(400):
        start = T0 + timedelta(seconds=i)
        rows_a.append(
            dict(
                session_id=f"s{i}",
                user_id=f"u{i}",
                experiment_id="exp",
                arm_id="base",
                propensity=1.0,
                snapshot_version=None,
                segment="*",
                context={},
                simulated=False,
                assigned_at=start,
                holdback=i % 10 != 0,
            )
        )
        rows_t.append(
            dict(
                id=f"t{i}",
                session_id=f"s{i}",
                user_id=f"u{i}",
                experiment_id="exp",
                arm_id="base",
                prompt_id="base",
                prompt_hash="hash",
                fewshot_ids=[],
                model="fake",
                user_message="q",
                reply="a",
                latency_ms=float(i),
                created_at=start,
            )
        )
    with store.engine.begin() as conn:
        conn.execute(schema.assignments.insert(), rows_a)
        conn.execute(schema.turns.insert(), rows_t)
    now = T0 + timedelta(days=1)
    lat = kpi.turn_latencies(store, "exp", ["base"], now=now, limit=25)["base"]
    assert sorted(lat.tolist()) == [float(i) for i in range(150, 400, 10)]
    everything = kpi.turn_latencies(store, "exp", ["base"], now=now, limit=1_000)["base"]
    assert sorted(everything.tolist()) == [float(i) for i in range(0, 400, 10)]
    with store.engine.connect() as conn:
        assert newest_latencies(conn, "exp", [], now=now, limit=5) == {}
