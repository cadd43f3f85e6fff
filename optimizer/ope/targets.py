"""Target policies: the allocation whose KPI off-policy evaluation estimates.

A target maps each logged session to a probability for every arm, using only
the session's ``segment`` (the allocation key serving uses, see
:func:`optimizer.assignment.segment_key`). Four kinds cover what an operator asks:

- :class:`ArmTarget` -- one arm at 100% ("what if we promoted ``empathetic``?"),
- :class:`AllocationTarget` -- an explicit ``{segment: {arm: p}}`` allocation, e.g.
  a proposed challenger split or a policy snapshot (:func:`snapshot_target`),
- :class:`UniformTarget` -- uniform over the logged arms (the A/B baseline).

:func:`parse_target` reads the CLI spellings (``arm:NAME``, ``uniform``,
``snapshot[:VERSION]``, ``allocation:FILE.json``).
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from optimizer.assignment import ALL_SEGMENTS
from optimizer.errors import EstimationError

__all__ = [
    "AllocationTarget",
    "ArmTarget",
    "TargetPolicy",
    "UniformTarget",
    "as_target",
    "parse_target",
    "snapshot_target",
]

#: How far an allocation's probabilities may sum from 1 before it is rejected (then normalised).
SUM_TOLERANCE = 0.01


class TargetPolicy(ABC):
    """A policy to evaluate: probabilities over arms for each logged session."""

    @abstractmethod
    def probabilities(self, frame: pd.DataFrame, arms: Sequence[str]) -> np.ndarray:
        """Matrix ``(len(frame), len(arms))`` of target probabilities; rows sum to 1.

        Raises :class:`EstimationError` when the target gives mass to an arm
        outside ``arms`` (the logged arms): no estimator can evaluate it.
        """

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """A JSON-ready description for reports."""


@dataclass(frozen=True)
class ArmTarget(TargetPolicy):
    """Every session gets ``arm``.

    >>> ArmTarget("b").probabilities(pd.DataFrame({"segment": ["*", "*"]}), ["a", "b"])
    array([[0., 1.],
           [0., 1.]])
    """

    arm: str

    def probabilities(self, frame: pd.DataFrame, arms: Sequence[str]) -> np.ndarray:
        arms = list(arms)
        if self.arm not in arms:
            raise EstimationError(f"target arm {self.arm!r} was never logged; logged arms: {arms}")
        out = np.zeros((len(frame), len(arms)))
        out[:, arms.index(self.arm)] = 1.0
        return out

    def describe(self) -> dict[str, Any]:
        return {"kind": "arm", "arm": self.arm, "label": f"arm:{self.arm}"}


@dataclass(frozen=True)
class UniformTarget(TargetPolicy):
    """Equal probability for every logged arm (the A/B test baseline).

    >>> UniformTarget().probabilities(pd.DataFrame({"segment": ["*"]}), ["a", "b"])
    array([[0.5, 0.5]])
    """

    def probabilities(self, frame: pd.DataFrame, arms: Sequence[str]) -> np.ndarray:
        if not arms:
            raise EstimationError("uniform target needs at least one logged arm, got none")
        return np.full((len(frame), len(arms)), 1.0 / len(arms))

    def describe(self) -> dict[str, Any]:
        return {"kind": "uniform", "label": "uniform"}


@dataclass(frozen=True)
class AllocationTarget(TargetPolicy):
    """Per-segment arm probabilities, ``"*"`` covering segments not listed.

    Probabilities are validated (finite, non-negative, summing to 1 within
    ``SUM_TOLERANCE``) and normalised, as serving normalises a snapshot.

    >>> t = AllocationTarget({"*": {"a": 1.0}, "plan=pro": {"a": 0.25, "b": 0.75}})
    >>> t.probabilities(pd.DataFrame({"segment": ["plan=free", "plan=pro"]}), ["a", "b"])
    array([[1.  , 0.  ],
           [0.25, 0.75]])
    """

    segments: Mapping[str, Mapping[str, float]]
    label: str = "allocation"
    version: int | None = None
    _clean: dict[str, dict[str, float]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.segments, Mapping) or not self.segments:
            raise ValueError(
                "allocation must be a non-empty mapping {segment: {arm: p}}, "
                f"got {self.segments!r}"
            )
        clean: dict[str, dict[str, float]] = {}
        for segment, alloc in self.segments.items():
            if not isinstance(alloc, Mapping) or not alloc:
                raise ValueError(
                    f"allocation for segment {segment!r} must be a non-empty {{arm: p}} "
                    f"mapping, got {alloc!r}"
                )
            probs: dict[str, float] = {}
            for arm, p in alloc.items():
                try:
                    value = float(p)
                except (TypeError, ValueError):
                    raise ValueError(
                        f"probability of arm {arm!r} in segment {segment!r} must be a "
                        f"number, got {p!r}"
                    ) from None
                if not (math.isfinite(value) and value >= 0):
                    raise ValueError(
                        f"probability of arm {arm!r} in segment {segment!r} must be finite "
                        f"and >= 0, got {p!r}"
                    )
                probs[str(arm)] = value
            total = sum(probs.values())
            if abs(total - 1.0) > SUM_TOLERANCE:
                raise ValueError(
                    f"probabilities in segment {segment!r} must sum to 1 "
                    f"(±{SUM_TOLERANCE}), got {total:g}"
                )
            clean[str(segment)] = {arm: p / total for arm, p in probs.items() if p > 0}
        object.__setattr__(self, "_clean", clean)

    @classmethod
    def from_json(cls, data: Mapping[str, Any], *, label: str = "allocation") -> AllocationTarget:
        """Accept a snapshot (``{"allocation": {"segments": …}}``), its allocation
        (``{"segments": …}``), a bare ``{segment: {arm: p}}`` or a flat ``{arm: p}``."""
        if not isinstance(data, Mapping):
            raise ValueError(f"allocation JSON must be an object, got {type(data).__name__}")
        version = data.get("version") if isinstance(data.get("version"), int) else None
        if isinstance(data.get("allocation"), Mapping):
            data = data["allocation"]
        if isinstance(data.get("segments"), Mapping):
            data = data["segments"]
        if data and all(not isinstance(v, Mapping) for v in data.values()):
            data = {ALL_SEGMENTS: data}
        return cls(data, label=label, version=version)

    def probabilities(self, frame: pd.DataFrame, arms: Sequence[str]) -> np.ndarray:
        arms = list(arms)
        index = {arm: j for j, arm in enumerate(arms)}
        segments = _segments(frame)
        out = np.zeros((len(frame), len(arms)))
        for segment in pd.unique(segments):
            alloc = self._clean.get(segment, self._clean.get(ALL_SEGMENTS))
            if alloc is None:
                raise EstimationError(
                    f"{self.label}: no allocation for segment {segment!r} and no {ALL_SEGMENTS!r} "
                    f"fallback; allocated segments: {sorted(self._clean)}"
                )
            unknown = sorted(a for a in alloc if a not in index)
            if unknown:
                raise EstimationError(
                    f"{self.label} puts mass on arms never logged: {unknown} "
                    f"(segment {segment!r}); logged arms: {arms}"
                )
            rows = segments == segment
            for arm, p in alloc.items():
                out[rows, index[arm]] = p
        return out

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": "allocation", "label": self.label, "segments": self._clean}
        if self.version is not None:
            out["version"] = self.version
        return out


def _segments(frame: pd.DataFrame) -> np.ndarray:
    if "segment" not in frame:
        return np.full(len(frame), ALL_SEGMENTS, dtype=object)
    return frame["segment"].fillna(ALL_SEGMENTS).astype(str).to_numpy(dtype=object)


def snapshot_target(store: Any, experiment_id: str, version: int | None = None) -> AllocationTarget:
    """The allocation of a policy snapshot (the newest when ``version`` is None).

    Raises :class:`EstimationError` when the experiment has no such snapshot.
    """
    if version is None:
        row = store.latest_snapshot(experiment_id)
        if row is None:
            raise EstimationError(f"experiment {experiment_id!r} has no policy snapshot yet")
        allocation, version = row.allocation, row.version
    else:
        from optimizer.store import schema

        ps = schema.policy_snapshots
        found = store.frame(ps, (ps.c.experiment_id == experiment_id) & (ps.c.version == version))
        if found.empty:
            raise EstimationError(
                f"experiment {experiment_id!r} has no policy snapshot version {version}"
            )
        allocation = found["allocation"].iloc[0]
    if isinstance(allocation, str):  # a driver that returns JSON as text
        allocation = json.loads(allocation)
    target = AllocationTarget.from_json(allocation, label=f"snapshot:{version}")
    return AllocationTarget(target.segments, label=target.label, version=version)


def parse_target(spec: str, *, store: Any = None, experiment_id: str | None = None) -> TargetPolicy:
    """A target from its CLI spelling.

    ``uniform``, ``arm:NAME``, ``allocation:FILE.json`` (a snapshot or an allocation,
    see :meth:`AllocationTarget.from_json`), ``snapshot`` or ``snapshot:VERSION``
    (needs ``store`` and ``experiment_id``).

    >>> parse_target("arm:concise")
    ArmTarget(arm='concise')
    """
    kind, _, arg = spec.strip().partition(":")
    if kind == "uniform" and not arg:
        return UniformTarget()
    if kind == "arm" and arg:
        return ArmTarget(arg)
    if kind == "allocation" and arg:
        path = Path(arg)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ValueError(
                f"target allocation file {arg!r} cannot be read: {exc.strerror}"
            ) from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"target allocation file {arg!r} is not valid JSON: {exc}") from None
        try:
            return AllocationTarget.from_json(data, label=f"allocation:{path.name}")
        except ValueError as exc:
            raise ValueError(f"{arg}: {exc}") from None
    if kind == "snapshot":
        if store is None or experiment_id is None:
            raise ValueError("target 'snapshot' needs a store and an experiment id")
        if not arg:
            return snapshot_target(store, experiment_id)
        if not arg.isdigit():
            raise ValueError(f"snapshot version must be a positive integer, got {arg!r}")
        return snapshot_target(store, experiment_id, int(arg))
    raise ValueError(
        "target must be 'uniform', 'arm:NAME', 'snapshot[:VERSION]' or 'allocation:FILE.json', "
        f"got {spec!r}"
    )


def as_target(target: TargetPolicy | str | Mapping[str, Any]) -> TargetPolicy:
    """Coerce a target object, a spec string or an allocation mapping to a :class:`TargetPolicy`."""
    if isinstance(target, TargetPolicy):
        return target
    if isinstance(target, str):
        return parse_target(target)
    if isinstance(target, Mapping):
        return AllocationTarget.from_json(target)
    raise TypeError(
        f"target must be a TargetPolicy, a spec string or a mapping, got {type(target).__name__}"
    )
