"""The event store: append events, read them back.

Writes are single transactions that are committed before the call returns, so
a caller that acknowledges after ``record_*`` returns never acknowledges a lost
event. Duplicates are absorbed by unique keys (session id for assignments,
turn id for turns, idempotency key for outcomes) and reported, not raised.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import pandas as pd
import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import IntegrityError

from optimizer.clock import as_utc, utcnow
from optimizer.errors import OwnershipError, StoreError
from optimizer.store import schema
from optimizer.store.engine import make_engine
from optimizer.store.schema import ARM_STATUS_BY_EVENT
from optimizer.store.versions import register_arm, successor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArmSpec:
    """An arm: prompt variant (id, content hash, text) × few-shot strategy (× model).

    ``id`` is the logical arm (the base of its versions, see
    :mod:`optimizer.store.versions`); ``prompt_text`` is what replicas serve
    (None: the prompt file of ``prompt_id``); ``model`` None means the
    configured model, ``model_params`` its own temperature, max_tokens and
    api_base; ``origin`` says who made it (config, operator, optimizer,
    finetune); ``manifest`` what made it (a fine-tune's dataset manifest; not
    part of the identity).
    """

    id: str
    prompt_id: str
    prompt_hash: str
    fewshot: str = "none"
    fewshot_config: Mapping[str, Any] = field(default_factory=dict)
    prompt_text: str | None = None
    model: str | None = None
    origin: str = "config"
    model_params: Mapping[str, Any] = field(default_factory=dict)
    manifest: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class AssignmentRecord:
    session_id: str
    user_id: str
    experiment_id: str
    arm_id: str
    propensity: float
    snapshot_version: int | None
    segment: str
    context: Mapping[str, Any]
    assigned_at: datetime
    simulated: bool = False
    #: The user kept their previous arm (``propensity`` is then 1.0: no draw happened);
    #: None for assignments logged before that was recorded (see the ``sticky`` column).
    sticky: bool | None = False
    #: The conversation this assignment serves (None: the session itself is the thread).
    thread_id: str | None = None
    closed_at: datetime | None = None
    closed_reason: str | None = None

    @property
    def thread(self) -> str:
        """The conversation (Chainlit thread) id."""
        return self.thread_id or self.session_id

    #: In the holdback: the experiment's baseline arm, outside the bandit.
    holdback: bool = False


@dataclass(frozen=True)
class TurnRecord:
    id: str
    session_id: str
    user_id: str
    experiment_id: str
    arm_id: str
    prompt_id: str
    prompt_hash: str
    model: str
    user_message: str
    reply: str
    fewshot_ids: tuple[str, ...] = ()
    latency_ms: float | None = None
    ttft_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cost: float | None = None
    error: str | None = None
    trace_id: str | None = None
    created_at: datetime | None = None
    #: The arm's model failed and the fallback model (``model``) answered.
    fallback: bool = False


@dataclass(frozen=True)
class VoteRecord:
    """A user's thumbs on a turn of theirs: ``value`` 1 up, 0 down, None removes the vote."""

    turn_id: str
    user_id: str
    value: int | None
    comment: str | None = None
    at: datetime | None = None


@dataclass(frozen=True)
class OutcomeRecord:
    idempotency_key: str
    name: str
    value: float
    session_id: str | None = None
    user_id: str | None = None
    occurred_at: datetime | None = None
    source: str = "api"
    extra: Mapping[str, Any] = field(default_factory=dict)
    #: The verdict when received ("attributed" or why not, see optimizer.attribution).
    attribution: str | None = None
    attributed_session_id: str | None = None


def fetch_in(
    conn: sa.Connection,
    query: sa.Select[Any],
    column: sa.ColumnElement[str],
    values: Iterable[str],
) -> list[tuple[Any, ...]]:
    """:func:`fetch_tuples` of ``query`` where ``column`` is one of ``values`` (a few
    thousand ids): on PostgreSQL one array parameter (a query of hundreds of
    placeholders costs more to build and parse than to run), on SQLite chunks of 500."""
    values = sorted(set(values))
    if not values:
        return []
    if conn.dialect.name == "postgresql":
        array = sa.bindparam("in_values", values, type_=ARRAY(sa.String()))
        return fetch_tuples(conn, query.where(column == sa.any_(array)))
    return [
        row
        for i in range(0, len(values), 500)
        for row in fetch_tuples(conn, query.where(column.in_(values[i : i + 500])))
    ]


def fetch_tuples(conn: sa.Connection, query: sa.Select[Any]) -> list[tuple[Any, ...]]:
    """The rows of ``query`` as plain DBAPI tuples, for reads of millions of rows.

    None of the columns read this way may need SQLAlchemy's type processing
    (JSON, or timestamps on SQLite, come back as the driver gives them).
    """
    result = conn.execute(query)
    try:  # skipping SQLAlchemy's per-row objects halves the time on a million rows
        return list(result.cursor.fetchall())
    finally:
        result.close()


def refresh_session_counts(conn: sa.Connection, session_ids: Iterable[str] | None) -> None:
    """Set the count columns of ``assignments`` (:data:`schema.SESSION_COUNTS`) from the
    turns and current votes of the given sessions (every session with None).

    Recounting, rather than adding one, keeps the counts right whatever wrote
    before: a retried turn, a changed or deleted vote, a bulk load.
    """
    a, t, f = schema.assignments, schema.turns, schema.feedback

    def count(table: sa.Table, *where: sa.ColumnElement[bool]) -> sa.ScalarSelect[int]:
        return (
            sa.select(sa.func.count())
            .where(table.c.session_id == a.c.session_id, *where)
            .scalar_subquery()
        )

    update = a.update().values(
        turns=count(t),
        errors=count(t, t.c.error.is_not(None)),
        rated=count(f, f.c.value.is_not(None)),
        thumbs_up=count(f, f.c.value == 1),
        thumbs_down=count(f, f.c.value == 0),
    )
    if session_ids is None:
        conn.execute(update)
        return
    ids = [{"sid": sid} for sid in dict.fromkeys(session_ids)]
    if ids:
        conn.execute(update.where(a.c.session_id == sa.bindparam("sid")), ids)


def _lock_session(conn: sa.Connection, session_id: str) -> None:
    """Hold the session's assignment row until commit (PostgreSQL; SQLite has one writer).

    Two votes of one session at once then recount one after the other, each
    seeing the other's committed row, instead of both counting without it.
    """
    if conn.dialect.name == "postgresql":
        a = schema.assignments
        conn.execute(sa.select(a.c.id).where(a.c.session_id == session_id).with_for_update())


def _vote_error(vote: VoteRecord, turn: Any) -> Exception | None:
    """Why ``vote`` is refused (``turn``: its turn's owner and session), or None."""
    if vote.value not in (0, 1, None):
        return ValueError(f"value must be 1 (up), 0 (down) or None (delete), got {vote.value!r}")
    if turn is None or turn.user_id != vote.user_id:
        return OwnershipError(
            f"user {vote.user_id!r} cannot rate turn {vote.turn_id!r}: not a turn of theirs"
        )
    return None


def _write_vote(conn: sa.Connection, vote: VoteRecord, session_id: str) -> None:
    """Append the vote's event and set the user's current vote on the turn."""
    fb = schema.feedback
    conn.execute(
        schema.feedback_events.insert().values(
            turn_id=vote.turn_id,
            session_id=session_id,
            user_id=vote.user_id,
            kind="delete" if vote.value is None else "upsert",
            value=vote.value,
            comment=vote.comment,
            created_at=vote.at,
        )
    )
    updated = conn.execute(
        fb.update()
        .where(fb.c.turn_id == vote.turn_id, fb.c.user_id == vote.user_id)
        .values(value=vote.value, comment=vote.comment, updated_at=vote.at)
    ).rowcount
    if not updated:
        conn.execute(
            fb.insert().values(
                turn_id=vote.turn_id,
                user_id=vote.user_id,
                session_id=session_id,
                value=vote.value,
                comment=vote.comment,
                created_at=vote.at,
                updated_at=vote.at,
            )
        )


class Store:
    """Facade over the database. One instance per process; thread-safe.

    >>> store = Store("sqlite:///:memory:")
    >>> store.create_all()
    >>> store.record_outcome(OutcomeRecord("k1", "conversion", 1.0, session_id="s1"))
    True
    >>> store.record_outcome(OutcomeRecord("k1", "conversion", 1.0, session_id="s1"))
    False
    """

    def __init__(self, url: str, *, engine: sa.Engine | None = None) -> None:
        self.url = url
        self.engine = engine if engine is not None else make_engine(url)

    # -- schema -----------------------------------------------------------
    def create_all(self) -> None:
        """Create tables directly (in-memory tests). Real databases use :meth:`upgrade`."""
        schema.metadata.create_all(self.engine)

    def upgrade(self) -> None:
        """Bring the schema to the newest Alembic revision."""
        from optimizer.store.migrate import upgrade

        upgrade(self.engine)

    def dispose(self) -> None:
        self.engine.dispose()

    # -- experiments and arms ----------------------------------------------
    def sync_experiment(
        self, experiment_id: str, salt: str, arms: Iterable[ArmSpec], *, at: datetime | None = None
    ) -> None:
        """Register the experiment and any arm not seen before (with a ``created`` event).

        Existing arms keep their status. A changed content (prompt hash, few-shot
        settings) is a new arm version that retires the old one; a content the
        store already knows changes nothing (see :mod:`optimizer.store.versions`).
        Replicas starting together on an empty database race to register: the
        loser's transaction hits a unique key, rolls back, and retries to find
        the rows there.
        """
        arms = list(arms)
        for attempt in range(3):
            try:
                self._sync_experiment(experiment_id, salt, arms, at=at)
                return
            except IntegrityError:
                if attempt == 2:
                    raise

    def _sync_experiment(
        self, experiment_id: str, salt: str, arms: list[ArmSpec], *, at: datetime | None
    ) -> None:
        now = at or utcnow()
        with self.engine.begin() as conn:
            self._ensure_experiment(conn, experiment_id, salt, now)
            for arm in arms:
                register_arm(
                    conn, experiment_id, arm, actor=arm.origin, now=now, event=self._arm_event
                )

    @staticmethod
    def _ensure_experiment(
        conn: sa.Connection, experiment_id: str, salt: str, now: datetime
    ) -> None:
        exists = conn.execute(
            sa.select(schema.experiments.c.id).where(schema.experiments.c.id == experiment_id)
        ).first()
        if not exists:
            conn.execute(
                schema.experiments.insert().values(id=experiment_id, salt=salt, created_at=now)
            )

    def add_arm(
        self,
        experiment_id: str,
        spec: ArmSpec,
        *,
        actor: str,
        at: datetime | None = None,
    ) -> tuple[str, str]:
        """Create an arm (or a new version of ``spec.id``) at run time, audited.

        Returns ``(arm id, "created" | "version" | "known")``; every replica
        serves it from the next policy snapshot on (no restart). Raises
        :class:`StoreError` if the experiment is not registered yet, ``ValueError``
        for a bad id. Undo by retiring it.
        """
        now = at or utcnow()
        for attempt in range(3):
            try:
                with self.engine.begin() as conn:
                    known = conn.execute(
                        sa.select(schema.experiments.c.id).where(
                            schema.experiments.c.id == experiment_id
                        )
                    ).first()
                    if known is None:
                        raise StoreError(
                            f"experiment {experiment_id!r} is not registered; start the server "
                            "(or run `flywheel optimize`) once first"
                        )
                    arm_id, what = register_arm(
                        conn, experiment_id, spec, actor=actor, now=now, event=self._arm_event
                    )
                break
            except IntegrityError:
                if attempt == 2:
                    raise
        if what != "known":
            self.audit(
                actor,
                "arm_added",
                f"{experiment_id}/{arm_id}",
                {"what": what, "origin": spec.origin, "prompt_id": spec.prompt_id},
            )
        return arm_id, what

    def current_arm(self, experiment_id: str, arm_id: str) -> str:
        """The newest version of ``arm_id``'s logical arm (``arm_id`` itself if unknown)."""
        return successor(self.arms(experiment_id), arm_id)

    def record_arm_event(
        self,
        experiment_id: str,
        arm_id: str,
        kind: str,
        *,
        actor: str,
        evidence: Mapping[str, Any] | None = None,
        at: datetime | None = None,
    ) -> None:
        """Append a status change: paused_guardrail, paused_operator, resumed, promoted, retired…"""
        with self.engine.begin() as conn:
            self._arm_event(
                conn, experiment_id, arm_id, kind, actor, dict(evidence or {}), at or utcnow()
            )

    @staticmethod
    def _arm_event(
        conn: sa.Connection,
        experiment_id: str,
        arm_id: str,
        kind: str,
        actor: str,
        evidence: dict[str, Any],
        at: datetime,
    ) -> None:
        conn.execute(
            schema.arm_events.insert().values(
                experiment_id=experiment_id,
                arm_id=arm_id,
                kind=kind,
                actor=actor,
                evidence=evidence,
                created_at=at,
            )
        )

    def arm_statuses(self, experiment_id: str) -> dict[str, str]:
        """Current status of every arm, derived from its status events.

        Promoting an arm demotes the previous champion to ``active``.
        """
        ev = schema.arm_events
        rows = self._all(
            sa.select(ev.c.arm_id, ev.c.kind)
            .where(ev.c.experiment_id == experiment_id)
            .order_by(ev.c.id)
        )
        status: dict[str, str] = {}
        for row in rows:
            arm_id, kind = row.arm_id, row.kind
            new = ARM_STATUS_BY_EVENT.get(kind)
            if new is None:
                continue
            if new == "champion":
                status = {a: ("active" if s == "champion" else s) for a, s in status.items()}
            status[arm_id] = new
        return status

    def arms(self, experiment_id: str) -> list[sa.Row[Any]]:
        return self._all(
            sa.select(schema.arms)
            .where(schema.arms.c.experiment_id == experiment_id)
            .order_by(schema.arms.c.id)
        )

    # -- consent ------------------------------------------------------------
    def set_opt_out(
        self, user_id: str, opted_out: bool = True, *, actor: str, at: datetime | None = None
    ) -> None:
        """Record that ``user_id``'s conversations may (not) become data; audited.

        Opted-out users never enter a training set or the few-shot bank
        (:mod:`optimizer.store.consent`); their sessions still count for the KPI.
        """
        if not user_id:
            raise ValueError("user_id must be a non-empty string")
        from optimizer.store.consent import record_opt_out

        with self.engine.begin() as conn:
            record_opt_out(conn, user_id, opted_out, actor, at or utcnow())
        self.audit(actor, "opt_out" if opted_out else "opt_in", user_id, {})

    def delete_conversation(
        self, thread_id: str, *, user_id: str, actor: str, at: datetime | None = None
    ) -> None:
        """Mark a conversation deleted: it never becomes data (training sets, few-shot bank)."""
        from optimizer.store.consent import mark_thread_deleted

        with self.engine.begin() as conn:
            mark_thread_deleted(conn, thread_id, user_id, at or utcnow())
        self.audit(actor, "conversation_deleted", thread_id, {})

    def excluded_sessions(self, experiment_id: str) -> set[str]:
        """Sessions that must never become data: opted-out users', deleted conversations'."""
        from optimizer.store import consent

        with self.engine.connect() as conn:
            return consent.excluded_sessions(
                conn,
                experiment_id,
                users=consent.opted_out_users(conn),
                threads=consent.deleted_threads(conn),
            )

    # -- assignments --------------------------------------------------------
    def record_assignment(self, rec: AssignmentRecord) -> AssignmentRecord:
        """Insert the session's assignment; if the session already has one, return that one."""
        try:
            with self.engine.begin() as conn:
                conn.execute(schema.assignments.insert().values(**assignment_row(rec)))
            return rec
        except IntegrityError:
            existing = self.get_assignment(rec.session_id)
            if existing is None:
                raise StoreError(
                    f"assignment for session {rec.session_id!r} conflicted but is not readable"
                ) from None
            return existing

    def reassign(
        self, old: AssignmentRecord, new: AssignmentRecord, reason: str
    ) -> AssignmentRecord:
        """Close ``old`` with ``reason`` and open ``new`` in one transaction.

        Idempotent: when ``new.session_id`` exists already (another replica or a retry
        did it), that assignment is returned and nothing changes.
        """
        a = schema.assignments
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    a.update()
                    .where(a.c.session_id == old.session_id, a.c.closed_at.is_(None))
                    .values(closed_at=new.assigned_at, closed_reason=reason)
                )
                conn.execute(a.insert().values(**assignment_row(new)))
            return new
        except IntegrityError:
            existing = self.get_assignment(new.session_id)
            if existing is None:
                raise StoreError(
                    f"reassignment of session {old.session_id!r} conflicted but is not readable"
                ) from None
            return existing

    def current_assignment(self, thread_id: str) -> AssignmentRecord | None:
        """The open assignment of a conversation: the newest of its thread, or the session's."""
        a = schema.assignments
        row = self._first(
            sa.select(a)
            .where(sa.or_(a.c.thread_id == thread_id, a.c.session_id == thread_id))
            .order_by(a.c.id.desc())
            .limit(1)
        )
        return _assignment(row) if row is not None else None

    def get_assignment(self, session_id: str) -> AssignmentRecord | None:
        row = self._first(
            sa.select(schema.assignments).where(schema.assignments.c.session_id == session_id)
        )
        return _assignment(row) if row is not None else None

    def last_assignment_for_user(self, user_id: str, experiment_id: str) -> AssignmentRecord | None:
        a = schema.assignments
        row = self._first(
            sa.select(a)
            .where(a.c.user_id == user_id, a.c.experiment_id == experiment_id)
            .order_by(a.c.id.desc())
            .limit(1)
        )
        return _assignment(row) if row is not None else None

    # -- turns ---------------------------------------------------------------
    def record_turn(self, rec: TurnRecord) -> bool:
        """Append a turn; returns False if a turn with this id was already stored."""
        try:
            with self.engine.begin() as conn:
                _insert_turns(conn, [rec])
        except IntegrityError:
            return False
        return True

    def record_turns(self, recs: Sequence[TurnRecord]) -> list[bool]:
        """Append several turns in one transaction — one commit, one disk flush (group commit).

        Per turn, as :meth:`record_turn`: True if stored, False if a turn with
        its id was already stored (or came earlier in ``recs``). A batch with a
        duplicate falls back to one transaction per turn.
        """
        if not recs:
            return []
        try:
            with self.engine.begin() as conn:
                _insert_turns(conn, recs)
        except IntegrityError:
            return [self.record_turn(rec) for rec in recs]
        return [True] * len(recs)

    def get_turn(self, turn_id: str) -> sa.Row[Any] | None:
        return self._first(sa.select(schema.turns).where(schema.turns.c.id == turn_id))

    def set_turn_trace_id(self, turn_id: str, trace_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                schema.turns.update().where(schema.turns.c.id == turn_id).values(trace_id=trace_id)
            )

    # -- feedback --------------------------------------------------------------
    def record_feedback(
        self,
        turn_id: str,
        user_id: str,
        value: int | None,
        comment: str | None = None,
        *,
        at: datetime | None = None,
    ) -> None:
        """Set (``value`` 1 or 0) or delete (``value`` None) the user's vote on a turn.

        Raises :class:`OwnershipError` unless the turn exists and belongs to
        ``user_id``: users rate only their own conversations.
        """
        (error,) = self.record_votes([VoteRecord(turn_id, user_id, value, comment, at)])
        if error is not None:
            raise error

    def record_votes(self, votes: Sequence[VoteRecord]) -> list[Exception | None]:
        """Record several votes in one transaction — one commit, one disk flush (group commit).

        Per vote, in order: None once stored, or the error that refused it
        (:class:`OwnershipError` for a turn that is not the voter's, ``ValueError``
        for a bad value) — a refused vote writes nothing and does not hold back
        the others. Two first votes on one turn at once (two tabs, two replicas)
        race to insert the current vote; the loser's transaction rolls back whole
        and is retried, so each vote is one event. A database error raises: then
        nothing of the batch was committed.
        """
        stamped = [v if v.at is not None else replace(v, at=utcnow()) for v in votes]
        for attempt in range(3):
            try:
                return self._record_votes(stamped)
            except IntegrityError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _record_votes(self, votes: Sequence[VoteRecord]) -> list[Exception | None]:
        t = schema.turns
        with self.engine.begin() as conn:
            owners = {
                row.id: row
                for row in conn.execute(
                    sa.select(t.c.id, t.c.user_id, t.c.session_id).where(
                        t.c.id.in_({v.turn_id for v in votes})
                    )
                )
            }
            errors = [_vote_error(v, owners.get(v.turn_id)) for v in votes]
            sessions = sorted(
                {
                    owners[v.turn_id].session_id
                    for v, e in zip(votes, errors, strict=True)
                    if e is None
                }
            )
            for session_id in sessions:  # in one order: two batches never wait on each other
                _lock_session(conn, session_id)
            for vote, error in zip(votes, errors, strict=True):
                if error is None:
                    _write_vote(conn, vote, owners[vote.turn_id].session_id)
            refresh_session_counts(conn, sessions)
        return errors

    def refresh_session_counts(self, session_ids: Iterable[str] | None = None) -> None:
        """Recount the count columns of these sessions' assignments (all with None).

        For data written around :meth:`record_turn` and :meth:`record_feedback`,
        which keep the counts themselves: bulk loads and imports.
        """
        with self.engine.begin() as conn:
            refresh_session_counts(conn, session_ids)

    def get_feedback(self, turn_id: str, user_id: str) -> sa.Row[Any] | None:
        fb = schema.feedback
        return self._first(sa.select(fb).where(fb.c.turn_id == turn_id, fb.c.user_id == user_id))

    # -- outcomes ----------------------------------------------------------------
    def record_outcome(self, rec: OutcomeRecord, *, received_at: datetime | None = None) -> bool:
        """Append an outcome once per idempotency key. Returns False for a duplicate delivery."""
        if rec.session_id is None and rec.user_id is None:
            raise ValueError("an outcome needs a session_id or a user_id, got neither")
        now = received_at or utcnow()
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    schema.outcomes.insert().values(
                        idempotency_key=rec.idempotency_key,
                        session_id=rec.session_id,
                        user_id=rec.user_id,
                        name=rec.name,
                        value=float(rec.value),
                        occurred_at=rec.occurred_at or now,
                        received_at=now,
                        source=rec.source,
                        extra=dict(rec.extra),
                        attribution=rec.attribution,
                        attributed_session_id=rec.attributed_session_id,
                    )
                )
        except IntegrityError:
            return False
        return True

    def outcome_by_key(self, idempotency_key: str) -> sa.Row[Any] | None:
        """The stored outcome with this idempotency key, or None."""
        o = schema.outcomes
        return self._first(sa.select(o).where(o.c.idempotency_key == idempotency_key))

    def outcome_conflict(self, rec: OutcomeRecord) -> str | None:
        """Why ``rec`` differs from the outcome stored under its key (None: the same event).

        Compared: name, value, session_id, user_id, extra and — when ``rec`` gives
        one — occurred_at (a retry without it means "when first received").
        """
        row = self.outcome_by_key(rec.idempotency_key)
        if row is None:
            return None
        diffs = [
            f"{name} {stored!r} != {given!r}"
            for name, stored, given in (
                ("name", row.name, rec.name),
                ("value", float(row.value), float(rec.value)),
                ("session_id", row.session_id, rec.session_id),
                ("user_id", row.user_id, rec.user_id),
                ("extra", dict(row.extra or {}), dict(rec.extra)),
            )
            if stored != given
        ]
        if rec.occurred_at is not None and as_utc(row.occurred_at) != as_utc(rec.occurred_at):
            diffs.append(
                f"occurred_at {as_utc(row.occurred_at).isoformat()} != "
                f"{as_utc(rec.occurred_at).isoformat()}"
            )
        return "; ".join(diffs) or None

    # -- snapshots -------------------------------------------------------------------
    def save_snapshot(
        self,
        experiment_id: str,
        policy: str,
        allocation: Mapping[str, Any],
        summary: Mapping[str, Any],
        *,
        at: datetime | None = None,
    ) -> int:
        """Append a policy snapshot with the next version number; returns the version.

        Two concurrent writers cannot both get the same version (unique key); the
        loser retries with the next number.
        """
        ps = schema.policy_snapshots
        for _ in range(5):
            try:
                with self.engine.begin() as conn:
                    current = conn.execute(
                        sa.select(sa.func.max(ps.c.version)).where(
                            ps.c.experiment_id == experiment_id
                        )
                    ).scalar()
                    version = (current or 0) + 1
                    conn.execute(
                        ps.insert().values(
                            experiment_id=experiment_id,
                            version=version,
                            policy=policy,
                            allocation=dict(allocation),
                            summary=dict(summary),
                            created_at=at or utcnow(),
                        )
                    )
                return version
            except IntegrityError:
                continue
        raise StoreError(
            f"could not write a snapshot for experiment {experiment_id!r}: version conflicts"
        )

    def latest_snapshot(self, experiment_id: str) -> sa.Row[Any] | None:
        ps = schema.policy_snapshots
        return self._first(
            sa.select(ps)
            .where(ps.c.experiment_id == experiment_id)
            .order_by(ps.c.version.desc())
            .limit(1)
        )

    # -- audit -----------------------------------------------------------------------
    def audit(
        self, actor: str, action: str, target: str, details: Mapping[str, Any] | None = None
    ) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                schema.audit_events.insert().values(
                    actor=actor,
                    action=action,
                    target=target,
                    details=dict(details or {}),
                    created_at=utcnow(),
                )
            )

    # -- reading ------------------------------------------------------------------------
    def frame(
        self,
        table: str | sa.Table,
        where: sa.ColumnElement[bool] | None = None,
        *,
        exclude: Iterable[str] = (),
    ) -> pd.DataFrame:
        """A whole table (optionally filtered, without ``exclude`` columns) as a DataFrame
        with UTC timestamps."""
        tbl = schema.metadata.tables[table] if isinstance(table, str) else table
        skip = set(exclude)
        query = sa.select(*(c for c in tbl.columns if c.name not in skip))
        if where is not None:
            query = query.where(where)
        with self.engine.connect() as conn:
            df = pd.read_sql(query, conn)
        for col in tbl.columns:
            if isinstance(col.type, sa.DateTime) and col.name in df:
                df[col.name] = pd.to_datetime(df[col.name], utc=True)
        return df

    def _first(self, query: sa.Select[Any]) -> sa.Row[Any] | None:
        with self.engine.connect() as conn:
            return conn.execute(query).first()

    def _all(self, query: sa.Select[Any]) -> list[sa.Row[Any]]:
        with self.engine.connect() as conn:
            return list(conn.execute(query).all())


def assignment_row(rec: AssignmentRecord) -> dict[str, Any]:
    """The columns an assignment is inserted with (closing fields start empty).

    Also the simulator's batched inserts: one list of columns for every writer.
    """
    return {
        "session_id": rec.session_id,
        "user_id": rec.user_id,
        "experiment_id": rec.experiment_id,
        "arm_id": rec.arm_id,
        "propensity": rec.propensity,
        "snapshot_version": rec.snapshot_version,
        "segment": rec.segment,
        "context": dict(rec.context),
        "simulated": rec.simulated,
        "holdback": rec.holdback,
        "assigned_at": rec.assigned_at,
        "sticky": rec.sticky,
        "thread_id": rec.thread_id,
    }


def _assignment(row: sa.Row[Any]) -> AssignmentRecord:
    return AssignmentRecord(
        session_id=row.session_id,
        user_id=row.user_id,
        experiment_id=row.experiment_id,
        arm_id=row.arm_id,
        propensity=row.propensity,
        snapshot_version=row.snapshot_version,
        segment=row.segment,
        context=row.context or {},
        assigned_at=as_utc(row.assigned_at),
        simulated=bool(row.simulated),
        sticky=None if row.sticky is None else bool(row.sticky),
        thread_id=row.thread_id,
        closed_at=as_utc(row.closed_at) if row.closed_at is not None else None,
        closed_reason=row.closed_reason,
        holdback=bool(row.holdback),
    )


def _insert_turns(conn: sa.Connection, recs: Sequence[TurnRecord]) -> None:
    """Insert turns and bump their sessions' counters, in the caller's transaction."""
    rows = []
    for rec in recs:
        values = {k: getattr(rec, k) for k in rec.__dataclass_fields__}
        values["fewshot_ids"] = list(rec.fewshot_ids)
        values["created_at"] = rec.created_at or utcnow()
        rows.append(values)
    conn.execute(schema.turns.insert(), rows)
    counts: dict[str, list[int]] = {}
    for rec in recs:
        count = counts.setdefault(rec.session_id, [0, 0])
        count[0] += 1
        count[1] += 0 if rec.error is None else 1
    a = schema.assignments
    for session_id, (turns, errors) in sorted(counts.items()):  # one lock order: no deadlock
        # An increment, not a recount: PostgreSQL applies concurrent increments of one row
        # one after another.
        conn.execute(
            a.update()
            .where(a.c.session_id == session_id)
            .values(turns=a.c.turns + turns, errors=a.c.errors + errors)
        )
