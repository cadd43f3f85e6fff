"""Each arm's newest turn latencies, read at a cost that does not grow with history.

The p95 latency guardrail (:func:`optimizer.kpi.turn_latencies`) reads the newest
``limit`` answered turns of each arm, leaving out turns of holdback sessions. Two
things made that cost far more than the rows it returns (1 s for five arms of
50,000 turns at 1M sessions on PostgreSQL):

- the turns of an arm were ordered by time with no index on (experiment, arm,
  time), so PostgreSQL filtered a walk of every arm's turns by time;
- the holdback was an anti-join probed once per turn on every arm.

Now an arm's window is a backward walk of ``ix_turns_arm_time`` that stops after
``limit`` rows and reads latency and session from the index. A turn carries its
session's arm (the chat writes it from the assignment, :mod:`chatbot.conversation`),
so only an arm with holdback sessions — the baseline, where the holdback stays
(:mod:`optimizer.holdback`) — can have holdback turns; one probe of the partial
index ``ix_assignments_holdback_arm`` says which arms, and the others read their
window and nothing else. An arm with holdback sessions anti-joins a bounded window
(``limit`` × 1.5 turns, grown by the holdback share it saw while too few are left),
so its cost is bounded by the window too. On PostgreSQL the latencies travel as one
binary ``float8[]`` per arm instead of a row each (4× less time in the driver).

Order: newest first by ``created_at`` on both engines (SQLite used to take the
newest by insertion order, which differs when turns are written out of time order).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import numpy as np
import sqlalchemy as sa

from optimizer.clock import as_utc
from optimizer.store import schema
from optimizer.store.store import fetch_tuples

__all__ = ["float8_array", "newest_latencies"]

#: First window of an arm with holdback sessions, as a share of ``limit``; grown by the
#: holdback share it saw until it holds ``limit`` turns outside the holdback or the arm
#: runs out of turns.
_HOLDBACK_MARGIN = 1.5
# array_send() of a one-dimensional float8[] without NULLs: ndim, has-nulls flag,
# element type, length, lower bound, then per element its length (8) and value.
_HEADER = np.dtype((">i4", (5,)))
_ELEMENT = np.dtype([("size", ">i4"), ("value", ">f8")])
_FLOAT8_OID = 701


def newest_latencies(
    conn: sa.Connection,
    experiment_id: str,
    arms: Sequence[str],
    *,
    now: datetime,
    limit: int,
    since: Mapping[str, datetime] | None = None,
) -> dict[str, np.ndarray]:
    """Per arm, the latencies (ms) of its newest ``limit`` answered turns up to ``now``
    outside the holdback (newest first as the engines return them; the guardrail needs
    only the values). See the module docstring."""
    held = _arms_with_holdback(conn, experiment_id, arms)
    out: dict[str, np.ndarray] = {}
    for arm in arms:  # an indexed walk per arm: a handful
        after = as_utc(since[arm]) if since and arm in since else None
        window = _window(experiment_id, arm, now, after)
        if arm not in held:
            out[arm] = _fetch(conn, window.limit(limit))
            continue
        if conn.dialect.name != "postgresql":
            # SQLite probes in-process (about a µs): the walk probes each turn, stops at limit.
            out[arm] = _fetch(conn, window.where(~_in_holdback()).limit(limit))
            continue
        fetch = int(limit * _HOLDBACK_MARGIN) + 1
        while True:
            values = _outside_holdback(conn, window.limit(fetch), limit)
            if len(values) >= limit or _size(conn, window.limit(fetch)) < fetch:
                break  # enough, or the arm has no more turns
            fetch = _next_fetch(fetch, len(values), limit)
        out[arm] = values
    return out


def float8_array(raw: bytes | memoryview | None) -> np.ndarray:
    """Decode PostgreSQL's binary ``array_send()`` of a ``float8[]`` without NULLs.

    None (``array_agg`` of no rows) is an empty array.

    >>> import struct
    >>> raw = struct.pack(">5i", 1, 0, 701, 2, 1) + struct.pack(">idid", 8, 1.5, 8, -2.0)
    >>> float8_array(raw).tolist()
    [1.5, -2.0]
    """
    if raw is None:
        return np.empty(0)
    buf = bytes(raw)
    ndim, has_nulls, element_type, size, _lower = np.frombuffer(buf, _HEADER, count=1)[0].tolist()
    if ndim != 1 or has_nulls or element_type != _FLOAT8_OID:
        raise ValueError(f"expected a 1-d float8[] without NULLs, got {ndim=} {element_type=}")
    cells = np.frombuffer(buf, _ELEMENT, count=size, offset=_HEADER.itemsize)
    return cells["value"].astype(float)


def _arms_with_holdback(conn: sa.Connection, experiment_id: str, arms: Sequence[str]) -> set[str]:
    """The arms of ``arms`` with at least one holdback session: one index probe each."""
    a = schema.assignments
    if not arms:
        return set()
    probes = [
        sa.exists()
        .where(a.c.holdback == sa.true(), a.c.experiment_id == experiment_id, a.c.arm_id == arm)
        .label(f"a{i}")
        for i, arm in enumerate(arms)
    ]
    row = conn.execute(sa.select(*probes)).one()
    return {arm for arm, flag in zip(arms, row, strict=True) if flag}


def _window(experiment_id: str, arm: str, now: datetime, after: datetime | None) -> sa.Select[Any]:
    """The arm's answered turns up to ``now``, newest first: a backward walk of the index."""
    t = schema.turns
    query = (
        sa.select(t.c.latency_ms, t.c.session_id, t.c.created_at)
        .where(
            t.c.experiment_id == experiment_id,
            t.c.arm_id == arm,
            t.c.created_at <= now,
            t.c.latency_ms.is_not(None),
        )
        .order_by(t.c.created_at.desc())
    )
    return query if after is None else query.where(t.c.created_at > after)


def _fetch(conn: sa.Connection, window: sa.Select[Any]) -> np.ndarray:
    """The latencies of a window, in its order."""
    rows = window.subquery("w")
    if conn.dialect.name == "postgresql":
        agg = sa.func.array_send(sa.func.array_agg(rows.c.latency_ms), type_=sa.LargeBinary)
        return float8_array(conn.execute(sa.select(agg)).scalar())
    latencies = sa.select(rows.c.latency_ms)
    return np.array(fetch_tuples(conn, latencies), dtype=float).reshape(-1)


def _outside_holdback(conn: sa.Connection, window: sa.Select[Any], limit: int) -> np.ndarray:
    """PostgreSQL: the newest ``limit`` latencies of a bounded ``window`` outside the holdback.

    The anti-join runs on the window alone (a subquery with its own limit), so the
    planner walks ``ix_turns_arm_time`` instead of filtering a parallel walk of every
    arm's turns by time, and picks per turn probes of ``ix_assignments_holdback`` or one
    hash of the holdback sessions, whichever is cheaper: bounded by the window either way.
    """
    a = schema.assignments
    w = window.subquery("w")
    held = sa.exists().where(a.c.session_id == w.c.session_id, a.c.holdback == sa.true())
    kept = (
        sa.select(w.c.latency_ms)
        .where(~held)
        .order_by(w.c.created_at.desc())
        .limit(limit)
        .subquery("kept")
    )
    agg = sa.func.array_send(sa.func.array_agg(kept.c.latency_ms), type_=sa.LargeBinary)
    return float8_array(conn.execute(sa.select(agg)).scalar())


def _size(conn: sa.Connection, window: sa.Select[Any]) -> int:
    """How many turns a bounded window holds: fewer than its limit once the arm runs out."""
    return int(conn.execute(sa.select(sa.func.count()).select_from(window.subquery())).scalar_one())


def _next_fetch(fetch: int, kept: int, limit: int) -> int:
    """A bigger window, sized by the holdback share seen in the last one (at most 8×).

    >>> _next_fetch(62_501, 49_466, 50_000)
    69494
    >>> _next_fetch(1_000, 0, 50_000)
    8000
    """
    grow = min(limit / max(kept, 1), 8.0)
    return min(max(int(fetch * grow * 1.1) + 1, fetch + 1), fetch * 8)


def _in_holdback() -> sa.Exists:
    """The turn's session is a holdback one (correlated with ``turns``)."""
    a, t = schema.assignments, schema.turns
    return sa.exists().where(a.c.session_id == t.c.session_id, a.c.holdback == sa.true())
