"""Synthetic logs with a known answer, for tests, the benchmark and examples.

A :class:`SyntheticEnvironment` draws independent categorical context features, serves an
arm with a known stochastic logging allocation (per segment, as serving does) and
draws a 0/1 reward with probability::

    P(reward = 1 | x, a) = rates[x[rate_by]][a] × Π_f effects[f][x[f]]

so the true value of any target, ``Σ_x P(x) Σ_a π(a|x) P(r=1 | x, a)``, is a finite
sum over context cells (:meth:`SyntheticEnvironment.true_value`) -- no simulation needed.
"""

from __future__ import annotations

import itertools
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from optimizer.assignment import ALL_SEGMENTS
from optimizer.ope.targets import AllocationTarget, TargetPolicy, as_target

__all__ = [
    "StickyLogs",
    "SyntheticEnvironment",
    "demo_environment",
    "make_logs",
    "make_sticky_logs",
]


@dataclass(frozen=True)
class SyntheticEnvironment:
    """Context distribution, logging allocation and reward rates of a synthetic experiment.

    ``contexts``: feature → {value: probability} (independent features).
    ``segment_by``: features forming the allocation segment (``"plan=pro"``).
    ``logging``: the logging allocation ``{segment: {arm: p}}``.
    ``rate_by`` / ``rates``: the feature whose value picks the base reward rate per arm.
    ``effects``: feature → {value: multiplier} applied to every arm's rate.
    ``targets``: named targets (specs or allocations) the scenario is meant to evaluate.
    """

    arms: tuple[str, ...]
    contexts: Mapping[str, Mapping[str, float]]
    logging: Mapping[str, Mapping[str, float]]
    rate_by: str
    rates: Mapping[str, Mapping[str, float]]
    segment_by: tuple[str, ...] = ()
    effects: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    targets: Mapping[str, Any] = field(default_factory=dict)
    name: str = "scenario"
    description: str = ""

    def __post_init__(self) -> None:
        for feature, dist in self.contexts.items():
            total = sum(dist.values())
            if abs(total - 1) > 1e-9 or min(dist.values()) < 0:
                raise ValueError(
                    f"contexts.{feature} must be probabilities summing to 1, got {dict(dist)}"
                )
        if self.rate_by not in self.contexts:
            raise ValueError(
                f"rate_by must be one of the context features {list(self.contexts)}, "
                f"got {self.rate_by!r}"
            )
        for value in self.contexts[self.rate_by]:
            missing = [a for a in self.arms if a not in self.rates.get(value, {})]
            if missing:
                raise ValueError(f"rates.{value} lacks arms {missing}")
        cells = self.cells()
        if not ((cells[list(self.arms)] >= 0) & (cells[list(self.arms)] <= 1)).all().all():
            raise ValueError("rates × effects must stay within [0, 1] in every context cell")

    @classmethod
    def from_toml(cls, path: str | Path) -> SyntheticEnvironment:
        """Read a scenario file (see ``bench/scenarios/ope_logged.toml``)."""
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        return cls(
            arms=tuple(data["arms"]),
            contexts=data["contexts"],
            logging=data["logging"],
            rate_by=data["rate_by"],
            rates=data["rates"],
            segment_by=tuple(data.get("segment_by", ())),
            effects=data.get("effects", {}),
            targets=data.get("targets", {}),
            name=data.get("name", Path(path).stem),
            description=data.get("description", ""),
        )

    def target(self, name: str) -> TargetPolicy:
        """A named target of the scenario."""
        spec = self.targets[name]
        return (
            as_target(spec)
            if not isinstance(spec, Mapping)
            else AllocationTarget.from_json(spec, label=name)
        )

    def segments_of(self, frame: pd.DataFrame) -> pd.Series:
        if not self.segment_by:
            return pd.Series(ALL_SEGMENTS, index=frame.index)
        parts = [f + "=" + frame[f].astype(str) for f in self.segment_by]
        out = parts[0]
        for part in parts[1:]:
            out = out + "|" + part
        return out

    def cells(self) -> pd.DataFrame:
        """Every context cell with its probability and each arm's reward rate."""
        features = list(self.contexts)
        rows = []
        for values in itertools.product(*(list(self.contexts[f]) for f in features)):
            cell = dict(zip(features, values, strict=True))
            prob = float(np.prod([self.contexts[f][v] for f, v in cell.items()]))
            factor = float(np.prod([self.effects.get(f, {}).get(v, 1.0) for f, v in cell.items()]))
            rates = {a: self.rates[cell[self.rate_by]][a] * factor for a in self.arms}
            rows.append({**cell, "probability": prob, **rates})
        frame = pd.DataFrame(rows)
        frame["segment"] = self.segments_of(frame)
        return frame

    def true_value(self, target: TargetPolicy | str | Mapping[str, Any]) -> float:
        """Exact mean reward of ``target`` in this scenario."""
        cells = self.cells()
        probs = as_target(target).probabilities(cells, list(self.arms))
        rates = cells[list(self.arms)].to_numpy()
        return float(np.sum(cells["probability"].to_numpy() * np.sum(probs * rates, axis=1)))


def make_logs(
    scenario: SyntheticEnvironment, n: int, *, random_state: int | np.random.Generator | None = None
) -> pd.DataFrame:
    """``n`` logged sessions: context columns, ``segment``, ``arm``, ``propensity``, ``reward``.

    >>> logs = make_logs(demo_environment(), 4, random_state=0)
    >>> list(logs.columns)
    ['plan', 'segment', 'arm', 'propensity', 'reward']
    """
    if not (isinstance(n, int) and n > 0):
        raise ValueError(f"n must be a positive integer, got {n!r}")
    rng = np.random.default_rng(random_state)
    frame = pd.DataFrame(
        {
            f: rng.choice(np.array(list(dist), dtype=object), size=n, p=list(dist.values()))
            for f, dist in scenario.contexts.items()
        }
    )
    frame["segment"] = scenario.segments_of(frame)
    arms = list(scenario.arms)
    logging_probs = AllocationTarget(scenario.logging, label="logging").probabilities(frame, arms)
    chosen = (rng.random(n)[:, None] < np.cumsum(logging_probs, axis=1)).argmax(axis=1)
    rates = _rates(scenario, frame)
    rows = np.arange(n)
    frame["arm"] = np.array(arms, dtype=object)[chosen]
    frame["propensity"] = logging_probs[rows, chosen]
    frame["reward"] = (rng.random(n) < rates[rows, chosen]).astype(float)
    return frame


@dataclass(frozen=True)
class StickyLogs:
    """Logs of returning users with sticky arms, and the true per-session value of each arm."""

    logs: pd.DataFrame
    truth: Mapping[str, float]


def make_sticky_logs(
    rates: Mapping[str, float],
    epochs: Sequence[Mapping[str, float]],
    *,
    users: int,
    sessions_per_user: float = 3.0,
    user_sd: float = 1.0,
    random_state: int | np.random.Generator | None = None,
) -> StickyLogs:
    """Sessions of ``users`` returning users under an allocation that changes over time.

    Time runs over ``len(epochs)`` equal epochs, each with its allocation ``{arm: p}``
    (as a bandit shifts traffic). A user's sessions (1 + Poisson(``sessions_per_user``
    − 1)) fall at uniform times; the first draws an arm from the allocation then in
    force, later ones keep it (sticky), as :class:`optimizer.assignment.Assigner`
    does. Rewards are 0/1 with ``logit P = logit(rates[arm]) + u``, ``u ~ N(0,
    user_sd)`` per user: a user's sessions are correlated. Columns: ``arm``,
    ``reward``, ``propensity`` (exact: the draw's probability for a drawn session,
    1.0 for a kept one), ``sticky``, ``unit`` (the user), ``draw_propensity`` (the
    propensity of the unit's draw) and ``share_propensity`` (the arm's share at the
    session's time: what was logged before propensities were exact).

    >>> out = make_sticky_logs({"a": 0.1, "b": 0.2}, [{"a": 0.5, "b": 0.5}], users=5,
    ...                        random_state=0)
    >>> sorted(out.truth), out.logs["sticky"].dtype
    (['a', 'b'], dtype('bool'))
    """
    if not (isinstance(users, int) and users > 0):
        raise ValueError(f"users must be a positive integer, got {users!r}")
    if not epochs:
        raise ValueError("epochs must name at least one allocation")
    rng = np.random.default_rng(random_state)
    arms = sorted(rates)
    alloc = np.array([[e.get(a, 0.0) for a in arms] for e in epochs], dtype=float)
    alloc /= alloc.sum(axis=1, keepdims=True)
    counts = 1 + rng.poisson(max(sessions_per_user - 1, 0.0), size=users)
    user = np.repeat(np.arange(users), counts)
    t = rng.random(len(user))
    order = np.lexsort((t, user))
    user, t = user[order], t[order]
    first = np.r_[True, user[1:] != user[:-1]]
    epoch = np.minimum((t * len(epochs)).astype(int), len(epochs) - 1)
    draw_epoch = epoch[first][np.cumsum(first) - 1]  # the epoch of the user's first session
    cum = np.cumsum(alloc[draw_epoch[first]], axis=1)
    drawn = (rng.random(int(first.sum()))[:, None] < cum).argmax(axis=1)
    arm = drawn[np.cumsum(first) - 1]
    effect = rng.normal(0.0, user_sd, size=users)[user]
    logit = np.log(np.array([rates[a] for a in arms]) / (1 - np.array([rates[a] for a in arms])))
    p = 1 / (1 + np.exp(-(logit[arm] + effect)))
    rows = np.arange(len(user))
    draw_p = alloc[draw_epoch, arm]
    logs = pd.DataFrame(
        {
            "arm": np.array(arms, dtype=object)[arm],
            "reward": (rng.random(len(user)) < p).astype(float),
            "propensity": np.where(first, draw_p, 1.0),
            "sticky": ~first,
            "unit": np.char.add("u", user.astype(str)),
            "draw_propensity": draw_p,
            "share_propensity": alloc[epoch, arm][rows],
        }
    )
    # E over users of the per-session success probability (Gauss–Hermite, exact enough).
    nodes, weights = np.polynomial.hermite_e.hermegauss(60)
    weights = weights / weights.sum()
    truth = {
        a: float(np.sum(weights / (1 + np.exp(-(logit[i] + user_sd * nodes)))))
        for i, a in enumerate(arms)
    }
    return StickyLogs(logs, truth)


def _rates(scenario: SyntheticEnvironment, frame: pd.DataFrame) -> np.ndarray:
    base = (
        pd.DataFrame(scenario.rates).T.loc[frame[scenario.rate_by], list(scenario.arms)].to_numpy()
    )
    factor = np.ones(len(frame))
    for feature, effect in scenario.effects.items():
        factor *= frame[feature].map(lambda v, e=effect: e.get(v, 1.0)).to_numpy(dtype=float)
    return base * factor[:, None]


def demo_environment(arms: Sequence[str] = ("a", "b", "c")) -> SyntheticEnvironment:
    """A small three-arm scenario for examples: ``plan`` drives the rates and the segment.

    >>> round(demo_environment().true_value("arm:b"), 3)
    0.254
    """
    a, b, c = arms
    return SyntheticEnvironment(
        arms=tuple(arms),
        contexts={"plan": {"free": 0.7, "pro": 0.3}},
        segment_by=("plan",),
        logging={"plan=free": {a: 0.6, b: 0.3, c: 0.1}, "plan=pro": {a: 0.4, b: 0.4, c: 0.2}},
        rate_by="plan",
        rates={"free": {a: 0.10, b: 0.20, c: 0.30}, "pro": {a: 0.30, b: 0.38, c: 0.15}},
        name="demo",
    )
