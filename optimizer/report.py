"""The numbers of an experiment in one JSON-ready dict, for the dashboard and ``flywheel report``.

Where each number comes from:

- the newest **policy snapshot**: what the optimizer decided and believed — posterior
  KPI mean and 95% interval, conversion interval, probability best, expected loss,
  guardrail checks, SRM, stop rule. The page shows the optimizer's own numbers
  rather than re-deriving them;
- :func:`optimizer.kpi.session_frame`: live counts and rates per arm and segment, and
  the series behind the plots, aggregated with pandas (no per-session Python loops);
- **arm events**: statuses, which guardrail fired, when, and its evidence;
- the **Assigner**: the allocation serving uses right now (snapshot minus paused arms);
- the **audit log**: the history of operator actions.

Everything is plain ``dict``/``list``/``float``/``str``/``None`` (NaN becomes None),
so ``json.dumps(report)`` works as is.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from optimizer import kpi
from optimizer.assignment import ALL_SEGMENTS, Assigner
from optimizer.clock import as_utc, utcnow
from optimizer.config import Config
from optimizer.cost import COST_COLUMN
from optimizer.errors import PolicyError
from optimizer.holdback import holdback_lift
from optimizer.jsonable import finite, jsonable
from optimizer.report_kept import HOURLY_SPAN, LiveFigures, kept_figures
from optimizer.store import Store, schema
from optimizer.store.schema import ARM_STATUS_BY_EVENT

log = logging.getLogger(__name__)

__all__ = [
    "STATUS_LABELS",
    "experiment_report",
    "kpi_per_dollar",
    "promotion_estimates",
    "recent_sessions",
]

STATUS_LABELS = {
    "active": "active",
    "champion": "champion",
    "paused_guardrail": "paused by guardrail",
    "paused_operator": "paused by operator",
    "retired": "retired",
}
#: About this many policy snapshots at most are read for the series over time.
MAX_SNAPSHOTS = 500


def experiment_report(
    store: Store,
    config: Config,
    *,
    now: datetime | None = None,
    history_limit: int = 50,
    kept: bool = False,
) -> dict[str, Any]:
    """Everything the operator page shows about ``config.experiment``, as of ``now``.

    With ``kept`` the live figures come from the sums per hour and day of assignment,
    arm and segment that :mod:`optimizer.fewshot.state` keeps up to date (brought up
    to ``now`` first, which costs what changed since its last refresh): the cost is
    that of the experiment's days × arms, not of its sessions. The figures are the
    same; the median support minutes come from a histogram (within 0.1%), and the
    holdback lift is the newest snapshot's (computed by the optimizer job on every
    session). Without it every session is read (:func:`optimizer.kpi.session_frame`).

    >>> from optimizer.config import load_config
    >>> store = Store("sqlite:///:memory:"); store.create_all()
    >>> report = experiment_report(store, load_config("/nonexistent.toml", environ=False))
    >>> report["totals"]["sessions"], report["snapshot"]
    (0, None)
    """
    if history_limit < 0:
        raise ValueError(f"history_limit must be >= 0, got {history_limit}")
    now = as_utc(now) if now is not None else utcnow()
    exp = config.experiment
    snapshot = store.latest_snapshot(exp.id)
    summary: Mapping[str, Any] = (snapshot.summary or {}) if snapshot is not None else {}
    if kept:
        live = kept_figures(store, config, now=now)
        # No snapshot yet: the lift's figures are unknown (None) until the optimizer runs.
        holdback = summary.get("holdback") or holdback_lift(
            pd.DataFrame({"holdback": pd.Series(dtype=bool)}), share=exp.holdback
        )
    else:
        frame = kpi.session_frame(store, config, now=now, with_cost=True)
        live = _frame_figures(config, frame)
        holdback = holdback_lift(
            frame,
            share=exp.holdback,
            delay=config.policy.delay,
            samples=config.policy.samples,
            random_state=0,
        )
    events = _arm_events(store, exp.id)
    allocation = _serving_allocation(store, config)
    arms = _arm_rows(config, live, events, allocation, summary, known=_known_arms(store, exp.id))
    _add_models(arms, store.arms(exp.id), config.model.name)
    leader = _leader(arms)
    report: dict[str, Any] = {
        "experiment": {
            "id": exp.id,
            "champion": next((a["id"] for a in arms if a["status"] == "champion"), exp.champion),
            "policy": config.policy.kind,
            "segment_by": list(exp.segment_by),
            "kpi_terms": [
                {
                    "name": t.name,
                    "source": t.source,
                    "weight": t.weight,
                    "cap": t.cap,
                    "window_days": t.window_days,
                }
                for t in config.kpi.terms
            ],
            "guardrails": [g.model_dump() for g in config.kpi.guardrails],
        },
        "now": now.isoformat(),
        "simulated": bool(_any_simulated(store, exp.id)),
        "totals": live.totals,
        "snapshot": _snapshot_info(snapshot, now),
        "arms": arms,
        "leader": leader,
        "stop": summary.get("stop"),
        "srm": summary.get("srm"),
        "holdback": holdback,
        "guardrail_firings": _guardrail_firings(events),
        "segments": _segment_rows(config, live, allocation, summary),
        "series": _series(store, config, live, [a["id"] for a in arms]),
        "history": _history(store, exp.id, events, history_limit),
    }
    return jsonable(report)


# -- live figures ------------------------------------------------------------------------


def _frame_figures(config: Config, frame: pd.DataFrame) -> LiveFigures:
    """:class:`LiveFigures` from every session (:func:`optimizer.kpi.session_frame`)."""
    totals = {
        "sessions": len(frame),
        "complete_sessions": int(frame["complete"].sum()) if len(frame) else 0,
        "users": int(frame["user_id"].nunique()) if len(frame) else 0,
    }
    if frame.empty:
        empty = pd.DataFrame(columns=["bucket", "arm_id", "sessions", "complete", "reward"])
        return LiveFigures(totals, pd.DataFrame(), pd.DataFrame(), empty, "D")
    assigned = frame["assigned_at"]
    freq = "h" if assigned.max() - assigned.min() <= HOURLY_SPAN else "D"
    complete = frame["complete"].to_numpy(dtype=bool)
    buckets = (
        frame.assign(
            bucket=assigned.dt.floor(freq),
            done=complete.astype(int),
            kpi=np.where(complete, frame["reward"].to_numpy(dtype=float), 0.0),
        )
        .groupby(["bucket", "arm_id"])
        .agg(sessions=("session_id", "size"), complete=("done", "sum"), reward=("kpi", "sum"))
        .reset_index()
    )
    segments = (
        _observed(frame, ["segment", "arm_id"]) if config.experiment.segment_by else pd.DataFrame()
    )
    return LiveFigures(totals, _observed(frame, ["arm_id"]), segments, buckets, freq)


# -- arms ---------------------------------------------------------------------------------


def _add_models(arms: list[dict[str, Any]], rows: Sequence[Any], default: str) -> None:
    """Each arm's model (``default`` for arms without one) and its fine-tune manifest, if any."""
    by_id = {r.id: r for r in rows}
    for arm in arms:
        row = by_id.get(arm["id"])
        arm["model"] = (row.model if row is not None else None) or default
        arm["model_default"] = row is None or row.model is None
        arm["model_params"] = dict(row.model_params or {}) if row is not None else {}
        arm["manifest"] = row.manifest if row is not None else None


def _known_arms(store: Store, experiment_id: str) -> list[str]:
    return [row.id for row in store.arms(experiment_id)]


def _arm_events(store: Store, experiment_id: str) -> pd.DataFrame:
    ev = schema.arm_events
    frame = store.frame(ev, ev.c.experiment_id == experiment_id)
    return frame.sort_values("id", kind="stable").reset_index(drop=True)


def _statuses(events: pd.DataFrame, champion: str | None) -> dict[str, dict[str, Any]]:
    """Current status per arm with the event that set it (same rules as ``Store.arm_statuses``).

    Before any ``promoted`` event the configured champion is shown as champion.
    """
    current: dict[str, dict[str, Any]] = {}
    for row in events.itertuples(index=False):  # one row per status change: a handful
        new = ARM_STATUS_BY_EVENT.get(row.kind)
        if new is None:
            continue
        if new == "champion":
            for info in current.values():
                if info["status"] == "champion":
                    info["status"] = "active"
        current[row.arm_id] = {
            "status": new,
            "since": row.created_at,
            "actor": row.actor,
            "event": row.kind,
            "evidence": row.evidence,
        }
    has_champion = any(i["status"] == "champion" for i in current.values())
    if champion and not has_champion and current.get(champion, {}).get("status") == "active":
        current[champion]["status"] = "champion"
    return current


def _serving_allocation(store: Store, config: Config) -> dict[str, dict[str, float]]:
    """The allocation the chat path would use for the next session, per segment."""
    exp = config.experiment
    assigner = Assigner(store, exp.id, salt=exp.salt, segment_by=exp.segment_by, snapshot_ttl_s=0)
    try:
        return {seg: dict(p) for seg, p in assigner.allocation().segments.items()}
    except PolicyError:
        return {}


def _observed(frame: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """Live per-group figures: :func:`optimizer.kpi.arm_metrics` plus the observed mean KPI."""
    out = kpi.arm_metrics(frame, by)
    groups = [frame[c] for c in by]
    out["kpi_observed_mean"] = frame["reward"].groupby(groups).mean()
    if COST_COLUMN in frame.columns:
        out["cost_usd_total"] = frame[COST_COLUMN].groupby(groups).sum()
        out["cost_per_session"] = frame[COST_COLUMN].groupby(groups).mean()
    return out


def kpi_per_dollar(kpi_mean: Any, cost_per_session: Any) -> float | None:
    """KPI per USD spent: mean KPI / mean cost of a session (None when free or unknown).

    >>> kpi_per_dollar(0.05, 0.002), kpi_per_dollar(0.05, 0.0)
    (25.0, None)
    """
    try:
        k, c = float(kpi_mean), float(cost_per_session)
    except (TypeError, ValueError):
        return None
    if not (np.isfinite(k) and np.isfinite(c)) or c <= 0:
        return None
    return k / c


def _arm_rows(
    config: Config,
    live: LiveFigures,
    events: pd.DataFrame,
    allocation: Mapping[str, Mapping[str, float]],
    summary: Mapping[str, Any],
    *,
    known: Sequence[str],
) -> list[dict[str, Any]]:
    configured = {a.id: a for a in config.experiment.arms}
    ids = list(configured) + [a for a in known if a not in configured]
    observed = live.arms
    ids += sorted(set(observed.index) - set(ids)) if len(observed) else []
    statuses = _statuses(events, config.experiment.champion)
    posterior = summary.get("arms", {}) if isinstance(summary, Mapping) else {}
    serving = allocation.get(ALL_SEGMENTS, {})
    caps = _latest_by_arm(events, "cap_set")
    pauses = _latest_by_arm(events, "paused_guardrail")
    rows = []
    for arm_id in ids:  # one row per arm: a handful
        arm_cfg = configured.get(arm_id)
        status = statuses.get(arm_id, {"status": "active"})
        obs = observed.loc[arm_id].to_dict() if arm_id in observed.index else {}
        post = posterior.get(arm_id, {})
        fired = pauses.get(arm_id)
        rows.append(
            {
                "id": arm_id,
                "prompt": arm_cfg.prompt if arm_cfg else None,
                "fewshot": arm_cfg.fewshot if arm_cfg else None,
                "configured": arm_cfg is not None,
                "status": status["status"],
                "status_label": STATUS_LABELS.get(status["status"], status["status"]),
                "status_since": status.get("since"),
                "status_actor": status.get("actor"),
                "allocation": serving.get(arm_id, 0.0),
                "policy_allocation": post.get("allocation"),
                "sessions": int(obs.get("sessions", 0)),
                "complete_sessions": int(obs.get("complete_sessions", 0)),
                "conversions": obs.get("conversions"),
                "conversion_rate": obs.get("conversion_rate"),
                "conversion_ci": post.get("conversion_ci"),
                "thumbs_up_rate": obs.get("thumbs_up_rate"),
                "thumbs_down_rate": obs.get("thumbs_down_rate"),
                "error_rate": obs.get("error_rate"),
                "median_support_minutes": obs.get("median_support_minutes"),
                "kpi_observed_mean": obs.get("kpi_observed_mean"),
                "cost_usd_total": obs.get("cost_usd_total"),
                "cost_per_session": obs.get("cost_per_session"),
                # the posterior KPI when there is one (the observed mean waits for windows)
                "kpi_per_dollar": kpi_per_dollar(
                    post.get("kpi_mean")
                    if post.get("kpi_mean") is not None
                    else obs.get("kpi_observed_mean"),
                    obs.get("cost_per_session"),
                ),
                "kpi_mean": post.get("kpi_mean"),
                "kpi_ci": post.get("kpi_ci"),
                "prob_best": post.get("prob_best"),
                "expected_loss": post.get("expected_loss"),
                "snapshot_sessions": post.get("sessions"),
                "guardrails": post.get("guardrails"),
                "guardrail_metrics": _breached_metrics(fired)
                if status["status"] == "paused_guardrail"
                else [],
                "cap": (caps.get(arm_id) or {}).get("evidence", {}).get("cap"),
            }
        )
    return rows


def _latest_by_arm(events: pd.DataFrame, kind: str) -> dict[str, dict[str, Any]]:
    if events.empty:
        return {}
    latest = events[events["kind"] == kind].drop_duplicates("arm_id", keep="last")
    return {
        r.arm_id: {"at": r.created_at, "actor": r.actor, "evidence": r.evidence}
        for r in latest.itertuples(index=False)
    }


def _breached_metrics(fired: Mapping[str, Any] | None) -> list[str]:
    evidence = (fired or {}).get("evidence") or {}
    checks = evidence.get("checks") or [evidence]
    return [c["metric"] for c in checks if c.get("metric")]


def _leader(arms: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    scored = [a for a in arms if finite(a.get("prob_best")) is not None]
    if not scored:
        return None
    best = max(scored, key=lambda a: a["prob_best"])
    return {
        "arm": best["id"],
        "prob_best": best["prob_best"],
        "expected_loss": best.get("expected_loss"),
    }


def _snapshot_info(snapshot: Any, now: datetime) -> dict[str, Any] | None:
    if snapshot is None:
        return None
    created = as_utc(snapshot.created_at)
    return {
        "version": snapshot.version,
        "policy": snapshot.policy,
        "created_at": created,
        "age_s": (now - created).total_seconds(),
        "allocation": snapshot.allocation,
    }


def _guardrail_firings(events: pd.DataFrame) -> list[dict[str, Any]]:
    """Guardrail pauses, newest first, one entry per breached metric with its check."""
    if events.empty:
        return []
    fired = events[events["kind"] == "paused_guardrail"].iloc[::-1]
    out = []
    for r in fired.itertuples(index=False):
        evidence = r.evidence or {}
        for check in evidence.get("checks") or [evidence]:
            out.append(
                {
                    "arm": r.arm_id,
                    "at": r.created_at,
                    "actor": r.actor,
                    "metric": check.get("metric"),
                    "evidence": check,
                }
            )
    return out


# -- segments --------------------------------------------------------------------------------


def _segment_rows(
    config: Config,
    live: LiveFigures,
    allocation: Mapping[str, Mapping[str, float]],
    summary: Mapping[str, Any],
) -> list[dict[str, Any]]:
    """Per segment and arm: sessions, live rates, allocation now (only with ``segment_by``)."""
    if not config.experiment.segment_by or live.segments.empty:
        return []
    observed = live.segments.reset_index()
    seg_summary = summary.get("segments", {}) if isinstance(summary, Mapping) else {}
    rows = []
    for r in observed.sort_values(["segment", "arm_id"]).to_dict("records"):
        serving = allocation.get(r["segment"]) or allocation.get(ALL_SEGMENTS, {})
        post = (seg_summary.get(r["segment"]) or {}).get(r["arm_id"]) or {}
        rows.append(
            {
                "segment": r["segment"],
                "arm": r["arm_id"],
                "sessions": int(r["sessions"]),
                "allocation": serving.get(r["arm_id"], 0.0),
                "conversion_rate": r["conversion_rate"],
                "thumbs_up_rate": r["thumbs_up_rate"],
                "thumbs_down_rate": r["thumbs_down_rate"],
                "kpi_observed_mean": r["kpi_observed_mean"],
                "kpi_mean": post.get("kpi_mean"),
                "prob_best": post.get("prob_best"),
            }
        )
    return rows


# -- time series -----------------------------------------------------------------------------


def _series(
    store: Store, config: Config, live: LiveFigures, arm_ids: Sequence[str]
) -> dict[str, Any]:
    """Series behind the plots.

    Per assignment period (hour or day): sessions, traffic share, running mean KPI.
    Per policy snapshot: the allocation the policy set, and each guardrail check the
    optimizer made (arm value, champion value, limit, breach probability): exactly
    what the guardrails saw, without re-reading every turn.
    """
    allocation, guardrails = _snapshot_series(store, config.experiment.id)
    out: dict[str, Any] = {
        "bucket": "day",
        "times": [],
        "sessions": {},
        "traffic_share": {},
        "cumulative_kpi": {},
        "policy_allocation": allocation,
        "guardrails": guardrails,
    }
    table = live.buckets
    if table.empty:
        return out
    freq = live.freq
    times = pd.date_range(table["bucket"].min(), table["bucket"].max(), freq=freq)
    grouped = table.set_index(["bucket", "arm_id"])

    def wide(values: pd.Series) -> pd.DataFrame:
        return values.unstack("arm_id").reindex(index=times, columns=list(arm_ids))

    counts = wide(grouped["sessions"]).fillna(0)
    share = counts.div(counts.sum(axis=1).where(lambda s: s > 0), axis=0)
    # Running mean KPI over complete sessions, by assignment period.
    sums = wide(grouped["reward"]).fillna(0).cumsum()
    n = wide(grouped["complete"]).fillna(0).cumsum()
    out.update(
        bucket="hour" if freq == "h" else "day",
        times=[t.isoformat() for t in times],
        sessions=_columns(counts),
        traffic_share=_columns(share),
        cumulative_kpi=_columns(sums / n.where(n > 0)),
    )
    return out


def _columns(table: pd.DataFrame) -> dict[str, list[float | None]]:
    return {str(col): [finite(v) for v in table[col].to_numpy()] for col in table.columns}


def _snapshot_series(store: Store, experiment_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(allocation series, guardrail series) from at most about ``MAX_SNAPSHOTS`` snapshots.

    With more snapshots, every k-th version is read (and always the newest), so
    a server that refits every few minutes for months still loads fast. Only the
    allocation and the ``guardrails`` list of each summary leave the database.
    """
    ps = schema.policy_snapshots
    mine = ps.c.experiment_id == experiment_id
    rows: list[Any] = []
    with store.engine.connect() as conn:
        newest = conn.execute(sa.select(sa.func.max(ps.c.version)).where(mine)).scalar()
        if newest is not None:
            stride = max(1, math.ceil(newest / MAX_SNAPSHOTS))
            query = (
                sa.select(
                    ps.c.version, ps.c.created_at, ps.c.allocation, ps.c.summary["guardrails"]
                )
                .where(mine, sa.or_(ps.c.version % stride == 0, ps.c.version == newest))
                .order_by(ps.c.version)
            )
            rows = list(conn.execute(query).all())
    times = [as_utc(r[1]).isoformat() for r in rows]
    shares: dict[str, list[float | None]] = {}
    for i, row in enumerate(rows):
        for arm, p in (row[2] or {}).get("segments", {}).get(ALL_SEGMENTS, {}).items():
            shares.setdefault(arm, [0.0] * len(rows))[i] = float(p)
    allocation = {"times": times, "versions": [r[0] for r in rows], "arms": shares}

    metrics: dict[str, dict[str, Any]] = {}
    blank: list[float | None] = [None] * len(rows)
    for i, row in enumerate(rows):
        for check in row[3] or []:
            m = metrics.setdefault(
                check["metric"],
                {"arms": {}, "probability": {}, "champion": list(blank), "limit": list(blank)},
            )
            m["arms"].setdefault(check["arm"], list(blank))[i] = finite(check.get("arm_value"))
            m["probability"].setdefault(check["arm"], list(blank))[i] = finite(
                check.get("probability")
            )
            champion = finite(check.get("champion_value"))
            m["champion"][i] = champion
            m["limit"][i] = _limit(champion, check.get("limit"), check.get("limit_kind"))
    return allocation, {"times": times, "metrics": metrics}


def _limit(champion: float | None, limit: Any, kind: Any) -> float | None:
    """The value an arm may not exceed, given the champion's (None if unknown)."""
    bound = finite(limit)
    if champion is None or bound is None:
        return None
    return champion + bound if kind == "max_delta" else champion * bound


# -- history ---------------------------------------------------------------------------------


def _history(
    store: Store, experiment_id: str, events: pd.DataFrame, limit: int
) -> list[dict[str, Any]]:
    """Arm events and operator actions, newest first."""
    items = [
        {
            "at": r.created_at,
            "actor": r.actor,
            "action": r.kind,
            "target": r.arm_id,
            "details": r.evidence or {},
        }
        for r in events.tail(limit).itertuples(index=False)
    ]
    au = schema.audit_events
    # Dashboard arm actions are audited and also recorded as the arm events listed above.
    query = sa.select(au).where(au.c.action.not_like("arm.%")).order_by(au.c.id.desc()).limit(limit)
    with store.engine.connect() as conn:
        audit = conn.execute(query).all()
    items += [
        {
            "at": as_utc(r.created_at),
            "actor": r.actor,
            "action": r.action,
            "target": r.target,
            "details": r.details or {},
        }
        for r in audit
    ]
    items.sort(key=lambda item: as_utc(pd.Timestamp(item["at"]).to_pydatetime()), reverse=True)
    return items[:limit]


def _any_simulated(store: Store, experiment_id: str) -> bool:
    a = schema.assignments
    query = (
        sa.select(a.c.id)
        .where(a.c.experiment_id == experiment_id, a.c.simulated.is_(True))
        .limit(1)
    )
    with store.engine.connect() as conn:
        return conn.execute(query).first() is not None


# -- drill-down ------------------------------------------------------------------------------


def recent_sessions(
    store: Store, config: Config, arm_id: str, *, limit: int = 20
) -> list[dict[str, Any]]:
    """The newest ``limit`` sessions of an arm with their turns, votes and outcomes.

    Four indexed queries whatever the size of the store. Outcomes reported for
    the user without a session are listed with ``"scope": "user"``.
    """
    if not 1 <= limit <= 500:
        raise ValueError(f"limit must be between 1 and 500, got {limit}")
    a, t, fb, o = schema.assignments, schema.turns, schema.feedback, schema.outcomes
    with store.engine.connect() as conn:
        sessions = conn.execute(
            sa.select(a)
            .where(a.c.experiment_id == config.experiment.id, a.c.arm_id == arm_id)
            .order_by(a.c.assigned_at.desc(), a.c.id.desc())
            .limit(limit)
        ).all()
        ids = [s.session_id for s in sessions]
        users = sorted({s.user_id for s in sessions})
        turns = (
            conn.execute(sa.select(t).where(t.c.session_id.in_(ids)).order_by(t.c.created_at)).all()
            if ids
            else []
        )
        votes = conn.execute(sa.select(fb).where(fb.c.session_id.in_(ids))).all() if ids else []
        outcomes = (
            conn.execute(
                sa.select(o)
                .where(
                    sa.or_(
                        o.c.session_id.in_(ids),
                        sa.and_(o.c.session_id.is_(None), o.c.user_id.in_(users)),
                    )
                )
                .order_by(o.c.occurred_at)
            ).all()
            if ids
            else []
        )
    vote_by_turn: dict[str, list[Any]] = {}
    for v in votes:
        vote_by_turn.setdefault(v.turn_id, []).append(v)
    result = []
    for s in sessions:
        result.append(
            {
                "session_id": s.session_id,
                "user_id": s.user_id,
                "assigned_at": as_utc(s.assigned_at),
                "segment": s.segment,
                "propensity": s.propensity,
                "snapshot_version": s.snapshot_version,
                "simulated": bool(s.simulated),
                "turns": [
                    {
                        "id": turn.id,
                        "at": as_utc(turn.created_at),
                        "user_message": turn.user_message,
                        "reply": turn.reply,
                        "latency_ms": turn.latency_ms,
                        "error": turn.error,
                        "trace_id": turn.trace_id,
                        "votes": [
                            {"value": v.value, "comment": v.comment}
                            for v in vote_by_turn.get(turn.id, [])
                            if v.value is not None
                        ],
                    }
                    for turn in turns
                    if turn.session_id == s.session_id
                ],
                "outcomes": [
                    {
                        "name": out.name,
                        "value": out.value,
                        "at": as_utc(out.occurred_at),
                        "source": out.source,
                        "scope": "session" if out.session_id else "user",
                    }
                    for out in outcomes
                    if out.session_id == s.session_id
                    or (out.session_id is None and out.user_id == s.user_id)
                ],
            }
        )
    return jsonable(result)


# -- off-policy estimates --------------------------------------------------------------------


def promotion_estimates(
    store: Store, config: Config, *, now: datetime | None = None, n_bootstrap: int = 200
) -> dict[str, Any]:
    """What the KPI would be under the current policy and if each arm got all traffic.

    Off-policy estimates (SNIPS and doubly robust, :mod:`optimizer.ope`) from the
    logged propensities of complete sessions: the evidence next to a promotion.
    A target the logs cannot support gets its reason instead of numbers.
    """
    from optimizer.errors import EstimationError
    from optimizer.ope import evaluate_target, logs_from_store, parse_target

    exp = config.experiment
    logs = logs_from_store(store, config, now=now)
    if logs.empty:
        return {"n": 0, "logged_mean": None, "rows": []}
    snapshot = store.latest_snapshot(exp.id)
    recommended = (
        ((snapshot.summary or {}).get("stop") or {}).get("recommended") if snapshot else None
    )
    statuses = store.arm_statuses(exp.id)
    targets: list[tuple[str, str, str | None]] = (
        [("current policy (newest snapshot)", "snapshot", None)] if snapshot is not None else []
    )
    targets += [
        (f"all traffic to {arm}", f"arm:{arm}", arm)
        for arm in sorted(statuses)
        if statuses[arm] != "retired"
    ]
    rows = []
    for label, spec, arm in targets:
        row: dict[str, Any] = {
            "label": label,
            "target": spec,
            "arm": arm,
            "recommended": arm == recommended,
        }
        try:
            target = parse_target(spec, store=store, experiment_id=exp.id)
            out = evaluate_target(logs, target, estimators=("snips", "dr"), n_bootstrap=n_bootstrap)
        except (EstimationError, ValueError) as exc:
            row["error"] = str(exc)
        else:
            row["estimators"] = out["estimators"]
        rows.append(row)
    return jsonable({"n": len(logs), "logged_mean": float(logs["reward"].mean()), "rows": rows})


# -- JSON ------------------------------------------------------------------------------------
