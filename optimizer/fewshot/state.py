"""The few-shot step's state, kept up to date from a watermark instead of re-ranking history.

Mining ranks every qualifying turn by its session's reward, and credit needs every
complete session's reward: recomputing both from all events costs a full
:func:`~optimizer.kpi.session_frame` plus a read of all turns and votes on every
run (tens of seconds at a million sessions). Both depend on a session only through
that session's own events (and, for outcomes reported with a user id only, that
user's other sessions), so the step keeps per experiment:

- ``fewshot_turns``: the qualifying turns with their ranking keys (reward, reward
  so far, time, id), reasons, text lengths and whether they were mined;
- ``fewshot_sessions``: per session, its arm, the turns mining considered, its
  complete reward and the example ids its turns showed (what credit counted);
- ``fewshot_credit``: per (example, arm) and per arm the number, sum and sum of
  squares of those rewards — mergeable, so a session's change is a subtraction and
  an addition;
- ``fewshot_state``: the watermark — the ``now`` of the last run, the newest ids of
  the event tables and the sessions excluded from data (opt-outs, deleted chats).

A run recomputes exactly the sessions whose inputs may have changed since the last
one: a turn stamped since then, a vote or outcome written since (by id, so late and
re-sent events count) or stamped since (events written ahead of a simulated
``now``), a session assigned since, a session whose KPI window closed since, and
whose exclusion changed — each widened to the other sessions of its users and
conversations, which user-level outcomes and moved conversations are attributed
across (:func:`optimizer.kpi.session_frame`). The recomputation is the same
arithmetic as the full path, on those sessions only, so the result equals a full
re-ranking (``tests/optimizer/test_fewshot_state.py`` compares them on random event
streams).

The ids of the last run are read again with a margin (:data:`ID_OVERLAP`) and turns
with :data:`TURN_LAG_S`: a PostgreSQL transaction may commit a lower id, or a turn
stamped a moment ago, after the watermark was read; recomputing a session twice is
harmless. A change of the KPI or mining settings, a ``now`` before the last run's,
or no state at all rebuild everything once (the full path's arithmetic, a stretch of
:data:`~optimizer.fewshot.state_rows.REBUILD_CHUNK_DAYS` days of assignments at a
time: its memory is one stretch's, whatever the length of the history).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import pandas as pd
import sqlalchemy as sa

from optimizer.clock import as_utc
from optimizer.config import Config
from optimizer.fewshot.state_rows import (
    _CHUNK,
    LOWEST,
    merge_counts,
    rebuild,
    recompute,
    turn_counts,
)
from optimizer.locks import job_lock
from optimizer.store import Store, schema
from optimizer.store.store import fetch_tuples

__all__ = [
    "ID_OVERLAP",
    "SQLITE_TURN_LAG_S",
    "STATE_VERSION",
    "TURN_LAG_S",
    "MiningCounts",
    "Refresh",
    "credit_sums",
    "mining_counts",
    "ranked_candidates",
    "refresh_state",
]

log = logging.getLogger(__name__)

#: Bumped when the kept state's meaning changes: every store then rebuilds it once.
STATE_VERSION = 1
#: Ids below the last run's newest that are read again on PostgreSQL (transactions may
#: commit out of id order; SQLite's writers take turns, so it needs none).
ID_OVERLAP = 100
#: Seconds before the last run's ``now`` from which turns are read again: a turn is
#: stamped before it commits, and replicas' clocks differ (SQLite: one machine).
TURN_LAG_S = 300.0
SQLITE_TURN_LAG_S = 5.0
_MARKED = ("assignments", "feedback_events", "outcomes")


@dataclass(frozen=True)
class Refresh:
    """What one refresh did: sessions recomputed, whether from scratch, seconds."""

    sessions: int
    rebuilt: bool
    duration_s: float
    #: Another refresh held the state (see :func:`refresh_state`).
    skipped: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "sessions": self.sessions,
            "rebuilt": self.rebuilt,
            "duration_s": self.duration_s,
            "skipped": self.skipped,
        }


@dataclass(frozen=True)
class MiningCounts:
    """The figures of a mining pass that cover all turns, from the kept state."""

    considered: int
    qualifying: int
    reasons: dict[str, int]
    too_short: int
    too_long: int


# -- public ---------------------------------------------------------------------------------


def refresh_state(store: Store, config: Config, *, now: datetime, wait_s: float = 60.0) -> Refresh:
    """Bring the experiment's kept state up to ``now`` (see the module docstring).

    One refresh at a time per experiment (a job lock: the optimizer job and the
    operator page both refresh): another caller's refresh is waited for up to
    ``wait_s`` seconds, then this one is skipped (``skipped``) and the state is as
    that refresh left it.
    """
    started = time.perf_counter()
    deadline = started + wait_s
    while True:
        with job_lock(store, f"fewshot-state:{config.experiment.id}") as held:
            if held:
                return _refresh(store, config, as_utc(now), started)
        if time.perf_counter() >= deadline:
            log.info("few-shot state: another refresh holds the lock; skipped")
            return Refresh(0, False, time.perf_counter() - started, skipped=True)
        time.sleep(0.2)


def _refresh(store: Store, config: Config, now: datetime, started: float) -> Refresh:
    exp_id = config.experiment.id
    fingerprint = _fingerprint(config)
    st = schema.fewshot_state
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(st).where(st.c.experiment_id == exp_id)).first()
        marks = _marks(conn)
    excluded = store.excluded_sessions(exp_id)
    mined = _mined_turns(store)
    if row is None or row.fingerprint != fingerprint or as_utc(row.now_at) > now:
        touched, considered, counts = rebuild(store, config, now, excluded, mined)
        rebuilt = True
    else:
        previous = as_utc(row.now_at)
        old_marks = dict(row.marks or {})
        with store.engine.connect() as conn:
            seeds = _changed(conn, config, previous, now, old_marks)
        seeds |= set(row.excluded or []) ^ excluded
        sessions = _widen(store, exp_id, seeds)
        changed, delta = recompute(store, config, sorted(sessions), now, excluded, mined)
        considered = int(old_marks.get("considered", 0)) + changed
        counts = merge_counts(dict(old_marks.get("counts") or {}), delta)
        rebuilt, touched = False, len(sessions)
    counts = merge_counts(counts, _mark_mined(store, config, mined))
    with store.engine.begin() as conn:
        conn.execute(st.delete().where(st.c.experiment_id == exp_id))
        conn.execute(
            st.insert().values(
                experiment_id=exp_id,
                fingerprint=fingerprint,
                now_at=now,
                marks={**marks, "considered": considered, "counts": counts},
                excluded=sorted(excluded),
                updated_at=now,
            )
        )
    result = Refresh(touched, rebuilt, time.perf_counter() - started)
    log.info("few-shot state: %s", result.as_dict())
    return result


def mining_counts(store: Store, config: Config) -> MiningCounts:
    """Considered and qualifying turns, reasons, and the unmined ones outside the lengths
    (kept as sums by :func:`refresh_state`)."""
    st = schema.fewshot_state
    with store.engine.connect() as conn:
        marks = conn.execute(
            sa.select(st.c.marks).where(st.c.experiment_id == config.experiment.id)
        ).scalar()
    counts: dict[str, list[int]] = dict((marks or {}).get("counts") or {})
    reasons: dict[str, int] = {}
    for why, (n, _, _) in counts.items():
        for r in why.split(","):
            reasons[r] = reasons.get(r, 0) + int(n)
    return MiningCounts(
        considered=int((marks or {}).get("considered", 0)),
        qualifying=sum(int(c[0]) for c in counts.values()),
        reasons={r: n for r, n in reasons.items() if n},
        too_short=sum(int(c[1]) for c in counts.values()),
        too_long=sum(int(c[2]) for c in counts.values()),
    )


def ranked_candidates(
    store: Store, config: Config, *, size: int, unmined: bool = True
) -> Iterator[pd.DataFrame]:
    """Qualifying turns best first, ``size`` at a time, as mining reads them.

    With ``unmined`` only turns not in the bank and within ``[min_chars, max_chars]``
    (before scrubbing). Keyset pages: turns banked meanwhile do not shift the pages.
    """
    exp_id, fs = config.experiment.id, config.fewshot
    ft = schema.fewshot_turns
    keys = (ft.c.rank_reward, ft.c.reward_so_far, ft.c.created_at, ft.c.turn_id)
    query = sa.select(
        ft.c.turn_id,
        ft.c.session_id,
        ft.c.arm_id,
        ft.c.prompt_id,
        ft.c.reasons,
        ft.c.reward,
        ft.c.complete,
        ft.c.reward_so_far,
        ft.c.created_at,
    ).where(ft.c.experiment_id == exp_id)
    if unmined:
        query = query.where(
            ~ft.c.mined, ft.c.shortest >= fs.min_chars, ft.c.longest <= fs.max_chars
        )
    query = query.order_by(*(k.desc() for k in keys)).limit(size)
    last: tuple[Any, ...] | None = None
    while True:
        page = query if last is None else query.where(sa.tuple_(*keys) < sa.tuple_(*last))
        with store.engine.connect() as conn:
            rows = conn.execute(page).all()
        if not rows:
            return
        frame = pd.DataFrame(
            rows,
            columns=[
                "id",
                "session_id",
                "arm_id",
                "prompt_id",
                "reasons",
                "reward",
                "complete",
                "reward_so_far",
                "created_at",
            ],
        )
        frame["reasons"] = frame["reasons"].str.split(",")
        frame["reward_so_far"] = frame["reward_so_far"].where(frame["reward_so_far"] > LOWEST)
        frame["reward"] = frame["reward"].astype(float)
        frame["created_at"] = pd.to_datetime(frame["created_at"], utc=True)
        yield frame
        r = rows[-1]
        last = (
            r.reward if r.reward is not None else LOWEST,
            r.reward_so_far,
            r.created_at,
            r.turn_id,
        )
        if len(rows) < size:
            return


def credit_sums(store: Store, config: Config) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(arms, examples)``: n, s, q of complete sessions per arm and per (example, arm)."""
    fc = schema.fewshot_credit
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(fc.c.example_id, fc.c.arm_id, fc.c.n, fc.c.s, fc.c.q).where(
                fc.c.experiment_id == config.experiment.id, fc.c.n > 0
            )
        ).all()
    frame = pd.DataFrame(rows, columns=["example_id", "arm_id", "n", "s", "q"])
    arms = frame[frame["example_id"] == ""].set_index("arm_id")[["n", "s", "q"]]
    return arms, frame[frame["example_id"] != ""].reset_index(drop=True)


# -- what changed ---------------------------------------------------------------------------


def _fingerprint(config: Config) -> str:
    fs = config.fewshot
    settings = {
        "version": STATE_VERSION,
        "terms": [t.model_dump(mode="json") for t in config.kpi.terms],
        "prices": {m: p.model_dump(mode="json") for m, p in config.model.prices.items()},
        "mining": [
            fs.min_reward,
            fs.thumbs_up,
            list(fs.outcomes),
            fs.resolved_outcome,
            fs.support_minutes_outcome,
            fs.max_support_minutes,
            fs.min_chars,
            fs.max_chars,
        ],
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _marks(conn: sa.Connection) -> dict[str, int]:
    """Newest id of each append-only table whose rows change a session."""
    tables = {name: schema.metadata.tables[name] for name in _MARKED}
    return {
        name: int(conn.execute(sa.select(sa.func.max(t.c.id))).scalar() or 0)
        for name, t in tables.items()
    }


def _outcome_names(config: Config) -> list[str]:
    fs = config.fewshot
    kpi_names = {
        t.source.split(":", 1)[1] for t in config.kpi.terms if t.source.startswith("outcome:")
    }
    return sorted(kpi_names | {*fs.outcomes, fs.resolved_outcome, fs.support_minutes_outcome})


def _changed(
    conn: sa.Connection,
    config: Config,
    previous: datetime,
    now: datetime,
    marks: dict[str, Any],
) -> set[str]:
    """Session ids (and ``user:<id>`` for user-level outcomes) whose inputs may have changed."""
    exp_id = config.experiment.id
    a, t, fe, fb, o = (
        schema.assignments,
        schema.turns,
        schema.feedback_events,
        schema.feedback,
        schema.outcomes,
    )

    sqlite = conn.dialect.name == "sqlite"
    overlap = 0 if sqlite else ID_OVERLAP
    lag = timedelta(seconds=min(SQLITE_TURN_LAG_S, TURN_LAG_S) if sqlite else TURN_LAG_S)

    def since(name: str) -> int:
        return max(int(marks.get(name, 0)) - overlap, 0)

    # The turns stamped since the last run, through the ``created_at`` index: the
    # experiment is checked here (with it in SQL, SQLite picks an index led by
    # ``experiment_id`` and reads every turn of the experiment: 200 ms at 10M sessions).
    out: set[str] = {
        str(sid)
        for sid, exp in fetch_tuples(
            conn,
            sa.select(t.c.session_id, t.c.experiment_id).where(
                t.c.created_at > previous - lag, t.c.created_at <= now
            ),
        )
        if exp == exp_id
    }
    queries: list[sa.Select[Any]] = [
        sa.select(fe.c.session_id).where(fe.c.id > since("feedback_events")),
        sa.select(fb.c.session_id).where(fb.c.updated_at > previous, fb.c.updated_at <= now),
        sa.select(a.c.session_id).where(
            a.c.experiment_id == exp_id,
            sa.or_(
                a.c.id > since("assignments"),
                sa.and_(a.c.assigned_at > previous, a.c.assigned_at <= now),
            ),
        ),
    ]
    windows = sorted({t.window_days for t in config.kpi.terms if t.window_days > 0})
    for days in windows:  # sessions whose window closed since the last run
        w = timedelta(days=days)
        queries.append(
            sa.select(a.c.session_id).where(
                a.c.experiment_id == exp_id,
                a.c.assigned_at > previous - w,
                a.c.assigned_at <= now - w,
            )
        )
    for query in queries:
        out.update(str(r[0]) for r in fetch_tuples(conn, query))
    names = _outcome_names(config)
    outcome_rows = fetch_tuples(
        conn,
        sa.select(o.c.session_id, o.c.user_id).where(
            sa.or_(
                o.c.id > since("outcomes"),
                sa.and_(o.c.name.in_(names), o.c.occurred_at > previous, o.c.occurred_at <= now),
            )
        ),
    )
    for session_id, user_id in outcome_rows:
        out.add(str(session_id) if session_id is not None else f"user:{user_id}")
    return out


def _widen(store: Store, exp_id: str, seeds: Iterable[str]) -> set[str]:
    """``seeds`` with every session of their users and conversations in the experiment."""
    a = schema.assignments
    sessions = {s for s in seeds if not s.startswith("user:")}
    users = {s[5:] for s in seeds if s.startswith("user:")}
    threads: set[str] = set(sessions)
    with store.engine.connect() as conn:
        ids = sorted(sessions)
        for i in range(0, len(ids), _CHUNK):
            for user, thread in fetch_tuples(
                conn,
                sa.select(a.c.user_id, sa.func.coalesce(a.c.thread_id, a.c.session_id)).where(
                    a.c.session_id.in_(ids[i : i + _CHUNK])
                ),
            ):
                users.add(str(user))
                threads.add(str(thread))
        keys = sorted(users)
        for i in range(0, len(keys), _CHUNK):
            sessions.update(
                str(r[0])
                for r in fetch_tuples(
                    conn,
                    sa.select(a.c.session_id).where(
                        a.c.user_id.in_(keys[i : i + _CHUNK]), a.c.experiment_id == exp_id
                    ),
                )
            )
        # Moved conversations are rare: read them all through the ``thread_id`` index (an
        # ``IN`` list of thread ids made SQLite scan the table, its statistics rating an
        # index of NULLs poorly: 1 s a query at 10M sessions) and keep the ones touched.
        sessions.update(
            str(sid)
            for sid, thread, exp in fetch_tuples(
                conn,
                sa.select(a.c.session_id, a.c.thread_id, a.c.experiment_id).where(
                    a.c.thread_id >= ""
                ),
            )
            if thread in threads and exp == exp_id
        )
    return sessions


def _mined_turns(store: Store) -> set[str]:
    ex = schema.examples
    with store.engine.connect() as conn:
        return {
            str(r[0])
            for r in conn.execute(sa.select(ex.c.turn_id).where(ex.c.turn_id.is_not(None)))
        }


def _mark_mined(store: Store, config: Config, mined: set[str]) -> dict[str, list[int]]:
    """Flag the kept turns the bank holds (mined by this step, the CLI or another run);
    returns the change in :func:`~optimizer.fewshot.state_rows.turn_counts`."""
    ft = schema.fewshot_turns
    exp_id = config.experiment.id
    ids = sorted(mined)
    with store.engine.begin() as conn:
        before = turn_counts(conn, config, ft.c.turn_id, ids)
        for i in range(0, len(ids), _CHUNK):
            conn.execute(
                ft.update()
                .where(
                    ft.c.experiment_id == exp_id,
                    ft.c.turn_id.in_(ids[i : i + _CHUNK]),
                    ~ft.c.mined,
                )
                .values(mined=True)
            )
        after = turn_counts(conn, config, ft.c.turn_id, ids)
    return merge_counts(after, before, sign=-1)
