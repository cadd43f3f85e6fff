"""Logged bandit feedback: one row per session with the arm served, its propensity and the reward.

Every estimator reads the same frame: columns ``arm``, ``reward``, ``propensity``,
an optional ``segment`` (the allocation key; ``"*"`` when absent) and any number
of context columns (categorical or numeric) the direct method may use. Logs come
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

__all__ = ["LOG_COLUMNS", "context_columns", "logs_from_store", "read_logged_csv", "validate_logs"]

log = logging.getLogger(__name__)

#: Required columns of a log frame.
LOG_COLUMNS = ("arm", "reward", "propensity")
_RESERVED = (*LOG_COLUMNS, "segment")


def context_columns(logs: pd.DataFrame) -> list[str]:
    """Columns the reward model may use: everything but arm, reward and propensity."""
    return [c for c in logs.columns if c not in LOG_COLUMNS]


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
    query = sa.select(a.c.session_id, a.c.context).where(a.c.experiment_id == config.experiment.id)
    with store.engine.connect() as conn:
        contexts = {row.session_id: row.context for row in conn.execute(query)}
    context = _flatten_context(pd.Series([contexts.get(s) for s in frame.index], index=frame.index))
    return frame.join(context, how="left")


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
