"""Logged bandit feedback: one row per session with the arm served, its propensity and the reward.

Every estimator reads the same frame: columns ``arm``, ``reward``, ``propensity``,
an optional ``segment`` (the allocation key; ``"*"`` when absent), an optional
``unit`` and any number of context columns (categorical or numeric) the direct
method may use.

**The unit.** Assignment is sticky per user: a user's arm is drawn once (with
the logged propensity) and their later sessions keep it with probability 1. Those
sessions are not independent draws, so the estimators work on *units* when a
``unit`` column is given: every session of a unit carries the propensity of the
unit's draw, and intervals resample units, not sessions. :func:`logs_from_store`
sets ``unit`` to the session of the draw (a user's spell on one arm). Logs come
from the store (:func:`logs_from_store`) or from another system as a CSV file
(:func:`read_logged_csv`); :func:`validate_logs` checks either and says which
column and row are wrong.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from optimizer.assignment import ALL_SEGMENTS
from optimizer.errors import EstimationError

if TYPE_CHECKING:
    from optimizer.config import Config
    from optimizer.store import Store

__all__ = [
    "LOG_COLUMNS",
    "UNIT_COLUMN",
    "assignment_units",
    "context_columns",
    "logs_from_store",
    "read_logged_csv",
    "validate_logs",
]

log = logging.getLogger(__name__)

#: Required columns of a log frame.
LOG_COLUMNS = ("arm", "reward", "propensity")
#: Optional column naming each session's assignment unit (sessions sharing one draw).
UNIT_COLUMN = "unit"
_RESERVED = (*LOG_COLUMNS, "segment", UNIT_COLUMN)


def context_columns(logs: pd.DataFrame) -> list[str]:
    """Columns the reward model may use: everything but arm, reward, propensity and unit."""
    return [c for c in logs.columns if c not in (*LOG_COLUMNS, UNIT_COLUMN)]


def validate_logs(logs: pd.DataFrame) -> pd.DataFrame:
    """Check a log frame and return it with clean dtypes (arm and segment as str, floats).

    Raises :class:`EstimationError` naming the column, how many rows are bad and
    the first bad row and value: a missing column, a missing arm or reward, a
    non-finite reward, a propensity missing, zero or outside (0, 1].

    >>> logs = pd.DataFrame({"arm": ["a"], "reward": [1], "propensity": [0.5]})
    >>> validate_logs(logs).dtypes["reward"]
    dtype('float64')
    """
    if not isinstance(logs, pd.DataFrame):
        raise TypeError(f"logs must be a pandas DataFrame, got {type(logs).__name__}")
    missing = [c for c in LOG_COLUMNS if c not in logs.columns]
    if missing:
        raise EstimationError(
            f"logs lack the column(s) {missing}; required: {list(LOG_COLUMNS)}, "
            f"got {list(logs.columns)}"
        )
    if logs.empty:
        raise EstimationError("logs have no rows: no session to evaluate from")
    out = logs.copy()
    arm_missing = out["arm"].isna()
    if arm_missing.any():
        _raise_bad("arm", arm_missing, out["arm"], "is missing")
    out["arm"] = out["arm"].astype(str)
    for column in ("reward", "propensity"):
        values = pd.to_numeric(out[column], errors="coerce")
        bad = values.isna()
        if bad.any():
            _raise_bad(column, bad, out[column], "is missing or not a number")
        out[column] = values.astype(float)
    reward, propensity = out["reward"], out["propensity"]
    if not np.isfinite(reward.to_numpy()).all():
        _raise_bad("reward", ~np.isfinite(reward), reward, "must be finite")
    outside = ~((propensity > 0) & (propensity <= 1))
    if outside.any():
        _raise_bad("propensity", outside, propensity, "must be in (0, 1]")
    if "segment" in out:
        out["segment"] = out["segment"].fillna(ALL_SEGMENTS).astype(str)
    else:
        out["segment"] = ALL_SEGMENTS
    if UNIT_COLUMN in out:  # a session without a unit is a unit of its own
        own = pd.Series(out.index.astype(str), index=out.index)
        out[UNIT_COLUMN] = out[UNIT_COLUMN].astype(object).where(out[UNIT_COLUMN].notna(), own)
        out[UNIT_COLUMN] = out[UNIT_COLUMN].astype(str)
    return out


def _raise_bad(column: str, bad: pd.Series, values: pd.Series, what: str) -> None:
    first = bad[bad].index[0]
    value = values.loc[first]
    value = value.item() if isinstance(value, np.generic) else value  # 0.0, not np.float64(0.0)
    first = first.item() if isinstance(first, np.generic) else first
    raise EstimationError(
        f"column {column!r} {what}: {int(bad.sum())} of {len(bad)} rows, "
        f"first at row {first!r} with value {value!r}"
    )


def read_logged_csv(path: str | Path) -> pd.DataFrame:
    """Read and validate external logs: columns ``arm``, ``reward``, ``propensity``,
    optional ``segment`` and context columns. Row labels are the CSV line numbers,
    so errors point at the line to fix."""
    path = Path(path)
    try:
        frame = pd.read_csv(path, dtype={"arm": str, "segment": str})
    except FileNotFoundError:
        raise EstimationError(f"logged file {str(path)!r} does not exist") from None
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise EstimationError(f"logged file {str(path)!r} is not a readable CSV: {exc}") from None
    frame.index = pd.RangeIndex(2, len(frame) + 2, name="line")  # line 1 is the header
    # A pandas index written by `to_csv` is a row number, not context.
    frame = frame.drop(columns=[c for c in frame.columns if str(c).startswith("Unnamed: ")])
    try:
        return validate_logs(frame)
    except EstimationError as exc:
        raise EstimationError(f"{path}: {exc}") from None


def logs_from_store(store: Store, config: Config, *, now: datetime | None = None) -> pd.DataFrame:
    """Logs of ``config.experiment`` from the store, one row per session whose KPI is complete.

    The reward is the configured KPI (:func:`optimizer.kpi.session_frame`); sessions
    whose attribution window is still open are left out, because an open window is
    not a zero. Context keys recorded with the assignment become columns (a key that
    clashes with a log column is prefixed ``context.``); the index is the session id.
    ``unit`` is the session of the draw each session's arm comes from, and
    ``propensity`` that draw's propensity (:func:`assignment_units`).
    """
    from optimizer import kpi  # the KPI module is heavy and optional for CSV logs
    from optimizer.holdback import bandit_frame
    from optimizer.store import schema

    # The holdback is another policy's traffic (propensity 1 on the baseline): not these logs.
    sessions = bandit_frame(kpi.session_frame(store, config, now=now))
    columns = ["session_id", "arm", "reward", "propensity", "segment"]
    if sessions.empty:
        return pd.DataFrame(columns=columns).set_index("session_id")
    complete = (
        sessions["complete"].astype(bool) if "complete" in sessions else sessions["reward"].notna()
    )
    sessions = sessions.loc[complete & sessions["reward"].notna()]
    log.info("ope: %d complete sessions of experiment %r", len(sessions), config.experiment.id)
    frame = sessions.rename(columns={"arm_id": "arm"})[columns].set_index("session_id")
    a = schema.assignments
    query = (
        sa.select(
            a.c.session_id, a.c.user_id, a.c.propensity, a.c.sticky, a.c.context, a.c.assigned_at
        )
        .where(a.c.experiment_id == config.experiment.id)
        .order_by(a.c.assigned_at, a.c.id)
    )
    with store.engine.connect() as conn:
        rows = pd.DataFrame(conn.execute(query).all(), columns=list(query.selected_columns.keys()))
    contexts = dict(zip(rows["session_id"], rows["context"], strict=True))
    units = assignment_units(rows).reindex(frame.index)
    frame["propensity"] = units["propensity"].fillna(frame["propensity"])
    frame[UNIT_COLUMN] = units[UNIT_COLUMN]
    context = _flatten_context(pd.Series([contexts.get(s) for s in frame.index], index=frame.index))
    return frame.join(context, how="left")


def assignment_units(rows: pd.DataFrame) -> pd.DataFrame:
    """Per session: its unit (the session of the draw its arm comes from) and that propensity.

    ``rows`` are assignments in time order with ``session_id``, ``user_id``,
    ``propensity``, ``sticky`` and ``context``. A sticky session joins the user's
    latest draw. Rows logged before the ``sticky`` column existed (NULL) take the
    flag from ``context.returning``; their own propensity (the arm's share at the
    time, not the 1.0 of a kept arm) is never used — the draw's is, and draws were
    always logged exactly.

    >>> rows = pd.DataFrame({"session_id": ["s1", "s2", "s3"], "user_id": ["u", "u", "u"],
    ...     "propensity": [0.5, 1.0, 0.2], "sticky": [False, True, None],
    ...     "context": [{}, {"returning": True}, {"returning": True}]})
    >>> assignment_units(rows)[["unit", "propensity"]].values.tolist()
    [['s1', 0.5], ['s1', 0.5], ['s1', 0.5]]
    """
    if rows.empty:
        return pd.DataFrame(columns=[UNIT_COLUMN, "propensity"])
    legacy = [
        bool((c if isinstance(c, dict) else json.loads(c or "{}")).get("returning", False))
        for c in rows["context"]
    ]
    sticky = rows["sticky"].astype(object).where(rows["sticky"].notna(), pd.Series(legacy))
    sticky = sticky.astype(bool).to_numpy()
    draw = pd.Series(np.where(sticky, None, rows["session_id"]), index=rows.index, dtype=object)
    unit = draw.groupby(rows["user_id"]).ffill()  # the user's latest draw
    unit = unit.where(unit.notna(), rows["session_id"])  # a spell whose draw is not in view
    propensity = rows.set_index("session_id")["propensity"]
    return pd.DataFrame(
        {
            UNIT_COLUMN: unit.to_numpy(),
            "propensity": propensity.reindex(unit.to_numpy()).to_numpy(),
        },
        index=pd.Index(rows["session_id"].to_numpy(), name="session_id"),
    )


def _flatten_context(contexts: pd.Series) -> pd.DataFrame:
    if contexts.empty:
        return pd.DataFrame(index=contexts.index)
    records: list[dict[str, Any]] = [
        json.loads(c) if isinstance(c, str) else c if isinstance(c, dict) else {} for c in contexts
    ]
    flat = pd.json_normalize(records)
    flat.index = contexts.index
    flat = flat.dropna(axis=1, how="all")
    return flat.rename(columns={c: f"context.{c}" for c in flat.columns if c in _RESERVED})
