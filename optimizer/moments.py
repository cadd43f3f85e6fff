"""Mergeable sufficient statistics of a session frame: what a refit needs, summed per group.

Thompson sampling, the stop rule, the guardrails' rates, the holdback lift and
the per-arm read-outs need only *sums over sessions* per (segment, arm):
counts, sums of each KPI term's observed value and exposure, their cross
products (the delta-method variance), the reward and its square, turn and vote
counts with the squares the cluster-robust guardrail variance needs. Such sums
merge by addition, so the sessions whose windows have closed can be summed
once and kept (:mod:`optimizer.refit_state`), and a refit adds the few open
sessions to them instead of re-reading the whole history.

Two things are not sums and get a mergeable form of their own:

- the median of support minutes: a log-bucket histogram (:data:`SKETCH_ALPHA`
  relative accuracy, the DDSketch layout) whose counts add up;
- the sample-ratio-mismatch groups (:func:`srm_groups`): first sessions counted by
  (snapshot version, segment, arms inactive at assignment, arm).

A full recomputation goes through the same sums (``policy.fit`` on a frame
builds them with :func:`session_moments`), so the incremental refit and a
recomputation differ only by the order of floating-point additions.

>>> import pandas as pd
>>> frame = pd.DataFrame({"arm_id": ["a", "a", "b"], "reward": [1.0, 0.0, 1.0], "complete": True})
>>> session_moments(frame)[["arm_id", "n", "o0"]].to_dict("records")
[{'arm_id': 'a', 'n': 2.0, 'o0': 1.0}, {'arm_id': 'b', 'n': 1.0, 'o0': 1.0}]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

__all__ = [
    "METRIC_COLUMNS",
    "SKETCH_ALPHA",
    "SketchRef",
    "arm_readouts",
    "combine",
    "group_sums",
    "moment_terms",
    "session_moments",
    "sketch_median",
    "sketch_values",
    "support_sketch",
    "term_arrays",
]

#: Relative accuracy of the support-minutes histogram (a bucket spans ±1% of its value).
SKETCH_ALPHA = 0.01
_GAMMA = (1 + SKETCH_ALPHA) / (1 - SKETCH_ALPHA)
_LOG_GAMMA = math.log(_GAMMA)
#: Per-session counts summed as they are, plus the products the guardrail variance needs.
METRIC_COLUMNS = (
    "turns",
    "errors",
    "rated",
    "thumbs_up",
    "thumbs_down",
    "conversions",
    "conversion_known",
    "thumbs_down__hh",
    "thumbs_down__hn",
    "thumbs_down__nn",
    "errors__hh",
    "errors__hn",
    "errors__nn",
    "cost_usd",
    "cost_usd__sq",
)
_KEYS = ("segment", "arm_id", "holdback")


def term_arrays(
    sessions: pd.DataFrame,
) -> list[tuple[str, float, np.ndarray, np.ndarray, np.ndarray]]:
    """(column, weight, exposure, observed, final value or NaN) per KPI term of a frame.

    A hand-made frame without ``attrs["kpi_terms"]`` has one term, the reward,
    known when the session is complete.
    """
    meta = sessions.attrs.get("kpi_terms")
    if meta:
        out = []
        for t in meta:
            col = t.get("column", t["name"])
            out.append(
                (
                    col,
                    float(t["weight"]),
                    sessions[f"{col}_exposure"].to_numpy(dtype=float),
                    sessions[f"{col}_observed"].to_numpy(dtype=float),
                    sessions[col].to_numpy(dtype=float),
                )
            )
        return out
    reward = sessions["reward"].to_numpy(dtype=float)
    done = sessions["complete"].to_numpy(dtype=bool)
    return [("reward", 1.0, done.astype(float), np.where(done, np.nan_to_num(reward), 0.0), reward)]


def moment_terms(sessions: pd.DataFrame) -> list[dict[str, Any]]:
    """The term list stored with moments: column and weight, in order."""
    meta = sessions.attrs.get("kpi_terms")
    if meta:
        return [{"column": t.get("column", t["name"]), "weight": float(t["weight"])} for t in meta]
    return [{"column": "reward", "weight": 1.0}]


def session_moments(
    sessions: pd.DataFrame, keys: Sequence[str] = _KEYS, *, extra: Mapping[str, Any] | None = None
) -> pd.DataFrame:
    """Per group of ``keys``: the sums a refit needs (see the module docstring).

    Columns: the keys, ``n`` (sessions), ``complete``, ``eff`` (Σ min exposure),
    per term k ``o{k}`` / ``e{k}`` / ``f{k}`` (observed, exposure, final value of
    complete sessions), per pair ``oo{k}_{m}`` / ``oe{k}_{m}`` / ``ee{k}_{m}``,
    ``y`` / ``yy`` (reward of complete sessions and its square), ``nb_obs`` /
    ``nb_fin`` (sessions whose first term is not 0/1, observed / final), and
    :data:`METRIC_COLUMNS` (``cost_usd`` and its square when the frame has costs).
    A key missing from the frame is filled (segment ``"*"``, holdback False).
    ``extra`` adds constant key columns (e.g. a day).
    ``attrs["terms"]`` lists the terms; ``attrs["metrics"]`` says whether the
    frame had turn and vote counts.
    """
    n = len(sessions)
    terms = term_arrays(sessions) if n else []
    key_cols: dict[str, np.ndarray] = {}
    for key in keys:
        if key in sessions:
            key_cols[key] = sessions[key].to_numpy()
        elif key == "segment":
            key_cols[key] = np.full(n, "*", dtype=object)
        elif key == "holdback":
            key_cols[key] = np.zeros(n, dtype=bool)
        else:
            raise ValueError(f"session frame lacks key column {key!r}")
    if "holdback" in key_cols:
        key_cols["holdback"] = np.asarray(key_cols["holdback"], dtype=bool)
    for name, value in (extra or {}).items():
        key_cols[name] = np.full(n, value)
    # One code per group, then one bincount per statistic: no per-session product columns
    # are materialised (a month of sessions × dozens of statistics would be hundreds of MB).
    groups, codes = group_codes(key_cols, n)
    size = len(groups)
    stats: dict[str, np.ndarray] = {}

    def add(name: str, values: np.ndarray | None) -> None:
        stats[name] = np.bincount(codes, weights=values, minlength=size).astype(float)

    complete = sessions["complete"].to_numpy(dtype=bool) if n else np.zeros(0, bool)
    add("n", None)
    add("complete", complete.astype(float))
    if terms:
        add("eff", np.column_stack([t[2] for t in terms]).min(axis=1))
        for k, (_, _, e, o, f) in enumerate(terms):
            add(f"o{k}", o)
            add(f"e{k}", e)
            add(f"f{k}", np.where(complete, np.nan_to_num(f), 0.0))
            for m, (_, _, e2, o2, _) in enumerate(terms):
                add(f"oo{k}_{m}", o * o2)
                add(f"oe{k}_{m}", o * e2)
                add(f"ee{k}_{m}", e * e2)
        reward = sessions["reward"].to_numpy(dtype=float)
        y = np.where(complete, reward, 0.0)
        add("y", y)
        add("yy", y * y)
        first_o, first_f = terms[0][3], terms[0][4]
        add("nb_obs", (~np.isin(first_o, (0.0, 1.0))).astype(float))
        add("nb_fin", (complete & ~np.isin(first_f, (0.0, 1.0))).astype(float))
    has_metrics = all(c in sessions for c in ("thumbs_up", "thumbs_down", "rated", "turns")) and (
        "errors" in sessions
    )
    if has_metrics and n:
        counts = {
            c: sessions[c].to_numpy(dtype=float)
            for c in ("turns", "errors", "rated", "thumbs_up", "thumbs_down")
        }
        for c, values in counts.items():
            add(c, values)
        conv = _column_of(sessions, "outcome:conversion")
        if conv is not None:
            values = sessions[conv].to_numpy(dtype=float)
            add("conversion_known", (~np.isnan(values)).astype(float))
            add("conversions", (values > 0).astype(float))
        for hits, total in (("thumbs_down", "rated"), ("errors", "turns")):
            h, t = counts[hits], counts[total]
            add(f"{hits}__hh", h * h)
            add(f"{hits}__hn", h * t)
            add(f"{hits}__nn", t * t)
    if "cost_usd" in sessions and n:  # the cost guardrail: mean and variance per arm
        cost = sessions["cost_usd"].to_numpy(dtype=float)
        add("cost_usd", cost)
        add("cost_usd__sq", cost * cost)
    out = pd.concat([groups, pd.DataFrame(stats)], axis=1)
    out.attrs["is_moments"] = True
    out.attrs["terms"] = moment_terms(sessions)
    out.attrs["metrics"] = bool(has_metrics)
    out.attrs["conversion"] = _column_of(sessions, "outcome:conversion") is not None
    return out


def group_codes(key_cols: Mapping[str, np.ndarray], n: int) -> tuple[pd.DataFrame, np.ndarray]:
    """The distinct combinations of ``key_cols`` (sorted, as a ``groupby`` gives them) and
    each row's group: each key factorised, the codes combined — no frame of keys is built."""
    if not n:
        return pd.DataFrame({k: pd.Series(dtype=object) for k in key_cols}), np.zeros(0, np.int64)
    combined = np.zeros(n, dtype=np.int64)
    uniques = []
    for values in key_cols.values():
        part, levels = pd.factorize(values, sort=True)
        uniques.append(levels)
        combined = combined * len(levels) + part
    present, codes = np.unique(combined, return_inverse=True)
    columns = {}
    for name, levels in reversed(list(zip(key_cols, uniques, strict=True))):
        taken = pd.Index(levels).take(present % len(levels)).to_numpy()
        columns[name] = pd.Series(taken, dtype=object) if taken.dtype.kind in "OUT" else taken
        present = present // len(levels)
    groups = pd.DataFrame({k: columns[k] for k in key_cols})
    if "holdback" in groups:
        groups["holdback"] = groups["holdback"].astype(bool)
    return groups, codes.astype(np.int64).reshape(-1)


def group_sums(
    key_cols: Mapping[str, np.ndarray], values: Mapping[str, np.ndarray | None], n: int
) -> pd.DataFrame:
    """Sums of ``values`` (None: a count) per group of ``key_cols``: a ``groupby().sum()``
    without building a frame of the rows."""
    groups, codes = group_codes(key_cols, n)
    sums = {
        name: np.bincount(codes, weights=v, minlength=len(groups)).astype(float)
        for name, v in values.items()
    }
    return pd.concat([groups, pd.DataFrame(sums)], axis=1)


def combine(parts: Sequence[pd.DataFrame], keys: Sequence[str]) -> pd.DataFrame:
    """Sum moment (or sketch) frames over ``keys``: the merge of mergeable statistics."""
    frames = [p for p in parts if len(p)]
    attrs = next((dict(p.attrs) for p in parts if p.attrs), {})
    if not frames:
        columns = list(dict.fromkeys([*keys, *(c for p in parts for c in p.columns)]))
        out = pd.DataFrame({c: pd.Series(dtype=object if c in keys else float) for c in columns})
        out.attrs = attrs
        return out
    whole = pd.concat(frames, ignore_index=True).fillna(0.0)
    keys = list(keys)
    value_cols = [c for c in whole.columns if c not in keys]
    out = whole.groupby(keys, sort=True, observed=True, dropna=False)[value_cols].sum()
    out = out.reset_index()
    out.attrs = attrs
    for p in parts:  # metrics / conversion hold if any part had them
        for flag in ("metrics", "conversion"):
            if p.attrs.get(flag):
                out.attrs[flag] = True
    return out


def _column_of(sessions: pd.DataFrame, source: str) -> str | None:
    for t in sessions.attrs.get("kpi_terms", []):
        if t.get("source") == source:
            return str(t.get("column", t["name"]))
    return None


# -- the support-minutes histogram ------------------------------------------------------


class SketchRef:
    """A :func:`support_sketch` carried in a moments frame's ``attrs["sketch"]``.

    A holder compared by identity: pandas compares ``attrs`` when it combines
    frames, and a DataFrame there has no truth value.
    """

    __slots__ = ("frame",)

    def __init__(self, frame: pd.DataFrame) -> None:
        self.frame = frame

    def __deepcopy__(self, memo: dict[int, Any]) -> SketchRef:
        return self  # pandas deep-copies attrs at every operation; this is read-only


def _bucket(values: np.ndarray) -> np.ndarray:
    """Signed log bucket of each value; 0 for zero."""
    mag = np.abs(values)
    with np.errstate(divide="ignore"):
        b = np.ceil(np.log(np.where(mag > 0, mag, 1.0)) / _LOG_GAMMA).astype(np.int64)
    b = b + 1_000_000  # positive for every magnitude a float can hold
    return np.where(mag > 0, np.sign(values).astype(np.int64) * b, 0)


def _representative(bucket: np.ndarray) -> np.ndarray:
    mag = np.abs(bucket) - 1_000_000
    value = 2 * np.power(_GAMMA, mag.astype(float)) / (_GAMMA + 1)
    return np.where(bucket == 0, 0.0, np.sign(bucket) * value)


def support_sketch(sessions: pd.DataFrame, keys: Sequence[str] = _KEYS) -> pd.DataFrame:
    """Histogram of the closed support-minutes values: keys, ``bucket``, ``count``."""
    column = _column_of(sessions, "outcome:support_minutes")
    keys = list(keys)
    empty = pd.DataFrame({**{k: pd.Series(dtype=object) for k in keys}, "bucket": [], "count": []})
    if column is None or not len(sessions):
        return empty
    values = sessions[column].to_numpy(dtype=float)
    known = ~np.isnan(values)
    if not known.any():
        return empty
    count = int(known.sum())
    key_cols = {
        k: (
            sessions[k].to_numpy()[known]
            if k in sessions
            else np.full(count, "*" if k == "segment" else False, dtype=object)
        )
        for k in keys
    }
    if "holdback" in key_cols:
        key_cols["holdback"] = np.asarray(key_cols["holdback"], dtype=bool)
    key_cols["bucket"] = _bucket(values[known])
    return group_sums(key_cols, {"count": None}, count)


def sketch_values(values: np.ndarray) -> np.ndarray:
    """Each value replaced by its histogram bucket's representative (NaN stays NaN): the
    median of these is :func:`sketch_median` of their histogram, for any grouping."""
    values = np.asarray(values, dtype=float)
    known = ~np.isnan(values)
    out = np.full(len(values), np.nan)
    out[known] = _representative(_bucket(values[known]))
    return out


def sketch_median(sketch: pd.DataFrame) -> float:
    """Median of the values in a histogram (pandas' convention: the mean of the two middle
    values for an even count); NaN when empty. Accurate to :data:`SKETCH_ALPHA`."""
    if not len(sketch):
        return math.nan
    by = sketch.groupby("bucket", sort=False)["count"].sum()
    buckets = by.index.to_numpy(dtype=np.int64)
    values = _representative(buckets)
    order = np.argsort(values, kind="stable")
    values, counts = values[order], by.to_numpy(dtype=float)[order]
    total = counts.sum()
    if total <= 0:
        return math.nan
    cum = np.cumsum(counts)
    lo = values[np.searchsorted(cum, (total - 1) // 2 + 1)]
    hi = values[np.searchsorted(cum, total // 2 + 1)]
    return float((lo + hi) / 2)


def arm_readouts(moments: pd.DataFrame) -> dict[str, dict[str, Any]]:
    """Per arm: conversion rate (among closed conversion windows), thumbs up/down per rated
    turn, errors per turn, median support minutes (from ``attrs["sketch"]``), as in
    :func:`optimizer.kpi.arm_metrics`; None where undefined."""
    if not len(moments):
        return {}
    cols = [c for c in METRIC_COLUMNS if c in moments]
    by_arm = moments.groupby("arm_id", sort=True)[[*cols, "n"]].sum()
    ref = moments.attrs.get("sketch")
    sketch = ref.frame if isinstance(ref, SketchRef) else None
    out: dict[str, dict[str, Any]] = {}
    for arm, row in by_arm.iterrows():
        sums = {c: float(row[c]) for c in row.index}

        def get(column: str, sums: Mapping[str, float] = sums) -> float:
            return sums.get(column, 0.0)

        known, rated, turns = get("conversion_known"), get("rated"), get("turns")
        median = math.nan
        if sketch is not None and len(sketch):
            median = sketch_median(sketch[sketch["arm_id"] == arm])
        out[str(arm)] = {
            "conversions": get("conversions"),
            "conversion_known": known,
            "conversion_rate": (
                get("conversions") / known
                if known > 0 and moments.attrs.get("conversion")
                else None
            ),
            "thumbs_up_rate": get("thumbs_up") / rated if rated > 0 else math.nan,
            "thumbs_down_rate": get("thumbs_down") / rated if rated > 0 else math.nan,
            "error_rate": get("errors") / turns if turns > 0 else math.nan,
            "median_support_minutes": median,
        }
    return out
