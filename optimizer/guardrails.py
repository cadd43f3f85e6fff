"""Guardrails: is a challenger worse than the champion beyond a limit, with high probability?

Each configured guardrail (``config.kpi.guardrails``) compares every active
non-champion arm with the champion:

- ``thumbs_down_rate`` (thumbs down per rated turn) and ``error_rate`` (errored
  turns per turn): Beta(1 + hits, 1 + misses) posteriors for both arms; the
  probability of a breach is P(rate_arm − rate_champion > max_delta), by Monte
  Carlo. Turn-level counts are summed per arm from :func:`optimizer.kpi.session_frame`.
- ``latency_p95_ms``: the p95 of turn latencies. Instead of a bootstrap (too slow
  on millions of turns, and the optimizer runs often) we use the asymptotic
  normality of a sample quantile with a distribution-free standard error from
  order statistics: the p95 estimate's rank is binomial, so the values at ranks
  ``n·0.95 ± sqrt(n·0.95·0.05)`` bracket ±1 standard error. On the log scale the
  ratio of two p95s is then approximately normal and
  P(p95_arm / p95_champion > max_ratio) = Φ((log ratio − log max_ratio) / se).
  It needs at least :data:`MIN_LATENCY_TURNS` turns per arm.
- ``cost_per_session``: the mean cost of a session in USD (``cost_usd`` of
  :func:`optimizer.kpi.session_frame`), normal approximation of each mean;
  ``max_ratio`` compares on the log scale (delta method) and is skipped while
  the champion costs nothing (a ratio to 0 is undefined: use ``max_delta``, in
  USD, to cap a paid challenger against a free local champion). It needs at
  least :data:`MIN_RATE_N` sessions per arm.

**When is an arm breached?** The optimizer looks at every refit, so a per-look
rule ("P(breach) ≥ ``pause_probability``") pauses healthy arms sooner or later:
measured in ``bench/aa.py``. The default rule, ``"always_valid"``, pauses only when
an always-valid one-sided lower confidence bound (:mod:`optimizer.sequential`) of the arm's
difference (``max_delta``) or ratio (``max_ratio``, on the log scale) to the
champion exceeds the limit, with α = 1 − ``pause_probability``. Guarantee: for
an arm whose true difference is within the limit, P(it is *ever* paused by this
metric, over any number of refits) ≤ α, up to the normal approximation (hence
at least :data:`MIN_RATE_N` rated turns or :data:`MIN_LATENCY_TURNS` latencies
per arm before any pause). Rate variances are cluster-robust by session (turns
of one session are not independent), never below the binomial variance.
``"posterior"`` is the former per-look rule, kept for comparison. The posterior
probability is reported either way; :mod:`optimizer.refit` records the pause.
The champion is never checked.

>>> import pandas as pd
>>> from optimizer.config import GuardrailConfig
>>> frame = pd.DataFrame({"arm_id": ["champ", "new"], "rated": [1000, 1000],
...                       "thumbs_down": [100, 300], "turns": [1000, 1000], "errors": [0, 0]})
>>> rails = [GuardrailConfig(metric="thumbs_down_rate", max_delta=0.05)]
>>> checks = check_guardrails(frame, rails, champion="champ", arms=["new"],
...                           pause_probability=0.95, random_state=0)
>>> checks[0].breached, round(checks[0].arm_value, 2), round(checks[0].lower_bound, 3)
(True, 0.3, 0.151)
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import special

from optimizer.config import GuardrailConfig
from optimizer.sequential import radius

__all__ = [
    "GUARDRAIL_RULES",
    "MIN_LATENCY_TURNS",
    "MIN_RATE_N",
    "SUSPECT_PROBABILITY",
    "TUNING_N",
    "GuardrailCheck",
    "check_guardrails",
    "p95_with_se",
]

log = logging.getLogger(__name__)

#: Fewer latencies than this per arm: the p95 comparison is skipped (probability 0).
MIN_LATENCY_TURNS = 30
#: Fewer rated turns (or turns, for the error rate) per arm: no always-valid pause.
MIN_RATE_N = 30
#: The always-valid bound is tightest at this harmonic mean of the two arms' rated turns (or
#: latencies): where a 9-point thumbs-down breach of a 5-point limit typically crosses it
#: (~900 votes of the arm against a champion with several times more: ``bench/aa.py
#: --power``). Any value keeps the guarantee; replayed on the A/A runs, 500–2,000 pause the
#: breach after a median of 13,000 sessions instead of 18,000 at 3,000, with no false pause.
TUNING_N = 1500
#: An undecided check whose posterior P(breach) is at least this makes its arm a suspect: it
#: keeps ``policy.guardrail_floor`` of the traffic (and so does the champion) until decided.
SUSPECT_PROBABILITY = 0.5
#: ``always_valid`` (default): sequentially valid; ``posterior``: the per-look rule.
GUARDRAIL_RULES = ("always_valid", "posterior")
Rule = Literal["always_valid", "posterior"]
_RATE_COLUMNS = {"thumbs_down_rate": ("thumbs_down", "rated"), "error_rate": ("errors", "turns")}


@dataclass(frozen=True)
class GuardrailCheck:
    """One guardrail evaluated for one arm against the champion (the evidence of a pause)."""

    metric: str
    arm: str
    champion: str
    arm_value: float | None
    champion_value: float | None
    limit: float
    limit_kind: str  # "max_delta" or "max_ratio"
    probability: float
    n: int
    champion_n: int
    breached: bool
    #: Always-valid lower bound of the difference (or ratio), in the limit's units.
    lower_bound: float | None = None
    rule: str = "always_valid"
    #: Always-valid upper bound, same units: at or under the limit the arm is shown within it.
    upper_bound: float | None = None

    @property
    def undecided(self) -> bool:
        """Neither breached nor shown within the limit: the check still needs evidence."""
        if self.breached:
            return False
        return self.upper_bound is None or self.upper_bound > self.limit

    @property
    def suspect(self) -> bool:
        """Undecided, and more likely than not in breach (P(breach) ≥ :data:`SUSPECT_PROBABILITY`).

        Needs the always-valid bounds (the minimum sample) to be computed. The policy
        keeps a non-decaying floor for a suspect arm and for the champion it is
        compared with (``policy.guardrail_floor``), so the check gets the votes it
        needs to decide even when Thompson sampling would starve either arm. "More
        likely than not" keeps healthy arms out but for noise (an arm as good as the
        champion on 20% thumbs-down, limit +5 points, looks in breach at ~20% of refits
        at 100 votes of each, ~4% at 400, < 1% at 1,000), so the floor costs the KPI
        little where nothing is wrong.
        """
        return (
            self.undecided
            and self.upper_bound is not None
            and self.probability >= SUSPECT_PROBABILITY
        )

    def evidence(self) -> dict[str, Any]:
        """JSON-ready dict for arm events and snapshots."""
        return {
            **{
                k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in asdict(self).items()
            },
            "suspect": self.suspect,
        }


def check_guardrails(
    sessions: pd.DataFrame,
    guardrails: Sequence[GuardrailConfig],
    *,
    champion: str | None,
    arms: Sequence[str],
    pause_probability: float,
    latencies: Mapping[str, np.ndarray] | None = None,
    samples: int = 4000,
    random_state: int | np.random.Generator | None = None,
    rule: Rule = "always_valid",
) -> list[GuardrailCheck]:
    """Evaluate every guardrail for every arm of ``arms`` other than the champion.

    ``sessions`` (a session frame, or its sums from :mod:`optimizer.moments`) needs
    ``arm_id`` and the count columns of the rates checked
    (``thumbs_down``/``rated``, ``errors``/``turns``); ``latencies`` maps arm →
    turn latencies in ms (:func:`optimizer.kpi.turn_latencies`). Without a
    champion nothing can be compared and the result is empty. ``rule`` decides
    ``breached`` (see the module docstring); both figures are reported.
    """
    if not 0.5 < pause_probability < 1:
        raise ValueError(f"pause_probability must be in (0.5, 1), got {pause_probability!r}")
    if rule not in GUARDRAIL_RULES:
        raise ValueError(f"rule must be one of {list(GUARDRAIL_RULES)}, got {rule!r}")
    alpha = 1 - pause_probability
    if champion is None:
        return []
    rng = np.random.default_rng(random_state)
    challengers = [a for a in sorted(dict.fromkeys(arms)) if a != champion]
    counts = _counts(sessions)
    checks: list[GuardrailCheck] = []
    for rail in guardrails:
        for arm in challengers:  # guardrails × arms: a handful
            if rail.metric in _RATE_COLUMNS:
                check = _rate_check(rail, arm, champion, counts, samples, rng, alpha)
            elif rail.metric == "cost_per_session":
                check = _cost_check(rail, arm, champion, sessions, alpha)
            else:
                check = _latency_check(rail, arm, champion, latencies or {}, alpha)
            checks.append(_with_verdict(check, pause_probability, rule))
    return checks


def _counts(sessions: pd.DataFrame) -> pd.DataFrame:
    """Per arm: hits and totals, plus the sums of squares the cluster-robust variance needs."""
    cols = [c for c in ("thumbs_down", "rated", "errors", "turns") if c in sessions.columns]
    if sessions.empty or not cols:
        return pd.DataFrame(columns=cols)
    if sessions.attrs.get("is_moments"):  # already summed per group (optimizer.moments)
        summed = [c for c in sessions.columns if c.split("__")[0] in cols]
        return sessions.groupby("arm_id", observed=True)[summed].sum()
    frame = sessions[["arm_id", *cols]].copy()
    for hits, total in _RATE_COLUMNS.values():
        if hits in frame.columns and total in frame.columns:
            h, n = frame[hits].astype(float), frame[total].astype(float)
            frame[f"{hits}__hh"], frame[f"{hits}__hn"], frame[f"{hits}__nn"] = h * h, h * n, n * n
    return frame.groupby("arm_id", observed=True).sum()


def _rate_variance(counts: pd.DataFrame, arm: str, hits: str, total: str) -> tuple[float, float]:
    """Smoothed rate and its variance: cluster-robust by session, at least binomial."""
    h, n = _count(counts, arm, hits), _count(counts, arm, total)
    p = (h + 0.5) / (n + 1)  # keeps the variance positive at 0 or n hits
    if n == 0:
        return p, math.inf
    binomial = p * (1 - p) / n
    hh, hn, nn = (
        float(counts.at[arm, f"{hits}__{k}"]) if f"{hits}__{k}" in counts.columns else 0.0
        for k in ("hh", "hn", "nn")
    )
    cluster = max(hh - 2 * p * hn + p * p * nn, 0.0) / (n * n)
    return p, max(binomial, cluster)


def _harmonic(n_a: int, n_c: int) -> float:
    return 2 / (1 / n_a + 1 / n_c) if n_a > 0 and n_c > 0 else 0.0


def _count(counts: pd.DataFrame, arm: str, column: str) -> int:
    if arm in counts.index and column in counts.columns:
        return int(counts.at[arm, column])
    return 0


def _rate_check(
    rail: GuardrailConfig,
    arm: str,
    champion: str,
    counts: pd.DataFrame,
    samples: int,
    rng: np.random.Generator,
    alpha: float,
) -> GuardrailCheck:
    hits_col, total_col = _RATE_COLUMNS[rail.metric]
    h_a, n_a = _count(counts, arm, hits_col), _count(counts, arm, total_col)
    h_c, n_c = _count(counts, champion, hits_col), _count(counts, champion, total_col)
    draw_a = rng.beta(1 + h_a, 1 + n_a - h_a, size=samples)
    draw_c = rng.beta(1 + h_c, 1 + n_c - h_c, size=samples)
    if rail.max_delta is not None:
        limit, kind = rail.max_delta, "max_delta"
        prob = float(np.mean(draw_a - draw_c > limit))
    else:
        assert rail.max_ratio is not None
        limit, kind = rail.max_ratio, "max_ratio"
        prob = float(np.mean(draw_a > limit * draw_c))
    lower: float | None = None
    upper: float | None = None
    if min(n_a, n_c) >= MIN_RATE_N:
        (p_a, v_a), (p_c, v_c) = (
            _rate_variance(counts, a, hits_col, total_col) for a in (arm, champion)
        )
        info = _harmonic(n_a, n_c) / TUNING_N
        if kind == "max_delta":
            r = radius(v_a + v_c, info, alpha=alpha, one_sided=True)
            diff = h_a / n_a - h_c / n_c
            lower, upper = diff - r, diff + r
        else:  # the ratio on the log scale, delta method: var(log p) ≈ var(p) / p²
            r = radius(v_a / p_a**2 + v_c / p_c**2, info, alpha=alpha, one_sided=True)
            lower, upper = math.exp(math.log(p_a / p_c) - r), math.exp(math.log(p_a / p_c) + r)
    return GuardrailCheck(
        metric=rail.metric,
        arm=arm,
        champion=champion,
        arm_value=h_a / n_a if n_a else None,
        champion_value=h_c / n_c if n_c else None,
        limit=limit,
        limit_kind=kind,
        probability=prob,
        n=n_a,
        champion_n=n_c,
        breached=False,
        lower_bound=lower,
        upper_bound=upper,
    )


def p95_with_se(values: np.ndarray, q: float = 0.95) -> tuple[float, float]:
    """Sample ``q``-quantile and its standard error from order statistics.

    >>> p95_with_se(np.arange(1, 10_001, dtype=float))
    (9500.05, 22.0)
    """
    x = np.sort(np.asarray(values, dtype=float))
    n = len(x)
    if n == 0:
        return math.nan, math.nan
    half = math.sqrt(n * q * (1 - q))
    lo = int(np.clip(math.floor(n * q - half), 0, n - 1))
    hi = int(np.clip(math.ceil(n * q + half), 0, n - 1))
    return float(np.quantile(x, q)), float((x[hi] - x[lo]) / 2)


def _latency_check(
    rail: GuardrailConfig,
    arm: str,
    champion: str,
    latencies: Mapping[str, np.ndarray],
    alpha: float,
) -> GuardrailCheck:
    a = np.asarray(latencies.get(arm, ()), dtype=float)
    c = np.asarray(latencies.get(champion, ()), dtype=float)
    q_a, se_a = p95_with_se(a)
    q_c, se_c = p95_with_se(c)
    if rail.max_ratio is not None:
        limit, kind = rail.max_ratio, "max_ratio"
    else:
        assert rail.max_delta is not None
        limit, kind = rail.max_delta, "max_delta"
    prob = 0.0
    lower: float | None = None
    upper: float | None = None
    if min(len(a), len(c)) >= MIN_LATENCY_TURNS and q_a > 0 and q_c > 0:
        info = _harmonic(len(a), len(c)) / TUNING_N
        if kind == "max_ratio":
            # delta method on the log scale: se(log q) ≈ se(q) / q
            excess, se = math.log(q_a / q_c / limit), math.hypot(se_a / q_a, se_c / q_c)
            r = radius(se * se, info, alpha=alpha, one_sided=True)
            lower, upper = math.exp(math.log(q_a / q_c) - r), math.exp(math.log(q_a / q_c) + r)
        else:
            excess, se = q_a - q_c - limit, math.hypot(se_a, se_c)
            r = radius(se * se, info, alpha=alpha, one_sided=True)
            lower, upper = q_a - q_c - r, q_a - q_c + r
        prob = float(special.ndtr(excess / se)) if se > 0 else float(excess > 0)
    return GuardrailCheck(
        metric=rail.metric,
        arm=arm,
        champion=champion,
        arm_value=q_a if len(a) else None,
        champion_value=q_c if len(c) else None,
        limit=limit,
        limit_kind=kind,
        probability=prob,
        n=len(a),
        champion_n=len(c),
        breached=False,
        lower_bound=lower,
        upper_bound=upper,
    )


def _cost_sums(sessions: pd.DataFrame) -> pd.DataFrame:
    """Per arm: sessions, Σ cost and Σ cost² (of a frame, or its :mod:`optimizer.moments`)."""
    columns = ["n", "cost_usd", "cost_usd__sq"]
    if "cost_usd" not in sessions.columns or sessions.empty:
        return pd.DataFrame(columns=columns)
    if sessions.attrs.get("is_moments"):
        return sessions.groupby("arm_id", observed=True)[columns].sum()
    cost = sessions["cost_usd"].to_numpy(dtype=float)
    frame = pd.DataFrame(
        {
            "arm_id": sessions["arm_id"].to_numpy(),
            "n": 1.0,
            "cost_usd": cost,
            "cost_usd__sq": cost**2,
        }
    )
    return frame.groupby("arm_id", observed=True)[columns].sum()


def _cost_check(
    rail: GuardrailConfig, arm: str, champion: str, sessions: pd.DataFrame, alpha: float
) -> GuardrailCheck:
    sums = _cost_sums(sessions)

    def stats(name: str) -> tuple[float, float, int]:
        if name not in sums.index:
            return math.nan, math.inf, 0
        n, total, squares = (float(sums.at[name, c]) for c in ("n", "cost_usd", "cost_usd__sq"))
        if n < 1:
            return math.nan, math.inf, 0
        mean = total / n
        var = max(squares - n * mean * mean, 0.0) / (n - 1) if n > 1 else math.inf
        return mean, var / n, round(n)

    (m_a, v_a, n_a), (m_c, v_c, n_c) = stats(arm), stats(champion)
    if rail.max_ratio is not None:
        limit, kind = rail.max_ratio, "max_ratio"
    else:
        assert rail.max_delta is not None
        limit, kind = rail.max_delta, "max_delta"
    prob, lower = 0.0, None
    if min(n_a, n_c) >= MIN_RATE_N and math.isfinite(v_a + v_c):
        info = _harmonic(n_a, n_c) / TUNING_N
        if kind == "max_delta":
            diff, var = m_a - m_c, v_a + v_c
            lower = diff - radius(var, info, alpha=alpha, one_sided=True)
            prob = (
                float(special.ndtr((diff - limit) / math.sqrt(var)))
                if var > 0
                else float(diff > limit)
            )
        elif m_a > 0 and m_c > 0:
            log_ratio, var = math.log(m_a / m_c), v_a / m_a**2 + v_c / m_c**2
            lower = math.exp(log_ratio - radius(var, info, alpha=alpha, one_sided=True))
            excess = log_ratio - math.log(limit)
            prob = float(special.ndtr(excess / math.sqrt(var))) if var > 0 else float(excess > 0)
    return GuardrailCheck(
        metric=rail.metric,
        arm=arm,
        champion=champion,
        arm_value=m_a if n_a else None,
        champion_value=m_c if n_c else None,
        limit=limit,
        limit_kind=kind,
        probability=prob,
        n=n_a,
        champion_n=n_c,
        breached=False,
        lower_bound=lower,
    )


def _with_verdict(check: GuardrailCheck, pause_probability: float, rule: Rule) -> GuardrailCheck:
    if rule == "posterior":
        breached = check.probability >= pause_probability
    else:
        breached = check.lower_bound is not None and check.lower_bound > check.limit
    return GuardrailCheck(**{**asdict(check), "breached": breached, "rule": rule})
