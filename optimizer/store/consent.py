"""Who may become data: opt-outs and deleted conversations.

A user who opted out, and a conversation its user deleted, never enter a
training set or the few-shot bank (:func:`optimizer.fewshot.mining.turn_reasons`
drops them, so mining and every export do). Their events still count for the
experiment's statistics — the KPI of an arm is about traffic, not text — but
their words never leave the store. Opt-outs are events (one row per change, the
latest decides), so opting back in is possible and the history stays.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

import sqlalchemy as sa

from optimizer.store import schema

__all__ = ["deleted_threads", "excluded_sessions", "opted_out_users"]


def opted_out_users(conn: sa.Connection) -> set[str]:
    """Users whose latest opt-out event says ``opted_out``."""
    o = schema.privacy_opt_outs
    latest = sa.select(sa.func.max(o.c.id)).group_by(o.c.user_id).scalar_subquery()
    rows = conn.execute(sa.select(o.c.user_id).where(o.c.id.in_(latest), o.c.opted_out))
    return {str(r[0]) for r in rows}


def deleted_threads(conn: sa.Connection) -> set[str]:
    """Conversation (thread) ids their user deleted."""
    t = schema.threads
    return {str(r[0]) for r in conn.execute(sa.select(t.c.id).where(t.c.deleted_at.is_not(None)))}


def excluded_sessions(
    conn: sa.Connection, experiment_id: str, *, users: Iterable[str], threads: Iterable[str]
) -> set[str]:
    """Session ids of ``experiment_id`` that belong to ``users`` or to one of ``threads``."""
    a = schema.assignments
    users, threads = set(users), set(threads)
    if not users and not threads:
        return set()
    thread = sa.func.coalesce(a.c.thread_id, a.c.session_id)
    where = sa.or_(
        a.c.user_id.in_(sorted(users)) if users else sa.false(),
        thread.in_(sorted(threads)) if threads else sa.false(),
    )
    rows = conn.execute(sa.select(a.c.session_id).where(a.c.experiment_id == experiment_id, where))
    return {str(r[0]) for r in rows}


def record_opt_out(
    conn: sa.Connection, user_id: str, opted_out: bool, actor: str, now: datetime
) -> None:
    conn.execute(
        schema.privacy_opt_outs.insert().values(
            user_id=user_id, opted_out=opted_out, actor=actor, created_at=now
        )
    )


def mark_thread_deleted(conn: sa.Connection, thread_id: str, user_id: str, now: datetime) -> None:
    """Soft-delete a conversation (the chat's data layer does the same for its threads)."""
    t = schema.threads
    done = conn.execute(
        t.update().where(t.c.id == thread_id, t.c.deleted_at.is_(None)).values(deleted_at=now)
    )
    if (
        done.rowcount == 0
        and conn.execute(sa.select(t.c.id).where(t.c.id == thread_id)).first() is None
    ):
        conn.execute(
            t.insert().values(id=thread_id, user_identifier=user_id, created_at=now, deleted_at=now)
        )
