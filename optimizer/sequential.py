"""Always-valid confidence bounds: decisions that stay valid however often the optimizer looks.

The optimizer re-fits every few minutes and each fit may pause an arm or name a
winner. A rule like "pause when P(breach) ≥ 95 %" is a 5 % error *per look*;
over thousands of looks a healthy arm is eventually paused. A **confidence
sequence** instead bounds the error over all looks at once (Ville's inequality):

    P(∃ look t : |D̂_t − D| > r_t) ≤ α

Here ``D̂`` is an estimate of a difference (arm − champion, or best − other)
with variance ``v``, approximately normal (the asymptotic confidence sequences
of Waudby-Smith et al., 2021, "Time-uniform central limit theory"). The radius
is the two-sided normal-mixture boundary (Robbins; Howard et al., 2021, eq. 14):

    r = sqrt( v · (1 + u)/u · 2 · log( sqrt(1 + u) / α ) ),   u = k · n / n_tuning,

with ``k = 2 log(1/α) + log(1 + 2 log(1/α))``: the mixture is tightest when the
sample size ``n`` reaches ``n_tuning`` and is valid at every ``n``. Near the
tuning point the radius is ≈ 3.0 standard errors at α = 5 % instead of 1.96 —
the price of looking as often as we like. The guarantee is asymptotic (normal
approximation), so callers require a minimum sample before any decision.

A **one-sided** bound (``one_sided=True``: only P(∃ t : D̂_t − D > r_t) ≤ α
matters, as for a guardrail, which only asks whether an arm is *worse*) uses the
one-sided normal-mixture boundary of Howard et al. (2021, eq. 14),
``log(sqrt(1 + u) / (2α) + 1)`` in place of ``log(sqrt(1 + u) / α)``: about 8 %
narrower at α = 5 %.

>>> round(radius(1.0, 1.0, alpha=0.05), 2)  # in standard errors, at the tuning point
3.04
>>> round(radius(1.0, 1.0, alpha=0.05, one_sided=True), 2)
2.78
>>> radius(1.0, 0.0, alpha=0.05)
inf
"""

from __future__ import annotations

import math

__all__ = ["mixture_k", "radius"]


def mixture_k(alpha: float) -> float:
    """``u`` at the tuning point: the mixture variance that minimises the radius there."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    two_log = 2 * math.log(1 / alpha)
    return two_log + math.log1p(two_log)


def radius(variance: float, information: float, *, alpha: float, one_sided: bool = False) -> float:
    """Always-valid half-width of a difference with ``variance`` at ``information`` = n/n_tuning.

    ``information`` is the sample size relative to the tuning sample size; 0
    (no data) gives an infinite radius. Raises ValueError on a negative variance.
    """
    if not variance >= 0:
        raise ValueError(f"variance must be >= 0, got {variance!r}")
    if not information > 0:
        return math.inf
    u = mixture_k(2 * alpha if one_sided else alpha) * information
    inner = math.sqrt(1 + u) / (2 * alpha) + 1 if one_sided else math.sqrt(1 + u) / alpha
    return math.sqrt(variance * (1 + u) / u * 2 * math.log(inner))
