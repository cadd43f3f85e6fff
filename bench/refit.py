"""Optimizer refit time and peak memory as history grows: incremental vs full recomputation.

Builds a store per size with a **constant traffic** of 16,667 sessions a day
(1M sessions = 60 days, 10M = 600 days), so a bigger store is a *longer
history*, not a busier one — what "cost flat in history" is about. The KPI
is ``flywheel.toml``'s default (conversion 7 days, thumbs up, support minutes,
revenue 30 days: the open window is a month of traffic, ~520k sessions), five
arms, 5% holdback, 20% returning users, two turns a session, a vote on a
quarter of the turns, conversions arriving over days. Data are written with
bulk inserts (``executemany`` on SQLite, ``COPY`` on PostgreSQL), not the ORM;
the build time is printed.

Then, each in a fresh process so the peak RSS is the measured work's own:

- **cold**: ``run_optimizer(fewshot=False)`` on the incremental path with no
  kept state — it reads the history once and keeps its rows (O(history), once);
- **warm**: one hour later, after a new hour of traffic plus 5 late outcomes
  and 5 changed votes on sessions of closed days — the steady state, what every refit
  costs (the changed sessions read again, the closed days they belong to corrected,
  the open window dated from its kept rows);
- **baseline, full**: ``run_optimizer(incremental=False)`` at the same time — the
  full recomputation (``--full-max`` sizes only: at 10M it needs more memory than
  a shared machine has);
- **baseline, groupby**: the sessions and conversions read with one query each
  and ``groupby("arm_id").mean()`` — the least any full read costs.

Targets (issue 18): warm refit at 10M ≤ 2 s and ≤ 1 GB, ≤ 1.5× the warm time at 1M.

Usage::

    python bench/refit.py --sizes 100000 1000000
    python bench/refit.py --sizes 10000000 --engine postgresql --keep /tmp/refit
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import history  # the builder next to this file (the script's folder is on sys.path)
import numpy as np
import pandas as pd

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

TARGET_S, TARGET_GB, TARGET_RATIO = 2.0, 1.0, 1.5


def add_hour(url: str, n: int, now: datetime) -> None:
    """An hour of new traffic, plus 5 late outcomes and 5 changed votes on closed sessions."""
    from optimizer.store import AssignmentRecord, OutcomeRecord, Store

    store = Store(url)
    rng = np.random.default_rng(1)
    per_hour = int(history.PER_DAY / 24)
    a = [
        AssignmentRecord(
            f"new{now.timestamp():.0f}-{i}",
            f"newuser{i}",
            history.EXPERIMENT,
            history.ARMS[i % len(history.ARMS)],
            0.2,
            None,
            "*",
            {},
            now - timedelta(seconds=3600 - i * 3600 / per_hour),
        )
        for i in range(per_hour)
    ]
    from optimizer.store import schema
    from optimizer.store.store import assignment_row

    with store.engine.begin() as conn:
        conn.execute(schema.assignments.insert(), [assignment_row(r) for r in a])
    old = rng.integers(0, n // 2, 5)
    for i in old:  # late conversions of sealed sessions
        store.record_outcome(
            OutcomeRecord(
                f"late-{now.timestamp():.0f}-{i}",
                "conversion",
                1.0,
                session_id=f"s{i}",
                occurred_at=history.START
                + timedelta(seconds=float(i) / history.PER_DAY * 86400 + 7200),
            ),
            received_at=now,
        )
    with store.engine.connect() as conn:
        turns = conn.execute(
            schema.turns.select()
            .with_only_columns(schema.turns.c.id, schema.turns.c.user_id)
            .where(schema.turns.c.session_id.in_([f"s{i}" for i in old]))
        ).all()
    for turn_id, user_id in turns[:5]:  # votes changed long after the chat
        store.record_feedback(turn_id, user_id, int(rng.integers(2)), at=now)
    store.dispose()


def reset(url: str) -> None:
    """A kept store back to its built state: no refit state, no added hour, no snapshots."""
    import sqlalchemy as sa

    from optimizer.store import make_engine

    engine = make_engine(url)
    with engine.begin() as conn:
        for statement in (
            "DELETE FROM refit_state",
            "DELETE FROM policy_snapshots",
            "DELETE FROM arm_events WHERE actor = 'optimizer'",
            "DELETE FROM assignments WHERE session_id LIKE 'new%'",
            "DELETE FROM outcomes WHERE idempotency_key LIKE 'late-%'",
        ):
            conn.execute(sa.text(statement))
    engine.dispose()


def _rss_mb() -> float:
    """Peak resident set size of this process so far, in MB (``VmHWM``)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(url: str, now: datetime, incremental: bool) -> dict[str, Any]:
    """In this (fresh) process: one run_optimizer (no few-shot step)."""
    from optimizer.refit import run_optimizer
    from optimizer.store import Store

    store = Store(url)
    before = _rss_mb()
    tic, cpu = time.perf_counter(), time.process_time()
    run = run_optimizer(
        store, history.config(), now=now, random_state=0, fewshot=False, incremental=incremental
    )
    assert run is not None
    return {
        "s": time.perf_counter() - tic,
        "cpu_s": time.process_time() - cpu,
        "rss_mb": _rss_mb(),
        "rss_before_mb": before,
        "sessions": run.sessions,
        "load": os.getloadavg()[0],
    }


def measure_groupby(url: str) -> dict[str, Any]:
    """In this (fresh) process: conversion rate per arm with one query per table + groupby."""
    import sqlalchemy as sa

    from optimizer.store import Store

    store = Store(url)
    tic, cpu = time.perf_counter(), time.process_time()
    with store.engine.connect() as conn:
        sessions = pd.read_sql(
            sa.text("SELECT session_id, arm_id FROM assignments WHERE experiment_id = :e"),
            conn,
            params={"e": history.EXPERIMENT},
        )
        conversions = pd.read_sql(
            sa.text("SELECT session_id, value FROM outcomes WHERE name = 'conversion'"), conn
        )
    frame = sessions.merge(conversions, on="session_id", how="left").fillna({"value": 0.0})
    frame.groupby("arm_id")["value"].mean()
    return {
        "s": time.perf_counter() - tic,
        "cpu_s": time.process_time() - cpu,
        "rss_mb": _rss_mb(),
        "load": os.getloadavg()[0],
    }


def _subprocess(*args: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, __file__, *args], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _url(engine: str, folder: Path, n: int) -> str:
    if engine == "sqlite":
        return f"sqlite:///{folder / f'refit_{n}.db'}"
    base = os.environ.get("FLYWHEEL_BENCH_POSTGRES_URL") or os.environ.get(
        "FLYWHEEL_TEST_POSTGRES_URL", ""
    )
    if not base:
        raise SystemExit("set FLYWHEEL_BENCH_POSTGRES_URL for --engine postgresql")
    import sqlalchemy as sa

    schema = f"refit_{n}"
    url = sa.engine.make_url(base)
    return url.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(
        hide_password=False
    )


def _has_data(url: str) -> bool:
    import sqlalchemy as sa

    from optimizer.store import make_engine

    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            return bool(conn.execute(sa.text("SELECT count(*) FROM assignments")).scalar())
    except sa.exc.DBAPIError:
        return False
    finally:
        engine.dispose()


def _ensure_schema(url: str) -> None:
    import sqlalchemy as sa

    from optimizer.store import make_engine

    schema = str(dict(sa.engine.make_url(url).query)["options"]).split("=", 1)[1]
    base = sa.engine.make_url(url).difference_update_query(["options"])
    engine = make_engine(base.render_as_string(hide_password=False))
    with engine.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    engine.dispose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--engine", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--keep", type=Path, help="build SQLite files here and keep them")
    parser.add_argument(
        "--full-max",
        type=int,
        default=1_000_000,
        help="run the full-recomputation baseline up to this size (default 1M)",
    )
    parser.add_argument(
        "--turn-days",
        type=float,
        help="turns and votes only for the last N days of sessions (see chunks())",
    )
    parser.add_argument(
        "--_measure", nargs=3, metavar=("URL", "NOW", "MODE"), help=argparse.SUPPRESS
    )
    parser.add_argument("--_groupby", metavar="URL", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._measure:
        url, now, mode = args._measure
        print(json.dumps(measure(url, datetime.fromisoformat(now), mode != "full")))
        return 0
    if args._groupby:
        print(json.dumps(measure_groupby(args._groupby)))
        return 0

    rows = []
    with tempfile.TemporaryDirectory(prefix="flywheel-refit-") as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for n in args.sizes:
            url = _url(args.engine, folder, n)
            build_s = None
            if not _has_data(url):
                if args.engine == "postgresql":
                    _ensure_schema(url)
                tic = time.perf_counter()
                counts = history.build(url, n, turn_days=args.turn_days)
                build_s = time.perf_counter() - tic
                print(
                    f"built {n:,} sessions ({counts['turns']:,} turns, {counts['feedback']:,} "
                    f"votes, {counts['outcomes']:,} outcomes) in {build_s:.0f} s, "
                    f"load {os.getloadavg()[0]:.1f}",
                    flush=True,
                )
            reset(url)
            now = history.START + timedelta(days=history.days_for(n) + 0.5)
            cold = _subprocess("--_measure", url, now.isoformat(), "incremental")
            later = now + timedelta(hours=1)
            add_hour(url, n, later)
            warm = _subprocess("--_measure", url, later.isoformat(), "incremental")
            full = (
                _subprocess("--_measure", url, later.isoformat(), "full")
                if n <= args.full_max
                else None
            )
            groupby = _subprocess("--_groupby", url)
            row = {
                "n": n,
                "engine": args.engine,
                "days": history.days_for(n),
                "build_s": build_s,
                "cold": cold,
                "warm": warm,
                "full": full,
                "groupby": groupby,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)

    print()
    print(
        "| engine | sessions (days) | warm refit | CPU | peak RSS | cold (seals history) "
        "| full recomputation | warm / full | groupby baseline | build | load (1 min) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        w, c, f, g = r["warm"], r["cold"], r["full"], r["groupby"]
        ratio = f"{w['s'] / f['s']:.2f}×" if f else "not run"
        full_s = f"{f['s']:.1f} s, {f['rss_mb']:,.0f} MB" if f else "not run"
        built = f"{r['build_s']:.0f} s" if r["build_s"] else "kept"
        print(
            f"| {r['engine']} | {r['n']:,} ({r['days']:.0f}) | {w['s']:.2f} s | {w['cpu_s']:.2f} s "
            f"| {w['rss_mb']:,.0f} MB | {c['s']:.1f} s, {c['rss_mb']:,.0f} MB "
            f"| {full_s} | {ratio} | {g['s']:.2f} s | {built} | {w['load']:.1f} |"
        )
    print(
        f"targets: warm refit at 10M ≤ {TARGET_S:g} s and ≤ {TARGET_GB:g} GB, ≤ {TARGET_RATIO:g}× "
        f"the warm time at 1M. Load average at the end: {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} CPUs."
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
