"""Per-session and per-turn signals mining ranks by, shared by the full and the kept path.

The full path (:func:`optimizer.fewshot.mining.turn_reasons`) computes them for every
turn; the kept state (:mod:`optimizer.fewshot.state`) for the sessions that changed.
One definition keeps the two equal.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from optimizer.config import Config
from optimizer.store import schema

__all__ = ["RANK_COLUMNS", "flag_turns", "outcome_signals", "reward_so_far"]

#: The columns of ``turns`` a mining run ranks by (texts come later, for the few it banks).
RANK_COLUMNS = ("id", "session_id", "arm_id", "prompt_id", "error", "created_at")
#: Session ids per ``IN (...)`` list: SQLite binds at most 999 parameters in old builds.
_CHUNK = 500


def reward_so_far(frame: pd.DataFrame) -> np.ndarray:
    """``Σ weight × value so far`` of each row of a :func:`~optimizer.kpi.session_frame`."""
    so_far = np.zeros(len(frame))
    for term in frame.attrs.get("kpi_terms", []):
        so_far += term["weight"] * frame[f"{term['column']}_observed"].fillna(0).to_numpy()
    return so_far


def outcome_signals(
    conn: sa.Connection,
    config: Config,
    sessions: pd.DataFrame,
    now: datetime,
    *,
    only: bool = False,
) -> pd.DataFrame:
    """``sessions`` (indexed by session id) with the outcome columns mining uses.

    ``outcome:<name>``, ``resolved_quickly`` and ``slow_support`` from the outcome
    events reported with the session's id up to ``now``. With ``only`` just the
    sessions of the index are read (the incremental step, :mod:`optimizer.fewshot.state`).
    """
    fs = config.fewshot
    names = sorted({*fs.outcomes, fs.resolved_outcome, fs.support_minutes_outcome})
    oc = schema.outcomes
    query = (
        sa.select(
            oc.c.session_id,
            oc.c.name,
            sa.func.sum(oc.c.value).label("total"),
            sa.func.max(oc.c.value).label("peak"),
        )
        # Other experiments' sessions drop out at the reindex below: a list of this
        # experiment's session ids would overflow SQLite's bound parameters at scale.
        .where(oc.c.session_id.is_not(None), oc.c.name.in_(names), oc.c.occurred_at <= now)
        .group_by(oc.c.session_id, oc.c.name)
    )
    rows: list[Any] = []
    if only:
        ids = sessions.index.tolist()
        for i in range(0, len(ids), _CHUNK):
            rows.extend(conn.execute(query.where(oc.c.session_id.in_(ids[i : i + _CHUNK]))).all())
    else:
        rows = list(conn.execute(query).all())
    outcomes = pd.DataFrame(rows, columns=["session_id", "name", "total", "peak"])
    peak = outcomes.pivot_table(index="session_id", columns="name", values="peak", aggfunc="max")
    total = outcomes.pivot_table(index="session_id", columns="name", values="total", aggfunc="sum")
    for name in fs.outcomes:
        sessions[f"outcome:{name}"] = (
            peak[name].reindex(sessions.index).fillna(0) > 0 if name in peak else False
        )
    resolved = (
        peak[fs.resolved_outcome].reindex(sessions.index).fillna(0) > 0
        if fs.resolved_outcome in peak
        else False
    )
    minutes = (
        total[fs.support_minutes_outcome].reindex(sessions.index).fillna(0)
        if fs.support_minutes_outcome in total
        else pd.Series(0.0, index=sessions.index)
    )
    sessions["resolved_quickly"] = resolved & (minutes <= fs.max_support_minutes)
    sessions["slow_support"] = minutes > fs.max_support_minutes
    return sessions


def flag_turns(
    turns: pd.DataFrame, *, up: set[str], down: set[str], config: Config
) -> pd.DataFrame:
    """``turns`` joined with their sessions' signals, with ``reasons`` (a list per turn).

    ``up`` / ``down``: ids of turns with a current thumbs-up / thumbs-down.
    """
    fs = config.fewshot
    is_up = turns["id"].isin(up)
    is_down = turns["id"].isin(down)
    failed = turns["error"].fillna("").astype(str).str.len() > 0
    complete = turns["complete"].astype("boolean").fillna(False).astype(bool)
    reward = turns["reward"].astype(float)

    def flag(column: str) -> pd.Series:
        return (
            turns[column].astype("boolean").fillna(False).astype(bool)
            if column in turns
            else is_up & False
        )

    flags = {"thumbs_up": is_up & fs.thumbs_up, "reward": complete & (reward >= fs.min_reward)}
    flags |= {f"outcome:{name}": flag(f"outcome:{name}") for name in fs.outcomes}
    flags["resolved_quickly"] = flag("resolved_quickly")
    eligible = ~failed & ~is_down & ~flag("slow_support")
    table = pd.DataFrame(flags).to_numpy() & eligible.to_numpy()[:, None]
    names = list(flags)
    # Each row's flags as one number; the few distinct combinations become lists once
    # (shared between rows: read them, do not change them).
    codes = table.astype(np.int64) @ (1 << np.arange(len(names), dtype=np.int64))
    lists = {int(c): [n for j, n in enumerate(names) if c >> j & 1] for c in np.unique(codes)}
    turns = turns.copy()
    turns["reasons"] = [lists[c] for c in codes.tolist()]
    turns["complete"] = complete
    return turns
