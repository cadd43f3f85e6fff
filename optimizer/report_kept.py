"""The report's live figures from kept sums: a cost in days × arms, not in sessions.

:mod:`optimizer.fewshot.state` keeps, per hour and per day of assignment, arm and
segment, the sums the report shows (sessions, complete sessions and their reward,
conversions and sessions whose conversion window closed, turns, errors, votes,
cost, first sessions of users), and a histogram of support minutes per arm. It
updates them for the sessions that changed since its last refresh, in the same
pass as the few-shot state. The operator page refreshes it (when no optimizer run
holds it) and reads the sums: a few hundred rows for a year of traffic.

The median support minutes come from the histogram (bins 0.2% wide: within 0.1%
of the exact median).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from optimizer.config import Config
from optimizer.fewshot.state import refresh_state
from optimizer.fewshot.state_sums import bin_value
from optimizer.store import Store, schema
from optimizer.store.store import fetch_tuples

__all__ = ["HOURLY_SPAN", "LiveFigures", "kept_figures"]

log = logging.getLogger(__name__)

_SUMS = tuple(schema.REPORT_FIGURES)
#: Experiments shorter than this are bucketed by hour in the time series, longer ones by day.
HOURLY_SPAN = timedelta(days=2)


@dataclass(frozen=True)
class LiveFigures:
    """The report's figures that come from the sessions, however they were computed.

    ``arms`` / ``segments``: per arm / per segment and arm, the columns of
    :func:`optimizer.kpi.arm_metrics` plus the observed mean KPI and cost;
    ``buckets``: per assignment period (``bucket``, a UTC timestamp) and arm the
    ``sessions``, ``complete`` sessions and their ``reward`` sum, with ``freq`` "h"
    or "D"; ``totals``: sessions, complete sessions and users.
    """

    totals: dict[str, int]
    arms: pd.DataFrame
    segments: pd.DataFrame
    buckets: pd.DataFrame
    freq: str


def kept_figures(store: Store, config: Config, *, now: datetime) -> LiveFigures:
    """The live figures as of ``now`` (see the module docstring)."""
    refresh_state(store, config, now=now, wait_s=0.0)
    exp = config.experiment
    rb, rs, a = schema.report_buckets, schema.report_support, schema.assignments
    sums = [sa.func.sum(rb.c[n]) for n in _SUMS]
    with store.engine.connect() as conn:
        # The first and last assignment: an index seek each (``min`` and ``max`` in one
        # query scan the experiment's whole index range on SQLite: 2 s at 10M sessions).
        ends = sa.select(a.c.assigned_at).where(a.c.experiment_id == exp.id, a.c.assigned_at <= now)
        lo = conn.execute(ends.order_by(a.c.assigned_at).limit(1)).scalar()
        hi = conn.execute(ends.order_by(a.c.assigned_at.desc()).limit(1)).scalar()
        short = lo is not None and _utc(hi) - _utc(lo) <= HOURLY_SPAN
        kind = "h" if short else "d"
        mine = sa.and_(rb.c.experiment_id == exp.id, rb.c.kind == kind)
        by_arm = fetch_tuples(conn, sa.select(rb.c.arm_id, *sums).where(mine).group_by(rb.c.arm_id))
        by_segment = (
            fetch_tuples(
                conn,
                sa.select(rb.c.segment, rb.c.arm_id, *sums)
                .where(mine)
                .group_by(rb.c.segment, rb.c.arm_id),
            )
            if exp.segment_by
            else []
        )
        buckets = fetch_tuples(
            conn,
            sa.select(rb.c.bucket, rb.c.arm_id, *sums)
            .where(mine)
            .group_by(rb.c.bucket, rb.c.arm_id),
        )
        support = fetch_tuples(
            conn,
            sa.select(rs.c.arm_id, rs.c.bin, rs.c.n)
            .where(rs.c.experiment_id == exp.id, rs.c.n > 0)
            .order_by(rs.c.arm_id, rs.c.bin),
        )
    arms = _observed(pd.DataFrame(by_arm, columns=["arm_id", *_SUMS]), ["arm_id"], config)
    if len(arms):
        medians = _medians(support)
        arms["median_support_minutes"] = [medians.get(arm, np.nan) for arm in arms.index]
        if not any(t.source == "outcome:support_minutes" for t in config.kpi.terms):
            arms["median_support_minutes"] = np.nan
    segments = _observed(
        pd.DataFrame(by_segment, columns=["segment", "arm_id", *_SUMS]),
        ["segment", "arm_id"],
        config,
    )
    table = pd.DataFrame(buckets, columns=["bucket", "arm_id", *_SUMS])
    table = table[table["sessions"] > 0]
    table["bucket"] = pd.to_datetime(table["bucket"], utc=True, format="ISO8601")
    table = table.astype({"sessions": np.int64, "complete": np.int64})
    totals = {
        "sessions": int(arms["sessions"].sum()) if len(arms) else 0,
        "complete_sessions": int(arms["complete_sessions"].sum()) if len(arms) else 0,
        "users": int(arms["users"].sum()) if len(arms) else 0,
    }
    return LiveFigures(
        totals=totals,
        arms=arms.drop(columns=["users"]) if len(arms) else arms,
        segments=segments.drop(columns=["users"]) if len(segments) else segments,
        buckets=table[["bucket", "arm_id", "sessions", "complete", "reward"]],
        freq="h" if short else "D",
    )


def _utc(value: Any) -> pd.Timestamp:
    stamp = pd.Timestamp(value)
    return stamp.tz_localize("UTC") if stamp.tzinfo is None else stamp.tz_convert("UTC")


def _observed(sums: pd.DataFrame, by: list[str], config: Config) -> pd.DataFrame:
    """The columns of :func:`optimizer.report._observed` from the kept sums."""
    sums = sums[sums["sessions"] > 0]
    if sums.empty:
        return pd.DataFrame()
    s = sums.set_index(by).sort_index()
    counts = (
        "sessions",
        "complete",
        "conversions",
        "conversion_known",
        "thumbs_up",
        "thumbs_down",
        "rated",
        "turns",
        "errors",
        "users",
    )
    out = pd.DataFrame(index=s.index)
    for name in counts:
        out[name] = s[name].round().astype(np.int64)
    out = out.rename(columns={"complete": "complete_sessions"})
    out["median_support_minutes"] = np.nan
    rated = out["rated"].where(out["rated"] > 0)
    has_conversion = any(t.source == "outcome:conversion" for t in config.kpi.terms)
    out["conversion_rate"] = (
        out["conversions"] / out["conversion_known"].where(out["conversion_known"] > 0)
        if has_conversion
        else np.nan
    )
    out["thumbs_up_rate"] = out["thumbs_up"] / rated
    out["thumbs_down_rate"] = out["thumbs_down"] / rated
    out["error_rate"] = out["errors"] / out["turns"].where(out["turns"] > 0)
    complete = out["complete_sessions"].where(out["complete_sessions"] > 0)
    out["kpi_observed_mean"] = s["reward"] / complete
    out["cost_usd_total"] = s["cost"]
    out["cost_per_session"] = s["cost"] / out["sessions"]
    return out


def _medians(support: list[tuple[Any, ...]]) -> dict[str, float]:
    """Median per arm from the histogram (the mean of the two middle values when even)."""
    out: dict[str, float] = {}
    frame = pd.DataFrame(support, columns=["arm_id", "bin", "n"])
    for arm, rows in frame.groupby("arm_id", sort=False):
        bins, n = rows["bin"].to_numpy(), rows["n"].to_numpy(dtype=np.int64)
        total = int(n.sum())
        if total <= 0:
            continue
        ends = np.cumsum(n)
        lo = bins[np.searchsorted(ends, (total - 1) // 2 + 1)]
        hi = bins[np.searchsorted(ends, total // 2 + 1)]
        out[str(arm)] = (bin_value(int(lo)) + bin_value(int(hi))) / 2
    return out
