"""Per-session KPI from the event store, vectorised with pandas.

The reward of a session is ``Σ weight × min(value, cap)`` over the configured
terms (``config.kpi.terms``):

- ``outcome:<name>`` — the outcome events of the session combined with the term's
  ``aggregate`` (``max``, ``sum`` or ``last``), 0 when there is none. An outcome
  reported with a ``session_id`` belongs to that session; one reported with only
  a ``user_id`` belongs to that user's most recent session of the experiment
  assigned at or before ``occurred_at``. Either way it counts only if it occurred
  within the term's ``window_days`` after the assignment, and never if it
  occurred before the session started — up to
  :data:`optimizer.attribution.CLOCK_SKEW_S` of clock skew, counted as delay 0
  (the outcomes API reports the same verdict, :mod:`optimizer.attribution`).
- ``cost:usd`` — what the session's turns cost (:mod:`optimizer.cost`: litellm's
  cost, or the configured per-token price of the model), summed; known as the
  turns happen, so its exposure is 1 like feedback's.
- ``feedback:up_rate`` / ``feedback:down_rate`` — thumbs up (down) over rated
  turns of the session, from the current votes. **A session without any rated
  turn contributes 0** to these terms (not NaN): most sessions are never rated,
  and dropping them would make the KPI of an arm depend on who bothers to vote.

Delay, without bias
-------------------
A conversion may arrive days after the chat. Counting a session whose window is
still open as "no conversion" would bias every arm downward, and the newest arm
(or the arm the bandit currently favours, whose sessions are youngest) the most.
So a term's column is **NaN until its window has closed** (``age >= window_days``),
and ``reward`` is NaN and ``complete`` False until *all* windows have closed.
``policy.delay = "wait"`` learns from those only: exact, at the price of learning
only from sessions older than the longest window (a month with a 30-day revenue
term).

To learn from day one (``policy.delay = "model"``, the default) the frame also carries, per
term, ``<term>_observed`` (the value so far) and ``<term>_exposure``: the share
of the term's final value expected to have arrived by the session's age,
``F(age)``. ``F`` is the delay distribution of the term's events (value-weighted
for ``sum``, first event for ``max``/``last``), estimated from all sessions —
young ones included — with the reverse-time product-limit estimator for
right-truncated delays (see ``_delay_cdf``); ``age / window`` until 20 events
exist. Feedback is given during the chat, so its exposure is 1. The policy then
estimates an arm's mean as observed value per unit of exposure, which is
unbiased as long as the delay distribution does not depend on the arm. Before
any session is a full window old the tail of ``F`` is unseen and ``F`` is
overstated: every arm's level is understated by about the same factor, a little
more for arms with younger sessions — a conservative, self-correcting error.

Events stamped after ``now`` are ignored, so a simulation can write outcomes
ahead of simulated time without the optimizer peeking. Votes count as they
stand at ``now`` (a vote changed after the window still counts: it is the
user's current opinion of the reply).

Reading is column-lean: one scan of the assignments, with the turn and vote
counts the store keeps on them (counted as of ``now`` only when something is
stamped later), raw DBAPI rows (no per-row SQLAlchemy objects), timestamps
converted to epoch seconds in SQL. Reading is most of the cost of a refit
(``bench/refit.py``).

>>> from optimizer.config import load_config
>>> from optimizer.store import Store
>>> store = Store("sqlite:///:memory:"); store.create_all()
>>> session_frame(store, load_config("/nonexistent.toml", environ=False)).shape[0]
0
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.sql.expression import UnaryExpression
from sqlalchemy.sql.operators import custom_op

from optimizer.clock import as_utc, utcnow
from optimizer.config import Config, KPITermConfig
from optimizer.cost import COST_COLUMN, session_costs
from optimizer.latencies import newest_latencies
from optimizer.moments import sketch_values
from optimizer.store import Store, schema
from optimizer.store.store import fetch_in, fetch_tuples

__all__ = [
    "BASE_COLUMNS",
    "LATENCY_TURNS",
    "arm_metrics",
    "empty_session_frame",
    "finish_frame",
    "frame_rows",
    "moved_threads",
    "observed_terms",
    "session_frame",
    "term_column",
    "turn_latencies",
    "uses_cost",
]

log = logging.getLogger(__name__)

#: Columns of :func:`session_frame` besides the per-term ones, in order.
BASE_COLUMNS = (
    "session_id",
    "user_id",
    "arm_id",
    "segment",
    "propensity",
    "snapshot_version",
    "holdback",
    "assigned_at",
    "age_days",
    "turns",
    "errors",
    "rated",
    "thumbs_up",
    "thumbs_down",
    "reward",
    "complete",
)
#: Kept with ``with_ids``: how the kept open window (:mod:`optimizer.refit_window`) finds a
#: row, and its exact assignment time.
_ID_COLUMNS = ("assignment_id", "assigned_s")
_RESERVED = frozenset(BASE_COLUMNS) | {"assigned_s", "cost_usd"}
#: The latency guardrail looks at this many of each arm's most recent turns.
LATENCY_TURNS = 50_000
#: Below this many events, ``F(age)`` is assumed linear in age.
MIN_DELAY_EVENTS = 20
#: Grid of the delay distribution estimate: the window in this many steps.
DELAY_BINS = 28
_DAY_S = 86_400.0


class _Shared(dict[str, Any]):
    """A dict in ``DataFrame.attrs`` that pandas does not deep-copy at every operation
    (it copies ``attrs`` on each column access: a list of 500k users made that the cost)."""

    def __deepcopy__(self, memo: dict[int, Any]) -> _Shared:
        return self


class _SharedList(list[Any]):
    """A list in ``DataFrame.attrs`` that pandas does not deep-copy (see :class:`_Shared`)."""

    def __deepcopy__(self, memo: dict[int, Any]) -> _SharedList:
        return self


_NO_EVENTS = pd.DataFrame(
    {
        "pos": pd.Series(dtype=np.int64),
        "value": pd.Series(dtype=float),
        "delay_s": pd.Series(dtype=float),
    }
)
_NO_SHARE = pd.DataFrame(
    {
        "pos": pd.Series(dtype=np.int64),
        "bin": pd.Series(dtype=np.int64),
        "weight": pd.Series(dtype=float),
    }
)


def uses_cost(config: Config) -> bool:
    """Whether the KPI or a guardrail needs each session's cost."""
    return any(t.source == "cost:usd" for t in config.kpi.terms) or any(
        g.metric == "cost_per_session" for g in config.kpi.guardrails
    )


def session_frame(
    store: Store,
    config: Config,
    *,
    now: datetime | None = None,
    assigned_after: datetime | None = None,
    assigned_until: datetime | None = None,
    delay_prior: Mapping[str, tuple[np.ndarray, int]] | None = None,
    with_cost: bool | None = None,
    session_ids: Sequence[str] | None = None,
    with_ids: bool = False,
    probe_returning: bool = True,
) -> pd.DataFrame:
    """One row per assignment of ``config.experiment.id`` made at or before ``now``.

    Columns: :data:`BASE_COLUMNS`, then for each KPI term a column named
    :func:`term_column` (the term's name unless that clashes with a base column,
    as the default ``thumbs_up`` term does: then ``kpi:<name>``) holding the
    capped value, NaN while its window is open, plus ``<column>_observed`` (value
    so far) and ``<column>_exposure`` (see the module docstring).
    ``frame.attrs["kpi_terms"]`` lists the terms (name, column, source, weight,
    window_days, aggregate, cap). With ``with_cost`` (default: when
    :func:`uses_cost`) a ``cost_usd`` column follows the base columns: the
    session's cost so far (an extra ``GROUP BY`` over the turns).
    Reads only the columns it needs; the heavy lifting is SQL ``GROUP BY`` and
    pandas, never a Python loop over sessions.

    ``assigned_after`` / ``assigned_until`` restrict the frame to the sessions
    assigned in that interval (the incremental refit, :mod:`optimizer.refit_state`,
    reads one day or the open window at a time); their rows are the ones the whole
    frame would have, except the delay estimate, which then needs the other
    sessions' share as ``delay_prior`` (per term column: the weights by delay bin
    of sessions older than the window, and their number of events). Such a frame
    carries ``attrs["delay_sealed"]``, per term column the events of its own
    sessions older than the window (``pos``, delay ``bin``, ``weight``), and
    ``attrs["returning_users"]``, the users of the frame who had a session outside
    the holdback at or before ``assigned_after`` (their sessions here are not their
    first for :mod:`optimizer.srm`; one index probe per row; none without
    ``probe_returning``, for a caller that has no use for it).

    ``session_ids`` (with ``assigned_after``) reads only those sessions of the stretch —
    the kept open window refreshing what changed (:mod:`optimizer.refit_window`); it must
    hold every session of the stretch of a user it names, so that user-level outcomes
    find their session. ``with_ids`` keeps the ``assignment_id`` column.
    Every frame carries ``attrs["term_delays"]``: per outcome term column, its events
    within the window (``pos``, ``delay_s``, ``weight``; one per session for ``max`` and
    ``last``) — what :func:`finish_frame` needs to date the terms at another ``now``.
    """
    now = as_utc(now) if now is not None else utcnow()
    terms = config.kpi.terms
    experiment_id = config.experiment.id
    after = as_utc(assigned_after) if assigned_after is not None else None
    until = min(as_utc(assigned_until), now) if assigned_until is not None else now
    cost = uses_cost(config) if with_cost is None else with_cost
    with store.engine.connect() as conn:
        epoch = _epoch_function(conn)
        frame, sessions = _sessions(
            conn,
            epoch,
            experiment_id,
            now,
            after=after,
            until=until,
            probe=probe_returning and session_ids is None,
            ids=session_ids,
        )
        if frame.empty:
            return empty_session_frame(config, cost=cost, with_ids=with_ids)
        outcome_names = sorted(
            {t.source.split(":", 1)[1] for t in terms if t.source.startswith("outcome:")}
        )
        horizon = max((t.window_days for t in terms), default=0.0) * _DAY_S
        # A restricted frame needs the moved conversations whole: an outcome named by one
        # assignment of a thread may belong to another one, in or out of the frame.
        moved = (
            moved_threads(conn, experiment_id, now)
            if after is not None or session_ids is not None
            else None
        )
        outcomes = _outcomes(
            conn,
            epoch,
            outcome_names,
            now,
            after=after,
            past=(experiment_id, until, horizon) if until < now else None,
            also=_thread_relatives(moved, sessions) if moved is not None else (),
            linked_to=sessions.tolist() if until < now or session_ids is not None else (),
            users=(
                sorted(set(frame["user_id"].dropna().astype(str)))
                if session_ids is not None
                else None
            ),
        )
        if cost:
            costs = session_costs(
                conn,
                experiment_id,
                config.model.prices,
                now,
                assigned_after=after,
                assigned_until=until if after is not None else None,
                session_ids=sessions.tolist() if session_ids is not None else None,
            )
            frame[COST_COLUMN] = frame["session_id"].map(costs).fillna(0.0).astype(float)
        later = (
            _later_sessions(conn, epoch, experiment_id, outcomes, until, now)
            if until < now
            else None
        )

    events = _attribute(outcomes, frame, sessions, later=later, moved=moved)
    observed, delays = observed_terms(terms, events, len(frame))
    return finish_frame(
        frame, config, now, observed, delays, prior=delay_prior, cost=cost, with_ids=with_ids
    )


def empty_session_frame(
    config: Config, *, cost: bool = False, with_ids: bool = False
) -> pd.DataFrame:
    """A :func:`session_frame` without rows."""
    out = _empty_frame(config.kpi.terms, cost=cost, with_ids=with_ids)
    out.attrs["delay_sealed"] = _Shared()
    out.attrs["term_delays"] = _Shared()
    out.attrs["returning_users"] = _SharedList()
    return out


def frame_rows(frame: pd.DataFrame, mask: np.ndarray) -> pd.DataFrame:
    """The rows of a session frame where ``mask`` holds, its per-row attrs (the delay
    shares and delays, by row position) renumbered to match."""
    mask = np.asarray(mask, dtype=bool)
    out = frame[mask].reset_index(drop=True)
    new_pos = np.cumsum(mask) - 1
    attrs = dict(frame.attrs)
    for key in ("delay_sealed", "term_delays"):
        parts = _Shared()
        for col, d in (frame.attrs.get(key) or {}).items():
            pos = d["pos"].to_numpy(dtype=np.int64)
            inside = mask[pos]
            parts[col] = d[inside].assign(pos=new_pos[pos[inside]]).reset_index(drop=True)
        attrs[key] = parts
    out.attrs = attrs
    return out


def observed_terms(
    terms: Sequence[KPITermConfig], events: pd.DataFrame, n: int
) -> tuple[dict[str, np.ndarray], dict[str, pd.DataFrame]]:
    """Per outcome term column: each session's value so far (capped) and the term's events
    within its window (``pos``, ``delay_s``, ``weight``) — what stays true as time passes."""
    observed: dict[str, np.ndarray] = {}
    delays: dict[str, pd.DataFrame] = _Shared()
    for term in terms:
        kind, _, name = term.source.partition(":")
        if kind != "outcome":
            continue
        col = term_column(term.name)
        window_s = term.window_days * _DAY_S
        ev = events[(events["name"] == name) & (events["delay_s"] <= window_s)]
        value = np.zeros(n)
        if not ev.empty:
            groups = ev.groupby("pos", sort=False)["value"]
            if term.aggregate == "max":
                agg = groups.max()
            elif term.aggregate == "sum":
                agg = groups.sum()
            else:  # last by time
                agg = (
                    ev.sort_values("occurred_s", kind="stable")
                    .groupby("pos", sort=False)["value"]
                    .last()
                )
            value[agg.index.to_numpy()] = agg.to_numpy()
        observed[col] = np.minimum(value, term.cap) if term.cap is not None else value
        delays[col] = _term_delays(term, ev)
    return observed, delays


def finish_frame(
    frame: pd.DataFrame,
    config: Config,
    now: datetime,
    observed: Mapping[str, np.ndarray],
    delays: Mapping[str, pd.DataFrame],
    *,
    prior: Mapping[str, tuple[np.ndarray, int]] | None = None,
    cost: bool = False,
    with_ids: bool = False,
) -> pd.DataFrame:
    """The columns that depend on ``now`` — ages, which windows closed, exposures, reward —
    from sessions' base columns (``assigned_s``, counts, cost) and :func:`observed_terms`."""
    terms = config.kpi.terms
    age_s = now.timestamp() - frame["assigned_s"].to_numpy()
    frame["assigned_at"] = pd.to_datetime(frame["assigned_s"], unit="s", utc=True)
    frame["age_days"] = age_s / _DAY_S
    sealed: dict[str, pd.DataFrame] = _Shared()
    reward = np.zeros(len(frame))
    complete = np.ones(len(frame), dtype=bool)
    extra: dict[str, np.ndarray] = {}
    for term in terms:
        window_s = term.window_days * _DAY_S
        closed = age_s >= window_s
        col = term_column(term.name)
        value, exposure, sealed[col] = _term_values(
            term,
            frame,
            observed.get(col),
            delays.get(col),
            age_s,
            closed,
            window_s,
            (prior or {}).get(col),
        )
        if term.cap is not None:
            value = np.minimum(value, term.cap)
        extra[col] = np.where(closed, value, np.nan)
        extra[f"{col}_observed"] = value
        extra[f"{col}_exposure"] = exposure
        reward += term.weight * np.where(closed, value, 0.0)
        complete &= closed
    frame["reward"] = np.where(complete, reward, np.nan)
    frame["complete"] = complete
    keep = list(BASE_COLUMNS) + ([COST_COLUMN] if cost else [])
    keep += [c for c in _ID_COLUMNS if with_ids and c in frame]
    out = pd.concat([frame[keep], pd.DataFrame(extra, index=frame.index)], axis=1)
    out.attrs["kpi_terms"] = _term_attrs(terms)
    out.attrs["delay_sealed"] = sealed
    out.attrs["term_delays"] = delays if isinstance(delays, _Shared) else _Shared(delays)
    out.attrs["returning_users"] = frame.attrs.get("returning_users", _SharedList())
    return out


def arm_metrics(frame: pd.DataFrame, by: Sequence[str] = ("arm_id",)) -> pd.DataFrame:
    """Descriptive per-arm (or per-``by`` group) figures from a :func:`session_frame`.

    ``conversion_rate`` (share of sessions with the ``outcome:conversion`` term > 0,
    among sessions whose conversion window closed), ``thumbs_up_rate`` and
    ``thumbs_down_rate`` (per rated turn), ``error_rate`` (per turn),
    ``median_support_minutes`` (``outcome:support_minutes`` term, closed windows; from
    the mergeable histogram of :mod:`optimizer.moments`, within 1% of the exact median).
    Missing terms give NaN.
    """
    terms = {t["source"]: t["column"] for t in frame.attrs.get("kpi_terms", [])}
    conv, support = terms.get("outcome:conversion"), terms.get("outcome:support_minutes")
    f = frame.assign(
        _conv_known=frame[conv].notna() if conv else False,
        _converted=(frame[conv] > 0) if conv else False,
        # the optimizer's histogram (optimizer.moments), so both report the same median
        _support=sketch_values(frame[support].to_numpy(dtype=float)) if support else np.nan,
    )
    out = f.groupby(list(by), observed=True, sort=True).agg(
        sessions=("session_id", "size"),
        complete_sessions=("complete", "sum"),
        conversions=("_converted", "sum"),
        conversion_known=("_conv_known", "sum"),
        thumbs_up=("thumbs_up", "sum"),
        thumbs_down=("thumbs_down", "sum"),
        rated=("rated", "sum"),
        turns=("turns", "sum"),
        errors=("errors", "sum"),
        median_support_minutes=("_support", "median"),
    )
    rated = out["rated"].where(out["rated"] > 0)
    out["conversion_rate"] = out["conversions"] / out["conversion_known"].where(
        out["conversion_known"] > 0
    )
    if not conv:
        out["conversion_rate"] = np.nan
    out["thumbs_up_rate"] = out["thumbs_up"] / rated
    out["thumbs_down_rate"] = out["thumbs_down"] / rated
    out["error_rate"] = out["errors"] / out["turns"].where(out["turns"] > 0)
    return out


def turn_latencies(
    store: Store,
    experiment_id: str,
    arms: Sequence[str],
    *,
    now: datetime | None = None,
    limit: int = LATENCY_TURNS,
    since: Mapping[str, datetime] | None = None,
) -> dict[str, np.ndarray]:
    """Latencies (ms) of each arm's latest ``limit`` answered turns up to ``now``.

    For the p95 guardrail: recent behaviour is what a guardrail should react to,
    and the bound keeps a refit on millions of turns fast. ``since`` maps an arm
    to a time before which its turns are ignored. Turns of holdback sessions are
    left out: the holdback is outside the bandit, and the guardrails judge the
    arms the bandit serves (:mod:`optimizer.holdback`), like the rate guardrails
    that read :func:`optimizer.holdback.bandit_frame`. The cost is bounded by
    ``limit``, not by history (:mod:`optimizer.latencies`): an index walk per arm,
    and the holdback checked on the arms that have holdback sessions (a turn
    carries its session's arm).
    """
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    now = as_utc(now) if now is not None else utcnow()
    # An indexed walk per arm, the holdback checked only where it has sessions.
    with store.engine.connect() as conn:
        return newest_latencies(conn, experiment_id, arms, now=now, limit=limit, since=since)


# -- reading ------------------------------------------------------------------------------


def _epoch_function(conn: sa.Connection) -> Any:
    """SQL expression giving seconds since 1970 as a float: the database parses timestamps."""
    if conn.dialect.name == "postgresql":
        return lambda col: sa.cast(sa.extract("epoch", col), sa.Double())
    # SQLite stores "YYYY-MM-DD HH:MM:SS.ffffff" in UTC; julianday parses it natively.
    return lambda col: (sa.func.julianday(col) - 2440587.5) * _DAY_S


def _read(conn: sa.Connection, query: sa.Select[Any], columns: Sequence[str]) -> pd.DataFrame:
    rows = fetch_tuples(conn, query)
    return pd.DataFrame.from_records(rows, columns=list(columns), nrows=len(rows))


def _sessions(
    conn: sa.Connection,
    epoch: Any,
    experiment_id: str,
    now: datetime,
    *,
    after: datetime | None = None,
    until: datetime | None = None,
    probe: bool = True,
    ids: Sequence[str] | None = None,
) -> tuple[pd.DataFrame, pd.Index]:
    """Assignments with their turn, error and vote counts, one row per session.

    With ``after`` and ``probe``, ``attrs["returning_users"]`` lists the users with a
    session outside the holdback at or before ``after``, judged on each user's first
    session of the frame outside the holdback (one index probe per row). ``ids``: only
    those sessions (by their unique id). Without ``probe`` nobody is judged returning.

    Returns the frame and an index of its session ids (row positions by id).
    The counts are the ones the store keeps on each assignment (one table scan)
    unless a turn or vote is stamped after ``now`` (a simulation writing ahead, a
    report as of a past date): then they are counted as of ``now`` — the turns
    through the ``(session_id, created_at)`` index, errors (rare) and votes (a
    minority of sessions) grouped apart and aligned by session id in pandas.
    """
    a, t, f = schema.assignments, schema.turns, schema.feedback
    experiment: sa.ColumnElement[str] = a.c.experiment_id
    if conn.dialect.name == "sqlite" and after is None:
        # Reading a whole experiment, a table scan is ~4x faster than SQLite's row-by-row
        # index lookups; SQLite's unary + keeps the column off the index at no cost.
        experiment = UnaryExpression(experiment, operator=custom_op("+"), type_=sa.String())
    as_of_now = _stamped_after(conn, now)
    counts: list[sa.ColumnElement[Any]] = [a.c[name] for name in schema.SESSION_COUNTS]
    if as_of_now:
        counts = [
            sa.select(sa.func.count())
            .where(t.c.session_id == a.c.session_id, t.c.created_at <= now)
            .scalar_subquery()
        ]
    base = (a.c.session_id, a.c.user_id, a.c.arm_id, a.c.segment)
    query = sa.select(
        *base,
        a.c.propensity,
        a.c.snapshot_version,
        epoch(a.c.assigned_at),
        a.c.holdback,
        a.c.thread_id,
        *counts,
    ).where(experiment == experiment_id, a.c.assigned_at <= (until or now))
    query = query.add_columns(a.c.id)
    has_earlier = None
    if after is not None and probe:
        b = a.alias("earlier")
        has_earlier = sa.exists().where(
            b.c.user_id == a.c.user_id,
            b.c.experiment_id == a.c.experiment_id,
            b.c.assigned_at <= after,
            b.c.holdback == sa.false(),
        )
    if after is not None:
        query = query.where(a.c.assigned_at > after)
    if has_earlier is not None:  # users with an earlier session: one index probe per row
        query = query.add_columns(has_earlier.label("has_earlier"))
    if ids is not None:  # a few sessions by their unique id
        rows = fetch_in(conn, query, a.c.session_id, ids)
    else:
        rows = fetch_tuples(conn, query)
    if not rows:
        return pd.DataFrame(), pd.Index([])
    # One object array, then typed columns: ids stay Python strings (cheap to hash).
    cells = np.array(rows, dtype=object)
    del rows
    frame = pd.DataFrame({c.name: pd.Series(cells[:, i], dtype=object) for i, c in enumerate(base)})
    frame["propensity"] = cells[:, 4].astype(float)
    frame["snapshot_version"] = pd.array(cells[:, 5].astype(float), dtype="Int64")
    frame["assigned_s"] = cells[:, 6].astype(float)
    frame["holdback"] = cells[:, 7].astype(bool)
    # The conversation: a moved one has several assignments (``<thread>~n``, Store.reassign).
    frame["thread"] = pd.Series(cells[:, 8], dtype=object).fillna(frame["session_id"])
    for i, name in enumerate(schema.SESSION_COUNTS[: len(counts)], start=9):
        frame[name] = cells[:, i].astype(np.int64)
    frame["assignment_id"] = cells[:, 9 + len(counts)].astype(np.int64)
    probed = cells[:, 10 + len(counts)].astype(bool) if has_earlier is not None else None
    del cells
    sessions = pd.Index(frame["session_id"])
    if as_of_now:
        errors = sa.select(t.c.session_id, sa.func.count()).where(
            t.c.error.is_not(None), t.c.created_at <= now
        )
        votes = sa.select(
            f.c.session_id,
            sa.func.count(),
            sa.func.sum(sa.case((f.c.value == 1, 1), else_=0)),
            sa.func.sum(sa.case((f.c.value == 0, 1), else_=0)),
        ).where(f.c.value.is_not(None), f.c.updated_at <= now)
        for query, names in (
            (errors, ("errors",)),
            (votes, ("rated", "thumbs_up", "thumbs_down")),
        ):
            grouped = fetch_tuples(conn, query.group_by(query.selected_columns[0]))
            pos = sessions.get_indexer([g[0] for g in grouped])
            known = pos >= 0  # not other experiments' sessions
            for i, name in enumerate(names, start=1):
                column = np.zeros(len(frame), dtype=np.int64)
                column[pos[known]] = np.array([g[i] for g in grouped], dtype=np.int64)[known]
                frame[name] = column
    # in time order (SRM takes each user's first session), ties in insertion (id) order: a
    # scan's order is no promise, and the kept rows (optimizer.refit_rows) sort the same way
    assigned = frame["assigned_s"].to_numpy()
    row_ids = frame["assignment_id"].to_numpy()
    step, id_step = np.diff(assigned), np.diff(row_ids)
    if not ((step > 0) | ((step == 0) & (id_step > 0))).all():  # usually already in order
        order = np.lexsort((row_ids, assigned))
        frame = frame.iloc[order].reset_index(drop=True)
        probed = probed[order] if probed is not None else None
        sessions = pd.Index(frame["session_id"])
    returning: list[str] = []
    if probed is not None:
        firsts = np.flatnonzero(
            ~frame["holdback"].to_numpy() & ~frame["user_id"].where(~frame["holdback"]).duplicated()
        )
        verdict = probed[firsts]
        returning = sorted(set(frame["user_id"].to_numpy()[firsts][verdict].tolist()))
    frame.attrs["returning_users"] = _SharedList(returning)
    return frame, sessions


def _later_sessions(
    conn: sa.Connection,
    epoch: Any,
    experiment_id: str,
    outcomes: pd.DataFrame,
    until: datetime,
    now: datetime,
) -> pd.DataFrame:
    """First session after ``until`` (up to ``now``) of each user with a user-level outcome:
    such an outcome that occurred after it belongs to it, not to the frame's sessions."""
    a = schema.assignments
    users = sorted(set(outcomes.loc[outcomes["session_id"].isna(), "user_id"].dropna()))
    rows: list[tuple[Any, ...]] = []
    for i in range(0, len(users), 500):
        rows.extend(
            fetch_tuples(
                conn,
                sa.select(a.c.user_id, sa.func.min(epoch(a.c.assigned_at)))
                .where(
                    a.c.user_id.in_(users[i : i + 500]),
                    a.c.experiment_id == experiment_id,
                    a.c.assigned_at > until,
                    a.c.assigned_at <= now,
                )
                .group_by(a.c.user_id),
            )
        )
    return pd.DataFrame(rows, columns=["user_id", "first_s"]).astype({"first_s": float})


def _stamped_after(conn: sa.Connection, now: datetime) -> bool:
    """Whether any turn or vote is stamped after ``now`` (two index probes)."""
    t, f = schema.turns, schema.feedback
    return any(
        conn.execute(sa.select(sa.exists().where(column > now))).scalar()
        for column in (t.c.created_at, f.c.updated_at)
    )


def moved_threads(conn: sa.Connection, experiment_id: str, now: datetime) -> pd.DataFrame:
    """Every assignment of a moved conversation up to ``now``: ``session_id``, ``thread``,
    ``assigned_s``, in time order. Moves are rare (an arm paused or retired while its
    conversations go on): the reassigned rows through the ``thread_id`` index, then
    their threads' first assignments by session id."""
    a, epoch = schema.assignments, _epoch_function(conn)
    columns = ["session_id", "thread", "assigned_s", "id"]
    select = sa.select(a.c.session_id, a.c.thread_id, epoch(a.c.assigned_at), a.c.id).where(
        a.c.experiment_id == experiment_id, a.c.assigned_at <= now
    )
    rows = fetch_tuples(conn, select.where(a.c.thread_id >= ""))  # >= "": an index range
    threads = sorted({r[1] for r in rows})
    for i in range(0, len(threads), 500):
        rows.extend(
            (sid, sid, at, row_id)
            for sid, _, at, row_id in fetch_tuples(
                conn, select.where(a.c.session_id.in_(threads[i : i + 500]))
            )
        )
    out = pd.DataFrame(rows, columns=columns).astype({"assigned_s": float})
    out = out.drop_duplicates("session_id").sort_values(["assigned_s", "id"], kind="stable")
    return out.drop(columns="id").reset_index(drop=True)


def _thread_relatives(moved: pd.DataFrame, ids: pd.Index) -> list[str]:
    """Assignments outside the frame (``ids``) of the moved conversations it has a part of."""
    if not len(moved):
        return []
    inside = ids.get_indexer(moved["session_id"]) >= 0
    threads = set(moved.loc[inside, "thread"])
    return sorted(set(moved.loc[~inside & moved["thread"].isin(threads), "session_id"]))


def _outcomes(
    conn: sa.Connection,
    epoch: Any,
    names: Sequence[str],
    now: datetime,
    *,
    after: datetime | None = None,
    past: tuple[str, datetime, float] | None = None,
    also: Sequence[str] = (),
    linked_to: Sequence[str] = (),
    users: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Outcome events of ``names`` up to ``now``; with ``after``, only those that can belong
    to a session assigned after it. ``past`` = (experiment, until, longest window in s): the
    frame is a closed stretch of history, so its session-linked events are found through its
    sessions ``linked_to`` (index probes, not a scan of everything that happened since), plus those
    named by the sessions ``also`` (other assignments of its moved conversations), and
    user-level ones within the longest window after it. ``users``: the frame is the sessions
    ``linked_to`` (a refresh of a few): their events and the user-level ones of ``users``."""
    o = schema.outcomes
    columns = ("session_id", "user_id", "name", "value", "occurred_s")
    if not names:
        numeric = {"value", "occurred_s"}
        return pd.DataFrame(
            {c: pd.Series(dtype=float if c in numeric else object) for c in columns}
        )
    query = sa.select(
        o.c.session_id, o.c.user_id, o.c.name, o.c.value, epoch(o.c.occurred_at)
    ).where(o.c.name.in_(list(names)), o.c.occurred_at <= now)
    from optimizer.attribution import CLOCK_SKEW_S

    skew = timedelta(seconds=CLOCK_SKEW_S)
    if after is not None:  # an event before its session (beyond the clock skew) never counts
        query = query.where(o.c.occurred_at >= after - skew)
    if users is not None:
        by_user = query.where(o.c.session_id.is_(None))
        named = sorted(set(also) | set(linked_to))
        rows = fetch_in(conn, by_user, o.c.user_id, users)
        rows += fetch_in(conn, query, o.c.session_id, named)
        parts = [pd.DataFrame.from_records(rows, columns=list(columns), nrows=len(rows))]
        frame = (
            pd.concat(parts, ignore_index=True)
            if parts
            else _read(conn, query.where(sa.false()), columns)
        )
    elif after is not None and past is not None:
        experiment_id, until, horizon = past
        by_user = query.where(
            o.c.session_id.is_(None), o.c.occurred_at <= until + timedelta(seconds=horizon) + skew
        )
        parts = [_read(conn, by_user, columns)]
        if conn.dialect.name == "postgresql":
            # one array of session ids: index probes (with a join PostgreSQL's planner scans
            # every outcome since the stretch, which grows with its age)
            ids = sorted(set(also) | set(linked_to))
            array = sa.bindparam("ids", ids, type_=ARRAY(sa.String()))
            parts.append(_read(conn, query.where(o.c.session_id == sa.any_(array)), columns))
        else:  # SQLite loops over the stretch's sessions and probes the outcomes' index
            a = schema.assignments
            linked = query.join_from(o, a, a.c.session_id == o.c.session_id).where(
                a.c.experiment_id == experiment_id,
                a.c.assigned_at > after,
                a.c.assigned_at <= until,
            )
            parts.append(_read(conn, linked, columns))
            ids = sorted(also)
            for i in range(0, len(ids), 500):
                chunk = query.where(o.c.session_id.in_(ids[i : i + 500]))
                parts.append(_read(conn, chunk, columns))
        frame = pd.concat(parts, ignore_index=True)
    else:
        frame = _read(conn, query, columns)
    frame["value"] = frame["value"].astype(float)
    frame["occurred_s"] = frame["occurred_s"].astype(float)
    return frame


# -- attribution and terms ------------------------------------------------------------------


def _attribute(
    outcomes: pd.DataFrame,
    sessions: pd.DataFrame,
    ids: pd.Index,
    *,
    later: pd.DataFrame | None = None,
    moved: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Outcome events with the row position (``pos``) of the session they belong to.

    Session-linked events join on ``session_id`` — and when that conversation was
    moved to another arm (:meth:`optimizer.store.Store.reassign`), on its assignment
    open at the event: the newest one of the thread assigned at or before it.
    User-level events go to the user's latest session assigned at or before the
    event (``merge_asof``). Both with the clock-skew tolerance; an event before its
    session is dropped.
    """
    from optimizer.attribution import CLOCK_SKEW_S

    columns = ["pos", "name", "value", "occurred_s", "delay_s"]
    if outcomes.empty:
        return pd.DataFrame({c: pd.Series(dtype=float if c != "name" else object) for c in columns})
    assigned_s = sessions["assigned_s"].to_numpy()
    by_session = outcomes[outcomes["session_id"].notna()]
    linked = _open_at_event(by_session, ids, sessions, moved)

    by_user = outcomes[outcomes["session_id"].isna() & outcomes["user_id"].notna()]
    if not by_user.empty:
        lookup = pd.DataFrame(
            {
                "user_id": sessions["user_id"].astype(str).to_numpy(),
                "assigned_s": assigned_s,
                "pos": np.arange(len(sessions)),
            }
        ).sort_values("assigned_s", kind="stable")
        matched = pd.merge_asof(
            by_user.assign(
                match_s=by_user["occurred_s"] + CLOCK_SKEW_S,
                user_id=by_user["user_id"].astype(str),
            ).sort_values("match_s", kind="stable"),
            lookup,
            left_on="match_s",
            right_on="assigned_s",
            by="user_id",
            direction="backward",
        )
        matched = matched[matched["pos"].notna()]
        if later is not None and len(later):  # a session outside the frame is the user's latest
            nxt = matched["user_id"].map(later.set_index("user_id")["first_s"])
            nxt = nxt.to_numpy(dtype=float, na_value=np.nan)
            matched = matched[~(nxt <= matched["match_s"].to_numpy(dtype=float))]
        linked = pd.concat([linked, matched[[*by_user.columns.tolist(), "pos"]]], ignore_index=True)
    linked = linked.astype({"pos": np.int64})
    delay = linked["occurred_s"].to_numpy() - assigned_s[linked["pos"].to_numpy()]
    linked["delay_s"] = np.maximum(delay, 0.0)
    return linked.loc[delay >= -CLOCK_SKEW_S, columns]


def _open_at_event(
    by_session: pd.DataFrame, ids: pd.Index, sessions: pd.DataFrame, moved: pd.DataFrame | None
) -> pd.DataFrame:
    """Session-linked events with the row position (``pos``) of the assignment they count for.

    A conversation whose arm was paused or retired goes on under a new assignment
    (``<thread>~n``); the integrator still knows only the chat's id. What the user
    did after the move happened under the new arm, so it is credited there — the
    same "latest session at or before the event" rule as for user-level outcomes,
    within one conversation, without the clock-skew tolerance (the move is stamped by
    our own clock). Only threads with more than one assignment are looked up:
    ``moved`` lists them (:func:`moved_threads`; None: the frame holds every
    session, and its threads seen more than once are the moved ones). An event that
    counts for an assignment outside the frame is left out.
    """
    if moved is None:
        rows = sessions["thread"].duplicated(keep=False).to_numpy() if "thread" in sessions else []
        moved = pd.DataFrame(
            {
                "session_id": sessions["session_id"].to_numpy(dtype=object)[rows],
                "thread": sessions["thread"].to_numpy(dtype=object)[rows],
                "assigned_s": sessions["assigned_s"].to_numpy()[rows],
            }
        )
    named = by_session["session_id"]
    target = named.to_numpy(dtype=object).copy()
    if len(moved) and len(by_session):
        thread = named.map(pd.Series(moved["thread"].to_numpy(), index=moved["session_id"]))
        on = thread.notna().to_numpy()
        if on.any():
            events = pd.DataFrame(
                {
                    "thread": thread.to_numpy(dtype=object)[on],
                    "match_s": by_session["occurred_s"].to_numpy(dtype=float)[on],
                    "row": np.flatnonzero(on),
                }
            ).sort_values("match_s", kind="stable")
            lookup = pd.DataFrame(
                {
                    "thread": moved["thread"].to_numpy(dtype=object),
                    "assigned_s": moved["assigned_s"].to_numpy(dtype=float),
                    "open": moved["session_id"].to_numpy(dtype=object),
                }
            ).sort_values("assigned_s", kind="stable")
            matched = pd.merge_asof(
                events,
                lookup,
                left_on="match_s",
                right_on="assigned_s",
                by="thread",
                direction="backward",
            )
            rows = matched["row"].to_numpy(dtype=np.int64)
            found = matched["open"].notna().to_numpy()
            # Before the conversation's first assignment: the named session (dropped as early).
            target[rows[found]] = matched["open"].to_numpy(dtype=object)[found]
    pos = ids.get_indexer(target)
    return by_session.assign(pos=pos)[pos >= 0]


def _term_values(
    term: KPITermConfig,
    frame: pd.DataFrame,
    observed: np.ndarray | None,
    delays: pd.DataFrame | None,
    age_s: np.ndarray,
    closed: np.ndarray,
    window_s: float,
    prior: tuple[np.ndarray, int] | None = None,
) -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """(value so far, exposure, delay share of the frame's sessions past the window) of one
    term for every session; an outcome term's value and delays come from
    :func:`observed_terms`."""
    n = len(frame)
    kind, _, name = term.source.partition(":")
    if kind == "cost":  # known as the turns happen
        return frame[COST_COLUMN].to_numpy(dtype=float).copy(), np.ones(n), _NO_SHARE
    if kind == "feedback":
        rated = frame["rated"].to_numpy()
        hits = frame["thumbs_up" if name == "up_rate" else "thumbs_down"].to_numpy()
        value = np.divide(hits, rated, out=np.zeros(n), where=rated > 0)
        return value, np.ones(n), _NO_SHARE
    if observed is None or delays is None:
        observed, delays = np.zeros(n), _term_delays(term, _NO_EVENTS)
    cdf, sealed = _delay_cdf(delays, age_s, window_s, prior)
    exposure = np.where(closed, 1.0, cdf(age_s))
    return observed.copy(), exposure, sealed


def _term_delays(term: KPITermConfig, ev: pd.DataFrame) -> pd.DataFrame:
    """The delays the term's arrival curve is estimated from: every event weighted by its
    size for ``sum``, else each session's first event."""
    if term.aggregate == "sum":
        delays, weights = ev["delay_s"].to_numpy(dtype=float), np.abs(ev["value"].to_numpy(float))
        pos = ev["pos"].to_numpy()
    else:  # the value is known from the session's first event on
        first = ev.groupby("pos", sort=False)["delay_s"].min()
        delays, weights, pos = first.to_numpy(dtype=float), np.ones(len(first)), first.index
    return pd.DataFrame(
        {"pos": np.asarray(pos, dtype=np.int64), "delay_s": delays, "weight": weights}
    )


def _delay_cdf(
    delays: pd.DataFrame,
    age_s: np.ndarray,
    window_s: float,
    prior: tuple[np.ndarray, int] | None = None,
) -> tuple[Any, pd.DataFrame]:
    """Estimated share ``F(t)`` of a term's final value that has arrived ``t`` seconds in,
    from its events' ``delays`` (:func:`_term_delays`).

    Delays are right-truncated: a session of age ``a`` shows only delays ≤ ``a``.
    The reverse-time product-limit estimator handles that without waiting for
    windows to close: on a grid ``0 < b_1 < … < b_K = window``, among sessions at
    least ``b_k`` old, ``F(b_{k-1}) / F(b_k)`` = (value that arrived by ``b_{k-1}``)
    / (value that arrived by ``b_k``); ``F(window) = 1`` and the ratios chain down.
    Between grid points ``F`` is interpolated linearly.

    Sessions past the window all sit in the last age bin, so their share is a
    vector that adds up: ``prior`` is that of sessions outside ``delays`` (weights by
    delay bin, number of events); the second value returned lists ``delays``' own
    such events (``pos``, ``bin``, ``weight``).
    """
    no_share = _NO_SHARE
    if window_s <= 0:
        return (lambda age: np.ones_like(age, dtype=float)), no_share
    pos = delays["pos"].to_numpy(dtype=np.int64)
    weights = delays["weight"].to_numpy(dtype=float)
    lags = delays["delay_s"].to_numpy(dtype=float)
    edges = np.linspace(0.0, window_s, DELAY_BINS + 1)
    d_bin = np.searchsorted(edges, np.clip(lags, 0.0, window_s), side="left")
    a_bin = np.searchsorted(edges, np.minimum(age_s[pos], window_s), side="right") - 1
    counts = np.zeros((DELAY_BINS + 1, DELAY_BINS + 1))
    np.add.at(counts, (d_bin, a_bin), weights)
    past = a_bin == DELAY_BINS
    sealed = pd.DataFrame({"pos": pos[past], "bin": d_bin[past], "weight": weights[past]})
    n_events, total = len(lags), weights.sum()
    if prior is not None:
        counts[:, DELAY_BINS] += np.asarray(prior[0], dtype=float)
        n_events, total = n_events + int(prior[1]), total + float(np.sum(prior[0]))
    if n_events < MIN_DELAY_EVENTS or total <= 0:
        return (lambda age: np.clip(age / window_s, 0.0, 1.0)), sealed
    # arrived[i, j] = value with delay bin <= i from sessions whose age bin >= j
    arrived = np.cumsum(counts, axis=0)[:, ::-1].cumsum(axis=1)[:, ::-1]
    k = np.arange(1, DELAY_BINS + 1)
    num, den = arrived[k - 1, k], arrived[k, k]
    ratio = np.divide(num, den, out=np.ones(DELAY_BINS), where=den > 0)
    at_edges = np.append(np.cumprod(ratio[::-1])[::-1], 1.0)  # F(b_0) … F(b_K)

    def cdf(age: np.ndarray) -> np.ndarray:
        return np.interp(np.clip(age, 0.0, window_s), edges, at_edges)

    return cdf, sealed


# -- helpers --------------------------------------------------------------------------------


def term_column(name: str) -> str:
    """Column of a KPI term in :func:`session_frame`.

    >>> term_column("conversion"), term_column("thumbs_up")
    ('conversion', 'kpi:thumbs_up')
    """
    return f"kpi:{name}" if name in _RESERVED else name


def _term_attrs(terms: Sequence[KPITermConfig]) -> list[dict[str, Any]]:
    return [
        {
            "name": t.name,
            "column": term_column(t.name),
            "source": t.source,
            "weight": t.weight,
            "window_days": t.window_days,
            "aggregate": t.aggregate,
            "cap": t.cap,
        }
        for t in terms
    ]


def _empty_frame(
    terms: Sequence[KPITermConfig], *, cost: bool = False, with_ids: bool = False
) -> pd.DataFrame:
    dtypes: Mapping[str, Any] = {
        "propensity": float,
        "snapshot_version": "Int64",
        "assigned_at": "datetime64[ns, UTC]",
        "age_days": float,
        "reward": float,
        "complete": bool,
        "holdback": bool,
        **{c: np.int64 for c in ("turns", "errors", "rated", "thumbs_up", "thumbs_down")},
    }
    columns = {c: pd.Series(dtype=dtypes.get(c, object)) for c in BASE_COLUMNS}
    if cost:
        columns[COST_COLUMN] = pd.Series(dtype=float)
    if with_ids:
        columns.update(
            {"assignment_id": pd.Series(dtype=np.int64), "assigned_s": pd.Series(dtype=float)}
        )
    for t in terms:
        col = term_column(t.name)
        for c in (col, f"{col}_observed", f"{col}_exposure"):
            columns[c] = pd.Series(dtype=float)
    frame = pd.DataFrame(columns)
    frame.attrs["kpi_terms"] = _term_attrs(terms)
    return frame
