"""Latency of assigning an arm, in-process, with the policy snapshot cached.

Two paths, each next to a baseline timed the same way in the same run:

- **choice**: what serving computes per new session once the snapshot is cached —
  ``Assigner.allocation()`` (cache hit), the segment's probabilities, the user's
  hash point and ``choose_arm``. Baseline: ``random.choice`` over the arms.
  Target: p99 ≤ 0.2 ms.
- **assign()**: the whole ``Assigner.assign`` (look up the session, the user's
  previous arm, insert the assignment, commit) on a SQLite file with the
  production settings (WAL, synchronous=FULL) and, when
  ``FLYWHEEL_TEST_POSTGRES_URL`` is set, on PostgreSQL. Baseline: the bare
  ``Store.record_assignment`` insert + commit of the same rows.

Usage::

    python bench/assignment_latency.py [--n 20000]
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from optimizer.assignment import Assigner, choose_arm, segment_key, user_point  # noqa: E402
from optimizer.store import ArmSpec, AssignmentRecord, Store  # noqa: E402

ARMS = ("concise", "empathetic", "proactive-upsell", "concise+fixed", "concise+retrieved")
EXPERIMENT = "latency-bench"
TARGET_P99_MS = 0.2
ALLOCATION = {
    "segments": {
        "*": dict(zip(ARMS, (0.05, 0.1, 0.15, 0.2, 0.5), strict=True)),
        "plan=free": dict(zip(ARMS, (0.1, 0.1, 0.1, 0.2, 0.5), strict=True)),
        "plan=pro": dict(zip(ARMS, (0.02, 0.03, 0.8, 0.1, 0.05), strict=True)),
    }
}


def _timed(fn: Callable[[int], Any], n: int) -> np.ndarray:
    """Per-call latency in ms of ``fn(i)`` for i in range(n), after a warm-up."""
    for i in range(min(200, n)):
        fn(-i - 1)
    out = np.empty(n)
    clock = time.perf_counter_ns
    for i in range(n):
        t0 = clock()
        fn(i)
        out[i] = clock() - t0
    return out / 1e6


def _store(url: str) -> Store:
    store = Store(url)
    store.upgrade()
    store.sync_experiment(EXPERIMENT, EXPERIMENT, [ArmSpec(a, a, "bench") for a in ARMS])
    store.save_snapshot(EXPERIMENT, "thompson", ALLOCATION, {})
    return store


def _row(name: str, lat: np.ndarray, base: np.ndarray | None) -> dict[str, Any]:
    p50, p99 = np.percentile(lat, [50, 99])
    row = {"path": name, "n": len(lat), "p50_ms": p50, "p99_ms": p99, "mean_ms": lat.mean()}
    if base is not None:
        b50, b99 = np.percentile(base, [50, 99])
        row.update(base_p50_ms=b50, base_p99_ms=b99, ratio_p50=p50 / b50, ratio_p99=p99 / b99)
    return row


def choice_path(store: Store, n: int) -> tuple[np.ndarray, np.ndarray]:
    assigner = Assigner(store, EXPERIMENT, salt=EXPERIMENT, segment_by=("plan",))
    assigner.allocation()  # load and cache the snapshot
    users = [f"user-{uuid.uuid4().hex}" for _ in range(n)]
    contexts = [{"plan": "pro" if i % 3 == 0 else "free"} for i in range(n)]
    rng = random.Random(0)

    def choose(i: int) -> tuple[str, float]:
        probs = assigner.allocation().for_segment(segment_key(contexts[i], assigner.segment_by))
        return choose_arm(probs, user_point(users[i], assigner.salt))

    def baseline(i: int) -> str:
        return rng.choice(ARMS)

    return _timed(choose, n), _timed(baseline, n)


def assign_path(store: Store, n: int) -> tuple[np.ndarray, np.ndarray]:
    assigner = Assigner(store, EXPERIMENT, salt=EXPERIMENT, segment_by=("plan",))
    assigner.allocation()
    run = uuid.uuid4().hex[:8]

    def assign(i: int) -> Any:
        return assigner.assign(f"{run}-a{i}", f"{run}-u{i}", {"plan": "free"})

    def baseline(i: int) -> Any:
        return store.record_assignment(
            AssignmentRecord(
                session_id=f"{run}-b{i}",
                user_id=f"{run}-v{i}",
                experiment_id=EXPERIMENT,
                arm_id=ARMS[i % len(ARMS)],
                propensity=0.2,
                snapshot_version=1,
                segment="plan=free",
                context={"plan": "free"},
                assigned_at=datetime.now(UTC),
            )
        )

    return _timed(assign, n), _timed(baseline, n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=20_000, help="calls per path (choice path)")
    parser.add_argument("--n-db", type=int, default=2_000, help="calls per path with the database")
    args = parser.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory(prefix="flywheel-latency-") as tmp:
        store = _store(f"sqlite:///{Path(tmp) / 'bench.db'}")
        lat, base = choice_path(store, args.n)
        rows.append(_row("choice (cached snapshot)  vs random.choice", lat, base))
        lat, base = assign_path(store, args.n_db)
        rows.append(_row("assign() SQLite           vs bare insert", lat, base))
        store.dispose()
    pg = os.environ.get("FLYWHEEL_TEST_POSTGRES_URL")
    if pg:
        store = Store(pg)
        schema_name = f"bench_{uuid.uuid4().hex[:8]}"
        import sqlalchemy as sa

        with store.engine.begin() as conn:
            conn.execute(sa.text(f'CREATE SCHEMA "{schema_name}"'))
        url = sa.engine.make_url(store.engine.url).update_query_dict(
            {"options": f"-csearch_path={schema_name}"}
        )
        try:
            pg_store = _store(url.render_as_string(hide_password=False))
            lat, base = assign_path(pg_store, args.n_db)
            rows.append(_row("assign() PostgreSQL       vs bare insert", lat, base))
            pg_store.dispose()
        finally:
            with store.engine.begin() as conn:
                conn.execute(sa.text(f'DROP SCHEMA "{schema_name}" CASCADE'))
            store.dispose()

    from rich.console import Console
    from rich.table import Table

    table = Table(title="Assignment latency (ms per call, in-process)")
    for col in (
        "path",
        "n",
        "p50",
        "p99",
        "baseline p50",
        "baseline p99",
        "ratio p50",
        "ratio p99",
    ):
        table.add_column(col, justify="left" if col == "path" else "right")
    for r in rows:
        table.add_row(
            r["path"],
            f"{r['n']:,}",
            f"{r['p50_ms']:.4f}",
            f"{r['p99_ms']:.4f}",
            f"{r['base_p50_ms']:.4f}",
            f"{r['base_p99_ms']:.4f}",
            f"{r['ratio_p50']:.1f}×",
            f"{r['ratio_p99']:.1f}×",
        )
    console = Console(width=160)
    console.print(table)
    verdict = "met" if rows[0]["p99_ms"] <= TARGET_P99_MS else "MISSED"
    console.print(
        f"target: choice p99 ≤ {TARGET_P99_MS} ms — {verdict} ({rows[0]['p99_ms']:.4f} ms). "
        f"load average at the end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
