"""Does a reported outcome count, and for which session? The verdict the outcomes API returns.

The KPI (:mod:`optimizer.kpi`) attributes outcomes when it reads them, so an
outcome that cannot count today (its session not yet known to this replica, say)
counts by itself once it can: nothing is lost, re-attribution is automatic. This
module answers the integrator *now*, with the same rules:

- an outcome whose ``name`` no KPI term uses (``outcome:<name>``) never counts:
  ``unused_name``;
- with a ``session_id``: the session must be an assignment of the experiment
  (``unknown_session``); when its conversation was moved to another arm (a paused
  or retired arm, :meth:`~optimizer.store.Store.reassign`), the outcome counts for
  the conversation's assignment open at ``occurred_at`` — what happened after the
  move happened under the new arm; with only a ``user_id``: the user's latest
  session assigned at or before ``occurred_at`` (``no_session_before``);
- it must not have happened before its session started, up to
  :data:`CLOCK_SKEW_S` of clock skew between the business system and ours
  (``before_session``), and not after the longest window of the terms that use
  it (``outside_window``).

Unattributed outcomes are stored like the others, with their reason
(``outcomes.attribution``): :func:`unattributed` lists them (the dashboard's
``/operator/outcomes``, ``flywheel outcomes unattributed``) and :func:`reattribute`
re-judges them (``flywheel outcomes reattribute``, or the dashboard's button) once
what they were missing exists — a session another replica wrote late, a KPI term
added for their name.

>>> from optimizer.config import load_config
>>> from optimizer.store import Store
>>> store = Store("sqlite:///:memory:"); store.create_all()
>>> config = load_config("/nonexistent.toml", environ=False)
>>> attribute(store, config, session_id="nope", user_id=None, name="conversion",
...           occurred_at=None).reason
'unknown_session'
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from optimizer.clock import as_utc, utcnow
from optimizer.config import Config
from optimizer.store import Store, schema

__all__ = [
    "CLOCK_SKEW_S",
    "REASONS",
    "Attribution",
    "attribute",
    "reattribute",
    "unattributed",
]

log = logging.getLogger(__name__)

#: An outcome up to this many seconds before its session started still counts (clock skew
#: between the integrator's systems and ours); its delay counts as 0.
CLOCK_SKEW_S = 300.0
#: Why an outcome is not attributed, with what to tell the integrator.
REASONS = {
    "unused_name": "no KPI term uses this outcome name",
    "unknown_session": "no session of the experiment has this session_id",
    "no_session_before": "the user has no session of the experiment before occurred_at",
    "before_session": "occurred_at is before the session started",
    "outside_window": "occurred_at is after every attribution window of this outcome",
}


@dataclass(frozen=True)
class Attribution:
    """The verdict on one outcome: attributed to ``session_id``, or not, and why."""

    attributed: bool
    session_id: str | None
    reason: str | None
    detail: str

    @property
    def code(self) -> str:
        """``"attributed"`` or the reason: what ``outcomes.attribution`` stores."""
        return "attributed" if self.attributed else str(self.reason)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _no(reason: str, session_id: str | None = None, extra: str = "") -> Attribution:
    return Attribution(False, session_id, reason, REASONS[reason] + extra)


def windows(config: Config) -> dict[str, float]:
    """Longest window in days of the terms using each outcome name."""
    out: dict[str, float] = {}
    for term in config.kpi.terms:
        kind, _, name = term.source.partition(":")
        if kind == "outcome":
            out[name] = max(out.get(name, 0.0), term.window_days)
    return out


def attribute(
    store: Store,
    config: Config,
    *,
    session_id: str | None,
    user_id: str | None,
    name: str,
    occurred_at: datetime | None,
) -> Attribution:
    """The session an outcome counts for, by the rules of :mod:`optimizer.kpi`, or why none."""
    when = as_utc(occurred_at) if occurred_at is not None else utcnow()
    window = windows(config).get(name)
    a = schema.assignments
    exp = config.experiment.id
    if session_id is not None:
        query = sa.select(a.c.session_id, a.c.assigned_at).where(
            a.c.session_id == session_id, a.c.experiment_id == exp
        )
    elif user_id is not None:
        query = (
            sa.select(a.c.session_id, a.c.assigned_at)
            .where(
                a.c.user_id == user_id,
                a.c.experiment_id == exp,
                a.c.assigned_at <= when + timedelta(seconds=CLOCK_SKEW_S),
            )
            .order_by(a.c.assigned_at.desc(), a.c.id.desc())
            .limit(1)
        )
    else:
        raise ValueError("an outcome needs a session_id or a user_id, got neither")
    with store.engine.connect() as conn:
        row = conn.execute(query).first()
        if session_id is not None and row is not None:
            row = _open_at(conn, exp, session_id, when) or row
    if window is None:
        return _no("unused_name", row.session_id if row is not None else session_id)
    if row is None:
        return _no("unknown_session" if session_id is not None else "no_session_before")
    delay_s = (when - as_utc(row.assigned_at)).total_seconds()
    if delay_s < -CLOCK_SKEW_S:
        return _no("before_session", row.session_id, f" (by {-delay_s:.0f} s)")
    if delay_s > window * 86400:
        return _no("outside_window", row.session_id, f" ({window:g} days)")
    return Attribution(True, row.session_id, None, "counts for the session's KPI")


def _open_at(conn: sa.Connection, experiment_id: str, session_id: str, when: datetime) -> Any:
    """The assignment of ``session_id``'s conversation open at ``when`` (None: not moved)."""
    a = schema.assignments
    thread = sa.func.coalesce(
        sa.select(a.c.thread_id).where(a.c.session_id == session_id).scalar_subquery(),
        session_id,
    )
    return conn.execute(
        sa.select(a.c.session_id, a.c.assigned_at)
        .where(
            a.c.experiment_id == experiment_id,
            sa.or_(a.c.thread_id == thread, a.c.session_id == thread),
            a.c.assigned_at <= when,  # no skew here: the move's time is our own clock's
        )
        .order_by(a.c.assigned_at.desc(), a.c.id.desc())
        .limit(1)
    ).first()


def reattribute(store: Store, config: Config) -> dict[str, int]:
    """Re-judge stored outcomes that were not attributed (or never judged); returns counts.

    An outcome whose session became known later (another replica, a late
    assignment write) is then shown as attributed; the KPI counted it anyway.
    """
    o = schema.outcomes
    query = sa.select(o.c.id, o.c.session_id, o.c.user_id, o.c.name, o.c.occurred_at).where(
        sa.or_(o.c.attribution.is_(None), o.c.attribution != "attributed")
    )
    with store.engine.connect() as conn:
        rows = conn.execute(query).all()
    verdicts = [
        (
            row.id,
            attribute(
                store,
                config,
                session_id=row.session_id,
                user_id=row.user_id,
                name=row.name,
                occurred_at=row.occurred_at,
            ),
        )
        for row in rows
    ]
    counts: dict[str, int] = {}
    with store.engine.begin() as conn:
        for outcome_id, verdict in verdicts:
            conn.execute(
                o.update()
                .where(o.c.id == outcome_id)
                .values(attribution=verdict.code, attributed_session_id=verdict.session_id)
            )
            counts[verdict.code] = counts.get(verdict.code, 0) + 1
    log.info("reattributed outcomes: %s", counts)
    return counts


def unattributed(store: Store, *, limit: int = 100) -> dict[str, Any]:
    """Outcomes whose stored verdict is not "attributed": counts by reason and the newest ones.

    Outcomes never judged (received before the verdict was stored) count under
    ``"unjudged"``; :func:`reattribute` judges them. ``limit`` bounds the listed rows
    (the counts cover all).
    """
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    o = schema.outcomes
    verdict = sa.func.coalesce(o.c.attribution, "unjudged")
    pending = sa.or_(o.c.attribution.is_(None), o.c.attribution != "attributed")
    with store.engine.connect() as conn:
        counts = {
            str(reason): int(n)
            for reason, n in conn.execute(
                sa.select(verdict, sa.func.count()).where(pending).group_by(verdict)
            )
        }
        rows = conn.execute(
            sa.select(
                o.c.idempotency_key,
                o.c.name,
                o.c.value,
                o.c.session_id,
                o.c.user_id,
                o.c.occurred_at,
                o.c.received_at,
                o.c.source,
                verdict.label("reason"),
            )
            .where(pending)
            .order_by(o.c.received_at.desc(), o.c.id.desc())
            .limit(limit)
        ).all()
    return {
        "total": sum(counts.values()),
        "counts": dict(sorted(counts.items())),
        "outcomes": [
            {
                **row._asdict(),
                "occurred_at": as_utc(row.occurred_at),
                "received_at": as_utc(row.received_at),
                "detail": REASONS.get(row.reason, "not judged yet"),
            }
            for row in rows
        ],
    }
