"""Sample-ratio mismatch: were sessions split the way the policy intended?

A χ² test of the observed assignment counts per arm against the counts the
allocations in force would produce. Only a propensity for the *chosen* arm is
logged, so the intended split is rebuilt from what serving used: the policy
snapshot of the session's ``snapshot_version`` (uniform when None, before the
first snapshot), its segment (or ``"*"``), restricted to the arms active at the
assignment time (from arm events) and renormalised — exactly as
:class:`optimizer.assignment.Assigner` does.

Only each user's **first** session counts: a returning user keeps their arm
(stickiness), so later sessions do not follow the allocation by design.

Expected counts are summed over the (version, segment, active arms) groups and
compared per arm: ``χ² = Σ (O − E)² / E`` with ``arms − 1`` degrees of freedom.
Pooling groups whose allocations differ makes the test slightly conservative
(the counts vary less than one multinomial would), never trigger-happy. With an
expected count below 5 for some arm the test is not run. ``p < 0.001`` is a
warning: a bug in assignment, logging or bot filtering, not bad luck.

>>> import pandas as pd
>>> frame = pd.DataFrame({"user_id": [f"u{i}" for i in range(1000)],
...                       "arm_id": ["a"] * 600 + ["b"] * 400,
...                       "snapshot_version": None, "segment": "*", "assigned_at": pd.NaT})
>>> result = srm_check(frame, {})
>>> result.warning, result.p_value < 1e-9
(True, True)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from scipy import stats

from optimizer.assignment import ALL_SEGMENTS
from optimizer.clock import as_utc
from optimizer.moments import group_sums
from optimizer.store import ACTIVE_STATUSES, Store, schema
from optimizer.store.schema import ARM_STATUS_BY_EVENT

__all__ = [
    "MIN_EXPECTED",
    "SRMResult",
    "arm_activity",
    "load_allocations",
    "srm_check",
    "srm_from_groups",
    "srm_groups",
]

log = logging.getLogger(__name__)

#: The χ² approximation needs at least this many expected sessions per arm.
MIN_EXPECTED = 5.0

Allocations = Mapping[int, Mapping[str, Mapping[str, float]]]


@dataclass(frozen=True)
class SRMResult:
    """Outcome of the test; ``p_value`` is None when it could not be run (too few sessions)."""

    chi2: float | None
    dof: int
    p_value: float | None
    warning: bool
    sessions: int
    threshold: float
    observed: dict[str, int] = field(default_factory=dict)
    expected: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        chi2 = self.chi2 if self.chi2 is None or math.isfinite(self.chi2) else None
        return {
            "chi2": chi2,
            "dof": self.dof,
            "p_value": self.p_value,
            "warning": self.warning,
            "sessions": self.sessions,
            "threshold": self.threshold,
            "observed": dict(self.observed),
            "expected": {k: round(v, 3) for k, v in self.expected.items()},
        }


def srm_check(
    sessions: pd.DataFrame,
    allocations: Allocations,
    *,
    activity: pd.DataFrame | None = None,
    threshold: float = 0.001,
) -> SRMResult:
    """Test the first session of each user against the allocation in force when it was assigned.

    ``allocations`` maps snapshot version → ``{segment: {arm: p}}`` (see
    :func:`load_allocations`); ``activity`` holds the arms' status changes (see
    :func:`arm_activity`; None = every arm always active). Sessions need
    ``user_id``, ``arm_id``, ``snapshot_version``, ``segment`` and ``assigned_at``.
    """
    first = sessions.drop_duplicates("user_id", keep="first")
    return srm_from_groups(
        srm_groups(first, activity), allocations, activity=activity, threshold=threshold
    )


def srm_groups(first: pd.DataFrame, activity: pd.DataFrame | None = None) -> pd.DataFrame:
    """First sessions counted by ``version`` (-1: none), ``segment``, ``inactive`` (the arms
    inactive at assignment, comma-joined) and ``arm_id``: mergeable by addition.

    An arm's status at a session's time is final once the session is past (status
    events are stamped when they happen), so counts of old sessions can be kept
    (:mod:`optimizer.refit_state`); an arm without events counts as active.
    """
    columns = ["version", "segment", "inactive", "arm_id", "n"]
    if first.empty:
        return pd.DataFrame({c: pd.Series(dtype=float if c == "n" else object) for c in columns})
    with_events = sorted(set(activity["arm_id"])) if activity is not None else []
    flags = _active_flags(first, with_events, activity)
    inactive = np.full(len(first), "", dtype=object)
    for i, arm in enumerate(with_events):
        off = ~flags[f"active_{i}"].to_numpy(dtype=bool)
        inactive[off] = inactive[off] + arm + ","
    version = first["snapshot_version"].astype("Int64").fillna(-1).astype(np.int64)
    keys = {
        "version": version.to_numpy(),
        "segment": first["segment"].to_numpy(dtype=object),
        "inactive": inactive,
        "arm_id": first["arm_id"].to_numpy(dtype=object),
    }
    return group_sums(keys, {"n": None}, len(first))


def srm_from_groups(
    groups: pd.DataFrame,
    allocations: Allocations,
    *,
    activity: pd.DataFrame | None = None,
    threshold: float = 0.001,
) -> SRMResult:
    """The χ² test on :func:`srm_groups` counts (summed over any number of parts)."""
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
    groups = groups[groups["n"] > 0] if len(groups) else groups
    if groups.empty:
        return SRMResult(None, 0, None, False, 0, threshold)
    arms = sorted(pd.unique(groups["arm_id"]).tolist())
    known = sorted(set(arms) | (set(activity["arm_id"]) if activity is not None else set()))
    uniform_arms = sorted(pd.unique(groups.loc[groups["version"] < 0, "arm_id"]).tolist())
    totals = groups.groupby(["version", "segment", "inactive"], sort=True)["n"].sum()
    expected: dict[str, float] = dict.fromkeys(known, 0.0)
    for (ver, seg, off), n in totals.items():  # one per (version, segment, active set)
        inactive = set(str(off).split(",")) - {""}
        active = {a for a in known if a not in inactive}
        probs = _intended(
            allocations.get(int(ver)) if ver >= 0 else None, seg, active, uniform_arms
        )
        for arm, p in probs.items():
            expected[arm] = expected.get(arm, 0.0) + float(n) * p
    by_arm = groups.groupby("arm_id", sort=True)["n"].sum().to_dict()
    observed = {str(a): round(float(by_arm.get(a, 0))) for a in known}
    cells = [a for a in known if expected.get(a, 0) > 0 or observed[a] > 0]
    exp = np.array([expected.get(a, 0.0) for a in cells])
    obs = np.array([observed[a] for a in cells], dtype=float)
    n = round(float(groups["n"].sum()))
    dof = int((exp > 0).sum()) - 1
    exp_out = {a: float(expected.get(a, 0.0)) for a in cells}
    if ((exp == 0) & (obs > 0)).any():  # sessions on an arm that had no share: certain mismatch
        return SRMResult(math.inf, max(dof, 1), 0.0, True, n, threshold, observed, exp_out)
    keep = exp > 0
    if dof < 1 or exp[keep].min() < MIN_EXPECTED:
        return SRMResult(None, max(dof, 0), None, False, n, threshold, observed, exp_out)
    chi2 = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    p_value = float(stats.chi2.sf(chi2, dof))
    warning = p_value < threshold
    if warning:
        log.warning("sample ratio mismatch: chi2=%.1f dof=%d p=%.2g", chi2, dof, p_value)
    return SRMResult(chi2, dof, p_value, warning, n, threshold, observed, exp_out)


def _intended(
    allocation: Mapping[str, Mapping[str, float]] | None,
    segment: str,
    active: set[str],
    uniform_arms: Sequence[str],
) -> dict[str, float]:
    """The split serving used, mirroring ``Assigner._load_allocation`` and ``for_segment``."""
    if allocation is not None:
        cleaned = {
            seg: {a: float(p) for a, p in alloc.items() if a in active and p > 0}
            for seg, alloc in allocation.items()
        }
        cleaned = {seg: alloc for seg, alloc in cleaned.items() if alloc}
        if ALL_SEGMENTS in cleaned:
            probs = cleaned.get(segment) or cleaned[ALL_SEGMENTS]
            total = sum(probs.values())
            return {a: p / total for a, p in probs.items()}
    arms = [a for a in (uniform_arms if allocation is None else sorted(active)) if a in active]
    arms = arms or sorted(active)
    return {a: 1 / len(arms) for a in arms} if arms else {}


def _active_flags(
    first: pd.DataFrame, known: Sequence[str], activity: pd.DataFrame | None
) -> pd.DataFrame:
    """One boolean column per arm of ``known``: active at the session's assignment time?"""
    n = len(first)
    flags: dict[str, np.ndarray] = {}
    times = pd.to_datetime(first["assigned_at"], utc=True).to_numpy(dtype="datetime64[us]")
    for i, arm in enumerate(known):  # one vectorised lookup per arm
        on = np.ones(n, dtype=bool)  # before its first event an arm counts as active
        if activity is not None:
            ev = activity[activity["arm_id"] == arm]
            if not ev.empty:
                at = ev["at"].to_numpy(dtype="datetime64[us]")
                idx = np.searchsorted(at, times, side="right") - 1
                state = ev["active"].to_numpy(dtype=bool)
                on = np.where(idx >= 0, state[np.maximum(idx, 0)], True)
        flags[f"active_{i}"] = on
    return pd.DataFrame(flags, index=first.index)


def arm_activity(store: Store, experiment_id: str) -> pd.DataFrame:
    """Each status change of each arm: ``arm_id``, ``at`` (UTC), ``active`` (bool), in order."""
    ev = schema.arm_events
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(ev.c.arm_id, ev.c.kind, ev.c.created_at)
            .where(ev.c.experiment_id == experiment_id)
            .order_by(ev.c.id)
        ).all()
    records = [
        (r.arm_id, as_utc(r.created_at), ARM_STATUS_BY_EVENT[r.kind] in ACTIVE_STATUSES)
        for r in rows  # status events are few: one per pause, resume or promotion
        if r.kind in ARM_STATUS_BY_EVENT
    ]
    frame = pd.DataFrame(records, columns=["arm_id", "at", "active"])
    frame["at"] = pd.to_datetime(frame["at"], utc=True)
    return frame.sort_values(["arm_id", "at"], kind="stable").reset_index(drop=True)


def load_allocations(
    store: Store, experiment_id: str, versions: Sequence[int] | None = None
) -> dict[int, dict[str, dict[str, float]]]:
    """``{version: {segment: {arm: p}}}`` of the snapshots (only ``versions`` when given)."""
    ps = schema.policy_snapshots
    query = sa.select(ps.c.version, ps.c.allocation).where(ps.c.experiment_id == experiment_id)
    if versions is not None:
        wanted = sorted({int(v) for v in versions})
        if not wanted:
            return {}
        query = query.where(ps.c.version.between(wanted[0], wanted[-1]))
    with store.engine.connect() as conn:
        rows = conn.execute(query).all()
    return {int(r.version): dict((r.allocation or {}).get("segments", {})) for r in rows}
