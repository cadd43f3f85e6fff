"""The kept sums: credit per example and arm, the report's buckets and histogram.

Mergeable: a session's change moves them by the difference between what it counted
before and what it counts now (:mod:`optimizer.fewshot.state_rows`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import sqlalchemy as sa

from optimizer.store import schema

__all__ = ["SUPPORT_BIN", "apply_buckets", "apply_credit", "bin_value", "support_bin"]

_CHUNK = 500


def apply_credit(conn: sa.Connection, exp_id: str, delta: pd.DataFrame) -> None:
    """Add ``delta`` (n, s, q by example and arm) to the kept credit sums."""
    delta = delta.groupby(level=[0, 1]).sum()
    changed = {
        (str(e), str(a)): (float(n), float(s), float(q))
        for (e, a), n, s, q in zip(delta.index, delta["n"], delta["s"], delta["q"], strict=True)
        if n or s or q
    }
    if not changed:
        return
    fc = schema.fewshot_credit
    current = {
        (e, a): (n, s, q)
        for e, a, n, s, q in conn.execute(
            sa.select(fc.c.example_id, fc.c.arm_id, fc.c.n, fc.c.s, fc.c.q).where(
                fc.c.experiment_id == exp_id,
                fc.c.example_id.in_(sorted({e for e, _ in changed})),
            )
        )
    }
    for (example, arm), (dn, ds, dq) in changed.items():
        if (example, arm) in current:
            n, s, q = current[(example, arm)]
            if n + int(dn) == 0:  # nothing counted: no rounding left over either
                s, q, ds, dq = 0.0, 0.0, 0.0, 0.0
            conn.execute(
                fc.update()
                .where(
                    fc.c.experiment_id == exp_id,
                    fc.c.example_id == example,
                    fc.c.arm_id == arm,
                )
                .values(n=n + int(dn), s=s + ds, q=q + dq)
            )
        else:
            conn.execute(
                fc.insert().values(
                    experiment_id=exp_id, example_id=example, arm_id=arm, n=int(dn), s=ds, q=dq
                )
            )


#: Relative width of the support-minutes histogram's bins: medians within 0.1%.
SUPPORT_BIN = 0.002
_LOG_BIN = float(np.log1p(SUPPORT_BIN))


def support_bin(value: float) -> int:
    """Bin of a support-minutes value (order-preserving; 0 for zero)."""
    if value == 0:
        return 0
    k = int(np.clip(np.floor(np.log(abs(value)) / _LOG_BIN), -99_999, 99_999))
    return 200_000 + k if value > 0 else -200_000 - k


def bin_value(b: int) -> float:
    """The value a bin stands for (its geometric middle)."""
    if b == 0:
        return 0.0
    k = b - 200_000 if b > 0 else -200_000 - b
    v = float(np.exp((k + 0.5) * _LOG_BIN))
    return v if b > 0 else -v


def apply_buckets(
    conn: sa.Connection,
    exp_id: str,
    old: list[Any],
    new: list[Any],
) -> None:
    """Move the report's buckets and support histogram from ``old`` to ``new`` figures.

    A rebuild calls it once per stretch of history (:func:`~optimizer.fewshot.state_rows.
    rebuild`): buckets on a stretch's edges and the histogram's bins are read back and added to.
    """
    sums: dict[tuple[str, str, str, str], np.ndarray] = {}
    hist: dict[tuple[str, int], int] = {}
    width = len(schema.REPORT_FIGURES)
    for figures, sign in ((old, -1), (new, 1)):
        for f in figures:
            if not isinstance(f, dict):
                continue
            v = np.asarray(f["v"], dtype=float) * sign
            for kind in ("d", "h"):
                key = (kind, f[kind], f["arm"], f["seg"])
                total = sums.get(key)
                sums[key] = v.copy() if total is None else total + v
            if f.get("sup") is not None:
                hkey = (f["arm"], support_bin(f["sup"]))
                hist[hkey] = hist.get(hkey, 0) + sign
    rb, rs = schema.report_buckets, schema.report_support
    names = list(schema.REPORT_FIGURES)
    changed = {key: v for key, v in sums.items() if np.any(v)}
    if changed:  # one read of the touched buckets, then one bulk update and one bulk insert
        buckets = sorted({b for _, b, _, _ in changed})
        current: dict[tuple[str, str, str, str], np.ndarray] = {}
        for i in range(0, len(buckets), _CHUNK):
            for row in conn.execute(
                sa.select(
                    rb.c.kind, rb.c.bucket, rb.c.arm_id, rb.c.segment, *(rb.c[n] for n in names)
                ).where(rb.c.experiment_id == exp_id, rb.c.bucket.in_(buckets[i : i + _CHUNK]))
            ):
                current[(row[0], row[1], row[2], row[3])] = np.asarray(row[4:], dtype=float)
        updates, inserts = [], []
        for key, v in changed.items():
            kind, bucket, arm, segment = key
            ident = {"x_kind": kind, "x_bucket": bucket, "x_arm": arm, "x_segment": segment}
            if key in current:
                total = current[key] + v
                if total[0] == 0:  # no session left: no rounding left over either
                    total = np.zeros(width)
                updates.append({**ident, **dict(zip(names, total.tolist(), strict=True))})
            else:
                inserts.append(
                    {
                        "experiment_id": exp_id,
                        "kind": kind,
                        "bucket": bucket,
                        "arm_id": arm,
                        "segment": segment,
                        **dict(zip(names, v.tolist(), strict=True)),
                    }
                )
        if updates:
            conn.execute(
                rb.update()
                .where(
                    rb.c.experiment_id == exp_id,
                    rb.c.kind == sa.bindparam("x_kind"),
                    rb.c.bucket == sa.bindparam("x_bucket"),
                    rb.c.arm_id == sa.bindparam("x_arm"),
                    rb.c.segment == sa.bindparam("x_segment"),
                )
                .values({n: sa.bindparam(n) for n in names}),
                updates,
            )
        if inserts:
            conn.execute(rb.insert(), inserts)
    bins = {key: dn for key, dn in hist.items() if dn}
    if bins:
        counts: dict[tuple[str, int], int] = {}
        arms = sorted({a for a, _ in bins})
        for arm, b, n in conn.execute(
            sa.select(rs.c.arm_id, rs.c.bin, rs.c.n).where(
                rs.c.experiment_id == exp_id,
                rs.c.arm_id.in_(arms),
                rs.c.bin.in_(sorted({b for _, b in bins})),
            )
        ):
            counts[(arm, int(b))] = int(n)
        ups = [
            {"x_arm": a, "x_bin": b, "n": counts[(a, b)] + dn}
            for (a, b), dn in bins.items()
            if (a, b) in counts
        ]
        ins = [
            {"experiment_id": exp_id, "arm_id": a, "bin": b, "n": dn}
            for (a, b), dn in bins.items()
            if (a, b) not in counts
        ]
        if ups:
            conn.execute(
                rs.update()
                .where(
                    rs.c.experiment_id == exp_id,
                    rs.c.arm_id == sa.bindparam("x_arm"),
                    rs.c.bin == sa.bindparam("x_bin"),
                )
                .values(n=sa.bindparam("n")),
                ups,
            )
        if ins:
            conn.execute(rs.insert(), ins)
