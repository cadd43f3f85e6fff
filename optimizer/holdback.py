"""The flywheel's own lift: optimised traffic against the holdback, with an interval.

The holdback (``experiment.holdback``, default 5% of users, sticky) stays on the
experiment's baseline arm for the experiment's life, outside the bandit; it does
not follow promotions (:class:`~optimizer.assignment.Assigner`). Everyone else
is "optimised" traffic: whatever the bandit, the guardrails and promotions gave
them. The difference of their mean KPIs is what the whole flywheel earned.

Both means come from the policy's own posterior of the mean KPI (the same delay
handling: with ``delay="model"`` open windows count term by term), fitted on
two groups instead of arms; the interval of the lift is the normal one from the
two posteriors (independent groups of users).

How the holdback enters the rest:

- **bandit and stop rule**: holdback sessions are left out (they were not
  chosen by the policy; counting them would inflate the baseline's evidence
  and the stop rule's view of it);
- **SRM**: left out of the arm-split check; the holdback's own share is checked
  against its configured share here (``srm_p_value``, binomial);
- **guardrails**: left out (a guardrail judges arms the bandit serves against
  the champion's sessions in the bandit);
- **off-policy estimates**: left out of the logs — their propensity is 1 under
  a different policy (the holdback's), not the logged bandit's.

>>> import pandas as pd
>>> frame = pd.DataFrame({"arm_id": ["a"] * 4, "reward": [1.0, 0.0, 1.0, 0.0],
...     "complete": True, "holdback": [True, False, False, False]})
>>> holdback_lift(frame, share=0.25, random_state=0)["holdback_sessions"]
1
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import pandas as pd
from scipy import stats

from optimizer.policy import UniformPolicy

__all__ = ["bandit_frame", "holdback_lift"]

_Z = 1.959963984540054


def bandit_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """The sessions the bandit chose (holdback sessions removed), attrs kept."""
    if "holdback" not in frame or not len(frame) or not frame["holdback"].any():
        return frame
    out = frame[~frame["holdback"].to_numpy(dtype=bool)].reset_index(drop=True)
    out.attrs = dict(frame.attrs)
    return out


def holdback_lift(
    frame: pd.DataFrame,
    *,
    share: float,
    delay: Literal["wait", "model"] = "model",
    samples: int = 4000,
    random_state: int | np.random.Generator | None = None,
) -> dict[str, Any]:
    """KPI of optimised traffic vs the holdback, the lift and its 95% interval.

    ``share`` is the configured holdback share (for the share check). Figures
    are None while a group has no session.
    """
    hold = (
        frame["holdback"].to_numpy(dtype=bool)
        if "holdback" in frame
        else np.zeros(len(frame), bool)
    )
    moments = bool(frame.attrs.get("is_moments"))
    if moments:  # sums per group (optimizer.moments): count sessions, not rows
        sizes = frame["n"].to_numpy(dtype=float)
        n_hold, n = round(float(sizes[hold].sum())), round(float(sizes.sum()))
    else:
        n_hold, n = int(hold.sum()), len(frame)
    out: dict[str, Any] = {
        "share": share,
        "sessions": n,
        "holdback_sessions": n_hold,
        "observed_share": n_hold / n if n else None,
        "srm_p_value": None,
        "optimised_kpi": None,
        "optimised_ci": [None, None],
        "holdback_kpi": None,
        "holdback_ci": [None, None],
        "lift": None,
        "lift_ci": [None, None],
        "relative_lift": None,
    }
    if n and 0 < share < 1:
        out["srm_p_value"] = float(stats.binomtest(n_hold, n, share).pvalue)
    if n_hold == 0 or n_hold == n:
        return out
    groups = frame.assign(arm_id=np.where(hold, "holdback", "optimised"))
    groups.attrs = dict(frame.attrs)
    if moments:
        from optimizer.moments import combine

        groups = combine([groups.drop(columns="holdback")], ("segment", "arm_id"))
        groups.attrs.pop("sketch", None)  # the read-outs of the two groups are not reported
    fitted = UniformPolicy(samples=samples, delay=delay, random_state=random_state).fit(
        groups, ["holdback", "optimised"]
    )
    s = fitted.summary_
    means, sds = {}, {}
    for group in ("holdback", "optimised"):
        lo, hi = s[group]["kpi_ci"]
        means[group] = float(s[group]["kpi_mean"])
        sds[group] = (hi - lo) / (2 * _Z)
        out[f"{group}_kpi"] = means[group]
        out[f"{group}_ci"] = [float(lo), float(hi)]
    lift = means["optimised"] - means["holdback"]
    sd = math.hypot(sds["optimised"], sds["holdback"])
    out["lift"] = lift
    out["lift_ci"] = [lift - _Z * sd, lift + _Z * sd]
    if means["holdback"] != 0:
        out["relative_lift"] = lift / abs(means["holdback"])
    return out
