"""Off-policy evaluation: a candidate allocation's KPI, estimated from logged sessions.

Every assignment logs its propensity, so the KPI a target policy *would* earn
can be estimated before it serves a single session::

    >>> from optimizer.ope import evaluate_target, make_logs, demo_environment
    >>> logs = make_logs(demo_environment(), 3000, random_state=0)
    >>> out = evaluate_target(logs, "arm:b", estimators=["snips", "dr"], n_bootstrap=50)
    >>> sorted(out["estimators"])
    ['dr', 'snips']

Modules: ``logs`` (the log frame: from the store, from CSV, validation),
``targets`` (arm at 100%, per-segment allocation, snapshot, uniform),
``estimators`` (IPS, SNIPS, direct method, doubly robust), ``reward_model``
(the direct method's per-arm scikit-learn model), ``synthetic`` (scenarios
with a known true value, for tests and ``bench/ope.py``).
"""

from __future__ import annotations

from optimizer.ope.estimators import (
    ESTIMATORS,
    IPS,
    SNIPS,
    DirectMethod,
    DoublyRobust,
    evaluate_target,
    kish_ess,
)
from optimizer.ope.logs import LOG_COLUMNS, logs_from_store, read_logged_csv, validate_logs
from optimizer.ope.synthetic import SyntheticEnvironment, demo_environment, make_logs
from optimizer.ope.targets import (
    AllocationTarget,
    ArmTarget,
    TargetPolicy,
    UniformTarget,
    as_target,
    parse_target,
    snapshot_target,
)

__all__ = [
    "ESTIMATORS",
    "IPS",
    "LOG_COLUMNS",
    "SNIPS",
    "AllocationTarget",
    "ArmTarget",
    "DirectMethod",
    "DoublyRobust",
    "SyntheticEnvironment",
    "TargetPolicy",
    "UniformTarget",
    "as_target",
    "demo_environment",
    "evaluate_target",
    "kish_ess",
    "logs_from_store",
    "make_logs",
    "parse_target",
    "read_logged_csv",
    "snapshot_target",
    "validate_logs",
]
