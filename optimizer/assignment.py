"""Assign each chat session to an arm: sticky per user, with the propensity logged.

The chat path calls :meth:`Assigner.assign` once per session. The allocation
comes from the newest policy snapshot (cached for ``snapshot_ttl_s``), or is
uniform over the active arms before the first snapshot. A user is hashed with
the experiment salt to a point in [0, 1) and takes the arm whose slice of the
cumulative allocation holds that point, so the same user lands on the same arm
while the allocation barely moves; a returning user keeps their previous arm
outright while it is still served (allocation > 0).

Propensities are exact: a drawn arm logs the probability it was drawn with; a
kept arm logs ``sticky=True`` and propensity 1.0 (it was kept with certainty).
Off-policy evaluation therefore works per *assignment unit* — a draw and the
sticky sessions that followed it — with the draw's propensity
(:func:`optimizer.ope.logs.logs_from_store`).

A paused (or retired) arm serves nobody: :meth:`Assigner.ensure_serving`, called
before every reply, moves a conversation whose arm stopped serving to the
champion — the old assignment is closed with the reason, a new one (session id
``"<thread>~<n>"``, propensity 1.0: a forced move, not a draw) continues the
thread — so every assignment keeps one arm and one propensity.

**Holdback.** With ``holdback`` > 0, that share of users (by a hash of their id
with the salt and ``":holdback"``, so it is sticky and independent of the arm
split) is served the experiment's ``baseline`` arm for the experiment's life,
whatever the snapshot says and whatever is promoted: the flywheel's own lift is
the KPI of everyone else against theirs. Their assignments carry
``holdback=True`` and propensity 1; the optimizer leaves them out of the
bandit, the guardrails, the SRM check and off-policy estimates (see
:mod:`optimizer.holdback`).
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from optimizer.clock import utcnow
from optimizer.errors import PolicyError
from optimizer.store import ACTIVE_STATUSES, AssignmentRecord, Store
from optimizer.store.versions import successor

__all__ = ["Allocation", "Assigner", "choose_arm", "in_holdback", "segment_key", "user_point"]

#: The allocation key that applies to every session without a segment of its own.
ALL_SEGMENTS = "*"


def user_point(user_id: str, salt: str) -> float:
    """Deterministic point in [0, 1) for a user in an experiment."""
    digest = hashlib.blake2b(f"{salt}:{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def in_holdback(user_id: str, salt: str, share: float) -> bool:
    """Whether a user is in the experiment's holdback of ``share`` (sticky, by hash).

    >>> in_holdback("u1", "salt", 0.0), in_holdback("u1", "salt", 0.999999)
    (False, True)
    """
    return share > 0 and user_point(user_id, f"{salt}:holdback") < share


def segment_key(context: Mapping[str, Any], segment_by: Sequence[str]) -> str:
    """``"plan=pro|channel=web"`` from the context keys named in ``segment_by``; ``"*"`` if none."""
    if not segment_by:
        return ALL_SEGMENTS
    return "|".join(f"{k}={context.get(k, '')}" for k in segment_by)


def choose_arm(allocation: Mapping[str, float], point: float) -> tuple[str, float]:
    """Arm whose cumulative slice (arms in sorted order) contains ``point``, with its probability.

    >>> choose_arm({"a": 0.25, "b": 0.75}, 0.1)
    ('a', 0.25)
    >>> choose_arm({"a": 0.25, "b": 0.75}, 0.9)
    ('b', 0.75)
    """
    total = 0.0
    last: tuple[str, float] | None = None
    for arm in sorted(allocation):
        p = allocation[arm]
        if p <= 0:
            continue
        total += p
        last = (arm, p)
        if point < total:
            return last
    if last is None:
        raise PolicyError("allocation gives no arm a positive probability")
    return last  # rounding: point beyond the last slice


@dataclass(frozen=True)
class Allocation:
    """What serving needs from a snapshot: per-segment arm probabilities and the version."""

    segments: Mapping[str, Mapping[str, float]]
    version: int | None
    #: Arm statuses when the allocation was read (empty: not known).
    statuses: Mapping[str, str] = field(default_factory=dict)

    def for_segment(self, segment: str) -> Mapping[str, float]:
        return self.segments.get(segment) or self.segments[ALL_SEGMENTS]


class Assigner:
    """Sticky arm assignment for one experiment, reading the newest snapshot.

    >>> from optimizer.store import ArmSpec
    >>> store = Store("sqlite:///:memory:"); store.create_all()
    >>> store.sync_experiment("exp", "salt", [ArmSpec("a", "p", "h"), ArmSpec("b", "p", "h")])
    >>> a = Assigner(store, "exp", salt="salt").assign("session-1", "user-1")
    >>> a.propensity
    0.5
    """

    def __init__(
        self,
        store: Store,
        experiment_id: str,
        *,
        salt: str,
        segment_by: Sequence[str] = (),
        snapshot_ttl_s: float = 5.0,
        champion: str | None = None,
        holdback: float = 0.0,
        baseline: str | None = None,
    ) -> None:
        if not 0 <= holdback < 1:
            raise ValueError(f"holdback must be in [0, 1), got {holdback!r}")
        if holdback > 0 and not baseline:
            raise ValueError("a holdback needs a baseline arm, got none")
        self.holdback = holdback
        self.baseline = baseline
        self.store = store
        self.champion = champion
        self.experiment_id = experiment_id
        self.salt = salt
        self.segment_by = tuple(segment_by)
        self.snapshot_ttl_s = snapshot_ttl_s
        self._cached: Allocation | None = None
        self._cached_at = 0.0
        self._lock = threading.Lock()

    def allocation(self) -> Allocation:
        """Newest allocation, re-read from the store at most every ``snapshot_ttl_s``."""
        now = time.monotonic()
        with self._lock:
            if self._cached is not None and now - self._cached_at < self.snapshot_ttl_s:
                return self._cached
        fresh = self._load_allocation()
        with self._lock:
            self._cached, self._cached_at = fresh, now
        return fresh

    def invalidate(self) -> None:
        """Forget the cached snapshot (an operator action must show on the next assignment)."""
        with self._lock:
            self._cached = None

    def _load_allocation(self) -> Allocation:
        statuses = self.store.arm_statuses(self.experiment_id)
        active = sorted(a for a, s in statuses.items() if s in ACTIVE_STATUSES)
        snapshot = self.store.latest_snapshot(self.experiment_id)
        if snapshot is not None:
            segments = {
                seg: {arm: float(p) for arm, p in alloc.items() if arm in active and p > 0}
                for seg, alloc in snapshot.allocation.get("segments", {}).items()
            }
            segments = {seg: _normalised(alloc) for seg, alloc in segments.items() if alloc}
            if ALL_SEGMENTS in segments:
                return Allocation(segments, snapshot.version, statuses)
        if not active:
            raise PolicyError(f"experiment {self.experiment_id!r} has no active arm to assign")
        # Before the first snapshot (or if it names no active arm): uniform, the A/B baseline.
        return Allocation({ALL_SEGMENTS: {arm: 1 / len(active) for arm in active}}, None, statuses)

    def ensure_serving(
        self, current: AssignmentRecord, *, at: datetime | None = None
    ) -> AssignmentRecord:
        """``current`` while its arm serves; else the conversation moved to one that does.

        An arm serves while its status is active or champion (an arm unknown to the
        store, e.g. before any sync, is left alone; a holdback assignment always
        stays). Otherwise the conversation moves to the arm's newest version when an
        edit retired it, else to the champion (status ``champion``, else the
        configured one, if it serves), or to a fresh draw from the allocation when no
        champion serves; the old assignment is closed with the reason
        (:meth:`Store.reassign`).
        """
        if current.holdback:  # the holdback stays on its baseline for the experiment's life
            return current
        allocation = self.allocation()
        status = allocation.statuses.get(current.arm_id)
        if status is None or status in ACTIVE_STATUSES:
            return current
        probs = allocation.for_segment(current.segment)
        champion = next((a for a, s in allocation.statuses.items() if s == "champion"), None)
        champion = champion or self.champion
        # An edited prompt retired this version: the conversation goes on with the new one.
        newest = successor(list(self.store.arms(self.experiment_id)), current.arm_id)
        if newest != current.arm_id and allocation.statuses.get(newest) in ACTIVE_STATUSES:
            arm, propensity, how = newest, 1.0, "its newest version"
        elif champion is not None and allocation.statuses.get(champion) in ACTIVE_STATUSES:
            arm, propensity, how = champion, 1.0, "the champion"
        else:
            arm, propensity = choose_arm(probs, user_point(current.user_id, self.salt))
            how = "a fresh draw"
        reason = f"arm {current.arm_id!r} is {status}: moved to {how} {arm!r}"
        _, _, n = current.session_id.partition("~")
        new = replace(
            current,
            session_id=f"{current.thread}~{int(n) + 1 if n.isdigit() else 1}",
            arm_id=arm,
            propensity=propensity,
            snapshot_version=allocation.version,
            context={**current.context, "reassigned_from": current.arm_id, "reason": reason},
            assigned_at=at or utcnow(),
            sticky=False,
            thread_id=current.thread,
            closed_at=None,
            closed_reason=None,
        )
        return self.store.reassign(current, new, reason)

    def assign(
        self,
        session_id: str,
        user_id: str,
        context: Mapping[str, Any] | None = None,
        *,
        at: datetime | None = None,
        simulated: bool = False,
    ) -> AssignmentRecord:
        """Return the session's arm, assigning and recording it on first call."""
        existing = self.store.get_assignment(session_id)
        if existing is not None:
            return existing
        context = dict(context or {})
        segment = segment_key(context, self.segment_by)
        if self.holdback > 0 and in_holdback(user_id, self.salt, self.holdback):
            assert self.baseline is not None
            return self.store.record_assignment(
                AssignmentRecord(
                    session_id=session_id,
                    user_id=user_id,
                    experiment_id=self.experiment_id,
                    arm_id=self.baseline,
                    propensity=1.0,
                    snapshot_version=None,
                    segment=segment,
                    context=context,
                    assigned_at=at or utcnow(),
                    simulated=simulated,
                    holdback=True,
                )
            )
        allocation = self.allocation()
        probs = allocation.for_segment(segment)
        previous = self.store.last_assignment_for_user(user_id, self.experiment_id)
        sticky = previous is not None and probs.get(previous.arm_id, 0) > 0
        if previous is not None and sticky:
            arm, propensity = previous.arm_id, 1.0  # kept with certainty, not drawn
            context["returning"] = True
        else:
            arm, propensity = choose_arm(probs, user_point(user_id, self.salt))
        record = AssignmentRecord(
            session_id=session_id,
            user_id=user_id,
            experiment_id=self.experiment_id,
            arm_id=arm,
            propensity=propensity,
            snapshot_version=allocation.version,
            segment=segment,
            context=context,
            assigned_at=at or utcnow(),
            simulated=simulated,
            sticky=sticky,
        )
        return self.store.record_assignment(record)


def _normalised(alloc: Mapping[str, float]) -> dict[str, float]:
    total = sum(alloc.values())
    return {arm: p / total for arm, p in alloc.items()}
