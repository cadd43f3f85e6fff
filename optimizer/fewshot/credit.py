"""Credit examples with the KPI of the sessions that used them; demote the ones that hurt.

Each turn logs the example ids it was prompted with (``turns.fewshot_ids``). A
session *used* an example if any of its turns did. For an example ``e`` and
each session ``s`` that used it, the residual is ``reward(s) − mean reward of
s's arm`` (complete sessions only, same KPI as the policy). Comparing with the
arm's own average keeps a good example in a weak arm from looking bad.

With ``n`` sessions, mean residual ``m`` and standard deviation ``sd``, the
posterior of the example's true mean residual under a flat prior is about
``Normal(m, sd² / n)``, so ``P(below the arm's average) = Φ(−m √n / sd)``. An
example with at least ``min_sessions`` sessions and that probability ``>=
demote_probability`` is demoted (status ``demoted``, event with the evidence).
Pinned examples are the operator's choice and are reported but never demoted.
In a ``fixed`` arm every session uses the same examples, their residuals sum
to zero, and none is singled out: the arm as a whole competes on the KPI.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa
from scipy.stats import norm

from optimizer.clock import as_utc, utcnow
from optimizer.config import Config
from optimizer.fewshot.bank import ExampleBank
from optimizer.kpi import session_frame
from optimizer.prompt_library import PromptLibrary, load_prompts
from optimizer.store import Store, schema

__all__ = ["CreditResult", "ExampleCredit", "credit_examples", "example_usage"]

log = logging.getLogger(__name__)


class ExampleCredit:
    """Per-example KPI statistics and the examples to demote.

    ``fit`` takes one row per (session, example used): ``session_id``,
    ``arm_id``, ``reward`` and ``example_id``; the arm means are computed from
    all complete sessions given in ``sessions`` (``session_id``, ``arm_id``,
    ``reward``).

    >>> sessions = pd.DataFrame({"session_id": [f"s{i}" for i in range(40)], "arm_id": "a",
    ...                          "reward": [0.0] * 20 + [1.0] * 20})
    >>> usage = pd.DataFrame({"session_id": [f"s{i}" for i in range(40)],
    ...                       "example_id": ["bad"] * 20 + ["good"] * 20})
    >>> credit = ExampleCredit(min_sessions=10, demote_probability=0.9).fit(usage, sessions)
    >>> credit.demote_
    ['bad']
    """

    def __init__(self, *, min_sessions: int = 20, demote_probability: float = 0.9) -> None:
        self.min_sessions = min_sessions
        self.demote_probability = demote_probability

    def fit(self, usage: pd.DataFrame, sessions: pd.DataFrame) -> ExampleCredit:
        self._check()
        done = sessions.dropna(subset=["reward"])
        arm_mean = done.groupby("arm_id")["reward"].mean().rename("arm_mean")
        rows = (
            usage[["session_id", "example_id"]]
            .drop_duplicates()
            .merge(done[["session_id", "arm_id", "reward"]], on="session_id")
        )
        rows = rows.join(arm_mean, on="arm_id")
        rows["residual"] = rows["reward"] - rows["arm_mean"]
        grouped = rows.groupby("example_id")
        stats = pd.DataFrame(
            {
                "sessions": grouped["session_id"].nunique(),
                "mean_reward": grouped["reward"].mean(),
                "arm_mean": grouped["arm_mean"].mean(),
                "mean_residual": grouped["residual"].mean(),
                "sd_residual": grouped["residual"].std(ddof=1),
            }
        )
        return self._decide(stats)

    def fit_sums(self, arms: pd.DataFrame, examples: pd.DataFrame) -> ExampleCredit:
        """The same fit from mergeable sums (:mod:`optimizer.fewshot.state`).

        ``arms``: indexed by ``arm_id``, the number ``n`` and sum ``s`` of the rewards of
        its complete sessions; ``examples``: per ``example_id`` and ``arm_id`` the ``n``,
        ``s`` and sum of squares ``q`` of the complete sessions that used the example.
        Residuals against the arm mean ``m``: ``Σ(r − m)² = q − 2ms + nm²`` per arm.
        """
        self._check()
        columns = ["sessions", "mean_reward", "arm_mean", "mean_residual", "sd_residual"]
        if examples.empty:
            return self._decide(pd.DataFrame(columns=columns, dtype=float))
        m = examples["arm_id"].map(arms["s"] / arms["n"]).astype(float)
        n, s, q = (examples[c].astype(float) for c in ("n", "s", "q"))
        parts = pd.DataFrame(
            {
                "example_id": examples["example_id"],
                "n": n,
                "s": s,
                "nm": n * m,
                "ss": q - 2 * m * s + n * m * m,
            }
        ).groupby("example_id")
        total = parts.sum()
        count = total["n"]
        mean_residual = (total["s"] - total["nm"]) / count
        with np.errstate(invalid="ignore", divide="ignore"):
            var = (total["ss"] - count * mean_residual**2) / (count - 1)
        # Rounding of the sums must not pass for spread: below it, the spread is zero.
        scale = total["ss"].abs() / count + mean_residual**2
        var = var.where(var > 1e-12 * scale, 0.0).where(count > 1)
        stats = pd.DataFrame(
            {
                "sessions": count.astype(np.int64),
                "mean_reward": total["s"] / count,
                "arm_mean": total["nm"] / count,
                "mean_residual": mean_residual,
                "sd_residual": np.sqrt(var),
            }
        )
        return self._decide(stats)

    def _check(self) -> None:
        if self.min_sessions < 2:
            raise ValueError(f"min_sessions must be >= 2, got {self.min_sessions}")
        if not 0.5 < self.demote_probability < 1:
            raise ValueError(
                f"demote_probability must be in (0.5, 1), got {self.demote_probability}"
            )

    def _decide(self, stats: pd.DataFrame) -> ExampleCredit:
        se = stats["sd_residual"] / np.sqrt(stats["sessions"].astype(float))
        with np.errstate(divide="ignore", invalid="ignore"):
            z = stats["mean_residual"] / se
        prob = pd.Series(norm.cdf(-z.to_numpy(dtype=float)), index=stats.index)
        # Zero spread: the sign of the mean decides outright.
        flat = se.fillna(0) == 0
        prob[flat] = np.where(stats.loc[flat, "mean_residual"] < 0, 1.0, 0.0)
        stats = stats.assign(prob_below=prob)
        self.stats_ = stats.sort_index()
        eligible = (stats["sessions"] >= self.min_sessions) & (
            stats["prob_below"] >= self.demote_probability
        )
        self.demote_ = sorted(stats.index[eligible])
        return self


def example_usage(
    store: Store, config: Config, *, now: datetime | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(usage, sessions)`` for :class:`ExampleCredit` from the store (turns up to ``now``)."""
    now = as_utc(now) if now is not None else utcnow()
    sessions = session_frame(store, config, now=now)[["session_id", "arm_id", "reward"]]
    t = schema.turns
    with store.engine.connect() as conn:
        rows = conn.execute(
            sa.select(t.c.session_id, t.c.fewshot_ids).where(
                t.c.experiment_id == config.experiment.id,
                t.c.created_at <= now,
                # only turns that showed examples: no JSON to decode for the rest
                sa.cast(t.c.fewshot_ids, sa.Text) != "[]",
            )
        ).all()
    pairs = [(sid, ex) for sid, ids in rows for ex in (ids or [])]
    usage = pd.DataFrame(pairs, columns=["session_id", "example_id"]).drop_duplicates()
    return usage, sessions


@dataclass(frozen=True)
class CreditResult:
    stats: pd.DataFrame
    demoted: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "demoted": list(self.demoted),
            "examples": self.stats.reset_index().to_dict("records"),
        }


def credit_examples(
    store: Store,
    config: Config,
    *,
    now: datetime | None = None,
    library: PromptLibrary | None = None,
    actor: str = "optimizer",
    incremental: bool = False,
) -> CreditResult:
    """Fit :class:`ExampleCredit` on the store and demote what it says (approved examples only).

    With ``incremental`` the fit reads the sums kept by
    :func:`optimizer.fewshot.state.refresh_state` (which the caller ran up to ``now``)
    instead of every session.
    """
    now = as_utc(now) if now is not None else utcnow()
    bank = ExampleBank(store)
    bank.sync_seeds(library if library is not None else load_prompts(config.prompts_dir), at=now)
    fs = config.fewshot
    credit = ExampleCredit(
        min_sessions=fs.credit_min_sessions, demote_probability=fs.demote_probability
    )
    if incremental:
        from optimizer.fewshot.state import credit_sums

        credit.fit_sums(*credit_sums(store, config))
    else:
        credit.fit(*example_usage(store, config, now=now))
    demoted: list[str] = []
    for example_id in credit.demote_:
        current = bank.get(example_id)
        if current is None or current.status != "approved":
            continue
        evidence = {k: _plain(v) for k, v in credit.stats_.loc[example_id].items()}
        bank.set_status(
            example_id, "demoted", actor=actor, reason="below_arm_average", details=evidence, at=now
        )
        demoted.append(example_id)
    return CreditResult(credit.stats_, tuple(demoted))


def _plain(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return None if np.isnan(value) else float(value)
    return value
