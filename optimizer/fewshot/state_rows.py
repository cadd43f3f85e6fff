"""Recomputing sessions for the kept state (:mod:`optimizer.fewshot.state`).

A session's rewards (:func:`optimizer.kpi.session_frame`'s arithmetic, on the session and
its user's and conversation's other sessions), its qualifying turns, the examples it showed
and its figures for the report; written over the session's previous state, with the
credit and report sums moved by the difference (:mod:`optimizer.fewshot.state_sums`).
"""

from __future__ import annotations

import sys
from collections.abc import Collection, Sequence
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
from optimizer.fewshot.state_sums import apply_buckets, apply_credit
from optimizer.store import Store, schema
from optimizer.store.store import fetch_tuples

__all__ = [
    "LOWEST",
    "REBUILD_CHUNK_DAYS",
    "in_chunks",
    "merge_counts",
    "rebuild",
    "recompute",
    "session_figures",
    "turn_counts",
]

#: Stands for "no reward" in the ranking keys (NaN sorts differently per database).
LOWEST = -sys.float_info.max
#: Days of assignments one step of a rebuild reads (:func:`rebuild`): its memory is one
#: such stretch's (~117k sessions at the benches' 16,667 a day), not the history's.
REBUILD_CHUNK_DAYS = 7.0
_CHUNK = 500
_INSERT_ROWS = 20_000


# -- recomputing sessions -------------------------------------------------------------------


def in_chunks(
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
    rows = in_chunks(
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
        in_chunks(
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
        in_chunks(
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
        cost_rows = in_chunks(
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
    found = in_chunks(conn, outcome_query, o.c.session_id, ids) if names else []
    users = sorted(set(frame["user_id"].astype(str)))
    if names:
        found += in_chunks(conn, outcome_query.where(o.c.session_id.is_(None)), o.c.user_id, users)
    outcomes = pd.DataFrame(found, columns=columns).astype({"value": float, "occurred_s": float})
    events = kpi._attribute(outcomes, frame, pd.Index(frame["session_id"]))

    now_s = now.timestamp()
    age_s = now_s - frame["assigned_s"].to_numpy()
    reward = np.zeros(len(frame))
    so_far = np.zeros(len(frame))
    complete = np.ones(len(frame), dtype=bool)
    by_source: dict[str, np.ndarray] = {}
    values, delays = kpi.observed_terms(config.kpi.terms, events, len(frame))
    for term in config.kpi.terms:
        window_s = term.window_days * 86_400.0
        closed = age_s >= window_s
        col = kpi.term_column(term.name)
        observed = kpi._term_values(
            term, frame, values.get(col), delays.get(col), age_s, closed, window_s
        )[0]
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
    frame: pd.DataFrame,
    *,
    conversion: np.ndarray | None,
    support: np.ndarray | None,
    earlier_users: Collection[str] = (),
) -> list[dict[str, Any]]:
    """What each session of a KPI frame adds to the report's buckets (:mod:`optimizer.report`).

    ``frame``: one row per session in assignment-time order (``assigned_s``,
    ``user_id``, ``arm_id``, ``segment``, the count columns, ``cost_usd``, ``reward``,
    ``complete``); ``conversion`` / ``support``: the closed values of the
    ``outcome:conversion`` / ``outcome:support_minutes`` terms (NaN while open);
    ``earlier_users``: users with a session before the frame (a stretch of history), whose
    first session is not in it.
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
        # the user's first session of the frame (rows are in time order), unless earlier
        "users": (
            ~frame["user_id"].duplicated() & ~frame["user_id"].isin(list(earlier_users))
        ).to_numpy(dtype=float),
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
    rows = in_chunks(
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
    rows = in_chunks(
        conn,
        sa.select(fb.c.turn_id, fb.c.value).where(fb.c.value.is_not(None), fb.c.updated_at <= now),
        fb.c.session_id,
        session_ids,
    )
    return {r[0] for r in rows if r[1] == 1}, {r[0] for r in rows if r[1] == 0}


def recompute(
    store: Store,
    config: Config,
    session_ids: Sequence[str],
    now: datetime,
    excluded: set[str],
    mined: set[str],
) -> tuple[int, dict[str, list[int]]]:
    """Rewrite the state of ``session_ids``; returns the change in turns considered and in
    :func:`turn_counts`."""
    if not session_ids:
        return 0, {}
    exp_id = config.experiment.id
    with store.engine.connect() as conn:
        sessions = _session_rows(conn, config, session_ids, now)
        sessions = outcome_signals(conn, config, sessions, now, only=True)
        turns = _turn_rows(conn, exp_id, session_ids, now)
        up, down = _votes(conn, session_ids, now)
    return _write(store, config, session_ids, sessions, turns, up, down, excluded, mined)


def rebuild(
    store: Store,
    config: Config,
    now: datetime,
    excluded: set[str],
    mined: set[str],
    *,
    chunk_days: float | None = None,
) -> tuple[int, int, dict[str, list[int]]]:
    """Everything from scratch (the full path's reads, once): (sessions, turns considered,
    :func:`turn_counts`).

    A stretch of ``chunk_days`` (default :data:`REBUILD_CHUNK_DAYS`) of assignments at a
    time, so that memory is one stretch's whatever the history; then the turns of sessions
    without an assignment. ``chunk_days=0`` reads the whole history at once.
    """
    exp_id = config.experiment.id
    days = REBUILD_CHUNK_DAYS if chunk_days is None else chunk_days
    a = schema.assignments
    with store.engine.begin() as conn:
        for table in (
            schema.fewshot_turns,
            schema.fewshot_sessions,
            schema.fewshot_credit,
            schema.report_buckets,
            schema.report_support,
        ):
            conn.execute(table.delete().where(table.c.experiment_id == exp_id))
        first = conn.execute(
            sa.select(sa.func.min(a.c.assigned_at)).where(
                a.c.experiment_id == exp_id, a.c.assigned_at <= now
            )
        ).scalar()
    stretches: list[tuple[datetime | None, datetime | None]] = [(None, None)]
    if days > 0 and first is not None:
        step = timedelta(days=days)
        lo = as_utc(first) - timedelta(seconds=1)  # the stretches are (after, until]
        stretches = []
        while lo < now:
            stretches.append((lo, min(lo + step, now)))
            lo += step
        stretches.append((None, now))  # turns of sessions with no assignment
    counts: dict[str, list[int]] = {}
    total, considered = 0, 0
    for after, until in stretches:
        n, c, k = _rebuild_stretch(store, config, now, excluded, mined, after, until)
        total, considered, counts = total + n, considered + c, merge_counts(counts, k)
    return total, considered, counts


def _rebuild_stretch(
    store: Store,
    config: Config,
    now: datetime,
    excluded: set[str],
    mined: set[str],
    after: datetime | None,
    until: datetime | None,
) -> tuple[int, int, dict[str, list[int]]]:
    """The state of the sessions assigned in ``(after, until]`` (both None: every session
    and turn; only ``until``: the turns of sessions with no assignment up to ``now``)."""
    exp_id = config.experiment.id
    a, t, fb = schema.assignments, schema.turns, schema.feedback
    whole = after is None and until is None
    ids: sa.Select[Any] | None = None  # the stretch's sessions (None: no restriction)
    if after is not None:
        ids = sa.select(a.c.session_id).where(
            a.c.experiment_id == exp_id, a.c.assigned_at > after, a.c.assigned_at <= until
        )
    if whole or after is not None:
        frame = kpi.session_frame(
            store,
            config,
            now=now,
            assigned_after=after,
            assigned_until=until,
            with_cost=True,
            probe_returning=False,  # who is returning is this module's own business
        )
    else:
        frame = pd.DataFrame(columns=["session_id", "arm_id", "reward", "complete"])
    sessions = frame.set_index("session_id")[["arm_id", "reward", "complete"]].copy()
    sessions["reward_so_far"] = reward_so_far(frame)
    earlier: set[str] = set()
    if after is not None and len(frame):  # users already counted in an earlier stretch
        b = a.alias("earlier")
        with store.engine.connect() as conn:
            earlier = {
                str(r[0])
                for r in fetch_tuples(
                    conn,
                    sa.select(b.c.user_id)
                    .where(
                        b.c.experiment_id == exp_id,
                        b.c.assigned_at <= after,
                        b.c.user_id.in_(
                            sa.select(a.c.user_id).where(
                                a.c.experiment_id == exp_id,
                                a.c.assigned_at > after,
                                a.c.assigned_at <= until,
                            )
                        ),
                    )
                    .distinct(),
                )
            }
    if len(frame):
        columns = {t["source"]: t["column"] for t in frame.attrs.get("kpi_terms", [])}
        sessions["figures"] = session_figures(
            frame.assign(assigned_s=frame["assigned_at"].astype("int64").to_numpy() / 1e9),
            conversion=frame[columns["outcome:conversion"]].to_numpy(dtype=float)
            if "outcome:conversion" in columns
            else None,
            support=frame[columns["outcome:support_minutes"]].to_numpy(dtype=float)
            if "outcome:support_minutes" in columns
            else None,
            earlier_users=earlier,
        )
    del frame
    turn_filter: list[Any] = [t.c.created_at <= now]
    vote_filter: list[Any] = [fb.c.value.is_not(None), fb.c.updated_at <= now]
    if ids is not None:
        # The stretch's turns through the session index; their experiment is checked
        # below (with it in SQL, SQLite reads every turn of the experiment through an
        # index led by ``experiment_id``, once per stretch).
        turn_filter.append(t.c.session_id.in_(ids))
        vote_filter.append(fb.c.session_id.in_(ids))
    else:
        turn_filter.append(t.c.experiment_id == exp_id)
    if not whole and ids is None:  # sessions with no assignment in the experiment up to now
        # NOT EXISTS: one probe of the unique session id per turn (PostgreSQL runs a NOT IN
        # over millions of ids as a subplan per row)
        turn_filter.append(
            ~sa.exists().where(
                a.c.session_id == t.c.session_id,
                a.c.experiment_id == exp_id,
                a.c.assigned_at <= now,
            )
        )
    with store.engine.connect() as conn:
        sessions = outcome_signals(conn, config, sessions, now, only=not whole)
        rows = [
            r[:-1]
            for r in fetch_tuples(
                conn,
                sa.select(
                    *(t.c[c] for c in RANK_COLUMNS),
                    sa.func.length(t.c.user_message),
                    sa.func.length(t.c.reply),
                    t.c.experiment_id,
                ).where(*turn_filter),
            )
            if r[-1] == exp_id
        ]
        shown = [
            (r[0], r[1])
            for r in conn.execute(
                sa.select(t.c.id, t.c.fewshot_ids, t.c.experiment_id).where(
                    *turn_filter, sa.cast(t.c.fewshot_ids, sa.Text) != "[]"
                )
            ).all()
            if r[2] == exp_id
        ]
        if not whole and ids is None:  # the votes of those turns
            turn_ids = sorted({str(r[0]) for r in rows})
            votes = in_chunks(
                conn,
                sa.select(fb.c.turn_id, fb.c.value).where(*vote_filter),
                fb.c.turn_id,
                turn_ids,
            )
        else:
            votes = fetch_tuples(conn, sa.select(fb.c.turn_id, fb.c.value).where(*vote_filter))
    turns = pd.DataFrame(rows, columns=[*RANK_COLUMNS, "u_len", "r_len"])
    del rows
    turns["created_at"] = pd.to_datetime(turns["created_at"], utc=True)
    turns["shortest"] = np.minimum(turns["u_len"], turns["r_len"]).astype(np.int64)
    turns["longest"] = np.maximum(turns["u_len"], turns["r_len"]).astype(np.int64)
    ids_shown = dict(shown)
    turns["fewshot_ids"] = [ids_shown.get(i) for i in turns["id"].tolist()]
    up = {r[0] for r in votes if r[1] == 1}
    down = {r[0] for r in votes if r[1] == 0}
    all_ids = sorted(set(sessions.index.astype(str)) | set(turns["session_id"].astype(str)))
    considered, counts = _write(
        store, config, all_ids, sessions, turns, up, down, excluded, mined, fresh=True
    )
    return len(all_ids), considered, counts


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
) -> tuple[int, dict[str, list[int]]]:
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
    # a session with turns and no assignment has no figures (NULL, not a JSON NaN)
    new["figures"] = [f if isinstance(f, dict) else None for f in new["figures"]]
    ft, fs_ = schema.fewshot_turns, schema.fewshot_sessions
    with store.engine.begin() as conn:
        old = pd.DataFrame(columns=["arm_id", "turns", "reward", "examples", "figures"])
        before = {} if fresh else turn_counts(conn, config, ft.c.session_id, session_ids)
        if not fresh:
            old = pd.DataFrame(
                in_chunks(
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
            apply_credit(conn, exp_id, pd.concat(parts))
        apply_buckets(conn, exp_id, old["figures"].tolist(), new["figures"].tolist())
        after = (
            _frame_counts(config, turn_rows)
            if fresh
            else turn_counts(conn, config, ft.c.session_id, session_ids)
        )
    considered = int(new["turns"].sum()) - int(old["turns"].sum() if len(old) else 0)
    return considered, merge_counts(after, before, sign=-1)


def turn_counts(
    conn: sa.Connection,
    config: Config,
    column: Any = None,
    keys: Sequence[str] = (),
) -> dict[str, list[int]]:
    """Per reasons (comma-separated) of the kept turns: [qualifying, unmined shorter than
    ``min_chars``, unmined longer than ``max_chars``] — of the experiment, or of the turns
    whose ``column`` is in ``keys``. Kept as sums, so that mining's figures over all turns
    cost nothing per run."""
    fs, ft = config.fewshot, schema.fewshot_turns
    query = (
        sa.select(
            ft.c.reasons,
            sa.func.count(),
            sa.func.sum(sa.case((sa.and_(~ft.c.mined, ft.c.shortest < fs.min_chars), 1), else_=0)),
            sa.func.sum(sa.case((sa.and_(~ft.c.mined, ft.c.longest > fs.max_chars), 1), else_=0)),
        )
        .where(ft.c.experiment_id == config.experiment.id)
        .group_by(ft.c.reasons)
    )
    rows = fetch_tuples(conn, query) if column is None else in_chunks(conn, query, column, keys)
    out: dict[str, list[int]] = {}
    for why, n, short, long_ in rows:
        counts = out.setdefault(str(why), [0, 0, 0])
        counts[0] += int(n)
        counts[1] += int(short or 0)
        counts[2] += int(long_ or 0)
    return out


def _frame_counts(config: Config, rows: pd.DataFrame) -> dict[str, list[int]]:
    """:func:`turn_counts` of turn rows about to be written (a rebuild: nothing kept yet)."""
    if not len(rows):
        return {}
    fs = config.fewshot
    unmined = ~rows["mined"].astype(bool)
    table = (
        pd.DataFrame(
            {
                "reasons": rows["reasons"].astype(str),
                "n": 1,
                "short": (unmined & (rows["shortest"] < fs.min_chars)).astype(int),
                "long": (unmined & (rows["longest"] > fs.max_chars)).astype(int),
            }
        )
        .groupby("reasons")[["n", "short", "long"]]
        .sum()
    )
    return {
        str(why): [int(n), int(short), int(long_)]
        for why, n, short, long_ in zip(
            table.index, table["n"], table["short"], table["long"], strict=True
        )
    }


def merge_counts(
    a: dict[str, list[int]], b: dict[str, list[int]], *, sign: int = 1
) -> dict[str, list[int]]:
    """``a + sign × b`` of two :func:`turn_counts`, without the reasons left at zero."""
    out = {k: list(v) for k, v in a.items()}
    for k, v in b.items():
        counts = out.setdefault(k, [0, 0, 0])
        for i in range(3):
            counts[i] += sign * int(v[i])
    return {k: v for k, v in out.items() if any(v)}


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
