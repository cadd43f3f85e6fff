"""The direct method's reward model: one scikit-learn GLM per arm on the session context.

Context columns are encoded once (categorical → one-hot, numeric → standardised)
and rows are grouped by (distinct context pattern, arm). A model fitted on the groups, with
their counts as sample weights, is the same model as one fitted on every row: for
squared loss the target is the group mean, for log loss each group is two rows
weighted by its successes and failures. So fitting costs little even at 100k rows.

Bootstrap without refitting. An estimate that averages model predictions moves,
when the data are resampled, both because the rows change and because the model
would be refitted. :meth:`RewardModel.correction` gives, for an estimate with
per-session terms ``t_i``, the weight ``γ`` such that ``t_i + γ (r_i - q̂_i)`` is
its linearised influence term: one Newton step of the refit, the "one-step
bootstrap" (asymptotically the same as refitting). Resampling those terms with
numpy is then exact and cheap. (For a model with one cell per context and arm,
``γ`` is ``π / μ̂``: the direct method's interval becomes doubly robust's with
estimated propensities.)
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression, Ridge
from threadpoolctl import ThreadpoolController

__all__ = ["RewardModel"]

#: One-hot columns per categorical feature at most; rarer values share an "infrequent" column.
MAX_CATEGORIES = 30


@dataclass(frozen=True)
class _ArmFit:
    """What the linearisation needs from one arm's fitted GLM."""

    design: np.ndarray  # (n_patterns, p): pattern features and a trailing intercept column
    slope: np.ndarray  # (n_patterns,): d prediction / d linear predictor
    inverse_hessian: np.ndarray  # (p, p), of the loss scaled so a row's score is (r - q̂) z


class RewardModel:
    """Predicted reward per (context pattern, arm), with influence weights for the bootstrap.

    ``model``: ``"auto"`` (logistic regression for 0/1 rewards, ridge otherwise),
    ``"logistic"``, ``"ridge"``, or a configured :class:`~sklearn.linear_model.LogisticRegression`
    (L2, with intercept) or :class:`~sklearn.linear_model.Ridge` (with intercept).

    >>> context = pd.DataFrame({"plan": ["x", "y"] * 50})
    >>> arm = np.array([0] * 50 + [1] * 50)  # arm 0 earns 1 on plan x only, arm 1 earns 0.5
    >>> reward = np.r_[np.tile([1.0, 0.0], 25), np.full(50, 0.5)]
    >>> RewardModel("ridge", context, arm, reward, 2).predicted()[:2].round(2).tolist()
    [[0.98, 0.5], [0.02, 0.5]]
    """

    def __init__(
        self,
        model: Any,
        context: pd.DataFrame,
        arm_codes: np.ndarray,
        reward: np.ndarray,
        n_arms: int,
    ) -> None:
        self.binary = bool(np.isin(reward, (0.0, 1.0)).all())
        self.estimator = _make_estimator(model, self.binary)
        self.patterns, self.pattern_of_row = _patterns(context)
        self.arm_codes = arm_codes
        self.n_arms = n_arms
        groups = self.pattern_of_row * n_arms + arm_codes
        shape = (len(self.patterns), n_arms)
        self.counts_ = np.bincount(groups, minlength=shape[0] * n_arms).reshape(shape).astype(float)
        sums = np.bincount(groups, weights=reward, minlength=shape[0] * n_arms).reshape(shape)
        self.table_ = np.empty(shape)
        self._fits: list[_ArmFit] = []
        # The grouped problems are tiny: BLAS threads cost more than they save (4x on 2 busy cores).
        with _threadpools().limit(limits=1):
            for arm in range(n_arms):
                predicted, fit = self._fit_arm(self.counts_[:, arm], sums[:, arm])
                self.table_[:, arm] = predicted
                self._fits.append(fit)

    def predicted(self) -> np.ndarray:
        """Per-row predictions for every arm, shape ``(n_rows, n_arms)``."""
        return self.table_[self.pattern_of_row]

    def correction(self, derivative: np.ndarray) -> np.ndarray:
        """Weight ``γ_i`` per row so that ``t_i + γ_i (r_i - q̂(x_i, a_i))`` linearises an estimate.

        ``derivative[i, a]`` is ``∂t_i / ∂q̂(x_i, a)`` (the target probability for the
        direct method). Returns shape ``(n_rows,)``.
        """
        n_patterns = len(self.patterns)
        gamma = np.empty((n_patterns, self.n_arms))
        for arm, fit in enumerate(self._fits):
            by_pattern = np.bincount(
                self.pattern_of_row, weights=derivative[:, arm], minlength=n_patterns
            )
            gradient = fit.design.T @ (by_pattern * fit.slope)
            gamma[:, arm] = fit.design @ (fit.inverse_hessian @ gradient)
        return gamma[self.pattern_of_row, self.arm_codes]

    def _fit_arm(self, counts: np.ndarray, sums: np.ndarray) -> tuple[np.ndarray, _ArmFit]:
        seen = counts > 0
        mean = sums.sum() / counts.sum()
        if seen.sum() == 1 or np.allclose(sums[seen] / counts[seen], mean):
            return self._constant(counts, mean)  # nothing to learn; also avoids one-class fits
        design = np.column_stack([self.patterns, np.ones(len(self.patterns))])
        x = self.patterns[seen]
        model = clone(self.estimator)
        if isinstance(model, LogisticRegression):
            successes, failures = sums[seen], counts[seen] - sums[seen]
            model.fit(
                np.vstack([x, x]),
                np.r_[np.ones(len(x)), np.zeros(len(x))],
                sample_weight=np.r_[successes, failures],
            )
            predicted = model.predict_proba(self.patterns)[:, list(model.classes_).index(1.0)]
            slope = predicted * (1 - predicted)
            # sklearn minimises Σ w·logloss + ‖coef‖²/2C (intercept free): score (r - p) z.
            penalty = 1.0 / float(model.C)
        else:
            model.fit(x, sums[seen] / counts[seen], sample_weight=counts[seen])
            predicted = np.asarray(model.predict(self.patterns), dtype=float)
            slope = np.ones(len(predicted))
            # sklearn minimises Σ w (r - η)² + α‖coef‖², i.e. half of it: score (r - η) z.
            penalty = float(model.alpha)
        hessian = design.T @ (design * (counts * slope)[:, None])
        hessian[:-1, :-1] += penalty * np.eye(design.shape[1] - 1)
        return predicted, _ArmFit(design, slope, np.linalg.pinv(hessian))

    def _constant(self, counts: np.ndarray, mean: float) -> tuple[np.ndarray, _ArmFit]:
        design = np.ones((len(counts), 1))
        inverse = np.array([[1.0 / counts.sum()]])  # a mean: Hessian n, score (r - mean)
        return np.full(len(counts), mean), _ArmFit(design, np.ones(len(counts)), inverse)


@functools.cache
def _threadpools() -> ThreadpoolController:
    """Inspecting the loaded BLAS libraries is slow: do it once per process."""
    return ThreadpoolController()


def _make_estimator(model: Any, binary: bool) -> LogisticRegression | Ridge:
    if isinstance(model, str):
        if model == "auto":
            model = "logistic" if binary else "ridge"
        if model == "logistic":
            model = LogisticRegression(C=1.0, max_iter=1000)
        elif model == "ridge":
            model = Ridge(alpha=1.0)
        else:
            raise ValueError(
                f"model must be 'auto', 'logistic', 'ridge' or an estimator, got {model!r}"
            )
    if isinstance(model, LogisticRegression):
        if not binary:
            raise ValueError(
                "a logistic reward model needs 0/1 rewards; use 'ridge' or 'auto' for this KPI"
            )
        if model.class_weight is not None:
            raise ValueError(
                f"the logistic reward model must have class_weight=None, got {model!r}"
            )
        l1_ratio = getattr(model, "l1_ratio", None)
        if getattr(model, "penalty", "l2") not in ("l2", "deprecated") or l1_ratio not in (
            None,
            0,
            0.0,
        ):
            raise ValueError(f"the logistic reward model must use an L2 penalty, got {model!r}")
    elif not isinstance(model, Ridge):
        raise ValueError(
            "model must be a LogisticRegression or Ridge (the bootstrap linearises a GLM), "
            f"got {model!r}"
        )
    if not model.fit_intercept or not np.isscalar(getattr(model, "alpha", 0.0)):
        raise ValueError(
            f"the reward model needs fit_intercept=True and a scalar penalty, got {model!r}"
        )
    return model


def _patterns(context: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Distinct context patterns as a float design matrix, and each row's pattern.

    Categorical columns become one-hot (the ``MAX_CATEGORIES - 1`` most frequent
    values, the rest sharing one column), numeric ones are standardised with missing
    values at the mean. Encoding is vectorised pandas on the distinct patterns only.
    """
    prepared = pd.DataFrame(index=context.index)
    for column in context.columns:
        values = context[column]
        if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            numbers = values.astype(float)
            std = numbers.std(ddof=0)
            prepared[column] = ((numbers - numbers.mean()) / (std if std > 0 else 1.0)).fillna(0.0)
        else:
            # JSON context may hold bools, lists or None: compare values as text.
            text = values.astype(object).where(values.notna(), "<missing>").astype(str)
            keep = text.value_counts().index[: MAX_CATEGORIES - 1]
            prepared[column] = text.where(text.isin(keep), "<other>")
    usable = [c for c in prepared.columns if prepared[c].nunique() > 1]
    if not usable:
        return np.zeros((1, 1)), np.zeros(len(context), dtype=np.int64)
    codes = prepared.groupby(usable, sort=False, dropna=False).ngroup().to_numpy()
    first = np.unique(codes, return_index=True)[1]
    distinct = prepared.iloc[first]
    blocks = [
        pd.get_dummies(distinct[c], dtype=float).to_numpy()
        if distinct[c].dtype == object or pd.api.types.is_string_dtype(distinct[c])
        else distinct[[c]].to_numpy(dtype=float)
        for c in usable
    ]
    return np.hstack(blocks), codes
