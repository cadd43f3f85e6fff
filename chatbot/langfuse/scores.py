"""Session rewards: ``kpi_reward`` on each session once its attribution window closed."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import datetime, timedelta

import sqlalchemy as sa

from chatbot.langfuse.tracer import Tracer
from optimizer.clock import as_utc, utcnow
from optimizer.config import Config
from optimizer.store import Store, schema

log = logging.getLogger(__name__)

__all__ = ["REWARDS_AUDIT_ACTION", "score_session_rewards"]

#: Audit action remembering up to when session rewards were sent.
REWARDS_AUDIT_ACTION = "langfuse_rewards_scored"


def score_session_rewards(
    store: Store,
    config: Config,
    tracer: Tracer,
    *,
    now: datetime | None = None,
    max_sessions: int = 2000,
) -> int:
    """Send ``kpi_reward`` for every session whose attribution window closed since the last call.

    Sessions are read with :func:`optimizer.kpi.session_frame` and sent in the
    order their windows closed, at most ``max_sessions`` per call (a first run
    over a long history catches up over several calls instead of flooding the
    queue). How far it got is kept as an audit event, so each session is sent
    once; a re-send would replace the score anyway (id and timestamp are
    derived from the session). Returns the number of rewards queued.
    """
    if max_sessions < 1:
        raise ValueError(f"max_sessions must be at least 1, got {max_sessions}")
    if not tracer.enabled:
        return 0
    from optimizer import kpi

    now = as_utc(now) if now is not None else utcnow()
    experiment_id = config.experiment.id
    frame = kpi.session_frame(store, config, now=now)
    if frame.empty:
        return 0
    window = timedelta(days=max(t.window_days for t in config.kpi.terms))
    done = frame[frame["complete"].astype(bool) & frame["reward"].notna()].copy()
    done["closes_at"] = (done["assigned_at"] + window).dt.floor("us")
    since = _rewards_watermark(store, experiment_id)
    if since is not None:
        done = done[done["closes_at"] > since]
    done = done.sort_values("closes_at", kind="stable")
    sent, through = 0, now
    for row in done.itertuples(index=False):
        closed = row.closes_at.to_pydatetime()
        queued = sent < max_sessions and tracer.score_session_reward(
            experiment_id,
            str(row.session_id),
            float(row.reward),
            at=closed,
            metadata={"arm": row.arm_id, "user_id": row.user_id, "segment": row.segment},
        )
        if not queued:
            # Resume just before this session next time (its peers closing at the same
            # instant may be re-sent: harmless, they replace themselves).
            through = closed - timedelta(microseconds=1)
            log.info("queued %d of %d session rewards; the rest follow next time", sent, len(done))
            break
        sent += 1
    if sent:
        details = {"through": through.isoformat(), "sessions": sent}
        store.audit("langfuse", REWARDS_AUDIT_ACTION, experiment_id, details)
    return sent


def _rewards_watermark(store: Store, experiment_id: str) -> datetime | None:
    ev = schema.audit_events
    query = (
        sa.select(ev.c.details)
        .where(ev.c.action == REWARDS_AUDIT_ACTION, ev.c.target == experiment_id)
        .order_by(ev.c.id.desc())
        .limit(1)
    )
    with store.engine.connect() as conn:
        row = conn.execute(query).first()
    if row is None:
        return None
    details = row.details if isinstance(row.details, Mapping) else json.loads(row.details)
    return as_utc(datetime.fromisoformat(details["through"]))
