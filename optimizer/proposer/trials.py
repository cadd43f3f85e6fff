"""A proposed arm's trial: a capped share until it shows it beats its champion.

A started proposal gets at most ``proposer.trial_cap`` of the traffic (an
optimizer ``cap_set`` event, the mechanism an operator's cap uses). Once it has
``proposer.trial_sessions`` effective sessions, the trial ends: with
P(KPI above the champion's) >= ``proposer.keep_probability`` the cap is lifted
and Thompson sampling and the stop rule take it from there; otherwise it is
retired, freeing its ``max_live`` slot. So the traffic a worse proposal can take
is bounded: about ``max_live × trial_cap`` of all sessions, times the share of
proposals that are worse (``bench/closed_loop.py`` measures it).

P(above) is a normal approximation from the policy summary's KPI means and 95%
intervals, the same numbers the dashboard shows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from scipy.special import ndtr

from optimizer.config import Config
from optimizer.proposer.rounds import live_proposals
from optimizer.store import Store, schema

__all__ = ["manage_trials", "probability_above"]

log = logging.getLogger(__name__)


def probability_above(arm: Mapping[str, Any], champion: Mapping[str, Any]) -> float | None:
    """P(arm's KPI > champion's) from means and 95% intervals (None without data).

    >>> probability_above({"kpi_mean": 0.05, "kpi_ci": [0.04, 0.06]},
    ...                   {"kpi_mean": 0.05, "kpi_ci": [0.04, 0.06]})
    0.5
    """
    try:
        m_a, m_c = float(arm["kpi_mean"]), float(champion["kpi_mean"])
        sd_a = (float(arm["kpi_ci"][1]) - float(arm["kpi_ci"][0])) / 3.92
        sd_c = (float(champion["kpi_ci"][1]) - float(champion["kpi_ci"][0])) / 3.92
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    if not all(math.isfinite(x) for x in (m_a, m_c, sd_a, sd_c)):
        return None
    scale = math.hypot(sd_a, sd_c)
    if scale <= 0:
        return 1.0 if m_a > m_c else 0.0 if m_a < m_c else 0.5
    return float(ndtr((m_a - m_c) / scale))


def _caps(store: Store, experiment_id: str) -> dict[str, float]:
    ev = schema.arm_events
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(ev.c.arm_id, ev.c.evidence)
            .where(ev.c.experiment_id == experiment_id, ev.c.kind == "cap_set")
            .order_by(ev.c.id)
        ).all()
    return {r.arm_id: float((r.evidence or {}).get("cap", 1.0)) for r in rows}


def manage_trials(
    store: Store,
    config: Config,
    summary: Mapping[str, Any],
    *,
    now: datetime,
    actor: str = "optimizer",
) -> dict[str, list[str]]:
    """End the trials that are due; returns the arms ``graduated`` and ``retired``."""
    pc = config.proposer
    exp = config.experiment.id
    out: dict[str, list[str]] = {"graduated": [], "retired": []}
    if pc.trial_cap >= 1:
        return out
    arms = summary.get("arms") or {}
    champion = summary.get("champion")
    if champion not in arms:
        return out
    caps = _caps(store, exp)
    for arm in live_proposals(store, exp):
        s = arms.get(arm)
        if s is None or caps.get(arm, 1.0) >= 1.0:
            continue  # no data yet, or graduated already
        if float(s.get("effective_sessions") or 0) < pc.trial_sessions:
            continue
        p = probability_above(s, arms[champion])
        evidence = {
            "probability_above_champion": p,
            "champion": champion,
            "effective_sessions": s.get("effective_sessions"),
            "trial_sessions": pc.trial_sessions,
            "keep_probability": pc.keep_probability,
        }
        if p is not None and p >= pc.keep_probability:
            store.record_arm_event(
                exp, arm, "cap_set", actor=actor, evidence={"cap": 1.0, **evidence}, at=now
            )
            out["graduated"].append(arm)
            log.info("proposer: %r passed its trial (P(above champion) %.2f)", arm, p)
        else:
            store.record_arm_event(
                exp, arm, "retired", actor=actor, evidence={"trial": "ended", **evidence}, at=now
            )
            out["retired"].append(arm)
            log.info("proposer: retired %r at the end of its trial (P(above) %s)", arm, p)
    return out
