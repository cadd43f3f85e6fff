"""Allocation policies: the uniform A/B baseline and Thompson sampling with safe rollout.

Both fit the same posteriors of each arm's mean per-session KPI (so the A/B
baseline also gets a read-out and a stop recommendation); they differ only in how
they turn them into traffic shares.

Posterior of an arm's mean KPI
------------------------------
- **Beta–Bernoulli** when the KPI is binary: one term whose values are all 0 or 1
  (e.g. conversion). Prior Beta(1, 1); the KPI is ``weight × p``.
- **Normal–Inverse-Gamma** (unknown variance) on the per-session rewards otherwise.
  Empirical-Bayes prior: mean = the pooled mean reward of all arms, κ0 = 1
  (one pseudo-session), α0 = 1, β0 = the pooled variance. The mean's marginal
  posterior is a Student t.
- With ``delay="model"`` (see :mod:`optimizer.kpi`), sessions whose windows are
  still open count with their exposure (the expected share of their outcome already
  observed). Binary KPI: α = 1 + Σ observed, β = 1 + Σ exposure × (1 − observed)
  (a converted session is known to have converted; a silent one counts as the
  fraction of a failure it has had time to become). Composite KPI: each term's mean
  is Σ observed / Σ exposure (plus one pseudo-session at the pooled mean), and the
  KPI mean is Normal with the delta-method variance of those ratio estimators.

Segments, with partial pooling
------------------------------
Sessions carry a segment key (:func:`optimizer.assignment.segment_key`). A
segment's posterior for an arm uses the segment's own sessions plus the arm's
sessions in *other* segments discounted by ``f = min(1, segment_prior_sessions /
n_other)`` — a power prior: the pooled evidence is worth at most
``segment_prior_sessions`` sessions, so a small segment borrows strength from the
whole and a large one is driven by its own data. ``"*"`` is the pooled posterior,
used for sessions whose segment has no allocation of its own. With segments, the
pooled figures (``summary_``: KPI mean, interval, P(best), expected loss; the
``"*"`` allocation) are **traffic-weighted**: θ_arm = Σ_s share_s · θ_{s,arm},
share_s = the segment's share of all sessions. Summing raw counts instead would
show Simpson's paradox when segments get different allocations: an arm served
mostly in a high-converting segment would look best overall while losing in
every segment.

Safe rollout (Thompson sampling)
--------------------------------
Probability each arm is best (Monte Carlo, ``samples`` draws) → **burn-in, per
arm**: an arm with fewer than ``burn_in`` effective sessions (complete ones with
``delay="wait"``, exposure-weighted ones with ``"model"``) gets an exploration
share of ``1/k`` (k active arms), at most ``challenger_cap`` unless it is the
champion, while the arms past burn-in share the rest in proportion to their
probability of being best *among themselves* — a newcomer (or a pause, or a
retirement) scales the others' Thompson shares instead of resetting them to
uniform; with no arm past burn-in traffic is uniform → **floor**: each
active arm gets at least ``floor / (1 + n / floor_decay_sessions)`` (n = its
complete sessions; ``floor_decay_sessions=0`` keeps the floor constant), except that a
**guardrail suspect** (``guardrail_suspects`` of :meth:`fit`: undecided and more likely
than not in breach, :attr:`optimizer.guardrails.GuardrailCheck.suspect`) and the champion
keep ``guardrail_floor`` without decay until the check decides — a valid test pauses on
votes, and a bandit that starves either arm would leave the breach undecided → **cap**:
a non-champion arm with fewer than ``challenger_min_sessions`` complete sessions
gets at most ``challenger_cap``. Shares are then renormalised within those bounds.
**Stop rule**: the arm most likely best among the active arms, with probability
≥ ``stop_probability_best`` and expected loss (E[max θ − θ_arm], KPI units) below
``stop_expected_loss``, is recommended in ``recommendation_`` (never while an
active arm is still in burn-in). Those are per-look posterior figures: checked at
every refit they name a winner of an A/A test far more often than 5 %
(``bench/aa.py``). With
``stop_rule="always_valid"`` (the default) the arm must also beat *every* other
active arm by an always-valid bound (:mod:`optimizer.sequential`): the lower
bound of θ_best − θ_other, from the posterior means and variances, must be > 0,
at α = (1 − ``stop_probability_best``) / (K(K−1)/2) (Bonferroni over the pairs,
since the leader is picked from the data). Guarantee: when all arms are equal,
P(a winner is *ever* named) ≤ 1 − ``stop_probability_best``, however often the
optimizer looks, up to the normal approximation. ``stop_candidates_`` holds the
arm each rule would name. Guardrail pauses are not the policy's job: see
:mod:`optimizer.guardrails`.
"""

from __future__ import annotations

import abc
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
from scipy import stats
from sklearn.base import BaseEstimator

from optimizer.assignment import ALL_SEGMENTS
from optimizer.config import PolicyConfig
from optimizer.errors import PolicyError
from optimizer.jsonable import finite
from optimizer.sequential import radius

__all__ = [
    "ThompsonSamplingPolicy",
    "UniformPolicy",
    "beta_posterior",
    "make_policy",
    "nig_posterior",
    "rollout",
]

log = logging.getLogger(__name__)

Delay = Literal["wait", "model"]
StopRule = Literal["always_valid", "posterior"]
_EPS_VAR = 1e-9
#: The stop rule's always-valid bound is tightest at this many effective sessions per arm.
STOP_TUNING_SESSIONS = 5000


# -- conjugate updates (public so tests can check them by hand) ---------------------------


def beta_posterior(
    successes: float, failures: float, prior: tuple[float, float] = (1.0, 1.0)
) -> tuple[float, float]:
    """Beta parameters after ``successes`` and ``failures`` (may be fractional).

    >>> beta_posterior(3, 7)
    (4.0, 8.0)
    """
    return prior[0] + float(successes), prior[1] + float(failures)


def nig_posterior(
    n: Any, mean: Any, sse: Any, *, mu0: float, kappa0: float, alpha0: float, beta0: float
) -> tuple[Any, Any, Any, Any]:
    """Normal–Inverse-Gamma posterior ``(mu, kappa, alpha, beta)`` from sufficient statistics.

    ``n`` observations with sample ``mean`` and sum of squared deviations ``sse``
    (floats, or arrays for several arms at once).

    >>> nig_posterior(4, 2.0, 6.0, mu0=0.0, kappa0=1.0, alpha0=1.0, beta0=1.0)
    (1.6, 5.0, 3.0, 5.6)
    """
    if kappa0 <= 0 or alpha0 <= 0 or beta0 <= 0:
        raise ValueError(f"kappa0, alpha0 and beta0 must be > 0, got {kappa0}, {alpha0}, {beta0}")
    kappa = kappa0 + n
    mu = (kappa0 * mu0 + n * mean) / kappa
    alpha = alpha0 + n / 2
    beta = beta0 + sse / 2 + kappa0 * n * (mean - mu0) ** 2 / (2 * kappa)
    return mu, kappa, alpha, beta


def rollout(target: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Shares proportional to ``target`` within ``[lower, upper]`` bounds, summing to 1.

    Infeasible bounds are relaxed: floors summing above 1 are scaled down, caps
    summing below 1 are dropped (a cap cannot force traffic nowhere).

    >>> rollout(np.array([0.9, 0.1, 0.0]), np.full(3, 0.05), np.ones(3)).round(3).tolist()
    [0.855, 0.095, 0.05]
    """
    k = len(target)
    lower = np.asarray(lower, dtype=float).copy()
    upper = np.asarray(upper, dtype=float).copy()
    if lower.sum() > 1:
        lower = lower / lower.sum()
    if upper.sum() < 1:
        upper = np.ones(k)
    lower = np.minimum(lower, upper)
    target = np.clip(np.asarray(target, dtype=float), 0, None)

    def shares(scale: float) -> np.ndarray:
        return np.clip(scale * target, lower, upper)

    positive = target > 0
    if not positive.any():
        out = lower.copy()
    else:
        hi = float(np.max(upper[positive] / target[positive]))
        if shares(hi).sum() <= 1:
            out = shares(hi)
        else:
            lo = 0.0
            for _ in range(100):  # bisection on the scale: the sum is monotone in it
                mid = (lo + hi) / 2
                if shares(mid).sum() > 1:
                    hi = mid
                else:
                    lo = mid
            out = shares(lo)
    missing = 1 - out.sum()
    if missing > 1e-12:  # every arm with target mass is capped: fill the headroom of the rest
        room = upper - out
        out = out + missing * room / room.sum()
    return out / out.sum()


# -- posteriors ---------------------------------------------------------------------------


class _Posterior:
    """Posterior of the mean KPI of K arms (one segment): mean and Monte-Carlo draws."""

    def __init__(
        self, kind: str, mean: np.ndarray, params: tuple[np.ndarray, ...], weight: float = 1.0
    ):
        self.kind, self.mean, self.params, self.weight = kind, mean, params, weight

    def draw(self, rng: np.random.Generator, samples: int) -> np.ndarray:
        k = len(self.mean)
        if self.kind == "beta":
            a, b = self.params
            return self.weight * rng.beta(a, b, size=(samples, k))
        if self.kind == "nig":
            mu, scale, df = self.params
            return mu + scale * rng.standard_t(df, size=(samples, k))
        mu, sd = self.params
        return mu + sd * rng.standard_normal(size=(samples, k))


class _Data:
    """Per (segment, arm) sufficient statistics as ``(S, K)`` arrays, from the rows of a
    :func:`optimizer.moments.session_moments` frame (one row per segment and arm, or finer)."""

    def __init__(self, moments: pd.DataFrame, codes: np.ndarray, n_groups: int, n_arms: int):
        self.moments, self.codes, self.shape = moments, codes, (n_groups, n_arms)

    def sum(self, column: str) -> np.ndarray:
        size = self.shape[0] * self.shape[1]
        weights = (
            self.moments[column].to_numpy(dtype=float)
            if column in self.moments
            else np.zeros(len(self.codes))
        )
        return np.bincount(self.codes, weights=weights, minlength=size).reshape(self.shape)

    def total(self, column: str) -> float:
        return float(self.moments[column].sum()) if column in self.moments else 0.0


class _PosteriorPolicy(BaseEstimator, abc.ABC):
    """Shared fitting: posteriors per segment and arm, summaries, stop rule."""

    #: Name written into snapshots.
    name: ClassVar[str] = "base"

    def __init__(
        self,
        *,
        samples: int,
        stop_probability_best: float,
        stop_expected_loss: float,
        delay: Delay,
        segment_prior_sessions: float,
        random_state: int | np.random.Generator | None,
        stop_rule: StopRule = "always_valid",
    ) -> None:
        self.samples = samples
        self.stop_probability_best = stop_probability_best
        self.stop_expected_loss = stop_expected_loss
        self.delay = delay
        self.segment_prior_sessions = segment_prior_sessions
        self.random_state = random_state
        self.stop_rule = stop_rule

    # -- validation ------------------------------------------------------------------
    def _validate(self) -> None:
        if not (isinstance(self.samples, int | np.integer) and self.samples >= 100):
            raise ValueError(f"samples must be an integer >= 100, got {self.samples!r}")
        if not 0.5 < self.stop_probability_best < 1:
            raise ValueError(
                f"stop_probability_best must be in (0.5, 1), got {self.stop_probability_best!r}"
            )
        if not self.stop_expected_loss > 0:
            raise ValueError(f"stop_expected_loss must be > 0, got {self.stop_expected_loss!r}")
        if self.stop_rule not in ("always_valid", "posterior"):
            raise ValueError(
                f"stop_rule must be 'always_valid' or 'posterior', got {self.stop_rule!r}"
            )
        if self.delay not in ("wait", "model"):
            raise ValueError(f"delay must be 'wait' or 'model', got {self.delay!r}")
        if not (math.isfinite(self.segment_prior_sessions) and self.segment_prior_sessions > 0):
            raise ValueError(
                "segment_prior_sessions must be a positive number, "
                f"got {self.segment_prior_sessions!r}"
            )

    # -- fitting ---------------------------------------------------------------------
    def fit(
        self,
        sessions: pd.DataFrame,
        arms: Sequence[str] | None = None,
        *,
        champion: str | None = None,
        caps: Mapping[str, float] | None = None,
        guardrail_suspects: Sequence[str] = (),
    ) -> _PosteriorPolicy:
        """Fit posteriors on a :func:`optimizer.kpi.session_frame` and allocate over ``arms``.

        ``sessions`` may also be its sums, a :func:`optimizer.moments.session_moments`
        frame (what the incremental refit hands in, :mod:`optimizer.refit_state`):
        the fit only ever uses those sums, so both give the same result.
        ``arms`` are the active arms (default: every arm in ``sessions``); sessions of
        other arms are summarised but get no traffic. ``champion`` is exempt from the
        challenger cap. ``caps`` are operator-set maximum shares per arm (from
        ``cap_set`` arm events); they bind every segment, champion included.
        ``guardrail_suspects`` are arms whose guardrail is undecided with a plausible
        breach (:attr:`optimizer.guardrails.GuardrailCheck.suspect`): they, and the
        champion they are compared with, keep the guardrail floor. Needs
        columns ``arm_id``, ``reward``, ``complete`` and optionally ``segment``.
        """
        from optimizer.moments import SketchRef, session_moments, support_sketch

        for arm, cap in (caps or {}).items():
            if not (math.isfinite(cap) and 0 < cap <= 1):
                raise ValueError(f"cap for arm {arm!r} must be in (0, 1], got {cap!r}")
        self._validate()
        if sessions.attrs.get("is_moments"):
            moments = sessions
        else:
            missing = {"arm_id", "reward", "complete"} - set(sessions.columns)
            if missing:
                raise PolicyError(f"session frame lacks columns {sorted(missing)}")
            moments = session_moments(sessions, ("segment", "arm_id"))
            moments.attrs["sketch"] = SketchRef(support_sketch(sessions, ("arm_id",)))
        moments = moments[moments["n"] > 0] if len(moments) else moments
        data_arms = sorted(pd.unique(moments["arm_id"]).tolist()) if len(moments) else []
        active = sorted(dict.fromkeys(arms)) if arms is not None else data_arms
        if not active:
            raise PolicyError("no active arm to allocate traffic to")
        all_arms = sorted(set(active) | set(data_arms))
        rng = np.random.default_rng(self.random_state)
        held = {a for a in guardrail_suspects if a in active}
        if held and champion is not None and champion in active:
            held.add(champion)  # every guardrail compares with the champion's votes
        self.guardrail_held_ = sorted(held)

        segments = (
            sorted(s for s in pd.unique(moments["segment"]).tolist() if s != ALL_SEGMENTS)
            if len(moments)
            else []
        )
        keys = [ALL_SEGMENTS, *segments]
        arm_code = pd.Categorical(moments["arm_id"], categories=all_arms).codes.astype(np.int64)
        # Group 0 is a placeholder: the pooled "*" posterior is the sum over groups.
        seg_code = pd.Categorical(moments["segment"], categories=keys).codes.astype(np.int64)
        seg_code[seg_code < 0] = 0
        data = _Data(moments, seg_code * len(all_arms) + arm_code, len(keys), len(all_arms))

        terms = moments.attrs.get("terms") or [{"column": "reward", "weight": 1.0}]
        n_complete = data.sum("complete")
        effective = n_complete if self.delay == "wait" else data.sum("eff")
        self.model_ = self._model_kind(terms, data)
        posteriors = self._posteriors(data, terms)

        n_assigned = data.sum("n")
        self.arms_ = all_arms
        self.active_arms_ = active
        self.segments_ = keys
        is_active = np.isin(all_arms, active)
        eff_total = effective.sum(axis=0)
        self.burn_in_complete_ = self._burn_in_done(eff_total[is_active])
        champion_mask = np.array(all_arms)[is_active] == champion

        self.allocation_: dict[str, dict[str, float]] = {}
        self.segment_summary_: dict[str, dict[str, dict[str, Any]]] = {}
        all_draws = [p.draw(rng, self.samples) for p in posteriors]
        means = [np.asarray(p.mean, dtype=float) for p in posteriors]
        traffic = n_assigned.sum(axis=1)[1:]
        if len(keys) > 1 and traffic.sum() > 0:  # pooled = traffic-weighted segments
            share = traffic / traffic.sum()
            all_draws[0] = np.tensordot(share, np.stack(all_draws[1:]), axes=1)
            means[0] = share @ np.stack(means[1:])
        for i, key in enumerate(keys):
            draws = all_draws[i]
            act = draws[:, is_active]
            best = np.argmax(act, axis=1)
            prob_best = np.zeros(len(all_arms))
            prob_best[is_active] = np.bincount(best, minlength=int(is_active.sum())) / self.samples
            loss = np.full(len(all_arms), np.nan)
            loss[is_active] = (act.max(axis=1, keepdims=True) - act).mean(axis=0)
            lo, hi = np.quantile(draws, [0.025, 0.975], axis=0)
            if i == 0:
                self.kpi_var_ = dict(zip(all_arms, draws.var(axis=0).tolist(), strict=True))
            n_seg = n_assigned.sum(axis=0) if i == 0 else n_assigned[i]
            c_seg = n_complete.sum(axis=0) if i == 0 else n_complete[i]
            e_seg = effective.sum(axis=0) if i == 0 else effective[i]
            target = self._target(prob_best[is_active], act, eff_total[is_active], champion_mask)
            shares = self._constrain(
                target, eff_total[is_active], np.array(all_arms)[is_active], champion
            )
            if caps:
                upper = np.array([caps.get(a, 1.0) for a in np.array(all_arms)[is_active]])
                shares = rollout(shares, np.zeros(len(shares)), upper)
            active_ids = [a for a, on in zip(all_arms, is_active, strict=True) if on]
            self.allocation_[key] = {a: float(p) for a, p in zip(active_ids, shares, strict=True)}
            self.segment_summary_[key] = {
                arm: {
                    "sessions": round(float(n_seg[j])),
                    "complete_sessions": round(float(c_seg[j])),
                    "effective_sessions": float(e_seg[j]),
                    "kpi_mean": float(means[i][j]),
                    "kpi_ci": [float(lo[j]), float(hi[j])],
                    "prob_best": float(prob_best[j]) if is_active[j] else None,
                    "expected_loss": float(loss[j]) if is_active[j] else None,
                }
                for j, arm in enumerate(all_arms)
            }
        self.summary_ = self._with_metrics(moments, self.segment_summary_[ALL_SEGMENTS])
        self.stop_candidates_ = {
            rule: self._stop(self.segment_summary_[ALL_SEGMENTS], rule)
            for rule in ("posterior", "always_valid")
        }
        self.recommendation_ = self.stop_candidates_[self.stop_rule]
        return self

    def _model_kind(self, terms: Sequence[Mapping[str, Any]], data: _Data) -> str:
        if len(terms) == 1:
            non_binary = data.total("nb_obs" if self.delay == "model" else "nb_fin")
            if non_binary == 0:
                return "beta"
        return "nig" if self.delay == "wait" else "normal"

    def _discount(self, n_seg: np.ndarray, n_total: np.ndarray) -> np.ndarray:
        other = n_total[None, :] - n_seg
        with np.errstate(divide="ignore", invalid="ignore"):
            f = np.where(other > 0, np.minimum(1.0, self.segment_prior_sessions / other), 0.0)
        f[0] = 0.0  # "*" is the total already
        return f

    def _posteriors(self, data: _Data, terms: Sequence[Mapping[str, Any]]) -> list[_Posterior]:
        def combine(stat: np.ndarray, f: np.ndarray) -> np.ndarray:
            """Row 0 = total; row s = segment s + f × (total − segment s)."""
            total = stat.sum(axis=0)
            out = stat + f * (total[None, :] - stat)
            out[0] = total
            return out

        if self.model_ == "beta":
            weight = float(terms[0]["weight"])
            if self.delay == "wait":
                succ = data.sum("f0")
                fail = data.sum("complete") - succ
            else:
                succ = data.sum("o0")
                fail = data.sum("e0") - data.sum("oe0_0")
            n = succ + fail
            f = self._discount(n, n.sum(axis=0))
            a, b = beta_posterior(0, 0)
            alpha, beta = a + combine(succ, f), b + combine(fail, f)
            return [
                _Posterior(
                    "beta", weight * alpha[i] / (alpha[i] + beta[i]), (alpha[i], beta[i]), weight
                )
                for i in range(len(alpha))
            ]

        if self.model_ == "nig":
            n = data.sum("complete")
            sy, syy = data.sum("y"), data.sum("yy")
            n_all = n.sum()
            mu0 = sy.sum() / n_all if n_all > 0 else 0.0
            var0 = syy.sum() / n_all - mu0**2 if n_all > 1 else 1.0
            var0 = max(var0, _EPS_VAR)
            f = self._discount(n, n.sum(axis=0))
            n, sy, syy = combine(n, f), combine(sy, f), combine(syy, f)
            out = []
            for i in range(len(n)):
                with np.errstate(divide="ignore", invalid="ignore"):
                    mean = np.where(n[i] > 0, sy[i] / n[i], 0.0)
                sse = np.maximum(syy[i] - n[i] * mean**2, 0.0)
                mu, kappa, alpha, beta = nig_posterior(
                    n[i], mean, sse, mu0=mu0, kappa0=1.0, alpha0=1.0, beta0=var0
                )
                scale = np.sqrt(beta / (alpha * kappa))
                out.append(_Posterior("nig", mu, (mu, scale, 2 * alpha)))
            return out

        # delay="model", composite KPI: ratio estimators per term, delta-method variance.
        t = len(terms)
        weights = np.array([float(term["weight"]) for term in terms])
        s_k = np.stack([data.sum(f"o{k}") for k in range(t)])  # (T, S, K)
        e_k = np.stack([data.sum(f"e{k}") for k in range(t)])
        oo = np.empty((t, t, *data.shape))
        of = np.empty_like(oo)
        ff = np.empty_like(oo)
        for k in range(t):
            for m in range(t):
                oo[k, m] = data.sum(f"oo{k}_{m}")
                of[k, m] = data.sum(f"oe{k}_{m}")
                ff[k, m] = data.sum(f"ee{k}_{m}")
        e_min = data.sum("eff")
        f = self._discount(e_min, e_min.sum(axis=0))
        s_k = np.stack([combine(s, f) for s in s_k])
        e_k = np.stack([combine(e, f) for e in e_k])
        oo = np.stack([[combine(oo[k, m], f) for m in range(t)] for k in range(t)])
        of = np.stack([[combine(of[k, m], f) for m in range(t)] for k in range(t)])
        ff = np.stack([[combine(ff[k, m], f) for m in range(t)] for k in range(t)])
        tot_e = np.array([data.total(f"e{k}") for k in range(t)])
        tot_s = np.array([data.total(f"o{k}") for k in range(t)])
        tot_ss = np.array([data.total(f"oo{k}_{k}") for k in range(t)])
        with np.errstate(divide="ignore", invalid="ignore"):
            m0 = np.where(tot_e > 0, tot_s / tot_e, 0.0)
            v0 = np.where(tot_e > 0, tot_ss / tot_e - m0**2, 1.0)
        v0 = np.maximum(v0, _EPS_VAR)
        out = []
        for i in range(data.shape[0]):
            denom = e_k[:, i] + 1.0  # one pseudo-session at the pooled mean
            mu = (s_k[:, i] + m0[:, None]) / denom  # (T, K)
            c = weights[:, None] / denom
            var = np.zeros(data.shape[1])
            for k in range(t):
                var += c[k] ** 2 * v0[k]
                for m in range(t):
                    cov = (
                        oo[k, m, i]
                        - mu[m] * of[k, m, i]
                        - mu[k] * of[m, k, i]
                        + mu[k] * mu[m] * ff[k, m, i]
                    )
                    var += c[k] * c[m] * cov
            theta = (weights[:, None] * mu).sum(axis=0)
            out.append(_Posterior("normal", theta, (theta, np.sqrt(np.maximum(var, _EPS_VAR)))))
        return out

    # -- allocation and rules ----------------------------------------------------------
    def _burn_in_done(self, effective: np.ndarray) -> bool:
        return True

    @abc.abstractmethod
    def _target(
        self,
        prob_best: np.ndarray,
        draws: np.ndarray,
        effective: np.ndarray,
        champion: np.ndarray,
    ) -> np.ndarray:
        """The share each active arm should get, from its probability of being best.

        ``draws`` are the posterior draws of the active arms (samples × arms),
        ``effective`` their effective sessions, ``champion`` marks the champion.
        """

    def _constrain(
        self, target: np.ndarray, effective: np.ndarray, arms: np.ndarray, champion: str | None
    ) -> np.ndarray:
        return target / target.sum()

    def _stop(
        self, summary: Mapping[str, Mapping[str, Any]], rule: StopRule
    ) -> dict[str, Any] | None:
        if not self.burn_in_complete_:
            return None
        active = [(a, s) for a, s in summary.items() if s["prob_best"] is not None]
        arm, s = max(active, key=lambda item: (item[1]["prob_best"], item[0]))
        if not (
            s["prob_best"] >= self.stop_probability_best
            and s["expected_loss"] < self.stop_expected_loss
        ):
            return None
        lower = self._always_valid_lower(arm, summary, [a for a, _ in active])
        if rule == "always_valid" and not lower > 0:
            return None
        return {
            "arm": arm,
            "prob_best": s["prob_best"],
            "expected_loss": s["expected_loss"],
            "kpi_mean": s["kpi_mean"],
            "always_valid_lower": lower if math.isfinite(lower) else None,
            "rule": rule,
        }

    def _always_valid_lower(
        self, arm: str, summary: Mapping[str, Mapping[str, Any]], active: Sequence[str]
    ) -> float:
        """Smallest always-valid lower bound of θ_arm − θ_other over the other active arms."""
        if len(active) < 2:
            return math.inf
        alpha = (1 - self.stop_probability_best) / (len(active) * (len(active) - 1) / 2)
        n_arm = summary[arm]["effective_sessions"]
        bounds = []
        for other in active:
            if other == arm:
                continue
            n_other = summary[other]["effective_sessions"]
            info = 2 / (1 / n_arm + 1 / n_other) if n_arm > 0 and n_other > 0 else 0.0
            r = radius(
                self.kpi_var_[arm] + self.kpi_var_[other],
                info / STOP_TUNING_SESSIONS,
                alpha=alpha,
            )
            bounds.append(summary[arm]["kpi_mean"] - summary[other]["kpi_mean"] - r)
        return min(bounds)

    def _with_metrics(
        self, moments: pd.DataFrame, summary: Mapping[str, dict[str, Any]]
    ) -> dict[str, dict[str, Any]]:
        """The descriptive read-outs per arm (:func:`optimizer.moments.arm_readouts`)."""
        from optimizer.moments import arm_readouts

        metrics = arm_readouts(moments) if moments.attrs.get("metrics") else {}
        out: dict[str, dict[str, Any]] = {}
        for arm, s in summary.items():
            extra: dict[str, Any] = {
                "conversion_rate": None,
                "conversion_ci": [None, None],
                "thumbs_up_rate": None,
                "thumbs_down_rate": None,
                "error_rate": None,
                "median_support_minutes": None,
            }
            row = metrics.get(arm)
            if row is not None:
                known, conv = row["conversion_known"], row["conversions"]
                if row["conversion_rate"] is not None:
                    lo, hi = stats.beta.ppf([0.025, 0.975], 1 + conv, 1 + known - conv)
                    extra["conversion_rate"] = row["conversion_rate"]
                    extra["conversion_ci"] = [float(lo), float(hi)]
                for key in (
                    "thumbs_up_rate",
                    "thumbs_down_rate",
                    "error_rate",
                    "median_support_minutes",
                ):
                    extra[key] = finite(row[key])
            out[arm] = {**s, **extra}
        return out

    # -- snapshot view ---------------------------------------------------------------
    def snapshot_allocation(self) -> dict[str, Any]:
        """The ``allocation`` JSON of a policy snapshot: ``{"segments": {key: {arm: p}}}``."""
        return {"segments": {k: dict(v) for k, v in self.allocation_.items()}}


class UniformPolicy(_PosteriorPolicy):
    """Equal traffic to every active arm: the A/B baseline.

    Posteriors, summaries and the stop recommendation are fitted as for
    :class:`ThompsonSamplingPolicy`, so an A/B test reads out the same way.

    >>> frame = pd.DataFrame({"arm_id": ["a", "b"], "reward": [1.0, 0.0], "complete": True})
    >>> UniformPolicy(random_state=0).fit(frame).allocation_
    {'*': {'a': 0.5, 'b': 0.5}}
    """

    name: ClassVar[str] = "uniform"

    def __init__(
        self,
        *,
        samples: int = 4000,
        stop_probability_best: float = 0.95,
        stop_expected_loss: float = 0.001,
        delay: Delay = "model",
        segment_prior_sessions: float = 50.0,
        random_state: int | np.random.Generator | None = None,
        stop_rule: StopRule = "always_valid",
    ) -> None:
        super().__init__(
            samples=samples,
            stop_probability_best=stop_probability_best,
            stop_expected_loss=stop_expected_loss,
            delay=delay,
            segment_prior_sessions=segment_prior_sessions,
            random_state=random_state,
            stop_rule=stop_rule,
        )

    def _target(
        self,
        prob_best: np.ndarray,
        draws: np.ndarray,
        effective: np.ndarray,
        champion: np.ndarray,
    ) -> np.ndarray:
        return np.full(len(prob_best), 1 / len(prob_best))


class ThompsonSamplingPolicy(_PosteriorPolicy):
    """Traffic ∝ probability of being best, with burn-in, floor, challenger cap and stop rule.

    >>> rng = np.random.default_rng(0)
    >>> frame = pd.DataFrame({
    ...     "arm_id": ["a"] * 500 + ["b"] * 500,
    ...     "reward": np.r_[rng.random(500) < 0.10, rng.random(500) < 0.02].astype(float),
    ...     "complete": True,
    ... })
    >>> policy = ThompsonSamplingPolicy(burn_in=100, floor=0.05, random_state=0).fit(frame)
    >>> policy.model_, policy.allocation_["*"]["a"] > 0.9, policy.recommendation_["arm"]
    ('beta', True, 'a')
    """

    name: ClassVar[str] = "thompson"

    def __init__(
        self,
        *,
        burn_in: int = 100,
        floor: float = 0.02,
        floor_decay_sessions: float = 1000.0,
        challenger_cap: float = 0.2,
        challenger_min_sessions: int = 200,
        guardrail_floor: float = 0.1,
        stop_probability_best: float = 0.95,
        stop_expected_loss: float = 0.001,
        samples: int = 4000,
        delay: Delay = "model",
        segment_prior_sessions: float = 50.0,
        random_state: int | np.random.Generator | None = None,
        stop_rule: StopRule = "always_valid",
    ) -> None:
        super().__init__(
            samples=samples,
            stop_probability_best=stop_probability_best,
            stop_expected_loss=stop_expected_loss,
            delay=delay,
            segment_prior_sessions=segment_prior_sessions,
            random_state=random_state,
            stop_rule=stop_rule,
        )
        self.burn_in = burn_in
        self.floor = floor
        self.floor_decay_sessions = floor_decay_sessions
        self.challenger_cap = challenger_cap
        self.challenger_min_sessions = challenger_min_sessions
        self.guardrail_floor = guardrail_floor

    def _validate(self) -> None:
        super()._validate()
        if not (isinstance(self.burn_in, int | np.integer) and self.burn_in >= 0):
            raise ValueError(f"burn_in must be an integer >= 0, got {self.burn_in!r}")
        if not 0 <= self.floor < 1:
            raise ValueError(f"floor must be in [0, 1), got {self.floor!r}")
        if not (math.isfinite(self.floor_decay_sessions) and self.floor_decay_sessions >= 0):
            raise ValueError(
                f"floor_decay_sessions must be >= 0, got {self.floor_decay_sessions!r}"
            )
        if not 0 <= self.guardrail_floor < 0.5:
            raise ValueError(f"guardrail_floor must be in [0, 0.5), got {self.guardrail_floor!r}")
        if not 0 < self.challenger_cap <= 1:
            raise ValueError(f"challenger_cap must be in (0, 1], got {self.challenger_cap!r}")
        if not self.challenger_min_sessions >= 0:
            raise ValueError(
                f"challenger_min_sessions must be >= 0, got {self.challenger_min_sessions!r}"
            )

    def _burn_in_done(self, effective: np.ndarray) -> bool:
        return bool(len(effective) and (effective >= self.burn_in).all())

    def _target(
        self,
        prob_best: np.ndarray,
        draws: np.ndarray,
        effective: np.ndarray,
        champion: np.ndarray,
    ) -> np.ndarray:
        k = len(prob_best)
        learning = effective < self.burn_in
        if not learning.any():
            return prob_best
        if learning.all():
            return np.full(k, 1 / k)
        explore = np.where(champion, 1 / k, min(1 / k, self.challenger_cap))
        target = np.where(learning, explore, 0.0)
        # The others keep their Thompson shares among themselves, scaled to what is left.
        known = draws[:, ~learning]
        best = np.bincount(np.argmax(known, axis=1), minlength=known.shape[1]) / len(known)
        target[~learning] = (1 - target.sum()) * best
        return target

    def _constrain(
        self, target: np.ndarray, effective: np.ndarray, arms: np.ndarray, champion: str | None
    ) -> np.ndarray:
        floors = self.floor_shares(effective)
        held = np.isin(arms, self.guardrail_held_)
        floors = np.where(held, np.maximum(floors, self.guardrail_floor), floors)
        capped = (effective < self.challenger_min_sessions) & (arms != champion)
        caps = np.where(capped, self.challenger_cap, 1.0)
        return rollout(target, floors, caps)

    def floor_shares(self, complete_sessions: np.ndarray) -> np.ndarray:
        """Minimum share of each arm given its complete sessions (the decaying floor).

        >>> policy = ThompsonSamplingPolicy(floor=0.02, floor_decay_sessions=1000)
        >>> policy.floor_shares(np.array([0, 1000]))
        array([0.02, 0.01])
        """
        n = np.asarray(complete_sessions, dtype=float)
        if self.floor_decay_sessions > 0:
            return self.floor / (1 + n / self.floor_decay_sessions)
        return np.full(len(n), float(self.floor))


def make_policy(
    config: PolicyConfig, *, random_state: int | np.random.Generator | None = None
) -> _PosteriorPolicy:
    """The policy ``config.kind`` names, with the configured hyper-parameters.

    >>> make_policy(PolicyConfig(kind="uniform")).__class__.__name__
    'UniformPolicy'
    """
    if config.kind == "uniform":
        return UniformPolicy(
            samples=config.samples,
            stop_probability_best=config.stop_probability_best,
            stop_expected_loss=config.stop_expected_loss,
            delay=config.delay,
            segment_prior_sessions=config.segment_prior_sessions,
            random_state=random_state,
            stop_rule=config.stop_rule,
        )
    return ThompsonSamplingPolicy(
        burn_in=config.burn_in,
        floor=config.floor,
        floor_decay_sessions=config.floor_decay_sessions,
        challenger_cap=config.challenger_cap,
        challenger_min_sessions=config.challenger_min_sessions,
        guardrail_floor=config.guardrail_floor,
        samples=config.samples,
        stop_probability_best=config.stop_probability_best,
        stop_expected_loss=config.stop_expected_loss,
        delay=config.delay,
        segment_prior_sessions=config.segment_prior_sessions,
        random_state=random_state,
        stop_rule=config.stop_rule,
    )
