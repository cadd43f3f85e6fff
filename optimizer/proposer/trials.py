"""A proposed arm's trial: a capped share until it shows it beats its champion.

A started proposal gets at most ``proposer.trial_cap`` of the traffic (an
optimizer ``cap_set`` event, the mechanism an operator's cap uses). The trial
ends at the first of:

* **futility** — once it has ``proposer.trial_min_sessions`` effective sessions,
  P(KPI above the champion's) < ``proposer.stop_probability``: retired at once;
* **enough data** — ``proposer.trial_sessions`` effective sessions;
* **the deadline** — ``proposer.trial_days`` since it started.

At the last two, P(above) >= ``proposer.keep_probability`` lifts the cap
(Thompson sampling and the stop rule take it from there); anything less retires
it, freeing its ``max_live`` slot.

While it runs, the trial's cap **follows the evidence**: at each optimizer run it
is ``trial_cap × P(above) / 0.5``, between ``TRIAL_CAP_FLOOR × trial_cap`` and
``trial_cap`` (recorded as a ``cap_set`` event when it moves by a fifth or more). A
proposal as likely better as worse keeps the full cap; one that looks worse gets
less while the evidence gathers — the cap binds in a trial (Thompson sampling
alone would give a two-arm coin flip far more than ``trial_cap``), so without
this a proposal 15% worse took the full cap until the data could tell, about
1,750 effective sessions at a 4% conversion rate.

Why the futility stop and the deadline: Thompson sampling gives a proposal that
looks worse *less* traffic than its cap, so a trial that ends on sessions alone
lasts longest for the worst proposals — a −15% proposal in the closed-loop bench
was still in its trial after three weeks, holding 2.5% of all traffic. With
them, what a worse proposal can take is bounded by ``trial_cap × trial_days``
of the traffic, and a clearly worse one stops after ``trial_min_sessions``
(``bench/closed_loop.py`` measures the share of sessions served by proposals
worse than their parent).

P(above) is a normal approximation from the policy summary's KPI means and 95%
intervals, the same numbers the dashboard shows.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from scipy.special import ndtr

from optimizer.clock import as_utc
from optimizer.config import Config
from optimizer.proposer import records
from optimizer.proposer.hooks import ProposerTrace
from optimizer.proposer.rounds import live_proposals
from optimizer.store import Store, schema

__all__ = ["TRIAL_CAP_FLOOR", "manage_trials", "probability_above", "trial_cap_for"]

log = logging.getLogger(__name__)

#: The lowest a trial's cap goes, as a share of ``proposer.trial_cap``: it keeps learning.
TRIAL_CAP_FLOOR = 0.2
#: A new cap is recorded only when it differs from the current by this share or more.
_CAP_STEP = 0.2


def trial_cap_for(p_above: float | None, trial_cap: float) -> float:
    """The cap of a running trial: ``trial_cap × P(above) / 0.5``, floored, at most ``trial_cap``.

    >>> trial_cap_for(0.5, 0.1), trial_cap_for(0.9, 0.1), trial_cap_for(0.25, 0.1)
    (0.1, 0.1, 0.05)
    >>> trial_cap_for(0.01, 0.1), trial_cap_for(None, 0.1)
    (0.02, 0.1)
    """
    if p_above is None:
        return trial_cap
    share = min(max(p_above / 0.5, TRIAL_CAP_FLOOR), 1.0)
    return round(trial_cap * share, 6)


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


def _caps(store: Store, experiment_id: str) -> dict[str, tuple[float, datetime]]:
    """Each capped arm's current cap and when its first cap was set (its trial's start)."""
    ev = schema.arm_events
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(ev.c.arm_id, ev.c.evidence, ev.c.created_at)
            .where(ev.c.experiment_id == experiment_id, ev.c.kind == "cap_set")
            .order_by(ev.c.id)
        ).all()
    out: dict[str, tuple[float, datetime]] = {}
    for r in rows:
        started = out[r.arm_id][1] if r.arm_id in out else as_utc(r.created_at)
        out[r.arm_id] = (float((r.evidence or {}).get("cap", 1.0)), started)
    return out


def manage_trials(
    store: Store,
    config: Config,
    summary: Mapping[str, Any],
    *,
    now: datetime,
    actor: str = "optimizer",
    trace: ProposerTrace | None = None,
) -> dict[str, list[str]]:
    """End the trials that are due, move the caps of the others; returns the arms
    ``graduated``, ``retired`` and ``capped`` (a new cap).

    ``trace``: each ended trial is scored on its round's trace (``proposer_trial_kept``,
    BOOLEAN, with why it ended), next to the candidate's own verdict.
    """
    pc = config.proposer
    exp = config.experiment.id
    out: dict[str, list[str]] = {"graduated": [], "retired": [], "capped": []}
    if pc.trial_cap >= 1:
        return out
    arms = summary.get("arms") or {}
    champion = summary.get("champion")
    if champion not in arms:
        return out
    caps = _caps(store, exp)
    now = as_utc(now)
    for arm in live_proposals(store, exp):
        s = arms.get(arm)
        cap, started = caps.get(arm, (1.0, now))
        if s is None or cap >= 1.0:
            continue  # no data yet, or graduated already
        n = float(s.get("effective_sessions") or 0)
        p = probability_above(s, arms[champion])
        futile = n >= pc.trial_min_sessions and p is not None and p < pc.stop_probability
        due = n >= pc.trial_sessions or (
            pc.trial_days > 0 and now - started >= timedelta(days=pc.trial_days)
        )
        if not (futile or due):
            target = trial_cap_for(p, pc.trial_cap)
            if abs(target - cap) >= _CAP_STEP * cap:
                store.record_arm_event(
                    exp,
                    arm,
                    "cap_set",
                    actor=actor,
                    evidence={
                        "cap": target,
                        "trial": "running",
                        "probability_above_champion": p,
                        "effective_sessions": s.get("effective_sessions"),
                    },
                    at=now,
                )
                out["capped"].append(arm)
            continue
        evidence = {
            "probability_above_champion": p,
            "champion": champion,
            "effective_sessions": s.get("effective_sessions"),
            "trial_sessions": pc.trial_sessions,
            "keep_probability": pc.keep_probability,
            "ended": "futility" if futile else "sessions" if n >= pc.trial_sessions else "deadline",
            "trial_days": round((now - started).total_seconds() / 86400, 2),
        }
        if not futile and p is not None and p >= pc.keep_probability:
            store.record_arm_event(
                exp, arm, "cap_set", actor=actor, evidence={"cap": 1.0, **evidence}, at=now
            )
            out["graduated"].append(arm)
            _score_trial(store, exp, arm, True, evidence, trace)
            log.info("proposer: %r passed its trial (P(above champion) %.2f)", arm, p)
        else:
            store.record_arm_event(
                exp, arm, "retired", actor=actor, evidence={"trial": "ended", **evidence}, at=now
            )
            out["retired"].append(arm)
            _score_trial(store, exp, arm, False, evidence, trace)
            log.info("proposer: retired %r at the end of its trial (P(above) %s)", arm, p)
    return out


def _score_trial(
    store: Store,
    experiment_id: str,
    arm: str,
    kept: bool,
    evidence: Mapping[str, Any],
    trace: ProposerTrace | None,
) -> None:
    """The trial's outcome as a score on the trace of the round that proposed the arm."""
    if trace is None:
        return
    try:
        started = records.candidates(store, experiment_id, status="started")
        candidate = next((c for c in started if c.arm_id == arm), None)
        if candidate is None:
            return
        p = evidence.get("probability_above_champion")
        trace.score(
            candidate.round_id,
            "proposer_trial_kept",
            1.0 if kept else 0.0,
            data_type="BOOLEAN",
            comment=f"{arm}: trial ended on {evidence.get('ended')}, P(above champion) "
            + (f"{p:.2f}" if isinstance(p, float) else "unknown"),
            score_key=f"trial:{arm}",
        )
    except Exception:  # tracing never breaks the optimizer
        log.warning("proposer: tracing the trial of %r failed", arm, exc_info=True)
