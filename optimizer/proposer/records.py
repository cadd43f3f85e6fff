"""Proposal rounds and candidates in the store: written once, decided once.

A candidate's ``status`` is ``rejected`` (a gate failed: ``reason`` says which and
why), ``duplicate`` (too close to an existing arm or another candidate),
``waiting`` (passed every gate, waits for an operator), ``started`` (an arm:
``arm_id``) or ``declined`` (an operator said no). Approving a waiting candidate
creates its arm (origin ``optimizer``, or ``operator`` for an operator's own)
through :meth:`~optimizer.store.Store.add_arm`, audited like any arm.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from optimizer.clock import as_utc, utcnow
from optimizer.errors import StoreError
from optimizer.store import ArmSpec, Store, schema

__all__ = [
    "CANDIDATE_STATUSES",
    "Candidate",
    "add_round_cost",
    "candidates",
    "cost_since",
    "decide",
    "get_candidate",
    "last_round_at",
    "record_candidate",
    "record_round",
    "spent_today",
    "start_candidate",
]

CANDIDATE_STATUSES = ("rejected", "duplicate", "waiting", "started", "declined")


@dataclass(frozen=True)
class Candidate:
    """A stored candidate (see the module docstring for ``status``)."""

    id: str
    round_id: str
    experiment_id: str
    parent_arm_id: str
    source: str
    prompt_text: str | None
    fewshot: str
    fewshot_config: dict[str, Any]
    rationale: str
    status: str
    reason: str | None
    gates: list[dict[str, Any]]
    arm_id: str | None
    created_at: datetime
    decided_at: datetime | None
    decided_by: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "round_id": self.round_id,
            "parent_arm_id": self.parent_arm_id,
            "source": self.source,
            "prompt_text": self.prompt_text,
            "fewshot": self.fewshot,
            "fewshot_config": self.fewshot_config,
            "rationale": self.rationale,
            "status": self.status,
            "reason": self.reason,
            "gates": self.gates,
            "arm_id": self.arm_id,
            "created_at": self.created_at.isoformat(),
        }


def _candidate(row: Any) -> Candidate:
    return Candidate(
        id=row.id,
        round_id=row.round_id,
        experiment_id=row.experiment_id,
        parent_arm_id=row.parent_arm_id,
        source=row.source,
        prompt_text=row.prompt_text,
        fewshot=row.fewshot,
        fewshot_config=dict(row.fewshot_config or {}),
        rationale=row.rationale,
        status=row.status,
        reason=row.reason,
        gates=list(row.gates or []),
        arm_id=row.arm_id,
        created_at=as_utc(row.created_at),
        decided_at=as_utc(row.decided_at) if row.decided_at is not None else None,
        decided_by=row.decided_by,
    )


def record_round(
    store: Store,
    experiment_id: str,
    parent_arm_id: str,
    *,
    source: str,
    model: str | None,
    cost_usd: float,
    details: Mapping[str, Any],
    at: datetime,
) -> str:
    """Write a round; returns its id."""
    round_id = uuid.uuid4().hex
    with store.engine.begin() as conn:
        conn.execute(
            schema.proposal_rounds.insert().values(
                id=round_id,
                experiment_id=experiment_id,
                parent_arm_id=parent_arm_id,
                source=source,
                model=model,
                cost_usd=float(cost_usd),
                details=dict(details),
                created_at=at,
            )
        )
    return round_id


def record_candidate(
    store: Store,
    *,
    round_id: str,
    experiment_id: str,
    parent_arm_id: str,
    source: str,
    prompt_text: str | None,
    fewshot: str,
    fewshot_config: Mapping[str, Any],
    rationale: str,
    status: str,
    reason: str | None,
    gates: Sequence[Mapping[str, Any]],
    at: datetime,
) -> str:
    """Write a candidate; returns its id."""
    if status not in CANDIDATE_STATUSES:
        raise ValueError(f"status must be one of {list(CANDIDATE_STATUSES)}, got {status!r}")
    candidate_id = uuid.uuid4().hex
    with store.engine.begin() as conn:
        conn.execute(
            schema.proposal_candidates.insert().values(
                id=candidate_id,
                round_id=round_id,
                experiment_id=experiment_id,
                parent_arm_id=parent_arm_id,
                source=source,
                prompt_text=prompt_text,
                fewshot=fewshot,
                fewshot_config=dict(fewshot_config),
                rationale=rationale,
                status=status,
                reason=reason,
                gates=[dict(g) for g in gates],
                created_at=at,
            )
        )
    return candidate_id


def add_round_cost(store: Store, round_id: str, cost_usd: float) -> None:
    """Add money spent after the round was written (an operator's candidate's replay)."""
    pr = schema.proposal_rounds
    with store.engine.begin() as conn:
        conn.execute(
            pr.update().where(pr.c.id == round_id).values(cost_usd=pr.c.cost_usd + float(cost_usd))
        )


def candidates(
    store: Store, experiment_id: str, *, status: str | Sequence[str] | None = None
) -> list[Candidate]:
    """The experiment's candidates, newest first, optionally of some statuses."""
    pc = schema.proposal_candidates
    query = sa.select(pc).where(pc.c.experiment_id == experiment_id)
    if status is not None:
        wanted = [status] if isinstance(status, str) else list(status)
        query = query.where(pc.c.status.in_(wanted))
    with store.engine.connect() as conn:
        rows = conn.execute(query.order_by(pc.c.created_at.desc(), pc.c.id)).all()
    return [_candidate(r) for r in rows]


def get_candidate(store: Store, candidate_id: str) -> Candidate | None:
    pc = schema.proposal_candidates
    with store.engine.connect() as conn:
        row = conn.execute(sa.select(pc).where(pc.c.id == candidate_id)).first()
    return _candidate(row) if row is not None else None


def last_round_at(store: Store, experiment_id: str, *, source: str = "proposer") -> datetime | None:
    pr = schema.proposal_rounds
    with store.engine.connect() as conn:
        at = conn.execute(
            sa.select(sa.func.max(pr.c.created_at)).where(
                pr.c.experiment_id == experiment_id, pr.c.source == source
            )
        ).scalar()
    return as_utc(at) if at is not None else None


def cost_since(store: Store, since: datetime) -> float:
    """Money the proposer's rounds spent since ``since`` (all experiments)."""
    pr = schema.proposal_rounds
    with store.engine.connect() as conn:
        total = conn.execute(
            sa.select(sa.func.coalesce(sa.func.sum(pr.c.cost_usd), 0.0)).where(
                pr.c.created_at >= since
            )
        ).scalar()
    return float(total or 0.0)


def spent_today(store: Store, now: datetime) -> float:
    """Money the proposer spent since the start of ``now``'s UTC day."""
    return cost_since(store, _start_of_day(now))


def _start_of_day(now: datetime) -> datetime:
    now = as_utc(now)
    return now - timedelta(
        hours=now.hour, minutes=now.minute, seconds=now.second, microseconds=now.microsecond
    )


def start_candidate(
    store: Store,
    candidate: Candidate,
    *,
    prompt_id: str,
    prompt_hash: str,
    model: str | None,
    actor: str,
    at: datetime | None = None,
    trial_cap: float = 1.0,
    arm_id: str | None = None,
) -> str:
    """Create the candidate's arm and mark it started; returns the arm id.

    ``trial_cap`` < 1 caps its traffic share from the start (``cap_set``, see
    :mod:`optimizer.proposer.trials`).

    The arm id is ``<parent base>+p<first 8 of the candidate id>``, so that a
    candidate never becomes a new *version* of its parent (which would retire it).
    The candidate is marked first (only one caller wins a double click), then the
    arm is created. ``arm_id`` (an operator's own variant) replaces the generated id and
    names its prompt too (as an arm added without the gates is named).
    """
    at = at or utcnow()
    parent_base = candidate.parent_arm_id.split("@v", 1)[0]
    if arm_id is not None:  # an operator's own variant is its own prompt, named like its arm
        prompt_id = arm_id
    arm_id = arm_id or f"{parent_base[:170]}+p{candidate.id[:8]}"
    origin = "operator" if candidate.source == "operator" else "optimizer"
    spec = ArmSpec(
        arm_id,
        prompt_id,
        prompt_hash,
        candidate.fewshot,
        candidate.fewshot_config,
        prompt_text=candidate.prompt_text,
        model=model,
        origin=origin,
    )
    _set(store, candidate.id, "started", actor, at, arm_id=arm_id, expect=("waiting",))
    arm_id, _ = store.add_arm(candidate.experiment_id, spec, actor=actor, at=at)
    if trial_cap < 1:
        store.record_arm_event(
            candidate.experiment_id,
            arm_id,
            "cap_set",
            actor=actor,
            evidence={"cap": float(trial_cap), "trial": "started"},
            at=at,
        )
    return arm_id


def decide(
    store: Store, candidate_id: str, *, approve: bool, actor: str, **start: Any
) -> Candidate:
    """An operator's one click: approve (start the arm) or decline a waiting candidate.

    ``start`` are :func:`start_candidate`'s keyword arguments (prompt id, hash, model).
    Raises :class:`StoreError` for an unknown candidate or one not waiting.
    """
    candidate = get_candidate(store, candidate_id)
    if candidate is None:
        raise StoreError(f"no candidate {candidate_id!r}")
    if candidate.status != "waiting":
        raise StoreError(f"candidate {candidate_id!r} is {candidate.status}, not waiting")
    if approve:
        start_candidate(store, candidate, actor=actor, **start)
    else:
        _set(store, candidate_id, "declined", actor, utcnow(), expect=("waiting",))
    store.audit(
        actor,
        "candidate_approved" if approve else "candidate_declined",
        f"{candidate.experiment_id}/{candidate_id}",
        {"parent": candidate.parent_arm_id, "source": candidate.source},
    )
    updated = get_candidate(store, candidate_id)
    assert updated is not None
    return updated


def _set(
    store: Store,
    candidate_id: str,
    status: str,
    actor: str,
    at: datetime,
    *,
    arm_id: str | None = None,
    expect: Sequence[str],
) -> None:
    pc = schema.proposal_candidates
    values: dict[str, Any] = {"status": status, "decided_at": at, "decided_by": actor}
    if arm_id is not None:
        values["arm_id"] = arm_id
    with store.engine.begin() as conn:
        done = conn.execute(
            pc.update()
            .where(pc.c.id == candidate_id, pc.c.status.in_(list(expect)))
            .values(**values)
        ).rowcount
    if not done:
        raise StoreError(f"candidate {candidate_id!r} was decided by someone else meanwhile")
