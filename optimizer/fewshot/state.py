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
or no state at all rebuild everything once (as slow as the full path).
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from optimizer import kpi
from optimizer.clock import as_utc
from optimizer.config import Config
from optimizer.cost import COST_COLUMN, turn_cost
from optimizer.fewshot.signals import (
    RANK_COLUMNS,
    flag_turns,
    outcome_signals,
    reward_so_far,
)
from optimizer.locks import job_lock
from optimizer.store import Store, schema
from optimizer.store.store import fetch_tuples

__all__ = [
    "ID_OVERLAP",
    "SQLITE_TURN_LAG_S",
    "STATE_VERSION",
    "SUPPORT_BIN",
    "TURN_LAG_S",
    "MiningCounts",
    "Refresh",
    "bin_value",
    "credit_sums",
    "mining_counts",
    "ranked_candidates",
    "refresh_state",
    "session_figures",
    "support_bin",
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
#: Stands for "no reward" in the ranking keys (NaN sorts differently per database).
LOWEST = -sys.float_info.max
_CHUNK = 500
_INSERT_ROWS = 20_000
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
        count = _rebuild(store, config, now, excluded, mined)
        considered = count[1]
        rebuilt, touched = True, count[0]
    else:
        previous = as_utc(row.now_at)
        old_marks = dict(row.marks or {})
        with store.engine.connect() as conn:
            seeds = _changed(conn, config, previous, now, old_marks)
        seeds |= set(row.excluded or []) ^ excluded
        sessions = _widen(store, exp_id, seeds)
        considered = int(old_marks.get("considered", 0))
        considered += _recompute(store, config, sorted(sessions), now, excluded, mined)
        rebuilt, touched = False, len(sessions)
    _mark_mined(store, exp_id, mined)
    with store.engine.begin() as conn:
        conn.execute(st.delete().where(st.c.experiment_id == exp_id))
        conn.execute(
            st.insert().values(
                experiment_id=exp_id,
                fingerprint=fingerprint,
                now_at=now,
                marks={**marks, "considered": considered},
                excluded=sorted(excluded),
                updated_at=now,
            )
        )
    result = Refresh(touched, rebuilt, time.perf_counter() - started)
    log.info("few-shot state: %s", result.as_dict())
    return result


def mining_counts(store: Store, config: Config) -> MiningCounts:
    """Considered and qualifying turns, reasons, and the unmined ones outside the lengths."""
    exp_id, fs = config.experiment.id, config.fewshot
    ft, st = schema.fewshot_turns, schema.fewshot_state
    with store.engine.connect() as conn:
        marks = conn.execute(sa.select(st.c.marks).where(st.c.experiment_id == exp_id)).scalar()
        rows = conn.execute(
            sa.select(
                ft.c.reasons,
                sa.func.count(),
                sa.func.sum(
                    sa.case((sa.and_(~ft.c.mined, ft.c.shortest < fs.min_chars), 1), else_=0)
                ),
                sa.func.sum(
                    sa.case((sa.and_(~ft.c.mined, ft.c.longest > fs.max_chars), 1), else_=0)
                ),
            )
            .where(ft.c.experiment_id == exp_id)
            .group_by(ft.c.reasons)
        ).all()
    reasons: dict[str, int] = {}
    for why, n, _, _ in rows:
        for r in why.split(","):
            reasons[r] = reasons.get(r, 0) + int(n)
    return MiningCounts(
        considered=int((marks or {}).get("considered", 0)),
        qualifying=sum(int(r[1]) for r in rows),
        reasons=reasons,
        too_short=sum(int(r[2] or 0) for r in rows),
        too_long=sum(int(r[3] or 0) for r in rows),
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

    out: set[str] = set()
    queries: list[sa.Select[Any]] = [
        sa.select(t.c.session_id).where(
            t.c.created_at > previous - lag,
            t.c.created_at <= now,
            t.c.experiment_id == exp_id,
        ),
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
        for column, values in ((a.c.user_id, users), (a.c.thread_id, threads)):
            keys = sorted(values)
            for i in range(0, len(keys), _CHUNK):
                sessions.update(
                    str(r[0])
                    for r in fetch_tuples(
                        conn,
                        sa.select(a.c.session_id).where(
                            column.in_(keys[i : i + _CHUNK]), a.c.experiment_id == exp_id
                        ),
                    )
                )
    return sessions


def _mined_turns(store: Store) -> set[str]:
    ex = schema.examples
    with store.engine.connect() as conn:
        return {
            str(r[0])
            for r in conn.execute(sa.select(ex.c.turn_id).where(ex.c.turn_id.is_not(None)))
        }


def _mark_mined(store: Store, exp_id: str, mined: set[str]) -> None:
    """Flag the kept turns the bank holds (mined by this step, the CLI or another run)."""
    ft = schema.fewshot_turns
    ids = sorted(mined)
    with store.engine.begin() as conn:
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


# -- recomputing sessions -------------------------------------------------------------------


def _in_chunks(
    conn: sa.Connection,
    query: sa.Select[Any],
    column: Any,
    keys: Sequence[str],
    *,
    raw: bool = True,
) -> list[Any]:
    rows: list[Any] = []
    for i in range(0, len(keys), _CHUNK):
        page = query.where(column.in_(list(keys[i : i + _CHUNK])))
        rows.extend(fetch_tuples(conn, page) if raw else conn.execute(page).all())
    return rows


def _session_rows(
    conn: sa.Connection, config: Config, session_ids: Sequence[str], now: datetime
) -> pd.DataFrame:
    """The sessions' rewards as :func:`optimizer.kpi.session_frame` computes them.

    ``session_ids`` must hold every session of their users and conversations (see
    :func:`_widen`): user-level outcomes and moved conversations are attributed among them.
    """
    a, t, fb, o = schema.assignments, schema.turns, schema.feedback, schema.outcomes
    epoch = kpi._epoch_function(conn)
    exp_id = config.experiment.id
    rows = _in_chunks(
        conn,
        sa.select(
            a.c.session_id,
            a.c.user_id,
            a.c.arm_id,
            epoch(a.c.assigned_at),
            sa.func.coalesce(a.c.thread_id, a.c.session_id),
            a.c.segment,
        ).where(a.c.experiment_id == exp_id, a.c.assigned_at <= now),
        a.c.session_id,
        session_ids,
    )
    columns = ["session_id", "user_id", "arm_id", "assigned_s", "thread", "segment"]
    frame = pd.DataFrame(rows, columns=columns)
    if frame.empty:
        return pd.DataFrame(columns=["arm_id", "reward", "complete", "reward_so_far"]).rename_axis(
            "session_id"
        )
    frame["assigned_s"] = frame["assigned_s"].astype(float)
    frame = frame.sort_values("assigned_s", kind="stable").reset_index(drop=True)
    ids = frame["session_id"].tolist()
    counts = pd.DataFrame(
        _in_chunks(
            conn,
            sa.select(
                t.c.session_id,
                sa.func.count(),
                sa.func.sum(sa.case((t.c.error.is_not(None), 1), else_=0)),
            )
            .where(t.c.created_at <= now)
            .group_by(t.c.session_id),
            t.c.session_id,
            ids,
        ),
        columns=["session_id", "turns", "errors"],
    ).set_index("session_id")
    votes = pd.DataFrame(
        _in_chunks(
            conn,
            sa.select(
                fb.c.session_id,
                sa.func.count(),
                sa.func.sum(sa.case((fb.c.value == 1, 1), else_=0)),
                sa.func.sum(sa.case((fb.c.value == 0, 1), else_=0)),
            )
            .where(fb.c.value.is_not(None), fb.c.updated_at <= now)
            .group_by(fb.c.session_id),
            fb.c.session_id,
            ids,
        ),
        columns=["session_id", "rated", "thumbs_up", "thumbs_down"],
    ).set_index("session_id")
    for table in (counts, votes):
        for name in table.columns:
            frame[name] = frame["session_id"].map(table[name]).fillna(0).to_numpy(dtype=np.int64)
    if True:  # the report shows every arm's cost, whether or not the KPI uses it
        cost_rows = _in_chunks(
            conn,
            sa.select(
                t.c.session_id, t.c.model, t.c.cost, t.c.prompt_tokens, t.c.completion_tokens
            ).where(t.c.created_at <= now, t.c.experiment_id == exp_id),
            t.c.session_id,
            ids,
        )
        cost = pd.Series(
            [turn_cost(m, c, p, q, config.model.prices) for _, m, c, p, q in cost_rows],
            index=[r[0] for r in cost_rows],
            dtype=float,
        )
        frame[COST_COLUMN] = frame["session_id"].map(cost.groupby(level=0).sum()).fillna(0.0)
    names = sorted(
        {t.source.split(":", 1)[1] for t in config.kpi.terms if t.source.startswith("outcome:")}
    )
    columns = ["session_id", "user_id", "name", "value", "occurred_s"]
    outcome_query = sa.select(
        o.c.session_id, o.c.user_id, o.c.name, o.c.value, epoch(o.c.occurred_at)
    ).where(o.c.name.in_(names), o.c.occurred_at <= now)
    found = _in_chunks(conn, outcome_query, o.c.session_id, ids) if names else []
    users = sorted(set(frame["user_id"].astype(str)))
    if names:
        found += _in_chunks(conn, outcome_query.where(o.c.session_id.is_(None)), o.c.user_id, users)
    outcomes = pd.DataFrame(found, columns=columns).astype({"value": float, "occurred_s": float})
    events = kpi._attribute(outcomes, frame, pd.Index(frame["session_id"]))

    now_s = now.timestamp()
    age_s = now_s - frame["assigned_s"].to_numpy()
    reward = np.zeros(len(frame))
    so_far = np.zeros(len(frame))
    complete = np.ones(len(frame), dtype=bool)
    by_source: dict[str, np.ndarray] = {}
    for term in config.kpi.terms:
        window_s = term.window_days * 86_400.0
        closed = age_s >= window_s
        observed = kpi._term_values(term, frame, events, age_s, closed, window_s)[0]
        if term.cap is not None:
            observed = np.minimum(observed, term.cap)
        reward += term.weight * np.where(closed, observed, 0.0)
        so_far += term.weight * np.nan_to_num(observed, nan=0.0)
        complete &= closed
        by_source[term.source] = np.where(closed, observed, np.nan)
    frame["reward"] = np.where(complete, reward, np.nan)
    frame["complete"] = complete
    out = pd.DataFrame(
        {
            "arm_id": frame["arm_id"].to_numpy(),
            "reward": frame["reward"].to_numpy(),
            "complete": complete,
            "reward_so_far": so_far,
        },
        index=pd.Index(frame["session_id"], name="session_id"),
    )
    out["figures"] = session_figures(
        frame,
        conversion=by_source.get("outcome:conversion"),
        support=by_source.get("outcome:support_minutes"),
    )
    return out


def session_figures(
    frame: pd.DataFrame, *, conversion: np.ndarray | None, support: np.ndarray | None
) -> list[dict[str, Any]]:
    """What each session of a KPI frame adds to the report's buckets (:mod:`optimizer.report`).

    ``frame``: one row per session in assignment-time order (``assigned_s``,
    ``user_id``, ``arm_id``, ``segment``, the count columns, ``cost_usd``, ``reward``,
    ``complete``); ``conversion`` / ``support``: the closed values of the
    ``outcome:conversion`` / ``outcome:support_minutes`` terms (NaN while open).
    """
    n = len(frame)
    stamps = pd.to_datetime(frame["assigned_s"].to_numpy(dtype=float), unit="s", utc=True)
    days = stamps.strftime("%Y-%m-%d")
    hours = stamps.strftime("%Y-%m-%dT%H")
    conv = conversion if conversion is not None else np.full(n, np.nan)
    sup = support if support is not None else np.full(n, np.nan)
    reward = frame["reward"].to_numpy(dtype=float)
    values = {
        "sessions": np.ones(n),
        "complete": frame["complete"].to_numpy(dtype=float),
        "reward": np.nan_to_num(reward, nan=0.0),
        "conversion_known": (~np.isnan(conv)).astype(float),
        "conversions": (np.nan_to_num(conv, nan=0.0) > 0).astype(float),
        **{c: frame[c].to_numpy(dtype=float) for c in schema.SESSION_COUNTS},
        "cost": frame[COST_COLUMN].to_numpy(dtype=float) if COST_COLUMN in frame else np.zeros(n),
        # the user's first session of the frame (rows are in time order)
        "users": (~frame["user_id"].duplicated()).to_numpy(dtype=float),
    }
    columns = list(schema.REPORT_FIGURES)
    table = np.column_stack([values[c] for c in columns]).tolist()
    arms, segments = frame["arm_id"].tolist(), frame["segment"].tolist()
    return [
        {
            "d": days[i],
            "h": hours[i],
            "arm": arms[i],
            "seg": segments[i],
            "v": table[i],
            "sup": None if np.isnan(sup[i]) else float(sup[i]),
        }
        for i in range(n)
    ]


def _turn_rows(
    conn: sa.Connection, exp_id: str, session_ids: Sequence[str], now: datetime
) -> pd.DataFrame:
    """The sessions' turns up to ``now``: ranking columns, text lengths and examples shown."""
    t = schema.turns
    rows = _in_chunks(
        conn,
        sa.select(
            *(t.c[c] for c in RANK_COLUMNS),
            sa.func.length(t.c.user_message),
            sa.func.length(t.c.reply),
            t.c.fewshot_ids,
        ).where(t.c.experiment_id == exp_id, t.c.created_at <= now),
        t.c.session_id,
        session_ids,
        raw=False,
    )
    frame = pd.DataFrame(rows, columns=[*RANK_COLUMNS, "u_len", "r_len", "fewshot_ids"])
    frame["created_at"] = pd.to_datetime(frame["created_at"], utc=True)
    frame["shortest"] = np.minimum(frame["u_len"], frame["r_len"]).astype(np.int64)
    frame["longest"] = np.maximum(frame["u_len"], frame["r_len"]).astype(np.int64)
    return frame


def _votes(
    conn: sa.Connection, session_ids: Sequence[str], now: datetime
) -> tuple[set[str], set[str]]:
    fb = schema.feedback
    rows = _in_chunks(
        conn,
        sa.select(fb.c.turn_id, fb.c.value).where(fb.c.value.is_not(None), fb.c.updated_at <= now),
        fb.c.session_id,
        session_ids,
    )
    return {r[0] for r in rows if r[1] == 1}, {r[0] for r in rows if r[1] == 0}


def _recompute(
    store: Store,
    config: Config,
    session_ids: Sequence[str],
    now: datetime,
    excluded: set[str],
    mined: set[str],
) -> int:
    """Rewrite the state of ``session_ids``; returns the change in turns considered."""
    if not session_ids:
        return 0
    exp_id = config.experiment.id
    with store.engine.connect() as conn:
        sessions = _session_rows(conn, config, session_ids, now)
        sessions = outcome_signals(conn, config, sessions, now, only=True)
        turns = _turn_rows(conn, exp_id, session_ids, now)
        up, down = _votes(conn, session_ids, now)
    return _write(store, config, session_ids, sessions, turns, up, down, excluded, mined)


def _rebuild(
    store: Store, config: Config, now: datetime, excluded: set[str], mined: set[str]
) -> tuple[int, int]:
    """Everything from scratch (the full path's reads, once); (sessions, turns considered)."""
    exp_id = config.experiment.id
    frame = kpi.session_frame(store, config, now=now, with_cost=True)
    sessions = frame.set_index("session_id")[["arm_id", "reward", "complete"]].copy()
    sessions["reward_so_far"] = reward_so_far(frame)
    columns = {t["source"]: t["column"] for t in frame.attrs.get("kpi_terms", [])}
    assigned_s = frame["assigned_at"].astype("int64").to_numpy() / 1e9 if len(frame) else []
    sessions["figures"] = session_figures(
        frame.assign(assigned_s=assigned_s),
        conversion=frame[columns["outcome:conversion"]].to_numpy(dtype=float)
        if "outcome:conversion" in columns
        else None,
        support=frame[columns["outcome:support_minutes"]].to_numpy(dtype=float)
        if "outcome:support_minutes" in columns
        else None,
    )
    t, fb = schema.turns, schema.feedback
    with store.engine.connect() as conn:
        sessions = outcome_signals(conn, config, sessions, now)
        rows = fetch_tuples(
            conn,
            sa.select(
                *(t.c[c] for c in RANK_COLUMNS),
                sa.func.length(t.c.user_message),
                sa.func.length(t.c.reply),
            ).where(t.c.experiment_id == exp_id, t.c.created_at <= now),
        )
        shown = conn.execute(
            sa.select(t.c.id, t.c.fewshot_ids).where(
                t.c.experiment_id == exp_id,
                t.c.created_at <= now,
                sa.cast(t.c.fewshot_ids, sa.Text) != "[]",
            )
        ).all()
        votes = fetch_tuples(
            conn,
            sa.select(fb.c.turn_id, fb.c.value).where(
                fb.c.value.is_not(None), fb.c.updated_at <= now
            ),
        )
    turns = pd.DataFrame(rows, columns=[*RANK_COLUMNS, "u_len", "r_len"])
    turns["created_at"] = pd.to_datetime(turns["created_at"], utc=True)
    turns["shortest"] = np.minimum(turns["u_len"], turns["r_len"]).astype(np.int64)
    turns["longest"] = np.maximum(turns["u_len"], turns["r_len"]).astype(np.int64)
    ids_shown = dict(shown)
    turns["fewshot_ids"] = [ids_shown.get(i) for i in turns["id"].tolist()]
    up = {r[0] for r in votes if r[1] == 1}
    down = {r[0] for r in votes if r[1] == 0}
    ft, fs_, fc = schema.fewshot_turns, schema.fewshot_sessions, schema.fewshot_credit
    with store.engine.begin() as conn:
        for table in (ft, fs_, fc, schema.report_buckets, schema.report_support):
            conn.execute(table.delete().where(table.c.experiment_id == exp_id))
    all_ids = sorted(set(sessions.index.astype(str)) | set(turns["session_id"].astype(str)))
    considered = _write(
        store, config, all_ids, sessions, turns, up, down, excluded, mined, fresh=True
    )
    return len(all_ids), considered


def _write(
    store: Store,
    config: Config,
    session_ids: Sequence[str],
    sessions: pd.DataFrame,
    turns: pd.DataFrame,
    up: set[str],
    down: set[str],
    excluded: set[str],
    mined: set[str],
    *,
    fresh: bool = False,
) -> int:
    """Replace the state of ``session_ids`` by what ``sessions`` and ``turns`` say."""
    exp_id = config.experiment.id
    kept = turns[~turns["session_id"].isin(excluded)] if excluded else turns
    per_session_turns = kept.groupby("session_id").size()
    # Mining: the qualifying turns of sessions that may become data.
    flagged = flag_turns(
        kept.join(sessions.drop(columns=["arm_id"]), on="session_id"),
        up=up,
        down=down,
        config=config,
    )
    qualifying = flagged[flagged["reasons"].map(bool).astype(bool)]
    reward = qualifying["reward"].astype(float)
    so_far = qualifying["reward_so_far"].astype(float)
    turn_rows = pd.DataFrame(
        {
            "experiment_id": exp_id,
            "turn_id": qualifying["id"].astype(str),
            "session_id": qualifying["session_id"].astype(str),
            "arm_id": qualifying["arm_id"].astype(str),
            "prompt_id": qualifying["prompt_id"].astype(str),
            "reasons": [",".join(r) for r in qualifying["reasons"]],
            "reward": reward.astype(object).where(reward.notna(), None),
            "complete": qualifying["complete"].astype(bool),
            "reward_so_far": so_far.fillna(LOWEST),
            "rank_reward": reward.fillna(LOWEST),
            "created_at": qualifying["created_at"].dt.to_pydatetime(),
            "shortest": qualifying["shortest"].astype(int),
            "longest": qualifying["longest"].astype(int),
            "mined": qualifying["id"].isin(mined),
        }
    )
    # Credit: every session of the frame; the examples any of its turns showed.
    has_ids = turns["fewshot_ids"].map(bool).astype(bool) if len(turns) else turns["id"].isna()
    shown = (
        turns.loc[has_ids, ["session_id", "fewshot_ids"]]
        .explode("fewshot_ids")
        .dropna()
        .drop_duplicates()
        .groupby("session_id")["fewshot_ids"]
        .agg(lambda ids: sorted(map(str, ids)))
    )
    index = pd.Index(session_ids, name="session_id")
    in_frame = index.isin(sessions.index)
    n_turns = per_session_turns.reindex(index).fillna(0).astype(int)
    first_arm = turns.groupby("session_id")["arm_id"].first()
    arm = sessions["arm_id"].reindex(index).where(in_frame, first_arm.reindex(index))
    new = pd.DataFrame(
        {
            "arm_id": arm,
            "turns": n_turns,
            "reward": sessions["reward"].reindex(index).astype(float),
            "examples": shown.reindex(index),
            "figures": sessions["figures"].reindex(index)
            if "figures" in sessions
            else pd.Series(None, index=index, dtype=object),
        },
        index=index,
    )
    # kept: sessions of the frame, and turns without an assignment (considered, never credited)
    new = new[in_frame | (n_turns > 0).to_numpy()]
    new["examples"] = [ex if isinstance(ex, list) else [] for ex in new["examples"]]
    ft, fs_ = schema.fewshot_turns, schema.fewshot_sessions
    with store.engine.begin() as conn:
        old = pd.DataFrame(columns=["arm_id", "turns", "reward", "examples", "figures"])
        if not fresh:
            old = pd.DataFrame(
                _in_chunks(
                    conn,
                    sa.select(
                        fs_.c.session_id,
                        fs_.c.arm_id,
                        fs_.c.turns,
                        fs_.c.reward,
                        fs_.c.examples,
                        fs_.c.figures,
                    ).where(fs_.c.experiment_id == exp_id),
                    fs_.c.session_id,
                    session_ids,
                    raw=False,
                ),
                columns=["session_id", "arm_id", "turns", "reward", "examples", "figures"],
            ).set_index("session_id")
            for i in range(0, len(session_ids), _CHUNK):
                part = list(session_ids[i : i + _CHUNK])
                for table in (ft, fs_):
                    conn.execute(
                        table.delete().where(
                            table.c.experiment_id == exp_id, table.c.session_id.in_(part)
                        )
                    )
        if len(turn_rows):
            for i in range(0, len(turn_rows), _INSERT_ROWS):  # bounded memory on a rebuild
                conn.execute(ft.insert(), turn_rows.iloc[i : i + _INSERT_ROWS].to_dict("records"))
        if len(new):
            rows = new.reset_index().assign(experiment_id=exp_id)
            rows["reward"] = rows["reward"].astype(object).where(rows["reward"].notna(), None)
            for i in range(0, len(rows), _INSERT_ROWS):
                conn.execute(fs_.insert(), rows.iloc[i : i + _INSERT_ROWS].to_dict("records"))
        parts = [d for d in (_credit_delta(old, -1), _credit_delta(new, 1)) if len(d)]
        if parts:
            _apply_credit(conn, exp_id, pd.concat(parts))
        _apply_buckets(conn, exp_id, old["figures"].tolist(), new["figures"].tolist(), fresh=fresh)
    return int(new["turns"].sum()) - int(old["turns"].sum() if len(old) else 0)


def _credit_delta(states: pd.DataFrame, sign: int) -> pd.DataFrame:
    """n, s, q per (example, arm) — example "" for the arm — of the complete sessions."""
    done = states[states["reward"].notna()] if len(states) else states
    if not len(done):
        return pd.DataFrame(columns=["n", "s", "q"])
    r = done["reward"].astype(float)
    base = pd.DataFrame({"example_id": "", "arm_id": done["arm_id"], "r": r})
    used = pd.DataFrame({"example_id": done["examples"], "arm_id": done["arm_id"], "r": r}).explode(
        "example_id"
    )
    rows = pd.concat([base, used.dropna(subset=["example_id"])], ignore_index=True)
    rows["q"] = rows["r"] ** 2
    out = rows.groupby(["example_id", "arm_id"]).agg(
        n=("r", "size"), s=("r", "sum"), q=("q", "sum")
    )
    return out * sign


def _apply_credit(conn: sa.Connection, exp_id: str, delta: pd.DataFrame) -> None:
    """Add ``delta`` (n, s, q by example and arm) to the kept credit sums."""
    delta = delta.groupby(level=[0, 1]).sum()
    changed = {
        (str(e), str(a)): (float(n), float(s), float(q))
        for (e, a), n, s, q in zip(delta.index, delta["n"], delta["s"], delta["q"], strict=True)
        if n or s or q
    }
    if not changed:
        return
    fc = schema.fewshot_credit
    current = {
        (e, a): (n, s, q)
        for e, a, n, s, q in conn.execute(
            sa.select(fc.c.example_id, fc.c.arm_id, fc.c.n, fc.c.s, fc.c.q).where(
                fc.c.experiment_id == exp_id,
                fc.c.example_id.in_(sorted({e for e, _ in changed})),
            )
        )
    }
    for (example, arm), (dn, ds, dq) in changed.items():
        if (example, arm) in current:
            n, s, q = current[(example, arm)]
            if n + int(dn) == 0:  # nothing counted: no rounding left over either
                s, q, ds, dq = 0.0, 0.0, 0.0, 0.0
            conn.execute(
                fc.update()
                .where(
                    fc.c.experiment_id == exp_id,
                    fc.c.example_id == example,
                    fc.c.arm_id == arm,
                )
                .values(n=n + int(dn), s=s + ds, q=q + dq)
            )
        else:
            conn.execute(
                fc.insert().values(
                    experiment_id=exp_id, example_id=example, arm_id=arm, n=int(dn), s=ds, q=dq
                )
            )


#: Relative width of the support-minutes histogram's bins: medians within 0.1%.
SUPPORT_BIN = 0.002
_LOG_BIN = float(np.log1p(SUPPORT_BIN))


def support_bin(value: float) -> int:
    """Bin of a support-minutes value (order-preserving; 0 for zero)."""
    if value == 0:
        return 0
    k = int(np.clip(np.floor(np.log(abs(value)) / _LOG_BIN), -99_999, 99_999))
    return 200_000 + k if value > 0 else -200_000 - k


def bin_value(b: int) -> float:
    """The value a bin stands for (its geometric middle)."""
    if b == 0:
        return 0.0
    k = b - 200_000 if b > 0 else -200_000 - b
    v = float(np.exp((k + 0.5) * _LOG_BIN))
    return v if b > 0 else -v


def _apply_buckets(
    conn: sa.Connection,
    exp_id: str,
    old: list[Any],
    new: list[Any],
    *,
    fresh: bool,
) -> None:
    """Move the report's buckets and support histogram from ``old`` to ``new`` figures."""
    sums: dict[tuple[str, str, str, str], np.ndarray] = {}
    hist: dict[tuple[str, int], int] = {}
    width = len(schema.REPORT_FIGURES)
    for figures, sign in ((old, -1), (new, 1)):
        for f in figures:
            if not isinstance(f, dict):
                continue
            v = np.asarray(f["v"], dtype=float) * sign
            for kind in ("d", "h"):
                key = (kind, f[kind], f["arm"], f["seg"])
                total = sums.get(key)
                sums[key] = v.copy() if total is None else total + v
            if f.get("sup") is not None:
                hkey = (f["arm"], support_bin(f["sup"]))
                hist[hkey] = hist.get(hkey, 0) + sign
    rb, rs = schema.report_buckets, schema.report_support
    names = list(schema.REPORT_FIGURES)
    if fresh:
        if sums:
            conn.execute(
                rb.insert(),
                [
                    {
                        "experiment_id": exp_id,
                        "kind": k,
                        "bucket": b,
                        "arm_id": a,
                        "segment": g,
                        **dict(zip(names, v.tolist(), strict=True)),
                    }
                    for (k, b, a, g), v in sums.items()
                ],
            )
        if hist:
            conn.execute(
                rs.insert(),
                [
                    {"experiment_id": exp_id, "arm_id": a, "bin": b, "n": n}
                    for (a, b), n in hist.items()
                    if n
                ],
            )
        return
    changed = {key: v for key, v in sums.items() if np.any(v)}
    if changed:  # one read of the touched buckets, then one bulk update and one bulk insert
        buckets = sorted({b for _, b, _, _ in changed})
        current: dict[tuple[str, str, str, str], np.ndarray] = {}
        for i in range(0, len(buckets), _CHUNK):
            for row in conn.execute(
                sa.select(
                    rb.c.kind, rb.c.bucket, rb.c.arm_id, rb.c.segment, *(rb.c[n] for n in names)
                ).where(rb.c.experiment_id == exp_id, rb.c.bucket.in_(buckets[i : i + _CHUNK]))
            ):
                current[(row[0], row[1], row[2], row[3])] = np.asarray(row[4:], dtype=float)
        updates, inserts = [], []
        for key, v in changed.items():
            kind, bucket, arm, segment = key
            ident = {"x_kind": kind, "x_bucket": bucket, "x_arm": arm, "x_segment": segment}
            if key in current:
                total = current[key] + v
                if total[0] == 0:  # no session left: no rounding left over either
                    total = np.zeros(width)
                updates.append({**ident, **dict(zip(names, total.tolist(), strict=True))})
            else:
                inserts.append(
                    {
                        "experiment_id": exp_id,
                        "kind": kind,
                        "bucket": bucket,
                        "arm_id": arm,
                        "segment": segment,
                        **dict(zip(names, v.tolist(), strict=True)),
                    }
                )
        if updates:
            conn.execute(
                rb.update()
                .where(
                    rb.c.experiment_id == exp_id,
                    rb.c.kind == sa.bindparam("x_kind"),
                    rb.c.bucket == sa.bindparam("x_bucket"),
                    rb.c.arm_id == sa.bindparam("x_arm"),
                    rb.c.segment == sa.bindparam("x_segment"),
                )
                .values({n: sa.bindparam(n) for n in names}),
                updates,
            )
        if inserts:
            conn.execute(rb.insert(), inserts)
    bins = {key: dn for key, dn in hist.items() if dn}
    if bins:
        counts: dict[tuple[str, int], int] = {}
        arms = sorted({a for a, _ in bins})
        for arm, b, n in conn.execute(
            sa.select(rs.c.arm_id, rs.c.bin, rs.c.n).where(
                rs.c.experiment_id == exp_id,
                rs.c.arm_id.in_(arms),
                rs.c.bin.in_(sorted({b for _, b in bins})),
            )
        ):
            counts[(arm, int(b))] = int(n)
        ups = [
            {"x_arm": a, "x_bin": b, "n": counts[(a, b)] + dn}
            for (a, b), dn in bins.items()
            if (a, b) in counts
        ]
        ins = [
            {"experiment_id": exp_id, "arm_id": a, "bin": b, "n": dn}
            for (a, b), dn in bins.items()
            if (a, b) not in counts
        ]
        if ups:
            conn.execute(
                rs.update()
                .where(
                    rs.c.experiment_id == exp_id,
                    rs.c.arm_id == sa.bindparam("x_arm"),
                    rs.c.bin == sa.bindparam("x_bin"),
                )
                .values(n=sa.bindparam("n")),
                ups,
            )
        if ins:
            conn.execute(rs.insert(), ins)
